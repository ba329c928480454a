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
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class Tally:
    """What the measured part of a run saw."""

    latencies: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    by_status: dict[int, list[float]] = field(default_factory=dict)

    def add(self, status: int, elapsed: float, payload: bytes, retry_after: str | None) -> None:
        self.latencies.append(elapsed)
        self.by_status.setdefault(status, []).append(elapsed)
        if status != 200:
            key = f"http_{status}" + ("_retry_after" if retry_after is not None else "")
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
            return
        answer: dict[str, Any] = json.loads(payload)
        if "fallback" not in answer:  # a baseline: it ranks, it has no notion of fallback
            key = "ranked"
        elif answer["fallback"]:
            key = f"fallback:{answer['fallback']['reason']}"
        else:
            key = "personalized"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        for stage, value in (answer.get("timings_ms") or {}).items():
            self.stages.setdefault(stage, []).append(float(value))


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    bodies: list[bytes],
    offset: int,
    stop_at: float,
    tally: Tally | None,
    honor_retry_after: bool,
) -> None:
    """One closed-loop client until `stop_at`; counts into `tally` (None: warm-up)."""
    n = offset
    while time.perf_counter() < stop_at:
        body = bodies[n % len(bodies)]
        n += 1
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=HEADERS) as response:
                payload = await response.read()
                status = response.status
                retry_after = response.headers.get("retry-after")
        except aiohttp.ClientError:
            status, payload, retry_after = 0, b"", None
        elapsed = (time.perf_counter() - started) * 1000.0
        if tally is not None:
            tally.add(status, elapsed, payload, retry_after)
        if retry_after is not None and honor_retry_after:
            # A well-behaved client: wait as told (but not past the end of the run).
            await asyncio.sleep(min(float(retry_after), max(0.0, stop_at - time.perf_counter())))


async def drive(
    url: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    bodies: list[bytes],
    honor_retry_after: bool = False,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_stop = time.perf_counter() + warmup_s
        await asyncio.gather(
            *[
                worker(session, url, bodies, i, warm_stop, None, honor_retry_after)
                for i in range(concurrency)
            ]
        )
        tally = Tally()
        started = time.perf_counter()
        stop_at = started + duration_s
        await asyncio.gather(
            *[
                worker(session, url, bodies, i * 7919, stop_at, tally, honor_retry_after)
                for i in range(concurrency)
            ]
        )
    wall = time.perf_counter() - started
    latencies, outcomes = tally.latencies, tally.outcomes
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
        "latency_by_status": {
            str(status): {
                "count": len(values),
                "p50_ms": round(percentile(values, 0.50), 2),
                "p99_ms": round(percentile(values, 0.99), 2),
            }
            for status, values in sorted(tally.by_status.items())
        },
        "server_stage_median_ms": {
            k: round(statistics.median(v), 3) for k, v in tally.stages.items()
        },
        "server_stage_p99_ms": {k: round(percentile(v, 0.99), 3) for k, v in tally.stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--bodies", type=Path, required=True, help="JSON list of request bodies")
    parser.add_argument(
        "--honor-retry-after",
        action="store_true",
        help="After a refusal with Retry-After, wait that long before the next request.",
    )
    args = parser.parse_args()
    bodies = [json.dumps(b).encode() for b in json.loads(args.bodies.read_text())]
    result = asyncio.run(
        drive(
            args.url,
            args.concurrency,
            args.duration,
            args.warmup,
            bodies,
            args.honor_retry_after,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()


def stamped(**figures: Any) -> dict[str, Any]:
    """A benchmark report: when and on how many cores it was measured, then its figures."""
    from datetime import UTC, datetime

    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        **figures,
    }


def write_results(
    output: Path, name: str, report: dict[str, Any], render: Callable[[dict[str, Any]], str]
) -> None:
    """`<name>.json` (the figures) and `<name>.md` (the table) in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / f"{name}.md").write_text(render(report))
