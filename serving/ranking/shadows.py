"""Shadow versions: each scores a copy of a model-ranked request off the response path.

A shadow never answers. Its rows feed its drift windows, and its agreement with
the live answer (overlap of the top k, mean score difference on the live items)
is recorded for `rankgate model status` (serving/observe/routing_log.py). A shadow
that fails is counted and recorded as such; the answer never knows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import redis.asyncio as aioredis

from features.vector import build_matrix
from rankgate.core.project import ItemId
from rankgate.core.topk import top_k
from serving.observe.drift import DriftMonitor
from serving.observe.metrics import ServingMetrics
from serving.observe.routing_log import RoutingLog
from serving.ranking.feature_fetch import FeatureFetcher, UserFeatures
from serving.ranking.ranker import ModelSet, ModelUnavailable

logger = logging.getLogger("ray.serve")


class ShadowScorer:
    """Scores shadows of one serving config."""

    def __init__(
        self,
        models: ModelSet,
        fetcher: FeatureFetcher,
        log: RoutingLog,
        metrics: ServingMetrics,
        drift: DriftMonitor | None,
    ) -> None:
        self.models = models
        self.fetcher = fetcher
        self.log = log
        self.metrics = metrics
        self.drift = drift

    async def score(
        self,
        version: str,
        user: UserFeatures,
        eligible: Sequence[ItemId],
        live: list[tuple[ItemId, float]],
        context: Mapping[str, str],
    ) -> None:
        """Score a copy of the request with `version`; record agreement with the live
        answer: (top-k overlap, mean score difference), or (None, None) when it failed."""
        agreement: tuple[float | None, float | None] = (None, None)
        model = self.models.loaded.get(version)
        try:
            if model is None:
                raise ModelUnavailable(self.models.errors.get(version, version))
            matrix = build_matrix(model.specs, user.values, self.fetcher.items, eligible, context)
            scores = model.scorer.score(matrix)
            if self.drift is not None:
                self.drift.observe(version, matrix, scores)
            agreement = compare(eligible, scores, live)
        except Exception as exc:  # noqa: BLE001 - a shadow's failure never reaches the answer
            logger.warning("shadow %s failed: %s", version, type(exc).__name__)
        outcome = "error" if agreement[0] is None else "ok"
        self.metrics.child(self.metrics.shadow_scores, version, outcome).inc()
        with contextlib.suppress(OSError, aioredis.RedisError):
            await self.log.record_shadow(version, *agreement)


def compare(
    eligible: Sequence[ItemId], scores: np.ndarray, live: list[tuple[ItemId, float]]
) -> tuple[float, float]:
    """The shadow's top-k overlap with the live answer, and its mean score difference
    on the live items."""
    k = len(live)
    if not k:
        return 1.0, 0.0
    shadow_top = {pick.item_id for pick in top_k(eligible, scores, k)}
    overlap = len(shadow_top & {item for item, _ in live}) / k
    position = {item: n for n, item in enumerate(eligible)}
    diff = float(np.mean([abs(scores[position[item]] - score) for item, score in live]))
    return overlap, diff
