"""Figures, targets and the markdown of `rankgate bench` (no server, no I/O).

The runner (loadtests/bench/run.py) collects, per system and concurrency, one run per
round; everything here is computed from those runs and the other parts' figures,
so it can be checked on a small synthetic report.
"""

from __future__ import annotations

import statistics
from typing import Any

from loadtests.bench.against import against_markdown
from loadtests.bench.compare import comparison_markdown
from loadtests.bench.cpu import cpu_markdown, cpu_target
from loadtests.bench.figures import FLOOR, OURS, PEAK_P99_MS, at_level, peak, spread
from loadtests.bench.others import other_systems_markdown

# The targets (issues 15 and 27), all judged on one run: medians of interleaved rounds
# (CPU per decision: loadtests/bench/cpu.py).
P50_C1_MAX_MS = 2.0
P50_C1_MAX_RATIO = 1.5
P99_C1_MAX_MS = 5.0
PEAK_MIN_RATIO = 1.0
BUDGET_LEVEL_MAX = 16
RANKER_MIN_RATIO = 0.7
EXPLAIN_MAX_ADDED_MS = 2.0
STACK_MAX_PSS_MIB = 1024.0
READY_MAX_S = 15.0
BUDGET_REASON = "fallback:budget_exhausted"


def summed_outcomes(runs: list[dict[str, Any]]) -> dict[str, int]:
    """The answers of several runs, by outcome, added up."""
    outcomes: dict[str, int] = {}
    for run in runs:
        for key, count in run["outcomes"].items():
            outcomes[key] = outcomes.get(key, 0) + count
    return outcomes


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system at one concurrency: medians over rounds, their spread, and the
    answers of all rounds added up."""
    row: dict[str, Any] = {
        "concurrency": runs[0]["concurrency"],
        "runs": len(runs),
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "outcomes": summed_outcomes(runs),
    }
    for figure in ("throughput_rps", "p50_ms", "p99_ms", "p999_ms"):
        values = [r[figure] for r in runs if r.get(figure) is not None]
        row[figure] = round(statistics.median(values), 2) if values else None
        row[f"{figure}_spread"] = [min(values), max(values)] if values else None
    return row


def ratios(ours: list[dict[str, Any]], floor: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round, ours / floor of req/s and of p50 (the same round's runs)."""
    pairs = list(zip(ours, floor, strict=True))
    return {
        "throughput": spread(
            [a["throughput_rps"] / b["throughput_rps"] for a, b in pairs if b["throughput_rps"]]
        ),
        "p50": spread([a["p50_ms"] / b["p50_ms"] for a, b in pairs if b["p50_ms"]]),
    }


def peaks(runs: dict[str, dict[str, list[dict[str, Any]]]], rows: dict[str, Any]) -> dict[str, Any]:
    """Each system's peak from its median rows; the ratio judged is, like the others,
    taken within each round (each round's peaks from that round's runs): its median
    and spread. The ratio of the median rows' peaks is kept beside it."""
    found = {name: peak(system_rows) for name, system_rows in rows.items()}
    ours, floor = found.get(OURS), found.get(FLOOR)
    result: dict[str, Any] = {
        "systems": found,
        "ratio": None,
        "ratio_spread": spread([]),
        "ratio_of_medians": None,
    }
    if ours is None or floor is None:
        return result
    if floor["rps"]:
        result["ratio_of_medians"] = round(ours["rps"] / floor["rps"], 3)
    rounds = len(next(iter(runs[OURS].values())))
    per_round = []
    for n in range(rounds):
        a = peak([level_runs[n] for level_runs in runs[OURS].values()])["rps"]
        b = peak([level_runs[n] for level_runs in runs[FLOOR].values()])["rps"]
        if b:
            per_round.append(a / b)
    result["ratio_spread"] = spread(per_round)
    result["ratio"] = result["ratio_spread"]["median"]
    return result


def budget_fallbacks(levels: dict[str, list[dict[str, Any]]], max_level: int) -> int:
    """Answers degraded for an exhausted budget, over all rounds at levels ≤ max_level."""
    return sum(
        run["outcomes"].get(BUDGET_REASON, 0)
        for level, level_runs in levels.items()
        if int(level) <= max_level
        for run in level_runs
    )


