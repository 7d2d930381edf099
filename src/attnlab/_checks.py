"""Argument checks shared across the package (errors name the argument and its value)."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an ``int >= minimum`` (not a bool); ``TypeError``/``ValueError``
    naming ``name``, the value and the expectation otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool; ``TypeError`` naming ``name`` and the value otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}, expected a bool")
    return value


class SizeLimitError(ValueError):
    """A problem above a size guard (the message names the size and the limit): the inputs are
    valid, only too large for that path. The benchmark records it as ``unsupported``."""
