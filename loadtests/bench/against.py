"""An earlier build of rankgate measured beside this one, in the same run
(`rankgate bench --against-build DIR`): the checkout's check, the ratios this /
earlier within each round, and the report's section. No server, no I/O beyond
looking at the folder: the earlier build is started by loadtests/bench/earlier.py.

Absolute figures move with the machine; two builds measured in the same rounds,
from the same project and data, see the same machine. So an improvement is
judged as a ratio taken within each round (median and spread over rounds), like
the report's ratios against the floor: CPU per decision (how many times cheaper
this build is: earlier ÷ this, at the same arrival rate), peak throughput with
p99 ≤ 50 ms (this ÷ earlier) and p50 at concurrency 1 (this ÷ earlier, lower is
better).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loadtests.bench.figures import OURS, PEAK_P99_MS, peak, spread

EARLIER = "earlier_build"
"""The earlier build's name among the run's systems."""
IMPROVEMENT_MIN = 1.5
"""The improvement asked for: CPU per decision this many times cheaper, peak
throughput this many times higher, than the earlier build's."""
CHECKOUT_FILES = ("serving/ops/launch.py", "loadtests/bench/systems.py")
"""What the earlier build must have: its launch settings and the benchmark's
functions that turn them into a command and an environment."""


def check_build(folder: Path) -> Path:
    """The checkout `--against-build` names, absolute; ValueError says what is wrong."""
    if not folder.exists():
        raise ValueError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    missing = [name for name in CHECKOUT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a checkout of rankgate (it has no {' and no '.join(missing)})"
        )
    return folder.resolve()


def _round_peaks(levels: dict[str, list[dict[str, Any]]]) -> list[float]:
    """A system's peak in each round, from that round's runs."""
    rounds = len(next(iter(levels.values())))
    return [peak([level_runs[n] for level_runs in levels.values()])["rps"] for n in range(rounds)]


def _median(values: list[float], digits: int = 2) -> float | None:
    return round(statistics.median(values), digits) if values else None


def _met(median: float | None) -> bool | None:
    return None if median is None else median >= IMPROVEMENT_MIN


def against_figures(
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    cpu: dict[str, Any] | None,
    build: Path,
    commits: dict[str, str],
    replicas: list[dict[str, Any]],
    home: Path | None = None,
) -> dict[str, Any]:
    """The report's `against` part. `runs`: closed-loop runs per system, level and
    round; `cpu`: the CPU part's figures (None: skipped); `commits`: "this" and
    "earlier"; `replicas`: what the earlier build's replicas were seen to run;
    `home`: the earlier build's own home (None: it served this one)."""
    ours, earlier = runs[OURS], runs[EARLIER]
    this_peaks, earlier_peaks = _round_peaks(ours), _round_peaks(earlier)
    peak_ratio = [a / b for a, b in zip(this_peaks, earlier_peaks, strict=True) if b]
    c1 = list(zip(ours.get("1", []), earlier.get("1", []), strict=True))
    p50_ratio = [a["p50_ms"] / b["p50_ms"] for a, b in c1 if b["p50_ms"]]
    cpu_part: dict[str, Any] | None = None
    if cpu and EARLIER in cpu["systems"]:
        this_ms = [r["ms_per_decision"] for r in cpu["systems"][OURS]["rounds"]]
        earlier_ms = [r["ms_per_decision"] for r in cpu["systems"][EARLIER]["rounds"]]
        pairs = [(a, b) for a, b in zip(this_ms, earlier_ms, strict=True) if a and b]
        cpu_part = {
            "rate_rps": cpu["rate_rps"],
            "this_ms": _median([a for a in this_ms if a is not None], 3),
            "earlier_ms": _median([b for b in earlier_ms if b is not None], 3),
            "ratio": spread([a / b for a, b in pairs]),
            "times_cheaper": spread([b / a for a, b in pairs]),
        }
    peak_ratio_figures = spread(peak_ratio)
    return {
        "build": str(build),
        "home": None if home is None else str(home),
        "commits": commits,
        "replicas": replicas,
        "cpu_per_decision": cpu_part,
        "peak_throughput": {
            "this_rps": _median(this_peaks, 1),
            "earlier_rps": _median(earlier_peaks, 1),
            "ratio": peak_ratio_figures,
        },
        "p50_c1": {
            "this_ms": _median([a["p50_ms"] for a, _ in c1]),
            "earlier_ms": _median([b["p50_ms"] for _, b in c1]),
            "ratio": spread(p50_ratio),
        },
        "improvement_min": IMPROVEMENT_MIN,
        "met": {
            "cpu_per_decision": _met((cpu_part or {}).get("times_cheaper", {}).get("median")),
            "peak_throughput": _met(peak_ratio_figures["median"]),
        },
    }


