"""Typed schemas for every config group, stored in Hydra's ConfigStore by ``diffusion.register()`` (store.py).

A component's schema is made from its constructor: one field per argument, with the argument's type and default,
plus the ``_target_`` that ``hydra.utils.instantiate`` builds. The constructor is therefore the one place where a
default is written; a YAML option in ``conf/<group>/`` starts its defaults list with its schema
(``/schema_unet@_here_``) and holds only what differs from it. An unknown key or a value of the wrong type fails when
Hydra composes the config, with Hydra's own message naming the key, before any work starts.

Values that exist only at run time (the data's channels and classes, the diffusion's number of timesteps, the
process's local rank) are left out of the schemas and passed as keyword arguments at instantiation.

The schemas are stored as top-level configs (``schema_unet``, ``schema_adamw``...), not as options of a group, so
``--help`` lists only the options a user can pick.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

_SCALARS = (bool, int, float, str)


def _config_type(hint: Any) -> Any:
    """The OmegaConf-supported type closest to a constructor's annotation (Any when there is none)."""
    if hint in _SCALARS:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _config_type(rest[0]) if len(rest) == 1 else Any
        return inner | None if len(rest) < len(args) and inner is not Any else inner
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        item = args[0] if args else Any
        return list[_config_type(item)] if item in _SCALARS else list[Any]
    return Any


def _field_for(default: Any) -> Any:
    if default is inspect.Parameter.empty:
        return field(default=MISSING)
    if isinstance(default, (list, tuple, dict)):
        value = list(default) if isinstance(default, tuple) else default
        return field(default_factory=lambda: value.copy())
    return field(default=default)


def schema(
    target: Callable,
    *,
    runtime: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
    base: type | None = None,
) -> type:
    """A structured-config dataclass with one field per argument of ``target``'s constructor.

    :param target: the class (or function) ``instantiate`` builds.
    :param runtime: arguments known only at run time; they are not config fields.
    :param defaults: config-level defaults that differ from the constructor's, e.g. an interpolation
        (``image_size: ${follow_model:}``). Keep this for values that cannot live in the constructor.
    :param base: a dataclass whose fields come first (e.g. the data loader's settings).
    """
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default=f"{target.__module__}.{target.__qualname__}"))
    ]
    for name, p, hint in _parameters(target):
        if name not in runtime:
            fields.append((name, _config_type(hint), _field_for((defaults or {}).get(name, p.default))))
    return dataclasses.make_dataclass(f"{target.__name__}Config", fields, bases=(base,) if base else ())


def _parameters(target: Callable) -> list[tuple[str, inspect.Parameter, Any]]:
    """(name, parameter, type hint) of every argument ``target`` accepts. A class whose ``__init__`` passes
    ``**kwargs`` on to its base class's (a subclass that adds one argument) accepts the base's arguments too."""
    found: dict[str, tuple[str, inspect.Parameter, Any]] = {}
    functions = (
        [c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)]
        if inspect.isclass(target)
        else [target]
    )
    for function in functions:
        hints = typing.get_type_hints(function)
        params = list(inspect.signature(function).parameters.values())[inspect.isclass(target) :]  # no self
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in found:
                found[p.name] = (p.name, p, hints.get(p.name, Any))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    # Arguments without a default first, in the order a reader expects: the base's, then the subclass's own.
    return sorted(found.values(), key=lambda item: item[1].default is not inspect.Parameter.empty)


@dataclass
class LoaderConfig:
    """What every ``data`` option shares besides its dataset's constructor arguments."""

    batch_size: int = 64  # global batch over all ranks
    microbatch: int = 0  # per-rank micro-batch size; 0 = the whole per-rank batch at once
    num_workers: int = 0
    latent: bool = False  # train on the latents of the `vae` group's VAE (diffusion/latent.py)
    latent_cache: str | None = (
        None  # with latent: read them from this cache directory; null: encode on the fly
    )


# Keys of the data group that configure the loader, not the dataset class.
LOADER_KEYS = tuple(f.name for f in dataclasses.fields(LoaderConfig))


