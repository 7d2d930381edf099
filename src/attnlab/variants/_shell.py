"""What the variant modules share beyond :class:`attnlab._packed.PackedSelfAttention`."""

from __future__ import annotations

from ..patterns.base import as_pattern


def module_pattern(pattern: object):
    """A module's pattern argument, checked at construction (None: Full)."""
    return as_pattern(pattern)
