"""The sweep planner of the efficiency suite: which (mechanism, pattern, length) to measure.

The four attention patterns are CAB's ("CAB: Comprehensive Attention Benchmarking on Long
Sequence Modeling", 2023): non-causal self, causal self, non-causal cross and causal cross.
Cross attention here has ``S = L // 2`` keys for ``L`` queries (:func:`cross_length`: a
decoder attending to a shorter encoded context; causal cross is bottom-right aligned, key
``j`` visible to query ``i`` iff ``j <= i + S - L``, as everywhere in attnlab).

Which patterns a mechanism gets (:func:`supported_patterns`), from its catalog row and
its ``example`` built at :data:`PROBE_LENGTH` tokens:

- only ``kind`` in ``kinds`` (``"pattern"``/``"score_mod"``/``"operator"``) and 1-D mechanisms
  (``1 in ndims``): the sweep is over sequence lengths;
- an ``"operator"`` row (linear, spectral, ...) gets the patterns its flags allow (``causal``,
  ``noncausal``, ``cross``); its problem carries ``Causal()`` or ``Full()`` only as a label;
- the example must accept the problem (its pattern's and score mod's ``validate`` do not
  raise for these ``heads``/``head_dim``); cross variants also need ``mechanism.cross`` and
  an example that accepts ``S != L`` (a self-only example, e.g. document ids without
  ``kv_ids``, gets no cross variant);
- an example whose mask is already causal (every visible pair has ``j <= i + S - L``,
  e.g. ``Causal()``, ``SlidingWindow(left=w, right=0)``, ``x & Causal()``) gets no
  non-causal variant: it would be mislabelled. Its causal variants run it unchanged;
- otherwise causal variants need ``mechanism.causal`` and run ``example & Causal()``
  (``Causal()`` alone for a ``Full``/absent example, so dense problems can still use SDPA).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import registry
from ..geometry import Geometry
from ..patterns import Causal, Full
from ..patterns.base import as_pattern
from ..patterns.content import has_content, resolve_pattern
from ..registry import Mechanism

NONCAUSAL_SELF = "noncausal-self"
CAUSAL_SELF = "causal-self"
NONCAUSAL_CROSS = "noncausal-cross"
CAUSAL_CROSS = "causal-cross"
ALL_FOUR: tuple[str, ...] = (NONCAUSAL_SELF, CAUSAL_SELF, NONCAUSAL_CROSS, CAUSAL_CROSS)
PLANNABLE_KINDS: tuple[str, ...] = ("pattern", "score_mod", "operator")
PROBE_LENGTH = 128  # tokens of the example on which causality and cross support are probed
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def cross_length(L: int) -> int:
    """Keys of a cross-attention problem with ``L`` queries: ``L // 2``."""
    return L // 2


@dataclass(frozen=True)
class Measurement:
    """One efficiency measurement: a mechanism on one CAB pattern at ``L`` queries and
    ``S`` keys (``S == L`` for self, ``cross_length(L)`` for cross attention)."""

    mechanism: str
    pattern: str
    L: int
    S: int
    dtype: str
    device: str
    batch: int
    heads: int
    head_dim: int

    @property
    def causal(self) -> bool:
        return self.pattern.startswith("causal")

    @property
    def cross(self) -> bool:
        return self.pattern.endswith("cross")

    @property
    def key(self) -> str:
        """Stable id, e.g. ``sliding_window|causal-self|L=4096|S=4096|float32|cpu|B1H8D64``."""
        return (f"{self.mechanism}|{self.pattern}|L={self.L}|S={self.S}|{self.dtype}|{self.device}"
                f"|B{self.batch}H{self.heads}D{self.head_dim}")

    def config(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the ``config`` of a stored record)."""
        return asdict(self)


def _mechanism(m: Mechanism | str, name: str = "mechanism") -> Mechanism:
    if isinstance(m, str):
        return registry.get(m)
    if not isinstance(m, Mechanism):
        raise TypeError(f"{name} must be a Mechanism or a catalog name, got {name}={m!r}")
    return m


def _pos_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return value


def _example(mech: Mechanism, L: int, heads: int, seed: int) -> tuple[Any, Any]:
    """``mech.example((L,), heads)`` with the global RNG seeded and then restored, so learned
    score-mod tables are the same on every call and the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mech.example((L,), heads)


