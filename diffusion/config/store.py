"""The schema registry: every component's schema stored in Hydra's ConfigStore (:func:`register_configs`).

The top of the package: it imports every component class to read its constructor, so nothing below imports it.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from diffusion.config.schemas import (
    LatentCacheConfig,
    LoaderConfig,
    NLLConfig,
    OptimConfig,
    ReferenceConfig,
    SampleConfig,
    TrainConfig,
    schema,
)


def component_schemas() -> dict[str, type]:
    """Each component's schema by its ConfigStore name, made from the constructors."""
    from diffusion.data import datasets as data
    from diffusion.engine import loggers, tasks
    from diffusion.evaluation import sample_quality
    from diffusion.models import dit, unet, vae
    from diffusion.process import edm, flow, timestep_samplers
    from diffusion.process.gaussian import GaussianDiffusion
    from diffusion.runtime import hardware
    from diffusion.sampling import auto, flow_sde, k_solver, solvers

    follow_model = {"image_size": "${follow_model:}"}
    return {
        "schema_unet": schema(unet.UNetModel),
        "schema_classifier": schema(unet.EncoderUNetModel),
        "schema_upsampler": schema(unet.SuperResModel),
        "schema_dit": schema(dit.DiT),
        "schema_vae": schema(vae.load_vae, runtime=("device", "dtype")),
        "schema_diffusion": schema(GaussianDiffusion),
        "schema_edm": schema(edm.EDM),
        "schema_flow": schema(flow.Flow),
        "schema_digits": schema(data.Digits, defaults=follow_model, base=LoaderConfig),
        "schema_image_folder": schema(
            data.ImageFolder, runtime=("cache_dir",), defaults=follow_model, base=LoaderConfig
        ),
        "schema_cifar10": schema(data.CIFAR10, base=LoaderConfig),
        "schema_adamw": OptimConfig,
        "schema_uniform": schema(timestep_samplers.UniformSampler, runtime=("num_timesteps",)),
        "schema_loss_second_moment": schema(
            timestep_samplers.LossSecondMomentSampler, runtime=("num_timesteps",)
        ),
        "schema_hardware": schema(hardware.Hardware, runtime=("local_rank",)),
        "schema_wandb": schema(loggers.WandbLogger),
        "schema_jsonl": schema(loggers.JsonlLogger),
        "schema_ddim": schema(solvers.DDIM),
        "schema_ddpm": schema(solvers.DDPM),
        "schema_dpm_solver": schema(solvers.DPMSolverPP),
        "schema_k_sampler": schema(k_solver.KSampler),
        "schema_auto_solver": schema(auto.AutoSolver),
        "schema_flow_sde": schema(flow_sde.FlowSDE),
        "schema_diffusion_task": schema(tasks.DiffusionTask, runtime=("diffusion", "sampler", "solver")),
        "schema_classifier_task": schema(tasks.ClassifierTask, runtime=("diffusion", "sampler", "solver")),
        "schema_super_res_task": schema(tasks.SuperResTask, runtime=("diffusion", "sampler", "solver")),
        "schema_sample_quality": schema(sample_quality.SampleQuality),
    }


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (``diffusion.register()`` does it; repeating it is harmless)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="nll_schema", node=NLLConfig)
    cs.store(name="latent_schema", node=LatentCacheConfig)
    cs.store(name="reference_schema", node=ReferenceConfig)
    for name, node in component_schemas().items():
        cs.store(name=name, node=node)
