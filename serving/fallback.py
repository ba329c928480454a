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
from serving.topk import Item, plain_item_id, top_k


class PopularityFallback:
    def __init__(self, rules: FallbackRules, impressions_path: Path) -> None:
        self.rules = rules
        logs = pd.read_parquet(impressions_path, columns=["item_id", "click"])
        stats = logs.groupby("item_id")["click"].agg(["sum", "count"])
        ctr = (stats["sum"] + rules.prior_clicks) / (stats["count"] + rules.prior_impressions)
        self.score_of: dict[int | str, float] = {plain_item_id(i): float(s) for i, s in ctr.items()}
        self.default_score = rules.prior_clicks / rules.prior_impressions
        for boost in rules.boosts:
            for item in boost.items:
                self.score_of[item] = self.score_of.get(item, self.default_score) * boost.factor

    @property
    def strategy(self) -> str:
        return self.rules.strategy

    def scores(self, item_ids: Sequence[Item]) -> np.ndarray:
        return np.array([self.score_of.get(i, self.default_score) for i in item_ids])

    def rank(self, item_ids: Sequence[Item], k: int) -> list[tuple[Item, float]]:
        """Top-k (item, score), best first (serving.topk)."""
        return [(pick.item_id, pick.score) for pick in top_k(item_ids, self.scores(item_ids), k)]