def _geometry(L: int, S: int, heads: int, head_dim: int = 1) -> Geometry:
    return Geometry(1, heads, heads, (L,), (S,), head_dim, head_dim, torch.device("cpu"))


def example_is_causal(mechanism: Mechanism | str, heads: int = 8) -> bool:
    """Whether the example's mask at ``PROBE_LENGTH`` self-attention (every head) shows only
    causal pairs ``j <= i``, i.e. the example already includes causality."""
    mech = _mechanism(mechanism)
    pattern = as_pattern(_example(mech, PROBE_LENGTH, heads, 0)[0])
    if type(pattern) is Full:
        return False
    n = PROBE_LENGTH
    if has_content(pattern):  # its selection on random probe inputs
        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, heads, n, 8, generator=gen) for _ in range(2))
        pattern = resolve_pattern(pattern, q, k)
    qi, kv = torch.arange(n).view(1, 1, -1, 1), torch.arange(n).view(1, 1, 1, -1)
    mask = pattern.mask(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(heads).view(1, -1, 1, 1),
                        qi, kv, _geometry(n, n, heads))
    return not bool((mask & (kv > qi)).any())


def _accepts(mech: Mechanism, S: int, heads: int, head_dim: int) -> bool:
    """Whether the example's pattern and score mod accept ``PROBE_LENGTH`` queries, ``S`` keys."""
    pattern, score_mod = _example(mech, PROBE_LENGTH, heads, 0)
    geom = _geometry(PROBE_LENGTH, S, heads, head_dim)
    try:
        for part in (pattern, score_mod):
            if part is not None and hasattr(part, "validate"):
                part.validate(geom)
    except ValueError:
        return False
    return True


def supported_patterns(mechanism: Mechanism | str, patterns: Sequence[str] = ALL_FOUR,
                       heads: int = 8, head_dim: int = 64) -> tuple[str, ...]:
    """The CAB patterns of ``patterns`` (in that order) planned for ``mechanism`` by the rules
    of the module docstring; ``()`` for non-1-D mechanisms, ``kind="function"``, and examples
    that refuse even self-attention with these ``heads``/``head_dim`` (``validate`` raises)."""
    mech = _mechanism(mechanism)
    if mech.kind == "operator":  # its catalog flags say which of the four it has
        return tuple(p for p in patterns
                     if (mech.causal if p.startswith("causal") else mech.noncausal)
                     and (mech.cross or not p.endswith("cross")))
    if 1 not in mech.ndims or mech.kind not in PLANNABLE_KINDS or not _accepts(mech, PROBE_LENGTH, heads, head_dim):
        return ()
    inherent = example_is_causal(mech, heads)
    cross_ok = (mech.cross and any(p.endswith("cross") for p in patterns)
                and _accepts(mech, cross_length(PROBE_LENGTH), heads, head_dim))
    out = []
    for p in patterns:
        causal_ok = (inherent or mech.causal) if p.startswith("causal") else not inherent
        if causal_ok and (cross_ok if p.endswith("cross") else True):
            out.append(p)
    return tuple(out)


def _unique(name: str, values: Sequence[Any]) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{name} has a duplicate entry {v!r}: got {name}={list(values)!r}")
        seen.add(v)


