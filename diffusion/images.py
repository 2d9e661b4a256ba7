"""Converting model outputs to images and writing sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N x C x H x W] floats in [-1, 1] -> uint8 [N x H x W x C], as the reference converts samples."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N x H x W x C] images into one uint8 [H' x W' x C] grid with ``pad`` pixels between."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncol)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = img
    return grid


def save_grid(images: np.ndarray, path: str | Path, min_size: int = 256) -> np.ndarray:
    """Write a PNG grid, upscaled with nearest neighbours so that small images stay visible; returns the grid."""
    grid = make_grid(images)
    scale = max(1, min_size // max(grid.shape[:2]))
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    pil = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return grid
