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
