"""Converting model outputs to images and writing sample grids (torchvision's make_grid and save_image)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

# guided-diffusion's conversion of samples, which truncates (it does not round); every image here is made so.
UINT8_FROM_FLOATS = "((x + 1) * 127.5).clip(0, 255).astype(np.uint8)"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N x C x H x W] floats in [-1, 1] -> uint8 [N x H x W x C], as the reference converts samples."""
    return to_uint8_tensor(x).cpu().numpy()


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8` that stays on x's device: a uint8 [N x H x W x C] Tensor (a view of NHWC order)."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: np.ndarray, path: str | Path, min_size: int = 256, pad: int = 2) -> np.ndarray:
    """
    Tile uint8 images into a square-ish grid and write it as PNG, upscaled with nearest neighbours so that small
    images stay visible.

    :param images: a uint8 [N x H x W x C] array (C = 1 or 3).
    :param min_size: the grid is enlarged by an integer factor until its longer side reaches this.
    :return: the grid as written, a uint8 [H' x W' x 3] array (grayscale images repeated into RGB).
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)
    # (3, H', W'): make_grid repeats a single channel into RGB, as save_image writes it.
    grid = make_grid(x, nrow=math.ceil(math.sqrt(len(x))), padding=pad, pad_value=0.0)
    scale = max(1, min_size // max(grid.shape[1:]))
    if scale > 1:
        grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