def _check(figure: float | None, limit: float, at_least: bool = False) -> bool | None:
    if figure is None:
        return None
    return figure >= limit if at_least else figure <= limit


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: what, the figure, the limit, met (None: not measured)."""
    ours_rows = report["results"].get(OURS, [])
    c1 = at_level(ours_rows, 1)
    ratio_c1 = (report.get("ratios") or {}).get("1", {}).get("p50", {}).get("median")
    peak_figures = report.get("peak") or {}
    explain = report.get("explain") or {}
    memory = report.get("memory") or {}
    ranker = report.get("ranker") or {}
    ready = report.get("ready") or {}
    fallbacks = report.get("budget_fallbacks")
    ranker_ratio = (ranker.get("ratio") or {}).get("median")
    added = (explain.get("added_ms") or {}).get("median")
    ours_peak = (peak_figures.get("systems") or {}).get(OURS, {})
    floor_peak = (peak_figures.get("systems") or {}).get(FLOOR, {})

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:g} ms"

    targets = [
        cpu_target(report.get("cpu")),
        {
            "key": "p50_c1",
            "what": "p50 at concurrency 1, end to end through the ingress",
            "figure": ms(c1["p50_ms"] if c1 else None),
            "limit": f"≤ {P50_C1_MAX_MS:g} ms",
            "met": _check(c1["p50_ms"] if c1 else None, P50_C1_MAX_MS),
        },
        {
            "key": "p50_c1_ratio",
            "what": "p50 at concurrency 1 against the floor (plain FastAPI), same rounds",
            "figure": _ratio_text(((report.get("ratios") or {}).get("1") or {}).get("p50")),
            "limit": f"≤ {P50_C1_MAX_RATIO:g}×",
            "met": _check(ratio_c1, P50_C1_MAX_RATIO),
        },
        {
            "key": "p99_c1",
            "what": "p99 at concurrency 1",
            "figure": ms(c1["p99_ms"] if c1 else None),
            "limit": f"≤ {P99_C1_MAX_MS:g} ms",
            "met": _check(c1["p99_ms"] if c1 else None, P99_C1_MAX_MS),
        },
        {
            "key": "peak_ratio",
            "what": f"peak throughput with p99 ≤ {PEAK_P99_MS:g} ms against the floor's (ratio per round)",
            "figure": _peak_text(ours_peak, floor_peak, peak_figures),
            "limit": f"≥ {PEAK_MIN_RATIO:g}×",
            "met": _check(peak_figures.get("ratio"), PEAK_MIN_RATIO, at_least=True),
        },
        {
            "key": "budget_fallbacks",
            "what": f"budget fallbacks (`budget_exhausted`) at concurrency ≤ {BUDGET_LEVEL_MAX}, default budget",
            "figure": "—" if fallbacks is None else str(fallbacks),
            "limit": "0",
            "met": None if fallbacks is None else fallbacks == 0,
        },
        {
            "key": "ranker_ratio",
            "what": "ranker under load against raw onnxruntime rows/s, same batch size",
            "figure": (
                f"{ranker.get('under_load_rows_per_s')} vs {ranker.get('raw_rows_per_s')} rows/s"
                f" = {_ratio_text(ranker.get('ratio'))}"
                if ranker
                else "—"
            ),
            "limit": f"≥ {RANKER_MIN_RATIO:g}×",
            "met": _check(ranker_ratio, RANKER_MIN_RATIO, at_least=True),
        },
        {
            "key": "explain_added",
            "what": "`explain: true` (top 10) added p50 at concurrency 1",
            "figure": _ms_spread(explain.get("added_ms")),
            "limit": f"≤ {EXPLAIN_MAX_ADDED_MS:g} ms",
            "met": _check(added, EXPLAIN_MAX_ADDED_MS),
        },
        {
            "key": "stack_pss",
            "what": "whole stack PSS (shared pages counted once; RSS shown beside it)",
            "figure": (
                f"{memory['pss_total_mib']:g} MiB PSS ({memory['rss_total_mib']:g} MiB RSS) "
                f"over {memory.get('count')} processes"
                + (f", PSS unread for {memory['pss_missing']}" if memory.get("pss_missing") else "")
                if memory
                else "—"
            ),
            "limit": f"≤ {STACK_MAX_PSS_MIB:g} MiB (1.0 GiB)",
            "met": _check(
                memory.get("pss_total_mib") if not memory.get("pss_missing") else None,
                STACK_MAX_PSS_MIB,
            ),
        },
        {
            "key": "ready",
            "what": "ready after `rankgate serve` on a set-up home (median of starts)",
            "figure": (
                f"{ready.get('median_s')} s ({', '.join(f'{s:g}' for s in ready.get('starts_s', []))})"
                if ready
                else "—"
            ),
            "limit": f"≤ {READY_MAX_S:g} s",
            "met": _check(ready.get("median_s"), READY_MAX_S),
        },
    ]
    return targets


def _peak_text(ours: dict[str, Any], floor: dict[str, Any], figures: dict[str, Any]) -> str:
    if not figures:
        return "—"

    def side(found: dict[str, Any]) -> str:
        if found.get("concurrency") is None:
            return f"none (no level had p99 ≤ {PEAK_P99_MS:g} ms without errors)"
        return f"{found['rps']:g} req/s (c={found['concurrency']})"

    ratio = {**(figures.get("ratio_spread") or {}), "median": figures.get("ratio")}
    return f"rankgate {side(ours)} vs floor {side(floor)} = {_ratio_text(ratio)}"


def _ratio_text(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("median") is None:
        return "—"
    low, high = figures.get("min"), figures.get("max")
    text = f"{figures['median']:g}×"
    return text + (f" ({low:g}–{high:g})" if low is not None and high is not None else "")


def _ms_spread(figures: dict[str, Any] | None) -> str:
    if not figures or figures.get("median") is None:
        return "—"
    return f"{figures['median']:+g} ms ({figures['min']:+g} to {figures['max']:+g})"


MARK = {True: "met", False: "MISSED", None: "not measured"}


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    return [
        f"- {t['what']}: {t['figure']} (target {t['limit']}): **{MARK[t['met']]}**" for t in targets
    ]


def _cell(value: Any) -> str:
    return "—" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _spread_cell(row: dict[str, Any], figure: str) -> str:
    bounds = row.get(f"{figure}_spread")
    if row.get(figure) is None:
        return "—"
    if not bounds or row["runs"] < 2:
        return _cell(row[figure])
    return f"{_cell(row[figure])} [{_cell(bounds[0])}, {_cell(bounds[1])}]"


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    driver = report["driver"]
    lines = [
        "# rankgate benchmark",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"Measured {report['measured_at']} on {machine['cores']} cores "
            f"({machine['platform']}), Python {machine['python']}, Ray {machine['ray']}, "
            f"onnxruntime {machine['onnxruntime']}."
            + (
                f" Load average (1 min) of the machine at the start and end of the run: "
                f"{machine['load_1min_start']:g} and {machine['load_1min_end']:g}."
                if machine.get("load_1min_start") is not None
                else ""
            )
        ),
        (
            f"Closed-loop load: **{driver['closed_loop']}** ({driver['why']}); open-loop load: "
            f"{driver['open_loop']}. Each load process runs apart from the servers, on the same "
            "machine."
        ),
        (
            f"The systems are started once and stay up together; {report['rounds']} "
            f"round{'s' if report['rounds'] != 1 else ''}, "
            f"each driving every concurrency on {' then '.join(report['systems'])} in turn "
            f"({report['duration_s']:g} s per run after {report['warmup_s']:g} s of warm-up), so "
            "drift of the machine hits them alike. Figures are medians over rounds "
            "[lowest, highest]; ratios are rankgate / floor within each round, median "
            "(lowest–highest). Requests: consenting users, the whole catalogue as candidates, "
            "k=10, explain off; every system scores with the same ONNX model (the stable "
            "version) from the same Feast/Redis features."
        ),
        "",
        "| concurrency | rankgate req/s | p50 ms | p99 ms | floor req/s | p50 ms | ratio req/s (spread) | ratio p50 (spread) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours, floor = report["results"].get(OURS, []), report["results"].get(FLOOR, [])
    for row in ours:
        other = at_level(floor, row["concurrency"]) or {}
        pair = (report.get("ratios") or {}).get(str(row["concurrency"]), {})
        lines.append(
            f"| {row['concurrency']} | {_cell(row['throughput_rps'])} | {_cell(row['p50_ms'])} "
            f"| {_cell(row['p99_ms'])} | {_cell(other.get('throughput_rps'))} "
            f"| {_cell(other.get('p50_ms'))} | {_ratio_text(pair.get('throughput'))} "
            f"| {_ratio_text(pair.get('p50'))} |"
        )
    lines += ["", "## Targets", "", *target_lines(report["targets"])]
    lines += comparison_markdown(report.get("comparison"))
    lines += against_markdown(report.get("against"))
    lines += cpu_markdown(report.get("cpu"))
    lines += other_systems_markdown(report)
    lines += _all_runs(report)
    lines += _ranker(report.get("ranker"))
    lines += _explain(report.get("explain"))
    lines += _open_loop(report.get("open_loop"))
    lines += _stages(report.get("stages"))
    lines += durable_markdown(report.get("durable"))
    lines += _memory(report.get("memory"))
    lines += _ready(report.get("ready"))
    if report.get("skipped"):
        lines += ["", f"Not measured in this run (skipped): {', '.join(report['skipped'])}."]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def _all_runs(report: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Every system and level",
        "",
        "| system | concurrency | req/s | p50 ms | p99 ms | p99.9 ms | errors | answers (all rounds) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows in report["results"].items():
        label = report["systems"].get(name, name)
        for row in rows:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(row["outcomes"].items()))
            lines.append(
                f"| {label} | {row['concurrency']} | {_spread_cell(row, 'throughput_rps')} "
                f"| {_spread_cell(row, 'p50_ms')} | {_spread_cell(row, 'p99_ms')} "
                f"| {_cell(row.get('p999_ms'))} | {row['errors']} | {outcomes} |"
            )
    return lines


def _ranker(ranker: dict[str, Any] | None) -> list[str]:
    if not ranker:
        return []
    lines = [
        "",
        "## Ranker under load against raw onnxruntime",
        "",
        (
            f"In a process of its own: {ranker['concurrency']} coroutines each build the matrix of "
            f"the {ranker['rows_per_request']} eligible items (features.vector.build_matrix) and "
            "score it through the ingress's `@serve.batch` (BatchedScoring.score_many, batching "
            f"{ranker['batching']}), against `InferenceSession.run` on a ready matrix of the same "
            f"rows per call, {ranker['rounds']} interleaved rounds of {ranker['duration_s']:g} s."
        ),
        "",
        "| round | under load rows/s | mean batch (requests) | raw onnxruntime rows/s | rows per call | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, (loaded, raw) in enumerate(zip(ranker["under_load"], ranker["raw"], strict=True)):
        lines.append(
            f"| {n + 1} | {loaded['rows_per_s']} | {loaded['mean_batch_requests']} "
            f"| {raw['rows_per_s']} | {raw['rows']} | {ranker['ratio']['per_round'][n]} |"
        )
    lines.append(
        f"| median | {ranker['under_load_rows_per_s']} | {ranker['mean_batch_requests']} "
        f"| {ranker['raw_rows_per_s']} | | {_ratio_text(ranker['ratio'])} |"
    )
    return lines


def _explain(explain: dict[str, Any] | None) -> list[str]:
    if not explain:
        return []
    return [
        "",
        "## Explanations on request",
        "",
        (
            f"Concurrency 1, the same rankgate server: p50 {explain['p50_without_ms']} ms without "
            f'`explain`, {explain["p50_with_ms"]} ms with `"explain": true` (k=10); added '
            f"{_ms_spread(explain['added_ms'])} (per round, the run with explain right after the "
            f"run without). p99 with explain: {explain['p99_with_ms']} ms; answers with explain: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(explain['outcomes'].items()))}."
        ),
    ]


def durable_markdown(durable: dict[str, Any] | None) -> list[str]:
    """The cost of durable acknowledgements (loadtests/bench/durable.py)."""
    if not durable:
        return []
    rows = [
        ("consent write on Redis, answered at once", "store_plain_ms"),
        ("the same, answered once fsynced (barrier + WAITAOF)", "store_durable_ms"),
        ("POST /v1/consent, concurrency 1", "consent_c1_ms"),
        ("POST /v1/consent, concurrency 8", "consent_c8_ms"),
        ("POST /v1/rank, concurrency 1 (no acknowledged write)", "rank_c1_ms"),
    ]
    persistence = durable["persistence"]
    lines = [
        "",
        "## Durable acknowledgements",
        "",
        (
            f"Medians over rounds (Redis: appendonly {persistence['appendonly']}, appendfsync "
            f"{persistence['appendfsync']}). Waiting for the fsync adds "
            f"{durable['added_per_write_ms']} ms to each acknowledged write; ranking does not wait."
        ),
        "",
        "| | p50 ms (min-max over rounds) |",
        "|---|---:|",
    ]
    for label, key in rows:
        f = durable[key]
        lines.append(f"| {label} | {f['median']} ({f['min']}-{f['max']}) |")
    return lines


def _open_loop(open_loop: dict[str, Any] | None) -> list[str]:
    if not open_loop:
        return []
    lines = [
        "",
        "## Fixed arrival rate (open loop)",
        "",
        (
            f"rankgate at shares of its measured peak ({open_loop['peak_rps']} req/s, "
            f"{open_loop['peak_source']}); request i is due at t0 + i/rate and its latency "
            "counts from then, so waiting behind a slow server is not hidden. Python driver "
            f"(asyncio, up to {open_loop['connections']} connections), {open_loop['rounds']} "
            f"round(s) of {open_loop['duration_s']:g} s; medians over rounds. Driver lag: how late "
            "the driver itself sent requests (p99 / max); late = sent > 1 ms after due."
        ),
        "",
        "| share of peak | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | errors | fallbacks (budget) | driver lag p99 / max ms | sent late |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in open_loop["rows"]:
        lines.append(
            f"| {row['share']:.0%} | {row['offered_rps']} | {row['achieved_rps']} "
            f"| {row['p50_ms']} | {row['p99_ms']} | {row['p999_ms']} | {row['errors']} "
            f"| {row['fallbacks']} ({row['budget_fallbacks']}) "
            f"| {row['driver_lag_p99_ms']} / {row['driver_lag_max_ms']} "
            f"| {row['sent_late_share']:.1%} |"
        )
    return lines


def _stages(stages: dict[str, Any] | None) -> list[str]:
    if not stages or not stages.get("rows"):
        return []
    names = sorted({name for row in stages["rows"] for name in row["stages"]})
    lines = [
        "",
        "## Where rankgate's time goes",
        "",
        (
            f"Server-side stage medians (ms) from the answers' `timings_ms` ({stages['source']}); "
            "the rest of the client's latency is HTTP, HAProxy and Ray Serve's replica."
        ),
        "",
        "| concurrency | " + " | ".join(names) + " | client p50 |",
        "|---:|" + "---:|" * len(names) + "---:|",
    ]
    for row in stages["rows"]:
        cells = " | ".join(_cell(row["stages"].get(name)) for name in names)
        lines.append(f"| {row['concurrency']} | {cells} | {_cell(row['client_p50_ms'])} |")
    return lines


def _memory(memory: dict[str, Any] | None) -> list[str]:
    if not memory:
        return []
    lines = [
        "",
        "## Memory of the whole stack",
        "",
        (
            f"{memory['measured']}: every process below rankgate's `serve run` (Ray's GCS, "
            "raylet, dashboard and agents, replicas, HAProxy), the Redis-compatible server, "
            "and the `rankgate serve` process itself where measured. PSS (from "
            "/proc/PID/smaps_rollup) shares each shared page among the processes using it, so "
            "it adds up fairly (and is what a container's memory limit sees); RSS counts "
            "shared pages once per process. The target is judged on PSS."
        ),
        "",
        "| process | pid | RSS MiB | PSS MiB |",
        "|---|---:|---:|---:|",
    ]
    for p in memory["processes"]:
        lines.append(f"| {p['name']} | {p['pid']} | {p['rss_mib']} | {_cell(p['pss_mib'])} |")
    lines.append(
        f"| **total** ({memory['count']} processes) | | **{memory['rss_total_mib']}** "
        f"| **{memory['pss_total_mib']}** |"
    )
    return lines


def _ready(ready: dict[str, Any] | None) -> list[str]:
    if not ready:
        return []
    lines = [
        "",
        "## Ready time",
        "",
        (
            f"`rankgate serve --port P` on the bench's (set-up) home, from start until it "
            f"answers a rank request with 200: {', '.join(f'{s:g} s' for s in ready['starts_s'])}"
            f" (median {ready['median_s']} s); each start stopped with SIGINT to its process "
            "group. Seconds from start until its output showed each phase:"
        ),
    ]
    phases = ready.get("phases") or []
    names = list(dict.fromkeys(name for seen in phases for name in seen))
    if phases:
        lines += [
            "",
            "| start | " + " | ".join(names) + " | answers 200 |",
            "|---:|" + "---:|" * (len(names) + 1),
        ]
        for n, (seen, total) in enumerate(zip(phases, ready["starts_s"], strict=True)):
            cells = " | ".join(_cell(seen.get(name)) for name in names)
            lines.append(f"| {n + 1} | {cells} | {total:g} |")
    return lines
