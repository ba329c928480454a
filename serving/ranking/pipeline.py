"""The request path: run the stages under one deadline, answer.

`RankPipeline` knows nothing of Ray or HTTP. The replica runtime (serving/runtime.py)
builds one per serving config and hands it a `score` coroutine (in-process batched
scoring, or a call to a ranker deployment, as placement config says). The stages
(serving/ranking/stages.py: gate -> route -> fetch -> score -> explain) each get what is
left of the request's budget; a stage that fails or would overrun degrades the
answer to the fallback, which names its reason. Only bad input raises.

After the answer, the decision goes to what watches it: the canary's window
(serving/observe/canary.py), shadow versions (serving/ranking/shadows.py), the drift
windows, and the audit record with its sampled explanation
(serving/observe/decisions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from functools import partial

from features.vector import user_fields
from rankgate.core.errors import ConfigError
from rankgate.core.project import ItemId
from rankgate.core.pseudonym import user_key as pseudonymise
from rankgate.governance.identity import request_key
from serving.contract.schemas import RankRequest, RankResponse, RequestRules
from serving.observe.audit import AuditRecord
from serving.observe.canary import CanaryWatch
from serving.observe.decisions import DecisionRecorder, Sample
from serving.observe.sampling import chosen
from serving.ranking.decision import answer, audit_record
from serving.ranking.shadows import ShadowScorer
from serving.ranking.stages import (
    Deadline,
    RankContext,
    Services,
    StageResult,
    StageRunner,
    merge_fields,
)

TEST_STAGE_BUSY_ENV = "RANKGATE_TEST_STAGE_BUSY_MS"
"""For testing the benchmark's guard only (tests/ops/test_bench_guard.py): `score=10`
makes the `score` stage burn 10 ms of CPU after it runs, in every request, a
regression seeded on purpose. Unset, as everywhere else, it changes nothing."""


def seed_busy_loop(runner: StageRunner, environ: Mapping[str, str] = os.environ) -> None:
    """Slow the stage `RANKGATE_TEST_STAGE_BUSY_MS` names, when it names one."""
    text = environ.get(TEST_STAGE_BUSY_ENV, "").strip()
    if not text:
        return
    name, _, value = text.partition("=")
    stage = next((s for s in runner.stages if s.name == name.strip()), None)
    try:
        seconds = float(value) / 1000.0
    except ValueError:
        seconds = -1.0
    if stage is None or seconds < 0:
        raise ConfigError(
            f"{TEST_STAGE_BUSY_ENV}={text!r}: expected STAGE=MILLISECONDS with one of "
            f"the configured stages ({', '.join(s.name for s in runner.stages)})"
        )
    run = stage.run

    async def run_then_spin(context: RankContext, deadline: Deadline) -> StageResult:
        result = await run(context, deadline)
        spent_by = time.thread_time() + seconds
        while time.thread_time() < spent_by:
            pass
        return result

    setattr(stage, "run", run_then_spin)  # noqa: B010 (this instance only)


class RankPipeline:
    """Runs the configured stages for one request and answers; one per serving config."""

    def __init__(
        self,
        services: Services,
        canary: CanaryWatch,
        shadows: ShadowScorer,
        recorder: DecisionRecorder,
    ) -> None:
        self.services = services
        self.canary = canary
        self.shadows = shadows
        self.recorder = recorder
        if services.drift is not None:
            observe = services.drift.observe_explanations
            if observe not in recorder.observers:
                recorder.observers.append(observe)
        config, fetcher = services.config, services.fetcher
        self.runner = StageRunner.build(config.pipeline.stages, config.pipeline.fallback, services)
        seed_busy_loop(self.runner)
        self.rules_catalogue: list[ItemId] | None = None
        """The catalogue `rules` were built from (a refresh that keeps the list keeps them)."""
        self.follow_catalogue()
        if not services.fields_of:
            services.fields_of = {
                version: user_fields(model.specs, fetcher.infos)
                for version, model in services.models.loaded.items()
            }

    def follow_catalogue(self) -> None:
        """What a request may say here: this config's bounds, this policy, the current
        catalogue (again after a refresh adds or removes items)."""
        services = self.services
        fetcher = services.fetcher
        if self.rules_catalogue is fetcher.catalogue:
            return
        self.rules_catalogue = fetcher.catalogue
        self.rules = RequestRules.of(
            services.config.limits,
            services.config.budget,
            services.gate.policy.purposes,
            services.gate.policy.regions,
            fetcher.catalogue,
            fetcher.project.spec.item.id_type,
            fetcher.project.context,
        )

    async def warm_up(self) -> None:
        """Open the Redis connections (consent and Feast) before the first request pays for it."""
        services, probe = self.services, pseudonymise("rankgate-warm-up")
        await self.canary.sync_rollbacks()
        await services.consent.read_person(probe, next(iter(services.gate.policy.purposes)), 5.0)
        fields = merge_fields(services.fields_of.values())
        # A store that is down now is handled per request; warming up is best effort.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(services.fetcher.fetch_user(probe, fields), timeout=5)

    async def rank(
        self, request: RankRequest, app: str | None = None, queued_ms: float = 0.0
    ) -> RankResponse:
        """Rank for one request; `app` (the caller's application) goes to the audit record,
        `queued_ms` (time since arrival) counts against the budget."""
        services = self.services
        config = services.config
        deadline = Deadline(request.budget_ms or config.budget.default_ms, queued_ms)
        context = RankContext(
            request=request,
            key=request_key(request.user_id, request.anonymous_id),
            candidates=request.candidates or services.fetcher.catalogue,
            timings=self.runner.timings(queued_ms),
        )
        await self.runner.run(context, deadline)
        self._watch(context, deadline)
        response = answer(context, deadline)
        services.metrics.observe(request, response)
        if response.freshness is not None:
            self.recorder.observe_freshness(context.key, response.freshness.events_through)
        if self.recorder.wanted(config):
            decision = partial(self._decision, context, response, app)
            if config.audit.before_answer:
                await self.recorder.before_answer(decision, config)
            else:
                self.recorder.after_answer(decision, config)
        return response

    def _watch(self, context: RankContext, deadline: Deadline) -> None:
        """The drift windows, the canary's window and the shadows see the decision."""
        drift = self.services.drift
        if drift is not None and context.scored and context.scores is not None:
            assert context.model_ref is not None and context.matrix is not None
            drift.observe(context.model_ref.version, context.matrix, context.scores)
        if context.model_ref is not None:
            self.canary.observe(context.model_ref, context.reason, deadline.elapsed_ms())
        if context.scored and context.user is not None:
            for shadow in context.shadows:
                self.canary.spawn(
                    self.shadows.score(
                        shadow,
                        context.user,
                        context.eligible,
                        context.ranked,
                        context.request.context,
                    )
                )

    def _decision(
        self, context: RankContext, response: RankResponse, app: str | None
    ) -> tuple[AuditRecord, Sample | None]:
        """The decision's record, and what to explain when the sample chose it."""
        record = audit_record(context, response, app)
        config = self.services.config
        if not (
            config.audit.enabled
            and context.scored
            and context.ranked
            and context.model_ref is not None
            and chosen(record.request_id, config.explainer.sample_rate)
        ):
            return record, None
        version = context.model_ref.version
        if context.contributions is not None:  # asked for and given: not computed twice
            return record, Sample(version, None, None, context.contributions)
        explainer = self.services.explainers.get(version)
        rows = context.explained_rows(config.explainer.max_items) if explainer else None
        return record, Sample(version, explainer, rows)
