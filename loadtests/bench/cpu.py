"""CPU per decision: what every process of a system's stack spends per answered request.

At a fixed arrival rate (open loop, the same rate for both systems: half the floor's
peak, so the floor is far from saturated and rankgate is asked for the same work;
half rankgate's own peak while that is lower, so that neither is overloaded), each system is driven in turn, round after round. The driver
(loadtests.drive `--cpu-pids`) reads the CPU time (user + system, from
/proc/PID/stat) of every process of the system's stack right before its measured
requests and right after the last answer; the sum, divided by the requests
answered (HTTP 200, fallbacks included), is the CPU per decision. The ratio
rankgate / floor is taken within each round.

A system's stack: rankgate, every process below its `serve run` (Ray's GCS, raylet,
dashboard and agents, the controller, the proxy, HAProxy, the replicas) plus the
Redis-compatible server; the floor, its uvicorn process plus the same Redis
server. The two systems share that Redis server, and only the system under load
makes it work; rankgate's idle processes keep spending while the floor is driven,
and that is not counted against the floor. The load process itself is no part of
either stack.

Processes are named as in the memory table (loadtests/bench/memory.py), so the
breakdown says which burn the CPU.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from loadtests.bench import memory
from loadtests.bench.figures import FLOOR, OURS, spread

CPU_MAX_RATIO = 1.3
"""The target: rankgate's CPU per decision at most this many times the floor's."""
RATE_SHARE = 0.5
"""The fixed arrival rate, as a share of the floor's peak throughput."""


@dataclass(frozen=True)
class Stack:
    """The processes whose CPU is one system's: pid -> readable name."""

    labels: dict[int, str]

    @property
    def pids(self) -> list[int]:
        return list(self.labels)


