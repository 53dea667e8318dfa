"""``scripts/bench``: argument handling, the run's order, clean-up on any exit, and the output."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import cri, report
from .items import ITEMS, Bench, load_average, machine


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None, repo: Path) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Pod-start cost of the CNI plugin and the init container, against a reference floor, "
        "under concurrency and at scale. Runs as root; sets up everything it needs.",
    )
    ap.add_argument("--reps", type=int, help="repetitions of each item (default 30; 2 with --quick)")
    ap.add_argument("--concurrency", type=int, help="ADDs started at once (default 50; 3 with --quick)")
    ap.add_argument("--json", default=str(repo / "bench-results" / "bench.json"),
                    help="where to write the figures (default bench-results/bench.json)")  # fmt: skip
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 repetitions, concurrency 3, fewer profiling runs"
    )
    ap.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 30
    if args.concurrency is None:
        args.concurrency = 3 if args.quick else 50
    items = tuple(i.strip() for i in args.items.split(",") if i.strip())
    unknown = [i for i in items if i not in ITEMS]
    if unknown or args.reps < 1 or args.concurrency < 1:
        ap.error(f"unknown items {unknown}" if unknown else "--reps and --concurrency must be at least 1")
    args.items = items
    return args


def main(argv: list[str] | None = None, repo: Path | None = None) -> int:
    repo = repo or Path(__file__).resolve().parent.parent
    args = parse_args(argv, repo)
    if os.geteuid() != 0:
        _log("must run as root (it creates network namespaces and loads iptables rules)")
        return 2
    # SIGINT too: a shell starts background jobs with it ignored, and Ctrl-C must still clean up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    bench = Bench(repo, reps=args.reps, concurrency=args.concurrency, quick=args.quick, items=args.items)
    bench.info["machine"] = machine()
    try:
        _log("setting up (TLS API server, kubeconfig, classic rules)")
        bench.setup()
        _log(f"{args.reps} rounds of the per-run items")
        bench.rounds(_log)
        if "concurrency" in args.items:
            bench.concurrency_item(_log)
        if "connrate" in args.items:
            bench.connrate_item(_log)
        if "cri" in args.items:
            bench.status["cri"] = cri.cri_item(bench, _log)
        planning = None
        if "scale" in args.items:
            planning = bench.planning_item()
            _log("planned at scale")
        prof = bench.breakdown(_log) if "cni" in args.items else {}
    except KeyboardInterrupt:
        _log("interrupted; cleaning up")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            bench.teardown()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    bench.info["machine"]["load_average_at_end"] = load_average()
    doc = report.build(bench, planning, prof)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(report.table(doc))
    print(f"\nJSON: {path}")
    return 1 if doc["failures"] else 0
