"""Text formatting shared by the terminal summary, report.html and the plots: numbers,
ratios, lengths, and the environment/record counts of the header."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .records import _Data, _str, _unique_order


def fmt_sig(x: float | None, digits: int = 3, missing: str = "—") -> str:
    """``x`` with ``digits`` significant digits, fixed-point for 1e-3 <= |x| < 1e5 (``12.3``,
    ``0.0123``, ``1234``), else scientific (``1.23e-04``)."""
    if x is None:
        return missing
    if x == 0:
        return "0"
    ax = abs(x)
    if ax < 1e-3 or ax >= 1e5:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(ax)))
    r = round(x, decimals)
    if r != 0 and abs(r) >= 10 ** (math.floor(math.log10(ax)) + 1):  # 9.996 -> 10.0
        decimals = max(0, decimals - 1)
    return f"{x:.{decimals}f}"


def fmt_err(x: float | None, missing: str = "—") -> str:
    """A relative error: ``3.1e-07``."""
    return missing if x is None else f"{x:.1e}"


def fmt_ratio(x: float | None, missing: str = "—", times: str = "×") -> str:
    """A time ratio: 2 decimals from 0.1 to 10 (``0.96×``, ``1.03×``), else 2 significant
    digits below (``0.072×``) and 3 above (``12.3×``)."""
    if x is None:
        return missing
    if 0.1 <= abs(x) < 10:
        return f"{x:.2f}{times}"
    return fmt_sig(x, 2 if abs(x) < 0.1 else 3) + times


def _shorten(s: str | None, n: int, ellipsis: str = "…") -> str:
    if not s:
        return ""
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - len(ellipsis)] + ellipsis


def _env_summary(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(field, value) for the header: the most common value, with the others counted."""
    envs = [r.get("env") for r in records if isinstance(r.get("env"), Mapping)]
    out = []
    for key in ("torch", "attnlab", "python", "device", "threads", "platform", "commit"):
        vals = Counter(str(e.get(key)) for e in envs if e.get(key) is not None)  # type: ignore[union-attr]
        if not vals:
            continue
        ordered = [v for v, _ in vals.most_common()]
        if key == "commit":
            ordered = [v[:12] for v in ordered]
        text = ordered[0] + (
            f" (and {', '.join(ordered[1:3])}{', …' if len(ordered) > 3 else ''})"
            if len(ordered) > 1
            else ""
        )
        out.append((key, text))
    dtypes = _unique_order(
        _str(r["config"].get("dtype"))
        for r in records
        if isinstance(r.get("config"), Mapping) and r["config"].get("dtype")
    )
    if dtypes:
        out.append(("dtype", ", ".join(dtypes)))
    times = sorted(t for r in records if isinstance(t := r.get("time"), str) and t)
    if times:
        first, last = _fmt_time(times[0]), _fmt_time(times[-1])
        out.append(("when", first if first == last else f"{first} – {last}"))
    return out


def _fmt_time(t: str) -> str:
    try:
        d = datetime.fromisoformat(t)
    except ValueError:
        return t
    if d.tzinfo is not None:
        d = d.astimezone(timezone.utc)
        return d.strftime("%Y-%m-%d %H:%M UTC")
    return d.strftime("%Y-%m-%d %H:%M")


def _counts_text(data: _Data) -> str:
    parts = []
    if data.eff:
        parts.append(f"{len(data.eff)} efficiency")
    if data.qual:
        parts.append(f"{len(data.qual)} quality")
    return f"{len(data.records)} records" + (f" ({', '.join(parts)})" if parts else "")


def _short_len(L: int) -> str:
    return f"{L // 1024}k" if L >= 1024 and L % 1024 == 0 else str(L)
