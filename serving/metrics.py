"""Prometheus metrics of a serving replica, exposed at `GET /metrics` of the ingress.

Labelled by model version and variant where a model was involved. Each replica
keeps its own registry; with several replicas, scrape each replica (with
HAProxy ingress each listens on its own port, 30000-31000) or sum what one
scrape target sees across restarts with `rate()` as usual.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from serving.outcomes import FallbackReason
from serving.schemas import RankRequest, RankResponse

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
AGE_BUCKETS = (60, 600, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 90 * 86400, 365 * 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "rankgate_rank_requests",
            "Rank answers by outcome (personalized; degraded: a dependency failed or was slow; non_personalized: the policy, the person or the routing decided; bad_request, unauthorized, forbidden, unavailable)",
            ["outcome", "purpose", "model_version", "variant"],
            registry=r,
        )
        self.fallbacks = Counter(
            "rankgate_fallbacks",
            "Answers served by the rule-based fallback, by reason",
            ["reason", "model_version", "variant"],
            registry=r,
        )
        self.decisions = Counter(
            "rankgate_policy_decisions",
            "Consent gate decisions",
            ["purpose", "decision"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "rankgate_stage_seconds",
            "Time per stage of answered requests",
            ["stage", "model_version", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rankgate_ranker_batch_size",
            "Requests scored together in one onnxruntime call",
            ["model_version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.feature_age = Histogram(
            "rankgate_feature_age_seconds",
            "Age of the user feature rows read",
            ["view"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.explanations = Counter(
            "rankgate_explanations",
            "Explanations by kind (requested: explain true, in the answer; sampled: after "
            "the answer, into the audit record), status and reason when omitted",
            ["kind", "status", "reason", "model_version"],
            registry=r,
        )
        self.scored = Counter(
            "rankgate_scored_decisions",
            "Answers the model ranked (no fallback, at least one item): what explanation "
            "coverage is a share of",
            ["model_version"],
            registry=r,
        )
        self.coverage = Gauge(
            "rankgate_explanation_coverage_ratio",
            "Explained (requested or sampled) / scored decisions of this replica since it "
            "started; over a window: rate of rankgate_explanations_total{status=explained} "
            "over rate of rankgate_scored_decisions_total",
            ["model_version"],
            registry=r,
        )
        self.sampled_seconds = Histogram(
            "rankgate_sampled_explanation_seconds",
            "Compute time of a sampled explanation (off the response path)",
            ["model_version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Per version: (explained, scored), the coverage gauge's terms.
        self.coverage_counts: dict[str, list[int]] = {}
        self.canary_weight = Gauge(
            "rankgate_canary_weight_percent",
            "Share of users routed to the canary now",
            ["model_version"],
            registry=r,
        )
        self.rollbacks = Counter(
            "rankgate_rollbacks",
            "Automatic canary rollbacks",
            ["model_version", "rule"],
            registry=r,
        )
        self.exploration = Counter(
            "rankgate_exploration_answers",
            "Model answers of purposes with exploration, by whether the drawn answer differs "
            "from the model's top k (the share explored is explored=true over all)",
            ["purpose", "method", "explored"],
            registry=r,
        )
        self.shadow_scores = Counter(
            "rankgate_shadow_scores",
            "Shadow scorings by result",
            ["model_version", "result"],
            registry=r,
        )
        self.feature_psi = Gauge(
            "rankgate_feature_psi",
            "Population stability index of an input over the drift window, against the "
            "version's reference (0.1 moderate, 0.25 large shift)",
            ["model_version", "feature"],
            registry=r,
        )
        self.score_psi = Gauge(
            "rankgate_score_psi",
            "Population stability index of the scores over the drift window",
            ["model_version"],
            registry=r,
        )
        self.explanation_drift = Gauge(
            "rankgate_explanation_drift",
            "L1 distance (0..2) between the shares of mean |SHAP| per feature group of live "
            "explanations and of the reference",
            ["model_version"],
            registry=r,
        )
        self.drift_flag = Gauge(
            "rankgate_drift_flag",
            "1 while a drift figure of the kind (feature, score, explanation) exceeds its "
            "threshold with enough rows in the window",
            ["model_version", "kind"],
            registry=r,
        )
        self.drift_rows = Gauge(
            "rankgate_drift_window_rows",
            "Scored rows (candidate items) in the drift window",
            ["model_version"],
            registry=r,
        )

        self.events = Counter(
            "rankgate_events_received",
            "Events posted, by result (accepted, duplicate)",
            ["result"],
            registry=r,
        )
        self.event_to_decision = Histogram(
            "rankgate_event_to_decision_seconds",
            "From an event's acceptance (202) to the first decision of this replica whose "
            "streaming features include it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: the request path pays a dictionary lookup,
        not prometheus_client's label checks and lock."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe(self, request: RankRequest, response: RankResponse) -> None:
        version = response.model.version if response.model else ""
        variant = response.model.variant if response.model else ""
        if response.fallback is None:
            outcome = "personalized"
        elif FallbackReason(response.fallback.reason).degraded:
            outcome = "degraded"
        else:
            outcome = "non_personalized"
        child = self.child
        child(self.requests, outcome, request.purpose, version, variant).inc()
        child(self.decisions, request.purpose, response.policy.decision).inc()
        if response.fallback is not None:
            child(self.fallbacks, response.fallback.reason, version, variant).inc()
        for stage, ms in response.timings_ms.items():
            child(self.stage_seconds, stage, version, variant).observe(ms / 1000.0)
        if response.fallback is None and response.model is not None and response.items:
            child(self.scored, version).inc()
            self._cover(version, scored=1)
        if response.explanation is not None:
            self.explained(
                "requested", version, response.explanation.status, response.explanation.reason
            )

    def explained(self, kind: str, version: str, status: str, reason: str | None = None) -> None:
        """One explanation, asked for or sampled, given or omitted."""
        self.child(self.explanations, kind, status, reason or "", version).inc()
        if status == "explained":
            self._cover(version, explained=1)

    def _cover(self, version: str, explained: int = 0, scored: int = 0) -> None:
        counts = self.coverage_counts.setdefault(version, [0, 0])
        counts[0] += explained
        counts[1] += scored
        if counts[1]:
            self.child(self.coverage, version).set(counts[0] / counts[1])

    def rejected(self, outcome: str) -> None:
        """A request answered with a 4xx/503 before ranking (bad_request, unauthorized, ...)."""
        self.child(self.requests, outcome, "", "", "").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
