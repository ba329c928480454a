"""The `rankgate` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from rankgate.core.errors import RankgateError

F = TypeVar("F", bound=Callable[..., Any])


def fails_cleanly(func: F) -> F:
    """Domain errors end the command with their message and exit code 1, no traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RankgateError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="rankgate")
@click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The rankgate project (a folder with rankgate.yaml); default: RANKGATE_PROJECT, "
    "else the current folder if it holds a rankgate.yaml, else (in a source checkout) the "
    "Open Bandit example.",
)
def main(project: Path | None) -> None:
    """rankgate: ranked, policy-compliant answers for one person and one purpose.

    State lives in RANKGATE_HOME (default: .rankgate/ in the project). Redis is
    REDIS_URL, or an embedded server the project starts itself. What is served is
    a project: `rankgate init DIR` starts one, `--project DIR` selects it.
    """
    if project is not None:
        import os

        from rankgate.core.settings import get_settings

        # Every command, and the server processes `serve` starts, read it from here.
        os.environ["RANKGATE_PROJECT"] = str(project.expanduser().resolve())
        get_settings.cache_clear()


# -- setup -------------------------------------------------------------------


@main.command()
@click.option(
    "--force",
    is_flag=True,
    help="Redo every step, and retrain the project's setup models, even if nothing changed.",
)
@fails_cleanly
def setup(force: bool) -> None:
    """Prepare everything the server needs from the project's sources; safe to run again
    (redoes what changed since the last run, and says what)."""
    from rankgate.ops.setup import run_setup

    run_setup(click.echo, force=force)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Project name (default: the folder's name).")
@fails_cleanly
def init(folder: Path, name: str | None) -> None:
    """Write a new project skeleton into FOLDER: rankgate.yaml, a Feast repository,
    policies and a model declaration, each commented with what to fill in."""
    from rankgate.ops.scaffold import write_skeleton

    for line in write_skeleton(folder, name):
        click.echo(line)


@main.group()
def project() -> None:
    """The rankgate project served: check it, or point Feast's own CLI at it."""


@project.command("check")
@click.argument(
    "folder", required=False, type=click.Path(file_okay=False, path_type=Path), default=None
)
@fails_cleanly
def project_check(folder: Path | None) -> None:
    """Validate a project (default: the selected one) without starting anything:
    rankgate.yaml, its Feast definitions, catalogue, policies and model declarations."""
    from rankgate.ops.project_check import check_project

    for line in check_project(folder):
        click.echo(line)


@project.command("env")
@fails_cleanly
def project_env() -> None:
    """Print the exports Feast's own CLI needs in the project's repository:
    `eval "$(rankgate project env)"`, then `feast apply` there works."""
    from rankgate.core.home import Home
    from rankgate.core.redis_server import connect, feast_connection_string, resolve_redis_url
    from rankgate.core.settings import get_project

    url = resolve_redis_url()
    connect(url)
    click.echo(f"export RANKGATE_FEAST_REDIS='{feast_connection_string(url)}'")
    click.echo(f"export RANKGATE_DATA_DIR='{Home.from_settings().data_dir}'")
    click.echo(f"# cd {get_project().feast_repo} && feast apply")


@main.command()
@click.option(
    "--consent",
    type=click.Choice(["granted", "denied", "unknown"]),
    help="Only users in this consent state.",
)
@click.option(
    "--purpose",
    default="onsite_personalization",
    show_default=True,
    help="Purpose the consent filter reads.",
)
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(min=1), help="How many to list."
)
@fails_cleanly
def users(consent: str | None, purpose: str, limit: int) -> None:
    """List the project's demo user ids and their consent state, to know whom to ask about."""
    from rankgate.ops.setup import list_users

    for line in list_users(purpose, consent, limit):
        click.echo(line)


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
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
@fails_cleanly
def serve(config_path: Path | None, port: int | None, host: str | None, log_format: str) -> None:
    """Set up if needed, then serve POST /v1/rank on Ray Serve (blocks; Ctrl-C or
    SIGTERM stops)."""
    import os

    from rankgate.ops.setup import Environment, run_setup
    from serving.ops.launch import (
        derived_config,
        exec_serve,
        project_serve_config,
        serve_env,
        server_host,
        stop_on_signals,
    )
    from serving.ops.supervisor import log_record

    def say(message: str) -> None:
        click.echo(log_record(message, "rankgate") if log_format == "json" else message)

    stop_on_signals()
    run_setup(say)
    env = Environment.open()
    assert env.redis_url is not None
    remote = bool(os.environ.get("RAY_ADDRESS"))
    base = (config_path or project_serve_config(env.project)).resolve()
    if remote and env.settings.store:
        # A cluster: replicas read the artifact store and the config, never this machine.
        import yaml

        from model_store.artifacts import ArtifactStore
        from serving.ops.cluster import cluster_config, publish

        publish(env.home, env.project, env.views(), ArtifactStore(env.settings.store))
        document = cluster_config(
            env.project,
            env.settings.store,
            base,
            host=host
            or yaml.safe_load(base.read_text()).get("http_options", {}).get("host", "0.0.0.0"),
            port=port,
            env_vars={"REDIS_URL": env.redis_url},
        )
        config = env.home.root / "ray" / "serve_config.cluster.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(document, sort_keys=False))
    else:
        if remote:
            say(
                "RANKGATE_STORE is not set: the replicas read the home and the project from "
                "their node's filesystem, so every node must see them (README, "
                '"Running on a cluster")'
            )
        config = derived_config(
            env.home,
            base=base,
            port=port,
            runtime_env={
                "RANKGATE_HOME": str(env.home.root),
                "RANKGATE_PROJECT": str(env.project.root),
                "REDIS_URL": env.redis_url,
            }
            if remote
            else None,
            host=host,
            log_format=log_format,
        )
    say(f"serving {config} (Ctrl-C stops)")
    server = serve_env(env.home, env.redis_url, config=base, project=env.project)
    if log_format == "json":  # Ray's own loggers in `serve run` and its workers
        server.setdefault("RAY_LOGGING_CONFIG_ENCODING", "JSON")
    # This process becomes a small supervisor of `serve run` (same process id): what
    # setup imported (Feast, pandas, the trainers) is not kept while the server runs.
    exec_serve(env.home, base, config, server, host=server_host(config), log_format=log_format)


