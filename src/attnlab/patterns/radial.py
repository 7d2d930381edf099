"""Radial attention: a static spatio-temporal mask whose spatial window halves each time the
temporal distance doubles.

Reference: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video
Generation" (2025), and its released mask generator (mit-han-lab/radial-attention,
``radial_attn/attn_mask.py``). See :class:`Radial` for what is taken from where.
"""

from __future__ import annotations

import torch

from ..geometry import Geometry
from .base import Pattern
from .layout import BlockLayout, Tiling
from .._checks import check_int


def pow2_floor(x: torch.Tensor) -> torch.Tensor:
    """Largest power of two ``<= max(x, 1)`` (int64, exact for any int64 ``x``)."""
    x = x.clamp(min=1)
    e = torch.floor(torch.log2(x.to(torch.float64))).to(torch.int64)
    p = torch.ones_like(x) << e
    p = torch.where(p > x, p >> 1, p)  # float log2 rounded up
    return torch.where((p << 1) <= x, p << 1, p)  # float log2 rounded down


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


class Radial(Pattern):
    """Radial attention over frames of ``frame_size`` consecutive flat tokens.

    With ``i' = i + S - L`` (bottom-right alignment; ``i' = i`` for self-attention),
    frames ``t_q = i' // frame_size``, ``t_k = j // frame_size`` and in-frame positions
    ``s_q = i' % frame_size``, ``s_k = j % frame_size``; ``dt = |t_q - t_k|``,
    ``ds = |s_q - s_k|`` and ``P = 2 ** floor(log2(max(dt, 1)))`` (``P = 1`` for ``dt`` in
    ``{0, 1}``, ``2`` for ``dt`` in ``[2, 4)``, ``4`` for ``[4, 8)``, ...). Key ``j`` is visible
    to query ``i`` iff

        (P <= window and ds * P < window)             (spatial band: |ds| < window / P)
        or (ds == 0 and dt % ceil(P / window) == 0)   (P > window: thinned diagonal)

    so the band around the diagonal halves each time ``dt`` doubles, and once it is a single
    diagonal, only every ``ceil(P / window)``-th frame keeps it: compute density per band
    halves, for O(n log n) pairs in all. ``window`` (default ``frame_size``) is the base
    window: with the default, the query's own frame and the adjacent ones are fully
    visible. Add an attention sink on the first frame with ``| Sinks(frame_size)``.

    Sources and what is inferred. The paper's abstract fixes the idea (static mask, spatial
    window shrinking with temporal distance, O(n log n)); the rule comes from the released
    generator (``radial_attn/attn_mask.py``): frame pairs with ``dt <= 1`` are fully visible
    (HunyuanVideo setting; Wan2.1 halves the band at ``dt == 1``), otherwise the band is
    ``|s_q - s_k| <= 2**bit_length(F) / 2**bit_length(dt) * decay_factor`` (halving as ``dt``
    doubles), and when that width drops below the 128-token kernel block, only frame pairs
    with ``dt % (128 / width) == 0`` are kept (``get_diagonal_split_mask``). Inferred here,
    at token granularity: the thresholds ``ds * P < window`` and ``ceil(P / window)`` (the
    "thin the diagonal once the band is one token wide" reading, with ``window`` in place of
    the power-of-two-rounded frame size times ``decay_factor``). Not reproduced: the
    128-token minimum band, the 128 x 128 block quantisation by a density heuristic, and the
    Wan2.1 first-frame sink (compose ``| Sinks(frame_size)`` for that).

    Block layout: from the tiles' flat bounds, frame and in-frame ranges (a tile that spans
    several frames is taken to cover every in-frame position), one pass per band of ``dt``
    (O(log(number of frames)) passes over the tile pairs). Exact when every tile lies in one
    frame (1-D tiles whose size divides ``frame_size``, and ``S - L`` a multiple of it).
    """

    def __init__(self, frame_size: int, window: int | None = None) -> None:
        self.frame_size = check_int("frame_size", frame_size, 1)
        self.window = frame_size if window is None else check_int("window", window, 1)

    def mask(
        self,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
        geometry: Geometry,
    ) -> torch.Tensor:
        f = self.frame_size
        qi = q_idx + geometry.causal_offset
        t_q, s_q = torch.div(qi, f, rounding_mode="floor"), torch.remainder(qi, f)
        t_k, s_k = torch.div(kv_idx, f, rounding_mode="floor"), torch.remainder(kv_idx, f)
        dt = (t_q - t_k).abs()
        ds = (s_q - s_k).abs()
        p = pow2_floor(dt)
        band = (p <= self.window) & (ds * p < self.window)
        diag = (ds == 0) & (torch.remainder(dt, _ceil_div(p, self.window)) == 0)
        return band | diag

    def block_layout(self, tiling: Tiling) -> BlockLayout:
        w = self.window
        off = tiling.geometry.causal_offset
        q_lo, q_hi, _ = tiling.q_flat_bounds
        kv_lo, kv_hi, _ = tiling.kv_flat_bounds
        tq0, tq1, sq0, sq1 = self._frame_ranges(q_lo + off, q_hi + off)
        tk0, tk1, sk0, sk1 = self._frame_ranges(kv_lo, kv_hi)
        tq0, tq1, sq0, sq1 = (x[:, None] for x in (tq0, tq1, sq0, sq1))
        tk0, tk1, sk0, sk1 = (x[None, :] for x in (tk0, tk1, sk0, sk1))
        dt_min = torch.maximum(tq0 - tk1, tk0 - tq1).clamp(min=0)
        dt_max = torch.maximum(tq1 - tk0, tk1 - tq0)
        ds_min = torch.maximum(sq0 - sk1, sk0 - sq1).clamp(min=0)
        ds_max = torch.maximum(sq1 - sk0, sk1 - sq0)
        any_ = torch.zeros_like(dt_min, dtype=torch.bool)
        n_bands = max(int(dt_max.max()).bit_length(), 1)
        for r in range(n_bands):
            p = 1 << r
            lo = dt_min.clamp(min=0 if r == 0 else p)
            hi = dt_max.clamp(max=2 * p - 1)
            period = -(-p // w)
            has_diag = torch.div(hi, period, rounding_mode="floor") * period >= lo
            hit = ((p <= w) & (ds_min * p < w)) | ((ds_min == 0) & has_diag)
            any_ |= (lo <= hi) & hit
        p_min = pow2_floor(dt_min)
        single_diag = (
            (ds_max == 0) & (dt_min == dt_max)
            & (torch.remainder(dt_min, _ceil_div(p_min, w)) == 0)
        )
        p_max = pow2_floor(dt_max)
        full = ((p_max <= w) & (ds_max * p_max < w)) | single_diag
        return BlockLayout(any_, full)

    def _frame_ranges(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frame range [t0, t1] and in-frame range [s0, s1] of flat ranges [lo, hi]."""
        f = self.frame_size
        t0 = torch.div(lo, f, rounding_mode="floor")
        t1 = torch.div(hi, f, rounding_mode="floor")
        one = t0 == t1
        s0 = torch.where(one, torch.remainder(lo, f), torch.zeros_like(lo))
        s1 = torch.where(one, torch.remainder(hi, f), torch.full_like(hi, f - 1))
        return t0, t1, s0, s1

    def may_have_empty_rows(self, geometry: Geometry) -> bool:
        # the key at the query's own aligned position (dt = ds = 0) exists unless L > S
        return geometry.q_len > geometry.kv_len

    def __repr__(self) -> str:
        return f"Radial(frame_size={self.frame_size}, window={self.window})"
