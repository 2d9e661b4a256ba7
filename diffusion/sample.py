"""Sampling from a checkpoint: the work behind ``sample.py``.

A project checkpoint carries its model and diffusion config, so it needs no flags. A plain state dict (OpenAI's
released ``.pt`` files) needs ``model=<preset> diffusion=<preset>``. ``classifier=`` adds classifier guidance (a
``task=classifier`` checkpoint, or a plain file with ``classifier_model=<preset>``); a super-resolution checkpoint
upsamples the images of ``base_samples=BASE.npz``. Under torchrun the ranks split the images
(rank r makes images r, r + W, r + 2W, ...) and rank 0 writes one ``samples.npz`` in index order and
``grid.png``. Every request is checked before the first image is generated.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion import CONF_DIR
from diffusion.config import build
from diffusion.config.build import check_complete as check_complete_config
from diffusion.data.images import save_grid, to_uint8
from diffusion.engine import checkpoint as ckpt
from diffusion.errors import UserError, check_choice
from diffusion.evaluation.batch_files import open_batch, write_sample_batch
from diffusion.evaluation.evaluator import METRICS, Evaluator
from diffusion.runtime.distributed import DistEnv, barrier, cleanup_distributed, init_distributed
from diffusion.sampling.auto import AutoSolver
from diffusion.sampling.generate import generate
from diffusion.sampling.guidance import check_guidance, classifier_cond_fn
from diffusion.sampling.solvers import unclipped

log = logging.getLogger(__name__)


class SamplingError(UserError):
    """The sampling request cannot be met; the message says what to change."""


def _compose_model(name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # Inside sample.py's @hydra.main Hydra is already initialised on conf/; elsewhere (tests, notebooks) open it.
    if GlobalHydra.instance().is_initialized():
        return compose(overrides=[f"+model={name}"]).model
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(overrides=[f"+model={name}"]).model


def _shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@functools.cache
def _preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    # Built on the meta device (no memory, no initialisation): about 0.1 s per preset, once per process.
    with torch.device("meta"):
        return _shapes(instantiate(_compose_model(name)).state_dict())


def matching_presets(state_dict: dict) -> list[str]:
    """Model presets in ``conf/model`` whose key/shape layout equals ``state_dict``'s."""
    theirs = _shapes(state_dict)
    return [p.stem for p in sorted((CONF_DIR / "model").glob("*.yaml")) if _preset_shapes(p.stem) == theirs]


def _read_checkpoint(cfg: DictConfig) -> tuple[DictConfig, DictConfig, dict, dict]:
    """(model config, diffusion config, weights, info) from a project checkpoint or a plain state dict."""
    state = _posthoc_checkpoint(cfg) if cfg.get("ema_std") is not None else ckpt.load_file(cfg.checkpoint)
    if "format_version" not in state:
        if cfg.model is None or cfg.diffusion is None:
            raise SamplingError(
                f"{cfg.checkpoint} is a plain state dict (such as OpenAI's releases): name its network and "
                "process, e.g. model=unet_256 diffusion=adm"
            )
        info = {"class_names": [], "step": None, "channels_last": None, "vae": cfg.get("vae")}
        return cfg.model, cfg.diffusion, state, info
    if state["format_version"] != ckpt.FORMAT_VERSION:
        ckpt.load_checkpoint(cfg.checkpoint)  # raises the explanation of the version mismatch
    if cfg.model is not None or cfg.diffusion is not None:
        raise SamplingError(
            f"{cfg.checkpoint} is a checkpoint of this project and carries its own model and diffusion config: "
            "drop the model=... and diffusion=... overrides"
        )
    weights = ckpt.model_weights(state, cfg.use_ema, cfg.ema_rate)
    run_cfg = ckpt.stored_config(state["config"])
    info = {
        "class_names": state.get("class_names", []),
        "step": state["step"],
        "channels_last": run_cfg.hardware.get("channels_last"),  # None: the run left it to the device
        "vae": _checkpoint_vae(cfg, run_cfg),
    }
    return ckpt.stored_config(state["model_config"]), run_cfg.diffusion, weights, info


