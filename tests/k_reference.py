"""Shared pieces of the k-diffusion reference tests: fixture loading and the closed-form test models.

``make_mixture``/``mixture_denoiser`` and ``tiny_net`` must stay identical to their copies in
``scripts/reference_k_diffusion.py``, which recorded k-diffusion's numbers with them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

FIXTURES = Path(__file__).parent / "fixtures" / "k_diffusion"


@cache
def reference() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) recorded by scripts/reference_k_diffusion.py."""
    tensors = torch.load(FIXTURES / "reference.pt", weights_only=True)
    meta = json.loads((FIXTURES / "reference.json").read_text())
    return tensors, meta


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(
        (actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30)
    )


def mixture_denoiser(mixture: dict[str, torch.Tensor]):
    """E[x0 | x] for x = x0 + sigma * eps, x0 ~ mixture; x [N, ...] flattened to [N, D], sigma [N]."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)  # [N, D]
        dim = flat.shape[1]
        var = mixture["stds"] ** 2  # [K]
        total = var[None, :] + sigma[:, None] ** 2  # [N, K]: variance of x given component k
        sq = ((flat[:, None, :] - mixture["means"][None]) ** 2).sum(-1)  # [N, K]
        logp = mixture["weights"].log()[None] - 0.5 * sq / total - 0.5 * dim * total.log()
        resp = torch.softmax(logp, dim=1)  # [N, K]
        shrink = var[None, :] / total  # [N, K]
        comp = mixture["means"][None] + shrink[..., None] * (flat[:, None, :] - mixture["means"][None])
        return (resp[..., None] * comp).sum(1).reshape(x.shape)

    return denoise


def tiny_net(params: dict[str, torch.Tensor]):
    """net(x [N, C, H, W], t [N]) -> [N, out_ch, H, W]; t enters through sin(t / 150) and t / 1000."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)[:, None, None, None]
        h = F.conv2d(x, params["weight"], params["bias"], padding=1)
        return (
            h
            + torch.sin(t / 150) * params["t_sin"][:, None, None]
            + (t / 1000) * params["t_lin"][:, None, None]
        )

    return net


class Replay:
    """Hands out the recorded noise tensors in order, as a noise sampler ``(sigma, sigma_next) -> Tensor``."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.used = 0

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        out = self.noise[self.used].clone()
        self.used += 1
        return out
