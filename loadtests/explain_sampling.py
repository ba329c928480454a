"""`rankgate bench --explain-sampling`: what explaining a sample of traffic costs the answers.

One rankgate server (`serve run`, the fast path of `rankgate serve`), the requests
of `rankgate bench` (whole catalogue, explain off). Rounds interleave the sample
rates on that one server: before each rate, `serve deploy` applies its
`explainer.sample_rate` in place (the ingress reconfigures, no restart), then the
load process (loadtests.drive) runs each concurrency. Odd rounds take the rates
in reverse order, so a drift of the machine during the run does not favour one
rate. Per rate and concurrency: the medians over rounds of req/s, p50 and p99,
their spread (lowest-highest round), the ratio to rate 0, and what the sample
did meanwhile (explanations computed, skipped, their compute time, from the
server's metrics on Ray's metrics agents). Written to `<output>/explain_sampling.json` and `.md`.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench.systems import drive, process_env, wait_ready, workload
from loadtests.drive import stamped, write_results
from loadtests.ray_metrics import ray_session_dir, scrape, total
from serving.ops.launch import (
    SERVE_CONFIG,
    derived_config,
    free_port,
    ingress_deployment,
    ray_client_env,
    serve_deploy_command,
    serve_env,
    serve_run_command,
    start_server,
    stop_server,
)
from serving.ops.supervisor import dashboard_address

RATES = (0.0, 0.01, 0.05, 0.25)
"""0, the configured default (serve_config.yaml), and larger shares."""
FIGURES = ("scored", "explained", "skipped", "seconds")
Say = Callable[[str], None]
COMMAND = "rankgate bench --explain-sampling"
REPORT_INTERVAL_MS = 1000
"""How often Ray's metrics agents get the replicas' records (Ray's shortest; 10 s by default)."""
METRICS_SETTLE_S = 2.5 * REPORT_INTERVAL_MS / 1000


def ingress_config(rate: float) -> dict[str, Any]:
    """serve_config.yaml's RankIngress user_config with `explainer.sample_rate` = rate."""
    config: dict[str, Any] = ingress_deployment(SERVE_CONFIG)["user_config"]
    config["explainer"] = {**config.get("explainer", {}), "sample_rate": rate}
    return config


def sampled_figures(home: Path) -> dict[str, float]:
    """The server's counters now, over its replicas: decisions the model ranked, and
    of the sample: explained, skipped, compute seconds. Read after METRICS_SETTLE_S, so
    that what the replicas recorded has reached Ray's metrics agents."""
    time.sleep(METRICS_SETTLE_S)
    samples = scrape(ray_session_dir(home))
    explained = total(samples, "rankgate_explanations_total", kind="sampled", status="explained")
    return {
        "scored": total(samples, "rankgate_scored_decisions_total"),
        "explained": explained,
        "skipped": total(samples, "rankgate_explanations_total", kind="sampled") - explained,
        "seconds": total(samples, "rankgate_sampled_explanation_seconds_sum"),
    }


class Server:
    """The one server of the run, and how to change its sample rate in place."""

    def __init__(self, env: Any, port: int, log: Path, say: Say) -> None:
        self.env, self.port, self.log, self.say = env, port, log, say
        self.base = f"http://127.0.0.1:{port}"

    def config(self, rate: float) -> Path:
        return derived_config(
            self.env.home, port=self.port, user_config=ingress_config(rate), name="bench-explain"
        )

    def apply(self, rate: float) -> None:
        """`serve deploy` the rate and wait until the replica runs with it."""
        dashboard = dashboard_address(self.log.read_text(errors="replace"))
        assert dashboard is not None, f"no Ray dashboard address in {self.log}"
        env = ray_client_env(serve_env(self.env.home, self.env.redis_url or ""))
        subprocess.run(
            serve_deploy_command(self.config(rate), dashboard),
            env=env,
            capture_output=True,
            check=True,
            timeout=120,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{self.base}/healthz", timeout=2).json()
                if health["sampled_explanations"]["sample_rate"] == rate:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not apply sample_rate {rate} within 60 s")


def run_explain_sampling(
    levels: list[int], duration: float, repeats: int, output: Path, say: Say
) -> dict[str, Any]:
    runs: dict[float, dict[int, list[dict[str, Any]]]] = {r: {c: [] for c in levels} for r in RATES}
    sample = {r: dict.fromkeys(FIGURES, 0.0) for r in RATES}
    with workload(levels, duration, repeats, say) as work:
        port = free_port()
        log = work.env.home.root / "bench" / "explain_sampling.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        server = Server(work.env, port, log, say)
        url = f"{server.base}/v1/rank"
        say(f"• rankgate on port {port}; sample rates {', '.join(f'{r:g}' for r in RATES)}")
        env = process_env(work.env, True)
        env["RAY_metrics_report_interval_ms"] = str(REPORT_INTERVAL_MS)
        process = start_server(serve_run_command(server.config(RATES[0])), env, log)
        try:
            wait_ready(url, work.bodies[0], process, log, work.api_key)
            for round_number in range(repeats):
                order = RATES if round_number % 2 == 0 else tuple(reversed(RATES))
                for rate in order:
                    server.apply(rate)
                    before = sampled_figures(work.env.home.root)
                    for level in levels:
                        result = drive(url, level, duration, work.bodies_file, work.api_key)
                        runs[rate][level].append(result)
                        say(
                            f"    round {round_number + 1} rate {rate:<4g} c={level:<3} "
                            f"{result['throughput_rps']:8.1f} req/s  p50 {result['p50_ms']:6.2f} ms"
                            f"  p99 {result['p99_ms']:6.2f} ms  errors {result['errors']}"
                        )
                    after = sampled_figures(work.env.home.root)
                    for key in FIGURES:
                        sample[rate][key] += after[key] - before[key]
        finally:
            stop_server(process)
    report = stamped(
        command=COMMAND,
        duration_s=duration,
        rounds=repeats,
        rates=list(RATES),
        results=summarize(runs),
        sample={str(rate): figures for rate, figures in sample.items()},
    )
    write_results(output, "explain_sampling", report, render)
    return report


def summarize(runs: dict[float, dict[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per rate and concurrency: medians over rounds, their spread, ratios to rate 0."""
    rows = []
    for rate, by_level in runs.items():
        for level, results in by_level.items():
            row: dict[str, Any] = {"rate": rate, "concurrency": level}
            for figure in ("throughput_rps", "p50_ms", "p99_ms"):
                values = [r[figure] for r in results]
                baseline = statistics.median(r[figure] for r in runs[RATES[0]][level])
                row[figure] = round(statistics.median(values), 2)
                row[f"{figure}_spread"] = [min(values), max(values)]
                row[f"{figure}_ratio"] = round(row[figure] / baseline, 3) if baseline else None
            row["errors"] = sum(r["errors"] for r in results)
            rows.append(row)
    return rows


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Explanations on a sample of traffic: cost to the answers",
        "",
        (
            f"Measured {report['measured_at']} on {report['cores']} cores: `{report['command']}` "
            f"({report['rounds']} interleaved rounds on one server, {report['duration_s']:g} s per "
            "concurrency after 2 s of warm-up; `serve deploy` changes `explainer.sample_rate` in "
            "place between rates). Requests as in `rankgate bench`: whole catalogue, k=10, explain "
            "off. Figures are medians over rounds, [lowest, highest] round, and the ratio to "
            "sample_rate 0."
        ),
        "",
        "| sample_rate | concurrency | req/s | ×rate 0 | p50 ms | ×rate 0 | p99 ms | ×rate 0 | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:

        def cell(figure: str, row: dict[str, Any] = row) -> str:
            low, high = row[f"{figure}_spread"]
            return f"{row[figure]} [{low}, {high}] | {row[f'{figure}_ratio']}"

        lines.append(
            f"| {row['rate']:g} | {row['concurrency']} | {cell('throughput_rps')} | "
            f"{cell('p50_ms')} | {cell('p99_ms')} | {row['errors']} |"
        )
    lines += [
        "",
        (
            "What the sample did during each rate's runs, warm-ups included (from the "
            "server's metrics): decisions the model ranked, explanations computed after the "
            "answer, samples skipped, and the mean compute time of one (10 rows)."
        ),
        "",
        "| sample_rate | model-ranked decisions | explained | explained / ranked | skipped | mean compute ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for rate, figures in report["sample"].items():
        scored, explained = figures["scored"], figures["explained"]
        share = f"{explained / scored:.4f}" if scored else ""
        mean_ms = f"{figures['seconds'] / explained * 1000:.2f}" if explained else ""
        lines.append(
            f"| {float(rate):g} | {scored:.0f} | {explained:.0f} | {share} | "
            f"{figures['skipped']:.0f} | {mean_ms} |"
        )
    return "\n".join(lines) + "\n"
