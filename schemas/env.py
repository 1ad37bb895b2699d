"""Numbers read from `MP_...` variables, for the control plane's and the daemon's settings alike.

A value that does not parse is an `EnvError` naming the variable and what it held, so
an operator reads which line of their environment to fix, not a bare Python message.
"""

from __future__ import annotations

from collections.abc import Mapping


class EnvError(ValueError):
    """A variable's value is not what it must be (the message names the variable)."""


def integer(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise EnvError(f"{key} must be an integer, got {raw!r}") from None


def number(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return float(default)
    try:
        return float(raw)
    except ValueError:
        raise EnvError(f"{key} must be a number, got {raw!r}") from None


def positive(env: Mapping[str, str], key: str, default: float) -> float:
    value = number(env, key, default)
    if value <= 0:
        raise EnvError(f"{key} must be positive, got {env.get(key)!r}")
    return value


def non_negative(env: Mapping[str, str], key: str, default: float) -> float:
    value = number(env, key, default)
    if not value >= 0 or value == float("inf"):
        raise EnvError(f"{key} must be 0 or more, got {env.get(key)!r}")
    return value
