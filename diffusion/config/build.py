"""Building components from config: ``hydra.utils.instantiate`` with the platform's own errors.

The bottom of the package: every layer builds its parts with :func:`build`, so this module imports nothing of the
platform but its errors.
"""

from __future__ import annotations

from typing import Any


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with the :class:`~diffusion.errors.UserError` a constructor raised coming out
    as itself rather than wrapped in Hydra's InstantiationException (whose message adds the full target path)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from diffusion.errors import find_user_error

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        error = find_user_error(e)
        if error is None:
            raise
        raise error from e
