"""Config: building components (:func:`build`), their schemas (``schemas``), the ConfigStore registry (``store``),
the resolvers (``resolvers``) and the one-line explanations of a config that does not compose (``explain``).

``build`` and ``schemas`` are the bottom of the package and import nothing of it; ``store`` is its top (it imports
every component to read its constructor). ``diffusion.register()`` fills Hydra's ConfigStore and the resolvers:
the entry points call it, and so does a notebook before ``hydra.compose``. Importing a module never does.
"""

from diffusion.config.build import build
from diffusion.config.schemas import LOADER_KEYS

__all__ = ["LOADER_KEYS", "build"]
