"""The canary's watch: every model-chosen answer feeds its variant's window, and the
canary is rolled back when a rule fires.

Request rules (errors, degraded answers, latency) are checked at most every
`ROLLBACK_CHECK_S` (they sort the window's latencies). Every `ROLLBACK_SYNC_S`,
off the response path, the watch takes up rollbacks other replicas recorded and
checks the click-rate rule: clicks arrive through the event stream, not the
request windows, so both variants' joined counters are read from Redis. A
rollback is counted, published as the canary's weight (0), recorded for the
other replicas (serving/observe/routing_log.py) and sent to the webhooks that take
rollbacks (the outbox of rankgate/governance/notifications.py).

The rules themselves, and who is in the canary, are the router's
(serving/ranking/routing.py); this module knows of it only what `Routes` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import redis.asyncio as aioredis

from serving.contract.config import RoutingConfig
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import ModelRef
from serving.observe.metrics import ServingMetrics
from serving.observe.outcomes import Exposure
from serving.observe.routing_log import ROLLBACK_SYNC_S, RollbackEvent, RoutingLog

ROLLBACK_CHECK_S = 0.05


class Routes(Protocol):
    """What the watch needs of a router."""

    config: RoutingConfig
    rolled_back: set[str]

    @property
    def canary_weight(self) -> float: ...

    @property
    def live_canary(self) -> str | None: ...

    def record(
        self, version: str, error: bool, degraded: bool, latency_ms: float, now: float | None = None
    ) -> None: ...

    def check_rollback(self, now: float | None = None) -> RollbackEvent | None: ...

    def check_ctr(
        self, canary: Exposure, stable: Exposure, now: float | None = None
    ) -> RollbackEvent | None: ...


class CanaryWatch:
    """Feeds the router's windows and acts on its rollback rules; one per serving config."""

    def __init__(self, router: Routes, log: RoutingLog, metrics: ServingMetrics) -> None:
        self.router = router
        self.log = log
        self.metrics = metrics
        self.background: set[asyncio.Task[None]] = set()
        self.synced_at = 0.0
        self.checked_at = 0.0

    def observe(self, model: ModelRef, reason: FallbackReason | None, latency_ms: float) -> None:
        """Feed the variant's window and roll the canary back when a rule fires."""
        self.router.record(
            model.version,
            error=reason is not None and reason.model_fault,
            degraded=reason is not None and reason.degraded,
            latency_ms=latency_ms,
        )
        now = time.monotonic()
        if now - self.checked_at < ROLLBACK_CHECK_S:
            return
        self.checked_at = now
        event = self.router.check_rollback(now)
        if event is not None:
            self._rolled_back(event)
        if time.monotonic() - self.synced_at > ROLLBACK_SYNC_S:
            self.synced_at = time.monotonic()
            self.spawn(self.sync_rollbacks())
            self.spawn(self._check_outcomes())

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run off the response path; keep a reference so the task is not collected."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def publish_weight(self) -> None:
        canary = self.router.config.canary
        if canary is not None:
            self.metrics.canary_weight.labels(canary.version).set(self.router.canary_weight)

    async def sync_rollbacks(self) -> None:
        """Take up the rollbacks other replicas recorded."""
        with contextlib.suppress(OSError, aioredis.RedisError):
            self.router.rolled_back |= await self.log.rolled_back()
        self.publish_weight()

    def _rolled_back(self, event: RollbackEvent) -> None:
        self.metrics.rollbacks.labels(event.version, event.rule).inc()
        self.publish_weight()
        self.spawn(self._record(event))

    async def _record(self, event: RollbackEvent) -> None:
        """For the other replicas and the audit of routing changes, then for the team."""
        await self.log.record_rollback(event)
        if not await self.log.notify_rollback(event, self.router.config.stable):
            self.metrics.notifications_unpublished.labels("rollback").inc()

    async def _check_outcomes(self) -> None:
        """The click-rate rule (when Redis does not answer, the next sync tries again)."""
        canary = self.router.live_canary
        if canary is None or self.router.config.rollback.ctr_p_value is None:
            return
        try:
            exposures = await self.log.exposures(canary, self.router.config.stable)
        except (OSError, aioredis.RedisError):
            return
        event = self.router.check_ctr(*exposures)
        if event is not None:
            self._rolled_back(event)
