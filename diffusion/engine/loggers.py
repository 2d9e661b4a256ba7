"""Experiment loggers owned by the training engine on rank 0, and the per-timestep-quartile loss tracker.

Two loggers share one interface (``start`` / ``log`` / ``log_image`` / ``finish``) so the engine never asks which
one it holds: :class:`WandbLogger` (``logger=wandb``) and :class:`JsonlLogger` (``logger=none``, a plain
``metrics.jsonl`` in the run directory). Both are built with ``hydra.utils.instantiate(cfg.logger)``.

Metric keys: :class:`LossTracker` returns ``"train/<term>"`` (mean over every example of the log interval) and
``"train/<term>_q0"`` .. ``"train/<term>_q3"`` (mean over the examples whose original timestep fell in that
quartile of ``[0, T)``). The ``train/`` prefix makes W&B put the loss curves in their own panel section; the
loggers themselves never rename keys.

:func:`read_wandb_history` reads a run back from the ``.wandb`` transaction logs W&B wrote, with W&B's own
reader, so tests can check what really reached the run files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Mapping
from netrc import NetrcParseError, netrc
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as dist
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from diffusion.errors import ConfigError

MODES = ("online", "offline", "disabled")
# Older W&B releases and many cluster profiles still spell the modes this way.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def _check_mode(mode: str, name: str) -> str:
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ConfigError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


def _plain(value: Any) -> Any:
    """An OmegaConf container as plain dicts/lists (W&B and JSON want builtins); anything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 [H x W x C] image (C in 1, 3, 4); a single channel comes back as [H x W]."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a uint8 numpy array, got {type(image).__name__} {getattr(image, 'dtype', '')}"
        )
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have shape [H, W, C] with C in (1, 3, 4), got {tuple(image.shape)}")
    return image[:, :, 0] if image.shape[2] == 1 else image


