"""The request path: parse, run the stages under one deadline, answer, audit.

`RankPipeline` knows nothing of Ray. The ingress deployment builds it and hands
it a `score` coroutine: in-process batched scoring, or a call to a ranker
deployment, as placement config says. The stages (serving/ranking/stages.py: gate ->
route -> fetch -> score -> explain) each get what is left of the request's
budget; a stage that fails or would overrun degrades the answer to the fallback,
which names its reason. Only bad input raises. Beside the answer the pipeline
feeds the canary's window, scores shadows off the response path, explains a
sample of decisions after answering (serving/observe/sampling.py) and writes the audit
record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import redis.asyncio as aioredis
from cachetools import LRUCache

from features.vector import build_matrix, user_fields
from rankgate.core.project import ItemId
from rankgate.core.pseudonym import user_key as pseudonymise
from rankgate.core.topk import SCORE_DIGITS, plain_item_id, top_k
from serving.contract.config import ServingConfig
from serving.contract.parsing import parse_rank
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import (
    ExplanationStatus,
    Freshness,
    ModelRef,
    RankedItem,
    RankRequest,
    RankResponse,
    RequestRules,
)
from serving.observe.audit import (
    BEFORE_ANSWER_WAIT_S,
    AuditRecord,
    AuditWriter,
    Choice,
    ExplanationNote,
    RecordedFeatures,
)
from serving.observe.metrics import ServingMetrics
from serving.observe.routing_log import ROLLBACK_SYNC_S, ExperimentLog, RollbackEvent
from serving.observe.sampling import ExplanationObserver, ExplanationWorker, Outcome, chosen
from serving.ranking.explainer import Explainer
from serving.ranking.fallback import RuleFallback
from serving.ranking.feature_fetch import FeatureFetcher
from serving.ranking.gate import ConsentGate
from serving.ranking.ranker import ModelSet, ModelUnavailable
from serving.ranking.routing import Router
from serving.ranking.stages import (
    Deadline,
    RankContext,
    ScoreFn,
    Services,
    StageRunner,
    merge_fields,
)

__all__ = ["Deadline", "RankPipeline", "ScoreFn", "Services", "audit_record", "merge_fields"]

ROLLBACK_CHECK_S = 0.05
SEEN_PEOPLE = 100_000
"""People whose newest included event a replica remembers (event-to-decision latency)."""
logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class Delegated(Generic[T]):
    """An attribute of the pipeline that is a field of its `services`: the stages
    and the pipeline see one value (a test may swap a dependency in place)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, pipeline: RankPipeline, owner: type | None = None) -> T:
        return getattr(pipeline.services, self.name)  # type: ignore[no-any-return]

    def __set__(self, pipeline: RankPipeline, value: T) -> None:
        setattr(pipeline.services, self.name, value)


class RankPipeline:
    """Parses a request, runs the configured stages (serving/ranking/stages.py), turns the
    context into the answer; feeds the canary's window, shadows and the audit record."""

    config: Delegated[ServingConfig] = Delegated()
    gate: Delegated[ConsentGate] = Delegated()
    fetcher: Delegated[FeatureFetcher] = Delegated()
    models: Delegated[ModelSet] = Delegated()
    router: Delegated[Router] = Delegated()
    explainers: Delegated[dict[str, Explainer]] = Delegated()
    fallback: Delegated[RuleFallback] = Delegated()
    metrics: Delegated[ServingMetrics] = Delegated()
    fields_of: Delegated[dict[str, dict[str, list[str]]]] = Delegated()

    def __init__(
        self,
        services: Services,
        experiments: ExperimentLog,
        audit: AuditWriter,
        worker: ExplanationWorker | None = None,
        explanation_observers: list[ExplanationObserver] | None = None,
    ) -> None:
        self.services = services
        self.experiments = experiments
        self.audit = audit
        self.worker = worker or ExplanationWorker()
        # Called with each explanation of the sample of traffic (serving/observe/sampling.py):
        # computed for it, or asked for by a request the sample chose. Only the
        # sample: explanations asked for follow whoever asks, the sample is uniform.
        self.explanation_observers: list[ExplanationObserver] = (
            explanation_observers if explanation_observers is not None else []
        )
        if services.drift is not None:
            observe = services.drift.observe_explanations
            if observe not in self.explanation_observers:
                self.explanation_observers.append(observe)
        config, fetcher = services.config, services.fetcher
        self.runner = StageRunner.build(config.pipeline.stages, config.pipeline.fallback, services)
        self.background: set[asyncio.Task[None]] = set()
        self.rollbacks_synced_at = 0.0
        self.rollback_checked_at = 0.0
        # Person -> acceptance time of the newest event a decision of theirs included.
        self.events_seen: LRUCache[str, float] = LRUCache(SEEN_PEOPLE)
        # What a request may say here: this config's bounds, this policy, this catalogue.
        self.rules = RequestRules.of(
            config.limits,
            config.budget,
            services.gate.policy.purposes,
            services.gate.policy.regions,
            fetcher.catalogue,
            fetcher.project.spec.item.id_type,
            fetcher.project.context,
        )
        if not services.fields_of:
            services.fields_of = {
                version: user_fields(model.specs, fetcher.infos)
                for version, model in services.models.loaded.items()
            }

    @property
    def consent_client(self) -> aioredis.Redis:
        return self.services.consent.client

    @consent_client.setter
    def consent_client(self, client: aioredis.Redis) -> None:
        self.services.consent.client = client

    async def warm_up(self) -> None:
        """Open the Redis connections (consent and Feast) before the first request pays for it."""
        probe = pseudonymise("rankgate-warm-up")
        await self._sync_rollbacks()
        await self.services.consent.read(probe, next(iter(self.gate.policy.purposes)), 5.0)
        fields = merge_fields(self.fields_of.values())
        # A store that is down now is handled per request; warming up is best effort.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.fetcher.fetch_user(probe, fields), timeout=5)

    def parse(self, body: bytes) -> RankRequest:
        return parse_rank(body, self.rules)

    async def rank(
        self, request: RankRequest, app: str | None = None, queued_ms: float = 0.0
    ) -> RankResponse:
        """Rank for one request; `app` (the caller's application) goes to the audit record,
        `queued_ms` (time since arrival) counts against the budget."""
        deadline = Deadline(request.budget_ms or self.config.budget.default_ms, queued_ms)
        context = RankContext(
            request=request,
            key=pseudonymise(request.user_id),
            candidates=request.candidates or self.fetcher.catalogue,
            timings=self.runner.timings(queued_ms),
        )
        await self.runner.run(context, deadline)
        drift = self.services.drift
        if drift is not None and context.scored and context.scores is not None:
            assert context.model_ref is not None and context.matrix is not None
            drift.observe(context.model_ref.version, context.matrix, context.scores)
        if context.model_ref is not None:
            self._observe(context.model_ref, context.reason, deadline.elapsed_ms())
        if context.scored and context.user is not None:
            for shadow in context.shadows:
                self._spawn(
                    self._shadow(
                        shadow, context.user, context.eligible, context.ranked, request.context
                    )
                )
        response = answer(context, deadline)
        self.metrics.observe(request, response)
        if response.freshness is not None:
            self.observe_freshness(context.key, response.freshness.events_through)
        if self.config.audit.before_answer and (
            self.config.audit.enabled or self.audit.decision_ttl_s is not None
        ):
            written = asyncio.get_running_loop().create_future()
            self._record(context, response, app, written)
            # Bounded: a Redis outage delays answers, never refuses them (the record
            # stays queued and is written when Redis is back).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(written), BEFORE_ANSWER_WAIT_S)
        elif self.config.audit.enabled or self.audit.decision_ttl_s is not None:
            # Built and queued on the event loop's next turn, once the answer is on
            # its way: the record's cost is off the response path. Held until then,
            # so that a flush waits for it.
            self.audit.hold()
            asyncio.get_running_loop().call_soon(self._record, context, response, app)
        return response

    def _record(
        self,
        context: RankContext,
        response: RankResponse,
        app: str | None,
        written: asyncio.Future[None] | None = None,
    ) -> None:
        """The decision's audit record, queued (or held for its sampled explanation);
        `written`: resolved once it is in Redis."""
        if written is not None:
            self.audit.hold()
        try:
            record = audit_record(context, response, app)
            if not self._sample(context, record, written):
                self.audit.record(record, self.config.audit.enabled, written)
        finally:
            self.audit.unhold()

    def observe_freshness(self, key: str, through: float) -> None:
        """The first decision to include a person's newest event measures how long the
        event took from its 202 to a decision (per replica: with several, the first
        replica to serve the person after it counts)."""
        if self.events_seen.get(key, 0.0) < through:
            self.events_seen[key] = through
            self.metrics.event_to_decision.observe(max(time.time() - through, 0.0))

    # -- explanations on a sample of traffic ----------------------------------

    def _sample(
        self, context: RankContext, record: AuditRecord, written: asyncio.Future[None] | None = None
    ) -> bool:
        """Explain the decision off the response path if the sample chooses it.
        True: its record is held, and written once the explanation is in."""
        config = self.config
        if not (
            config.audit.enabled
            and context.scored
            and context.ranked
            and context.model_ref is not None
            and chosen(record.request_id, config.explainer.sample_rate)
        ):
            return False
        version = context.model_ref.version
        if context.contributions is not None:  # asked for and given: not computed twice
            self._observe_explanation(version, context.contributions)
            return False
        explainer = self.explainers.get(version)
        if explainer is None:
            self._note_sample(record, version, "omitted", "explainer_unavailable")
            return False
        rows = context.explained_rows(config.explainer.max_items)
        limit = config.explainer.sample_queue

        def done(outcome: Outcome) -> None:
            self._sample_done(record, version, outcome, written)

        if not self.worker.submit(explainer, rows, limit, done):
            self._note_sample(record, version, "omitted", "queue_full")
            return False
        self.audit.hold()
        return True

    def _sample_done(
        self,
        record: AuditRecord,
        version: str,
        outcome: Outcome,
        written: asyncio.Future[None] | None = None,
    ) -> None:
        """On the event loop: the sampled explanation into its record, and the record out."""
        try:
            if outcome.reasons is None or outcome.contributions is None:
                self._note_sample(record, version, "omitted", "explainer_error")
                return
            # The shape of an explanation asked for: [] for items after max_items.
            missing = len(record.items) - len(outcome.reasons)
            record.explanation = outcome.reasons + [[] for _ in range(missing)]
            self._note_sample(record, version, "explained")
            self.metrics.sampled_seconds.labels(version).observe(outcome.seconds)
            self._observe_explanation(version, outcome.contributions)
        finally:
            self.audit.release(record, written=written)

    def _note_sample(
        self,
        record: AuditRecord,
        version: str,
        status: ExplanationStatus,
        reason: str | None = None,
    ) -> None:
        note = {"reason": reason} if reason else {}
        record.explained = ExplanationNote(kind="sampled", status=status, **note)
        self.metrics.explained("sampled", version, status, reason)

    def _observe_explanation(self, version: str, contributions: np.ndarray) -> None:
        for observer in self.explanation_observers:
            try:
                observer(version, contributions)
            except Exception:  # an observer never costs a record or an answer
                logger.exception("explanation observer %r failed", observer)

    # -- experiments -----------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        """Run off the response path; keep a reference so the task is not collected."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _observe(self, model: ModelRef, reason: FallbackReason | None, latency_ms: float) -> None:
        """Feed the variant's window and roll the canary back when a rule fires."""
        self.router.record(
            model.version,
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
            self._rolled_back(event)
        if time.monotonic() - self.rollbacks_synced_at > ROLLBACK_SYNC_S:
            self.rollbacks_synced_at = time.monotonic()
            self._spawn(self._sync_rollbacks())
            self._spawn(self._check_outcomes())

    def _rolled_back(self, event: RollbackEvent) -> None:
        self.metrics.rollbacks.labels(event.version, event.rule).inc()
        self.publish_canary_weight()
        self._spawn(self.experiments.record_rollback(event))

    async def _sync_rollbacks(self) -> None:
        with contextlib.suppress(OSError, aioredis.RedisError):
            self.router.rolled_back |= await self.experiments.rolled_back()
        self.publish_canary_weight()

    async def _check_outcomes(self) -> None:
        """The click-rate rule: outcomes arrive through the event stream, not the
        request windows, so both variants' joined counters are read from Redis (off
        the response path; when Redis does not answer, the next sync tries again)."""
        canary = self.router.live_canary
        if canary is None or self.router.config.rollback.ctr_p_value is None:
            return
        try:
            exposures = await self.experiments.exposures(canary, self.router.config.stable)
        except (OSError, aioredis.RedisError):
            return
        event = self.router.check_ctr(*exposures)
        if event is not None:
            self._rolled_back(event)

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
            if self.services.drift is not None:
                self.services.drift.observe(version, matrix, scores)
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
        outcome = "error" if result[0] is None else "ok"
        self.metrics.child(self.metrics.shadow_scores, version, outcome).inc()
        with contextlib.suppress(OSError, aioredis.RedisError):
            await self.experiments.record_shadow(version, *result)


def answer(context: RankContext, deadline: Deadline) -> RankResponse:
    """The JSON answer of a request the stages have run."""
    # Optional parts are left unset, not set to None: the JSON answer carries
    # `reasons`, `explanation` and `detail` only when there is something to say.
    # Built without validation (model_construct): every value comes from the stages,
    # typed, and the answer is on the response path.
    reasons = context.reasons
    items = []
    for n, (item, score) in enumerate(context.ranked):
        fields: dict[str, Any] = {"item_id": item, "rank": n + 1}
        fields["score"] = round(score, SCORE_DIGITS)
        if reasons and n < len(reasons):
            fields["reasons"] = reasons[n]
        items.append(RankedItem.model_construct(**fields))
    timings = {name: round(value, 3) for name, value in context.timings.items()}
    timings["total"] = round(deadline.elapsed_ms(), 3)
    optional: dict[str, Any] = {}
    if context.explanation:
        optional["explanation"] = context.explanation
    through = context.user.events_through if context.user is not None else None
    if through is not None and context.scored:
        age_ms = max(time.time() - through, 0.0) * 1000.0
        optional["freshness"] = Freshness(events_through=through, event_age_ms=round(age_ms, 3))
    assert context.decision is not None, "the gate stage always decides"
    return RankResponse.model_construct(
        request_id=uuid.uuid4().hex,
        items=items,
        model=context.model_ref,
        fallback=context.fallback,
        policy=context.decision.block,
        timings_ms=timings,
        **optional,
    )


def audit_record(
    context: RankContext, response: RankResponse, app: str | None = None
) -> AuditRecord:
    """What the audit stream keeps of one decision (no raw user id)."""
    request, user = context.request, context.user
    return AuditRecord(
        request_id=response.request_id,
        at=time.time(),
        app=app,
        user_key=context.key,
        purpose=request.purpose,
        region=request.region,
        k=request.k,
        policy=response.policy,
        model=response.model,
        candidates=[plain_item_id(c) for c in context.eligible],
        features=recorded_features(user.values, user.age_s, request.context, user.events_through)
        if user
        else None,
        item_table=context.items.digest if context.items is not None else None,
        items=[(item.item_id, item.score) for item in response.items],
        fallback=response.fallback,
        explanation=[item.reasons or [] for item in response.items] if context.reasons else None,
        timings_ms=response.timings_ms,
        propensities=context.propensities,
        choice=choice(context),
        **requested_note(context),
    )


def choice(context: RankContext) -> Choice:
    """How a decision's items were chosen, for its audit record."""
    if context.fallback is not None:
        return Choice(method="fallback", deterministic=True)
    exploration = context.exploration
    if exploration is None:
        return Choice(method="top_k", deterministic=True)
    return Choice(
        method=exploration.method,
        deterministic=False,
        explored=context.explored,
        seed=context.exploration_seed,
        exploration=exploration.model_dump(),
    )


def requested_note(context: RankContext) -> dict[str, ExplanationNote]:
    """`explained` of a record whose request asked for an explanation (else nothing:
    records stay as they were)."""
    given = context.explanation
    if not context.request.explain or given is None:
        return {}
    note = {"reason": given.reason} if given.reason else {}
    return {"explained": ExplanationNote(kind="requested", status=given.status, **note)}


def recorded_features(
    values: dict[str, Any],
    age_s: dict[str, float],
    context: dict[str, str],
    events_through: float | None,
) -> RecordedFeatures:
    """The features part of an audit record; `events_through` only where streaming
    views held events (records stay as they were without them)."""
    recorded = RecordedFeatures(values=values, age_s=age_s, context=context)
    if events_through is not None:
        recorded.events_through = events_through
    return recorded