@dataclass
class OptimConfig:
    """The optimizer (built ``_partial_``: its parameters exist only at run time), EMA and lr schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_rates: list[float] = field(default_factory=lambda: [0.9999])
    ema_warmup: bool = True  # decay = min(rate, (1 + step) / (10 + step))
    # Post-hoc EMA (EDM2): power-function EMAs tracked by sigma_rel, e.g. [0.05, 0.10]; [] = off. With them,
    # ema_rates may be [] (sampling then uses the first of these, or a reconstruction: docs/phema.md)
    ema_stds: list[float] = field(default_factory=list)
    ema_snapshot_every: int = 0  # write RUN_DIR/phema/snapshot-<step>.pt every this many steps; 0 = off
    warmup_steps: int = 0
    lr_anneal_steps: int = 0  # linear decay to 0 over this many steps; training ends there (0 = constant lr)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite) steps before training stops
    optimizer: Any = field(
        default_factory=lambda: {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": "${..lr}",
            "weight_decay": "${..weight_decay}",
        }
    )


@dataclass
class TrainConfig:
    model: Any = MISSING
    diffusion: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    sampler: Any = MISSING
    hardware: Any = MISSING
    logger: Any = MISSING
    solver: Any = MISSING  # how the periodic sample grids are generated
    task: Any = MISSING  # what the loop optimises: the diffusion loss, a classifier's cross-entropy...
    vae: Any = None  # the autoencoder of data.latent=true (unused in pixel space)
    eval: Any = MISSING  # sample quality every eval_every steps (FID...); the task is given it
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0: run to optim.lr_anneal_steps, or forever)
    save_every: int = 1000
    keep_last: int = 2  # periodic checkpoints kept besides milestones
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    log_every: int = 100
    sample_every: int = 0  # sample grids every this many steps; 0 = only at the end of training
    eval_every: int = 0  # the task's evaluation every this many steps; 0 = only at the end of training
    num_grid_samples: int = 16
    resume: str = "auto"  # auto | never | PATH
    init_from: str | None = None  # start a new run from these weights (project or OpenAI checkpoint)
    dist_timeout_s: int = 600  # a rank that waits this long for the others fails instead of hanging


@dataclass
class CheckpointJobConfig:
    """What sample.py and the bits/dim evaluation share: a checkpoint and how to run its network."""

    # model and diffusion only for plain state-dict files (OpenAI's releases); a project checkpoint knows its own
    model: Any = None
    diffusion: Any = None
    hardware: Any = MISSING
    checkpoint: str = MISSING
    seed: int = 0
    use_ema: bool = True
    ema_rate: float | None = None  # which EMA; default the first of the checkpoint's rates
    # post-hoc EMA: reconstruct the EMA of this sigma_rel from the run's snapshots (optim.ema_snapshot_every);
    # checkpoint= is then the run directory (its last snapshot) or a checkpoint file of it (that step)
    ema_std: float | None = None


@dataclass
class SampleConfig(CheckpointJobConfig):
    solver: Any = MISSING
    num_samples: int = 64
    batch_size: int = 16
    classes: list[int] | None = None  # default: spread evenly over all classes
    guidance_scale: float = 1.0
    # all: guide every predicted-noise channel (solvers.guided); dit: DiT's forward_with_cfg, which guides the
    # first three only -- the rule behind DiT's published FIDs
    guidance_style: str = "all"
    # Autoguidance: a weaker model of the same data (an earlier checkpoint of the run, or a smaller model) that
    # guides this one as D_guide + guidance_scale * (D - D_guide), instead of the null label
    guide: str | None = None
    guidance_interval: list[float] | None = None  # [sigma_lo, sigma_hi]: guide only at these noise levels
    guidance_rescale: float = 0.0  # CFG rescale's phi (Lin et al. 2023: 0.7); 0 = off
    grid_max: int = 100  # at most this many images in grid.png
    # Score the samples as python -m diffusion.evaluate does: digits (the digit judge's features) or inception
    # (needs score_reference, a reference batch); printed, saved as metrics.json, and the job returns
    # score_objective, so that -m sweeps and the Optuna sweeper can search sampling settings (ema_std, w, steps)
    score: str | None = None
    score_reference: str | None = None
    score_objective: str = "fid"
    # Classifier guidance: a task=classifier run's checkpoint, or a plain state dict (OpenAI's
    # 64x64_classifier.pt...) with classifier_model naming its conf/model preset (classifier_64...)
    classifier: str | None = None
    classifier_model: str | None = None
    classifier_scale: float = 1.0  # s in s * grad log p(y | x_t)
    base_samples: str | None = None  # a samples.npz (arr_0, arr_1) a super-resolution checkpoint upsamples
    # the decoder of a latent model: a project checkpoint names its own (this overrides where it is); a plain
    # state dict of a latent model (DiT's releases) needs vae=sd_vae_ft_ema or vae=sd_vae_ft_mse
    vae: Any = None


@dataclass
class NLLConfig(CheckpointJobConfig):
    data: Any = MISSING
    num_batches: int = 0  # global batches of data.batch_size to evaluate; 0 = one pass over the dataset
    clip_denoised: bool = True


@dataclass
class LatentCacheConfig:
    """``python -m diffusion.latent_cache``: encode the ``data`` group's data set with the ``vae`` group's VAE into the
    cache directory data.latent_cache, which training with data.latent=true reads."""

    data: Any = MISSING
    vae: Any = MISSING
    hardware: Any = MISSING
    model: Any = (
        None  # optional: data.image_size then follows it as in training (model side x the VAE's factor)
    )
    rebuild: bool = False  # replace a cache made otherwise (else it is refused)
    flips: bool | None = None  # also encode every image mirrored; null: as data.random_flip
    batch_size: int = 32  # images per encoder call
    storage_dtype: str = "float32"  # or float16: half the disk


@dataclass
class ReferenceConfig:
    """python -m diffusion.reference: a reference batch of a dataset (see diffusion/reference.py)."""

    data: Any = MISSING
    eval: Any = MISSING  # the features whose statistics the file stores (features, inception_weights)
    hardware: Any = MISSING
    out: str = MISSING  # the .npz to write
    num_images: int = 50_000  # drawn at random from the dataset; 0 = all of it
    seed: int = 0  # which images, and their crops under data.random_crop=true
