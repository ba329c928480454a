"""`rankgate bench`: rankgate against the floor (plain FastAPI), interleaved, in one run.

rankgate (`serve run` of serve_config.yaml with the fast path of `rankgate
serve`) and the floor (loadtests/baselines/plain_fastapi.py, one process) are
started once, each on a free loopback port, and stay up together. Then, round
by round, every concurrency is driven on rankgate then the floor (A B A B...),
so a drift of the machine hits both; ratios are taken within each round. The
naive Ray Serve graph, rankgate with its audit log off and rankgate with two
ingress replicas join on request (`--with naive,no-audit,two-replicas`), and an earlier build of rankgate with `--against-build
DIR` (loadtests/bench/earlier.py, loadtests/bench/against.py): third in each round's
turn, in the closed loop and the CPU part.

Closed-loop load comes from `wrk` where it is installed (or installable, see
loadtests/bench/wrk.py), else from the Python driver (loadtests.drive); the report says
which. Besides the main table the run measures, in this order:

- `explain: true` at concurrency 1 on the same server, right after each round's
  run without it;
- CPU per decision (loadtests/bench/cpu.py): every process of each stack at one
  fixed arrival rate (half the floor's peak), rankgate and the floor in turn, round
  after round;
- the open loop (loadtests.drive --rate) at 25, 50 and 80 % of rankgate's peak;
- the server's stage timings (`timings_ms`), from a Python-driver pass;
- the memory of the whole stack (loadtests/bench/memory.py), after the load;
- the ranker under load against raw onnxruntime (loadtests.ranker_load), with
  the servers stopped;
- the ready time of `rankgate serve` (two starts).

All read the same user features from the same Redis through Feast and score
the same candidates (the whole catalogue) with the same ONNX model (the stable
version). The figures, the targets' status (loadtests/bench/report.py) and the
command go to `<output>/bench.json` and `<output>/bench.md`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from loadtests import results_folder
from loadtests.bench import cpu, earlier, memory
from loadtests.bench.against import EARLIER, against_figures
from loadtests.bench.compare import append_history, commit_of, comparison, history_entry
from loadtests.bench.durable import durable_cost
from loadtests.bench.readme import refresh_readme
from loadtests.bench.report import (
    BUDGET_LEVEL_MAX,
    FLOOR,
    OURS,
    budget_fallbacks,
    evaluate,
    median_row,
    peak,
    peaks,
    ratios,
    render_markdown,
    spread,
    summed_outcomes,
)
from loadtests.bench.systems import (
    SYSTEMS,
    Driver,
    Say,
    System,
    Workload,
    choose_driver,
    drive,
    drive_open,
    load_process,
    started_process,
    wait_ready,
    workload,
)
from loadtests.bench.wrk import wrk_version
from loadtests.drive import write_results
from rankgate.core.redis_server import EmbeddedRedis
from rankgate.core.settings import SOURCE_CHECKOUT, put_checkout_on_path
from rankgate.ops.environment import Environment
from serving.ops.launch import (
    free_port,
    start_server,
    stop_server,
)

DEFAULT_LEVELS = [1, 4, 8, 16, 32]
DEFAULT_DURATION_S = 6.0
DEFAULT_WARMUP_S = 1.0
OPEN_LOOP_SHARES = (0.25, 0.5, 0.8)
READY_STARTS = 2
PARTS = ("explain", "cpu", "open-loop", "stages", "durable", "memory", "ranker", "ready")
"""What a run measures besides the main table; each can be skipped (--skip)."""
EXTRAS = {
    "naive": "naive_graph",
    "no-audit": "rankgate_no_audit",
    "two-replicas": "rankgate_two_replicas",
}
"""Systems that join the run on request (--with)."""


def _say_run(say: Say, prefix: str, run: dict[str, Any]) -> None:
    say(
        f"    {prefix} {run['throughput_rps']:8.1f} req/s  p50 {run['p50_ms']:7.2f} ms"
        f"  p99 {run['p99_ms']:7.2f} ms  errors {run['errors']}"
    )


@dataclass
class Run:
    """One benchmark run's settings and what it has measured so far."""

    work: Workload
    driver: Driver
    systems: list[System]
    rounds: int
    parts: set[str]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    """A system's own API key (the earlier build on a home of its own); else the run's."""
    explain_runs: list[dict[str, Any]] = field(default_factory=list)
    explain_file: Path = field(default_factory=Path)

    def interleaved(self, urls: dict[str, str]) -> None:
        """Round by round, every level on every system in turn (A B A B)."""
        work, say = self.work, self.work.say
        explain_bodies = [{**b, "explain": True} for b in work.bodies]
        self.explain_file = work.folder / "bodies-explain.json"
        self.explain_file.write_text(json.dumps(explain_bodies))
        self.runs = {s.name: {str(c): [] for c in work.levels} for s in self.systems}
        for n in range(self.rounds):
            say(f"• round {n + 1}/{self.rounds}")
            for level in work.levels:
                for system in self.systems:
                    run = self.driver.closed(
                        work,
                        urls[system.name],
                        level,
                        work.bodies,
                        work.bodies_file,
                        self.keys.get(system.name),
                    )
                    self.runs[system.name][str(level)].append(run)
                    _say_run(say, f"{system.name:<18} c={level:<3}", run)
                if level == 1 and "explain" in self.parts:
                    run = self.driver.closed(work, urls[OURS], 1, explain_bodies, self.explain_file)
                    self.explain_runs.append(run)
                    _say_run(say, f"{'rankgate explain':<18} c=1  ", run)

    def results(self) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [median_row(level_runs) for level_runs in levels.values()]
            for name, levels in self.runs.items()
        }

    def explain(self) -> dict[str, Any] | None:
        if not self.explain_runs:
            return None
        without = self.runs[OURS]["1"]
        added = [a["p50_ms"] - b["p50_ms"] for a, b in zip(self.explain_runs, without, strict=True)]
        return {
            "p50_without_ms": round(statistics.median(r["p50_ms"] for r in without), 2),
            "p50_with_ms": round(statistics.median(r["p50_ms"] for r in self.explain_runs), 2),
            "p99_with_ms": round(statistics.median(r["p99_ms"] for r in self.explain_runs), 2),
            "added_ms": spread(added, 2),
            "outcomes": summed_outcomes(self.explain_runs),
            "runs": self.explain_runs,
        }

    def cpu(
        self, urls: dict[str, str], stacks: dict[str, cpu.Stack], rate: float, source: str
    ) -> dict[str, Any]:
        """CPU per decision of each stack (rankgate, the floor, an earlier build) at one
        arrival rate, in turn."""
        work, say = self.work, self.work.say
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in stacks}
        for n in range(self.rounds):
            for name, done in rounds.items():
                run = drive_open(
                    urls[name],
                    rate,
                    work.duration,
                    self.driver.warmup,
                    work.bodies_file,
                    self.keys.get(name, work.api_key),
                    stacks[name].pids,
                )
                figures = cpu.round_figures(run, stacks[name])
                done.append(figures)
                say(
                    f"    cpu round {n + 1} {name:<14} {rate:.0f}/s: achieved "
                    f"{figures['achieved_rps']:.1f}/s  {figures['ms_per_decision']} ms CPU per "
                    f"decision over {figures['processes']} processes  p99 {figures['p99_ms']:.2f} ms"
                )
        return cpu.cpu_figures(rate, source, work.duration, rounds, stacks)

    def open_loop(self, url: str, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        work, say = self.work, self.work.say
        found = peak(results[OURS])
        source = f"best level with p99 ≤ 50 ms: c={found['concurrency']}"
        if not found["rps"]:
            found = {"rps": max(r["throughput_rps"] for r in results[OURS])}
            source = "no level had p99 ≤ 50 ms: the highest throughput measured"
        by_share: dict[float, list[dict[str, Any]]] = {s: [] for s in OPEN_LOOP_SHARES}
        for n in range(self.rounds):
            for share in OPEN_LOOP_SHARES:
                rate = max(1.0, found["rps"] * share)
                run = drive_open(
                    url, rate, work.duration, self.driver.warmup, work.bodies_file, work.api_key
                )
                by_share[share].append(run)
                say(
                    f"    open loop round {n + 1} {share:.0%} ({rate:.0f}/s): achieved "
                    f"{run['achieved_rps']:.1f}/s  p50 {run['p50_ms']:.2f}  p99 {run['p99_ms']:.2f}"
                    f"  p99.9 {run['p999_ms']:.2f} ms  lag p99 {run['driver_lag_ms']['p99']:.2f} ms"
                )
        return {
            "peak_rps": found["rps"],
            "peak_source": source,
            "duration_s": work.duration,
            "rounds": self.rounds,
            "connections": by_share[OPEN_LOOP_SHARES[0]][0]["connections"],
            "rows": [open_loop_row(share, runs) for share, runs in by_share.items()],
        }

    def stages(self, url: str, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Stage medians at concurrency 1 and at the peak level."""
        work = self.work
        levels = sorted({1, peak(results[OURS])["concurrency"] or max(work.levels)})
        rows = []
        if self.driver.wrk is None:
            source = "the middle round's Python-driver runs"
            for level in levels:
                run = self.runs[OURS][str(level)][len(self.runs[OURS][str(level)]) // 2]
                rows.append(_stage_row(level, run))
        else:
            source = (
                "a Python-driver pass after the rounds (wrk does not read the answers' timings)"
            )
            for level in levels:
                run = drive(url, level, work.duration, work.bodies_file, work.api_key, warmup=1.0)
                rows.append(_stage_row(level, run))
        return {"source": source, "rows": rows}


def open_loop_row(share: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    return {
        "share": share,
        "offered_rps": median("offered_rps"),
        "achieved_rps": median("achieved_rps"),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "p999_ms": median("p999_ms"),
        "errors": sum(r["errors"] for r in runs),
        "fallbacks": sum(r["fallbacks"] for r in runs),
        "budget_fallbacks": sum(r["budget_fallbacks"] for r in runs),
        "driver_lag_p99_ms": round(statistics.median(r["driver_lag_ms"]["p99"] for r in runs), 2),
        "driver_lag_max_ms": round(max(r["driver_lag_ms"]["max"] for r in runs), 2),
        "sent_late_share": round(statistics.median(r["sent_late_share"] for r in runs), 4),
        "runs": runs,
    }


def _stage_row(level: int, run: dict[str, Any]) -> dict[str, Any]:
    return {
        "concurrency": level,
        "stages": run["server_stage_median_ms"],
        "client_p50_ms": run["p50_ms"],
    }


def redis_pid(env: Environment) -> int | None:
    """The embedded Redis-compatible server's pid, when this home runs one."""
    if os.environ.get("REDIS_URL"):
        return None
    try:
        return int(EmbeddedRedis(env.home).pid_path.read_text().strip())
    except (OSError, ValueError):
        return None


def cpu_rate(
    results: dict[str, list[dict[str, Any]]], watched: dict[str, str] | None = None
) -> tuple[float, str]:
    """The CPU part's arrival rate: a share of the floor's peak, and where it came from.
    When the peak of rankgate (or of another system in `watched`, name -> how the
    report calls it) is lower, a share of the lowest instead: past its peak a server
    answers with fallbacks and errors, and the CPU of an overloaded server per answer
    is no decision's cost."""
    share = f"{cpu.RATE_SHARE * 100:g} %"
    found = peak(results[FLOOR])
    peaks_seen = [(peak(results[n]), c) for n, c in (watched or {OURS: "rankgate"}).items()]
    lowest = min(
        ((found_peak, called) for found_peak, called in peaks_seen if found_peak["rps"]),
        key=lambda pair: pair[0]["rps"],
        default=None,
    )
    if found["rps"] and lowest is not None and lowest[0]["rps"] < found["rps"]:
        ours, called = lowest
        source = (
            f"{share} of {called}'s peak, {ours['rps']:g} req/s at c={ours['concurrency']} "
            f"(below the floor's, {found['rps']:g} req/s: at {share} of the floor's "
            f"{called} would be overloaded)"
        )
        return max(1.0, ours["rps"] * cpu.RATE_SHARE), source
    if found["rps"]:
        source = f"{share} of the floor's peak, {found['rps']:g} req/s at c={found['concurrency']}"
        return max(1.0, found["rps"] * cpu.RATE_SHARE), source
    highest = max(r["throughput_rps"] for r in results[FLOOR])
    source = f"{share} of the floor's highest throughput, {highest:g} req/s (no peak: p99 > 50 ms)"
    return max(1.0, highest * cpu.RATE_SHARE), source


def stacks_of(
    processes: dict[str, Any],
    env: Environment,
    names: tuple[str, ...] = (OURS, FLOOR),
    own_redis: dict[str, int] | None = None,
) -> dict[str, cpu.Stack]:
    """The processes whose CPU counts for each system (Redis in every one: this home's,
    or the system's own in `own_redis`)."""
    extra = [pid] if (pid := redis_pid(env)) is not None else []
    own = own_redis or {}
    return {
        name: cpu.stack_of([processes[name].pid], [own[name]] if name in own else extra)
        for name in names
    }


def stack_memory(server_pid: int, env: Environment) -> list[memory.ProcessMemory]:
    extra = [pid] if (pid := redis_pid(env)) is not None else []
    return memory.stack([server_pid], extra)


def ranker_load(work: Workload, rounds: int) -> dict[str, Any]:
    body = work.bodies[0]
    arguments = ["loadtests.ranker_load", "--user-id", body["user_id"]]
    arguments += ["--purpose", body["purpose"], "--region", body["region"]]
    arguments += ["--duration", str(work.duration), "--rounds", str(rounds)]
    return load_process(arguments, work.api_key, (work.duration * 2 + 5) * rounds + 120)


READY_PHASES = {
    "setup checked": "serving ",
    "Ray started": "Started a local Ray instance",
    "config submitted": "Submitted deploy config",
}
"""Lines of `rankgate serve`'s output that mark how far a start has got."""


def phases_seen(text: str, seen: dict[str, float], elapsed: float) -> None:
    """Record `elapsed` for each phase whose line is in `text` for the first time."""
    for phase, marker in READY_PHASES.items():
        if phase not in seen and marker in text:
            seen[phase] = round(elapsed, 2)


def ready_time(work: Workload, starts: int) -> tuple[dict[str, Any], memory.ProcessMemory | None]:
    """Seconds from starting `rankgate serve --port P` until a rank request gets 200,
    per start, with when each phase showed in its output; and the memory of the
    `rankgate serve` process itself (last start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env["RANKGATE_HOME"] = str(work.env.home.root)
    put_checkout_on_path(env)
    times, phases, wrapper = [], [], None
    for n in range(starts):
        port = free_port()
        log = work.env.home.root / "bench" / f"ready-{n + 1}.log"
        log.unlink(missing_ok=True)
        command = [sys.executable, "-m", "rankgate.cli", "serve", "--port", str(port)]
        seen: dict[str, float] = {}
        started_at = time.perf_counter()
        process = start_server(command, env, log)

        def progress(
            log: Path = log, seen: dict[str, float] = seen, started_at: float = started_at
        ) -> None:
            text = log.read_text(errors="replace") if log.exists() else ""
            phases_seen(text, seen, time.perf_counter() - started_at)

        try:
            wait_ready(
                f"http://127.0.0.1:{port}/v1/rank",
                work.bodies[0],
                process,
                log,
                work.api_key,
                interval_s=0.1,
                progress=progress,
            )
            times.append(round(time.perf_counter() - started_at, 2))
            progress()
            wrapper = memory.measure(process.pid)
        finally:
            stop_server(process)
        phases.append(seen)
        work.say(f"    start {n + 1}: ready after {times[-1]:.2f} s ({seen})")
    figures = {"starts_s": times, "median_s": round(statistics.median(times), 2), "phases": phases}
    if wrapper is not None:
        wrapper = memory.ProcessMemory(
            wrapper.pid, "rankgate serve (CLI, at ready time)", wrapper.rss_bytes, wrapper.pss_bytes
        )
    return figures, wrapper


def machine(load_at_start: float | None = None) -> dict[str, Any]:
    """What the run ran on; the load average tells how busy a shared machine was."""
    return {
        "load_1min_start": load_at_start,
        "load_1min_end": round(os.getloadavg()[0], 2),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": version("ray"),
        "onnxruntime": version("onnxruntime"),
        "wrk": wrk_version(),
    }


def command_line() -> str:
    """How this run was asked for, as `rankgate ...`."""
    return shlex.join(["rankgate", *sys.argv[1:]])


def run_bench(
    levels: list[int],
    duration: float,
    repeats: int,
    output: Path,
    say: Say,
    notes: list[str] | None = None,
    warmup: float = DEFAULT_WARMUP_S,
    extras: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    driver: str = "auto",
    allow_install: bool = True,
    command: str | None = None,
    fixed_rate: float | None = None,
    committed: tuple[Path, dict[str, Any]] | None = None,
    tolerances: dict[str, float] | None = None,
    against_build: Path | None = None,
) -> dict[str, Any]:
    """Measure, evaluate the targets, write `<output>/bench.{json,md}` and a line of
    `<output>/history.jsonl`. `fixed_rate`: the CPU part's arrival rate (default: half
    the floor's peak); `committed`: a run (its file and report) to compare this one
    with (loadtests/bench/compare.py), within `tolerances`; `against_build`: a checkout
    of an earlier build (checked) measured in the same rounds."""
    load_at_start = round(os.getloadavg()[0], 2)
    wanted = {OURS, FLOOR, *(EXTRAS[e] for e in extras)}
    systems = [s for s in SYSTEMS if s.name in wanted]
    parts = set(PARTS) - set(skip)
    chosen = choose_driver(driver, allow_install, warmup, say)
    say(f"• closed-loop driver: {chosen.name} ({chosen.why})")
    figures: dict[str, Any] = {}
    stack: list[memory.ProcessMemory] = []
    replicas: list[dict[str, Any]] = []
    earlier_home: Path | None = None
    with workload(levels, duration, repeats, say) as work:
        measured = systems + ([earlier.system(against_build)] if against_build else [])
        run = Run(work, chosen, measured, repeats, parts)
        with contextlib.ExitStack() as servers:
            urls, processes = {}, {}
            for system in systems:
                port = free_port()
                urls[system.name], processes[system.name] = servers.enter_context(
                    started_process(
                        work,
                        system.name,
                        system.label,
                        system.command(work.env, port),
                        port,
                        system.fast_path,
                    )
                )
            own_redis: dict[str, int] = {}
            if against_build is not None:
                other = servers.enter_context(
                    earlier.started(work, against_build, free_port(), commit_of(against_build))
                )
                urls[EARLIER], processes[EARLIER], replicas = (
                    other.url,
                    other.process,
                    other.replicas,
                )
                run.keys[EARLIER] = other.home.api_key
                if other.redis_pid is not None:
                    own_redis[EARLIER] = other.redis_pid
                earlier_home = other.home.root
            run.interleaved(urls)
            results = run.results()
            if "cpu" in parts:
                watched = {OURS: "rankgate"}
                if against_build is not None:
                    watched[EARLIER] = "the earlier build"
                rate, source = cpu_rate(results, watched)
                if fixed_rate is not None:
                    rate, source = fixed_rate, "a fixed rate asked for"
                say(f"• CPU per decision at {rate:.0f} req/s ({source})")
                names = (OURS, FLOOR, *([EARLIER] if against_build is not None else []))
                stacks = stacks_of(processes, work.env, names, own_redis)
                figures["cpu"] = run.cpu(urls, stacks, rate, source)
            if "open-loop" in parts:
                say("• open loop")
                figures["open_loop"] = run.open_loop(urls[OURS], results)
            if "stages" in parts:
                say("• stage timings")
                figures["stages"] = run.stages(urls[OURS], results)
            if "durable" in parts:
                say("• durable acknowledgements: consent writes with and without the fsync wait")
                body = work.bodies[0]
                figures["durable"] = durable_cost(
                    urls[OURS].removesuffix("/v1/rank"),
                    work.api_key,
                    body,
                    body["purpose"],
                    work.env.home.namespace,
                    repeats,
                )
            if "memory" in parts:
                stack = stack_memory(processes[OURS].pid, work.env)
            say("• stopping the servers")
        if "ranker" in parts:
            say("• ranker under load against raw onnxruntime")
            figures["ranker"] = ranker_load(work, repeats)
        if "ready" in parts:
            say(f"• ready time of `rankgate serve` ({READY_STARTS} starts)")
            figures["ready"], wrapper = ready_time(work, READY_STARTS)
            if wrapper is not None and stack:
                stack.append(wrapper)
    if stack:
        figures["memory"] = {
            "measured": "After the load rounds, with both servers up",
            **memory.aggregate(stack),
        }
    report: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or command_line(),
        "machine": machine(load_at_start),
        "driver": {"closed_loop": chosen.name, "why": chosen.why, "open_loop": "python (asyncio)"},
        "duration_s": duration,
        "warmup_s": warmup,
        "rounds": repeats,
        "concurrency": levels,
        "systems": {s.name: s.label for s in measured},
        "results": results,
        "ratios": {
            str(level): ratios(run.runs[OURS][str(level)], run.runs[FLOOR][str(level)])
            for level in levels
        },
        "peak": peaks(run.runs, results),
        "budget_fallbacks": budget_fallbacks(run.runs[OURS], BUDGET_LEVEL_MAX),
        "explain": run.explain(),
        **figures,
        "skipped": sorted(set(PARTS) - parts),
        "notes": notes or [],
        "runs": run.runs,
    }
    if against_build is not None:
        commits = {"this": commit_of(SOURCE_CHECKOUT), "earlier": commit_of(against_build)}
        report["against"] = against_figures(
            run.runs, figures.get("cpu"), against_build, commits, replicas, earlier_home
        )
    if committed is not None:
        path, earlier_report = committed
        report["comparison"] = comparison(earlier_report, path, report, tolerances or {})
    report["targets"] = evaluate(report)
    write_results(output, "bench", report, render_markdown)
    record(output, report, say)
    return report


def record(output: Path, report: dict[str, Any], say: Say) -> None:
    """A line of history next to the report; the README's table when the report is the
    committed one (loadtests/results/ of this checkout)."""
    append_history(output / "history.jsonl", history_entry(report, commit_of(SOURCE_CHECKOUT)))
    committed = SOURCE_CHECKOUT is not None and output.resolve() == results_folder().resolve()
    if committed and SOURCE_CHECKOUT and refresh_readme(SOURCE_CHECKOUT / "README.md", report):
        say("• README.md: the performance table follows this run")
