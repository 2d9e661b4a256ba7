"""`make bench`: how close a train step and a sampling step come to what this machine can do.

    python benchmarks/bench.py [--quick] [--device cpu|cuda] [--threads 2] [--models NAME ...]
                               [--batch unet_64=8] [--levers [NAME ...]] [--skip SECTION ...]
                               [--seconds 10] [--warmup 1] [--peak-tflops 989] [--json PATH]
                               [OVERRIDE ...]

One run measures, in order:

- the ceiling: matrix-multiply and 3x3-convolution rates (GFLOP/s) at unet_32's sizes, in the precision the
  hardware preset trains in (fp32 on the CPU, bf16 on GPUs);
- the train step of each model (its conf/model preset composed with Hydra, as users run it): images/s,
  achieved GFLOP/s (counted by ``torch.utils.flop_counter``), achieved / ceiling, peak memory. A UNet's ceiling
  is the convolution rate; a transformer (DiT, on DiT's 32x32x4 ImageNet latents) is matmul-bound, so its
  ceiling is the matmul rate at its own MLP shape ((batch * tokens) x D @ D x 4D);
- one sampling step (one model call) of each solver for unet_32: images/s;
- data loading: images/s per DataLoader worker (benchmarks/data_bench.py).

Every figure is the median of repeated timed runs after warm-up. The CPU is often shared, so the ceiling is
probed again before and after each train-step measurement and each model's ratio uses the probes around it; the load average is printed with the table. ``--levers`` adds A/B comparisons of each performance
switch against the preset's default, timed alternately in one process. OVERRIDEs are Hydra overrides applied
to every composed config (``hardware.channels_last=true``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusion  # noqa: E402

diffusion.register()
from diffusion.engine.tasks import Task  # noqa: E402
from diffusion.engine.training import (  # noqa: E402
    StepPlan,
    TrainState,
    build_task,
)
from diffusion.engine.training import train_step as engine_train_step  # noqa: E402
from diffusion.sampling.guidance import guided_denoiser  # noqa: E402

THREADS = 2
MODELS = ("unet_digits", "unet_32", "unet_64", "dit_s_2", "dit_b_2")
# Per-device batch of each train-step row; other presets default to DEFAULT_BATCH.
TRAIN_BATCH = {"unet_digits": 64, "unet_32": 32, "unet_64": 4, "dit_s_2": 4, "dit_b_2": 4}
DEFAULT_BATCH = 4
# A preset's row runs in its conf/experiment recipe where it has one (digits: as `make train` trains it), at
# the benchmark's own thread count rather than the recipe's.
RECIPES = {"unet_digits": ["experiment=digits", "hardware.num_threads=null"]}
SAMPLE_MODEL, SAMPLE_BATCH = "unet_32", 32
SOLVERS = ("ddpm", "ddim", "dpm_solver")
SAMPLE_STEPS = 2  # model calls per timed solver run (respacing keeps at least 2 steps)
DATA_IMAGES = 200
# unet_32's 3x3 convolutions: (channels, resolution) of its four levels at batch 32.
CONV_SHAPES = ((128, 32), (256, 16), (256, 8), (256, 4))
CONV_BATCH = 32
# The attention qkv projection of unet_32 at 16x16: (batch * tokens) x C @ C x 3C.
MATMUL_SHAPE = (32 * 256, 256, 768)
# A model shrunk to seconds for --quick: same presets, narrower and shallower (each family's own fields).
QUICK_MODEL = ["model.num_channels=32", "model.num_res_blocks=1", "model.num_head_channels=32"]
QUICK_TRANSFORMER = ["model.depth=1", "model.hidden_size=64", "model.num_heads=2"]


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch.utils.flop_counter has formulas for the CUDA attention kernels only; the CPU flash kernel takes the
# same (query, key, value) / (grad_out, query, key, value) leading arguments, so the same counts apply.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


@dataclass(frozen=True)
class Repeats:
    """How a figure is timed: untimed warm-up calls, then at least ``min_repeats`` calls and ``min_seconds``
    of timed calls (at most ``max_repeats``)."""

    warmup: int = 1
    min_repeats: int = 3
    min_seconds: float = 10.0
    max_repeats: int = 30


# Kernels that take milliseconds get more repeats within a bounded time.
KERNEL_REPEATS = Repeats(warmup=2, min_repeats=5, min_seconds=0.5, max_repeats=50)
ONCE = Repeats(warmup=0, min_repeats=1, min_seconds=0.0, max_repeats=1)


@dataclass
class Plan:
    """What one run measures and how hard: the full table, or --quick's single tiny iteration of each part."""

    device: str
    models: Sequence[str]
    batches: dict[str, int]
    overrides: list[str]
    levers: Sequence[str] = ()
    dtype: torch.dtype = torch.float32  # the ceiling's precision: what the hardware preset trains in
    quick: bool = False
    steps: Repeats = Repeats()
    kernels: Repeats = KERNEL_REPEATS
    conv_batch: int = CONV_BATCH
    matmul_shape: tuple[int, int, int] = MATMUL_SHAPE
    sample_batch: int = SAMPLE_BATCH
    sample_steps: int = SAMPLE_STEPS
    data_images: int = DATA_IMAGES
    model_overrides: list[str] = field(default_factory=list)
    transformer_overrides: list[str] = field(default_factory=list)  # model_overrides of a transformer preset
    peak_tflops: float | None = None  # the device's datasheet peak in the training precision, for MFU

    @classmethod
    def quick_plan(cls, **kwargs) -> Plan:
        """One call of everything at toy sizes, no warm-up: checks that the script runs, measures nothing."""
        kwargs["batches"] = {name: 2 for name in kwargs["models"]}
        return cls(
            **kwargs,
            quick=True,
            steps=ONCE,
            kernels=ONCE,
            conv_batch=1,
            matmul_shape=(64, 64, 64),
            sample_batch=2,
            data_images=30,
            model_overrides=QUICK_MODEL,
            transformer_overrides=QUICK_TRANSFORMER,
        )


