"""One checkpoint file with everything a run needs, written atomically, read without running code.

A checkpoint holds only tensors and plain Python values (the config as a YAML string), so it loads with
``torch.load(..., weights_only=True)``: a file from the internet cannot execute code when it is opened.
``checkpoints/latest.pt`` is a symbolic link replaced atomically after the file it names is complete;
``checkpoints/best.pt`` is a complete checkpoint of the best evaluation so far, which pruning never removes.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import UserError
from diffusion.runtime.files import fsync_path

FORMAT_VERSION = 1
LATEST = "latest.pt"
BEST = "best.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says which file and why."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, are fsynced, and the file is renamed over ``path``.
    A failure (disk full, a kill) leaves at most the temporary file, which is removed when possible.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"disk full while writing {path}; the previous checkpoint is intact. Free space in "
                f"{path.parent} or lower keep_last, then resume."
            ) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Where each module that a checkpoint's config may name lived before the package was split into sub-packages:
# configs stored by that code name ``diffusion.unet.UNetModel``, which is ``diffusion.models.unet.UNetModel`` now.
MOVED_MODULES = {
    "diffusion.unet": "diffusion.models.unet",
    "diffusion.dit": "diffusion.models.dit",
    "diffusion.latent": "diffusion.models.vae",  # load_vae; the cache and datasets are diffusion.data.latent
    "diffusion.gaussian_diffusion": "diffusion.process.gaussian",
    "diffusion.timestep_samplers": "diffusion.process.timestep_samplers",
    "diffusion.solvers": "diffusion.sampling.solvers",
    "diffusion.data": "diffusion.data.datasets",
    "diffusion.hardware": "diffusion.runtime.hardware",
    "diffusion.loggers": "diffusion.engine.loggers",
    "diffusion.tasks": "diffusion.engine.tasks",
    "diffusion.sample_quality": "diffusion.evaluation.sample_quality",
}


def stored_config(yaml: str) -> Any:
    """A config stored in a checkpoint (``config`` or ``model_config``) as a DictConfig, with the ``_target_`` of
    a checkpoint written before the move into sub-packages pointed at the class's module today."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def upgrade(node: Any) -> None:
        if isinstance(node, DictConfig):
            target = node.get("_target_") if "_target_" in node else None
            if isinstance(target, str):
                module, _, name = target.rpartition(".")
                if module in MOVED_MODULES:
                    node._target_ = f"{MOVED_MODULES[module]}.{name}"
            for key in node:
                if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
                    upgrade(node[key])
        elif isinstance(node, ListConfig):
            for item in node:
                upgrade(item)

    config = OmegaConf.create(yaml)
    upgrade(config)
    return config


def point_latest(ckpt_dir: Path, target: Path) -> None:
    """Atomically make ``ckpt_dir/latest.pt`` a relative link to ``target``."""
    tmp = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, ckpt_dir / LATEST)
    fsync_path(ckpt_dir)


def save_checkpoint(
    state: dict, ckpt_dir: str | os.PathLike, step: int, keep_last: int = 2, milestone_every: int = 0
) -> Path:
    """Write ``step_<step>.pt``, point ``latest.pt`` at it, then prune old periodic checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    point_latest(ckpt_dir, path)
    prune(ckpt_dir, keep_last, milestone_every)
    return path


def save_best(state: dict, ckpt_dir: str | os.PathLike) -> Path:
    """Write ``best.pt`` (atomically, like every checkpoint); ``state["best"]`` records what made it the best."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / BEST
    atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    return path


def read_best_record(ckpt_dir: str | os.PathLike) -> dict | None:
    """The ``best`` record ({"key", "value", "step"}) of ``ckpt_dir/best.pt``, None when there is none; the file
    is memory-mapped, so its tensors are not read."""
    path = Path(ckpt_dir) / BEST
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a readable checkpoint: it holds no best value, and the next best replaces it
        return None
    return dict(obj["best"]) if isinstance(obj, dict) and obj.get("best") else None


