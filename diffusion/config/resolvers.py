"""The OmegaConf resolvers the configs use: ``${launch_time:}``, ``${per_gpu:}``, ``${follow_model:}`` and
``${objective_direction:}``."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def launch_time(fmt: str) -> str:
    """The launch's start time, the same on every rank of one torchrun launch.

    Hydra's ``${now:}`` is read by each process separately, so two ranks started a second apart would write to
    two run directories. Under torchrun every rank on a node is a child of the same agent process, whose start
    time is one value for all of them.
    """
    import datetime
    import os

    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            with open(f"/proc/{os.getppid()}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as f:
                boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
            start = boot + ticks / os.sysconf("SC_CLK_TCK")
            return datetime.datetime.fromtimestamp(start).strftime(fmt)
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return datetime.datetime.now().strftime(fmt)


def per_gpu(gpus: int, with_gpus: Any, without: Any) -> Any:
    """``with_gpus`` when a job asks for GPUs, else ``without``: a launcher setting that follows
    ``gpus_per_node`` (one rank per GPU, or one rank on a CPU-only partition)."""
    return with_gpus if int(gpus) > 0 else without


def follow_model(*, _root_: Any) -> int:
    """
    ``data.image_size`` unless given: the pixel side the chosen model takes -- ``model.image_size`` (UNet) or
    ``model.input_size`` (DiT), times the VAE's downsampling factor when ``data.latent`` is set (the model then
    sees latents: DiT-XL/2's input_size 32 with Stable Diffusion's VAE is 256 px images). The factor is read from
    the VAE's config.json, offline. A model of neither kind, or none, needs an explicit data.image_size.
    """
    from diffusion.config.build import missing_value_error
    from diffusion.errors import ConfigError

    model = _root_.get("model")
    if model is None:
        raise ConfigError(
            "data.image_size follows the model, but no model is chosen here: set data.image_size (e.g. "
            "data.image_size=256) or model=<preset>"
        )
    key = next((k for k in ("image_size", "input_size") if k in model), None)
    if key is None:
        raise ConfigError(
            f"data.image_size cannot follow model._target_={model.get('_target_')}, which has no image_size or "
            "input_size: set data.image_size"
        )
    if OmegaConf.is_missing(model, key):
        raise missing_value_error(f"model.{key}", example="64")
    side = model[key]
    data = _root_.get("data")
    if data is not None and data.get("latent"):
        vae = _root_.get("vae")
        if vae is None:
            raise ConfigError("data.latent=true needs a VAE: add vae=sd_vae_ft_ema (or vae=sd_vae_ft_mse)")
        from diffusion.models.vae import vae_downsample

        side *= vae_downsample(vae.name_or_path, vae.cache_dir)
    return side


def objective_direction(objective: str) -> str:
    """ "minimize" or "maximize": how ``eval.objective`` improves (a sweeper's direction follows it)."""
    from diffusion.evaluation.sample_quality import objective_direction

    return objective_direction(objective)


def register_resolvers() -> None:
    for name, resolver, cache in [
        ("launch_time", launch_time, True),
        ("per_gpu", per_gpu, False),
        ("follow_model", follow_model, False),
        ("objective_direction", objective_direction, False),
    ]:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=cache)