def label(pid: int) -> str | None:
    """The memory table's name of a process; None when it is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return memory.process_label(process.name(), process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def stack_of(roots: list[int], extra: list[int]) -> Stack:
    """Every process of the trees of `roots`, then the `extra` processes (each once)."""
    labels: dict[int, str] = {}
    for pid in [p for root in roots for p in memory.tree(root)] + extra:
        if pid not in labels and (name := label(pid)) is not None:
            labels[pid] = name
    return Stack(labels)


def round_figures(run: dict[str, Any], stack: Stack) -> dict[str, Any]:
    """One system's open-loop run with the CPU its processes spent: per decision,
    in total and by process name (CPU ms per answered request)."""
    answered = run["requests"] - run["errors"]
    used = {int(pid): seconds for pid, seconds in run["cpu_seconds"].items()}
    by_name: dict[str, float] = {}
    for pid, seconds in used.items():
        name = stack.labels.get(pid, f"pid {pid}")
        by_name[name] = by_name.get(name, 0.0) + seconds
    total = sum(used.values())
    per_decision = 1000.0 / answered if answered else 0.0
    return {
        "answered": answered,
        "achieved_rps": run["achieved_rps"],
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
        "errors": run["errors"],
        "fallbacks": run["fallbacks"],
        "cpu_s": round(total, 3),
        "ms_per_decision": round(total * per_decision, 3) if answered else None,
        "by_process_ms": {name: round(s * per_decision, 3) for name, s in by_name.items()},
        "processes": len(used),
    }


def breakdown(rounds: list[dict[str, Any]], stack: Stack) -> list[dict[str, Any]]:
    """CPU ms per decision by process name, median over rounds, largest first."""
    names = sorted({name for r in rounds for name in r["by_process_ms"]})
    counts = {name: sum(1 for n in stack.labels.values() if n == name) for name in names}
    rows = [
        {
            "process": name,
            "count": counts[name],
            "ms_per_decision": round(
                statistics.median(r["by_process_ms"].get(name, 0.0) for r in rounds), 3
            ),
        }
        for name in names
    ]
    return sorted(rows, key=lambda row: row["ms_per_decision"], reverse=True)


def cpu_figures(
    rate: float,
    source: str,
    duration: float,
    rounds: dict[str, list[dict[str, Any]]],
    stacks: dict[str, Stack],
) -> dict[str, Any]:
    """Each system's CPU per decision (median and spread over rounds), its breakdown,
    and the ratio rankgate / floor taken within each round."""
    systems = {}
    for name, runs in rounds.items():
        values = [r["ms_per_decision"] for r in runs if r["ms_per_decision"] is not None]
        systems[name] = {
            "ms_per_decision": spread(values, 3),
            "processes": len(stacks[name].labels),
            "answered": sum(r["answered"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "fallbacks": sum(r["fallbacks"] for r in runs),
            "achieved_rps": round(statistics.median(r["achieved_rps"] for r in runs), 1),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
            "breakdown": breakdown(runs, stacks[name]),
            "rounds": runs,
        }
    pairs = zip(rounds.get(OURS, []), rounds.get(FLOOR, []), strict=True)
    ratio = [
        a["ms_per_decision"] / b["ms_per_decision"]
        for a, b in pairs
        if a["ms_per_decision"] is not None and b["ms_per_decision"]
    ]
    return {
        "rate_rps": round(rate, 1),
        "rate_source": source,
        "duration_s": duration,
        "systems": systems,
        "ratio": spread(ratio),
    }


def _ratio(figures: dict[str, Any]) -> str:
    if figures.get("median") is None:
        return "—"
    return f"{figures['median']:g}× ({figures['min']:g}–{figures['max']:g})"


def cpu_target(cpu: dict[str, Any] | None) -> dict[str, Any]:
    """The headline target, as report.evaluate lists targets."""
    ratio = (cpu or {}).get("ratio") or {}
    figure = "—"
    if cpu and ratio.get("median") is not None:
        ours = cpu["systems"][OURS]["ms_per_decision"]["median"]
        floor = cpu["systems"][FLOOR]["ms_per_decision"]["median"]
        figure = (
            f"rankgate {ours:g} ms vs floor {floor:g} ms of CPU per answered request at "
            f"{cpu['rate_rps']:g} req/s = {_ratio(ratio)}"
        )
    median = ratio.get("median")
    return {
        "key": "cpu_per_decision",
        "what": "CPU per decision, every process of the stack, at a fixed arrival rate",
        "figure": figure,
        "limit": f"≤ {CPU_MAX_RATIO:g}×",
        "met": None if median is None else median <= CPU_MAX_RATIO,
    }


def cpu_markdown(cpu: dict[str, Any] | None) -> list[str]:
    """The report's section: both systems' CPU per decision and where it goes."""
    if not cpu:
        return []
    systems = cpu["systems"]
    lines = [
        "",
        "## CPU per decision",
        "",
        (
            f"Open loop at {cpu['rate_rps']:g} req/s ({cpu['rate_source']}), "
            f"{len(systems[OURS]['rounds'])} interleaved round(s) of {cpu['duration_s']:g} s "
            "per system. CPU seconds (user + system, /proc/PID/stat) of every process of each "
            "system's stack, read right before the measured requests and after the last "
            "answer, per answered request; rankgate: every process below `serve run` plus the "
            "Redis-compatible server; the floor: its process plus the same Redis server "
            "(shared, worked by whichever system is driven). Ratio rankgate / floor per "
            f"round: **{_ratio(cpu['ratio'])}** (target ≤ {CPU_MAX_RATIO:g}×)."
        ),
        "",
        "| system | CPU ms per decision [lowest, highest] | processes | achieved req/s | p99 ms | answered | fallbacks | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, figures in systems.items():
        ms = figures["ms_per_decision"]
        lines.append(
            f"| {name} | {ms['median']} [{ms['min']}, {ms['max']}] | {figures['processes']} "
            f"| {figures['achieved_rps']} | {figures['p99_ms']} | {figures['answered']} "
            f"| {figures['fallbacks']} | {figures['errors']} |"
        )
    for name, figures in systems.items():
        lines += [
            "",
            (
                f"Where {name}'s CPU goes (ms per decision, median over rounds; processes of "
                "one name added up):"
            ),
            "",
            "| process | count | CPU ms per decision |",
            "|---|---:|---:|",
            *(
                f"| {row['process']} | {row['count']} | {row['ms_per_decision']} |"
                for row in figures["breakdown"]
            ),
        ]
    return lines