@main.command()
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
    "audit log). Comma-separated.",
)
@click.option(
    "--skip",
    default="",
    help="Leave out parts: explain, open-loop, stages, memory, ranker, ready. Comma-separated.",
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
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the results (default: loadtests/results/ of a source checkout, else "
    "results/ in the home).",
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
    overload: bool,
    freshness: bool,
    explain_sampling: bool,
) -> None:
    """Benchmark rankgate against the floor (plain FastAPI), in interleaved rounds.

    Reports the issue's targets (latency, peak throughput, budget fallbacks, ranker
    against raw onnxruntime, explain cost, memory, ready time) and an open-loop table.
    """
    from loadtests import results_folder
    from loadtests.bench import DEFAULT_DURATION_S, DEFAULT_LEVELS, EXTRAS, PARTS, run_bench
    from loadtests.overload import LEVELS, run_overload
    from rankgate.ops.setup import run_setup

    default = LEVELS if overload else [1, 8, 32] if explain_sampling else DEFAULT_LEVELS
    text = concurrency or ",".join(map(str, default))
    try:
        levels = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError as exc:
        raise RankgateError(f"--concurrency: {text!r} is not a list of integers") from exc
    if not levels or min(levels) < 1 or (1 not in levels and not overload):
        raise RankgateError("--concurrency: positive integers, including 1")
    chosen_extras = tuple(e.strip() for e in extras.split(",") if e.strip())
    chosen_skip = tuple(p.strip() for p in skip.split(",") if p.strip())
    if unknown := [e for e in chosen_extras if e not in EXTRAS]:
        raise RankgateError(f"--with: unknown {', '.join(unknown)} (known: {', '.join(EXTRAS)})")
    if unknown := [p for p in chosen_skip if p not in PARTS]:
        raise RankgateError(f"--skip: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    run_setup(lambda _line: None)
    output = output or results_folder()
    if freshness:
        from loadtests.freshness import RATES, run_freshness

        run_freshness(list(RATES), duration or 8.0, repeats, output, click.echo)
        click.echo((output / "freshness.md").read_text())
        click.echo(f"written: {output / 'freshness.md'}, {output / 'freshness.json'}")
        return
    if explain_sampling:
        from loadtests.explain_sampling import run_explain_sampling

        run_explain_sampling(levels, duration or 8.0, repeats, output, click.echo)
        click.echo((output / "explain_sampling.md").read_text())
        click.echo(f"written: {output / 'explain_sampling.md'}, {output / 'explain_sampling.json'}")
        return
    if overload:
        run_overload(levels, duration or 8.0, repeats, output, click.echo)
        click.echo((output / "overload.md").read_text())
        click.echo(f"written: {output / 'overload.md'}, {output / 'overload.json'}")
        return
    run_bench(
        levels,
        duration or DEFAULT_DURATION_S,
        repeats,
        output,
        click.echo,
        warmup=warmup,
        extras=chosen_extras,
        skip=chosen_skip,
        driver=driver,
        allow_install=not no_install,
    )
    click.echo((output / "bench.md").read_text())
    click.echo(f"written: {output / 'bench.md'}, {output / 'bench.json'}")


@main.command()
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
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for Locust's CSV, HTML report and log (default: locust/ in the results "
    "folder: loadtests/results/ of a source checkout, else results/ in the home).",
)
@click.option(
    "--slo",
    "slo_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
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
    from loadtests.loadtest import render_summary, run_loadtest

    result = run_loadtest(host, users, spawn_rate, run_time, output, slo_path, click.echo, api_key)
    for line in render_summary(result):
        click.echo(line)
    click.echo(f"written: {result.files['stats']}, {result.files['html']}")
    if not result.ok:
        click.echo(f"SLO missed: {', '.join(result.missed)}", err=True)
        sys.exit(1)


# -- features ----------------------------------------------------------------


@main.group()
def features() -> None:
    """The project's Feast repository (applied to this home) and its Redis online store."""


@features.command("apply")
@fails_cleanly
def features_apply() -> None:
    """Register entities and feature views in the home's Feast registry."""
    from rankgate.ops.setup import Environment

    env = Environment.open()
    views = env.apply_features()
    click.echo(f"applied {len(views)} feature views: {', '.join(views)}")


@features.command("materialize")
@fails_cleanly
def features_materialize() -> None:
    """Load the latest feature values into the Redis online store (every view but the
    streaming ones, which the event stream keeps fresh)."""
    from rankgate.ops.setup import Environment

    env = Environment.open()
    names = env.materialize()
    click.echo(f"materialized {len(names)} feature views into the online store: {', '.join(names)}")
    if env.project.streaming:
        click.echo(f"not materialized (streaming): {', '.join(env.project.streaming)}")


# -- model -------------------------------------------------------------------


@main.group()
def model() -> None:
    """Versioned ranker models."""


FEATURES_OPTION = click.option(
    "--features",
    "features_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="FEATURES.yaml: the model's inputs in ONNX column order (Feast references "
    "view:field, context features).",
)


@model.command("train")
@click.option("--version", "version", required=True, help="New version name, e.g. v3.")
@click.option(
    "--trainer",
    type=click.Choice(["lightgbm", "logistic_regression"]),
    default="lightgbm",
    show_default=True,
    help="LightGBM trees, or scikit-learn's LogisticRegression on standardized inputs.",
)
@click.option("--params", default=None, help="The trainer's settings: key=value,key=value.")
@FEATURES_OPTION
@fails_cleanly
def model_train(version: str, trainer: str, params: str | None, features_path: Path | None) -> None:
    """Train a model on the project's interaction log (LightGBM, or a logistic
    regression), convert it to ONNX and register it (the same checks as `model
    register`). Default inputs: those of the project's last setup model."""
    from features.spec import load_features_file
    from model_store.train import parse_params, train
    from rankgate.ops.setup import Environment

    env = Environment.open(redis=False)
    if features_path is None:
        if not env.project.spec.setup_models:
            raise RankgateError("--features: required (the project declares no setup models)", 422)
        features_path = env.project.path(env.project.spec.setup_models[-1].features)
    manifest = train(
        env.models,
        env.project,
        env.views(),
        env.view_infos(),
        env.data_dir,
        version,
        parse_params(params, trainer),  # type: ignore[arg-type]
        load_features_file(features_path),
        str(features_path),
        click.echo,
    )
    assert manifest.metrics is not None
    auc = "n/a" if manifest.metrics.auc is None else f"{manifest.metrics.auc:.3f}"
    click.echo(
        f"{version}: held-out AUC {auc}, log loss {manifest.metrics.log_loss:.4f}, "
        f"ONNX parity {manifest.onnx.parity_max_abs_diff or 0:.1e}"
    )


@model.command("register")
@click.argument("version")
@click.option(
    "--onnx",
    "onnx_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The ONNX model: one float input (rows, inputs), a probability or score output.",
)
@click.option(
    "--features",
    "features_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="FEATURES.yaml: its inputs in ONNX column order.",
)
@click.option(
    "--booster",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The native tree model it was converted from (LightGBM .txt, XGBoost .json, "
    "scikit-learn .joblib): checked for parity, explained with SHAP.",
)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON or YAML with its held-out `auc` and `log_loss`, kept in the manifest.",
)
@fails_cleanly
def model_register(
    version: str,
    onnx_path: Path,
    features_path: Path,
    booster: Path | None,
    metrics_path: Path | None,
) -> None:
    """Register a ranker trained anywhere as VERSION, after checking it against the
    project's Feast registry; registered versions are never overwritten."""
    from features.spec import load_features_file
    from model_store.manifest import REFERENCE_FILE, Metrics
    from model_store.register import Candidate, register
    from model_store.train import log_rows
    from rankgate.core.config_files import load_yaml_model
    from rankgate.ops.setup import Environment

    env = Environment.open(redis=False)
    infos = env.view_infos()
    if not infos:
        raise RankgateError("no Feast registry in this home: run `rankgate setup` first", 409)
    manifest = register(
        env.models,
        env.project,
        infos,
        Candidate(
            version=version,
            onnx_path=onnx_path,
            features=load_features_file(features_path),
            booster=booster,
            metrics=load_yaml_model(metrics_path, Metrics) if metrics_path else None,
            features_source=str(features_path.resolve()),
            reference_rows=lambda specs: log_rows(env.project, env.views(), env.data_dir, specs),
        ),
    )
    if env.settings.store is not None:
        from model_store.artifacts import ArtifactStore

        ArtifactStore(env.settings.store).publish_version(env.models, version)
        click.echo(f"{version}: published to {env.settings.store}")
    parity = manifest.onnx.parity_max_abs_diff
    reference = (
        "drift reference from the interaction log"
        if REFERENCE_FILE in manifest.artifacts
        else "no drift reference: the project has no interaction log"
    )
    click.echo(
        f"{version}: registered at {env.models.path(version)} ({len(manifest.features)} inputs; "
        + (
            f"native parity {parity:.1e}, explained by SHAP"
            if parity is not None
            else "no tree model: answers say explainer_unavailable"
        )
        + f"; {reference})"
    )


@model.command("reference")
@click.argument("version")
@fails_cleanly
def model_reference(version: str) -> None:
    """Give VERSION, registered before drift references existed, its drift reference:
    the project's interaction log built with its inputs, its scores and (with a native
    model) mean |SHAP| per feature group; added to its manifest with its hash."""
    from model_store.register import add_reference
    from model_store.train import log_rows
    from rankgate.ops.setup import Environment

    env = Environment.open(redis=False)
    specs = env.models.manifest(version).specs
    rows = log_rows(env.project, env.views(), env.data_dir, specs)
    if rows is None:
        raise RankgateError(
            f"{env.project.file}: no interaction log with a user column: there is nothing "
            "to build a drift reference from",
            422,
        )
    path = add_reference(env.models, version, rows)
    click.echo(f"{version}: drift reference of {len(rows.matrix)} logged rows at {path}")


@model.command("validate")
@click.argument("version")
@fails_cleanly
def model_validate(version: str) -> None:
    """Recheck hashes, ONNX/native parity and features of a version."""
    from rankgate.ops.setup import Environment

    env = Environment.open()
    report = env.models.validate(version, env.view_infos())
    for name, passed, detail in report.checks:
        click.echo(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
    if not report.ok:
        raise RankgateError(
            f"model version {version!r} is invalid: " + "; ".join(report.failures())
        )
    click.echo(f"{version}: valid")


@model.command("list")
@fails_cleanly
def model_list() -> None:
    """Show the registered versions and their state."""
    from rankgate.ops.setup import Environment

    env = Environment.open(redis=False)
    rows = env.model_rows()
    if not rows:
        click.echo("no model versions registered (run `rankgate setup`)")
        return
    header = ("VERSION", "STATE", "FEATURES", "AUC", "CREATED")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )


def _promotion_context(config_path: Path | None):  # type: ignore[no-untyped-def]
    from rankgate.ops.setup import Environment
    from serving.ops.promotion import default_config

    env = Environment.open()
    return env, (config_path or default_config(env.home))


def _apply(env, config_path: Path, expect) -> None:  # type: ignore[no-untyped-def]
    from serving.ops.launch import serve_env
    from serving.ops.promotion import apply_running

    assert env.redis_url is not None
    apply_running(env.home, config_path, serve_env(env.home, env.redis_url), expect, click.echo)


CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Serve config to edit (default: the one the running server uses, else the project's "
    "serve_config.yaml).",
)


FORCE_OPTION = click.option(
    "--force",
    is_flag=True,
    help="Apply even if a purpose loses its permitted model (its users get the fallback) or the "
    "version lacks the evidence promotion.require_evaluation asks for; recorded in the audit "
    "of routing changes (rankgate model history).",
)


@model.command("promote")
@click.argument("version")
@click.option(
    "--canary",
    "canary",
    type=click.FloatRange(0, 100, min_open=True, max_open=True),
    default=None,
    help="Send PCT % of users to VERSION.",
)
@click.option("--stable", "stable", is_flag=True, help="Make VERSION the stable version.")
@click.option(
    "--shadow",
    "shadow",
    is_flag=True,
    help="Score a copy of requests with VERSION, off the response path.",
)
@click.option(
    "--alternate",
    "alternate",
    is_flag=True,
    help="Let VERSION serve purposes that may not use the stable version's feature views.",
)
@FORCE_OPTION
@CONFIG_OPTION
@fails_cleanly
def model_promote(
    version: str,
    canary: float | None,
    stable: bool,
    shadow: bool,
    alternate: bool,
    force: bool,
    config_path: Path | None,
) -> None:
    """Change VERSION's role in the routing and apply it to the running server.

    Shows which purposes each version serves before and after, and refuses a change
    that leaves users of a purpose without a permitted model, unless --force; so too,
    with `drift.block_promotion` in the serve config, a version with a drift flag."""
    from serving.contract.config import Role
    from serving.observe.drift_figures import read_drift
    from serving.observe.routing_log import clear_rollback, read_rollbacks
    from serving.ops.promotion import (
        Move,
        RoutingFile,
        record_change,
        reset_canary_outcomes,
        routing_applied,
        starts_experiment,
    )

    roles: dict[Role, bool] = {
        "canary": canary is not None,
        "stable": stable,
        "shadow": shadow,
        "alternate": alternate,
    }
    chosen = [role for role, on in roles.items() if on]
    if len(chosen) != 1:
        raise RankgateError("choose exactly one of --canary PCT, --stable, --shadow, --alternate")
    role = chosen[0]
    env, path = _promotion_context(config_path)
    report = env.models.validate(version, env.view_infos())
    if not report.ok:
        raise RankgateError(
            f"refused: model version {version!r} does not validate: " + "; ".join(report.failures())
        )
    routing = RoutingFile.open(path)
    drift = read_drift(env.redis, env.home.namespace, version)
    routing.guard_drift(version, role, drift, force, click.echo)
    before = routing.routing
    requirement = routing.promotion.require_evaluation
    evidence = (
        _evidence(env, version, before.stable, requirement)
        if requirement is not None and role in ("canary", "stable") and version != before.stable
        else None
    )
    routing.guard_evidence(version, evidence, force, click.echo)
    new = routing.change(Move(version, role, canary), env.models, force, click.echo)
    if role == "canary":
        namespace = env.home.namespace
        if starts_experiment(before, version, set(read_rollbacks(env.redis, namespace))):
            reset_canary_outcomes(env.redis, namespace, version, new.stable)
            click.echo(f"{version}: canary outcome counters start from zero")
        clear_rollback(env.redis, namespace, version)
    click.echo(
        f"{path}: {version} is now {role}" + (f" at {canary:g} %" if canary is not None else "")
    )
    lines = evidence.lines() if evidence is not None else None
    record_change(env.redis, env.home.namespace, "promote", version, routing, lines)
    _apply(env, path, routing_applied(new))


def _evidence(env, version: str, stable: str, requirement):  # type: ignore[no-untyped-def]
    """Off-policy evidence of `version` against stable, as the gate asks for it."""
    from serving.ops.evidence import gather, logged_decisions

    decisions, source = logged_decisions(
        env, [version, stable], requirement.source, requirement.since
    )
    return gather(
        env,
        version,
        stable,
        decisions,
        source,
        requirement.estimator,
        requirement.confidence,
        requirement.draws,
        requirement.min_effective_sample_size,
    )


@model.command("retire")
@click.argument("version")
@FORCE_OPTION
@CONFIG_OPTION
@fails_cleanly
def model_retire(version: str, force: bool, config_path: Path | None) -> None:
    """Take VERSION out of the routing (it stays in the model store) and apply it.

    Refused for the stable version, and when a purpose would lose its permitted
    model, unless --force."""
    from serving.ops.promotion import Move, RoutingFile, record_change, routing_applied

    env, path = _promotion_context(config_path)
    routing = RoutingFile.open(path)
    new = routing.change(Move(version, None), env.models, force, click.echo)
    click.echo(f"{path}: {version} left the routing")
    record_change(env.redis, env.home.namespace, "retire", version, routing)
    _apply(env, path, routing_applied(new))


@model.command("rollback")
@FORCE_OPTION
@CONFIG_OPTION
@fails_cleanly
def model_rollback(force: bool, config_path: Path | None) -> None:
    """Take the canary out (stable serves everyone) and apply it; a canary that was an
    alternate or a shadow before its promotion gets that role back."""
    from serving.ops.promotion import RoutingFile, record_change, rollback_move, routing_applied

    env, path = _promotion_context(config_path)
    routing = RoutingFile.open(path)
    move = rollback_move(routing.routing)
    if move is None:
        click.echo(f"{path}: no canary to roll back")
        return
    new = routing.change(move, env.models, force, click.echo)
    back = f"back to {move.role}" if move.role else "out of the routing"
    click.echo(f"{path}: canary {move.version} {back}; {new.stable} is stable for all users")
    record_change(env.redis, env.home.namespace, "rollback", move.version, routing)
    _apply(env, path, routing_applied(new))


@model.command("evaluate")
@click.argument("version")
@click.option(
    "--against", default=None, help="Compare with this version (default: the logs' own policy)."
)
@click.option(
    "--logs",
    "logs_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A log file with the columns rankgate.yaml `interactions` declares (default: the project's log).",
)
@click.option(
    "--audit", is_flag=True, help="Evaluate on rankgate's audit log joined with outcomes."
)
@click.option("--since", default="7d", show_default=True, help="With --audit: how far back.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999))
@click.option("--draws", default=1000, show_default=True, type=click.IntRange(100, 20_000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@fails_cleanly
def model_evaluate(
    version: str,
    against: str | None,
    logs_path: Path | None,
    audit: bool,
    since: str,
    confidence: float,
    draws: int,
    seed: int,
    as_json: bool,
) -> None:
    """Estimate VERSION's click rate off-policy from logged decisions with propensities:
    IPS, self-normalized IPS and doubly robust (VERSION's scores as the reward model),
    each with a bootstrap interval and the effective sample size, and a verdict against
    --against (or the logging policy's observed click rate)."""
    import json

    from model_store.evaluation import evaluate_versions
    from model_store.offpolicy import ESTIMATORS
    from model_store.train import load_item_table
    from rankgate.ops.setup import Environment
    from serving.ops.evidence import logged_decisions

    if audit and logs_path is not None:
        raise RankgateError("choose one of --logs FILE and --audit")
    env = Environment.open()
    versions = [version] + ([against] if against and against != version else [])
    for name in versions:
        if not env.models.exists(name):
            raise RankgateError(f"no model version {name!r} in this home", 404)
    decisions, source = logged_decisions(
        env, versions, "audit" if audit else "logs", since, logs_path
    )
    result = evaluate_versions(
        env.models,
        load_item_table(env.project, env.views()),
        decisions,
        versions,
        confidence,
        draws,
        seed,
    )
    figures: dict = {
        "source": source,
        "slots": result.n,
        "clicks": result.clicks,
        "logged_click_rate": result.logged_value,
        "confidence": confidence,
        "versions": {
            v: {name: e.__dict__ for name, e in found.items()}
            for v, found in result.estimates.items()
        },
    }
    baseline = against if against and against != version else None
    figures["against"] = baseline or "the logging policy"
    figures["comparisons"] = {
        name: {
            "difference": c.difference,
            "low": c.low,
            "high": c.high,
            "verdict": c.verdict,
            "weighted_clicks": c.weighted_clicks,
        }
        for name in ESTIMATORS
        for c in [result.compare(version, baseline, name)]
    }
    if as_json:
        click.echo(json.dumps(figures, indent=2, default=str))
        return
    click.echo(
        f"{source}: {result.n} logged slots, {result.clicks} clicks; the logging policy's "
        f"click rate {result.logged_value:.4f}"
    )
    if result.clicks < 100:
        click.echo(
            f"  with {result.clicks} clicks the intervals are wide: read them, not the estimates"
        )
    if not audit and logs_path is None:
        in_sample = [
            v for v in versions if env.models.manifest(v).lineage.made_by == "rankgate model train"
        ]
        if in_sample:
            click.echo(
                f"  {', '.join(in_sample)} learned from these logs: on them its estimate is "
                "optimistic (evaluate on logs it has not seen: --logs FILE or --audit)"
            )
    click.echo(
        f"{'version':<12} {'estimator':<9} {'estimate':>9}  {confidence:.0%} interval{'':<9} effective n"
    )
    for v, found in result.estimates.items():
        for name, e in found.items():
            click.echo(
                f"{v:<12} {name:<9} {e.value:>9.4f}  [{e.low:.4f}, {e.high:.4f}]{'':<4} "
                f"{e.effective_sample_size:>9.0f}"
            )
    for name in ESTIMATORS:
        c = result.compare(version, baseline, name)
        click.echo(
            f"{name}: {version} - {baseline or 'the logging policy'} = {c.difference:+.4f} "
            f"[{c.low:+.4f}, {c.high:+.4f}], {c.weighted_clicks} clicks weighed: "
            f"{_verdict(c.verdict)}"
        )


def _verdict(verdict: str) -> str:
    return "cannot tell with this much data" if verdict == "cannot tell" else verdict


@model.command("history")
@click.option("--count", default=20, show_default=True, type=click.IntRange(1, 10_000))
@fails_cleanly
def model_history(count: int) -> None:
    """The audit of routing changes: promotions, retirements and rollbacks (automatic
    ones with their rule), newest last, with forced changes and their evidence."""
    from datetime import UTC, datetime

    from rankgate.ops.setup import Environment
    from serving.observe.routing_log import read_routing_events

    env = Environment.open()
    entries = read_routing_events(env.redis, env.home.namespace, count)
    if not entries:
        click.echo("no routing changes recorded")
    for entry in entries:
        when = datetime.fromtimestamp(entry["at"], UTC).isoformat(timespec="seconds")
        if entry["event"] == "rollback":
            click.echo(
                f"{when}  automatic rollback of {entry['version']}: rule {entry['rule']}: "
                f"{entry['detail']}"
            )
            continue
        role = entry.get("role") or "out of the routing"
        weight = f" at {entry['weight']:g} %" if entry.get("weight") is not None else ""
        forced = "  FORCED past: " + "; ".join(entry["overrode"]) if entry.get("overrode") else ""
        click.echo(f"{when}  {entry['event']} {entry['version']} -> {role}{weight}{forced}")
        for line in entry.get("evidence_lines", []):
            click.echo(f"    {line}")


@model.command("status")
@CONFIG_OPTION
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="How far back shadows are evaluated off-policy on the audit log.",
)
@fails_cleanly
def model_status(config_path: Path | None, since: str) -> None:
    """Routing, drift per version (rows in the window, the most drifted inputs, score
    and explanation drift, flags), automatic rollbacks (which rule fired, with what
    figures), shadow agreement and each shadow's off-policy click-rate estimate
    against stable, and the outcomes joined to each version's decisions (CTR)."""
    from datetime import UTC, datetime

    from serving.observe.routing_log import read_rollbacks, read_shadow
    from serving.ops.promotion import plain, read_routing
    from serving.ops.supervisor import ServerInfo

    env, path = _promotion_context(config_path)
    _, routing = read_routing(path)
    info = ServerInfo.read(env.home)
    health = info.health() if info else None
    click.echo(f"config: {path}  (salt {routing['salt']})")
    live = health["routing"] if health else None
    click.echo(
        "server: "
        + (
            f"{info.base_url}, canary weight now {live['canary_weight']:g} %"
            if info and live
            else "not running"
        )
    )
    for route in plain(routing)["versions"]:
        weight = f"{route['weight']:g} %" if route.get("weight") is not None else ""
        line = f"  {route['version']:<12} {route['role']:<9} {weight}"
        if live and route["version"] in live["windows"]:
            w = live["windows"][route["version"]]
            line += (
                f"   window: {int(w['requests'])} req, errors {w['error_rate']:.1%}, "
                f"degraded {w['degraded_rate']:.1%}, p99 {w['p99_ms']:.1f} ms"
            )
        if route["role"] == "shadow":
            agreement = read_shadow(env.redis, env.home.namespace, route["version"])
            line += (
                f"   shadowed {int(agreement['requests'])} req, errors {int(agreement['errors'])}, "
                f"top-k overlap {agreement['mean_topk_overlap']:.2f}, "
                f"mean |score diff| {agreement['mean_abs_score_diff']:.4f}"
            )
        click.echo(line)
        click.echo(f"      drift: {_drift_line(env, route['version'])}")
        if route["role"] == "shadow":
            for evidence in _shadow_evidence(env, route["version"], routing, since):
                click.echo(f"      {evidence}")
    rollbacks = read_rollbacks(env.redis, env.home.namespace)
    if not rollbacks:
        click.echo("automatic rollbacks: none")
    for version, event in rollbacks.items():
        when = datetime.fromtimestamp(event["at"], UTC).isoformat(timespec="seconds")
        click.echo(
            f"automatic rollback of {version} at {when}: rule {event['rule']} fired: {event['detail']}"
        )
        for side in ("canary", "stable"):
            f = event[side]
            clicks = (
                f", {int(f['clicks'])} clicks / {int(f['impressions'])} impressions "
                f"(CTR {f['ctr']:.2%})"
                if "impressions" in f
                else ""
            )
            click.echo(
                f"    {side}: {int(f['requests'])} req, errors {f['error_rate']:.1%}, "
                f"degraded {f['degraded_rate']:.1%}, p99 {f['p99_ms']:.1f} ms{clicks}"
            )
    _show_outcomes(env.redis, env.home.namespace)


def _shadow_evidence(env, shadow: str, routing, since: str) -> list[str]:  # type: ignore[no-untyped-def]
    """A shadow's click rate estimated off-policy against stable's on the decisions
    of the audit log since `since` that have outcomes (serving/ops/evidence.py)."""
    from serving.observe.outcomes import project_outcomes
    from serving.ops.evidence import gather, logged_decisions

    if project_outcomes(env.project) is None:
        return ["off-policy: the project declares no outcome events"]
    stable = next(r["version"] for r in routing["versions"] if r["role"] == "stable")
    try:
        decisions, source = logged_decisions(env, [shadow, stable], "audit", since)
        if not decisions:
            return [f"off-policy: no decisions with outcomes in the {source}"]
        found = gather(env, shadow, stable, decisions, source, "snips", 0.95, 500)
    except RankgateError as exc:
        return [f"off-policy: not evaluated: {exc.message}"]
    return found.lines()


def _drift_line(env, version: str) -> str:  # type: ignore[no-untyped-def]
    """A version's drift as the replicas last wrote it, or why there is none."""
    from model_store.manifest import REFERENCE_FILE
    from serving.observe.drift_figures import read_drift

    figures = read_drift(env.redis, env.home.namespace, version)
    if figures is not None:
        return figures.describe()
    try:
        has_reference = REFERENCE_FILE in env.models.manifest(version).artifacts
    except RankgateError:
        has_reference = False
    if not has_reference:
        return f"no reference (`rankgate model reference {version}` adds one)"
    return "no figures (no server has scored with it within the drift window)"


def _show_outcomes(client, namespace: str) -> None:  # type: ignore[no-untyped-def]
    """Joined outcomes per version and variant: CTR with its 95 % Wilson interval,
    CTR per position, conversions, decisions with outcomes; unjoined outcomes."""
    from serving.observe.outcomes import outcome_keys, read_outcomes, read_unjoined

    found = outcome_keys(client, namespace)
    if not found:
        click.echo("outcomes: none joined (events.outcomes in rankgate.yaml, POST /v1/events)")
    else:
        click.echo("outcomes joined to decisions (CTR with 95 % Wilson interval):")
    for version, variant in found:
        totals = read_outcomes(client, namespace, version, variant)
        interval = totals.ctr_interval()
        ctr = (
            f"CTR {totals.clicks / totals.impressions:.2%} [{interval[0]:.2%}, {interval[1]:.2%}]"
            if interval is not None
            else "CTR n/a"
        )
        click.echo(
            f"  {version or '-':<12} {variant:<9} impressions {totals.impressions}, "
            f"clicks {totals.clicks}, {ctr}, conversions {totals.conversions}, "
            f"decisions with outcomes {totals.decisions}"
        )
        positions = [
            f"{position}: {counts.get('clicks', 0) / counts['impressions']:.1%} "
            f"({counts.get('clicks', 0)}/{counts['impressions']})"
            for position, counts in totals.by_position.items()
            if counts.get("impressions")
        ]
        if positions:
            click.echo("      CTR by position  " + "  ".join(positions))
    unjoined = read_unjoined(client, namespace)
    if unjoined:
        click.echo(
            "unjoined outcomes: "
            + ", ".join(f"{name} {count}" for name, count in sorted(unjoined.items()))
        )


# -- audit -------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The decision audit log (a Redis Stream, one record per decision)."""


@audit.command("tail")
@click.option("--count", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--follow", is_flag=True, help="Keep printing new records (Ctrl-C stops).")
@fails_cleanly
def audit_tail(count: int, follow: bool) -> None:
    """Print the most recent decisions, one JSON record per line."""
    from rankgate.ops.setup import Environment
    from serving.ops import audit_replay as replay

    env = Environment.open()
    records = replay.tail(env.redis, env.home.namespace, count)
    for record in records:
        click.echo(record.shown())
    if follow:
        after = (records[-1].stream_id or "$") if records else "$"
        for record in replay.follow(env.redis, env.home.namespace, after):
            click.echo(record.shown())


@audit.command("replay")
@click.argument("request_id")
@fails_cleanly
def audit_replay(request_id: str) -> None:
    """Re-score a decision from its recorded features and model version."""
    from rankgate.ops.setup import Environment
    from serving.ops import audit_replay as replay
    from serving.ranking.feature_fetch import FeatureFetcher

    env = Environment.open()
    record = replay.find(env.redis, env.home.namespace, request_id)
    items = FeatureFetcher(env.feast, env.project, env.data_dir).items
    result = replay.replay(record, env.home, items)
    click.echo(f"request {request_id}: {result.message}")
    click.echo(f"  recorded: {result.recorded}")
    if result.replayed:
        click.echo(f"  replayed: {result.replayed}")
    if result.reproduced is False:
        sys.exit(1)


# -- events ------------------------------------------------------------------


@main.group()
def events() -> None:
    """The event stream (POST /v1/events) and the streaming features it feeds."""


@events.command("replay")
@click.option(
    "--since",
    required=True,
    help="From when: a duration back from now (30m, 2h, 7d), an ISO 8601 time, "
    "a stream id, or 0 for every event the stream keeps.",
)
@fails_cleanly
def events_replay(since: str) -> None:
    """Rebuild the streaming features from the events since --since."""
    import asyncio

    import redis.asyncio as aioredis

    from features.store import load_catalogue
    from rankgate.governance.policy import load_policy_set
    from rankgate.ops.setup import Environment
    from serving.events.consumer import ConsumerConfig
    from serving.events.replay import replay_streaming, since_stream_id

    since_stream_id(since)  # a bad --since is refused before anything is touched
    env = Environment.open()
    store = env.feast
    catalogue = load_catalogue(env.project, store.list_feature_views(), env.data_dir)
    policy = load_policy_set(env.project.policies, catalogue, env.project.item_type).policy

    async def run():  # type: ignore[no-untyped-def]
        client = aioredis.Redis.from_url(env.redis_url)
        try:
            return await replay_streaming(
                client,
                env.home.namespace,
                store,
                env.project,
                policy,
                catalogue,
                since,
                ConsumerConfig().lease_s,
                click.echo,
            )
        finally:
            await client.aclose()

    report = asyncio.run(run())
    click.echo(
        f"replayed {report.events} events: {report.applied} applied to streaming features; "
        f"{report.people_reset} people's counts rebuilt, {report.rows_defaulted} reset to defaults"
    )


# -- policy ------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Consent and purpose policy files (policies/): check them, deploy them live."""


FOLDER_ARGUMENT = click.argument(
    "folder",
    required=False,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)


@policy.command("check")
@FOLDER_ARGUMENT
@fails_cleanly
def policy_check(folder: Path | None) -> None:
    """Validate policy.yaml and fallback.yaml of FOLDER (default: the project's policies),
    with their item ids against the project's catalogue."""
    from rankgate.governance.policy import load_policy_set
    from rankgate.ops.setup import Environment

    env = Environment.open(redis=False)
    checked = load_policy_set(folder, env.catalogue(), env.project.item_type)
    click.echo(
        f"{checked.folder}: policy {checked.policy.version}, fallback {checked.fallback.version}, "
        f"digest {checked.digest}: valid"
    )


@policy.command("deploy")
@FOLDER_ARGUMENT
@CONFIG_OPTION
@fails_cleanly
def policy_deploy(folder: Path | None, config_path: Path | None) -> None:
    """Check FOLDER's policy files, then serve them: the config names the folder and the
    digest of the files checked, and the running server re-reads them in place. A file
    with an error is refused here, and by the server, which keeps its current policy."""
    from rankgate.governance.policy import load_policy_set
    from rankgate.ops.setup import Environment
    from serving.ops.promotion import write_policy

    project_env = Environment.open(redis=False)
    checked = load_policy_set(folder, project_env.catalogue(), project_env.project.item_type)
    env, path = _promotion_context(config_path)
    write_policy(path, checked.folder, checked.digest)
    click.echo(f"{path}: policy {checked.policy.version} from {checked.folder} ({checked.digest})")
    _apply(env, path, lambda h: h.get("policy_digest") == checked.digest)


# -- past one machine ----------------------------------------------------------

STORE_OPTION = click.option(
    "--store",
    default=None,
    help="Artifact store URI (s3://bucket/prefix, gs://bucket/prefix, file:///path); "
    "default: RANKGATE_STORE.",
)


def _store_uri(store: str | None) -> str:
    from pydantic import ValidationError

    from rankgate.core.settings import Settings, get_settings

    if store is None:
        store = get_settings().store
        if store is None:
            raise click.UsageError("no artifact store: pass --store URI or set RANKGATE_STORE")
        return store
    try:
        checked = Settings(store=store).store
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="--store") from exc
    assert checked is not None
    return checked


@main.command()
@STORE_OPTION
@fails_cleanly
def publish(store: str | None) -> None:
    """Copy what a cluster's replicas serve from the home to the artifact store: the
    namespace, the Feast registry, the serving tables and every model version
    (registered versions are immutable there too)."""
    from model_store.artifacts import ArtifactStore
    from rankgate.ops.setup import Environment
    from serving.ops.cluster import publish as publish_home

    env = Environment.open(redis=False)
    target = ArtifactStore(_store_uri(store))
    done = publish_home(env.home, env.project, env.views(), target, env.models.name, click.echo)
    tables = ", ".join(f"{role} {sha[:12]}" for role, sha in done.files.items())
    click.echo(
        f"{target.uri}: namespace {env.home.namespace}; registry "
        f"{'copied' if done.registry else 'already there'}; tables {tables}; "
        f"{len(done.versions)} model version(s) published, {len(done.present)} already there"
    )


@main.group()
def cluster() -> None:
    """Serving on a Ray cluster whose nodes share no filesystem (README "Running on a cluster")."""


@cluster.command("config")
@STORE_OPTION
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Serve config to start from (default: serve_config.yaml).",
)
@click.option(
    "--replicas", type=click.IntRange(1, 1000), default=None, help="RankIngress replicas."
)
@click.option(
    "--max-per-node",
    type=click.IntRange(1, 1000),
    default=None,
    help="At most this many RankIngress replicas on one node (1: a lost node takes one).",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the proxies bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="HTTP port.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write it here (default: standard output).",
)
@fails_cleanly
def cluster_config_command(
    store: str | None,
    config_path: Path | None,
    replicas: int | None,
    max_per_node: int | None,
    host: str,
    port: int | None,
    output: Path | None,
) -> None:
    """A serve config for a cluster: the store's URI, the project's files and the
    checked policy files carried inside it, no local path (for `serve deploy`, or a
    RayService's serveConfigV2)."""
    from rankgate.core.settings import get_project
    from serving.ops.cluster import cluster_config, dump
    from serving.ops.launch import project_serve_config

    document = cluster_config(
        get_project(),
        _store_uri(store),
        config_path or project_serve_config(get_project()),
        host,
        port,
        replicas,
        max_per_node=max_per_node,
    )
    text = dump(document)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(
            f"{output}: serve config for a cluster reading {document['applications'][0]['runtime_env']['env_vars']['RANKGATE_STORE']}"
        )


# -- keys --------------------------------------------------------------------


@main.group()
def keys() -> None:
    """API keys: per application, scoped to purposes, stored hashed."""


def _key_store():  # type: ignore[no-untyped-def]
    from rankgate.governance.api_keys import ApiKeyStore
    from rankgate.ops.setup import Environment

    env = Environment.open()
    return ApiKeyStore(env.redis, env.home.namespace)


@keys.command("create")
@click.argument("app")
@click.option(
    "--purpose",
    "purposes",
    multiple=True,
    required=True,
    help="A purpose of policies/policy.yaml the key may ask for (repeatable).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["events"]),
    help="Another kind of call the key may make: events (POST /v1/events).",
)
@fails_cleanly
def keys_create(app: str, purposes: tuple[str, ...], scopes: tuple[str, ...]) -> None:
    """Create a key for APP; it is printed once, as the last word."""
    from rankgate.governance.api_keys import check_app
    from rankgate.governance.policy import load_policy

    check_app(app)  # a bad name is refused before Redis is even opened

    key = _key_store().create(app, purposes, load_policy().purposes, scopes)
    granted = f"purposes: {', '.join(sorted(set(purposes)))}"
    if scopes:
        granted += f"; scopes: {', '.join(sorted(set(scopes)))}"
    click.echo(f"created an API key for {app} ({granted}).")
    click.echo("It is shown only this once; callers send it as 'Authorization: Bearer <key>':")
    click.echo(key)


@keys.command("list")
@fails_cleanly
def keys_list() -> None:
    """Applications, their purposes and key hints (never the keys)."""
    entries = _key_store().all()
    if not entries:
        click.echo("no API keys: create one with `rankgate keys create APP --purpose P`")
        return
    click.echo(f"{'app':<24} {'key':<10} {'created':<26} purposes")
    for entry in entries:
        purposes = ", ".join(sorted(entry.purposes))
        if entry.scopes:
            purposes += f" (scopes: {', '.join(sorted(entry.scopes))})"
        click.echo(f"{entry.app:<24} {entry.hint + '…':<10} {entry.created_at:<26} {purposes}")


@keys.command("revoke")
@click.argument("app")
@fails_cleanly
def keys_revoke(app: str) -> None:
    """Revoke every key of APP; running servers stop accepting them within a second."""
    count = _key_store().revoke(app)
    if not count:
        raise RankgateError(f"no API keys for application {app!r} (see `rankgate keys list`)")
    click.echo(f"revoked {count} key{'s' if count != 1 else ''} of {app}")


# -- privacy -----------------------------------------------------------------


@main.group()
def privacy() -> None:
    """Requests of data subjects, answered from their pseudonymous key."""


@privacy.command("forget")
@click.argument("user_id")
@fails_cleanly
def privacy_forget(user_id: str) -> None:
    """Erase USER_ID's feature rows, consent record, audit records and offline rows."""
    from rankgate.ops.erasure import Eraser, checked_user_id
    from rankgate.ops.setup import Environment

    checked_user_id(user_id)  # a bad id is refused before Redis is even opened
    env = Environment.open()
    report = Eraser(env.redis, env.home, env.project).forget(user_id)
    click.echo(report.summary())


# -- redis -------------------------------------------------------------------


@main.group("redis")
def redis_group() -> None:
    """The Redis-compatible server (REDIS_URL, or the embedded one)."""


@redis_group.command("start")
@fails_cleanly
def redis_start() -> None:
    """Start the embedded server of this home (or check REDIS_URL) and print its address."""
    from rankgate.core.redis_server import connect, describe, resolve_redis_url

    url = resolve_redis_url()
    connect(url)
    click.echo(describe(url))


@redis_group.command("stop")
@fails_cleanly
def redis_stop() -> None:
    """Save and stop the embedded server of this home."""
    from rankgate.core.home import Home
    from rankgate.core.redis_server import EmbeddedRedis
    from rankgate.core.settings import get_settings

    if get_settings().redis_url:
        raise RankgateError("REDIS_URL is set: rankgate does not stop a server it did not start")
    stopped = EmbeddedRedis(Home.from_settings()).stop()
    click.echo("stopped" if stopped else "not running")


@redis_group.command("status")
@fails_cleanly
def redis_status() -> None:
    """Say which server this home uses and whether it answers."""
    from rankgate.core.home import Home
    from rankgate.core.redis_server import EmbeddedRedis, connect, describe
    from rankgate.core.settings import get_settings

    settings = get_settings()
    if settings.redis_url:
        connect(settings.redis_url)
        click.echo(f"REDIS_URL {describe(settings.redis_url)}: up")
        return
    url = EmbeddedRedis(Home.from_settings(settings)).running_url()
    click.echo(f"embedded {describe(url)}: up" if url else "embedded: not running")


if __name__ == "__main__":
    main()
