"""`rankgate bench`: rankgate against two baselines, in the same run.

Systems, each started fresh on a free loopback port, then driven by a separate
load process (loadtests.drive) at each concurrency for a fixed time:

- rankgate: `serve run` of serve_config.yaml with the fast path of `rankgate serve`.
- naive Ray Serve graph (baseline b): loadtests/baselines/naive_graph.py.
- plain FastAPI (baseline a): loadtests/baselines/plain_fastapi.py.

All three read the same user features from the same Redis through Feast and
score the same candidates (the whole catalogue) with the same ONNX model (the stable version); explain off. The
figures, the machine's core count and the targets' status go to
`<output>/bench.json` and `<output>/bench.md`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.drive import write_results
from rankgate.api_keys import temporary_key
from rankgate.consent import ConsentState
from rankgate.pseudonym import user_key
from rankgate.settings import PROJECT_ROOT
from rankgate.setup import Environment
from serving.launch import (
    SERVE_CONFIG,
    derived_config,
    free_port,
    serve_binary,
    serve_env,
    serve_run_command,
    start_server,
    stop_server,
)

TARGET_PEAK_RATIO = 3.0
TARGET_P99_MS = 50.0
TARGET_P50_RATIO = 0.5

Say = Callable[[str], None]


@dataclass
class System:
    name: str
    label: str
    command: Callable[[Environment, int], list[str]]
    fast_path: bool


def _rankgate_command(env: Environment, port: int) -> list[str]:
    return serve_run_command(derived_config(env.home, port=port, name="bench"))


def _rankgate_no_audit_command(env: Environment, port: int) -> list[str]:
    # The same server with the decision audit log off: the difference is its cost.
    user_config = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"][0][
        "user_config"
    ]
    user_config["audit"] = {**user_config.get("audit", {}), "enabled": False}
    return serve_run_command(
        derived_config(env.home, port=port, user_config=user_config, name="bench-no-audit")
    )


def _naive_command(env: Environment, port: int) -> list[str]:
    # Ray Serve's defaults everywhere except the port.
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "naive",
                "route_prefix": "/",
                "import_path": "loadtests.baselines.naive_graph:app",
            }
        ],
    }
    path = env.home.root / "bench" / "naive_graph.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return [serve_binary(), "run", str(path), "--address", "local"]


def _plain_command(env: Environment, port: int) -> list[str]:
    return [sys.executable, "-m", "loadtests.baselines.plain_fastapi", "--port", str(port)]


SYSTEMS = [
    System(
        "rankgate",
        "rankgate (Ray Serve, HAProxy ingress, in-process stages)",
        _rankgate_command,
        True,
    ),
    System(
        "rankgate_no_audit",
        "rankgate, audit log off (to measure its cost)",
        _rankgate_no_audit_command,
        True,
    ),
    System("naive_graph", "baseline (b): naive Ray Serve graph", _naive_command, False),
    System("plain_fastapi", "baseline (a): plain FastAPI, one process", _plain_command, False),
]


def request_bodies(env: Environment, count: int = 200) -> list[dict[str, Any]]:
    """Personalizable requests (consent granted for the policy's first purpose, in its
    first region), the whole catalogue as candidates."""
    from rankgate.policy import load_policy

    policy = load_policy()
    purpose, region = next(iter(policy.purposes)), next(iter(policy.regions))
    ids = env.project.demo_user_ids()
    states = env.consent.states([user_key(u) for u in ids], purpose)
    granted = [u for u, s in zip(ids, states, strict=True) if s == ConsentState.GRANTED][:count]
    return [{"user_id": u, "purpose": purpose, "region": region, "k": 10} for u in granted]


def process_env(env: Environment, fast_path: bool) -> dict[str, str]:
    assert env.redis_url is not None
    if fast_path:
        return serve_env(env.home, env.redis_url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    base.update(
        RANKGATE_HOME=str(env.home.root),
        REDIS_URL=env.redis_url,
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    )
    return base


def wait_ready(
    url: str,
    body: dict[str, Any],
    process: subprocess.Popen[bytes],
    log: Path,
    api_key: str,
    timeout_s: float = 240,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); see {log}")
        try:
            response = httpx.post(
                url, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=5
            )
            if response.status_code == 200 and response.json().get("items"):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready in {timeout_s:.0f}s; see {log}")


def drive(
    url: str,
    concurrency: int,
    duration: float,
    bodies_file: Path,
    api_key: str,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.drive",
            url,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--bodies",
            str(bodies_file),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration * 4 + 60,
        cwd=PROJECT_ROOT,
        env={**os.environ, "RANKGATE_API_KEY": api_key},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over repeated runs; outcomes and stages of the median-throughput run."""
    by_throughput = sorted(runs, key=lambda r: r["throughput_rps"])
    middle = by_throughput[len(by_throughput) // 2]
    return {
        "concurrency": runs[0]["concurrency"],
        "runs": len(runs),
        "throughput_rps": round(statistics.median(r["throughput_rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 2),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 2),
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "outcomes": middle["outcomes"],
        "server_stage_median_ms": middle["server_stage_median_ms"],
    }


@dataclass
class Workload:
    """What every measured server gets: the same requests, levels and run lengths."""

    env: Environment
    levels: list[int]
    duration: float
    repeats: int
    bodies: list[dict[str, Any]]
    bodies_file: Path
    api_key: str
    say: Say


@contextlib.contextmanager
def workload(levels: list[int], duration: float, repeats: int, say: Say) -> Iterator[Workload]:
    """Request bodies in a file for the load processes, and a temporary API key."""
    env = Environment.open()
    bodies = request_bodies(env)
    with tempfile.TemporaryDirectory() as folder, temporary_key("bench") as api_key:
        bodies_file = Path(folder) / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        yield Workload(env, levels, duration, repeats, bodies, bodies_file, api_key, say)


@contextlib.contextmanager
def started(
    work: Workload, name: str, label: str, command: list[str], port: int, fast_path: bool
) -> Iterator[str]:
    """A fresh server from `command` on `port`, answering; yields its /v1/rank URL."""
    url = f"http://127.0.0.1:{port}/v1/rank"
    log = work.env.home.root / "bench" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    work.say(f"• {label}: starting on port {port}")
    process = start_server(command, process_env(work.env, fast_path), log)
    try:
        wait_ready(url, work.bodies[0], process, log, work.api_key)
        yield url
    finally:
        stop_server(process)


def run_system(system: System, work: Workload) -> list[dict[str, Any]]:
    port = free_port()
    command = system.command(work.env, port)
    say = work.say
    with started(work, system.name, system.label, command, port, system.fast_path) as url:
        results = []
        for level in work.levels:
            runs = [
                drive(url, level, work.duration, work.bodies_file, work.api_key)
                for _ in range(work.repeats)
            ]
            summary = median_of(runs)
            say(
                f"    c={level:<3} {summary['throughput_rps']:8.1f} req/s  p50 {summary['p50_ms']:7.2f} ms"
                f"  p99 {summary['p99_ms']:7.2f} ms  errors {summary['errors']}"
            )
            results.append(summary)
        return results


def evaluate(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    ours, naive, plain = results["rankgate"], results["naive_graph"], results["plain_fastapi"]
    within = [r for r in ours if r["p99_ms"] <= TARGET_P99_MS and r["errors"] == 0]
    ours_peak = max((r["throughput_rps"] for r in within), default=0.0)
    naive_peak = max(r["throughput_rps"] for r in naive)
    plain_peak = max(r["throughput_rps"] for r in plain)
    c1 = {
        name: next(r for r in rows if r["concurrency"] == 1)["p50_ms"]
        for name, rows in results.items()
    }
    peak_ratio = ours_peak / naive_peak
    p50_ratio = c1["rankgate"] / c1["naive_graph"]
    return {
        "peak_rps_within_p99": {
            "rankgate": ours_peak,
            "naive_graph": naive_peak,
            "plain_fastapi": plain_peak,
        },
        "peak_ratio_vs_naive": round(peak_ratio, 2),
        "peak_target_met": peak_ratio >= TARGET_PEAK_RATIO,
        "p50_c1_ms": c1,
        "p50_c1_ratio_vs_naive": round(p50_ratio, 3),
        "p50_target_met": p50_ratio <= TARGET_P50_RATIO,
        "peak_ratio_vs_plain": round(ours_peak / plain_peak, 2),
        "audit_cost": audit_cost(ours, results["rankgate_no_audit"]),
        "p50_c1_ratio_vs_plain": round(c1["rankgate"] / c1["plain_fastapi"], 2),
    }


def audit_cost(with_audit: list[dict[str, Any]], without: list[dict[str, Any]]) -> dict[str, Any]:
    """What writing the audit log costs, per concurrency: p50 difference and throughput ratio."""
    cost = {}
    for on, off in zip(with_audit, without, strict=True):
        cost[str(on["concurrency"])] = {
            "p50_ms_added": round(on["p50_ms"] - off["p50_ms"], 2),
            "throughput_ratio": round(on["throughput_rps"] / off["throughput_rps"], 3),
        }
    return cost


def audit_line(cost: dict[str, dict[str, float]]) -> str:
    figures = "; ".join(
        f"c={c}: p50 {v['p50_ms_added']:+} ms, throughput ×{v['throughput_ratio']}"
        for c, v in cost.items()
    )
    return f"- Decision audit log: {figures} (rankgate with the log vs the same server without it)."


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# rankgate benchmark",
        "",
        (
            f"Measured {report['measured_at']} on {report['machine']['cores']} cores "
            f"({report['machine']['platform']}), Python {report['machine']['python']}, "
            f"Ray {report['machine']['ray']}, onnxruntime {report['machine']['onnxruntime']}."
        ),
        (
            f"Each figure is the median of {report['repeats']} runs of {report['duration_s']:g} s "
            "(after 2 s of warm-up) from a separate load process on the same machine; "
            "all systems read the same Feast/Redis features and score the same candidates "
            "with the same ONNX model (the stable version), explain off. Command: `rankgate bench`."
        ),
        "",
        "| system | concurrency | req/s | p50 ms | p99 ms | errors | answers |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for system in SYSTEMS:
        for row in report["results"][system.name]:
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(row["outcomes"].items()))
            lines.append(
                f"| {system.label} | {row['concurrency']} | {row['throughput_rps']} | {row['p50_ms']} "
                f"| {row['p99_ms']} | {row['errors']} | {outcomes} |"
            )
    t = report["targets"]
    mark = {True: "met", False: "MISSED"}
    lines += [
        "",
        "## Targets",
        "",
        (
            f"- Peak throughput with p99 ≤ {TARGET_P99_MS:g} ms: rankgate {t['peak_rps_within_p99']['rankgate']} req/s "
            f"vs naive graph {t['peak_rps_within_p99']['naive_graph']} req/s = **{t['peak_ratio_vs_naive']}×** "
            f"(target ≥ {TARGET_PEAK_RATIO:g}×): **{mark[t['peak_target_met']]}**"
        ),
        (
            f"- p50 at concurrency 1: rankgate {t['p50_c1_ms']['rankgate']} ms vs naive graph "
            f"{t['p50_c1_ms']['naive_graph']} ms = **{t['p50_c1_ratio_vs_naive']}×** (target ≤ {TARGET_P50_RATIO:g}×): "
            f"**{mark[t['p50_target_met']]}**"
        ),
        audit_line(t["audit_cost"]),
        (
            f"- Against plain FastAPI (baseline a): peak {t['peak_ratio_vs_plain']}×, "
            f"p50 at concurrency 1 {t['p50_c1_ratio_vs_plain']}×."
        ),
        "",
        "## Where rankgate's time goes",
        "",
        (
            "Server-side stage medians (ms) reported by the answers, per concurrency; the rest of the "
            "client's latency is HTTP, HAProxy and Ray Serve's replica."
        ),
        "",
        "| concurrency | policy | features | rank | total (server) | client p50 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]["rankgate"]:
        stages = row["server_stage_median_ms"]
        lines.append(
            f"| {row['concurrency']} | {stages.get('policy', '')} | {stages.get('features', '')} "
            f"| {stages.get('rank', '')} | {stages.get('total', '')} | {row['p50_ms']} |"
        )
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def run_bench(
    levels: list[int],
    duration: float,
    repeats: int,
    output: Path,
    say: Say,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    with workload(levels, duration, repeats, say) as work:
        results = {s.name: run_system(s, work) for s in SYSTEMS}
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": version("ray"),
            "onnxruntime": version("onnxruntime"),
        },
        "duration_s": duration,
        "repeats": repeats,
        "concurrency": levels,
        "results": results,
        "targets": evaluate(results),
        "notes": notes or [],
    }
    write_results(output, "bench", report, render_markdown)
    return report
