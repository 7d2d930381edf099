"""ALiBi: attention with linear biases.

Reference: "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation" (Press, Smith and Lewis, 2022).

Query head ``h`` adds to its logit for (query ``i``, key ``j``)::

    logits[b, h, i, j] += -slope[h] * |j - (i + S - L)|

with bottom-right alignment (``S - L = geometry.causal_offset``), so the query on the last
row is aligned with the last key. Under a causal pattern this is the paper's
``slope * (j - i)`` for ``j <= i``; without one the penalty is symmetric in distance.
Distances are between *flat* (row-major) token indices.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..geometry import Geometry
from .base import ScoreContext, ScoreMod


def _check_num_heads(num_heads: object) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got num_heads={num_heads}")
    return num_heads


def _power_of_two_slopes(n: int) -> list[float]:
    # 2^(-8/n), 2^(-16/n), ..., 2^(-8): the geometric sequence of the paper.
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's head slopes, shape ``(num_heads,)``, float32.

    For ``n`` a power of two: ``slope[h] = 2^(-8 (h + 1) / n)`` (for 8 heads 1/2, 1/4, ...,
    1/256). Otherwise (the rule of the authors' code): the slopes of the closest smaller power
    of two ``m``, followed by the first ``n - m`` of every other slope of ``2m`` heads
    (``slopes(2m)[0::2]``), which interleave between the first ones.
    """
    n = _check_num_heads(num_heads)
    if n & (n - 1) == 0:
        slopes = _power_of_two_slopes(n)
    else:
        m = 2 ** math.floor(math.log2(n))
        slopes = _power_of_two_slopes(m) + _power_of_two_slopes(2 * m)[0::2][: n - m]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(ScoreMod):
    """Linear distance penalty per query head: ``logits += -slope[h] * |j - (i + S - L)|``.

    Args:
        num_heads: number of query heads ``Hq`` (one slope each).
        slopes: optional slopes, a sequence or 1-D tensor of ``num_heads`` finite floats;
            the paper's (:func:`alibi_slopes`) when ``None``. Stored as the buffer
            ``slopes`` (float32; not learned).

    See "Train Short, Test Long: Attention with Linear Biases Enables Input Length
    Extrapolation" (2022).
    """

    slopes: torch.Tensor

    def __init__(
        self, num_heads: int, slopes: Sequence[float] | torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.num_heads = _check_num_heads(num_heads)
        if slopes is None:
            t = alibi_slopes(self.num_heads)
        else:
            if isinstance(slopes, torch.Tensor):
                t = slopes.detach().to(torch.float32).clone()
            elif isinstance(slopes, (list, tuple)):
                try:
                    t = torch.tensor([float(s) for s in slopes], dtype=torch.float32)
                except (TypeError, ValueError) as e:
                    raise TypeError(f"slopes must contain numbers, got slopes={slopes!r}") from e
            else:
                raise TypeError(
                    "slopes must be a sequence of floats, a 1-D tensor or None, got "
                    f"{type(slopes).__name__}"
                )
            if t.ndim != 1 or t.numel() != self.num_heads:
                raise ValueError(
                    f"slopes must have shape (num_heads,) = ({self.num_heads},), got "
                    f"shape {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"slopes must be finite, got slopes={t.tolist()}")
        self.register_buffer("slopes", t)

    def validate(self, geometry: Geometry) -> None:
        if self.num_heads != geometry.q_heads:
            raise ValueError(
                f"ALiBi was built with num_heads={self.num_heads} but the query has "
                f"{geometry.q_heads} heads; num_heads must equal the number of query heads"
            )

    def modify(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        rel = ctx.kv_idx - (ctx.q_idx + ctx.geometry.causal_offset)
        dt = torch.promote_types(score.dtype, torch.float32)
        slope = self.slopes.to(device=score.device, dtype=dt)[ctx.h]
        bias = -slope * rel.abs().to(dt)
        return score + bias.to(score.dtype)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
