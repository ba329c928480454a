"""A version's drift figures as replicas write them to Redis and the CLI reads them.

Plain Python (no numpy): `rankgate model status` and `rankgate model promote` read
them in a process that must start fast. serving/observe/drift.py computes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from rankgate.core import redis_keys
from rankgate.core.redis_server import RedisClient

DriftKind = Literal["feature", "score", "explanation"]
KINDS: tuple[DriftKind, ...] = ("feature", "score", "explanation")
TOP_FEATURES = 3
HISTORY_LENGTH = 10_000
"""Entries a version's drift history keeps (the newest; trimmed approximately): at the
default window of an hour, one entry per replica every 2 minutes, about two weeks."""


@dataclass
class DriftFigures:
    """One version's drift over the sliding window of one replica."""

    version: str
    at: float
    """When it was computed (epoch seconds)."""
    window_s: float
    rows: int
    """Scored rows (candidate items) in the window."""
    has_reference: bool
    """False: the version was registered without a reference; nothing is compared."""
    feature_psi: dict[str, float] = field(default_factory=dict)
    score_psi: float | None = None
    explanation_drift: float | None = None
    """L1 distance of the shares of mean |SHAP| per feature group (None: nothing to compare)."""
    explained_rows: int = 0
    flags: list[DriftKind] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)

    def top_features(self, count: int = TOP_FEATURES) -> list[tuple[str, float]]:
        ranked = sorted(self.feature_psi.items(), key=lambda item: -item[1])
        return ranked[:count]

    def describe(self) -> str:
        """One line for people: rows, the most drifted inputs, score and explanation drift, flags."""
        if not self.has_reference:
            return f"no reference ({self.rows} rows scored in the window; nothing to compare)"
        top = ", ".join(f"{name} {psi:.3f}" for name, psi in self.top_features()) or "-"
        score = "n/a" if self.score_psi is None else f"{self.score_psi:.3f}"
        explanation = (
            "n/a"
            if self.explanation_drift is None
            else f"{self.explanation_drift:.3f} ({self.explained_rows} explained rows)"
        )
        flags = ", ".join(self.flags) if self.flags else "none"
        return (
            f"{self.rows} rows in {self.window_s:g} s window; top input PSI: {top}; "
            f"score PSI {score}; explanation drift {explanation}; flags: {flags}"
        )

    def to_hash(self) -> dict[str, str]:
        return {
            "at": repr(self.at),
            "window_s": repr(self.window_s),
            "rows": str(self.rows),
            "has_reference": "1" if self.has_reference else "0",
            "feature_psi": json.dumps(self.feature_psi),
            "score_psi": json.dumps(self.score_psi),
            "explanation_drift": json.dumps(self.explanation_drift),
            "explained_rows": str(self.explained_rows),
            "flags": json.dumps(self.flags),
            "thresholds": json.dumps(self.thresholds),
        }

    @classmethod
    def from_hash(cls, version: str, raw: dict[str, str]) -> DriftFigures:
        return cls(
            version=version,
            at=float(raw["at"]),
            window_s=float(raw["window_s"]),
            rows=int(raw["rows"]),
            has_reference=raw["has_reference"] == "1",
            feature_psi=json.loads(raw["feature_psi"]),
            score_psi=json.loads(raw["score_psi"]),
            explanation_drift=json.loads(raw["explanation_drift"]),
            explained_rows=int(raw["explained_rows"]),
            flags=json.loads(raw["flags"]),
            thresholds=json.loads(raw["thresholds"]),
        )

    def age_s(self) -> float:
        return max(time.time() - self.at, 0.0)


def read_history(
    client: RedisClient, namespace: str, version: str, count: int = HISTORY_LENGTH
) -> list[DriftFigures]:
    """The newest `count` entries of the version's drift history, oldest first (at most
    HISTORY_LENGTH are kept, so reading is bounded). Entries that do not parse (written
    by another release) are left out."""
    entries = client.xrevrange(redis_keys.drift_history(namespace, version), count=count)
    history = []
    for _, fields in reversed(entries):  # type: ignore[arg-type]
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            history.append(DriftFigures.from_hash(version, decoded))
        except (KeyError, ValueError):
            continue
    return history


def read_drift(client: RedisClient, namespace: str, version: str) -> DriftFigures | None:
    """The figures a replica wrote last for `version` (None: none within the window)."""
    raw = client.hgetall(redis_keys.drift(namespace, version))
    if not raw:
        return None
    decoded = {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]
    try:
        return DriftFigures.from_hash(version, decoded)
    except (KeyError, ValueError):
        return None
