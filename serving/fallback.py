"""Rule-based fallback: smoothed popularity from the logs, with business boosts.

Built once from the impression logs of the home and policies/fallback.yaml; a
ranking costs microseconds and needs no other service, so it is always there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rankgate.policy import FallbackRules


class PopularityFallback:
    def __init__(self, rules: FallbackRules, impressions_path: Path) -> None:
        self.rules = rules
        logs = pd.read_parquet(impressions_path, columns=["item_id", "click"])
        stats = logs.groupby("item_id")["click"].agg(["sum", "count"])
        ctr = (stats["sum"] + rules.prior_clicks) / (stats["count"] + rules.prior_impressions)
        self.score_of: dict[int, float] = {int(i): float(s) for i, s in ctr.items()}
        self.default_score = rules.prior_clicks / rules.prior_impressions
        for boost in rules.boosts:
            for item in boost.items:
                self.score_of[item] = self.score_of.get(item, self.default_score) * boost.factor

    @property
    def strategy(self) -> str:
        return self.rules.strategy

    def scores(self, item_ids: Sequence[int]) -> np.ndarray:
        return np.array([self.score_of.get(int(i), self.default_score) for i in item_ids])

    def rank(self, item_ids: Sequence[int], k: int) -> list[tuple[int, float]]:
        """Top-k (item, score), best first; ties broken by item id for stable answers."""
        scores = self.scores(item_ids)
        order = sorted(range(len(item_ids)), key=lambda n: (-scores[n], item_ids[n]))[:k]
        return [(int(item_ids[n]), float(scores[n])) for n in order]