# --- timing -------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: Repeats) -> tuple[float, list[float]]:
    """
    Time ``fn`` as ``repeats`` says.

    :return: (seconds of the first call, which includes any compilation; the timed calls' seconds).
    """
    warm = [_timed(fn, device) for _ in range(repeats.warmup)]
    times: list[float] = []
    while len(times) < repeats.max_repeats and (
        len(times) < repeats.min_repeats or sum(times) < repeats.min_seconds
    ):
        times.append(_timed(fn, device))
    return (warm or times)[0], times


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# --- the ceiling --------------------------------------------------------------------------------------------


def conv_rate(device: torch.device, plan: Plan, memory_format: torch.memory_format) -> float:
    """
    3x3 convolution forward rate over unet_32's levels, in GFLOP/s (total FLOPs / total median time).

    :param memory_format: torch.contiguous_format (NCHW) or torch.channels_last (NHWC).
    """
    flops, seconds = 0, 0.0
    for channels, size in CONV_SHAPES:
        x = torch.randn(plan.conv_batch, channels, size, size, device=device, dtype=plan.dtype)
        w = torch.randn(channels, channels, 3, 3, device=device, dtype=plan.dtype)
        x, w = x.contiguous(memory_format=memory_format), w.contiguous(memory_format=memory_format)
        _, times = time_calls(lambda x=x, w=w: F.conv2d(x, w, padding=1), device, plan.kernels)
        flops += 2 * plan.conv_batch * channels * channels * 9 * size * size
        seconds += statistics.median(times)
    return flops / seconds / 1e9


def conv_ceiling(device: torch.device, plan: Plan) -> float:
    """The convolution ceiling: the faster memory format's rate (GFLOP/s)."""
    return max(conv_rate(device, plan, fmt) for fmt in (torch.contiguous_format, torch.channels_last))


def matmul_rate(device: torch.device, plan: Plan, shape: tuple[int, int, int] | None = None) -> float:
    """Matrix-multiply rate (GFLOP/s) at ``shape`` = (m, k, n), by default ``plan.matmul_shape``."""
    m, k, n = shape or plan.matmul_shape
    a = torch.randn(m, k, device=device, dtype=plan.dtype)
    b = torch.randn(k, n, device=device, dtype=plan.dtype)
    _, times = time_calls(lambda: a @ b, device, plan.kernels)
    return 2 * m * k * n / statistics.median(times) / 1e9


def ceiling_rows(device: torch.device, plan: Plan) -> list[dict]:
    shapes = ", ".join(f"{c}ch@{s}px" for c, s in CONV_SHAPES)
    precision = str(plan.dtype).removeprefix("torch.")
    rows = [
        {
            "section": "ceiling",
            "kernel": "matmul {} {}x{} @ {}x{}".format(
                precision, *plan.matmul_shape[:2], *plan.matmul_shape[1:]
            ),
            "gflops": matmul_rate(device, plan),
        }
    ]
    for name, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
        rows.append(
            {
                "section": "ceiling",
                "kernel": f"conv3x3 {precision} {name} batch {plan.conv_batch} ({shapes})",
                "gflops": conv_rate(device, plan, fmt),
            }
        )
    return rows