def has_wandb_credentials() -> bool:
    """Whether W&B could authenticate without prompting: an API key or token file in the environment, or a
    netrc entry for the server in ``WANDB_BASE_URL`` (the places ``wandb login`` writes to)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        entry = netrc(path).authenticators(host)
    except (OSError, NetrcParseError):
        return False
    return bool(entry and entry[2])


class WandbLogger:
    """A Weights & Biases run, created on rank 0 only.

    :param project: W&B project name.
    :param entity: W&B team or user; None uses the account's default.
    :param mode: "online", "offline" (files under ``<run_dir>/wandb``, upload later with ``wandb sync``) or
        "disabled". ``WANDB_MODE`` in the environment wins, so a cluster profile can switch every job offline.
    :param tags: run tags.
    :param notes: free-text run description.
    :param init_timeout: seconds ``wandb.init`` may spend reaching the server before training goes on offline.
    """

    def __init__(
        self,
        project: str = "diffusion",
        entity: str | None = None,
        mode: str = "offline",
        tags: list[str] | None = None,
        notes: str | None = None,
        init_timeout: float = 60.0,
    ) -> None:
        self.mode = _check_mode(mode, "mode")
        if init_timeout <= 0:
            raise ConfigError(f"init_timeout must be a positive number of seconds, got {init_timeout}")
        self.project = project
        self.entity = entity
        self.tags = list(tags) if tags else None
        self.notes = notes
        self.init_timeout = float(init_timeout)
        self._run = None

    def start(
        self, run_dir: str, config: Mapping, name: str, group: str | None = None, run_id: str | None = None
    ) -> str:
        """Open the run (or reopen ``run_id`` after a restart) and return its id for the checkpoint.

        :param run_dir: the job's output directory; W&B writes under ``<run_dir>/wandb``.
        :param config: the resolved training config, stored as the run's config.
        :param name: display name; ``group``: shared by all jobs of a sweep (see :func:`run_name_and_group`).
        :param run_id: the id a previous attempt returned, so a resumed job continues the same run.
        """
        import wandb

        mode = self.mode
        if os.environ.get("WANDB_MODE"):
            mode = _check_mode(os.environ["WANDB_MODE"], "WANDB_MODE")
        run_dir = os.path.abspath(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        kwargs = dict(
            dir=run_dir,
            project=self.project,
            entity=self.entity,
            id=run_id,  # None: W&B makes a new one
            resume="allow",
            config=_plain(config),
            name=name,
            group=group,
            tags=self.tags,
            notes=self.notes,
        )
        if mode == "online":
            self._run = self._init_online(wandb, kwargs)
        if self._run is None:
            self._run = wandb.init(mode="offline" if mode == "online" else mode, **kwargs)
        return self._run.id

    def _init_online(self, wandb, kwargs: dict):
        """``wandb.init`` online, or None (with one warning) when it cannot work, so training goes on offline."""
        if not has_wandb_credentials():
            # Without a key W&B would prompt for one on a terminal and wait forever.
            warnings.warn(
                "logger.mode=online but no W&B API key was found (WANDB_API_KEY or netrc); logging offline "
                "instead, upload later with `wandb sync`",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        try:
            return wandb.init(
                mode="online", settings=wandb.Settings(init_timeout=self.init_timeout), **kwargs
            )
        except Exception as err:  # whatever the server or network does must not stop a training job
            # The failed attempt keeps the run id registered in W&B's service process; restart it.
            wandb.teardown()
            warnings.warn(
                f"W&B online init failed ({type(err).__name__}: {err}); logging offline instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def _active_run(self):
        if self._run is None:
            raise RuntimeError("WandbLogger.start() must be called before logging")
        return self._run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalars at ``step`` (calls with the same step land in one history row)."""
        self._active_run().log(dict(metrics), step=step)

    def log_image(self, key: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
        """Record a uint8 [H x W x C] image (e.g. a sample grid) under ``key`` at ``step``."""
        import wandb

        run = self._active_run()
        run.log({key: wandb.Image(_check_image(image), caption=caption)}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; a non-zero ``exit_code`` marks it failed. Safe to call twice."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


class JsonlLogger:
    """Metrics as JSON lines in ``<run_dir>/metrics.jsonl`` (one ``{"step": ..., **metrics}`` object per call).

    Images are written as PNG files under ``<run_dir>/images`` and their paths, relative to ``run_dir``, are
    recorded in the metrics file. A resumed run appends to the same files.
    """

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.run_dir: Path | None = None

    def start(
        self, run_dir: str, config: Mapping, name: str, group: str | None = None, run_id: str | None = None
    ) -> str:
        """Point the logger at ``run_dir`` and return ``run_id`` (a new one if None). Hydra already saves the
        config next to the run, so ``config``, ``name`` and ``group`` are not written again."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return run_id or uuid.uuid4().hex[:8]

    def _append(self, record: dict) -> None:
        if self.run_dir is None:
            raise RuntimeError("JsonlLogger.start() must be called before logging")
        with open(self.run_dir / self.filename, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one line ``{"step": step, **metrics}``; values become floats so tensors and numpy scalars work."""
        self._append({"step": int(step), **{k: float(v) for k, v in metrics.items()}})

    def log_image(self, key: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
        """Save a uint8 [H x W x C] image as ``images/<key>_<step>.png`` and record its path under ``key``."""
        from PIL import Image

        image = _check_image(image)
        if self.run_dir is None:
            raise RuntimeError("JsonlLogger.start() must be called before logging")
        rel = Path("images") / f"{key.replace('/', '_')}_{int(step):08d}.png"
        (self.run_dir / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(self.run_dir / rel)
        record = {"step": int(step), key: str(rel)}
        if caption is not None:
            record[f"{key}_caption"] = caption
        self._append(record)

    def finish(self, exit_code: int = 0) -> None:
        """Nothing stays open between calls; present for the shared interface."""


def read_metrics_jsonl(run_dir: str, filename: str = "metrics.jsonl") -> list[dict]:
    """The records a :class:`JsonlLogger` appended to ``<run_dir>/<filename>``, in order."""
    with open(Path(run_dir) / filename) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_name_and_group(hydra_cfg) -> tuple[str, str | None]:
    """Run name and group from the Hydra job (pass ``HydraConfig.get()``).

    The name is the job name joined with the override dirname (``train-optim.lr=0.1``), or with the job number
    when a sweep job has no overrides that show in it. In a multirun the group is the sweep directory's name so
    all jobs of one sweep are grouped together; a single run has no group.
    """
    job = hydra_cfg.job
    multirun = hydra_cfg.get("mode") == RunMode.MULTIRUN
    suffix = job.get("override_dirname") or (str(job.num) if multirun else "")
    name = f"{job.name}-{suffix}" if suffix else str(job.name)
    group = Path(hydra_cfg.sweep.dir).name if multirun else None
    return name, group


def _wandb_records(path: Path) -> list[dict]:
    """Every record of one ``.wandb`` transaction log as a dict, decoded by W&B's own inspector."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`wandb leet inspect` could not read {path}: {proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def read_wandb_history(run_dir: str) -> tuple[str, dict, list[dict]]:
    """Read back what W&B wrote under ``<run_dir>/wandb``: ``(run_id, config, history_rows)``.

    Every attempt of a resumed run leaves its own ``run-<id>.wandb`` log; they are read in start-time order and
    the rows concatenated. Each row holds the logged keys and ``"_step"`` (W&B's other bookkeeping keys are
    dropped); logged media appear as dotted keys such as ``"samples.path"``. ``config`` merges every config
    update without W&B's own ``_wandb`` entry.
    """
    paths = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
    if not paths:
        raise FileNotFoundError(f"no W&B run files (wandb/*run-*/run-*.wandb) under {run_dir}")
    segments = []
    for path in paths:
        records = _wandb_records(path)
        runs = [r["run"] for r in records if r["type"] == "run"]
        segments.append((runs[0].get("start_time", "") if runs else "", runs, records))
    segments.sort(key=lambda seg: seg[0])

    run_ids = {run["run_id"] for _, runs, _ in segments for run in runs}
    if len(run_ids) != 1:
        raise ValueError(
            f"expected the files of one W&B run under {run_dir}, found run ids {sorted(run_ids)}"
        )
    config: dict = {}
    rows: list[dict] = []
    for _, _, records in segments:
        for record in records:
            kind = record["type"]
            if kind == "run":
                config.update(record["run"].get("config", {}).get("update", {}))
            elif kind == "config":  # later ``run.config.update`` calls
                config.update(record["config"].get("update", {}))
            elif kind == "history":
                item = record["history"]["item"]
                rows.append({k: v for k, v in item.items() if not k.startswith("_") or k == "_step"})
    config.pop("_wandb", None)
    return run_ids.pop(), config, rows


class LossTracker:
    """Accumulates per-example loss terms on the device with no host sync; reduced once per log interval.

    :param num_timesteps: T of the original (un-respaced) diffusion; timestep t falls in quartile floor(4 t / T).
    :param device: where the running sums live (the training device, so ``add`` never waits for the GPU).
    :param prefix: put in front of every key ``compute`` returns.
    """

    def __init__(self, num_timesteps: int, device: torch.device | str, prefix: str = "train/") -> None:
        if not isinstance(num_timesteps, int) or num_timesteps <= 0:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps
        self.device = torch.device(device)
        self.prefix = prefix
        # float64 keeps a mean over many thousand examples exact to float32 precision; MPS has no float64.
        self._dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._sums: dict[str, Tensor] = {}  # term -> [4] sum of the term per quartile
        self._counts: dict[str, Tensor] = {}  # term -> [4] examples per quartile

    def add(self, terms: Mapping[str, Tensor], t: Tensor) -> None:
        """Add one batch.

        :param terms: per-example loss terms, each an [N] Tensor (e.g. "loss", "mse", "vb"); detached here.
        :param t: an [N] Tensor of original timesteps in [0, num_timesteps).
        """
        if t.ndim != 1:
            raise ValueError(f"t must be a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
        for key, value in terms.items():
            if value.shape != t.shape:
                raise ValueError(
                    f"terms[{key!r}] must have shape {tuple(t.shape)} like t, got {tuple(value.shape)}"
                )
        quartile = (t.to(self.device, torch.long) * 4 // self.num_timesteps).clamp_(0, 3)
        # index_add_ rather than bincount: bincount must read the data to size its output, a host sync.
        batch_counts = torch.zeros(4, dtype=self._dtype, device=self.device)
        batch_counts.index_add_(0, quartile, torch.ones_like(quartile, dtype=self._dtype))
        for key, value in terms.items():
            if key not in self._sums:
                self._sums[key] = torch.zeros(4, dtype=self._dtype, device=self.device)
                self._counts[key] = torch.zeros(4, dtype=self._dtype, device=self.device)
            self._sums[key].index_add_(0, quartile, value.detach().to(self.device, self._dtype))
            self._counts[key] += batch_counts

    def compute(self) -> dict[str, float]:
        """Means since the last call, over all ranks, then reset.

        Every rank must call this (it all-reduces when torch.distributed is initialised) and must have added the
        same terms. Returns ``{prefix + term: mean, prefix + term + "_q<k>": quartile mean}``; quartiles that saw
        no example are left out.
        """
        keys = sorted(self._sums)
        if not keys:
            return {}
        # [K x 2 x 4]: one all_reduce and one device-to-host copy for every term and quartile.
        stats = torch.stack([torch.stack([self._sums[k], self._counts[k]]) for k in keys])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        stats = stats.cpu().tolist()
        self._sums.clear()
        self._counts.clear()
        out: dict[str, float] = {}
        for key, (sums, counts) in zip(keys, stats):
            if sum(counts) > 0:
                out[f"{self.prefix}{key}"] = sum(sums) / sum(counts)
            for q in range(4):
                if counts[q] > 0:
                    out[f"{self.prefix}{key}_q{q}"] = sums[q] / counts[q]
        return out
