"""What every part of `rankgate bench` shares: the names of the two systems whose
ratio is judged, and the median with spread of per-round figures."""

from __future__ import annotations

import statistics
from typing import Any

OURS = "rankgate"
FLOOR = "plain_fastapi"


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