# --- memory -------------------------------------------------------------------------------------------------


class PeakMemory:
    """
    Peak memory of the work inside the ``with`` block, in bytes above the memory in use at its start.

    CUDA: ``max_memory_allocated``. CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus its resident set at the start, after returning freed heap pages to the OS so
    that they are not silently reused; ``None`` where /proc is not available (not Linux).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._start = _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            self.bytes = _proc_status_kib("VmHWM") * 1024 - self._start


def _release_free_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> int | None:
    """Reset the peak resident set to the current one; returns the current one in bytes (None off Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_kib("VmRSS") * 1024
    except OSError:
        return None


def _proc_status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


# --- configs and the train step -----------------------------------------------------------------------------


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The real ``conf/train.yaml`` with the given Hydra overrides."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def is_transformer(model_cfg: DictConfig) -> bool:
    """A DiT-like network (tokens of width hidden_size): matmul-bound, with its own field names."""
    return "hidden_size" in model_cfg and "patch_size" in model_cfg


def model_config(plan: Plan, model: str, extra: Sequence[str] = ()) -> DictConfig:
    hardware = "hardware=gpu" if plan.device == "cuda" else "hardware=cpu"
    recipe = RECIPES.get(model, [])
    shrink = plan.model_overrides
    if plan.transformer_overrides and is_transformer(compose_config([f"model={model}"]).model):
        shrink = plan.transformer_overrides
    return compose_config(
        [f"model={model}", hardware, *recipe, "logger=none", *shrink, *plan.overrides, *extra]
    )


def input_shape(model_cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, side, classes) of the data a preset takes: a UNet's image_size, a DiT's input_size (for the
    DiT presets DiT's ImageNet 256 latents, 32x32x4); classes 0 when unconditional."""
    side = model_cfg.get("image_size", model_cfg.get("input_size"))
    conditional = model_cfg.get("class_cond", True)
    return model_cfg.in_channels, side, (model_cfg.num_classes or 0) if conditional else 0


def matmul_shape(model_cfg: DictConfig, batch: int) -> tuple[int, int, int]:
    """A transformer's MLP matmul, (batch * tokens) x D @ D x mlp_ratio * D: the bulk of its FLOPs."""
    _, side, _ = input_shape(model_cfg)
    tokens = (side // model_cfg.patch_size) ** 2
    d = model_cfg.hidden_size
    return batch * tokens, d, int(d * model_cfg.mlp_ratio)


@dataclass
class TrainSetup:
    """One optimizer step of the engine on a fixed random batch: the engine's own task, state and step plan."""

    cfg: DictConfig
    hw: object
    task: Task
    state: TrainState
    net: Callable  # what the forward pass calls: the model, compiled where the hardware preset says
    plan: StepPlan
    x: torch.Tensor
    y: torch.Tensor

    @property
    def model(self) -> torch.nn.Module:
        return self.state.model


def build_train(cfg: DictConfig, batch: int) -> TrainSetup:
    """The model, EMA, optimizer and schedule of ``cfg`` as the engine builds them, and a fixed batch of ``batch``
    random images (in place of the data loader)."""
    hw = instantiate(cfg.hardware)
    task = build_task(cfg)
    channels, side, num_classes = input_shape(cfg.model)
    data = SimpleNamespace(image_size=side, channels=channels, num_classes=num_classes)
    model, _ = task.build_model(cfg.model, data)
    model = hw.prepare_model(model).train()
    state = TrainState.create(cfg, model, hw, task.sampler)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, side, side, generator=gen).mul(2).sub(1)
    y = torch.randint(0, max(num_classes, 1), (batch,), generator=gen)
    return TrainSetup(
        cfg=cfg,
        hw=hw,
        task=task,
        state=state,
        net=torch.compile(model) if hw.compile else model,
        plan=StepPlan(global_batch=batch, micro=batch, seed=cfg.seed),
        x=hw.prepare_batch(x),
        y=y.to(hw.device),
    )


def train_step(s: TrainSetup, net: Callable | None = None) -> None:
    """One optimizer step through the engine's ``train_step`` (one micro-batch; no data loading or logging)."""
    engine_train_step(s.state, s.task, net or s.net, s.x, s.y, s.plan, s.hw)


def count_flops(fn: Callable[[], object]) -> int:
    """Matrix-multiply, convolution and attention FLOPs of ``fn`` (forward and backward), eager mode."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def train_flops(s: TrainSetup) -> int:
    """FLOPs of one train step, counted on the uncompiled model (the counter sees matmuls, convolutions and
    attention: the forward and backward passes; the optimizer's and EMA's elementwise work is not counted, as
    in MFU figures). The counted step is a real step: it also serves as a warm-up."""
    return count_flops(lambda: train_step(s, net=s.model))


def _measure_train(cfg: DictConfig, batch: int, device: torch.device, repeats: Repeats):
    """(parameters, FLOPs per step, first step seconds, timed step seconds); the setup is freed on return."""
    s = build_train(cfg, batch)
    flops = train_flops(s)
    first, times = time_calls(lambda: train_step(s), device, repeats)
    return sum(p.numel() for p in s.model.parameters()), flops, first, times


def ceiling_probe(
    cfg: DictConfig, batch: int, device: torch.device, plan: Plan
) -> tuple[str, Callable[[], float]]:
    """What bounds this model's step, and a probe of its rate (GFLOP/s): the matmul at a transformer's MLP
    shape, else the convolution ceiling."""
    if is_transformer(cfg.model):
        shape = matmul_shape(cfg.model, batch)
        return "matmul", lambda: matmul_rate(device, plan, shape)
    return "conv", lambda: conv_ceiling(device, plan)


def train_row(name: str, device: torch.device, plan: Plan) -> dict:
    """Build the preset, count its FLOPs, time its train step; memory covers the whole (model, EMA, optimizer,
    activations) footprint. The ceiling is probed before and after, for the ratio."""
    cfg = model_config(plan, name)
    batch = plan.batches.get(name, DEFAULT_BATCH)
    kind, probe = ceiling_probe(cfg, batch, device, plan)
    before = probe()
    with PeakMemory(device) as memory:
        params, flops, first, times = _measure_train(cfg, batch, device, plan.steps)
    ceiling = (before + probe()) / 2
    seconds = statistics.median(times)
    return {
        "section": "train",
        "model": name,
        "params_m": params / 1e6,
        "batch": batch,
        "images_per_s": batch / seconds,
        "step_s": seconds,
        "gflop_per_step": flops / 1e9,
        "gflops": flops / seconds / 1e9,
        "ceiling": kind,
        "ceiling_gflops": ceiling,
        "of_ceiling": flops / seconds / 1e9 / ceiling,
        "peak_memory_gb": None if memory.bytes is None else memory.bytes / 2**30,
        "first_step_s": first,
        "repeats": len(times),
        "mfu": None if plan.peak_tflops is None else flops / seconds / 1e12 / plan.peak_tflops,
    }


# --- sampling -----------------------------------------------------------------------------------------------


def sampling_rows(device: torch.device, plan: Plan) -> list[dict]:
    """Images/s of one model call of each solver on the sampling model (eval mode, no gradients, not compiled:
    as sample.py runs it)."""
    cfg = model_config(plan, SAMPLE_MODEL)
    s = build_train(cfg, plan.sample_batch)
    model = s.model.eval()
    x_T = torch.randn_like(s.x)
    kwargs = {"y": s.y} if model.num_classes else {}
    rows = []
    for solver_name in SOLVERS:
        solver_cfg = model_config(
            plan, SAMPLE_MODEL, [f"solver={solver_name}", f"solver.steps={plan.sample_steps}"]
        )
        solver = instantiate(solver_cfg.solver)

        denoiser = guided_denoiser(model, s.task.diffusion, clip_denoised=solver.clip_denoised)

        @torch.no_grad()
        def run(solver=solver, denoiser=denoiser):
            with s.hw.autocast():
                solver(denoiser, x_T, extra_args=kwargs)

        _, times = time_calls(run, device, plan.steps)
        rows.append(
            {
                "section": "sampling",
                "model": SAMPLE_MODEL,
                "solver": type(solver).__name__,
                "batch": plan.sample_batch,
                "images_per_s": plan.sample_batch * plan.sample_steps / statistics.median(times),
                "repeats": len(times),
            }
        )
    return rows


# --- data loading -------------------------------------------------------------------------------------------


def data_rows(plan: Plan) -> list[dict]:
    """benchmarks/data_bench.py's rows (it pins each decoding process to one thread; restored after)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import data_bench

    threads = torch.get_num_threads()
    try:
        return [{"section": "data", **row} for row in data_bench.run(plan.data_images)]
    finally:
        torch.set_num_threads(threads)


# --- levers -------------------------------------------------------------------------------------------------


def _flip(key: str) -> Callable[[DictConfig], tuple[str, list[str]]]:
    def variant(cfg: DictConfig) -> tuple[str, list[str]]:
        value = not getattr(instantiate(cfg.hardware), key)  # the preset's value as resolved on this device
        return f"{key}={value}", [f"hardware.{key}={value}"]

    return variant


# Each lever's variant against the preset's default: (label, Hydra overrides).
LEVERS: dict[str, Callable[[DictConfig], tuple[str, list[str]]]] = {
    "channels_last": _flip("channels_last"),
    "compile": _flip("compile"),
    "sdpa": lambda cfg: ("plain attention (no SDPA)", ["model.use_sdpa=false"]),
    "optimizer_foreach": lambda cfg: (
        "AdamW foreach (not fused)",
        ["hardware.fused_optimizer=false", "+optim.optimizer.foreach=true"],
    ),
    "optimizer_loop": lambda cfg: (
        "AdamW for-loop",
        ["hardware.fused_optimizer=false", "+optim.optimizer.foreach=false"],
    ),
}


def lever_applies(cfg: DictConfig, lever: str) -> bool:
    """Whether the model has the fields a lever switches (a DiT has no use_sdpa: its attention is SDPA)."""
    _, overrides = LEVERS[lever](cfg)
    fields = [o.split("=", 1)[0].removeprefix("model.") for o in overrides if o.startswith("model.")]
    return all(f in cfg.model for f in fields)


def lever_row(name: str, lever: str, device: torch.device, plan: Plan) -> dict:
    """Default vs variant, built side by side and timed alternately so that load changes hit both alike."""
    cfg = model_config(plan, name)
    label, overrides = LEVERS[lever](cfg)
    batch = plan.batches.get(name, DEFAULT_BATCH)
    base = build_train(cfg, batch)
    variant = build_train(model_config(plan, name, overrides), batch)
    base_times: list[float] = []
    variant_times: list[float] = []

    def pair() -> None:
        base_times.append(_timed(lambda: train_step(base), device))
        variant_times.append(_timed(lambda: train_step(variant), device))

    time_calls(pair, device, plan.steps)
    del base_times[: plan.steps.warmup], variant_times[: plan.steps.warmup]  # warm-up (and compilation)
    ratios = [b / v for b, v in zip(base_times, variant_times)]
    return {
        "section": "levers",
        "model": name,
        "batch": batch,
        "variant": label,
        "default_s": statistics.median(base_times),
        "variant_s": statistics.median(variant_times),
        "speedup": statistics.median(ratios),  # > 1: the variant is faster than the default
        "pairs": len(ratios),
    }


# --- the table ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _train_line(r: dict) -> str:
    return (
        f"  {r['model']:<12} {r['params_m']:7.1f}M {r['batch']:>5} {r['images_per_s']:8.2f} "
        f"{r['step_s']:8.3f} {r['gflop_per_step']:10.1f} {r['gflops']:8.1f} "
        f"{r['ceiling_gflops']:8.1f} {r['ceiling']:<6} {r['of_ceiling']:8.0%} "
        f"{_fmt(r['peak_memory_gb'], '8.2f')}G {r['first_step_s']:8.2f}s"
        + ("" if r.get("mfu") is None else f"  MFU {r['mfu']:.0%}")
    )


# Per section of the table: title, column header (or None) and the line of one row.
SECTIONS: dict[str, tuple[str, str | None, Callable[[dict], str]]] = {
    "ceiling": (
        "ceiling (medians)",
        None,
        lambda r: f"  {r['kernel']:<70} {r['gflops']:8.1f} GFLOP/s",
    ),
    "train": (
        "train step: forward + backward + AdamW + EMA (engine path, hybrid loss)",
        f"  {'model':<12} {'params':>8} {'batch':>5} {'img/s':>8} {'step s':>8} {'GFLOP/step':>10} "
        f"{'GFLOP/s':>8} {'ceiling':>15} {'of ceil':>8} {'peak mem':>9} {'1st step':>9}",
        _train_line,
    ),
    "sampling": (
        "sampling: one step (one model call), eval mode, no gradients",
        None,
        lambda r: (
            f"  {r['model']:<12} {r['solver']:<12} batch {r['batch']:>3} {r['images_per_s']:8.2f} images/s"
        ),
    ),
    "data": (
        "data loading",
        None,
        lambda r: (
            f"  {r['benchmark']:<40} workers={r['num_workers']}  {r['images_per_s']:8.1f} images/s  "
            f"({r['images_per_s_per_worker']:.1f} per worker)"
        ),
    ),
    "levers": (
        "levers: default vs variant, alternated (speedup > 1: the variant is faster)",
        None,
        lambda r: (
            f"  {r['model']:<12} {r['variant']:<32} default {r['default_s']:8.3f}s  variant "
            f"{r['variant_s']:8.3f}s  speedup {r['speedup']:5.2f}x  ({r['pairs']} pairs)"
        ),
    ),
}


def format_table(rows: list[dict], header: str) -> str:
    lines = [header]
    for section, (title, columns, line) in SECTIONS.items():
        chosen = [r for r in rows if r["section"] == section]
        if chosen:
            lines += ["", title, *([columns] if columns else []), *map(line, chosen)]
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Pin intra-op threads for the measurement (the table is defined at 2), restoring the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny iteration of everything (for tests)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="conf/model presets to train")
    parser.add_argument("--batch", nargs="+", default=[], metavar="MODEL=N", help="per-device batch sizes")
    parser.add_argument(
        "--levers", nargs="*", default=None, metavar="LEVER", help=f"A/B levers ({', '.join(LEVERS)}; all)"
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="intra-op CPU threads")
    parser.add_argument(
        "--seconds",
        type=float,
        default=Repeats.min_seconds,
        help="least timed seconds behind each step figure",
    )
    parser.add_argument(
        "--warmup", type=int, default=Repeats.warmup, help="untimed steps first (compilation can take two)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["ceiling", "train", "sampling", "data"])
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's datasheet peak (TFLOP/s, training precision): adds MFU",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every composed config")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    batches = dict(TRAIN_BATCH)
    for item in args.batch:
        name, _, size = item.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"--batch {item!r}: use MODEL=N with a positive N, e.g. unet_64=8")
        batches[name] = int(size)
    levers = tuple(LEVERS) if args.levers == [] else tuple(args.levers or ())
    for lever in levers:
        if lever not in LEVERS:
            raise ValueError(f"--levers: unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
    # hardware=cpu trains in fp32, hardware=gpu in bf16 autocast.
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    kwargs = dict(
        device=args.device,
        models=args.models,
        overrides=args.overrides,
        levers=levers,
        dtype=dtype,
        peak_tflops=args.peak_tflops,
    )
    if args.quick:
        return Plan.quick_plan(**kwargs)
    if args.seconds < 0:
        raise ValueError(f"--seconds {args.seconds}: use a number of seconds >= 0")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: use a number of steps >= 0")
    steps = Repeats(warmup=args.warmup, min_seconds=args.seconds)
    return Plan(batches=batches, steps=steps, **kwargs)


def run(plan: Plan, skip: Sequence[str] = (), report: Callable[[str], None] = print) -> list[dict]:
    """Measure everything the plan asks for, in one process; ``report`` sees each section as it completes."""
    device = torch.device(plan.device)
    rows: list[dict] = []
    sections = [
        ("ceiling", lambda: ceiling_rows(device, plan)),
        ("train", lambda: [train_row(name, device, plan) for name in plan.models]),
        ("sampling", lambda: sampling_rows(device, plan)),
        ("data", lambda: data_rows(plan)),
        (
            "levers",
            lambda: [
                lever_row(n, lever, device, plan)
                for n in plan.models
                for lever in plan.levers
                if lever_applies(model_config(plan, n), lever)
            ],
        ),
    ]
    for name, measure in sections:
        if name in skip:
            continue
        new = measure()
        rows += new
        report(format_table(new, f"[{name} done, load average {os.getloadavg()[0]:.1f}]"))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    plan = make_plan(args)
    load_start = os.getloadavg()[0]
    with num_threads(args.threads):
        rows = run(plan, args.skip, report=lambda text: print(text, file=sys.stderr, flush=True))
    header = (
        f"make bench: torch {torch.__version__}, {plan.device}, {args.threads} threads, "
        f"{str(plan.dtype).removeprefix('torch.')}, {os.cpu_count()} cores, load average "
        f"{load_start:.1f} -> {os.getloadavg()[0]:.1f}{' (--quick: not a measurement)' if plan.quick else ''}"
    )
    print(format_table(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
