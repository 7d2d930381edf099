"""The ``attnlab`` command.

    attnlab list [--family core] [--json]     the catalog
    attnlab bench [--full] [--repeats N]      attnlab against its peers (quick by default)
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import kernels

    argv = ["--repeats", str(args.repeats), "--device", args.device]
    if not args.full:
        argv.append("--quick")
    if args.json:
        argv += ["--json", args.json]
    return kernels.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description="attention mechanisms behind one API")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="list every registered mechanism with its paper")
    pl.add_argument("--family", default=None, help="only this family (e.g. core)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=_cmd_list)
    pb = sub.add_parser("bench", help="benchmark attnlab against SDPA, FlexAttention and NATTEN")
    pb.add_argument("--full", action="store_true", help="the issue's full sizes (several minutes)")
    pb.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    pb.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pb.add_argument("--json", default=None, metavar="PATH", help="also write figures as JSON")
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
