"""The benchmark guards itself: a run's headline ratios against a committed run's,
and a short history of runs.

Only ratios are compared, each taken within one run (rankgate / floor, rounds
interleaved): absolute times move with the machine, a ratio moves when rankgate's
own work per request does. A figure regresses when it is worse than the committed
one by more than its tolerance, relative to the committed figure: for a figure
where lower is better (CPU per decision, p50 at concurrency 1), current / committed
- 1; where higher is better (peak throughput), 1 - current / committed.
`rankgate bench --compare FILE` fails (exit status 1, each regressed figure named)
when one does; a figure missing from either run is listed as not compared.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

DEFAULT_TOLERANCE = 0.15
"""How much worse than the committed figure a ratio may be (15 %), unless told."""
HISTORY_KEEP = 100
"""Lines kept in history.jsonl (the oldest go first)."""


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    better: Literal["lower", "higher"]


FIGURES = (
    Figure("cpu_per_decision", "CPU per decision, rankgate / floor", "lower"),
    Figure("peak_throughput", "peak throughput (p99 ≤ 50 ms), rankgate / floor", "higher"),
    Figure("p50_c1", "p50 at concurrency 1, rankgate / floor", "lower"),
)
KEYS = tuple(f.key for f in FIGURES)


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The ratios the guard compares (medians over rounds; None: not measured)."""
    cpu = ((report.get("cpu") or {}).get("ratio") or {}).get("median")
    peak = (report.get("peak") or {}).get("ratio")
    p50 = (((report.get("ratios") or {}).get("1") or {}).get("p50") or {}).get("median")
    return {"cpu_per_decision": cpu, "peak_throughput": peak, "p50_c1": p50}


def parse_tolerances(text: str) -> dict[str, float]:
    """`15` (percent, every figure) or `cpu_per_decision=20,p50_c1=25` (the others
    keep the default); ValueError says what is wrong."""
    tolerances = dict.fromkeys(KEYS, DEFAULT_TOLERANCE)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, value = part.rpartition("=")
        if key and key not in tolerances:
            raise ValueError(f"unknown figure {key!r} (known: {', '.join(KEYS)})")
        try:
            percent = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage") from None
        if not 0 <= percent < 1000:
            raise ValueError(f"{percent:g} is not a percentage between 0 and 1000")
        for name in [key] if key else KEYS:
            tolerances[name] = percent / 100.0
    return tolerances


@dataclass(frozen=True)
class Verdict:
    """One figure of the run against the committed run."""

    key: str
    label: str
    committed: float | None
    current: float | None
    worse_by: float | None
    """Relative change towards worse (0.2: 20 % worse; negative: better)."""
    tolerance: float
    regressed: bool | None
    """None: not compared (missing from one of the runs)."""


def worse_by(figure: Figure, committed: float, current: float) -> float:
    if figure.better == "lower":
        return current / committed - 1.0
    return 1.0 - current / committed


def compare(
    committed: dict[str, float | None],
    current: dict[str, float | None],
    tolerances: dict[str, float] | None = None,
) -> list[Verdict]:
    """Each headline figure of `current` against `committed`."""
    tolerances = tolerances or dict.fromkeys(KEYS, DEFAULT_TOLERANCE)
    verdicts = []
    for figure in FIGURES:
        old, new = committed.get(figure.key), current.get(figure.key)
        tolerance = tolerances[figure.key]
        if old is None or new is None or old <= 0:
            verdicts.append(Verdict(figure.key, figure.label, old, new, None, tolerance, None))
            continue
        change = round(worse_by(figure, old, new), 4)
        regressed = change > tolerance
        verdicts.append(Verdict(figure.key, figure.label, old, new, change, tolerance, regressed))
    return verdicts


def comparison(
    committed_report: dict[str, Any],
    path: Path,
    current: dict[str, Any],
    tolerances: dict[str, float],
) -> dict[str, Any]:
    """What the run's report keeps of its comparison with the committed run."""
    verdicts = compare(headline(committed_report), headline(current), tolerances)
    return {
        "against": str(path),
        "against_measured_at": committed_report.get("measured_at"),
        "verdicts": [asdict(v) for v in verdicts],
        "regressed": [v.key for v in verdicts if v.regressed],
        "compared": sum(1 for v in verdicts if v.regressed is not None),
    }


def verdict_line(verdict: dict[str, Any]) -> str:
    if verdict["regressed"] is None:
        which = "this run" if verdict["current"] is None else "the committed run"
        return f"{verdict['label']}: not compared (not measured in {which})"
    direction = "worse" if verdict["worse_by"] > 0 else "better"
    return (
        f"{verdict['label']}: {verdict['committed']:g}× → {verdict['current']:g}×, "
        f"{abs(verdict['worse_by']) * 100:.1f} % {direction} "
        f"(tolerance {verdict['tolerance'] * 100:g} %)"
        + (": REGRESSED" if verdict["regressed"] else "")
    )


def failure(found: dict[str, Any] | None) -> str | None:
    """Why the guard fails the run (the regressed figures, one a line), or None."""
    if not found:
        return None
    if found["regressed"]:
        lines = [verdict_line(v) for v in found["verdicts"] if v["regressed"]]
        return f"regressed against {found['against']}:\n  " + "\n  ".join(lines)
    if not found["compared"]:
        return f"nothing to compare: no headline figure is in both this run and {found['against']}"
    return None


def comparison_markdown(found: dict[str, Any] | None) -> list[str]:
    if not found:
        return []
    when = found.get("against_measured_at") or "unknown"
    return [
        "",
        "## Against the committed run",
        "",
        (
            f"`{found['against']}` (measured {when}); ratios within each run, so the "
            "machine's speed cancels out:"
        ),
        "",
        *(f"- {verdict_line(v)}" for v in found["verdicts"]),
    ]


def commit_of(checkout: Path | None) -> str:
    """The checkout's commit (with `-dirty` when its code has uncommitted changes:
    the benchmark's own outputs do not count), or "unknown" outside a git checkout."""
    if checkout is None:
        return "unknown"
    try:
        head = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            # The run's own outputs (results, the README's table) are not the code.
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"]
            + ["--", ".", ":!loadtests/results", ":!README.md"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if status else "") if head else "unknown"


def history_entry(report: dict[str, Any], commit: str) -> dict[str, Any]:
    """One line of history.jsonl: when, which code, how, the headline ratios."""
    return {
        "measured_at": report["measured_at"],
        "commit": commit,
        "command": report.get("command"),
        "rounds": report.get("rounds"),
        "duration_s": report.get("duration_s"),
        **headline(report),
        "regressed": (report.get("comparison") or {}).get("regressed"),
    }


def append_history(path: Path, entry: dict[str, Any], keep: int = HISTORY_KEEP) -> None:
    """Add `entry` as the last line of `path`, keeping the last `keep` lines."""
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [*lines, json.dumps(entry, ensure_ascii=False)][-keep:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
