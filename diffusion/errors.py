"""Mistakes a user can fix, told apart from bugs.

A :class:`UserError` carries a message that names the bad value and says what to change; the command-line entry
points (train.py, sample.py, ``python -m diffusion.*``) print it as one line and exit with status 1. Every other
exception is a bug and keeps its traceback, a ValueError raised deep inside torch included.

``UserError`` is a ValueError, so code that catches ValueError around a constructor keeps working.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A mistake the user can fix: a config value, a file, a combination of options. The message says which
    and what to change."""


class ConfigError(UserError):
    """A value in the config, or a constructor argument, that cannot work."""


def find_user_error(e: BaseException) -> UserError | None:
    """The UserError behind ``e``, or None for a bug.

    ``hydra.utils.instantiate`` wraps what a constructor raises in an InstantiationException (the cause); the
    message that names the bad value is the original one. OmegaConf keeps what a resolver raised (e.g.
    ``${follow_model:}`` finding no VAE) only as the context of its InterpolationResolutionError.
    """
    from omegaconf.errors import InterpolationResolutionError

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or (e.__context__ if isinstance(e, InterpolationResolutionError) else None)
    return None


def one_line(e: UserError) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def exit_on_user_error(work: Callable[[], T], log: logging.Logger) -> T:
    """Run a command-line entry point's ``work``; a :class:`UserError` ends the process with its one-line
    message and status 1 (the traceback goes to the log file at DEBUG level). Anything else propagates."""
    try:
        return work()
    except Exception as e:
        error = find_user_error(e)
        if error is None:
            raise
        log.debug("request failed", exc_info=True)
        log.error("%s", one_line(error))
        sys.exit(1)


def check_choice(key: str, value: object, choices) -> object:
    """``value`` when it is one of ``choices``; else a one-line ConfigError naming the key and the choices."""
    if not isinstance(value, Hashable) or value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, choices))}")
    return value
