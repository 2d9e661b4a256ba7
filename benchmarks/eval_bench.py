"""How fast the evaluator turns samples into Inception features (the FID/sFID/IS/precision/recall input).

    python benchmarks/eval_bench.py [--device cpu|cuda] [--batch 1 8 32] [--image-size 64] [--seconds 10]
                                    [--threads 2] [--metrics N] [--inception-weights PATH] [--json PATH]

Prints images/s of :meth:`diffusion.evaluate.Evaluator.extract` (uint8 images resized to 299x299 inside the
network, pool + spatial + logits features, full fp32) at each batch size, on the CPU and, when one is there, on
the GPU. On a shared CPU the rate falls steeply with the load (the load average is printed): with other
processes busy, two threads can be slower than one. Uses the real Inception weights when they are in torch hub's cache (or given), random weights of the
same shapes otherwise: the speed is the same. ``--metrics N`` also times the statistics, both Fréchet distances
(scipy sqrtm of 2048x2048 and 2023x2023 products) and precision/recall for N random feature vectors per side,
so that the cost of evaluating N samples can be read off: N / images_per_s + metrics seconds; it also shows how
far precision and recall move between fp16 distances (ADM) and fp32 ones on Inception-scaled features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion.evaluation.evaluator import Evaluator  # noqa: E402
from diffusion.evaluation.inception import (  # noqa: E402
    WEIGHTS_FILENAME,
    InceptionWeightsError,
    find_inception_weights,
    random_inception_state_dict,
)
from diffusion.evaluation.metrics import feature_statistics, frechet_distance, precision_recall  # noqa: E402

DEFAULT_BATCHES = {"cpu": (1, 8, 32), "cuda": (50, 200, 500)}


def _weights(path: str | None, tmp: Path) -> tuple[Path, str]:
    try:
        return find_inception_weights(path, download=False), "real"
    except InceptionWeightsError:
        if path is not None:
            raise
    random_path = tmp / WEIGHTS_FILENAME
    torch.save(random_inception_state_dict(seed=0), random_path)
    return random_path, "random"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction_rate(evaluator: Evaluator, batch: int, image_size: int, seconds: float) -> tuple[float, int]:
    """(images/s, images timed) of ``extract`` on batches of random uint8 images, after one warm-up batch."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8))
    images = images.to(evaluator.device)  # as the engine's samples arrive: already on the device
    evaluator.batch_size = batch
    evaluator.extract(images)  # warm-up: kernel selection, allocator
    _sync(evaluator.device)
    count, start = 0, time.perf_counter()
    while count < 2 * batch or time.perf_counter() - start < seconds:
        evaluator.extract(images)
        count += batch
        _sync(evaluator.device)
    return count / (time.perf_counter() - start), count


def inception_like_features(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """[n x 2048] non-negative features around 20 modes, at the scale of Inception's pool features (mean about
    0.2, squared norms about 290, squared distances about 420): a stand-in where the real network is absent."""
    centres = torch.randn(20, 2048, generator=torch.Generator().manual_seed(123)) * 0.5 - 0.1
    g = torch.Generator().manual_seed(seed)
    modes = torch.randint(0, 20, (n,), generator=g)
    return torch.relu(centres[modes] + shift + 0.35 * torch.randn(n, 2048, generator=g))


def metrics_seconds(n: int, device: torch.device) -> dict[str, float]:
    """Seconds for the statistics + both Fréchet distances and for precision/recall of n vs n feature vectors,
    and precision/recall with fp16 distances (ADM) and fp32 ones, to show what the precision changes."""
    g = torch.Generator().manual_seed(0)
    pool = [inception_like_features(n, 1), inception_like_features(n, 2, shift=0.02)]
    spatial = [torch.relu(torch.randn(n, 2023, generator=g)) for _ in range(2)]
    start = time.perf_counter()
    for a, b in (pool, spatial):
        frechet_distance(feature_statistics(a), feature_statistics(b))
    row = {"fid_and_sfid_s": round(time.perf_counter() - start, 2)}
    for precision in ("float16", "float32"):
        start = time.perf_counter()
        p, r = precision_recall(pool[0].to(device), pool[1].to(device), precision=precision, device=device)
        _sync(device)
        row |= {f"precision_recall_{precision}_s": round(time.perf_counter() - start, 2)}
        row |= {f"precision_{precision}": p, f"recall_{precision}": r}
    return row


def run(
    devices: list[str],
    batches: list[int] | None = None,
    image_size: int = 64,
    seconds: float = 10.0,
    threads: int = 2,
    metrics: int = 0,
    inception_weights: str | None = None,
) -> list[dict]:
    """Rows for the benchmark table: one per device and batch size, plus one per device for ``metrics``."""
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights, kind = _weights(inception_weights, Path(tmp))
        for device in devices:
            evaluator = Evaluator(
                features="inception",
                inception_weights=weights,
                device=device,
                download_weights=False,
            )
            for batch in batches or DEFAULT_BATCHES[evaluator.device.type]:
                rate, count = extraction_rate(evaluator, batch, image_size, seconds)
                rows.append(
                    {
                        "benchmark": f"eval: Inception features of {image_size}px images",
                        "device": device,
                        "threads": threads if device == "cpu" else None,
                        "batch": batch,
                        "weights": kind,
                        "images_timed": count,
                        "images_per_s": round(rate, 2),
                        "load_average": round(os.getloadavg()[0], 2),
                    }
                )
            if metrics:
                rows.append(
                    {"benchmark": f"eval: metrics of {metrics} samples", "device": device}
                    | metrics_seconds(metrics, evaluator.device)
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", action="append", choices=("cpu", "cuda"), help="default: cpu, and cuda if present"
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", help="batch sizes (default: 1 8 32 on CPU, 50 200 500 on GPU)"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="time each batch size at least this long")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument(
        "--metrics", type=int, default=0, metavar="N", help="also time the metrics for N samples"
    )
    parser.add_argument("--inception-weights", metavar="PATH")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = run(
        devices, args.batch, args.image_size, args.seconds, args.threads, args.metrics, args.inception_weights
    )
    for row in rows:
        if "images_per_s" in row:
            where = f"{row['device']}" + (f" ({row['threads']} threads)" if row["threads"] else "")
            print(
                f"{row['benchmark']}  {where}  batch={row['batch']:<4d} {row['images_per_s']:9.2f} images/s  "
                f"({row['weights']} weights, {row['images_timed']} images, load average {row['load_average']})"
            )
        else:
            print(
                f"{row['benchmark']}  {row['device']}  FID+sFID {row['fid_and_sfid_s']} s, precision/recall "
                f"{row['precision_recall_float16_s']} s (fp16), {row['precision_recall_float32_s']} s (fp32); "
                f"precision {row['precision_float16']:.4f} (fp16) vs {row['precision_float32']:.4f} (fp32), "
                f"recall {row['recall_float16']:.4f} vs {row['recall_float32']:.4f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
