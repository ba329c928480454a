"""Rule-based fallback: smoothed popularity from the project's interaction log, or a
static ranking, with business boosts.

Built once per policy revision (fallback.yaml of the project's policies); a
ranking costs microseconds and needs no other service, so it is always there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankgate.core.errors import ConfigError
from rankgate.core.project import ItemId, Project
from rankgate.core.topk import top_k
from rankgate.governance.policy import FallbackRules


def popularity(
    rules: FallbackRules, project: Project, log_path: Path | None
) -> dict[ItemId, float]:
    """(outcomes + prior) / (impressions + prior) per item of the interaction log."""
    from features.tables import read_table

    log = project.spec.interactions
    if log is None or log_path is None:
        raise ConfigError(
            f"{project.policies / 'fallback.yaml'}: field 'strategy': popularity needs the "
            f"project's interaction log ({project.file}: interactions), or use strategy static"
        )
    frame = read_table(log_path, [log.item_column, log.outcome_column])
    stats = frame.groupby(log.item_column)[log.outcome_column].agg(["sum", "count"])
    ctr = (stats["sum"] + rules.prior_clicks) / (stats["count"] + rules.prior_impressions)
    return {project.item_id(i): float(s) for i, s in ctr.items()}


class RuleFallback:
    def __init__(self, rules: FallbackRules, project: Project, log_path: Path | None) -> None:
        """`log_path`: the interaction log (features.tables.serving_files), if the project has one."""
        self.rules = rules
        self._sorted: dict[int, tuple[list[ItemId], list[tuple[ItemId, float]]]] = {}
        if rules.strategy == "static":
            # Best first: the first item scores 1, the last above 0; the rest score 0.
            n = len(rules.ranking)
            self.score_of = {item: (n - pos) / n for pos, item in enumerate(rules.ranking)}
            self.default_score = 0.0
        else:
            self.score_of = popularity(rules, project, log_path)
            self.default_score = rules.prior_clicks / rules.prior_impressions
        for boost in rules.boosts:
            for item in boost.items:
                self.score_of[item] = self.score_of.get(item, self.default_score) * boost.factor

    @property
    def strategy(self) -> str:
        return self.rules.strategy

    def rank_many(self, item_ids: list[ItemId], k: int) -> list[tuple[ItemId, float]]:
        """`rank` of a large list that is ranked again and again (the allowed catalogue
        of requests without candidates): sorted once per list, then a slice."""
        cached = self._sorted.get(id(item_ids))
        if cached is None or cached[0] is not item_ids:
            if len(self._sorted) >= 64:
                self._sorted.clear()
            cached = (item_ids, self.rank(item_ids, len(item_ids)))
            self._sorted[id(item_ids)] = cached
        return cached[1][:k]

    def scores(self, item_ids: Sequence[ItemId]) -> np.ndarray:
        return np.array([self.score_of.get(i, self.default_score) for i in item_ids])

    def rank(self, item_ids: Sequence[ItemId], k: int) -> list[tuple[ItemId, float]]:
        """Top-k (item, score), best first (rankgate.core.topk)."""
        return [(pick.item_id, pick.score) for pick in top_k(item_ids, self.scores(item_ids), k)]
