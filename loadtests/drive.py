"""Closed-loop HTTP load at a fixed concurrency, for the benchmark.

Run as its own process (the server under test never shares an interpreter with
it): `python -m loadtests.drive URL --concurrency 8 --duration 10 --bodies FILE`.
Prints one JSON object: completed requests, errors, throughput and latency
percentiles (ms), plus the server-side stage timings the answers reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

# The API key, when the server needs one (rankgate does; the baselines ignore it).
HEADERS = {"content-type": "application/json"} | (
    {"authorization": f"Bearer {os.environ['RANKGATE_API_KEY']}"}
    if os.environ.get("RANKGATE_API_KEY")
    else {}
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[bytes],
    offset: int,
    stop_at: float,
    record: bool,
    latencies: list[float],
    stages: dict[str, list[float]],
    outcomes: dict[str, int],
) -> None:
    n = offset
    while time.perf_counter() < stop_at:
        body = bodies[n % len(bodies)]
        n += 1
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=HEADERS) as response:
                payload = await response.read()
                status = response.status
        except aiohttp.ClientError:
            status, payload = 0, b""
        elapsed = (time.perf_counter() - started) * 1000.0
        if not record:
            continue
        latencies.append(elapsed)
        if status != 200:
            outcomes[f"http_{status}"] = outcomes.get(f"http_{status}", 0) + 1
            continue
        answer: dict[str, Any] = json.loads(payload)
        if "fallback" not in answer:  # a baseline: it ranks, it has no notion of fallback
            key = "ranked"
        elif answer["fallback"]:
            key = f"fallback:{answer['fallback']['reason']}"
        else:
            key = "personalized"
        outcomes[key] = outcomes.get(key, 0) + 1
        for stage, value in (answer.get("timings_ms") or {}).items():
            stages.setdefault(stage, []).append(float(value))


async def drive(
    url: str, concurrency: int, duration_s: float, warmup_s: float, bodies: list[bytes]
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_stop = time.perf_counter() + warmup_s
        await asyncio.gather(
            *[
                worker(session, url, bodies, i, warm_stop, False, [], {}, {})
                for i in range(concurrency)
            ]
        )
        latencies: list[float] = []
        stages: dict[str, list[float]] = {}
        outcomes: dict[str, int] = {}
        started = time.perf_counter()
        stop_at = started + duration_s
        await asyncio.gather(
            *[
                worker(session, url, bodies, i * 7919, stop_at, True, latencies, stages, outcomes)
                for i in range(concurrency)
            ]
        )
        wall = time.perf_counter() - started
    ok = sum(v for k, v in outcomes.items() if not k.startswith("http_"))
    return {
        "concurrency": concurrency,
        "duration_s": round(wall, 2),
        "requests": len(latencies),
        "ok": ok,
        "errors": len(latencies) - ok,
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "outcomes": outcomes,
        "server_stage_median_ms": {k: round(statistics.median(v), 3) for k, v in stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--bodies", type=Path, required=True, help="JSON list of request bodies")
    args = parser.parse_args()
    bodies = [json.dumps(b).encode() for b in json.loads(args.bodies.read_text())]
    result = asyncio.run(drive(args.url, args.concurrency, args.duration, args.warmup, bodies))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
