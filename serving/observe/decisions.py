"""After the answer: a decision's audit record, its sampled explanation, its freshness.

The pipeline (serving/ranking/pipeline.py) hands each decision over as a function
that builds its record (and, when the sample chose it, what to explain), so that
the record's cost is paid off the response path: on the event loop's next turn
once the answer is on its way, or, with `audit.before_answer`, before it is sent
(bounded: a Redis outage delays answers, never refuses them).

A decision the sample chose (serving/observe/sampling.py) is explained by the
worker thread; its record is held until the explanation is in, and is written
all the same, saying why, when it cannot be explained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache

from serving.contract.config import ServingConfig
from serving.contract.schemas import ExplanationStatus
from serving.observe.audit import BEFORE_ANSWER_WAIT_S, AuditRecord, AuditWriter, ExplanationNote
from serving.observe.metrics import ServingMetrics
from serving.observe.sampling import (
    Explains,
    ExplanationObserver,
    ExplanationWorker,
    SampledExplanation,
)

SEEN_PEOPLE = 100_000
"""People whose newest included event a replica remembers (event-to-decision latency)."""
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Sample:
    """A decision the sample chose, as the pipeline hands it over."""

    version: str
    explainer: Explains | None
    """None: the version has no explainer (the record says so)."""
    rows: np.ndarray | None
    """The model inputs of the returned items to explain."""
    contributions: np.ndarray | None = None
    """Given when the request asked for its explanation: not computed twice."""


Decision = Callable[[], tuple[AuditRecord, Sample | None]]
"""Builds a decision's record, and its sample when the sample chose it."""


class DecisionRecorder:
    """Writes decisions' records (and their sampled explanations); one per replica."""

    def __init__(
        self,
        audit: AuditWriter,
        metrics: ServingMetrics,
        worker: ExplanationWorker | None = None,
        observers: list[ExplanationObserver] | None = None,
    ) -> None:
        self.audit = audit
        self.metrics = metrics
        self.worker = worker or ExplanationWorker()
        # Called with each explanation of the sample of traffic: computed for it, or
        # asked for by a request the sample chose. Only the sample: explanations asked
        # for follow whoever asks, the sample is uniform.
        self.observers: list[ExplanationObserver] = observers if observers is not None else []
        # Person -> acceptance time of the newest event a decision of theirs included.
        self.events_seen: LRUCache[str, float] = LRUCache(SEEN_PEOPLE)

    def wanted(self, config: ServingConfig) -> bool:
        """Whether decisions are kept: in the audit stream, or indexed for outcomes."""
        return config.audit.enabled or self.audit.decision_ttl_s is not None

    async def before_answer(self, decision: Decision, config: ServingConfig) -> None:
        """Record now and wait, bounded, until the record is in Redis (the record stays
        queued and is written when Redis is back)."""
        written = asyncio.get_running_loop().create_future()
        self.audit.hold()
        self._record(decision, config, written)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(written), BEFORE_ANSWER_WAIT_S)

    def after_answer(self, decision: Decision, config: ServingConfig) -> None:
        """Built and queued on the event loop's next turn, once the answer is on its
        way. Held until then, so that a flush waits for it."""
        self.audit.hold()
        asyncio.get_running_loop().call_soon(self._record, decision, config)

    def observe_freshness(self, key: str, through: float) -> None:
        """The first decision to include a person's newest event measures how long the
        event took from its 202 to a decision (per replica: with several, the first
        replica to serve the person after it counts)."""
        if self.events_seen.get(key, 0.0) < through:
            self.events_seen[key] = through
            self.metrics.event_to_decision.observe(max(time.time() - through, 0.0))

    def _record(
        self, decision: Decision, config: ServingConfig, written: asyncio.Future[None] | None = None
    ) -> None:
        """The record queued (or held for its sampled explanation); releases the hold
        taken when it was handed over. `written`: resolved once it is in Redis."""
        try:
            record, sample = decision()
            if sample is None or not self._sample(record, sample, config, written):
                self.audit.record(record, config.audit.enabled, written)
        finally:
            self.audit.unhold()

    def _sample(
        self,
        record: AuditRecord,
        sample: Sample,
        config: ServingConfig,
        written: asyncio.Future[None] | None,
    ) -> bool:
        """Explain the decision off the response path. True: its record is held, and
        written once the explanation is in."""
        version = sample.version
        if sample.contributions is not None:
            self._observe_explanation(version, sample.contributions)
            return False
        if sample.explainer is None or sample.rows is None:
            self._note(record, version, "omitted", "explainer_unavailable")
            return False

        def done(outcome: SampledExplanation) -> None:
            self._sampled(record, version, outcome, written)

        if not self.worker.submit(
            sample.explainer, sample.rows, config.explainer.sample_queue, done
        ):
            self._note(record, version, "omitted", "queue_full")
            return False
        self.audit.hold()
        return True

    def _sampled(
        self,
        record: AuditRecord,
        version: str,
        outcome: SampledExplanation,
        written: asyncio.Future[None] | None,
    ) -> None:
        """On the event loop: the sampled explanation into its record, and the record out."""
        try:
            if outcome.reasons is None or outcome.contributions is None:
                self._note(record, version, "omitted", "explainer_error")
                return
            # The shape of an explanation asked for: [] for items after max_items.
            missing = len(record.items) - len(outcome.reasons)
            record.explanation = outcome.reasons + [[] for _ in range(missing)]
            self._note(record, version, "explained")
            self.metrics.sampled_seconds.labels(version).observe(outcome.seconds)
            self._observe_explanation(version, outcome.contributions)
        finally:
            self.audit.release(record, written=written)

    def _note(
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
        for observer in self.observers:
            try:
                observer(version, contributions)
            except Exception:  # an observer never costs a record or an answer
                logger.exception("explanation observer %r failed", observer)
