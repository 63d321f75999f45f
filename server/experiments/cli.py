"""`steerserve experiments`: reports and listings straight from the experiment store.

    steerserve experiments report NAME [--version N] [--plot out.png] [--json]
    steerserve experiments list

Reads the database the servers write (`--database-url`, default as `steerserve serve`'s),
so it works with the servers down and sees every replica's data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .report import format_report, plot_report
from .service import report
from .store import DEFAULT_DATABASE_URL, ExperimentStore, StoreError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=os.environ.get("STEERSERVE_DATABASE_URL") or DEFAULT_DATABASE_URL,
        help=f"the servers' experiment store (default {DEFAULT_DATABASE_URL})",
    )
    parser = argparse.ArgumentParser(prog="steerserve experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report", parents=[common], help="per-arm results of one experiment version"
    )
    rep.add_argument("name")
    rep.add_argument("--version", type=int, default=None, help="default: the current one")
    rep.add_argument("--plot", metavar="PNG", help="also draw each metric per arm")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("list", parents=[common], help="experiments, their status and version")
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    store = ExperimentStore(args.database_url)
    try:
        if args.command == "list":
            for r in store.all():
                arms = ", ".join(f"{a.name}:{a.weight:g}" for a in r.definition.arms)
                print(f"{r.name:24} v{r.version:<3} {r.status:8} {arms}")
            return
        try:
            rep = report(store, args.name, args.version)
        except StoreError as e:
            sys.exit(f"steerserve experiments: {e}")
        print(json.dumps(rep, indent=2) if args.json else format_report(rep))
        if args.plot:
            plot_report(rep, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
    finally:
        store.close()
