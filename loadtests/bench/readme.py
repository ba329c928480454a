"""The README's "Performance" table, rendered from a benchmark report (bench.json).

The README holds the table between two markers; a run written to the committed
results folder rewrites it, and a test checks that the README's table is what the
committed bench.json renders, so the two cannot drift apart. The targets are
judged as the code judges them now (report.evaluate), from the run's figures.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from loadtests.bench.compare import DEFAULT_TOLERANCE
from loadtests.bench.figures import FLOOR, OURS
from loadtests.bench.report import MARK, evaluate

START = "<!-- performance table: rendered from loadtests/results/bench.json by `rankgate bench` -->"
END = "<!-- end of the performance table -->"


def _ratio(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("median") is None:
        return "—"
    low, high = figures.get("min"), figures.get("max")
    spread = f" ({low:g}–{high:g})" if low is not None and high is not None else ""
    return f"{figures['median']:g}×{spread}"


def _value(value: float | None, unit: str) -> str:
    return "—" if value is None else f"{value:g} {unit}"


def performance_table(report: dict[str, Any]) -> str:
    """The table and the line under it, between the markers."""
    targets = {t["key"]: t for t in evaluate(report)}
    cpu = report.get("cpu") or {}
    cpu_systems = cpu.get("systems") or {}
    peak = report.get("peak") or {}
    peak_systems = peak.get("systems") or {}
    results = report.get("results") or {}
    c1 = {
        name: next((r["p50_ms"] for r in rows if r["concurrency"] == 1), None)
        for name, rows in results.items()
    }
    memory = report.get("memory") or {}
    ready = report.get("ready") or {}

    def cpu_ms(name: str) -> float | None:
        return ((cpu_systems.get(name) or {}).get("ms_per_decision") or {}).get("median")

    def status(key: str) -> str:
        target = targets[key]
        return f"{target['limit']}: {MARK[target['met']]}"

    rows = [
        (
            "CPU per decision, every process of the stack"
            + (f" ({cpu['rate_rps']:g} req/s, open loop)" if cpu else ""),
            _value(cpu_ms(OURS), "ms"),
            _value(cpu_ms(FLOOR), "ms"),
            _ratio(cpu.get("ratio")),
            status("cpu_per_decision"),
        ),
        (
            "peak throughput, p99 ≤ 50 ms",
            _value((peak_systems.get(OURS) or {}).get("rps"), "req/s"),
            _value((peak_systems.get(FLOOR) or {}).get("rps"), "req/s"),
            _ratio({**(peak.get("ratio_spread") or {}), "median": peak.get("ratio")}),
            status("peak_ratio"),
        ),
        (
            "p50 at concurrency 1",
            _value(c1.get(OURS), "ms"),
            _value(c1.get(FLOOR), "ms"),
            _ratio(((report.get("ratios") or {}).get("1") or {}).get("p50")),
            status("p50_c1_ratio"),
        ),
        (
            "memory of the whole stack (PSS)",
            _value(memory.get("pss_total_mib"), "MiB"),
            "",
            "",
            status("stack_pss"),
        ),
        (
            "ready after `rankgate serve`",
            _value(ready.get("median_s"), "s"),
            "",
            "",
            status("ready"),
        ),
    ]
    lines = [
        START,
        "| figure | rankgate | floor | ratio (spread) | target |",
        "|---|---:|---:|---:|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        _wrapped(
            f"Measured {report['measured_at'][:10]} on {report['machine']['cores']} cores "
            f"(`{report['command']}`, {report['rounds']} interleaved rounds; ratios are "
            "rankgate / floor within each round: median (lowest–highest)); the floor is plain "
            "FastAPI doing the same work in one process. Every figure: "
            "[loadtests/results/bench.md](loadtests/results/bench.md); how they are taken: "
            "[docs/performance.md](docs/performance.md#the-benchmark). `rankgate bench "
            "--compare loadtests/results/bench.json` fails when a ratio is more than "
            f"{DEFAULT_TOLERANCE * 100:g} % worse than this run's."
        ),
        END,
    ]
    return "\n".join(lines)


def _wrapped(text: str) -> str:
    return textwrap.fill(text, width=88, break_long_words=False, break_on_hyphens=False)


def table_in(readme: str) -> str:
    """The README's table, markers included; ValueError when the markers are missing."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError("the README has no performance table markers")
    return readme[start : end + len(END)]


def refresh_readme(path: Path, report: dict[str, Any]) -> bool:
    """Put the table `report` renders in the README at `path`; False when the README
    has no markers (then it is left alone)."""
    text = path.read_text()
    try:
        old = table_in(text)
    except ValueError:
        return False
    path.write_text(text.replace(old, performance_table(report)))
    return True
