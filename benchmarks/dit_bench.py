"""DiT train-step throughput against this machine's matrix-multiply rate (a transformer is matmul-bound).

    python benchmarks/dit_bench.py [--models dit_s_2 dit_b_2] [--batch 4] [--threads 2] [--seconds 10]
                                   [--device cpu|cuda] [--peak-tflops 989] [--json PATH] [--quick]

Each row builds a DiT preset at DiT's ImageNet-256 latent shape (32x32x4 latents, 1000 classes, learned sigma)
and times one train step as DiT takes it: the hybrid loss of the project's GaussianDiffusion (linear schedule,
1000 steps, epsilon + learned-range variance) at uniform random timesteps, backward, AdamW (lr 1e-4, weight
decay 0). The FLOPs of forward + backward are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
multiplies, the patch convolution and attention; the optimizer's elementwise work is not counted, as in MFU
figures). The ceiling is the measured rate of a matmul with the model's MLP shape ((batch * tokens) x D @ D x
4D), in the step's precision (fp32 on the CPU, bf16 autocast on a GPU), probed before and after each row because
the CPU is shared; ``of_matmul`` is achieved / ceiling. ``--peak-tflops`` adds MFU against a data-sheet peak
(H100/H200 dense bf16: 989). Figures are medians of timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion.dit import DIT_CONFIGS, DiT  # noqa: E402
from diffusion.gaussian_diffusion import GaussianDiffusion  # noqa: E402

LATENT_SIZE, LATENT_CHANNELS, NUM_CLASSES = 32, 4, 1000


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# flop_counter knows the CUDA attention kernels only; the CPU flash kernel takes the same leading arguments.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def repeat(
    fn: Callable[[], object], device: torch.device, seconds: float, min_repeats: int = 3
) -> list[float]:
    """One untimed warm-up call, then timed calls until ``min_repeats`` and ``seconds`` are both reached."""
    timed(fn, device)
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < seconds:
        times.append(timed(fn, device))
    return times


def matmul_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul, median of calls over at least half a second."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    times = repeat(lambda: a @ b, device, seconds=0.5, min_repeats=5)
    return 2 * m * k * n / statistics.median(times) / 1e9


class TrainStep:
    """A DiT preset with its optimizer, a fixed batch of latents and labels, and DiT's training loss."""

    def __init__(self, preset: str, batch: int, device: torch.device, shrink: bool = False):
        arch = dict(DIT_CONFIGS[preset])
        if shrink:  # --quick: the same code path in a fraction of a second
            arch.update(depth=1, hidden_size=arch["num_heads"] * 16)
        torch.manual_seed(0)
        self.model = DiT(input_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, num_classes=NUM_CLASSES, **arch)
        self.model.to(device).train()
        self.diffusion = GaussianDiffusion()  # DiT's create_diffusion defaults
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        self.device = device
        self.split: list[tuple[float, float]] = []  # (forward + backward, optimizer) seconds of each step
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward_backward(self) -> None:
        t = torch.randint(0, self.diffusion.num_timesteps, (len(self.x),), device=self.device)
        with self.autocast:
            loss = self.diffusion.training_losses(self.model, self.x, t, model_kwargs={"y": self.y})["loss"]
        loss.mean().backward()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.split.append(
            (timed(self.forward_backward, self.device), timed(self.optimizer.step, self.device))
        )

    def flops(self) -> int:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            self.forward_backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def train_row(preset: str, batch: int, device: torch.device, seconds: float, quick: bool, peak: float | None):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = TrainStep(preset, batch, device, shrink=quick)
    d, tokens = s.model.hidden_size, s.model.num_tokens
    mlp_shape = (batch * tokens, d, int(d * s.model.mlp_ratio))
    before = matmul_rate(*mlp_shape, device, dtype)
    flops = s.flops()
    times = repeat(s.step, device, seconds)
    split = s.split[1:]  # without the warm-up step
    ceiling = (before + matmul_rate(*mlp_shape, device, dtype)) / 2
    step_s = statistics.median(times)
    achieved = flops / step_s / 1e9
    return {
        "model": preset + (" (quick)" if quick else ""),
        "params_m": sum(p.numel() for p in s.model.parameters()) / 1e6,
        "batch": batch,
        "tokens": tokens,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "fwd_bwd_s": statistics.median(f for f, _ in split),
        "adamw_s": statistics.median(o for _, o in split),
        "gflop_per_step": flops / 1e9,
        "gflops": achieved,
        "matmul_gflops": ceiling,
        "matmul_shape": "x".join(map(str, mlp_shape)),
        "of_matmul": achieved / ceiling,
        "mfu": None if peak is None else achieved / 1e3 / peak,
        "repeats": len(times),
    }


def print_table(rows: list[dict], device: torch.device, threads: int) -> None:
    where = (
        f"{device.type}, {threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"DiT train step (32x32x4 latents, fwd+bwd+AdamW) on {where}; load average {load}")
    header = (
        "model            params_M batch  step_s (fwd+bwd,  adamw)   img/s  GFLOP/step  GFLOP/s  matmul GFLOP/s"
        "  of_matmul   MFU"
    )
    print(header)
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"{r['model']:<16} {r['params_m']:8.1f} {r['batch']:5d} {r['step_s']:7.3f} "
            f"({r['fwd_bwd_s']:7.3f}, {r['adamw_s']:6.3f}) {r['images_per_s']:7.2f} "
            f"{r['gflop_per_step']:11.1f} {r['gflops']:8.1f} {r['matmul_gflops']:15.1f} {r['of_matmul']:10.1%} "
            f"{mfu:>5}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dit_s_2", "dit_b_2"], choices=sorted(DIT_CONFIGS))
    parser.add_argument("--batch", type=int, default=4, help="latents per step (default 4 on a 2-core CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row, at least 3 steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="data-sheet peak for an MFU column")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--quick", action="store_true", help="one-block models, one timed step: a smoke test")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seconds = 0.0 if args.quick else args.seconds
    rows = [train_row(m, args.batch, device, seconds, args.quick, args.peak_tflops) for m in args.models]
    print_table(rows, device, args.threads)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
