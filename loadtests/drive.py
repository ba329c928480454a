"""HTTP load for the benchmark: closed loop at a fixed concurrency, or open loop
at a fixed arrival rate.

Run as its own process (the server under test never shares an interpreter with
it):

- `python -m loadtests.drive URL --concurrency 8 --duration 10 --bodies FILE`:
  closed loop, each of 8 clients sends its next request when the last is answered.
- `python -m loadtests.drive URL --rate 200 --duration 10 --bodies FILE`: open
  loop, request i is due at t0 + i/rate and is sent then, whatever is still
  outstanding (up to `--connections` at once); its latency counts from when it
  was due, so time spent waiting behind a slow server is not hidden. The report
  says how late the driver itself sent requests. `--cpu-pids 12,34` also reads
  those processes' CPU time (user + system, /proc/PID/stat) right before the
  measured requests and right after the last answer: the CPU they spent on them.

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
        key, timings = outcome_of(status, payload, retry_after)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        for stage, value in timings.items():
            self.stages.setdefault(stage, []).append(float(value))


def outcome_of(
    status: int, payload: bytes, retry_after: str | None
) -> tuple[str, dict[str, float]]:
    """What an answer was (`personalized`, `fallback:<reason>`, `ranked` for a
    baseline, `http_<status>`), and the stage timings it reported."""
    if status != 200:
        return f"http_{status}" + ("_retry_after" if retry_after is not None else ""), {}
    answer: dict[str, Any] = json.loads(payload)
    if "fallback" not in answer:  # a baseline: it ranks, it has no notion of fallback
        key = "ranked"
    elif answer["fallback"]:
        key = f"fallback:{answer['fallback']['reason']}"
    else:
        key = "personalized"
    return key, answer.get("timings_ms") or {}


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
        "driver": "python",
        "concurrency": concurrency,
        "duration_s": round(wall, 2),
        "requests": len(latencies),
        "ok": ok,
        "errors": len(latencies) - ok,
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "p999_ms": round(percentile(latencies, 0.999), 2),
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


LATE_MS = 1.0
"""A request the driver sent more than this after it was due counts as sent late."""


@dataclass(frozen=True)
class Arrival:
    """One open-loop request: when it was due, sent and done (seconds, one clock)."""

    due: float
    sent: float
    done: float
    outcome: str


def cpu_seconds(pids: list[int], proc: Path = Path("/proc")) -> dict[int, float]:
    """CPU seconds (user + system) each process has used so far; a process that is
    gone or unreadable is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            text = (proc / str(pid) / "stat").read_text()
        except OSError:
            continue
        # The fields after the command's name, which may itself hold spaces and ")":
        # state is the first, utime and stime (in clock ticks) the 12th and 13th.
        fields = text.rsplit(")", 1)[1].split()
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    return used


def cpu_used(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds each process spent between two readings (pid as text, for JSON);
    a process must be in both."""
    return {str(pid): round(after[pid] - before[pid], 3) for pid in before if pid in after}


def open_loop_summary(
    arrivals: list[Arrival], rate: float, duration_s: float, max_outstanding: int = 0
) -> dict[str, Any]:
    """Latency from each request's due time (so queueing counts), the rate achieved,
    errors and fallbacks, and how far behind the driver itself was."""
    if not arrivals:
        raise ValueError("no requests in the schedule")
    latencies = [(a.done - a.due) * 1000.0 for a in arrivals]
    lag = [(a.sent - a.due) * 1000.0 for a in arrivals]
    outcomes: dict[str, int] = {}
    for a in arrivals:
        outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
    start = min(a.due for a in arrivals)
    wall = max(a.done for a in arrivals) - start
    errors = sum(v for k, v in outcomes.items() if k.startswith("http_"))
    late = sum(1 for value in lag if value > LATE_MS)
    return {
        "driver": "python-open-loop",
        "offered_rps": round(rate, 1),
        "duration_s": round(duration_s, 2),
        "requests": len(arrivals),
        "achieved_rps": round(len(arrivals) / wall, 1) if wall > 0 else 0.0,
        "errors": errors,
        "fallbacks": sum(v for k, v in outcomes.items() if k.startswith("fallback:")),
        "budget_fallbacks": outcomes.get("fallback:budget_exhausted", 0),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "p999_ms": round(percentile(latencies, 0.999), 2),
        "outcomes": outcomes,
        "driver_lag_ms": {
            "p50": round(percentile(lag, 0.50), 3),
            "p99": round(percentile(lag, 0.99), 3),
            "max": round(max(lag), 3),
        },
        "sent_late_share": round(late / len(arrivals), 4),
        "max_outstanding": max_outstanding,
    }


class Schedule:
    """Fires request i at t0 + i/rate on the running loop, without waiting for answers."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float
    ) -> None:
        self.session, self.url, self.bodies, self.rate = session, url, bodies, rate
        self.outstanding = 0
        self.max_outstanding = 0

    async def one(self, body: bytes, due: float, arrivals: list[Arrival] | None) -> None:
        sent = time.perf_counter()
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            async with self.session.post(self.url, data=body, headers=HEADERS) as response:
                payload = await response.read()
                outcome, _ = outcome_of(
                    response.status, payload, response.headers.get("retry-after")
                )
        except (aiohttp.ClientError, TimeoutError):
            outcome = "http_0"
        finally:
            self.outstanding -= 1
        if arrivals is not None:
            arrivals.append(Arrival(due, sent, time.perf_counter(), outcome))

    async def run(self, duration_s: float, arrivals: list[Arrival] | None) -> None:
        count = max(1, round(self.rate * duration_s))
        tasks: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter() + 0.005
        for i in range(count):
            due = t0 + i / self.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(self.bodies[i % len(self.bodies)], due, arrivals))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)


async def open_loop(
    url: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    bodies: list[bytes],
    connections: int = 256,
    cpu_pids: list[int] | None = None,
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup_s > 0:
            await Schedule(session, url, bodies, rate).run(warmup_s, None)
        schedule = Schedule(session, url, bodies, rate)
        arrivals: list[Arrival] = []
        cpu_before = cpu_seconds(cpu_pids or [])
        await schedule.run(duration_s, arrivals)
        cpu_after = cpu_seconds(cpu_pids or [])
    summary = open_loop_summary(arrivals, rate, duration_s, schedule.max_outstanding)
    summary["connections"] = connections
    if cpu_pids:
        summary["cpu_seconds"] = cpu_used(cpu_before, cpu_after)
    return summary


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="Closed loop: this many clients.")
    mode.add_argument("--rate", type=float, help="Open loop: this many requests per second.")
    parser.add_argument(
        "--connections", type=int, default=256, help="Open loop: connection pool size."
    )
    parser.add_argument(
        "--cpu-pids",
        default="",
        help="Open loop: comma-separated pids whose CPU time the measured requests cost.",
    )
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
    if args.rate is not None:
        print(
            json.dumps(
                asyncio.run(
                    open_loop(
                        args.url,
                        args.rate,
                        args.duration,
                        args.warmup,
                        bodies,
                        args.connections,
                        [int(pid) for pid in args.cpu_pids.split(",") if pid.strip()],
                    )
                )
            )
        )
        return
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
