"""Reproducible noise: every image's Gaussian draws depend only on (seed, image index, draw number).

So an image is the same whatever the batch size, the number of ranks or the device it is generated on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffusion.errors import ConfigError


class PerImageNoise:
    """Gaussian noise that depends only on (seed, image index, draw number), not on batching or ranks.

    Each image owns a CPU generator seeded from (seed, index); x_T is its first draw and every stochastic solver
    step draws the next one, so image k is the same whether it is generated in a batch of 4 or 16, on one rank
    or on two, on the CPU or a GPU.

    :param seed: a non-negative integer.
    :param indices: the global indices of the images in this batch (N of them).
    :param shape: the shape of one image, (C, H, W).
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device) -> None:
        if seed < 0:
            raise ConfigError(f"seed={seed}: must be >= 0")
        self.shape = tuple(shape)
        self.device = device
        self.generators = [torch.Generator().manual_seed(derived_seed(seed, i)) for i in indices]

    def draw(self) -> Tensor:
        """The next draw of every image: an [N x C x H x W] Tensor on the device."""
        x = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return x.to(self.device)

    def __call__(self, step: int) -> Tensor:
        return self.draw()


def derived_seed(*keys: int) -> int:
    """A 64-bit generator seed from non-negative integer keys, e.g. (seed, image index): distinct key tuples give
    unrelated streams, unlike ``seed * K + index``, where seed 0's image K is seed 1's image 0."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
