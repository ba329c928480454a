"""Running and measuring the server: `serve`, `bench` and `loadtest`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loadtests.loadtest import render_summary, run_loadtest
from rankgate.cli.options import demo_consent_option, file_option, folder_option
from rankgate.cli.render import echo_lines, fails_cleanly, say
from rankgate.ops.bench import BenchOptions, benchmark, check_regressions
from rankgate.ops.serve import serve as serve_project
from serving.ops.supervisor import log_record


@click.command()
@file_option(
    "--config",
    "config_path",
    exists=True,
    help="Ray Serve config (default: serve_config.yaml of the project).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="HTTP port (default: from the config).",
)
@click.option(
    "--host",
    default=None,
    envvar="RANKGATE_SERVE_HOST",
    help="Address to listen on, e.g. 0.0.0.0 in a container (default: from the config, "
    "127.0.0.1). Env: RANKGATE_SERVE_HOST.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="RANKGATE_LOG_FORMAT",
    help="json: Ray Serve's logs (files and console) and this command's output as one "
    "JSON object a line. Env: RANKGATE_LOG_FORMAT.",
)
@demo_consent_option
@fails_cleanly
def serve(
    config_path: Path | None,
    port: int | None,
    host: str | None,
    log_format: str,
    demo_consent: bool,
) -> None:
    """Set up if needed, then serve POST /v1/rank on Ray Serve (blocks; Ctrl-C or
    SIGTERM stops)."""

    def say_as_configured(message: str) -> None:
        click.echo(log_record(message, "rankgate") if log_format == "json" else message)

    serve_project(config_path, port, host, log_format, say_as_configured, demo_consent)


@click.command()
@click.option(
    "--concurrency",
    default=None,
    help="Comma-separated levels (default 1,4,8,16,32; with --overload 8,32,64,128,256; "
    "with --explain-sampling 1,8,32).",
)
@click.option(
    "--duration",
    default=None,
    type=click.FloatRange(min=1),
    help="Seconds per run (default 6; 8 with --overload, --freshness, --explain-sampling).",
)
@click.option(
    "--repeats",
    "--rounds",
    "repeats",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rounds (every level on every system per round; medians are reported).",
)
@click.option(
    "--warmup",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds of warm-up before each measured run.",
)
@click.option(
    "--with",
    "extras",
    default="",
    help="Also measure: naive (a naive Ray Serve graph), no-audit (rankgate without its "
    "audit log), two-replicas (rankgate with two ingress replicas). Comma-separated.",
)
@click.option(
    "--skip",
    default="",
    help="Leave out parts: explain, cpu, open-loop, stages, memory, ranker, ready. "
    "Comma-separated.",
)
@click.option(
    "--driver",
    type=click.Choice(["auto", "wrk", "python"]),
    default="auto",
    show_default=True,
    help="Closed-loop load: wrk where installed (auto installs Debian's wrk when missing "
    "and permitted), else the Python driver.",
)
@click.option(
    "--no-install",
    is_flag=True,
    help="Never install wrk; use the Python driver when it is missing.",
)
@folder_option(
    "--output",
    help="Folder for the results (default: loadtests/results/ of a source checkout, else "
    "results/ in the home).",
)
@file_option(
    "--compare",
    exists=True,
    help="A committed report (e.g. loadtests/results/bench.json), read before the run: fail "
    "when a ratio rankgate / floor of this run (CPU per decision, peak throughput, p50 at "
    "concurrency 1) is worse than the committed one by more than --tolerance.",
)
@click.option(
    "--tolerance",
    default="15",
    show_default=True,
    metavar="PERCENT",
    help="With --compare: how much worse a ratio may be, in percent of the committed one; "
    "one value, or per figure: cpu_per_decision=20,peak_throughput=15,p50_c1=15.",
)
@folder_option(
    "--against-build",
    help="Also measure an earlier build: another checkout of rankgate (e.g. a git "
    "worktree of an earlier commit), started with its own code and launch settings beside "
    "this one and driven in the same rounds; the report says how many times cheaper (CPU "
    "per decision) and faster (peak throughput, p50 at concurrency 1) this build is.",
)
@click.option(
    "--overload",
    is_flag=True,
    help="Instead: find where back-pressure starts (queue limits against none).",
)
@click.option(
    "--freshness",
    is_flag=True,
    help="Instead: event-to-decision latency at 0, 100 and 1,000 events/s.",
)
@click.option(
    "--explain-sampling",
    is_flag=True,
    help="Instead: answers with explainer.sample_rate 0 against 0.01, 0.05 and 0.25, in "
    "interleaved rounds on one server (--repeats rounds).",
)
@click.option(
    "--scale",
    multiple=True,
    is_flag=False,
    flag_value="default",
    metavar="[PEOPLE,ITEMS,IMPRESSIONS]",
    help="Instead: rankgate at a size, from init to served decisions (setup by phase, "
    "Redis and replica memory, start time, rank latency, events, model evaluate), each "
    "in a scratch project and home; repeatable, e.g. --scale 1e5,1e4,1e6 --scale "
    "1e6,1e5,1e7 (alone: those two).",
)
@click.option(
    "--coverage",
    type=click.IntRange(min=100),
    metavar="REPLICATIONS",
    help="Instead: the off-policy intervals' coverage on simulations with known truth "
    "(click rates 0.3-5 %, 10^3-10^5 logged slots, random and softmax logging), "
    "REPLICATIONS per cell (500 for the published table), against the bootstrap.",
)
@click.option(
    "--soak",
    metavar="DURATION",
    help="Instead: the chaos soak, e.g. 1h or 2m: open-loop realistic load (ranks, "
    "explains, events, consent writes, key rotation) at --soak-share of the measured "
    "peak while faults run (Redis killed and slowed, replicas and the consumer killed, "
    "canary and rollback, policy redeploy, HAProxy reload), every record counted; "
    "soak.md and soak.json in the results folder.",
)
@click.option(
    "--soak-share",
    type=click.FloatRange(min=0, max=100, min_open=True),
    default=50.0,
    show_default=True,
    help="With --soak: percent of the measured peak sent.",
)
@click.option(
    "--soak-faults",
    default="",
    metavar="NAMES",
    help="With --soak: comma-separated faults (default: all of redis_kill, canary, "
    "replica_kill, slow_redis, policy_redeploy, consumer_kill, rollback, haproxy_reload; "
    "with --soak-nodes, node_loss instead of haproxy_reload).",
)
@click.option(
    "--soak-nodes",
    type=click.IntRange(min=0, max=8),
    default=0,
    show_default=True,
    metavar="N",
    help="With --soak: the multi-node variant, a Ray cluster on this host of a head "
    "and N worker nodes (one replica each), a worker node removed and a new one "
    "added under load; soak-cluster.md and soak-cluster.json.",
)
@folder_option(
    "--scratch",
    help="With --scale: folder for its projects and homes, one per size (default: "
    "rankgate-bench-scale in the temporary folder); a size's folder is replaced.",
)
@fails_cleanly
def bench(
    concurrency: str | None,
    duration: float | None,
    repeats: int,
    warmup: float,
    extras: str,
    skip: str,
    driver: str,
    no_install: bool,
    output: Path | None,
    compare: Path | None,
    tolerance: str,
    against_build: Path | None,
    overload: bool,
    freshness: bool,
    explain_sampling: bool,
    scale: tuple[str, ...],
    coverage: int | None,
    soak: str | None,
    soak_share: float,
    soak_faults: str,
    soak_nodes: int,
    scratch: Path | None,
) -> None:
    """Benchmark rankgate against the floor (plain FastAPI), in interleaved rounds.

    Reports the targets (CPU per decision, latency, peak throughput, budget fallbacks,
    ranker against raw onnxruntime, explain cost, memory, ready time) and an open-loop
    table; appends the headline ratios to history.jsonl beside the report.
    """
    options = BenchOptions(
        concurrency=concurrency,
        duration=duration,
        repeats=repeats,
        warmup=warmup,
        extras=extras,
        skip=skip,
        driver=driver,
        allow_install=not no_install,
        output=output,
        overload=overload,
        freshness=freshness,
        explain_sampling=explain_sampling,
        scale=scale,
        scratch=scratch,
        coverage=coverage or 0,
        compare=compare,
        tolerance=tolerance,
        against_build=against_build,
        soak=soak,
        soak_share=soak_share,
        soak_faults=soak_faults,
        soak_nodes=soak_nodes,
    )
    report, figures = benchmark(options, say)
    click.echo(report.read_text())
    click.echo(f"written: {report}, {figures}")
    check_regressions(figures)


@click.command()
@click.option("--host", default="http://127.0.0.1:8000", show_default=True, help="Server to load.")
@click.option("--users", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--spawn-rate",
    default=4.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Users started per second.",
)
@click.option("--run-time", default="30s", show_default=True, help="e.g. 30s, 2m, 1h30m.")
@folder_option(
    "--output",
    help="Folder for Locust's CSV, HTML report and log (default: locust/ in the results "
    "folder: loadtests/results/ of a source checkout, else results/ in the home).",
)
@file_option(
    "--slo",
    "slo_path",
    help="SLO file: p99_ms, max_error_rate, max_fallback_rate (default: the slo.yaml shipped "
    "in rankgate's loadtests package).",
)
@click.option(
    "--api-key",
    envvar="RANKGATE_API_KEY",
    default=None,
    help="Key to call the server with (or RANKGATE_API_KEY); default: a temporary key of this home.",
)
@fails_cleanly
def loadtest(
    host: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    output: Path | None,
    slo_path: Path | None,
    api_key: str | None,
) -> None:
    """Load a running server with Locust's realistic mix and check the SLOs (exit 1 if missed)."""
    result = run_loadtest(host, users, spawn_rate, run_time, output, slo_path, say, api_key)
    echo_lines(render_summary(result))
    click.echo(f"written: {result.files['stats']}, {result.files['html']}")
    if not result.ok:
        click.echo(f"SLO missed: {', '.join(result.missed)}", err=True)
        sys.exit(1)
