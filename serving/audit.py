"""The decision audit log: one record per ranking decision in a Redis Stream.

    redis_keys.audit(namespace)     stream, one entry per decision, field "record" = JSON

A record holds the request id, the pseudonymous user key (never the raw id), the
purpose and region, the policy version and its checks, the model version and
variant, the user feature values the model read and their age, the digest of
the item table used, the candidates, the ranking, the fallback reason, the
explanation when one was computed, and the stage timings. `rankgate audit
replay` re-scores a personalized decision from these and checks that it
reproduces the recorded ranking.

Records are queued in memory and written by one background task in pipelined
batches, so a request pays for a queue put, not for a Redis round trip, and a
short Redis outage loses nothing (up to `MAX_PENDING` records wait for it).
Retention: the stream is trimmed to about `audit.max_records` entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

import redis.asyncio as aioredis

from rankgate import redis_keys

logger = logging.getLogger("ray.serve")
MAX_PENDING = 50_000
BATCH = 256


class AuditWriter:
    def __init__(self, client: aioredis.Redis, namespace: str, max_records: int) -> None:
        self.client = client
        self.key = redis_keys.audit(namespace)
        self.max_records = max_records
        self.pending: deque[str] = deque()
        self.dropped = 0
        self.written = 0
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def record(self, entry: dict[str, Any]) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()  # Redis has been away too long: keep the newest
            self.dropped += 1
        self.pending.append(json.dumps(entry, separators=(",", ":")))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        self.wakeup.set()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            batch = [self.pending[n] for n in range(min(BATCH, len(self.pending)))]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for record in batch:
                        pipe.xadd(
                            self.key, {"record": record}, maxlen=self.max_records, approximate=True
                        )
                    await pipe.execute()
            except (OSError, aioredis.RedisError) as exc:
                logger.warning(
                    "audit write failed, %d records wait: %s", len(self.pending), type(exc).__name__
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            for _ in batch:
                self.pending.popleft()
            self.written += len(batch)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued record is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.pending

    async def close(self) -> None:
        await self.flush()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
