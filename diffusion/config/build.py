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


def missing_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of ``node`` whose value is required (``???``) and not given, sorted.

    Unlike ``OmegaConf.missing_keys`` this reads no interpolation: ``data.image_size`` points at a model that a
    project checkpoint only supplies later.
    """
    from omegaconf import OmegaConf

    found = []
    for key in node:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_dict(node[key]):
            found += missing_keys(node[key], f"{prefix}{key}.")
    return sorted(found)


def missing_value_error(key: str, error: type[Exception] | None = None, example: str = "...") -> Exception:
    """The one-line error for a required value that was not given."""
    from diffusion.errors import ConfigError

    return (error or ConfigError)(
        f"missing required value {key}: set it on the command line, e.g. {key}={example}"
    )


def check_complete(node: Any, error: type[Exception] | None = None) -> None:
    """Raise ``error`` (ConfigError) naming the first required value of ``node`` that was not given."""
    missing = missing_keys(node)
    if missing:
        raise missing_value_error(missing[0], error)
