"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option in ``conf/<group>/`` starts its defaults list with the schema of its group (``base_unet``,
``base_optim``...), so an unknown key or a value of the wrong type fails when Hydra composes the config, with
Hydra's own message naming the key, before any work starts. The ``_target_`` of each schema says which class
``hydra.utils.instantiate`` builds from it; values that exist only at run time (the data's channels and classes,
the diffusion's number of timesteps, the model's parameters) are passed as keyword arguments at instantiation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class UNetConfig:
    """The ADM UNet; field names are guided-diffusion's command-line flags."""

    _target_: str = "diffusion.unet.UNetModel"
    image_size: int = 64
    in_channels: int = 3
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: list[float] | None = None
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])  # in pixels
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    class_cond: bool = False
    num_classes: int = 1000
    label_dropout: float = 0.0  # classifier-free guidance: probability of training with the null label
    use_checkpoint: bool = False
    use_sdpa: bool = True  # attention through F.scaled_dot_product_attention (false: the plain formula)
    use_fp16: bool = False  # accepted for flag compatibility; precision comes from the hardware group


@dataclass
class DiffusionConfig:
    _target_: str = "diffusion.gaussian_diffusion.GaussianDiffusion"
    steps: int = 1000
    noise_schedule: str = "linear"
    model_mean_type: str = "epsilon"
    model_var_type: str = "learned_range"
    loss_type: str = "mse"
    rescale_timesteps: bool = False
    timestep_respacing: str | None = None


@dataclass
class DataConfig:
    """Loader settings shared by every dataset; subclasses add the dataset's own fields."""

    _target_: str = MISSING
    image_size: int = "${model.image_size}"  # type: ignore[assignment]
    channels: int = 3
    batch_size: int = 64  # global batch over all ranks
    microbatch: int = 0  # per-rank micro-batch size; 0 = the whole per-rank batch at once
    num_workers: int = 0


@dataclass
class DigitsConfig(DataConfig):
    _target_: str = "diffusion.data.Digits"
    channels: int = 1


@dataclass
class ImageFolderConfig(DataConfig):
    _target_: str = "diffusion.data.ImageFolder"
    dir: str = MISSING
    labels: str = "filename"  # filename | subdir | none
    random_crop: bool = False
    random_flip: bool = True
    on_error: str = "skip"  # skip | raise
    cache_dir: str | None = None
    num_workers: int = 4


@dataclass
class CIFAR10Config(DataConfig):
    _target_: str = "diffusion.data.CIFAR10"
    root: str = MISSING
    image_size: int = 32
    train: bool = True
    random_flip: bool = True
    num_workers: int = 2


# Keys of the data group that configure the loader, not the dataset class.
LOADER_KEYS = ("batch_size", "microbatch", "num_workers")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_rates: list[float] = field(default_factory=lambda: [0.9999])
    ema_warmup: bool = True  # decay = min(rate, (1 + step) / (10 + step))
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
class UniformSamplerConfig:
    _target_: str = "diffusion.timestep_samplers.UniformSampler"


@dataclass
class LossSecondMomentSamplerConfig:
    _target_: str = "diffusion.timestep_samplers.LossSecondMomentSampler"
    history_per_term: int = 10
    uniform_prob: float = 0.001


@dataclass
class HardwareConfig:
    _target_: str = "diffusion.hardware.Hardware"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    tf32: bool = True
    # null: the faster choice measured on each device (compile: on for CUDA; channels_last: on on the CPU)
    compile: bool | None = None
    channels_last: bool | None = None
    fused_optimizer: bool = True
    num_threads: int | None = None  # CPU intra-op threads; null = torch's default


@dataclass
class WandbLoggerConfig:
    _target_: str = "diffusion.loggers.WandbLogger"
    project: str = "diffusion"
    entity: str | None = None
    mode: str = "offline"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    init_timeout: float = 60.0  # seconds before an unreachable server makes the run fall back to offline


@dataclass
class JsonlLoggerConfig:
    _target_: str = "diffusion.loggers.JsonlLogger"
    filename: str = "metrics.jsonl"


@dataclass
class SolverConfig:
    _target_: str = MISSING
    steps: int = 50
    clip_denoised: bool = True


@dataclass
class DDIMSolverConfig(SolverConfig):
    _target_: str = "diffusion.solvers.DDIM"
    eta: float = 0.0


@dataclass
class DDPMSolverConfig(SolverConfig):
    _target_: str = "diffusion.solvers.DDPM"
    steps: int = 250


@dataclass
class DPMSolverConfig(SolverConfig):
    _target_: str = "diffusion.solvers.DPMSolverPP"
    steps: int = 20
    spacing: str = "logsnr"  # logsnr | time: where the steps go (evenly in log-SNR suits the linear schedule)


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
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0: run to optim.lr_anneal_steps, or forever)
    save_every: int = 1000
    keep_last: int = 2  # periodic checkpoints kept besides milestones
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    log_every: int = 100
    sample_every: int = 0  # 0 = only at the end of training
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


@dataclass
class SampleConfig(CheckpointJobConfig):
    solver: Any = MISSING
    num_samples: int = 64
    batch_size: int = 16
    classes: list[int] | None = None  # default: spread evenly over all classes
    guidance_scale: float = 1.0
    grid_max: int = 100  # at most this many images in grid.png


@dataclass
class NLLConfig(CheckpointJobConfig):
    data: Any = MISSING
    num_batches: int = 0  # global batches of data.batch_size to evaluate; 0 = one pass over the dataset
    clip_denoised: bool = True


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (call before composing)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="nll_schema", node=NLLConfig)
    for group, name, node in [
        ("model", "base_unet", UNetConfig),
        ("diffusion", "base_diffusion", DiffusionConfig),
        ("data", "base_digits", DigitsConfig),
        ("data", "base_image_folder", ImageFolderConfig),
        ("data", "base_cifar10", CIFAR10Config),
        ("optim", "base_optim", OptimConfig),
        ("sampler", "base_uniform", UniformSamplerConfig),
        ("sampler", "base_loss_second_moment", LossSecondMomentSamplerConfig),
        ("hardware", "base_hardware", HardwareConfig),
        ("logger", "base_wandb", WandbLoggerConfig),
        ("logger", "base_jsonl", JsonlLoggerConfig),
        ("solver", "base_ddim", DDIMSolverConfig),
        ("solver", "base_ddpm", DDPMSolverConfig),
        ("solver", "base_dpm_solver", DPMSolverConfig),
    ]:
        cs.store(group=group, name=name, node=node)


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


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("launch_time"):
        OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback).

    ``hydra.utils.instantiate`` wraps a constructor's ValueError in an InstantiationException; the message that
    names the bad value is the original one.
    """
    from hydra.errors import InstantiationException

    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, (ValueError, OSError)):  # TrainingError, CheckpointError, SamplingError are ValueErrors
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None