def prune(ckpt_dir: Path, keep_last: int, milestone_every: int) -> None:
    """Keep the newest ``keep_last`` checkpoints, every milestone, and whatever ``latest.pt`` names."""
    latest = (ckpt_dir / LATEST).resolve() if (ckpt_dir / LATEST).exists() else None
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name)))
    for step, p in steps[: max(len(steps) - max(keep_last, 1), 0)]:
        if milestone_every and step % milestone_every == 0:
            continue
        if latest is not None and p.resolve() == latest:
            continue
        p.unlink(missing_ok=True)
    for p in ckpt_dir.glob(".*.tmp-*"):  # left by a process killed mid-write
        p.unlink(missing_ok=True)


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load`` with ``weights_only=True`` and errors that name the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass the .pt file (for a run: <run>/checkpoints/{LATEST})"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects other than tensors and plain values, which "
            f"could run code when unpickled (weights_only=True rejected it: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or a state dict")
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by this project (see :func:`save_checkpoint`)."""
    obj = load_file(path, map_location)
    version = obj.get("format_version")
    if version is None or "model" not in obj:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no format_version/model keys); a plain state dict such "
            "as OpenAI's releases loads with init_from=PATH (training) or model=<preset> checkpoint=PATH (sampling)"
        )
    if version != FORMAT_VERSION:
        newer = "newer" if version > FORMAT_VERSION else "older"
        raise CheckpointError(
            f"{path} has checkpoint format {version}, this code reads format {FORMAT_VERSION} ({newer} file): "
            "use the version of this project that wrote it"
        )
    return obj


def model_weights(obj: dict, use_ema: bool = True, ema_rate: float | None = None) -> dict:
    """The network's state dict from a project checkpoint (an EMA by default) or a plain state dict.

    The EMA is the first constant-rate one (or ``ema_rate``'s); a run with ``optim.ema_rates=[]`` gives its
    first power-function EMA (``optim.ema_stds``); a post-hoc EMA checkpoint (``python -m diffusion.phema``)
    holds only the reconstructed weights, as ``model``.
    """
    if "format_version" not in obj:
        return obj
    posthoc = obj.get("posthoc_ema")
    if posthoc is not None and (ema_rate is not None or not use_ema):
        raise CheckpointError(
            f"this checkpoint holds only the post-hoc EMA of sigma_rel {posthoc['ema_std']}: drop "
            f"{'ema_rate' if ema_rate is not None else 'use_ema=false'} (the run's own checkpoints have the rest)"
        )
    if use_ema and obj.get("ema"):
        key = str(ema_rate) if ema_rate is not None else next(iter(obj["ema"]))
        if key not in obj["ema"]:
            raise CheckpointError(f"no EMA with rate {ema_rate}; the checkpoint has {sorted(obj['ema'])}")
        return obj["ema"][key]
    if use_ema and obj.get("phema"):
        if ema_rate is not None:
            raise CheckpointError(
                f"no EMA with rate {ema_rate}: the run tracked power-function EMAs of sigma_rel "
                f"{obj['phema']['stds']} only; drop ema_rate (the first of those), or reconstruct one with ema_std="
            )
        return obj["phema"]["emas"][0]
    return obj["model"]


def describe_mismatch(model: torch.nn.Module, state_dict: dict, limit: int = 5) -> str:
    """Name the first keys and shapes in which ``state_dict`` differs from ``model``; empty when they match."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    lines = []
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [k for k in ours if k in theirs and ours[k] != theirs[k]]
    if missing:
        lines.append(f"{len(missing)} keys missing from the file, e.g. {', '.join(missing[:limit])}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys in the file, e.g. {', '.join(unexpected[:limit])}")
    if shapes:
        lines.append(
            f"{len(shapes)} shapes differ, e.g. "
            + ", ".join(f"{k}: model {ours[k]} vs file {theirs[k]}" for k in shapes[:limit])
        )
    return "; ".join(lines)


def describe_mismatch_keys(ours: dict, theirs: dict, limit: int = 5) -> str:
    """The first keys in which two state dicts differ."""
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    parts = [f"missing {', '.join(missing[:limit])}" if missing else ""]
    parts.append(f"unexpected {', '.join(unexpected[:limit])}" if unexpected else "")
    return "; ".join(p for p in parts if p)


def load_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Strictly load ``state_dict`` into ``model`` or raise naming what differs."""
    problem = describe_mismatch(model, state_dict)
    if problem:
        raise CheckpointError(f"{source} does not fit the configured model: {problem}")
    model.load_state_dict(state_dict, strict=True)
