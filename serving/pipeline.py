"""The request path: gate -> features -> ranker -> [explainer], under one deadline.

`RankPipeline` knows nothing of Ray. The ingress deployment builds it and hands
it a `score` coroutine: in-process batched scoring, or a call to a ranker
deployment, as placement config says. Every stage gets what is left of the
request's budget; a stage that fails or would overrun degrades the answer to the
rule-based fallback, which names its reason. Only bad input raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from features.vector import build_matrix, user_fields
from rankgate import redis_keys
from rankgate.consent import ConsentState, parse_state
from rankgate.project import ItemId
from rankgate.pseudonym import user_key as pseudonymise
from serving.audit import AuditRecord, AuditWriter, RecordedFeatures
from serving.config import ServingConfig
from serving.experiments import ROLLBACK_SYNC_S, ExperimentLog
from serving.explainer import Explainer
from serving.fallback import RuleFallback
from serving.feature_fetch import FeatureFetcher, UserFeatures
from serving.gate import ConsentGate, GateDecision
from serving.metrics import ServingMetrics
from serving.outcomes import FallbackReason
from serving.ranker import ModelSet, ModelUnavailable
from serving.requests import parse_rank
from serving.routing import Router
from serving.schemas import (
    Explanation,
    Fallback,
    ModelRef,
    RankedItem,
    RankRequest,
    RankResponse,
    RequestRules,
)
from serving.topk import SCORE_DIGITS, plain_item_id, top_k

ScoreFn = Callable[[str, np.ndarray], Awaitable[np.ndarray]]
ROLLBACK_CHECK_S = 0.05
logger = logging.getLogger("ray.serve")


class Deadline:
    """A request's deadline, counted from its arrival: `queued_ms` is how long it
    waited (edge and replica queues) before the pipeline took it up."""

    def __init__(self, budget_ms: float, queued_ms: float = 0.0) -> None:
        self.start = time.perf_counter() - queued_ms / 1000.0
        self.end = self.start + budget_ms / 1000.0

    def remaining_s(self) -> float:
        return self.end - time.perf_counter()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0


@dataclass
class Outcome:
    """What the stages decided, turned into a RankResponse at the end."""

    ranked: list[tuple[ItemId, float]] = field(default_factory=list)
    model: ModelRef | None = None
    reason: FallbackReason | None = None
    fallback: Fallback | None = None
    reasons: list[list] | None = None
    explanation: Explanation | None = None
    user: UserFeatures | None = None
    items_digest: str | None = None


class RankPipeline:
    def __init__(
        self,
        *,
        config: ServingConfig,
        gate: ConsentGate,
        consent_client: aioredis.Redis,
        namespace: str,
        fetcher: FeatureFetcher,
        models: ModelSet,
        router: Router,
        experiments: ExperimentLog,
        metrics: ServingMetrics,
        audit: AuditWriter,
        score: ScoreFn,
        explainers: dict[str, Explainer],
        fallback: RuleFallback,
    ) -> None:
        self.config = config
        self.gate = gate
        self.consent_client = consent_client
        self.namespace = namespace
        self.fetcher = fetcher
        self.models = models
        self.router = router
        self.experiments = experiments
        self.metrics = metrics
        self.audit = audit
        self.score = score
        self.background: set[asyncio.Task[None]] = set()
        self.rollbacks_synced_at = 0.0
        self.rollback_checked_at = 0.0
        self.explainers = explainers
        self.fallback = fallback
        # What a request may say here: this config's bounds, this policy, this catalogue.
        self.rules = RequestRules.of(
            config.limits,
            config.budget,
            gate.policy.purposes,
            gate.policy.regions,
            fetcher.catalogue,
            fetcher.project.spec.item.id_type,
            fetcher.project.context,
        )
        # The fields each loaded version reads per user view (the Feast reads it needs).
        self.fields_of = {
            version: user_fields(model.specs, fetcher.infos)
            for version, model in models.loaded.items()
        }

    async def warm_up(self) -> None:
        """Open the Redis connections (consent and Feast) before the first request pays for it."""
        probe = pseudonymise("rankgate-warm-up")
        deadline = Deadline(5000)
        await self._sync_rollbacks()
        await self.read_consent(probe, next(iter(self.gate.policy.purposes)), deadline)
        fields = merge_fields(self.fields_of.values())
        # A store that is down now is handled per request; warming up is best effort.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.fetcher.fetch_user(probe, fields), timeout=5)

    # -- input ---------------------------------------------------------------

    def parse(self, body: bytes) -> RankRequest:
        return parse_rank(body, self.rules)

    # -- stages --------------------------------------------------------------

    async def read_consent(self, key: str, purpose: str, deadline: Deadline) -> ConsentState | None:
        """Consent of the person for the purpose; None when it cannot be read in time."""
        try:
            raw = await asyncio.wait_for(
                self.consent_client.hget(redis_keys.consent(self.namespace, key), purpose),  # type: ignore[arg-type]
                timeout=max(deadline.remaining_s(), 0.0),
            )
        except (TimeoutError, OSError, aioredis.RedisError):
            return None
        return parse_state(raw)

    async def rank(
        self, request: RankRequest, app: str | None = None, queued_ms: float = 0.0
    ) -> RankResponse:
        """Rank for one request; `app` (the caller's application) goes to the audit record,
        `queued_ms` (time since arrival) counts against the budget."""
        deadline = Deadline(request.budget_ms or self.config.budget.default_ms, queued_ms)
        timings = {"queued": queued_ms, "policy": 0.0, "features": 0.0, "rank": 0.0, "explain": 0.0}
        key = pseudonymise(request.user_id)
        candidates = request.candidates or self.fetcher.catalogue

        started = time.perf_counter()
        if deadline.remaining_s() <= 0:
            # Spent in the queues: answer at once, without reading consent (fails
            # closed: not personalized); the item rules still apply.
            decision = self.gate.unread(request.purpose, request.region, "budget spent queued")
        else:
            consent = await self.read_consent(key, request.purpose, deadline)
            decision = self.gate.decide(request.purpose, request.region, consent)
        eligible = [c for c in candidates if c not in decision.excluded_items]
        timings["policy"] = _ms_since(started)

        if decision.reason is FallbackReason.BUDGET_EXHAUSTED:
            outcome = self._degrade(Outcome(), FallbackReason.BUDGET_EXHAUSTED, "queued")
        else:
            outcome = await self._personalize(request, key, decision, eligible, deadline, timings)
        if outcome.model is not None:
            self._observe(outcome, deadline.elapsed_ms())
        if outcome.fallback is not None:
            outcome.ranked = self.fallback.rank(eligible, request.k)
            if request.explain:
                outcome.explanation = Explanation(status="omitted", reason="not_personalized")
        # Optional parts are left unset, not set to None: the JSON answer carries
        # `reasons`, `explanation` and `detail` only when there is something to say.
        items = []
        for n, (item, score) in enumerate(outcome.ranked):
            extra = (
                {"reasons": outcome.reasons[n]}
                if outcome.reasons and n < len(outcome.reasons)
                else {}
            )
            items.append(
                RankedItem(item_id=item, rank=n + 1, score=round(score, SCORE_DIGITS), **extra)
            )
        timings = {name: round(value, 3) for name, value in timings.items()}
        timings["total"] = round(deadline.elapsed_ms(), 3)
        explanation = {"explanation": outcome.explanation} if outcome.explanation else {}
        response = RankResponse(
            request_id=uuid.uuid4().hex,
            items=items,
            model=outcome.model,
            fallback=outcome.fallback,
            policy=decision.block(),
            timings_ms=timings,
            **explanation,
        )
        self.metrics.observe(request, response)
        if self.config.audit.enabled:
            self.audit.record(audit_record(request, key, eligible, outcome, response, app))
        return response

    # -- experiments -----------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        """Run off the response path; keep a reference so the task is not collected."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _observe(self, outcome: Outcome, latency_ms: float) -> None:
        """Feed the variant's window and roll the canary back when a rule fires."""
        assert outcome.model is not None
        reason = outcome.reason
        self.router.record(
            outcome.model.version,
            error=reason is not None and reason.model_fault,
            degraded=reason is not None and reason.degraded,
            latency_ms=latency_ms,
        )
        # The rules sort the window's latencies: check at most every ROLLBACK_CHECK_S,
        # not on every request.
        now = time.monotonic()
        if now - self.rollback_checked_at < ROLLBACK_CHECK_S:
            return
        self.rollback_checked_at = now
        event = self.router.check_rollback(now)
        if event is not None:
            self.metrics.rollbacks.labels(event.version, event.rule).inc()
            self.publish_canary_weight()
            self._spawn(self.experiments.record_rollback(event))
        if time.monotonic() - self.rollbacks_synced_at > ROLLBACK_SYNC_S:
            self.rollbacks_synced_at = time.monotonic()
            self._spawn(self._sync_rollbacks())

    async def _sync_rollbacks(self) -> None:
        with contextlib.suppress(OSError, aioredis.RedisError):
            self.router.rolled_back |= await self.experiments.rolled_back()
        self.publish_canary_weight()

    def publish_canary_weight(self) -> None:
        canary = self.router.config.canary
        if canary is not None:
            self.metrics.canary_weight.labels(canary.version).set(self.router.canary_weight)

    async def _shadow(
        self,
        version: str,
        user: Any,
        eligible: Sequence[ItemId],
        live: list[tuple[ItemId, float]],
        context: Mapping[str, str],
    ) -> None:
        """Score a copy of the request with a shadow version and record agreement with the live answer."""
        model = self.models.loaded.get(version)
        try:
            if model is None:
                raise ModelUnavailable(self.models.errors.get(version, version))
            matrix = build_matrix(model.specs, user.values, self.fetcher.items, eligible, context)
            scores = model.scorer.score(matrix)
            k = len(live)
            shadow_top = {pick.item_id for pick in top_k(eligible, scores, k)}
            overlap = len(shadow_top & {item for item, _ in live}) / k if k else 1.0
            position = {item: n for n, item in enumerate(eligible)}
            diff = (
                float(np.mean([abs(scores[position[item]] - score) for item, score in live]))
                if k
                else 0.0
            )
            result: tuple[float | None, float | None] = (overlap, diff)
        except Exception as exc:  # noqa: BLE001 - a shadow's failure never reaches the answer
            logger.warning("shadow %s failed: %s", version, type(exc).__name__)
            result = (None, None)
        self.metrics.shadow_scores.labels(version, "error" if result[0] is None else "ok").inc()
        with contextlib.suppress(OSError, aioredis.RedisError):
            await self.experiments.record_shadow(version, *result)

    def _degrade(
        self, outcome: Outcome, reason: FallbackReason, detail: str | None = None
    ) -> Outcome:
        extra = {"detail": detail} if detail else {}
        outcome.reason = reason
        outcome.fallback = Fallback(reason=reason, strategy=self.fallback.strategy, **extra)
        return outcome

    async def _personalize(
        self,
        request: RankRequest,
        key: str,
        decision: GateDecision,
        eligible: Sequence[ItemId],
        deadline: Deadline,
        timings: dict[str, float],
    ) -> Outcome:
        outcome = Outcome()
        if not decision.personalize:
            return self._degrade(outcome, decision.reason or FallbackReason.NO_CONSENT)
        assignment = self.router.choose(key, decision.allowed_views, self.models.views_of)
        if assignment is None:
            return self._degrade(outcome, FallbackReason.NO_PERMITTED_MODEL)
        version = assignment.version
        outcome.model = ModelRef(name=self.models.name, version=version, variant=assignment.variant)
        model = self.models.loaded.get(version)
        if model is None:
            return self._degrade(
                outcome, FallbackReason.MODEL_UNAVAILABLE, self.models.errors.get(version)
            )
        if not eligible:
            return outcome  # nothing may be shown: an empty, personalized answer

        # Features: only the views the model (and permitted shadows) read, and
        # only for a person the gate cleared.
        shadows = self.router.shadows(decision.allowed_views, self.models.views_of)
        fields = merge_fields(self.fields_of.get(v, {}) for v in [version, *shadows])
        started = time.perf_counter()
        try:
            if deadline.remaining_s() <= 0:
                raise TimeoutError
            user = await asyncio.wait_for(
                self.fetcher.fetch_user(key, fields), timeout=deadline.remaining_s()
            )
        except TimeoutError:
            timings["features"] = _ms_since(started)
            return self._degrade(outcome, FallbackReason.FEATURE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the online store failed: degrade
            timings["features"] = _ms_since(started)
            return self._degrade(outcome, FallbackReason.FEATURE_ERROR, type(exc).__name__)
        timings["features"] = _ms_since(started)
        for view, age in user.age_s.items():
            self.metrics.feature_age.labels(view).observe(age)
        if user.missing_views:
            return self._degrade(
                outcome, FallbackReason.FEATURES_MISSING, ",".join(user.missing_views)
            )
        if user.stale_views:
            return self._degrade(outcome, FallbackReason.FEATURES_STALE, ",".join(user.stale_views))

        started = time.perf_counter()
        items = self.fetcher.items  # one table for the matrix and the audit record
        outcome.user, outcome.items_digest = user, items.digest
        matrix = build_matrix(model.specs, user.values, items, eligible, request.context)
        try:
            if deadline.remaining_s() <= 0:
                raise TimeoutError
            scores = await asyncio.wait_for(
                self.score(version, matrix), timeout=deadline.remaining_s()
            )
        except TimeoutError:
            timings["rank"] = _ms_since(started)
            return self._degrade(outcome, FallbackReason.BUDGET_EXHAUSTED, "ranker")
        except ModelUnavailable as exc:
            timings["rank"] = _ms_since(started)
            return self._degrade(outcome, FallbackReason.MODEL_UNAVAILABLE, exc.message)
        except Exception as exc:  # noqa: BLE001 - an ONNX error must not fail the request
            timings["rank"] = _ms_since(started)
            return self._degrade(outcome, FallbackReason.MODEL_ERROR, type(exc).__name__)
        picks = top_k(eligible, scores, request.k)
        outcome.ranked = [(pick.item_id, pick.score) for pick in picks]
        timings["rank"] = _ms_since(started)
        for shadow in shadows:
            self._spawn(self._shadow(shadow, user, eligible, outcome.ranked, request.context))

        if request.explain:
            started = time.perf_counter()
            rows = matrix[[pick.position for pick in picks]]
            outcome.reasons, outcome.explanation = self._explain(version, rows, deadline)
            timings["explain"] = _ms_since(started)
        return outcome

    def _explain(
        self, version: str, rows: np.ndarray, deadline: Deadline
    ) -> tuple[list[list] | None, Explanation]:
        explainer = self.explainers.get(version)
        if explainer is None:
            return None, Explanation(status="omitted", reason="explainer_unavailable")
        rows = rows[: self.config.explainer.max_items]
        needed_s = len(rows) * self.config.explainer.ms_per_row_estimate / 1000.0
        if deadline.remaining_s() < needed_s:
            return None, Explanation(status="omitted", reason="budget_exhausted")
        try:
            reasons: list[list] = explainer.explain(rows)
        except Exception:  # noqa: BLE001 - an explainer error never fails the answer
            return None, Explanation(status="omitted", reason="explainer_error")
        return reasons, Explanation(status="explained")


def audit_record(
    request: RankRequest,
    key: str,
    eligible: Sequence[ItemId],
    outcome: Outcome,
    response: RankResponse,
    app: str | None = None,
) -> AuditRecord:
    """What the audit stream keeps of one decision (no raw user id)."""
    user = outcome.user
    return AuditRecord(
        request_id=response.request_id,
        at=time.time(),
        app=app,
        user_key=key,
        purpose=request.purpose,
        region=request.region,
        k=request.k,
        policy=response.policy,
        model=response.model,
        candidates=[plain_item_id(c) for c in eligible],
        features=RecordedFeatures(values=user.values, age_s=user.age_s, context=request.context)
        if user
        else None,
        item_table=outcome.items_digest,
        items=[(item.item_id, item.score) for item in response.items],
        fallback=response.fallback,
        explanation=[item.reasons or [] for item in response.items] if outcome.reasons else None,
        timings_ms=response.timings_ms,
    )


def merge_fields(maps: Iterable[Mapping[str, list[str]]]) -> dict[str, list[str]]:
    """One read per view for several models: the union of their fields, in order."""
    merged: dict[str, list[str]] = {}
    for fields in maps:
        for view, names in fields.items():
            have = merged.setdefault(view, [])
            have += [n for n in names if n not in have]
    return merged


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
