"""Errors users see, and the helpers that make them say the bad key and the valid choices.

Every user-facing check raises a :class:`FtrlError`: :class:`ConfigError` (a bad config value),
:class:`MissingInputError` (a path, model or API key that is not there) or a run-directory conflict;
:class:`UnknownNameError` is a name that no registry holds. Messages name the key, list the valid
options and suggest the closest one; the entrypoints print them as one line.

    python -c "from ftrl.errors import check_choice; check_choice('algorithm.name', 'gpro', ['grpo', 'ppo'])"
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class FtrlError(Exception):
    """A problem with what the user asked for or provided (not a bug): the entrypoints print its
    message as one line, which says what is wrong and how to fix it; ``FTRL_DEBUG=1`` adds the traceback."""


class ConfigError(FtrlError, ValueError):
    """A configuration value is invalid; the message names the key and the valid options."""


class MissingInputError(FtrlError, FileNotFoundError):
    """A file, directory, model or credential the run needs is not there; the message names the key."""


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice_message(what: str, name: Any, choices: Iterable[str]) -> str:
    choices = [str(c) for c in choices]
    return f"unknown {what} '{name}'; valid: {sorted(choices)}{did_you_mean(str(name), choices)}"


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}: {unknown_choice_message('value', value, [str(c) for c in choices])}")


def check_positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    if value is None or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value!r}")
