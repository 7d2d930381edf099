"""Logit soft-capping and softmax temperature.

- :class:`Softcap`: ``logits = cap * tanh(logits / cap)``, as in "Gemma 2: Improving Open
  Language Models at a Practical Size" (2024) (and Grok-1): logits stay in ``(-cap, cap)``.
- :class:`Temperature`: ``logits = logits / temperature``, the classic softmax temperature,
  per model or per query head, fixed or learned; the temperature scaling ("TempScale") of
  "Length-Induced Embedding Collapse in Transformer-based Models" (2024).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..geometry import Geometry
from .base import ScoreContext, ScoreMod


class Softcap(ScoreMod):
    """``logits = cap * tanh(logits / cap)``: a smooth bound ``|logits| < cap``.

    Args:
        cap: a finite float ``> 0`` (Gemma 2 uses 50.0 for attention logits).

    See "Gemma 2: Improving Open Language Models at a Practical Size" (2024).
    """

    def __init__(self, cap: float) -> None:
        super().__init__()
        if isinstance(cap, bool) or not isinstance(cap, (int, float)):
            raise TypeError(f"cap must be a float, got {type(cap).__name__}")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be a finite float > 0, got cap={cap}")
        self.cap = float(cap)

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        return self.cap * torch.tanh(score / self.cap)

    def extra_repr(self) -> str:
        return f"cap={self.cap}"


class Temperature(ScoreMod):
    """``logits = logits / temperature[h]``: softmax temperature, global or per query head.

    Args:
        temperature: a positive float (one temperature), or a 1-D tensor / sequence of
            ``num_heads`` positive floats (one per query head). An ``nn.Parameter`` is used
            as given (and learned).
        learnable: store the temperature as an ``nn.Parameter`` (named ``temperature``)
            that an optimiser updates; otherwise it is a buffer. The parameter is the
            temperature itself (not its logarithm); keep it positive when training.

    ``temperature > 1`` flattens the attention distribution, ``< 1`` sharpens it. See
    "Length-Induced Embedding Collapse in Transformer-based Models" (2024, TempScale).
    """

    temperature: torch.Tensor

    def __init__(
        self,
        temperature: float | Sequence[float] | torch.Tensor,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        if isinstance(temperature, bool):
            raise TypeError("temperature must be a float or a tensor, got bool")
        if isinstance(temperature, torch.Tensor):
            t = temperature
        elif isinstance(temperature, (int, float)):
            t = torch.tensor(float(temperature))
        elif isinstance(temperature, (list, tuple)):
            try:
                t = torch.tensor([float(x) for x in temperature])
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"temperature must contain numbers, got temperature={temperature!r}"
                ) from e
        else:
            raise TypeError(
                "temperature must be a float, a sequence of floats or a tensor, got "
                f"{type(temperature).__name__}"
            )
        if t.ndim > 1:
            raise ValueError(
                "temperature must be a scalar or have shape (num_heads,), got shape "
                f"{tuple(t.shape)}"
            )
        if t.ndim == 1 and t.numel() == 0:
            raise ValueError("temperature must not be empty, got shape (0,)")
        vals = t.detach()
        if not bool((torch.isfinite(vals) & (vals > 0)).all()):
            raise ValueError(
                f"temperature must be finite and > 0, got temperature={vals.tolist()}"
            )
        self.learnable = learnable or isinstance(t, nn.Parameter)
        if isinstance(t, nn.Parameter):
            self.temperature = t
        else:
            t = t.detach().clone()
            if not t.is_floating_point():
                t = t.to(torch.get_default_dtype())
            if learnable:
                self.temperature = nn.Parameter(t)
            else:
                self.register_buffer("temperature", t)

    @property
    def num_heads(self) -> int | None:
        """Number of per-head temperatures, ``None`` for a single one."""
        return None if self.temperature.ndim == 0 else self.temperature.shape[0]

    def validate(self, geometry: Geometry) -> None:
        if self.num_heads is not None and self.num_heads != geometry.q_heads:
            raise ValueError(
                f"Temperature has {self.num_heads} per-head temperatures but the query has "
                f"{geometry.q_heads} heads; temperature must have shape (num_query_heads,) "
                "or be a scalar"
            )

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        t = self.temperature.to(score.dtype)
        if t.ndim == 1:
            t = t[ctx.h]
        return score / t

    def extra_repr(self) -> str:
        if self.num_heads is None:
            value = f"temperature={self.temperature.item():.6g}"
        else:
            value = f"num_heads={self.num_heads}"
        return f"{value}, learnable={self.learnable}"
