"""`rankgate bench --overload`: where back-pressure starts, and what it buys.

The same server twice, in the same run:

- **limited**: serve_config.yaml as shipped. A replica works on at most
  `max_ongoing_requests` at a time and lets `max_queued_requests` more wait;
  anything beyond is answered at once with `503` and `Retry-After`.
- **unlimited**: the same with no queue limit (`max_queued_requests: -1`), which
  is what overload looks like without back-pressure: every request waits.

Each is driven closed-loop at rising concurrency (loadtests.drive) by clients
that wait as long as a refusal's Retry-After says before trying again. The report
gives, per level, answered requests per second, the share refused, and latency
of answers and of refusals, to `<output>/overload.json` and `overload.md`.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.bench.systems import Workload, drive, started, workload
from rankgate.ops.environment import Environment
from serving.ops.launch import (
    derived_config,
    free_port,
    ingress_deployment,
    serve_run_command,
)
from serving.ops.serve_config import ServeConfig

Say = Callable[[str], None]
LEVELS = [8, 16, 32, 64, 128, 256]
HONOUR = ("--honor-retry-after",)


def config_for(env: Environment, port: int, name: str, limited: bool) -> Path:
    path = derived_config(env.home, port=port, name=f"overload-{name}")
    config = ServeConfig.read(path)
    if not limited:
        config.ingress["max_queued_requests"] = -1
        config.ingress.pop("backpressure_config", None)
    config.write()
    return path


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    by_status = run["latency_by_status"]
    ok = by_status.get("200", {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan")})
    refused = by_status.get("503", {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan")})
    total = max(1, run["requests"])
    return {
        "concurrency": run["concurrency"],
        "answered_rps": round(ok["count"] / run["duration_s"], 1),
        "refused_share": round(refused["count"] / total, 4),
        "answer_p50_ms": ok["p50_ms"],
        "answer_p99_ms": ok["p99_ms"],
        "refusal_p99_ms": refused["p99_ms"],
        "refusals_with_retry_after": run["outcomes"].get("http_503_retry_after", 0),
        "other_errors": run["requests"] - ok["count"] - refused["count"],
        "degraded": sum(v for k, v in run["outcomes"].items() if k.startswith("fallback:")),
    }


def run_variant(work: Workload, name: str, limited: bool) -> list[dict[str, Any]]:
    port = free_port()
    command = serve_run_command(config_for(work.env, port, name, limited))
    with started(work, f"overload-{name}", name, command, port, True) as url:
        rows = []
        for level in work.levels:
            runs = [
                drive(url, level, work.duration, work.bodies_file, work.api_key, HONOUR)
                for _ in range(work.repeats)
            ]
            # The run of median throughput stands for the level.
            row = summarize(sorted(runs, key=lambda r: r["throughput_rps"])[len(runs) // 2])
            work.say(
                f"    c={level:<4} answered {row['answered_rps']:7.1f}/s  refused "
                f"{row['refused_share']:6.1%}  answer p99 {row['answer_p99_ms']:8.1f} ms  "
                f"refusal p99 {row['refusal_p99_ms']:6.1f} ms"
            )
            rows.append(row)
        return rows


def capacity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest level without refusals, and the first level with them."""
    clean = [r["concurrency"] for r in rows if r["refused_share"] == 0]
    refusing = [r["concurrency"] for r in rows if r["refused_share"] > 0]
    return {
        "max_concurrency_without_refusals": max(clean) if clean else None,
        "refusals_start_at_concurrency": min(refusing) if refusing else None,
        "peak_answered_rps": max(r["answered_rps"] for r in rows),
    }


def render_markdown(report: dict[str, Any]) -> str:
    options = report["ingress"]
    lines = [
        "# Overload: back-pressure against no queue limit",
        "",
        (
            f"Measured {report['measured_at']} on {report['machine']['cores']} cores; "
            f"{report['duration_s']:g} s per level, median of {report['repeats']}."
        ),
        (
            f"RankIngress: max_ongoing_requests {options.get('max_ongoing_requests')}, "
            f"max_queued_requests {options.get('max_queued_requests')}, "
            f"backpressure {options.get('backpressure_config')}."
        ),
        "",
    ]
    for name, rows in report["results"].items():
        cap = report["capacity"][name]
        lines += [
            f"## {name}",
            "",
            (
                f"No refusals up to concurrency {cap['max_concurrency_without_refusals']}; "
                f"refusals start at {cap['refusals_start_at_concurrency']}; "
                f"peak {cap['peak_answered_rps']} answered/s."
            ),
            "",
            "| concurrency | answered/s | refused | answer p50 ms | answer p99 ms | refusal p99 ms | 503s with Retry-After | other errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['concurrency']} | {r['answered_rps']} | {r['refused_share']:.1%} | "
                f"{r['answer_p50_ms']} | {r['answer_p99_ms']} | {r['refusal_p99_ms']} | "
                f"{r['refusals_with_retry_after']} | {r['other_errors']} |"
            )
        lines.append("")
    lines += ["## Ratios (limited / unlimited, same run)", ""]
    lines += ["| concurrency | answer p99 | answered/s |", "|---:|---:|---:|"]
    for limited, unlimited in zip(
        report["results"]["limited"], report["results"]["unlimited"], strict=True
    ):
        p99 = limited["answer_p99_ms"] / unlimited["answer_p99_ms"]
        rps = limited["answered_rps"] / unlimited["answered_rps"]
        lines.append(f"| {limited['concurrency']} | {p99:.2f}× | {rps:.2f}× |")
    return "\n".join(lines) + "\n"


def run_overload(
    levels: list[int], duration: float, repeats: int, output: Path, say: Say
) -> dict[str, Any]:
    with workload(levels, duration, repeats, say) as work:
        results = {
            name: run_variant(work, name, limited)
            for name, limited in (("limited", True), ("unlimited", False))
        }
    options = ingress_deployment()
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "duration_s": duration,
        "repeats": repeats,
        "ingress": {
            k: options.get(k)
            for k in ("max_ongoing_requests", "max_queued_requests", "backpressure_config")
        },
        "results": results,
        "capacity": {name: capacity(rows) for name, rows in results.items()},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "overload.md").write_text(render_markdown(report))
    return report
