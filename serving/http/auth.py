"""Who may call `/v1`: API keys scoped to purposes (see rankgate/governance/api_keys.py).

The replica keeps the key table in memory and re-reads it in the background
every `auth.refresh_s`, traffic or not, so a known key is checked without a
Redis round trip and a revoked one stops working within that interval.
An unknown key makes the replica re-read the table first (at most every
`MISS_REFRESH_S`; a miss inside that window waits for its end), so a key
created a moment ago works at once.
Missing and wrong keys get the same 401, so a caller learns nothing about
which keys or applications exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import MappingProxyType

import redis.asyncio as aioredis

from rankgate.core import redis_keys
from rankgate.core.errors import RETRY_SOON, RankgateError
from rankgate.core.redis_server import AsyncRedisClient
from rankgate.governance.api_keys import ApiKey, KeyTable, is_key_shaped

logger = logging.getLogger("ray.serve")
LOAD_TIMEOUT_S = 1.0
RETRY_UNLOADED_S = 0.5
MISS_REFRESH_S = 0.1


class Unauthorized(RankgateError):
    status_code = 401
    error = rejection = "unauthorized"
    headers = MappingProxyType({"WWW-Authenticate": "Bearer"})


class Forbidden(RankgateError):
    status_code = 403
    error = rejection = "forbidden"


class AuthUnavailable(RankgateError):
    """A key cannot be checked: the table was never read, or an unknown key could be
    one created since the last read and Redis cannot be read now."""

    status_code = 503
    error = rejection = "unavailable"
    headers = RETRY_SOON


class KeyCache:
    def __init__(self, client: AsyncRedisClient, namespace: str) -> None:
        self.client = client
        self.key = redis_keys.api_keys(namespace)
        self.table: KeyTable | None = None
        self.loaded_at = float("-inf")
        self.task: asyncio.Task[bool] | None = None
        self.every_s = 1.0
        self.refresher: asyncio.Task[None] | None = None

    async def load(self) -> bool:
        """Re-read the table; on failure keep the one we have."""
        try:
            entries = await asyncio.wait_for(
                self.client.hgetall(self.key),  # type: ignore[arg-type]
                LOAD_TIMEOUT_S,
            )
        except (OSError, TimeoutError, aioredis.RedisError) as exc:
            logger.warning("API key table not refreshed: %s", type(exc).__name__)
            return False
        self.table = KeyTable(entries)
        self.loaded_at = time.monotonic()
        return True

    def keep_fresh(self, every_s: float) -> None:
        """Re-read the table every `every_s` from now on (called by `reconfigure`)."""
        self.every_s = every_s
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        started = time.monotonic()
        while True:
            # Every `every_s` from the start of the last read, not from its end: a read
            # that takes a while under load does not stretch how long a revoked key works.
            wait = self.every_s if self.table is not None else RETRY_UNLOADED_S
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))
            started = time.monotonic()
            await self._reload()

    async def authenticate(self, token: str | None) -> ApiKey:
        token = token or ""
        entry = self.table.lookup(token) if self.table else None
        reloaded = True
        # Only something shaped like a key may be one created since the last read.
        could_be_new = is_key_shaped(token)
        if entry is None and could_be_new:
            # Reads are at most every MISS_REFRESH_S: a miss right after one waits for
            # the next, so a key created a moment ago is never refused for being early.
            since = time.monotonic() - self.loaded_at
            if since < MISS_REFRESH_S:
                await asyncio.sleep(MISS_REFRESH_S - since)
            reloaded = await self._reload()
            entry = self.table.lookup(token) if self.table else None
        if self.table is None or (entry is None and not reloaded):
            # The key may be one created while Redis is unreachable: say so, not "invalid".
            raise AuthUnavailable("API keys cannot be checked now; retry")
        if entry is None:
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
        return entry

    async def _reload(self) -> bool:
        """Re-read now, sharing a read already under way; whether it succeeded."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.load())
        return await asyncio.shield(self.task)

    @staticmethod
    def authorize_scope(entry: ApiKey, scope: str) -> None:
        if scope not in entry.scopes:
            raise Forbidden(
                f"this API key has no {scope!r} scope (`rankgate keys create APP --scope {scope}`)"
            )

    @staticmethod
    def authorize(entry: ApiKey, purposes: list[str]) -> None:
        for purpose in purposes:
            if purpose not in entry.purposes:
                raise Forbidden(f"this API key may not be used for purpose {purpose!r}")
