"""Summaries of repeated measurements: median, p95/p99 (nearest rank), min, max."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least pct% of samples at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(seconds: Sequence[float], rss_kib: Sequence[int] = (), failures: int = 0) -> dict[str, Any]:
    """Milliseconds (and peak RSS in MiB over the repetitions, when measured)."""
    out: dict[str, Any] = {"n": len(seconds), "failures": failures}
    if seconds:
        ms = [s * 1000 for s in seconds]
        out.update(
            median_ms=round(statistics.median(ms), 2),
            p95_ms=round(percentile(ms, 95), 2),
            p99_ms=round(percentile(ms, 99), 2),
            min_ms=round(min(ms), 2),
            max_ms=round(max(ms), 2),
        )
    if rss_kib:
        out["peak_rss_mib"] = round(max(rss_kib) / 1024, 1)
        out["median_rss_mib"] = round(statistics.median(rss_kib) / 1024, 1)
    return out
