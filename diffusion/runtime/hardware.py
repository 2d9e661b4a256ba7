"""Where and in what precision the model runs: the `hardware` config group."""

from __future__ import annotations

import contextlib
import logging

import torch

from diffusion.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Hardware:
    """Device, autocast precision and the performance switches, resolved once at start-up.

    :param device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    :param precision: ``auto`` (bf16 on GPUs that support it, fp16 on older ones, fp32 on the CPU), ``fp32``,
        ``bf16`` or ``fp16`` (autocast with a dynamic grad scaler).
    :param tf32: allow TF32 matrix multiplies and convolutions on Ampere and newer GPUs.
    :param compile: wrap the train step's model in ``torch.compile``; None: on for CUDA, off on the CPU.
    :param channels_last: keep activations in NHWC layout; None: on on the CPU, off for CUDA.
        Both None defaults are the faster side that ``benchmarks/bench.py --levers`` measured on each device
        (the figures are in the README's Performance section).
    :param fused_optimizer: ask the optimizer for its fused kernel (one launch for all parameters).
    :param num_threads: CPU threads for intra-op parallelism (None: torch's default, one per core). On a
        shared or small CPU one thread can be several times faster than two fighting for the same cores.
    :param local_rank: the process's GPU on this node, passed at run time.
    """

    def __init__(
        self,
        device: str = "auto",
        precision: str = "auto",
        tf32: bool = True,
        compile: bool | None = None,
        channels_last: bool | None = None,
        fused_optimizer: bool = True,
        num_threads: int | None = None,
        local_rank: int = 0,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"hardware.device={device!r}: use auto, cpu or cuda")
        if precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"hardware.precision={precision!r}: use auto, fp32, bf16 or fp16")
        if num_threads is not None:
            if num_threads < 1:
                raise ConfigError(
                    f"hardware.num_threads={num_threads}: must be >= 1 (or null for torch's default)"
                )
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("hardware.device=cuda but no CUDA device is visible: use hardware=cpu")
        if precision == "auto":
            if device == "cpu":
                precision = "fp32"
            else:
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device == "cpu" and precision != "fp32":
            log.warning(
                "hardware.precision=%s on the CPU: without bf16/fp16 units this is much slower than fp32",
                precision,
            )
        self.device = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.fused_optimizer = fused_optimizer
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context: autocast to bf16/fp16, or nothing in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A grad scaler for every precision.

        fp16 needs dynamic loss scaling. In fp32 and bf16 the scale stays 1 (it only ever moves by powers of two,
        which are exact), and the scaler is still used because its on-device inf check lets the (fused) optimizer
        skip a step with non-finite gradients without a host synchronisation.
        """
        if self.precision == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type, init_scale=1.0, growth_interval=2**31 - 1)

    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the device (a non-blocking copy from pinned memory) in the model's memory layout."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def __repr__(self) -> str:
        return (
            f"Hardware(device={self.device}, precision={self.precision}, compile={self.compile}, "
            f"channels_last={self.channels_last})"
        )
