"""What a durable acknowledgement costs (rankgate/core/durable.py), in interleaved rounds.

- **store**: a consent write as the API makes it (one HSET), answered at once
  against answered once the append-only file holds it (`on_disk`: the barrier and
  WAITAOF), `WRITES` of each per round, alternating, on the server's Redis;
- **http**: `POST /v1/consent` end to end at concurrency 1 and 8 (what a consent
  platform sees), next to `POST /v1/rank` at concurrency 1, whose path has no
  acknowledged write and must not pay for it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import httpx

from loadtests.bench.figures import spread
from rankgate.core import redis_keys
from rankgate.core.durable import on_disk
from rankgate.core.redis_server import connect
from rankgate.governance.consent import consent_fields

WRITES = 40
HTTP_REQUESTS = 40


def store_round(client: Any, namespace: str, durable: bool) -> float:
    """Median ms of one consent write, with or without the wait for the disk."""
    times = []
    for n in range(WRITES):
        key = redis_keys.consent(namespace, f"bench-durable-{n}")
        started = time.perf_counter()
        client.hset(key, mapping=consent_fields({"bench": n % 2 == 0}, "bench"))
        if durable:
            on_disk(client, namespace, "the bench write", key)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def http_round(
    base_url: str, api_key: str, path: str, bodies: list[dict[str, Any]], concurrency: int
) -> float:
    headers = {"authorization": f"Bearer {api_key}"}
    times: list[float] = []
    queue = list(bodies)

    async def client(session: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            started = time.perf_counter()
            answer = await session.post(f"{base_url}{path}", json=body, headers=headers)
            answer.raise_for_status()
            times.append((time.perf_counter() - started) * 1000)

    async with httpx.AsyncClient(timeout=10) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return statistics.median(times)


def durable_cost(
    base_url: str,
    api_key: str,
    rank_body: dict[str, Any],
    purpose: str,
    namespace: str,
    repeats: int,
) -> dict[str, Any]:
    client: Any = connect()
    rounds: dict[str, list[float]] = {
        k: []
        for k in (
            "store_plain_ms",
            "store_durable_ms",
            "consent_c1_ms",
            "consent_c8_ms",
            "rank_c1_ms",
        )
    }
    run = uuid.uuid4().hex[:6]
    for r in range(repeats):
        # Alternate which goes first: the machine's noise falls on both alike.
        order = (False, True) if r % 2 == 0 else (True, False)
        for durable in order:
            rounds["store_durable_ms" if durable else "store_plain_ms"].append(
                store_round(client, namespace, durable)
            )
        consent = [
            {
                "user_id": f"bench-{run}-{r}-{n}",
                "purposes": {purpose: n % 2 == 0},
                "source": "bench",
            }
            for n in range(HTTP_REQUESTS)
        ]
        rounds["consent_c1_ms"].append(
            asyncio.run(http_round(base_url, api_key, "/v1/consent", consent, 1))
        )
        rounds["consent_c8_ms"].append(
            asyncio.run(http_round(base_url, api_key, "/v1/consent", consent, 8))
        )
        ranks = [rank_body] * HTTP_REQUESTS
        rounds["rank_c1_ms"].append(
            asyncio.run(http_round(base_url, api_key, "/v1/rank", ranks, 1))
        )
    for n in range(WRITES):
        client.delete(redis_keys.consent(namespace, f"bench-durable-{n}"))
    figures = {name: spread(values) for name, values in rounds.items()}
    plain, durable = figures["store_plain_ms"]["median"], figures["store_durable_ms"]["median"]
    figures["added_per_write_ms"] = round(durable - plain, 2)
    figures["persistence"] = {k: client.config_get(k).get(k) for k in ("appendonly", "appendfsync")}
    return figures
