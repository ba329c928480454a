"""What the request path's two Redis commands cost a replica's CPU: through redis-py's
command path, and packed once and sent on a kept connection (rankgate/core/redis_calls.py).

    python -m loadtests.redis_call_cost [--rounds 9] [--number 2000] [--fields 95]

Against the Redis of the home (REDIS_URL, or the embedded server), on one asyncio
client: the person's HMGET of `--fields` Feast hash fields (a key of Feast's layout,
values of 12 bytes) and the consent script's EVALSHA (two keys, one argument). Each
round times `--number` calls of each way in process CPU time, the ways in turn (their
order alternates by round); it prints per command and way the median over rounds of
microseconds per call, the lowest and highest round, and the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from rankgate.core.redis_calls import VARY, Packed, read
from rankgate.core.redis_server import connect_async, resolve_redis_url
from rankgate.governance.consent import READ_PERSON, READ_PERSON_CALL, READ_PERSON_SHA

Call = Callable[[], Awaitable[Any]]


async def per_call_us(call: Call, number: int) -> float:
    started = time.process_time()
    for _ in range(number):
        await call()
    return (time.process_time() - started) / number * 1e6


async def measure(rounds: int, number: int, fields: int) -> dict[str, dict[str, Any]]:
    client: Any = connect_async(resolve_redis_url())  # redis-py's stubs type sync and async as one
    tag = uuid.uuid4().hex
    key = b"\x02\x00\x00\x00" + f"rankgate-cost-{tag}".encode()
    names = [os.urandom(4) + f"view:feature_{n}".encode() for n in range(fields)]
    await client.hset(key, mapping={name: os.urandom(12) for name in names})
    await client.script_load(READ_PERSON)
    link, consent = f"rankgate-cost:{tag}:link", f"rankgate-cost:{tag}:consent"
    await client.hset(consent, "onsite_personalization", json.dumps({"granted": True}))
    hmget = Packed("HMGET", VARY, *names)
    ways: dict[str, dict[str, Call]] = {
        "HMGET": {
            "redis-py": lambda: client.hmget(key, names),
            "packed": lambda: read(client, hmget, key),
        },
        "EVALSHA": {
            "redis-py": lambda: client.evalsha(
                READ_PERSON_SHA, 2, link, consent, "onsite_personalization"
            ),
            "packed": lambda: read(
                client, READ_PERSON_CALL, link, consent, "onsite_personalization"
            ),
        },
    }
    for pair in ways.values():  # the same replies, and warm connections
        replies = [await call() for call in pair.values()]
        assert replies[0] == replies[1], replies
    times: dict[str, dict[str, list[float]]] = {c: {w: [] for w in ways[c]} for c in ways}
    for n in range(rounds):
        for command, by_way in ways.items():
            order = list(by_way) if n % 2 == 0 else list(reversed(by_way))
            for way in order:
                times[command][way].append(await per_call_us(by_way[way], number))
    await client.delete(key, consent)
    await client.aclose()
    summary: dict[str, dict[str, Any]] = {}
    for command, measured in times.items():
        ratios = [p / r for p, r in zip(measured["packed"], measured["redis-py"], strict=True)]
        summary[command] = {
            way: {
                "median_us": round(statistics.median(values), 1),
                "lowest_us": round(min(values), 1),
                "highest_us": round(max(values), 1),
            }
            for way, values in measured.items()
        } | {"packed_over_redis_py": round(statistics.median(ratios), 3)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--fields", type=int, default=95)
    args = parser.parse_args()
    summary = asyncio.run(measure(args.rounds, args.number, args.fields))
    for command, figures in summary.items():
        for way in ("redis-py", "packed"):
            f = figures[way]
            print(
                f"{command:8} {way:9} {f['median_us']:8.1f} us a call "
                f"[{f['lowest_us']}, {f['highest_us']}]"
            )
        print(
            f"{command:8} packed / redis-py: {figures['packed_over_redis_py']}x (median of rounds)"
        )


if __name__ == "__main__":
    main()
