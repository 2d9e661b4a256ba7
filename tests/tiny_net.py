"""The tiny seeded network used by both scripts/reference_formulations.py and the tests.

One definition imported by both, so the reference numbers and the reimplementation see the same function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TinyNet(nn.Module):
    """A per-pixel two-layer MLP with a sinusoidal time embedding and an optional class embedding.

    Called as ``net(x, t, y=None)``: x [N, C, ...], t [N] float (any range), y [N] long or None -> [N, C, ...].
    Nonlinear in x and t so that errors in c_in / time mapping show up in the output. Weights come from a seeded
    generator, so two constructions with the same arguments are identical.
    """

    def __init__(self, channels: int = 3, hidden: int = 16, num_classes: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, channels, generator=g) / math.sqrt(channels))
        self.b1 = nn.Parameter(0.1 * torch.randn(hidden, generator=g))
        self.register_buffer("freqs", torch.tensor([0.3, 1.0, 3.0, 10.0]))
        self.wt = nn.Parameter(torch.randn(hidden, 8, generator=g) / math.sqrt(8))
        self.emb = nn.Parameter(0.5 * torch.randn(num_classes, hidden, generator=g))
        self.w2 = nn.Parameter(torch.randn(channels, hidden, generator=g) / math.sqrt(hidden))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **_: object) -> Tensor:
        dt = x.dtype
        ang = t.to(dt).reshape(-1, 1) * self.freqs.to(dt)[None]
        temb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1) @ self.wt.to(dt).T  # [N, H]
        if y is not None:
            temb = temb + self.emb.to(dt)[y]
        extra = [1] * (x.ndim - 2)
        h = torch.einsum("hc,nc...->nh...", self.w1.to(dt), x) + (temb + self.b1.to(dt)).reshape(
            *temb.shape, *extra
        )
        return torch.einsum("ch,nh...->nc...", self.w2.to(dt), torch.tanh(h))
