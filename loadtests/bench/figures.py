"""What every part of `rankgate bench` shares: the names of the two systems whose
ratio is judged, the median with spread of per-round figures, and a system's peak."""

from __future__ import annotations

import statistics
from typing import Any

OURS = "rankgate"
FLOOR = "plain_fastapi"
PEAK_P99_MS = 50.0
"""A level counts towards a system's peak throughput when its p99 is within this."""


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, lowest and highest of per-round figures (and the figures)."""
    if not values:
        return {"median": None, "min": None, "max": None, "per_round": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "per_round": [round(v, digits) for v in values],
    }


def peak(rows: list[dict[str, Any]], p99_max: float = PEAK_P99_MS) -> dict[str, Any]:
    """The best req/s among levels whose p99 ≤ p99_max without errors, and its level."""
    within = [r for r in rows if r["p99_ms"] <= p99_max and r["errors"] == 0]
    if not within:
        return {"rps": 0.0, "concurrency": None}
    best = max(within, key=lambda r: r["throughput_rps"])
    return {"rps": best["throughput_rps"], "concurrency": best["concurrency"]}


def at_level(rows: list[dict[str, Any]], level: int) -> dict[str, Any] | None:
    """The row of one concurrency level, if measured."""
    return next((r for r in rows if r["concurrency"] == level), None)
