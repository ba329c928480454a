"""Consent records in Redis, per person and purpose, under the pseudonymous key
(`rankgate.core.redis_keys.consent`): a hash of purpose -> {"granted": bool, "source": str,
"updated_at": iso}.

No field for a purpose means no recorded decision ("unknown").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum

import redis.asyncio as aioredis

from rankgate.core import redis_keys
from rankgate.core.errors import RETRY_SOON, RankgateError
from rankgate.core.redis_server import AsyncRedisClient, RedisClient

logger = logging.getLogger("ray.serve")


class ConsentState(StrEnum):
    GRANTED = "granted"
    DENIED = "denied"
    UNKNOWN = "unknown"


def consent_fields(purposes: Mapping[str, bool], source: str) -> dict[str, str]:
    """Hash fields of a consent record: one per purpose decided."""
    now = datetime.now(UTC).isoformat()
    return {
        purpose: json.dumps({"granted": bool(granted), "source": source, "updated_at": now})
        for purpose, granted in purposes.items()
    }


def parse_state(raw: bytes | str | None) -> ConsentState:
    if raw is None:
        return ConsentState.UNKNOWN
    record = json.loads(raw)
    return ConsentState.GRANTED if record.get("granted") else ConsentState.DENIED


class ConsentStore:
    def __init__(self, client: RedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def record(self, key: str, purposes: Mapping[str, bool], source: str) -> None:
        fields = consent_fields(purposes, source)
        if fields:
            self.client.hset(redis_keys.consent(self.namespace, key), mapping=fields)

    def state(self, key: str, purpose: str) -> ConsentState:
        raw = self.client.hget(redis_keys.consent(self.namespace, key), purpose)
        return parse_state(raw)  # type: ignore[arg-type]  # sync client

    def states(self, keys: Iterable[str], purpose: str) -> list[ConsentState]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(redis_keys.consent(self.namespace, key), purpose)
        return [parse_state(raw) for raw in pipe.execute()]


class ConsentStoreUnavailable(RankgateError):
    """The consent store did not take a write: nothing was recorded; retry."""

    status_code = 503
    error = "consent_store_unavailable"
    headers = RETRY_SOON


class AsyncConsentStore:
    """The serving replicas' consent store: reads within a request's deadline, and
    the writes of the consent API."""

    def __init__(self, client: AsyncRedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    async def read(self, key: str, purpose: str, timeout_s: float) -> ConsentState | None:
        """Consent of the person for the purpose; None when it cannot be read in time."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                raw = await self.client.hget(redis_keys.consent(self.namespace, key), purpose)  # type: ignore[misc]
        except (TimeoutError, OSError, aioredis.RedisError):
            return None
        return parse_state(raw)

    async def record(self, key: str, purposes: Mapping[str, bool], source: str) -> None:
        """One HSET: all purposes of a write are recorded together or not at all.
        Raises `ConsentStoreUnavailable` when the store cannot take it."""
        try:
            await self.client.hset(  # type: ignore[misc]
                redis_keys.consent(self.namespace, key), mapping=consent_fields(purposes, source)
            )
        except (OSError, aioredis.RedisError) as exc:
            logger.warning("consent write failed: %s", type(exc).__name__)
            raise ConsentStoreUnavailable("the consent was not recorded; retry") from exc


def demo_consent(user_id: str, purposes: Iterable[str]) -> dict[str, bool]:
    """Deterministic demo decisions: per purpose about 50 % granted, 25 % denied, 25 % none.

    Purposes left out of the result have no record (consent unknown).
    """
    decisions: dict[str, bool] = {}
    for purpose in purposes:
        bucket = hashlib.sha256(f"{user_id}/{purpose}".encode()).digest()[0] % 4
        if bucket < 2:
            decisions[purpose] = True
        elif bucket == 2:
            decisions[purpose] = False
    return decisions
