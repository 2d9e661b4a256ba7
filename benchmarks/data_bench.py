"""How fast ImageFolder decodes and preprocesses real JPEGs: 256x256 files to 64x64 crops.

    python benchmarks/data_bench.py [num_images]

Prints images/s in the main process (0 workers) and per worker with 1 and 2 DataLoader workers. Divide the
target training throughput (images/s) by the per-worker rate to choose data.num_workers.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion.data.datasets import ImageFolder, InfiniteLoader

IMAGE_SIZE = 64
SOURCE_SIZE = 256
BATCH_SIZE = 10


def write_jpegs(folder: Path, num_images: int, seed: int = 0) -> None:
    """Write ``num_images`` 256x256 JPEGs of noise with random ellipses and rectangles, named CLASS_i.jpg."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        noise = rng.integers(0, 256, (SOURCE_SIZE, SOURCE_SIZE, 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, SOURCE_SIZE - 40, 2))
            x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=colour)
        image.save(folder / f"c{i % 10}_{i:05d}.jpg", quality=90)


def _loader_rate(dataset: ImageFolder, num_workers: int) -> float:
    loader = InfiniteLoader(dataset, BATCH_SIZE, num_workers=num_workers, shuffle=False)
    batches = iter(loader)
    next(batches)  # start-up (forking workers, first prefetch) is not throughput
    count = loader.batches_per_epoch - 1
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    elapsed = time.perf_counter() - start
    del batches  # shuts the workers down
    return count * BATCH_SIZE / elapsed


def run(num_images: int = 200) -> list[dict]:
    """Rows for the benchmark table: one per worker setting (0 = decoding in the main process), with
    images/s in total and per worker, batches collated as training receives them."""
    if num_images < 3 * BATCH_SIZE:
        raise ValueError(
            f"num_images must be at least {3 * BATCH_SIZE} for a steady-state timing, got {num_images}"
        )
    torch.set_num_threads(1)  # one core per decoding process, as on a loaded training node
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), num_images)
        dataset = ImageFolder(tmp, image_size=IMAGE_SIZE, random_flip=True)
        for workers in (0, 1, 2):
            rate = _loader_rate(dataset, workers)
            rows.append(
                {
                    "benchmark": f"data: ImageFolder {SOURCE_SIZE}px JPEG -> {IMAGE_SIZE}px",
                    "num_workers": workers,
                    "num_images": num_images,
                    "images_per_s": round(rate, 1),
                    "images_per_s_per_worker": round(rate / max(workers, 1), 1),
                }
            )
    return rows


if __name__ == "__main__":
    for row in run(int(sys.argv[1]) if len(sys.argv) > 1 else 200):
        print(
            f"{row['benchmark']}  workers={row['num_workers']}  {row['images_per_s']:8.1f} images/s  "
            f"({row['images_per_s_per_worker']:.1f} per worker)"
        )