def _posthoc_checkpoint(cfg: DictConfig) -> dict:
    """``ema_std=``: the checkpoint with the post-hoc EMA of that sigma_rel, reconstructed from the run's
    snapshots in memory (as ``python -m diffusion.phema`` writes it)."""
    from diffusion.engine.phema import posthoc_checkpoint

    if not cfg.use_ema or cfg.ema_rate is not None:
        raise SamplingError(
            f"ema_std={cfg.ema_std} reconstructs an EMA from the run's snapshots: drop "
            f"{'use_ema=false' if not cfg.use_ema else f'ema_rate={cfg.ema_rate}'}"
        )
    if not Path(cfg.checkpoint).exists():
        raise SamplingError(
            f"checkpoint={cfg.checkpoint}: no such run directory or file (with ema_std: a run directory, or "
            "one of its checkpoints/step_*.pt)"
        )
    obj = posthoc_checkpoint(cfg.checkpoint, cfg.ema_std)
    info = obj["posthoc_ema"]
    log.info(
        "post-hoc EMA sigma_rel %g at step %d from %d snapshots (profile error %.2f%%)",
        info["ema_std"],
        info["step"],
        len(info["snapshot_steps"]),
        100 * info["profile_error"],
    )
    return obj


def _checkpoint_vae(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig | None:
    """The VAE that decodes a project checkpoint's samples: its run's (data.latent=true), or ``cfg.vae`` where
    this machine keeps it elsewhere; None in pixel space."""
    latent = run_cfg.get("data") is not None and run_cfg.data.get("latent")
    if not latent:
        if cfg.get("vae") is not None:
            raise SamplingError(
                f"{cfg.checkpoint} was trained in pixel space (data.latent=false): drop the vae=... override"
            )
        return None
    return cfg.vae if cfg.get("vae") is not None else run_cfg.vae


def load_model(cfg: DictConfig) -> tuple[torch.nn.Module, object, dict]:
    """Build the network and diffusion for ``cfg.checkpoint`` and load its (EMA) weights, strictly.

    :param cfg: a node with checkpoint, model, diffusion, use_ema and ema_rate (``sample.yaml``, ``nll.yaml``).
    :return: (model in eval mode on the CPU, diffusion, info) where info holds ``class_names``, the
        checkpoint ``step`` and the ``channels_last`` its run set explicitly (both None for a plain state dict),
        and ``vae``, the config of the VAE that decodes a latent model's samples (None in pixel space).
    """
    model_cfg, diffusion_cfg, weights, info = _read_checkpoint(cfg)
    if is_classifier(model_cfg):
        plain = info["step"] is None  # OpenAI's classifier files are plain state dicts
        raise SamplingError(
            f"checkpoint={cfg.checkpoint} is a noisy-image classifier, not a diffusion model: give it as "
            f"classifier={cfg.checkpoint}{' classifier_model=<its preset>' if plain else ''} and a diffusion "
            "model as checkpoint="
        )
    model = load_network(
        model_cfg, weights, f"{cfg.checkpoint} does not fit the chosen model", cfg.checkpoint
    )
    diffusion = build(diffusion_cfg)
    expected = model.in_channels * (2 if diffusion.learns_sigma else 1)
    extra_ok = diffusion.accepts_variance_channels and model.out_channels == 2 * model.in_channels
    if model.out_channels != expected and not extra_ok:
        if diffusion.discrete:
            wanted = f"diffusion.model_var_type={diffusion.model_var_type} expects {expected}"
        elif model.out_channels == 2 * model.in_channels:
            wanted = (
                f"diffusion={diffusion.name} trains networks without them (these are ADM's learned-variance "
                "channels: a network trained with diffusion=adm samples with diffusion=adm)"
            )
        else:
            wanted = f"diffusion={diffusion.name} expects {expected}"
        raise SamplingError(
            f"the network outputs {model.out_channels} channels but {wanted}: choose the diffusion preset the "
            "model was trained with"
        )
    return model.eval(), diffusion, info


def load_network(config, weights: dict, what: str, checkpoint: str | None = None) -> torch.nn.Module:
    """The network of ``config`` with ``weights`` loaded strictly, fp32, in eval mode, on the CPU.

    It is built on the meta device and takes the loaded tensors as they are: no random initialisation to throw
    away. Weights stay fp32 whatever the file holds; the hardware group's autocast decides the compute precision.

    :param what: the start of the message when the file does not fit; the mismatch and the presets the file
        matches follow it.
    :param checkpoint: the ``checkpoint=`` value, when the file was given as a diffusion model: a file that
        matches a classifier preset is then named as a classifier given in the wrong place.
    """
    with torch.device("meta"):
        network = build(config)
    problem = ckpt.describe_mismatch(network, weights)
    if problem:
        presets = matching_presets(weights)
        classifiers = [p for p in presets if is_classifier(_compose_model(p))]
        if checkpoint is not None and classifiers:
            raise SamplingError(
                f"checkpoint={checkpoint} is a noisy-image classifier (it matches model={classifiers[0]}): give "
                f"it as classifier={checkpoint} classifier_model={classifiers[0]}, and a diffusion model as "
                "checkpoint="
            )
        hint = (
            f"The file matches model={' / model='.join(presets)}."
            if presets
            else "No model preset matches it."
        )
        raise SamplingError(f"{what}: {problem}. {hint}")
    network.load_state_dict(weights, strict=True, assign=True)
    return network.float().eval()


def class_labels(
    cfg: DictConfig, model: torch.nn.Module, classifier: torch.nn.Module | None = None
) -> torch.Tensor | None:
    """The class of every requested image, a LongTensor [num_samples]: ``classes`` cycled, or all classes in
    turn; None for an unconditional model without a classifier (with one, the classes are the classifier's)."""
    num_classes, whose = model.num_classes, "the model's"
    if not num_classes and classifier is not None:
        num_classes, whose = classifier.num_classes, "the classifier's"
    if not num_classes:
        if cfg.classes:
            raise SamplingError(
                f"classes={list(cfg.classes)} given, but the model is unconditional: drop classes, or steer it "
                "with classifier=PATH"
            )
        return None
    base = list(cfg.classes) if cfg.classes else list(range(num_classes))
    bad = [c for c in base if not 0 <= c < num_classes]
    if bad:
        raise SamplingError(f"classes {bad} are outside {whose} range 0..{num_classes - 1}")
    return torch.tensor(base).repeat(cfg.num_samples // len(base) + 1)[: cfg.num_samples]


def latent_decoder(vae_cfg: DictConfig | None, model: torch.nn.Module, device: torch.device):
    """The VAE (a diffusion.models.vae.LatentVAE on ``device``) that decodes a latent model's samples, or None in
    pixel space. SamplingError for a model whose outputs cannot be images without one (not 1 or 3 channels) and
    for a VAE whose latents are not the model's."""
    if vae_cfg is None:
        if model.in_channels not in (1, 3):
            raise SamplingError(
                f"the model makes {model.in_channels}-channel samples, which are latents, not images: name the VAE "
                "that decodes them, e.g. vae=sd_vae_ft_ema (DiT's released models: sd_vae_ft_ema or sd_vae_ft_mse)"
            )
        return None
    from diffusion.models.vae import check_latent_channels

    vae = build(vae_cfg, device=device)
    check_latent_channels(vae, model.in_channels)
    return vae


def check_complete(cfg: DictConfig) -> None:
    """SamplingError naming the first required value (``???`` in the config) that was not given."""
    check_complete_config(cfg, SamplingError)


def check_request(cfg: DictConfig) -> None:
    """The checks that need no checkpoint."""
    check_complete(cfg)
    check_score(cfg)
    for key, minimum in [("num_samples", 1), ("batch_size", 1), ("grid_max", 1), ("seed", 0)]:
        if cfg[key] < minimum:
            raise SamplingError(f"{key}={cfg[key]}: must be >= {minimum}")


def sample(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Generate ``cfg.num_samples`` images into ``run_dir/samples.npz`` and ``grid.png``; returns the npz path."""
    env = init_distributed()
    try:
        return _sample(cfg, Path(run_dir), env)
    finally:
        cleanup_distributed()


def sampling_hardware(hardware: DictConfig, trained_channels_last: bool | None, local_rank: int = 0):
    """The hardware group's Hardware, in the memory layout the checkpoint's run chose explicitly where this
    run leaves it to the device default: a recipe's choice for its network (experiment=digits turns
    channels_last off, measured slower for that network in training and in sampling) holds for its samples."""
    layout = {}
    if hardware.get("channels_last") is None and trained_channels_last is not None:
        layout["channels_last"] = trained_channels_last
    return build(hardware, local_rank=local_rank, **layout)


def load_guide(cfg: DictConfig, model: torch.nn.Module, diffusion) -> tuple[torch.nn.Module | None, object]:
    """The autoguidance model of ``guide=CHECKPOINT`` and its formulation, (None, None) without one. Checks every
    guidance setting against the model first (the scale, the style, the interval against its noise levels, the
    rescale), so that a bad request ends with one line before any sampling."""
    interval = cfg.get("guidance_interval")
    denoiser = diffusion.denoiser(model)
    check_guidance(
        model,
        cfg.guidance_scale,
        cfg.get("guidance_style", "all"),
        None if interval is None else list(interval),
        cfg.get("guidance_rescale", 0.0),
        autoguidance=cfg.get("guide") is not None,
        sigma_range=(denoiser.sigma_min, denoiser.sigma_max),
    )
    if cfg.get("guide") is None:
        return None, None
    guide, guide_diffusion, _ = load_model(OmegaConf.merge(cfg, {"checkpoint": cfg.guide}))
    for what, ours, theirs in [
        ("image size", model.image_size, guide.image_size),
        ("channels", model.in_channels, guide.in_channels),
        ("classes", model.num_classes, guide.num_classes),
    ]:
        if ours != theirs:
            raise SamplingError(
                f"guide={cfg.guide} does not fit checkpoint={cfg.checkpoint}: its {what} is {theirs}, the model's "
                f"{ours}; guide with a model of the same data (an earlier checkpoint of the run, or a smaller model)"
            )
    if type(guide_diffusion) is not type(diffusion):
        raise SamplingError(
            f"guide={cfg.guide} was trained with diffusion={guide_diffusion.name}, checkpoint={cfg.checkpoint} with "
            f"diffusion={diffusion.name}: guide with a model of the same formulation"
        )
    return guide, guide_diffusion


def _sample(cfg: DictConfig, run_dir: Path, env: DistEnv) -> Path:
    check_request(cfg)
    model, diffusion, info = load_model(cfg)
    guide, guide_diffusion = load_guide(cfg, model, diffusion)
    hw = sampling_hardware(cfg.hardware, info["channels_last"], env.local_rank)
    classifier = load_classifier(cfg, model)
    base = read_base_samples(cfg, model)
    labels = class_labels(cfg, model, classifier) if base is None else base[1]
    solver = build(cfg.solver)
    if isinstance(solver, AutoSolver):
        solver = solver.resolve(diffusion)
    solver.check(diffusion)
    vae = latent_decoder(info["vae"], model, hw.device)
    if vae is not None:
        # Latents are not bounded to [-1, 1]: x0 is not clamped (DiT samples with clip_denoised=False).
        solver = unclipped(solver)
        log.info("latent model: samples are decoded by the VAE %s", vae.name)
    model = hw.prepare_model(model)
    if guide is not None:
        guide = hw.prepare_model(guide)
        log.info("autoguidance by %s, weight %g", cfg.guide, cfg.guidance_scale)
    if classifier is not None:
        classifier = hw.prepare_model(classifier)
        log.info("classifier guidance: %s, scale %g", cfg.classifier, cfg.classifier_scale)
    log.info("%s on %s; %d rank(s); %s", solver, hw, env.world_size, cfg.checkpoint)
    solver_info = describe_solver(solver)
    log.info(
        "solver %s, %d network evaluations per image batch, options %s",
        solver_info["solver"],
        solver_info["network_evaluations"],
        json.dumps(solver_info["options"]),
    )

    start = time.perf_counter()
    mine = list(range(env.rank, cfg.num_samples, env.world_size))
    low_res = None if base is None else base[0]
    guidance = {
        "guidance_style": cfg.get("guidance_style", "all"),
        "guidance_interval": None if cfg.get("guidance_interval") is None else tuple(cfg.guidance_interval),
        "guidance_rescale": cfg.get("guidance_rescale", 0.0),
        "guide": guide,
        "guide_formulation": guide_diffusion,
    }
    shard = _generate_shard(
        cfg, model, diffusion, solver, labels, mine, hw, env, classifier, low_res, vae, guidance
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / f".shard_{env.rank}.npy", shard)
    barrier()
    out = run_dir / "samples.npz"
    if env.is_main:
        _write_samples(run_dir, out, cfg, labels, env.world_size, solver_info)
        elapsed = time.perf_counter() - start
        log.info(
            "%d samples from %s (step %s) in %.1f s: %.2f images/s on %d rank(s) -> %s",
            cfg.num_samples,
            cfg.checkpoint,
            info["step"],
            elapsed,
            cfg.num_samples / elapsed,
            env.world_size,
            out,
        )
        if cfg.get("score"):
            score_samples(cfg, out, hw.device)
    barrier()
    return out


SCORE_FEATURES = ("digits", "inception")


def check_score(cfg: DictConfig) -> None:
    """One line, before any sampling, for a scoring request that cannot be met."""
    if not cfg.get("score"):
        return
    check_choice("score", cfg.score, SCORE_FEATURES)
    if cfg.score == "inception" and not cfg.get("score_reference"):
        raise SamplingError(
            "score=inception compares with a reference batch: add score_reference=REF.npz (OpenAI's reference "
            "batches, or python -m diffusion.reference)"
        )
    check_choice("score_objective", cfg.score_objective, METRICS)


def score_samples(cfg: DictConfig, path: Path, device) -> dict[str, float]:
    """The five metrics of ``python -m diffusion.evaluate`` for the samples in ``path``, logged and written to
    metrics.json beside them."""
    evaluator = Evaluator(features=cfg.score, reference=cfg.get("score_reference"), device=device)
    metrics = {k: float(v) for k, v in evaluator.evaluate_batch(open_batch(path)).items()}
    (path.parent / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("scores (%s features): %s", cfg.score, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def read_score(cfg: DictConfig, run_dir: str | Path) -> float | None:
    """``score_objective`` of a scored sampling run (what sample.py returns to a sweeper), else None."""
    if not cfg.get("score"):
        return None
    return json.loads((Path(run_dir) / "metrics.json").read_text())[cfg.score_objective]


def _generate_shard(
    cfg,
    model,
    diffusion,
    solver,
    labels,
    mine,
    hw,
    env,
    classifier=None,
    low_res=None,
    vae=None,
    guidance=None,
) -> np.ndarray:
    """This rank's images, uint8 [len(mine) x H x W x C], in batches of ``cfg.batch_size``; ``classifier``
    guides towards ``labels``, ``low_res`` ([num_samples x C x h x w]) is a super-resolution model's input, and
    a latent model's samples are decoded by ``vae``."""
    side, channels = model.image_size, model.in_channels
    if vae is not None:
        side, channels = side * vae.downsample, vae.image_channels
    images = [np.zeros((0, side, side, channels), np.uint8)]
    bar = tqdm(total=len(mine), desc="sampling", unit="img", disable=not env.is_main)
    for b in range(0, len(mine), cfg.batch_size):
        idx = mine[b : b + cfg.batch_size]
        y = labels[idx] if labels is not None else None
        cond_fn = None
        if classifier is not None:
            cond_fn = classifier_cond_fn(classifier, y.to(hw.device), cfg.classifier_scale)
        x = generate(
            model, diffusion, solver, idx, cfg.seed, hw.device, y if model.num_classes else None,
            cfg.guidance_scale, autocast=hw.autocast(), cond_fn=cond_fn,
            model_kwargs=None if low_res is None else {"low_res": low_res[idx].to(hw.device)},
            **(guidance or {}),
        )  # fmt: skip
        if vae is not None:
            x = vae.decode(x)
        images.append(to_uint8(x))
        bar.update(len(idx))
    bar.close()
    return np.concatenate(images)


def describe_solver(solver) -> dict:
    """The solver's name, options and network evaluations per batch (``solver.describe()``)."""
    if hasattr(solver, "describe"):
        return solver.describe()
    return {"solver": type(solver).__name__, "options": {}, "network_evaluations": -1}


def _write_samples(
    run_dir: Path, out: Path, cfg: DictConfig, labels, world_size: int, solver_info: dict | None = None
) -> None:
    """Interleave the ranks' shards back into index order; write samples.npz atomically, then grid.png.

    Besides the images (arr_0) and labels (arr_1), samples.npz records what made them: ``solver`` (its name in
    conf/solver), ``solver_options`` (JSON) and ``network_evaluations`` (per image batch, not counting the
    doubled batch of classifier-free guidance)."""
    shards = [np.load(run_dir / f".shard_{r}.npy") for r in range(world_size)]
    arr = np.empty((cfg.num_samples, *shards[0].shape[1:]), dtype=np.uint8)
    for r, shard in enumerate(shards):
        arr[r::world_size] = shard
    metadata = {}
    if solver_info is not None:
        metadata = {
            "solver": solver_info["solver"],
            "solver_options": json.dumps(solver_info["options"], default=str),
            "network_evaluations": np.int64(solver_info["network_evaluations"]),
        }
    write_sample_batch(out, arr, None if labels is None else labels.numpy(), **metadata)
    save_grid(arr[: cfg.grid_max], run_dir / "grid.png")
    for r in range(world_size):
        (run_dir / f".shard_{r}.npy").unlink()


# --------------------------------------------------------------------------------------------------------------
# Classifier guidance and super-resolution inputs
# --------------------------------------------------------------------------------------------------------------


def is_classifier(model_cfg: DictConfig) -> bool:
    """Whether a model config builds a noisy-image classifier (EncoderUNetModel) rather than a diffusion model."""
    return getattr(get_class(model_cfg["_target_"]), "role", None) == "classifier"


def _classifier_preset(name: str) -> DictConfig:
    """The ``conf/model`` preset ``name`` of a plain classifier file; SamplingError unless it is a classifier's."""
    classifiers = [p.stem for p in sorted((CONF_DIR / "model").glob("classifier_*.yaml"))]
    if not (CONF_DIR / "model" / f"{name}.yaml").exists():
        raise SamplingError(
            f"classifier_model={name}: no such preset in conf/model; use one of {classifiers}"
        )
    preset = _compose_model(name)
    if not is_classifier(preset):
        raise SamplingError(
            f"classifier_model={name} is not a classifier preset ({preset._target_}): use one of {classifiers}"
        )
    return preset


def load_classifier(cfg: DictConfig, model: torch.nn.Module) -> torch.nn.Module | None:
    """
    The noisy-image classifier of ``cfg.classifier`` (its first EMA for a project checkpoint), in eval mode on
    the CPU, checked against ``model``; None without ``cfg.classifier``.

    :param cfg: ``sample.yaml``'s config: classifier, classifier_model, classifier_scale.
    :param model: the diffusion model it will guide (its image size, channels and classes must fit).
    :raises SamplingError: for every combination that cannot work, before any sampling.
    """
    if cfg.classifier is None:
        if cfg.classifier_model is not None:
            raise SamplingError(
                f"classifier_model={cfg.classifier_model} names the preset of a classifier file: add "
                "classifier=PATH, or drop classifier_model"
            )
        if cfg.classifier_scale != 1.0:
            raise SamplingError(
                f"classifier_scale={cfg.classifier_scale} needs a classifier: add classifier=PATH (the "
                "checkpoint of a task=classifier run, e.g. experiment=digits_classifier)"
            )
        return None
    path = cfg.classifier
    if model.role == "upsampler":
        raise SamplingError(
            f"classifier={path}: classifier guidance steers a base model, and checkpoint={cfg.checkpoint} is a "
            "super-resolution model: drop classifier"
        )
    state = ckpt.load_file(path)
    if "format_version" in state:
        if cfg.classifier_model is not None:
            raise SamplingError(
                f"classifier={path} is a checkpoint of this project and carries its own model config: drop "
                f"classifier_model={cfg.classifier_model}"
            )
        config = ckpt.stored_config(state["model_config"])
        if not is_classifier(config):
            raise SamplingError(
                f"classifier={path} is the checkpoint of a diffusion model ({config._target_}), not of a "
                f"classifier: give it as checkpoint={path}, and a task=classifier run's checkpoint as classifier="
            )
        weights = ckpt.model_weights(state, use_ema=True)
    else:
        if cfg.classifier_model is None:
            presets = matching_presets(state)
            fits = f"; it matches model={' / model='.join(presets)}" if presets else ""
            raise SamplingError(
                f"classifier={path} is a plain state dict (such as OpenAI's 64x64_classifier.pt): name its preset, "
                f"e.g. classifier_model=classifier_64{fits}"
            )
        config, weights = _classifier_preset(cfg.classifier_model), state
    classifier = load_network(config, weights, f"classifier={path} does not fit its classifier model")
    classifier.requires_grad_(False)

    theirs = (classifier.in_channels, classifier.image_size, classifier.image_size)
    ours = (model.in_channels, model.image_size, model.image_size)
    if theirs != ours:
        raise SamplingError(
            f"classifier={path} classifies {'x'.join(map(str, theirs))} images but the model makes "
            f"{'x'.join(map(str, ours))} ones (channels x height x width): use a classifier trained on the "
            "model's image size and channels"
        )
    if model.num_classes and classifier.num_classes != model.num_classes:
        raise SamplingError(
            f"classifier={path} tells {classifier.num_classes} classes apart but the model is conditioned on "
            f"{model.num_classes}: guidance needs a classifier of the model's classes"
        )
    return classifier


def read_base_samples(
    cfg: DictConfig, model: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """
    The low-resolution inputs of a super-resolution model: ``base_samples``' images and labels (``arr_0``,
    ``arr_1`` of a samples.npz), cycled to ``num_samples`` as ``classes`` are; None for a base model.

    :return: (low_res, labels): a float [num_samples x C x h x w] Tensor in [-1, 1] and a LongTensor
        [num_samples] (None when the file has no labels and the model needs none).
    :raises SamplingError: when the file does not suit the model, before any sampling.
    """
    upsampler = model.role == "upsampler"
    if cfg.base_samples is None:
        if upsampler:
            raise SamplingError(
                f"checkpoint={cfg.checkpoint} is a super-resolution model: give the low-resolution images to "
                "upsample as base_samples=BASE.npz (the samples.npz of the base model's sample.py run)"
            )
        return None
    path = Path(cfg.base_samples)
    if not upsampler:
        raise SamplingError(
            f"base_samples={path} is the input of a super-resolution model, and checkpoint={cfg.checkpoint} is "
            f"a {type(model).__name__}: drop base_samples, or sample an upsampler checkpoint (task=super_res)"
        )
    if cfg.classes:
        raise SamplingError(
            f"classes={list(cfg.classes)}: an upsampler takes each image's class from base_samples' arr_1; "
            "drop classes"
        )
    batch = open_batch(path, role="base_samples", min_images=1)  # one line for a file that is no sample batch
    images, labels = batch.images(), batch.labels()
    small = model.small_size
    if small is not None and images.shape[1:3] != (small, small):
        raise SamplingError(
            f"base_samples={path} holds {images.shape[1]}x{images.shape[2]} images, but this upsampler "
            f"upsamples from {small}x{small} (its small_size): sample the base model at {small}x{small}"
        )
    if images.shape[3] != model.in_channels:
        raise SamplingError(
            f"base_samples={path} holds {images.shape[3]}-channel images, the upsampler takes {model.in_channels}"
        )
    if model.num_classes:
        if labels is None:
            raise SamplingError(
                f"base_samples={path} has no labels (arr_1), and this upsampler is class-conditional: sample "
                "the base model with classes"
            )
        bad = sorted({int(c) for c in labels if not 0 <= c < model.num_classes})
        if bad:
            raise SamplingError(
                f"base_samples={path} has labels {bad[:5]} outside the upsampler's range 0..{model.num_classes - 1}"
            )
    if labels is not None and len(labels) != len(images):
        raise SamplingError(f"base_samples={path} has {len(images)} images but {len(labels)} labels (arr_1)")
    order = torch.arange(cfg.num_samples) % len(images)  # the base images in turn, as classes are cycled
    low_res = torch.from_numpy(images).permute(0, 3, 1, 2)[order].float() / 127.5 - 1.0
    return low_res, None if labels is None else torch.from_numpy(labels.astype(np.int64))[order]
