"""What every backend shares: the problem description and the capability protocol.

Each backend says why it cannot run a problem (``not_supported_reasons``, after xFormers'
fmha dispatch): automatic selection takes the first backend with no reasons, a forced
backend with reasons raises an error that lists them, and :func:`attnlab.explain` prints
every backend's reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..geometry import Geometry
from ..patterns.base import Pattern
from ..scores.base import ScoreMod


@dataclass
class Problem:
    """One validated attention call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geometry: Geometry
    pattern: Pattern
    score_mod: ScoreMod | None
    scale: float
    return_lse: bool
    options: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)  # per call: what a support check computed for run()

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (
            self.q.requires_grad
            or self.k.requires_grad
            or self.v.requires_grad
            or bool(self.score_mod is not None and self.score_mod.differentiable_tensors())
        )

    def describe(self) -> str:
        g = self.geometry
        return (
            f"q=(B={g.batch}, Hq={g.q_heads}, L={g.q_shape}, D={g.head_dim}), "
            f"k/v=(Hkv={g.kv_heads}, S={g.kv_shape}, Dv={g.value_dim}), dtype={self.dtype}, "
            f"device={self.device}, pattern={self.pattern!r}, "
            f"score_mod={type(self.score_mod).__name__ if self.score_mod else None}, "
            f"return_lse={self.return_lse}, requires_grad={self.requires_grad}"
        )


class Backend:
    """A way to execute a :class:`Problem`.

    ``options`` lists the backend-specific knobs it accepts in ``attention(options=...)``.
    """

    name: str = ""
    options: tuple[str, ...] = ()

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        raise NotImplementedError

    def declines(self, problem: Problem) -> list[str]:
        """Why automatic selection passes over this backend although it could run the
        problem (another one is faster there); a forced backend ignores these."""
        return []

    def run(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError
