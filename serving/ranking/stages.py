"""The stages of a rank request, and the one runner that runs them under its deadline.

A stage is a plain class with one method, `run(context, deadline)`, that reads and
fills the request's `RankContext` and returns a `StageResult`: completed, skipped
(nothing to do for this request), finished (the answer is complete: later stages
do not run) or degraded, with the `FallbackReason` and a detail. The stage knows
its dependencies through `Services`, nothing of Ray, HTTP, timings or metrics.

The `StageRunner` does the rest, the same way for every stage:
- the deadline: a stage that declares `on_timeout` is not started once the
  budget is spent and is cut off when it runs out, with that result; a stage
  without one keeps its own deadline (the gate answers even with no budget left,
  the explainer estimates its own cost);
- the timing: a stage with a `timing` name is timed into `timings_ms` under it
  (the per-stage metric is observed from those timings);
- the fallback: the first degraded result stops the stages and the fallback
  stage answers, naming the reason.

Stages register by name when their class is defined; `stages` and `fallback` in
the `pipeline` section of the serving config list which run, in order. A new
stage is one class and one entry in that list.

Lifecycle of a request: gate -> route -> fetch -> retrieve -> score -> explain, and
the fallback when one of them degrades (`retrieve`, in serving/ranking/retrieval.py,
narrows a request without candidates over a large catalogue).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from features.vector import ItemTable, build_matrix
from rankgate.core.errors import ConfigError
from rankgate.core.project import ItemId
from rankgate.core.topk import Pick
from rankgate.governance.consent import AsyncConsentStore
from rankgate.governance.policy import Exploration
from rankgate.governance.signals import ConsentSource
from serving.contract.config import ServingConfig
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import Explanation, Fallback, ModelRef, RankRequest
from serving.observe.drift import DriftMonitor
from serving.observe.metrics import ServingMetrics
from serving.ranking.explainer import Explainer
from serving.ranking.exploration import Selection, explore, greedy, new_seed
from serving.ranking.fallback import RuleFallback
from serving.ranking.feature_fetch import FeatureFetcher, UserFeatures
from serving.ranking.gate import ConsentGate, GateDecision
from serving.ranking.ranker import LoadedModel, ModelSet, ModelUnavailable
from serving.ranking.routing import Router

if TYPE_CHECKING:  # the index module loads faiss: only a replica with indexes needs it
    from serving.ranking.retrieval import ItemIndex

ScoreFn = Callable[[str, np.ndarray], Awaitable[np.ndarray]]


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


class Status(StrEnum):
    COMPLETED = "completed"
    SKIPPED = "skipped"
    """Nothing to do for this request (not timed)."""
    FINISHED = "finished"
    """The answer is complete: the stages after this one do not run."""
    DEGRADED = "degraded"
    """The fallback answers, for `reason`."""


@dataclass(frozen=True)
class StageResult:
    status: Status
    reason: FallbackReason | None = None
    detail: str | None = None

    @classmethod
    def degraded(cls, reason: FallbackReason, detail: str | None = None) -> StageResult:
        return cls(Status.DEGRADED, reason, detail)


COMPLETED = StageResult(Status.COMPLETED)
SKIPPED = StageResult(Status.SKIPPED)
FINISHED = StageResult(Status.FINISHED)


@dataclass
class RankContext:
    """One request on its way through the stages: what each stage leaves for the next."""

    request: RankRequest
    key: str
    """The pseudonymous key (never the raw id) of the request's id; after the gate,
    of its person (the one a linked id belongs to)."""
    candidates: Sequence[ItemId]
    timings: dict[str, float]
    decision: GateDecision | None = None
    consent_via: str | None = None
    """"linked-id" when the person's consent was read through a link (the gate's source)."""
    eligible: list[ItemId] = field(default_factory=list)
    """The candidates the policy allows to be shown (stages may narrow them)."""
    model_ref: ModelRef | None = None
    model: LoadedModel | None = None
    shadows: list[str] = field(default_factory=list)
    user: UserFeatures | None = None
    items: ItemTable | None = None
    """The item table the matrix was built from (its digest goes to the audit record)."""
    matrix: np.ndarray | None = None
    scores: np.ndarray | None = None
    """The model's score of each row of `matrix`."""
    whole_catalogue: bool = False
    """No candidates named and more allowed items than `retrieval.above_items`: the
    ranker sees what retrieval finds, the fallback ranks the allowed catalogue."""
    retrieved: dict[str, int] | None = None
    """Items each retrieval source gave, when the request was retrieved for."""
    picks: list[Pick[ItemId]] = field(default_factory=list)
    ranked: list[tuple[ItemId, float]] = field(default_factory=list)
    propensities: list[float] = field(default_factory=list)
    """Per shown item, the probability the serving policy put it at its position."""
    exploration: Exploration | None = None
    """The purpose's exploration, when the answer was drawn by it (None: deterministic)."""
    exploration_seed: int | None = None
    """The seed of that draw: replay draws the same answer."""
    explored: bool = False
    """The drawn answer differs from the model's top k."""
    reasons: list[list] | None = None
    contributions: np.ndarray | None = None
    """SHAP values of the explained rows (rows x model inputs), when explained."""
    explanation: Explanation | None = None
    reason: FallbackReason | None = None
    detail: str | None = None
    fallback: Fallback | None = None

    @property
    def scored(self) -> bool:
        """The model ranked this answer (no fallback)."""
        return self.matrix is not None and self.fallback is None

    def require_decision(self) -> GateDecision:
        assert self.decision is not None, "the gate stage runs first"
        return self.decision

    def require_model(self) -> tuple[ModelRef, LoadedModel]:
        assert self.model_ref is not None and self.model is not None, "the route stage runs first"
        return self.model_ref, self.model

    def explained_rows(self, max_items: int) -> np.ndarray:
        """The model inputs of the returned items an explanation covers (the first
        `max_items`, best first): the rows SHAP explains, asked for or sampled."""
        assert self.matrix is not None, "score runs first"
        return self.matrix[[pick.position for pick in self.picks[:max_items]]]


@dataclass
class Services:
    """What the stages read: built once per serving config, shared by all requests."""

    config: ServingConfig
    gate: ConsentGate
    consent: AsyncConsentStore
    fetcher: FeatureFetcher
    models: ModelSet
    router: Router
    score: ScoreFn
    explainers: dict[str, Explainer]
    fallback: RuleFallback
    metrics: ServingMetrics
    fields_of: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """The fields each loaded version reads per user view (the Feast reads it needs)."""
    drift: DriftMonitor | None = None
    """Watches the rows each version scores for drift (None: not watched)."""
    merged_fields: dict[tuple[str, ...], dict[str, list[str]]] = field(default_factory=dict)
    retrieval: Mapping[str, ItemIndex] = field(default_factory=dict)
    """The item index of each loaded version that has one (the `retrieve` stage)."""
    allowed: dict[tuple[int, frozenset[ItemId]], tuple[list[ItemId], list[ItemId]]] = field(
        default_factory=dict
    )

    def allowed_catalogue(self, excluded: frozenset[ItemId]) -> list[ItemId]:
        """The catalogue without `excluded`, computed once per exclusion set and
        catalogue (a request without candidates pays a lookup, not a pass over it)."""
        catalogue = self.fetcher.catalogue
        key = (id(catalogue), excluded)
        cached = self.allowed.get(key)
        if cached is None or cached[0] is not catalogue:  # an id is reused once freed
            if len(self.allowed) >= 64:
                self.allowed.clear()
            allowed = [c for c in catalogue if c not in excluded] if excluded else catalogue
            cached = (catalogue, allowed)
            self.allowed[key] = cached
        return cached[1]

    def fields_for(self, versions: tuple[str, ...]) -> dict[str, list[str]]:
        """The fields a request scored by `versions` reads, merged once per combination
        (a request pays a dictionary lookup, not the merge)."""
        fields = self.merged_fields.get(versions)
        if fields is None:
            fields = merge_fields(self.fields_of.get(v, {}) for v in versions)
            self.merged_fields[versions] = fields
        return fields


STAGES: dict[str, type[Stage]] = {}
"""Every stage class by name; a subclass of `Stage` with a `name` registers itself."""


class Stage:
    name: ClassVar[str]
    timing: ClassVar[str | None] = None
    """The key of `timings_ms` this stage's time goes to; None: not timed on its own."""
    on_timeout: ClassVar[StageResult | None] = None
    """The result when the deadline passes before or while this stage runs; None:
    the runner neither skips nor cuts the stage, it keeps the deadline itself."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in STAGES:
            raise TypeError(f"stage {name!r} is defined twice: {STAGES[name]} and {cls}")
        STAGES[name] = cls

    def __init__(self, services: Services) -> None:
        self.services = services

    def applies(self, context: RankContext) -> bool:
        """False: nothing to do for this request; the runner skips the stage without
        timing it or arming its deadline."""
        return True

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        raise NotImplementedError


class GateStage(Stage):
    """May this person be personalized for this purpose, and which items may be shown."""

    name = "gate"
    timing = "policy"

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        request, gate = context.request, self.services.gate
        if deadline.remaining_s() <= 0:
            # Spent in the queues: answer at once, without reading consent (fails
            # closed: not personalized); the item rules still apply.
            decision = gate.unread(request.purpose, request.region, "budget spent queued")
        else:
            person = await self.services.consent.read_person(
                context.key, request.purpose, deadline.remaining_s()
            )
            signals = request.consent.signals() if request.consent is not None else None
            if person is None:
                decision = gate.decide(request.purpose, request.region, None, signals=signals)
            else:
                # Everything after the gate is about the person, whichever id asked.
                context.key, context.consent_via = person.person, person.via
                decision = gate.decide(
                    request.purpose,
                    request.region,
                    person.state,
                    signals=signals,
                    stored_source=person.via or ConsentSource.STORED,
                )
        context.decision = decision
        excluded = decision.excluded_items
        if request.candidates is None:
            context.eligible = self.services.allowed_catalogue(excluded)
            above = self.services.config.retrieval.above_items
            context.whole_catalogue = len(context.eligible) > above
        else:
            context.eligible = [c for c in context.candidates if c not in excluded]
        if decision.reason is FallbackReason.BUDGET_EXHAUSTED:
            return StageResult.degraded(FallbackReason.BUDGET_EXHAUSTED, "queued")
        if not decision.personalize:
            return StageResult.degraded(decision.reason or FallbackReason.NO_CONSENT)
        return COMPLETED


class RouteStage(Stage):
    """The model version that answers: the person's variant if the purpose permits its
    views and the region its training data (residency), else the next that both permit."""

    name = "route"

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        models, router = self.services.models, self.services.router
        decision = context.require_decision()
        region = context.request.region  # residency: its rule's accepted versions
        assignment = router.choose(context.key, decision.allowed_views, models.views_of, region)
        if assignment is None:
            return self.unrouted(context, decision.allowed_views)
        version = assignment.version
        context.model_ref = ModelRef(name=models.name, version=version, variant=assignment.variant)
        context.model = models.loaded.get(version)
        if context.model is None:
            return StageResult.degraded(
                FallbackReason.MODEL_UNAVAILABLE, models.errors.get(version)
            )
        if not context.eligible:
            return FINISHED  # nothing may be shown: an empty, personalized answer
        return COMPLETED

    def unrouted(self, context: RankContext, allowed_views: frozenset[str]) -> StageResult:
        """No version answers: residency if one would without the region's rule, else none."""
        if self.services.router.choose(context.key, allowed_views, self.services.models.views_of):
            return StageResult.degraded(  # a decision, like a consent refusal
                FallbackReason.RESIDENCY,
                f"residency.{context.request.region} accepts the training data of none of "
                f"the versions {context.request.purpose} may use here",
            )
        return StageResult.degraded(FallbackReason.NO_PERMITTED_MODEL)


class FetchStage(Stage):
    """The person's features: only the views the model (and permitted shadows) read."""

    name = "fetch"
    timing = "features"
    on_timeout = StageResult.degraded(FallbackReason.FEATURE_TIMEOUT)

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        services = self.services
        decision = context.require_decision()
        model_ref, _ = context.require_model()
        router, views_of = services.router, services.models.views_of
        context.shadows = router.shadows(decision.allowed_views, views_of, context.request.region)
        fields = services.fields_for((model_ref.version, *context.shadows))
        try:
            user = await services.fetcher.fetch_user(context.key, fields)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - the online store failed: degrade
            return StageResult.degraded(FallbackReason.FEATURE_ERROR, type(exc).__name__)
        for view, age in user.age_s.items():
            services.metrics.child(services.metrics.feature_age, view).observe(age)
        if user.missing_views:
            return StageResult.degraded(
                FallbackReason.FEATURES_MISSING, ",".join(user.missing_views)
            )
        if user.stale_views:
            return StageResult.degraded(FallbackReason.FEATURES_STALE, ",".join(user.stale_views))
        # One item table for the matrix and the audit record.
        context.user, context.items = user, services.fetcher.items
        return COMPLETED


async def scored(services: Services, version: str, matrix: np.ndarray) -> np.ndarray | StageResult:
    """The version's scores of `matrix`, or the degraded result that names why not (a
    timeout is the runner's to handle)."""
    try:
        return await services.score(version, matrix)
    except TimeoutError:
        raise
    except ModelUnavailable as exc:
        return StageResult.degraded(FallbackReason.MODEL_UNAVAILABLE, exc.message)
    except Exception as exc:  # noqa: BLE001 - an ONNX error must not fail the request
        return StageResult.degraded(FallbackReason.MODEL_ERROR, type(exc).__name__)


class RetrieveStage(Stage):
    """The items the ranker scores for a request without candidates over a large
    catalogue: gathered from the version's item index by the configured sources
    (serving/ranking/retrieval.py). A person the gate does not clear never gets here."""

    name = "retrieve"
    timing = "retrieve"
    on_timeout = StageResult.degraded(FallbackReason.BUDGET_EXHAUSTED, "retrieval")

    def applies(self, context: RankContext) -> bool:
        return context.whole_catalogue

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        config = self.services.config.retrieval
        model_ref, model = context.require_model()
        assert context.user is not None and context.items is not None, "fetch runs first"
        index = self.services.retrieval.get(model_ref.version)
        if index is None:
            return StageResult.degraded(
                FallbackReason.RETRIEVAL_UNAVAILABLE, f"{model_ref.version} has no item index"
            )
        request, user, items = context.request, context.user, context.items
        excluded = context.require_decision().excluded_items
        anchors = index.anchors  # ids and map together, whatever a refresh does meanwhile
        try:
            rows = build_matrix(model.specs, user.values, items, anchors.ids, request.context)
        except KeyError as exc:  # an anchor left the catalogue as this request began
            return StageResult.degraded(FallbackReason.RETRIEVAL_UNAVAILABLE, f"anchor {exc}")
        scores = await scored(self.services, model_ref.version, rows)
        if isinstance(scores, StageResult):
            return scores
        try:
            found, context.retrieved = index.gather(
                config.sources, request.k, anchors.query(scores), rows[0], user.values, excluded
            )
        except Exception as exc:  # noqa: BLE001 - a failed search degrades, named
            return StageResult.degraded(FallbackReason.RETRIEVAL_UNAVAILABLE, type(exc).__name__)
        # Items the index gained after this request read its item table wait for the next.
        context.eligible = [item for item in found if item in items]
        return COMPLETED


class ScoreStage(Stage):
    """The model's scores of the eligible items, and their top k."""

    name = "score"
    timing = "rank"
    on_timeout = StageResult.degraded(FallbackReason.BUDGET_EXHAUSTED, "ranker")

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        model_ref, model = context.require_model()
        assert context.user is not None and context.items is not None, "fetch runs first"
        request, items = context.request, context.items
        try:
            matrix = build_matrix(
                model.specs, context.user.values, items, context.eligible, request.context
            )
        except KeyError:  # a candidate left the catalogue after the request was checked
            context.eligible = [item for item in context.eligible if item in items]
            matrix = build_matrix(
                model.specs, context.user.values, items, context.eligible, request.context
            )
        scores = await scored(self.services, model_ref.version, matrix)
        if isinstance(scores, StageResult):
            return scores
        context.matrix, context.scores = matrix, scores
        selection = self.select(context, scores)
        context.picks, context.propensities = selection.picks, selection.propensities
        context.explored = selection.explored
        context.ranked = [(pick.item_id, pick.score) for pick in context.picks]
        return COMPLETED

    def select(self, context: RankContext, scores: np.ndarray) -> Selection:
        """The model's top k, or a draw of the purpose's exploration (the gate has
        cleared this person: the score stage runs only for them)."""
        request = context.request
        exploration = self.services.gate.policy.purposes[request.purpose].exploration
        if exploration is None:
            return greedy(context.eligible, scores, request.k)
        context.exploration, context.exploration_seed = exploration, new_seed()
        selection = explore(
            exploration, context.eligible, scores, request.k, context.exploration_seed
        )
        metrics = self.services.metrics
        metrics.child(
            metrics.exploration,
            request.purpose,
            exploration.method,
            str(selection.explored).lower(),
        ).inc()
        return selection


class ExplainStage(Stage):
    """Reasons for the returned items, when asked for and the budget covers them.

    Never degrades the answer: an explanation that cannot be given is omitted and
    says why."""

    name = "explain"
    timing = "explain"

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        if not context.request.explain:
            return SKIPPED
        model_ref, _ = context.require_model()
        context.explanation = self.explain(context, model_ref.version, deadline)
        return COMPLETED

    def explain(self, context: RankContext, version: str, deadline: Deadline) -> Explanation:
        """Fills the context's reasons and contributions; says whether it could."""
        explainer = self.services.explainers.get(version)
        if explainer is None:
            return Explanation(status="omitted", reason="explainer_unavailable")
        limits = self.services.config.explainer
        rows = context.explained_rows(limits.max_items)
        needed_s = len(rows) * limits.ms_per_row_estimate / 1000.0
        if deadline.remaining_s() < needed_s:
            return Explanation(status="omitted", reason="budget_exhausted")
        try:
            # One thread: for the few rows of an answer LightGBM's thread pool costs
            # more than it saves (10 rows: 1.2 ms on one thread, 3.7 ms on the pool).
            values = explainer.contributions(rows, threads=1)
            context.reasons = explainer.reasons(values)
        except Exception:  # noqa: BLE001 - an explainer error never fails the answer
            return Explanation(status="omitted", reason="explainer_error")
        context.contributions = values
        return Explanation(status="explained")


class RuleFallbackStage(Stage):
    """The degraded answer: the rule-based ranking of the eligible items (it needs no
    other service and costs microseconds, so it always answers)."""

    name = "rules"

    async def run(self, context: RankContext, deadline: Deadline) -> StageResult:
        assert context.reason is not None, "the runner names the reason first"
        fallback = self.services.fallback
        detail = {"detail": context.detail} if context.detail else {}
        context.fallback = Fallback(reason=context.reason, strategy=fallback.strategy, **detail)
        if context.whole_catalogue:
            context.ranked = fallback.rank_many(context.eligible, context.request.k)
        else:
            context.ranked = fallback.rank(context.eligible, context.request.k)
        context.propensities = [1.0] * len(context.ranked)
        context.exploration, context.exploration_seed, context.explored = None, None, False
        context.reasons = None
        if context.request.explain:
            context.explanation = Explanation(status="omitted", reason="not_personalized")
        return COMPLETED


class StageRunner:
    """Runs the configured stages of one request under its deadline (see the module docstring)."""

    def __init__(self, stages: Sequence[Stage], fallback: Stage) -> None:
        self.stages = list(stages)
        self.fallback = fallback
        self.timing_keys = [stage.timing for stage in self.stages if stage.timing]

    @classmethod
    def build(cls, names: Sequence[str], fallback: str, services: Services) -> StageRunner:
        return cls([stage_class(n)(services) for n in names], stage_class(fallback)(services))

    def timings(self, queued_ms: float) -> dict[str, float]:
        """The timings of a request before it runs: every timed stage at 0."""
        return {"queued": queued_ms} | {key: 0.0 for key in self.timing_keys}

    async def run(self, context: RankContext, deadline: Deadline) -> None:
        for stage in self.stages:
            if not stage.applies(context):
                continue
            result = await self.timed(stage, context, deadline)
            if result.status is Status.FINISHED:
                return
            if result.status is Status.DEGRADED:
                assert result.reason is not None
                context.reason, context.detail = result.reason, result.detail
                await self.fallback.run(context, deadline)
                return

    async def timed(self, stage: Stage, context: RankContext, deadline: Deadline) -> StageResult:
        started = time.perf_counter()
        result = await self.within_deadline(stage, context, deadline)
        if stage.timing and result.status is not Status.SKIPPED:
            context.timings[stage.timing] = (time.perf_counter() - started) * 1000.0
        return result

    @staticmethod
    async def within_deadline(
        stage: Stage, context: RankContext, deadline: Deadline
    ) -> StageResult:
        if stage.on_timeout is None:
            return await stage.run(context, deadline)
        if deadline.remaining_s() <= 0:
            return stage.on_timeout
        # asyncio.timeout, not wait_for: the stage runs in the request's own task
        # (no task per stage).
        try:
            async with asyncio.timeout(deadline.remaining_s()):
                return await stage.run(context, deadline)
        except TimeoutError:
            return stage.on_timeout


def stage_class(name: str) -> type[Stage]:
    try:
        return STAGES[name]
    except KeyError:
        known = ", ".join(sorted(STAGES))
        raise ConfigError(f"unknown stage {name!r} (known: {known})") from None


def merge_fields(maps: Iterable[Mapping[str, list[str]]]) -> dict[str, list[str]]:
    """One read per view for several models: the union of their fields, in order."""
    merged: dict[str, dict[str, None]] = {}
    for fields in maps:
        for view, names in fields.items():
            merged.setdefault(view, {}).update(dict.fromkeys(names))
    return {view: list(names) for view, names in merged.items()}
