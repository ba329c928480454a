"""Durable acknowledgements (rankgate/core/durable.py), read from Redis's own replies:
every acknowledged write waited for WAITAOF, and one whose fsync cannot be confirmed
in time is not acknowledged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from rankgate.core import redis_keys
from rankgate.core.durable import AOF_WAIT_MS, NotDurable, on_disk
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import connect, resolve_redis_url
from rankgate.core.settings import get_settings
from rankgate.governance.api_keys import ApiKeyStore
from rankgate.governance.consent import AsyncConsentStore, ConsentStoreUnavailable
from tests.conftest import Server


def waitaof_stats(client: Any) -> dict[str, int]:
    stats = client.info("commandstats").get("cmdstat_waitaof", {})
    return {k: int(stats.get(k, 0)) for k in ("calls", "failed_calls", "rejected_calls")}


@pytest.fixture
def one_replica_wanted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """RANKGATE_DURABLE_REPLICAS=1 against a Redis that has no replica: WAITAOF can
    never confirm, so nothing may be acknowledged."""
    monkeypatch.setenv("RANKGATE_DURABLE_REPLICAS", "1")
    get_settings.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("RANKGATE_DURABLE_REPLICAS")
        get_settings.cache_clear()


def test_an_acknowledged_consent_write_waited_for_the_fsync(
    server: Server, ready_home: Home
) -> None:
    client = connect()
    persistence = client.info("persistence")
    assert persistence["aof_enabled"] == 1 and persistence["aof_last_write_status"] == "ok"
    before = waitaof_stats(client)
    person = f"durable-{time.time_ns()}"
    answer = httpx.post(
        f"{server.base_url}/v1/consent",
        json={"user_id": person, "purposes": {"onsite_personalization": False}, "source": "test"},
        headers=server.headers,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    after = waitaof_stats(client)
    # The replica asked Redis for the fsync before it answered, and Redis confirmed it.
    assert after["calls"] >= before["calls"] + 1
    assert after["failed_calls"] == before["failed_calls"]
    assert after["rejected_calls"] == before["rejected_calls"]
    # The barrier it waited behind holds no one's data and expires.
    mark = redis_keys.durable_mark(ready_home.namespace, "")
    assert client.get(mark) == b"1" and 0 < client.pttl(mark) <= 60_000
    client.delete(redis_keys.consent(ready_home.namespace, user_key(person)))


def test_on_disk_waits_behind_writes_of_other_connections(ready_home: Home) -> None:
    # The write on one client, the wait on a fresh one that never wrote: the barrier
    # makes WAITAOF cover what the other connection wrote before.
    writer, waiter = connect(), connect(resolve_redis_url())
    writer.set(f"{ready_home.namespace}:durable-test", "1", px=5_000)
    assert on_disk(waiter, ready_home.namespace, "the test write") is True


def test_a_write_whose_fsync_cannot_be_confirmed_is_not_acknowledged(
    ready_home: Home, one_replica_wanted: None
) -> None:
    namespace = ready_home.namespace
    client = connect()
    before = waitaof_stats(client)
    started = time.monotonic()
    with pytest.raises(NotDurable, match="by replicas: 0 of 1"):
        ApiKeyStore(client, namespace).create(
            "durable-test", ["onsite_personalization"], ["onsite_personalization"]
        )
    waited = time.monotonic() - started
    # WAITAOF itself held the answer back for its whole timeout, then said why.
    assert waited >= AOF_WAIT_MS / 1000 * 0.9
    assert waitaof_stats(client)["calls"] == before["calls"] + 1

    async def consent() -> None:
        store = AsyncConsentStore(aioredis.Redis.from_url(resolve_redis_url()), namespace)
        with pytest.raises(ConsentStoreUnavailable, match="not acknowledged"):
            await store.record(user_key("durable-test"), {"onsite_personalization": True}, "test")
        await store.client.aclose()

    asyncio.run(consent())
    # Written but not acknowledged: a retry writes the same again (cleaned up here).
    client.hdel(
        redis_keys.api_keys(namespace),
        *[
            d
            for d, e in ApiKeyStore(client, namespace).table().entries.items()
            if e.app == "durable-test"
        ],
    )
    client.delete(redis_keys.consent(namespace, user_key("durable-test")))