def _times(figures: dict[str, Any] | None) -> str:
    """`1.8× (1.6–2.0)`: a median ratio and its spread over rounds."""
    if not figures or figures.get("median") is None:
        return "—"
    return f"{figures['median']:g}× ({figures['min']:g}–{figures['max']:g})"


def _value(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


VERDICT = {True: "met", False: "MISSED", None: "not measured"}


def against_markdown(against: dict[str, Any] | None) -> list[str]:
    """The report's section "Against an earlier build"."""
    if not against:
        return []
    commits, cpu = against["commits"], against["cpu_per_decision"]
    peaks, p50, met = against["peak_throughput"], against["p50_c1"], against["met"]
    least = f"{against['improvement_min']:g}×"
    seen = "; ".join(
        f"pid {r['pid']}: PYTHONPATH first entry {r['pythonpath_first']}, working folder {r['cwd']}"
        for r in against["replicas"]
    )
    home = against.get("home")
    where = (
        f"the earlier build on a home of its own (`{home}`), set up by its own `rankgate setup` "
        "from the same project and data, with its own embedded Redis (in its CPU as this "
        "build's Redis is in this build's) and an API key of its own"
        if home
        else "on the same home, Redis and Feast data"
    )
    lines = [
        "",
        "## Against an earlier build",
        "",
        (
            f"This build (commit `{commits['this']}`) against an earlier build in "
            f"`{against['build']}` (commit `{commits['earlier']}`), each started with its own "
            f"code and its own launch settings (its serve_env and serve config), side by side, "
            f"{where}, and driven in the same rounds with the same requests: every "
            "closed-loop level and the CPU per decision, the three systems in turn (rankgate, "
            "floor, earlier build). Ratios this / earlier within each round, median "
            "(lowest–highest)."
        ),
        "",
        (
            f"The earlier build's replicas ran its own code: {seen}."
            if seen
            else "The earlier build's replicas were not found to check which code they ran."
        ),
        "",
        "| figure | this build | earlier build | this / earlier | improvement |",
        "|---|---:|---:|---:|---:|",
    ]
    if cpu:
        lines.append(
            f"| CPU ms per decision at {cpu['rate_rps']:g} req/s | {_value(cpu['this_ms'])} "
            f"| {_value(cpu['earlier_ms'])} | {_times(cpu['ratio'])} "
            f"| {_times(cpu['times_cheaper'])} cheaper |"
        )
    lines += [
        (
            f"| peak req/s with p99 ≤ {PEAK_P99_MS:g} ms | {_value(peaks['this_rps'])} "
            f"| {_value(peaks['earlier_rps'])} | {_times(peaks['ratio'])} "
            f"| {_times(peaks['ratio'])} higher |"
        ),
        (
            f"| p50 ms at concurrency 1 | {_value(p50['this_ms'])} | {_value(p50['earlier_ms'])} "
            f"| {_times(p50['ratio'])} | — |"
        ),
        "",
        (
            f"- CPU per decision at least {least} cheaper than the earlier build's: "
            + (f"{_times(cpu['times_cheaper'])}" if cpu else "not measured (cpu skipped)")
            + f": **{VERDICT[met['cpu_per_decision']]}**"
        ),
        (
            f"- Peak throughput at least {least} the earlier build's: "
            f"{_times(peaks['ratio'])}: **{VERDICT[met['peak_throughput']]}**"
        ),
    ]
    return lines
