"""Metrics of the serving replicas and the event consumer, declared once.

In a Ray Serve replica they are recorded through Ray's metrics
(`ray.serve.metrics`): Ray tags every series with its `deployment`, `replica`
and `application`, and each node's metrics agent serves the series of every
process on the node in Prometheus format on the node's metrics export port
(names prefixed `ray_`: `ray_rankgate_rank_requests_total`, ...). Ray lists the
agents of every node in its Prometheus service-discovery file
(`<session dir>/prom_metrics_service_discovery.json`), so one scrape config
covers every replica of every node, and totals are `sum by (...)` over them
(loadtests/grafana/). Anywhere else (unit tests, tools) they go to a
prometheus_client registry of this process (`registry`, `render()`).

A record through Ray costs about 6.5 us (Ray merges, checks and converts the tags
and its C++ core records them) against about 1 us for prometheus_client, and a
personalized answer makes a dozen. So a replica records as Ray Serve records its
own per-request metrics: the request path adds to the series (a lock and an
addition, about 1 us), and a thread of the replica hands the sums and values to
Ray every FLUSH_S (`python -m loadtests.metrics_cost` measures both). Ray exports
a gauge only while it is set (a value set once leaves the agent after two report
intervals), so that thread also sets every gauge again each GAUGE_REFRESH_S.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

from serving.contract.reasons import FallbackReason
from serving.contract.schemas import RankRequest, RankResponse

EVENT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""From an event's acceptance to its streaming feature (the consumer's)."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
NOTIFICATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""From a notification's publication to its delivery (retries and backoff included)."""
AGE_BUCKETS = (60, 600, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 90 * 86400, 365 * 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FLUSH_S = 1.0
"""How often a replica hands its records to Ray. Ray's core exports what it was
handed every few seconds (RAY_metrics_report_interval_ms), so handing it over ten
times a second bought nothing but 10-20 ms of the replica's CPU a second, idle
or not; once a second a Prometheus scrape sees values at most a second later."""
GAUGE_REFRESH_S = 1.0
"""How often a replica sets its gauges again: within Ray's shortest report interval (1 s)."""

logger = logging.getLogger("ray.serve")
Kind = Literal["counter", "gauge", "histogram"]


class Series(Protocol):
    """One labelled series: what the code records into."""

    def inc(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...
    def observe(self, value: float) -> None: ...


def in_serve_replica() -> bool:
    """Whether this process is a Ray Serve replica (its metrics then go through Ray)."""
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - RayServeException outside a replica; no Ray at all
        return False
    return True


class RaySeries:
    """A series of a Ray metric, recorded the way Ray Serve records its own per-request
    metrics in a replica (`_report_cached_metrics` of ray/serve/_private/replica.py):
    the request path adds to the series' pending count or values, and the replica's
    metrics thread hands them to Ray every FLUSH_S. A record through Ray costs
    microseconds (the tags are merged, checked, converted and recorded by Ray's C++
    core); the request path then pays a lock and an addition."""

    __slots__ = ("changed", "count", "lock", "metric", "record", "tags", "value", "values")

    def __init__(self, metric: Any, tags: dict[str, str], lock: threading.Lock) -> None:
        self.metric = metric
        self.tags = tags
        self.lock = lock
        self.record = direct_record(metric, tags)
        self.count: float = 0
        self.values: list[float] = []
        self.value: float | None = None
        self.changed = False

    def inc(self, amount: float = 1) -> None:
        with self.lock:
            self.count += amount

    def observe(self, value: float) -> None:
        with self.lock:
            self.values.append(value)

    def set(self, value: float) -> None:
        with self.lock:
            self.value, self.changed = value, True

    def flush(self, gauges_due: bool) -> None:
        """Hand Ray what was recorded since the last flush. Ray takes only positive
        increments and int or float values (not numpy's); a gauge is set again when
        due, because Ray exports a gauge only while it is set."""
        with self.lock:
            count, values, value, changed = self.count, self.values, self.value, self.changed
            self.count, self.values, self.changed = 0, [], False
        record = self.record
        if record is not None:  # the tags were merged and checked once, when made
            if count:
                record(float(count))
            for observed in values:
                record(float(observed))
            if value is not None and (changed or gauges_due):
                record(float(value))
            return
        if count:
            self.metric.inc(count, self.tags)
        for observed in values:
            self.metric.observe(float(observed), self.tags)
        if value is not None and (changed or gauges_due):
            self.metric.set(float(value), self.tags)


def direct_record(metric: Any, tags: dict[str, str]) -> Any:
    """Ray's record of one series with its tags merged and checked once, not per value.

    Each `inc`/`observe`/`set` of a Ray metric merges the series' tags with the
    replica's (deployment, replica, application), checks them and only then records
    through Ray's core (`Metric._record`, about 4 us of the 6.5 per value); the
    thread that flushes calls the core's `record` with the merged tags instead.
    The tags are checked here as Ray checks them; None (the public path) when
    this Ray's metric has no such core record."""
    core = getattr(metric, "_metric", None)
    if core is None or getattr(metric, "_discard_metric", False):
        return None
    merged = {**getattr(metric, "_default_tags", {}), **tags}
    try:
        metric._validate_tags(merged)
    except Exception:  # noqa: BLE001 - the public path raises it where it is used
        return None
    record = core.record
    return lambda value: record(value, tags=merged)


class Family:
    """One metric and its labelled series, in Ray's metrics or in a local registry."""

    def __init__(
        self,
        owner: Metrics,
        kind: Kind,
        name: str,
        description: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = (),
    ) -> None:
        self.kind, self.name, self.label_names = kind, name, tuple(labels)
        self.series: dict[tuple[str, ...], Any] = {}
        self.ray = owner.to_ray
        self.lock = owner.lock
        if self.ray:
            from ray.serve import metrics as ray_metrics

            keys: Any = tuple(labels)  # Ray annotates tag_keys as Tuple[str]
            if kind == "counter":
                self.metric: Any = ray_metrics.Counter(name, description, keys)
            elif kind == "gauge":
                self.metric = ray_metrics.Gauge(name, description, keys)
            else:
                self.metric = ray_metrics.Histogram(name, description, list(buckets), keys)
        elif kind == "counter":
            self.metric = PromCounter(name, description, labels, registry=owner.registry)
        elif kind == "gauge":
            self.metric = PromGauge(name, description, labels, registry=owner.registry)
        else:
            self.metric = PromHistogram(
                name, description, labels, buckets=buckets, registry=owner.registry
            )

    def labels(self, *values: str) -> Series:
        """The series of these label values, made once and kept: the request path pays
        a dictionary lookup, not a new tag dictionary or prometheus_client's checks."""
        found = self.series.get(values)
        if found is None:
            if self.ray:
                tags = dict(zip(self.label_names, values, strict=True))
                found = RaySeries(self.metric, tags, self.lock)
            else:
                found = self.metric.labels(*values) if values else self.metric
            self.series[values] = found
        return found  # type: ignore[no-any-return]

    def remove(self, *values: str) -> None:
        """Stop a series (a version left the routing). Through Ray: it is no longer set,
        so the agent drops it after two report intervals."""
        if self.series.pop(values, None) is not None and not self.ray:
            self.metric.remove(*values)

    def flush(self, gauges_due: bool) -> None:
        if self.ray:  # a local registry holds its values itself
            for series in list(self.series.values()):
                series.flush(gauges_due)

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class Metrics:
    """The metrics of one process: through Ray in a Serve replica (`to_ray` None:
    decided here), otherwise in `registry`. Through Ray, a thread flushes them every
    `flush_s` (None: no thread, the caller calls `flush`)."""

    def __init__(self, to_ray: bool | None = None, flush_s: float | None = FLUSH_S) -> None:
        self.to_ray = in_serve_replica() if to_ray is None else to_ray
        self.registry = CollectorRegistry()
        self.families: list[Family] = []
        self.lock = threading.Lock()
        self.gauges_set_at = 0.0
        if self.to_ray and flush_s is not None:
            keep_flushing(self, flush_s)

    def counter(self, name: str, description: str, labels: Sequence[str] = ()) -> Family:
        return self._add(Family(self, "counter", name, description, labels))

    def gauge(self, name: str, description: str, labels: Sequence[str] = ()) -> Family:
        return self._add(Family(self, "gauge", name, description, labels))

    def histogram(
        self, name: str, description: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Family:
        return self._add(Family(self, "histogram", name, description, labels, buckets))

    def _add(self, family: Family) -> Family:
        self.families.append(family)
        return family

    def flush(self) -> None:
        """Hand Ray what the request path recorded since the last flush (a replica's
        metrics thread calls this every FLUSH_S)."""
        now = time.monotonic()
        gauges_due = now - self.gauges_set_at >= GAUGE_REFRESH_S
        if gauges_due:
            self.gauges_set_at = now
        for family in self.families:
            family.flush(gauges_due)

    def render(self) -> bytes:
        """This process's registry in Prometheus text format (empty in a replica)."""
        return generate_latest(self.registry)


def keep_flushing(metrics: Metrics, every_s: float) -> None:
    """A daemon thread that flushes `metrics` to Ray every `every_s` while it lives."""
    ref = weakref.ref(metrics)

    def run() -> None:
        while (alive := ref()) is not None:
            try:
                alive.flush()
            except Exception:  # a metric never stops the others, nor the next flush
                logger.exception("metrics flush failed")
            del alive
            time.sleep(every_s)

    threading.Thread(target=run, name="rankgate-metrics", daemon=True).start()


class ServingMetrics(Metrics):
    """What a serving replica counts, labelled by model version and variant where a
    model was involved."""

    def __init__(self, to_ray: bool | None = None, flush_s: float | None = FLUSH_S) -> None:
        super().__init__(to_ray, flush_s)
        self.requests = self.counter(
            "rankgate_rank_requests",
            "Rank answers by outcome (personalized; degraded: a dependency failed or was slow; non_personalized: the policy, the person or the routing decided; bad_request, unauthorized, forbidden, unavailable)",
            ["outcome", "purpose", "model_version", "variant"],
        )
        self.fallbacks = self.counter(
            "rankgate_fallbacks",
            "Answers served by the rule-based fallback, by reason",
            ["reason", "model_version", "variant"],
        )
        self.decisions = self.counter(
            "rankgate_policy_decisions",
            "Consent gate decisions",
            ["purpose", "decision"],
        )
        self.stage_seconds = self.histogram(
            "rankgate_stage_seconds",
            "Time per stage of answered requests",
            LATENCY_BUCKETS,
            ["stage", "model_version", "variant"],
        )
        self.batch_size = self.histogram(
            "rankgate_ranker_batch_size",
            "Requests scored together in one onnxruntime call",
            BATCH_BUCKETS,
            ["model_version"],
        )
        self.feature_age = self.histogram(
            "rankgate_feature_age_seconds",
            "Age of the user feature rows read",
            AGE_BUCKETS,
            ["view"],
        )
        self.explanations = self.counter(
            "rankgate_explanations",
            "Explanations by kind (requested: explain true, in the answer; sampled: after "
            "the answer, into the audit record), status and reason when omitted",
            ["kind", "status", "reason", "model_version"],
        )
        self.scored = self.counter(
            "rankgate_scored_decisions",
            "Answers the model ranked (no fallback, at least one item): what explanation "
            "coverage is a share of (rate of rankgate_explanations_total{status=explained} "
            "over rate of this)",
            ["model_version"],
        )
        self.sampled_seconds = self.histogram(
            "rankgate_sampled_explanation_seconds",
            "Compute time of a sampled explanation (off the response path)",
            LATENCY_BUCKETS,
            ["model_version"],
        )
        self.canary_weight = self.gauge(
            "rankgate_canary_weight_percent",
            "Share of users routed to the canary now",
            ["model_version"],
        )
        self.rollbacks = self.counter(
            "rankgate_rollbacks",
            "Automatic canary rollbacks",
            ["model_version", "rule"],
        )
        self.exploration = self.counter(
            "rankgate_exploration_answers",
            "Model answers of purposes with exploration, by whether the drawn answer differs "
            "from the model's top k (the share explored is explored=true over all)",
            ["purpose", "method", "explored"],
        )
        self.shadow_scores = self.counter(
            "rankgate_shadow_scores",
            "Shadow scorings by result",
            ["model_version", "result"],
        )
        self.feature_psi = self.gauge(
            "rankgate_feature_psi",
            "Population stability index of an input over the drift window, against the "
            "version's reference (0.1 moderate, 0.25 large shift)",
            ["model_version", "feature"],
        )
        self.score_psi = self.gauge(
            "rankgate_score_psi",
            "Population stability index of the scores over the drift window",
            ["model_version"],
        )
        self.explanation_drift = self.gauge(
            "rankgate_explanation_drift",
            "L1 distance (0..2) between the shares of mean |SHAP| per feature group of live "
            "explanations and of the reference",
            ["model_version"],
        )
        self.drift_flag = self.gauge(
            "rankgate_drift_flag",
            "1 while a drift figure of the kind (feature, score, explanation) exceeds its "
            "threshold with enough rows in the window",
            ["model_version", "kind"],
        )
        self.drift_rows = self.gauge(
            "rankgate_drift_window_rows",
            "Scored rows (candidate items) in the drift window",
            ["model_version"],
        )
        self.events = self.counter(
            "rankgate_events_received",
            "Events posted, by result (accepted, duplicate)",
            ["result"],
        )
        self.event_to_decision = self.histogram(
            "rankgate_event_to_decision_seconds",
            "From an event's acceptance (202) to the first decision of this replica whose "
            "streaming features include it",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        # Notifications (serving/observe/notifier.py): counted by the replica that delivers.
        self.notifications_delivered = self.counter(
            "rankgate_notifications_delivered",
            "Notifications a webhook accepted (2xx)",
            ["webhook", "kind"],
        )
        self.notifications_retried = self.counter(
            "rankgate_notifications_retried",
            "Delivery attempts repeated after a failure (timeout, connection error, 408, 429, 5xx)",
            ["webhook", "kind"],
        )
        self.notifications_failed = self.counter(
            "rankgate_notifications_failed",
            "Notifications given up on, by reason (attempts: every attempt failed; refused: "
            "a 4xx answer; expired: older than max_age_s when their turn came)",
            ["webhook", "kind", "reason"],
        )
        self.notification_seconds = self.histogram(
            "rankgate_notification_delivery_seconds",
            "From a notification's publication to the webhook's 2xx",
            NOTIFICATION_BUCKETS,
            ["webhook", "kind"],
        )
        self.notification_lag = self.gauge(
            "rankgate_notification_outbox_lag_seconds",
            "Age of the oldest notification a webhook has not been sent yet (0: caught up)",
            ["webhook"],
        )
        self.notifications_unpublished = self.counter(
            "rankgate_notifications_unpublished",
            "Notifications this replica could not append to the outbox (Redis did not answer)",
            ["kind"],
        )
        # The policy's retention (serving/observe/retention.py), by the replica that ran it.
        self.retention_removed = self.counter(
            "rankgate_retention_removed",
            "Records removed because they outlived the policy's retention, by kind",
            ["kind"],
        )
        self.retention_oldest_age = self.gauge(
            "rankgate_retention_oldest_age_seconds",
            "Age of the oldest record of a kind after the latest retention run (only the "
            "replica that ran it reports)",
            ["kind"],
        )
        self.retention_failures = self.counter(
            "rankgate_retention_failures",
            "Retention runs of a kind that failed (lease: the job could not take its lease)",
            ["kind"],
        )
        self.retention_run_seconds = self.gauge(
            "rankgate_retention_run_seconds",
            "How long the latest retention run took, all kinds",
        )

    def child(self, family: Family, *labels: str) -> Series:
        """`family.labels(*labels)`: the series, kept."""
        return family.labels(*labels)

    def observe(self, request: RankRequest, response: RankResponse) -> None:
        version = response.model.version if response.model else ""
        variant = response.model.variant if response.model else ""
        if response.fallback is None:
            outcome = "personalized"
        elif FallbackReason(response.fallback.reason).degraded:
            outcome = "degraded"
        else:
            outcome = "non_personalized"
        self.requests.labels(outcome, request.purpose, version, variant).inc()
        self.decisions.labels(request.purpose, response.policy.decision).inc()
        if response.fallback is not None:
            self.fallbacks.labels(response.fallback.reason, version, variant).inc()
        stage_seconds = self.stage_seconds.labels
        for stage, ms in response.timings_ms.items():
            # A stage that did not run for this request (explain not asked for, no
            # retrieval) stays at 0 in the answer's timings; it is not observed.
            if ms or stage == "queued":
                stage_seconds(stage, version, variant).observe(ms / 1000.0)
        if response.fallback is None and response.model is not None and response.items:
            self.scored.labels(version).inc()
        if response.explanation is not None:
            self.explained(
                "requested", version, response.explanation.status, response.explanation.reason
            )

    def explained(self, kind: str, version: str, status: str, reason: str | None = None) -> None:
        """One explanation, asked for or sampled, given or omitted."""
        self.explanations.labels(kind, status, reason or "", version).inc()

    def rejected(self, outcome: str) -> None:
        """A request answered with a 4xx/503 before ranking (bad_request, unauthorized, ...)."""
        self.requests.labels(outcome, "", "", "").inc()


class ConsumerMetrics(Metrics):
    """What the event consumer counts (through Ray's metrics, like the ingress's)."""

    def __init__(self, to_ray: bool | None = None) -> None:
        super().__init__(to_ray)
        self.read = self.counter(
            "rankgate_events_consumed", "Events read from the stream, by type", ["type"]
        )
        self.applied = self.counter(
            "rankgate_streaming_events_applied", "Events applied to a streaming view", ["view"]
        )
        self.unused = self.counter(
            "rankgate_streaming_events_unused",
            "Events of a counted type not turned into features, by reason "
            "(not_permitted: consent; unknown_item; redelivered: applied before)",
            ["view", "reason"],
        )
        self.rows = self.counter(
            "rankgate_streaming_rows_pushed",
            "Rows pushed to the online store through Feast's push path",
            ["view"],
        )
        self.event_to_feature = self.histogram(
            "rankgate_event_to_feature_seconds",
            "From an event's acceptance (202) to its streaming feature being readable",
            EVENT_LATENCY_BUCKETS,
            ["view"],
        )
        self.failures = self.counter(
            "rankgate_consumer_failures",
            "Batches that failed and will be delivered again, by stage",
            ["stage"],
        )
        self.malformed = self.counter(
            "rankgate_events_malformed", "Stream entries that are not events"
        )
        self.lag = self.gauge(
            "rankgate_consumer_lag_seconds",
            "Age of the newest entry of the last batch when it was done",
        )
