"""The ADM / guided-diffusion recipe, EDM and flow matching as a Hydra-configured training and sampling platform.

Importing the package (or any module of it) registers nothing and imports no network: ``diffusion.register()``
stores the config schemas in Hydra's ConfigStore (and the ``${launch_time:}``, ``${per_gpu:}`` resolvers), so that
``hydra.compose`` of ``conf/`` works from any Python session::

    import diffusion
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    diffusion.register()
    with initialize_config_dir(str(diffusion.CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=unet_64"])
    model = instantiate(cfg.model)

The sub-packages, from the bottom up (each imports only those before it): ``config`` (build, schemas),
``runtime`` (devices, precision, processes), ``models``, ``process`` (training formulations and their denoisers),
``sampling``, ``data``, ``evaluation``, ``engine``; the entry points (``sample``, ``evaluate``, ``nll``,
``reference``, ``report``, ``latent_cache``) and the config store sit on top.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the config groups of the checkout


def register() -> None:
    """Store every config schema in Hydra's ConfigStore and register the resolvers (repeating it is harmless)."""
    from diffusion.config.resolvers import register_resolvers
    from diffusion.config.store import register_configs

    register_configs()
    register_resolvers()
