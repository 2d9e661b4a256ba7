"""The ADM / guided-diffusion recipe as a Hydra-configured training and sampling platform.

Importing the package registers the config schemas in Hydra's ConfigStore (and the ``${launch_time:}`` and
``${per_gpu:}`` resolvers), so that ``hydra.compose`` of ``conf/`` works from any Python session::

    import diffusion
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(diffusion.CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=unet_64"])
    model = instantiate(cfg.model)
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the config groups of the checkout

from diffusion.config import register_configs, register_resolvers  # noqa: E402

register_configs()
register_resolvers()
