"""Drift per version: the rows a version scores, against the reference kept with it.

The request path pays one `deque.append` of references to the request's matrix
and scores (`DriftWindow.observe`); nothing is copied or binned there. Every
`drift.refresh_s` a background task folds what accumulated, in a worker thread:
each input column and the scores are binned with the reference's edges
(model_store/reference.py) into per-interval count buckets, so the window slides
by dropping whole buckets. From the window's counts:

- PSI per input and of the scores: sum over bins of (p_live - p_ref) * ln(p_live / p_ref),
  with empty bins counted as EPSILON;
- explanation drift: the L1 distance between the shares of mean |SHAP| per feature
  group of live explanations (the sample another part of the pipeline explains,
  handed to `observe_explanations`) and of the reference.

A figure above its threshold, with enough rows in the window, raises a flag of
its kind (feature, score, explanation). The figures go to Prometheus gauges and to
Redis (serving/observe/drift_figures.py) for `rankgate model status` and promotion,
and, at most once per bucket of the window, into the version's drift history (a capped
stream) for `rankgate model report`; a flag newly raised is sent to the webhooks that
take drift flags, once per version, kind and window length whichever replica raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from model_store.reference import Bins, DriftReference, bin_index
from rankgate.core import redis_keys
from rankgate.core.redis_server import AsyncRedisClient
from rankgate.governance.notifications import publish_async
from serving.contract.config import DriftConfig
from serving.observe.drift_figures import HISTORY_LENGTH, DriftFigures, DriftKind
from serving.observe.metrics import ServingMetrics

EPSILON = 1e-4
"""The share an empty bin counts as (PSI is infinite otherwise)."""
WINDOW_BUCKETS = 30
"""The window is kept as this many count buckets of window_s / WINDOW_BUCKETS each."""
MAX_PENDING = 1024
"""Requests kept between two folds; beyond, the oldest are dropped (the window is then
a sample of the traffic, which proportions do not mind)."""
logger = logging.getLogger("ray.serve")


def psi(live: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins."""
    p = np.maximum(live, EPSILON)
    q = np.maximum(reference, EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def shares(values: Mapping[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in values.items()}


def l1_shift(live: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """L1 distance (0..2) between the normalized shares of two per-group totals."""
    a, b = shares(live), shares(reference)
    return float(sum(abs(a.get(g, 0.0) - b.get(g, 0.0)) for g in {*a, *b}))


class ColumnBinner:
    """Bins every column of a matrix with its own edges into one flat count vector."""

    def __init__(self, bins: Sequence[Bins]) -> None:
        self.edges = [np.asarray(b.edges, dtype=np.float64) for b in bins]
        sizes = [b.size for b in bins]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.size = int(sum(sizes))
        self.reference = np.concatenate([np.asarray(b.proportions) for b in bins])

    def counts(self, matrix: np.ndarray) -> np.ndarray:
        flat = np.empty(matrix.shape, dtype=np.int64)
        for col, edges in enumerate(self.edges):
            flat[:, col] = bin_index(matrix[:, col].astype(np.float64), edges) + self.offsets[col]
        return np.bincount(flat.ravel(), minlength=self.size)

    def psi(self, counts: np.ndarray, col: int) -> float:
        start, end = self.offsets[col], self.offsets[col] + len(self.edges[col]) + 2
        live = counts[start:end]
        return psi(live / max(live.sum(), 1), self.reference[start:end])


@dataclass
class Bucket:
    """Counts of the rows scored (and explanations observed) in one interval."""

    rows: int
    features: np.ndarray
    score: np.ndarray
    explained_rows: int
    shap: np.ndarray
    """Sum of |SHAP| per feature group."""

    def add(self, other: Bucket) -> None:
        self.rows += other.rows
        self.features += other.features
        self.score += other.score
        self.explained_rows += other.explained_rows
        self.shap += other.shap


class DriftWindow:
    """The sliding window of one loaded version (see the module docstring)."""

    def __init__(
        self,
        version: str,
        features: Sequence[str],
        groups: Sequence[str],
        reference: DriftReference | None,
        config: DriftConfig,
    ) -> None:
        self.version = version
        self.features = list(features)
        missing = [
            n for n in self.features if reference is not None and n not in reference.features
        ]
        if missing:
            # A reference of other inputs compares nothing: the version is counted, not
            # compared (drift never stops a version from serving).
            logger.warning(
                "drift reference of %s lacks its inputs %s: not compared", version, missing
            )
            reference = None
        self.reference = reference
        self.config = config
        self.pending: deque[tuple[float, np.ndarray, np.ndarray]] = deque(maxlen=MAX_PENDING)
        self.pending_explanations: deque[tuple[float, np.ndarray]] = deque(maxlen=MAX_PENDING)
        self.buckets: dict[int, Bucket] = {}
        self.bucket_s = config.window_s / WINDOW_BUCKETS
        self.group_names = list(dict.fromkeys(groups))
        # features x groups: summing |SHAP| columns per group is one product.
        self.group_matrix = np.zeros((len(groups), len(self.group_names)))
        for col, group in enumerate(groups):
            self.group_matrix[col, self.group_names.index(group)] = 1.0
        self.notified: set[DriftKind] = set()
        """Flags raised and sent to the webhooks (a flag that clears may be sent again)."""
        if reference is not None:
            self.feature_bins = ColumnBinner([reference.features[name] for name in self.features])
            self.score_bins = ColumnBinner([reference.score])

    # -- the request path: O(1) --------------------------------------------------

    def observe(self, matrix: np.ndarray, scores: np.ndarray) -> None:
        self.pending.append((time.time(), matrix, scores))

    def observe_explanations(self, contributions: np.ndarray) -> None:
        self.pending_explanations.append((time.time(), contributions))

    # -- off the request path ----------------------------------------------------

    def empty_bucket(self) -> Bucket:
        ref = self.reference is not None
        return Bucket(
            rows=0,
            features=np.zeros(self.feature_bins.size if ref else 0, dtype=np.int64),
            score=np.zeros(self.score_bins.size if ref else 0, dtype=np.int64),
            explained_rows=0,
            shap=np.zeros(len(self.group_names)),
        )

    def bucket(self, at: float) -> Bucket:
        key = int(at // self.bucket_s)
        if key not in self.buckets:
            self.buckets[key] = self.empty_bucket()
        return self.buckets[key]

    def fold(self, now: float | None = None) -> None:
        """Bin what accumulated into the buckets; drop buckets that left the window."""
        now = time.time() if now is None else now
        by_bucket: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        while self.pending:
            at, matrix, scores = self.pending.popleft()
            by_bucket.setdefault(int(at // self.bucket_s), []).append((matrix, scores))
        for key, entries in by_bucket.items():
            bucket = self.bucket(key * self.bucket_s)
            bucket.rows += sum(len(m) for m, _ in entries)
            if self.reference is not None:
                bucket.features += self.feature_bins.counts(np.concatenate([m for m, _ in entries]))
                scores = np.concatenate([s for _, s in entries]).reshape(-1, 1)
                bucket.score += self.score_bins.counts(scores)
        while self.pending_explanations:
            at, contributions = self.pending_explanations.popleft()
            bucket = self.bucket(at)
            bucket.explained_rows += len(contributions)
            bucket.shap += np.abs(contributions).sum(axis=0) @ self.group_matrix
        oldest = int(now // self.bucket_s) - WINDOW_BUCKETS
        for key in [k for k in self.buckets if k <= oldest]:
            del self.buckets[key]

    def totals(self) -> Bucket:
        total = self.empty_bucket()
        for bucket in self.buckets.values():
            total.add(bucket)
        return total

    def figures(self, now: float | None = None) -> DriftFigures:
        """Fold, then compare the window with the reference."""
        self.fold(now)
        total, config = self.totals(), self.config
        figures = DriftFigures(
            version=self.version,
            at=time.time() if now is None else now,
            window_s=config.window_s,
            rows=total.rows,
            has_reference=self.reference is not None,
            explained_rows=total.explained_rows,
            thresholds={
                "feature_psi": config.feature_psi,
                "score_psi": config.score_psi,
                "explanation_shift": config.explanation_shift,
                "min_rows": config.min_rows,
            },
        )
        if self.reference is None:
            return figures
        if total.rows:
            figures.feature_psi = {
                name: round(self.feature_bins.psi(total.features, col), 6)
                for col, name in enumerate(self.features)
            }
            figures.score_psi = round(self.score_bins.psi(total.score, 0), 6)
        if total.explained_rows and self.reference.shap_groups:
            live = dict(zip(self.group_names, (float(v) for v in total.shap), strict=True))
            figures.explanation_drift = round(l1_shift(live, self.reference.shap_groups), 6)
        figures.flags = self.flags(figures)
        return figures

    def flags(self, figures: DriftFigures) -> list[DriftKind]:
        config, flags = self.config, list[DriftKind]()
        if figures.rows >= config.min_rows:
            if figures.feature_psi and max(figures.feature_psi.values()) > config.feature_psi:
                flags.append("feature")
            if figures.score_psi is not None and figures.score_psi > config.score_psi:
                flags.append("score")
        if (
            figures.explained_rows >= config.min_explained_rows
            and figures.explanation_drift is not None
            and figures.explanation_drift > config.explanation_shift
        ):
            flags.append("explanation")
        return flags


@dataclass(frozen=True)
class VersionInputs:
    """What a window needs of a loaded version."""

    features: list[str]
    groups: list[str]
    reference: DriftReference | None


class DriftMonitor:
    """The drift windows of a replica's loaded versions, their metrics and their
    figures in Redis. One per replica: windows outlive a reconfigure that keeps
    the version (and the window length)."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.config = DriftConfig()
        self.windows: dict[str, DriftWindow] = {}
        self.history_at: dict[str, float] = {}
        """When each version's figures last went into its drift history."""
        self.refresher: asyncio.Task[None] | None = None

    def use(self, config: DriftConfig, versions: Mapping[str, VersionInputs]) -> None:
        """Windows for `versions` under `config` (called by `reconfigure`)."""
        windows = {}
        for version, inputs in versions.items():
            window = self.windows.get(version)
            if (
                window is None
                or window.config.window_s != config.window_s
                or window.reference != inputs.reference
            ):
                window = DriftWindow(
                    version, inputs.features, inputs.groups, inputs.reference, config
                )
            window.config = config
            windows[version] = window
        for version, window in self.windows.items():
            if version not in windows:
                self.forget(window)
        self.config, self.windows = config, windows

    def observe(self, version: str, matrix: np.ndarray, scores: np.ndarray) -> None:
        window = self.windows.get(version)
        if window is not None:
            window.observe(matrix, scores)

    def observe_explanations(self, version: str, contributions: np.ndarray) -> None:
        window = self.windows.get(version)
        if window is not None:
            window.observe_explanations(contributions)

    def refresh(self, now: float | None = None) -> list[DriftFigures]:
        """Fold every window and publish its figures as metrics."""
        figures = [window.figures(now) for window in list(self.windows.values())]
        for f in figures:
            self.publish(f)
        return figures

    def publish(self, figures: DriftFigures) -> None:
        m, version = self.metrics, figures.version
        m.drift_rows.labels(version).set(figures.rows)
        if not figures.has_reference:
            return
        for name, value in figures.feature_psi.items():
            m.feature_psi.labels(version, name).set(value)
        if figures.score_psi is not None:
            m.score_psi.labels(version).set(figures.score_psi)
        if figures.explanation_drift is not None:
            m.explanation_drift.labels(version).set(figures.explanation_drift)
        for kind in ("feature", "score", "explanation"):
            m.drift_flag.labels(version, kind).set(1.0 if kind in figures.flags else 0.0)

    def forget(self, window: DriftWindow) -> None:
        """A version left the routing: its series stop."""
        m, version = self.metrics, window.version
        with contextlib.suppress(KeyError):
            m.drift_rows.remove(version)
        for gauge in (m.score_psi, m.explanation_drift):
            with contextlib.suppress(KeyError):
                gauge.remove(version)
        for name in window.features:
            with contextlib.suppress(KeyError):
                m.feature_psi.remove(version, name)
        for kind in ("feature", "score", "explanation"):
            with contextlib.suppress(KeyError):
                m.drift_flag.remove(version, kind)

    # -- the background task -------------------------------------------------------

    def keep_fresh(self, client: AsyncRedisClient, namespace: str) -> None:
        """Fold, publish and write the figures every `refresh_s` from now on."""
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(client, namespace)
            )

    async def _refresh_forever(self, client: AsyncRedisClient, namespace: str) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.refresh_and_write(client, namespace)
            except Exception:  # drift monitoring never stops: the next round retries
                logger.exception("drift refresh failed")

    async def refresh_and_write(
        self, client: AsyncRedisClient, namespace: str
    ) -> list[DriftFigures]:
        # Binning thousands of rows takes milliseconds: off the event loop.
        figures = await asyncio.to_thread(self.refresh)
        ttl = int(self.config.window_s)
        historic = self.due_for_history(figures)
        with contextlib.suppress(OSError, aioredis.RedisError):
            async with client.pipeline(transaction=False) as pipe:
                for f in figures:
                    key = redis_keys.drift(namespace, f.version)
                    pipe.delete(key)
                    pipe.hset(key, mapping=f.to_hash())  # type: ignore[arg-type]
                    pipe.expire(key, ttl)
                for f in historic:
                    pipe.xadd(
                        redis_keys.drift_history(namespace, f.version),
                        f.to_hash(),  # type: ignore[arg-type]
                        maxlen=HISTORY_LENGTH,
                        approximate=True,
                    )
                await pipe.execute()
        await self.notify_flags(client, namespace, figures)
        return figures

    async def notify_flags(
        self, client: AsyncRedisClient, namespace: str, figures: Sequence[DriftFigures]
    ) -> None:
        """Send each flag newly raised in a window to the webhooks that take drift flags:
        once per version, kind and `window_s` across replicas (the first to raise it)."""
        for f in figures:
            window = self.windows.get(f.version)
            if window is None:
                continue
            window.notified &= set(f.flags)
            for kind in [k for k in f.flags if k not in window.notified]:
                data = {
                    "version": f.version,
                    "flag": kind,
                    "flags": list(f.flags),
                    "rows": f.rows,
                    "window_s": f.window_s,
                    "top_feature_psi": dict(f.top_features(5)),
                    "score_psi": f.score_psi,
                    "explanation_drift": f.explanation_drift,
                    "thresholds": f.thresholds,
                }
                text = f"Drift flag '{kind}' raised for model version {f.version}: {f.describe()}"
                topic = f"drift_flag:{f.version}:{kind}:{f.window_s:g}"
                if await publish_async(
                    client, namespace, "drift_flag", text, data, once=topic, once_s=f.window_s
                ):
                    window.notified.add(kind)
                else:
                    self.metrics.notifications_unpublished.labels("drift_flag").inc()

    def due_for_history(self, figures: list[DriftFigures]) -> list[DriftFigures]:
        """The figures of versions whose last history entry is a window bucket old (a
        refresh every few seconds would fill the history with near-copies); an empty
        window (a version loaded but not scoring) has no figures to keep."""
        due = []
        for f in figures:
            if f.rows == 0:
                continue
            window = self.windows.get(f.version)
            spacing = window.bucket_s if window is not None else self.config.window_s
            if f.at - self.history_at.get(f.version, float("-inf")) >= spacing:
                self.history_at[f.version] = f.at
                due.append(f)
        return due