def plan_sweep(mechanisms: Iterable[Mechanism | str], lengths: Iterable[int], *,
               patterns: Sequence[str] = ALL_FOUR, dtype: str = "float32", device: str = "cpu",
               batch: int = 1, heads: int = 8, head_dim: int = 64,
               kinds: Sequence[str] = PLANNABLE_KINDS) -> list[Measurement]:
    """Every supported (mechanism, CAB pattern, length) as a :class:`Measurement`.

    Order: lengths outermost (as given), then mechanisms (as given), then ``patterns`` (as
    given), so an interrupted run has covered every mechanism at the shorter lengths.
    Mechanisms whose ``kind`` is not in ``kinds`` are left out. Pure: the same arguments give
    the same list. Each length must be an int >= 2 (so that ``S = L // 2 >= 1``)."""
    mechs = [_mechanism(m, "mechanisms entry") for m in mechanisms]
    _unique("mechanisms", [m.name for m in mechs])
    lengths = [_pos_int("lengths entry", L, 2) for L in lengths]
    _unique("lengths", lengths)
    patterns = tuple(patterns)
    for p in patterns:
        if p not in ALL_FOUR:
            raise ValueError(f"unknown CAB pattern {p!r} in patterns={list(patterns)!r}; expected some of {ALL_FOUR}")
    _unique("patterns", patterns)
    for k in kinds:
        if k not in PLANNABLE_KINDS:
            raise ValueError(f"kinds may hold only {PLANNABLE_KINDS} (others build no attention problem), "
                             f"got kinds={tuple(kinds)!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got dtype={dtype!r}")
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got device={device!r}")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device={device!r}: {e}") from None
    batch, heads, head_dim = _pos_int("batch", batch), _pos_int("heads", heads), _pos_int("head_dim", head_dim)
    supported = {m.name: supported_patterns(m, patterns, heads, head_dim) if m.kind in kinds else () for m in mechs}
    return [Measurement(m.name, p, L, cross_length(L) if p.endswith("cross") else L, dtype, device,
                        batch, heads, head_dim)
            for L in lengths for m in mechs for p in supported[m.name]]


def pending(plan: Iterable[Measurement], done_keys: Collection[str]) -> list[Measurement]:
    """The measurements of ``plan`` (in order) whose ``key`` is not in ``done_keys``."""
    done = set(done_keys)
    return [m for m in plan if m.key not in done]


def build_problem(measurement: Measurement, mechanism: Mechanism | str, *, seed: int = 0,
                  requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Any]:
    """``(q, k, v, pattern, score_mod)`` for ``measurement``.

    ``q`` is ``(B, H, L, D)``, ``k``/``v`` ``(B, H, S, D)``, standard normal from a CPU
    generator seeded with ``seed``, then cast to the measurement's dtype and device (leaf
    tensors, with ``requires_grad`` as given). ``pattern, score_mod`` come from
    ``mechanism.example((L,), heads)`` (global RNG seeded with ``seed`` and restored; the score
    mod moved to the device); causal variants add ``Causal()`` unless the example is causal
    already (see the module docstring). The same arguments give equal tensors and tables."""
    if not isinstance(measurement, Measurement):
        raise TypeError(f"measurement must be a Measurement, got measurement={measurement!r}")
    mech = _mechanism(mechanism)
    if mech.name != measurement.mechanism:
        raise ValueError(f"mechanism={mech.name!r} does not match measurement.mechanism={measurement.mechanism!r}")
    _pos_int("seed", seed, 0)
    m = measurement
    pattern, score_mod = _example(mech, m.L, m.heads, seed)
    if mech.kind == "operator":  # not a pattern: the operator is built by the case
        pattern = Causal() if m.causal else Full()
    elif m.causal and not example_is_causal(mech, m.heads):
        pattern = as_pattern(pattern)
        pattern = Causal() if type(pattern) is Full else pattern & Causal()
    if isinstance(score_mod, torch.nn.Module):
        score_mod = score_mod.to(m.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, m.dtype)

    def make(n: int) -> torch.Tensor:
        x = torch.randn(m.batch, m.heads, n, m.head_dim, generator=g).to(device=m.device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = make(m.L), make(m.S), make(m.S)
    return q, k, v, pattern, score_mod
