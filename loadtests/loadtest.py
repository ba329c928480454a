"""`rankgate loadtest`: a headless Locust run of loadtests/locustfile.py, checked against SLOs.

Locust runs as its own process (gevent monkey-patches everything it imports, so it
never shares an interpreter with rankgate's CLI or tests), bounded by its
`--run-time`, a `--stop-timeout` and a hard timeout on the subprocess. Afterwards
its CSV statistics and the locustfile's rank-outcome counters are read, and each
SLO of `loadtests/slo.yaml` is evaluated:

- p99_ms: 99th percentile latency of all requests (Locust's aggregated row);
- max_error_rate: failed requests / requests;
- max_fallback_rate: degraded 200 rank answers / 200 rank answers (degraded:
  the fallback reasons `serving.contract.reasons.FallbackReason` marks degraded;
  `no_consent` is policy).

Files written to the output folder: locust_stats.csv (and Locust's other CSVs),
locust.html, locust.log, outcomes.json.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from loadtests import log_tail, require_locust, results_folder
from rankgate.core.config_files import load_yaml_model
from rankgate.core.errors import RankgateError
from rankgate.core.resources import shipped
from rankgate.core.settings import SOURCE_CHECKOUT, put_checkout_on_path
from rankgate.governance.api_keys import temporary_key

LOCUSTFILE = shipped("loadtests", "locustfile.py")
DEFAULT_SLO = shipped("loadtests", "slo.yaml")
OUTCOMES_ENV = "RANKGATE_LOADTEST_OUTCOMES"  # same names as in the locustfile
API_KEY_ENV = "RANKGATE_API_KEY"
TEMPORARY_KEY_APP = "loadtest"
STOP_TIMEOUT_S = 5
# Locust's start-up (imports, reading the demo consent records) before the clock
# of --run-time starts, and its shutdown after it: generous on a busy 2-core box.
STARTUP_ALLOWANCE_S = 90

Say = Callable[[str], None]


class SloConfig(BaseModel):
    """loadtests/slo.yaml. Every objective is required, so a typo cannot drop one."""

    model_config = ConfigDict(extra="forbid")

    p99_ms: float = Field(gt=0)
    """Bound on the 99th percentile latency of all requests, in ms."""
    max_error_rate: float = Field(ge=0, le=1)
    """Bound on failed requests / requests."""
    max_fallback_rate: float = Field(ge=0, le=1)
    """Bound on degraded 200 rank answers / 200 rank answers (no_consent excluded)."""


def load_slo(path: Path) -> SloConfig:
    return load_yaml_model(path, SloConfig)


@dataclass(frozen=True)
class SloCheck:
    name: str
    limit: float
    actual: float
    passed: bool

    def line(self) -> str:
        actual = "n/a" if math.isnan(self.actual) else f"{self.actual:g}"
        verdict = "met   " if self.passed else "MISSED"
        return f"{verdict} {self.name}: {actual} (limit {self.limit:g})"


@dataclass(frozen=True)
class RequestRow:
    """One row of Locust's stats: a request name, or "Aggregated"."""

    method: str
    name: str
    requests: int
    failures: int
    median_ms: float
    p95_ms: float
    p99_ms: float
    rps: float


@dataclass
class LoadtestResult:
    host: str
    users: int
    spawn_rate: float
    run_time: str
    requests: int
    failures: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float
    rank_answers: int
    degraded: int
    fallback_rate: float
    outcomes: dict[str, int]
    rows: list[RequestRow]
    checks: list[SloCheck]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def missed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]

    def row(self, name: str) -> RequestRow | None:
        return next((r for r in self.rows if r.name == name), None)


# Matched whole, ASCII digits only: `\d` takes fullwidth digits, `$` a final newline.
_SECONDS = re.compile(r"[0-9]+")
_TIMESPAN = re.compile(r"(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")


def run_time_seconds(run_time: str, option: str = "--run-time") -> int:
    """Seconds of a Locust --run-time ("45", "30s", "2m", "1h30m"); refused when malformed."""
    text = run_time.strip()
    if _SECONDS.fullmatch(text):
        seconds = int(text)
    else:
        match = _TIMESPAN.fullmatch(text)
        if not text or match is None:
            raise RankgateError(f"{option}: {run_time!r} is not a duration like 30s, 2m or 1h30m")
        hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds < 1:
        raise RankgateError(f"{option}: {run_time!r} must be at least one second")
    return seconds


def check_server(host: str, timeout_s: float = 3.0) -> None:
    """Refuse to start Locust when no rankgate answers: it would only record errors."""
    try:
        response = httpx.get(f"{host.rstrip('/')}/healthz", timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise RankgateError(
            f"no rankgate server answering at {host} ({type(exc).__name__}: {exc}); "
            "start one with `rankgate serve` or pass --host"
        ) from exc
    if response.status_code != 200:
        raise RankgateError(
            f"no healthy rankgate server at {host}: GET /healthz answered "
            f"{response.status_code}; start one with `rankgate serve` or pass --host"
        )


def locust_command(
    host: str, users: int, spawn_rate: float, run_time: str, output_dir: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        f"{spawn_rate:g}",
        "--run-time",
        run_time,
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--host",
        host,
        "--csv",
        str(output_dir / "locust"),
        "--html",
        str(output_dir / "locust.html"),
        "--only-summary",
    ]


def locust_env(outcomes_path: Path, api_key: str) -> dict[str, str]:
    # LOCUST_* variables of the caller would silently change the run (users, host,
    # run time...): the command line above is the whole configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env[OUTCOMES_ENV] = str(outcomes_path)
    env[API_KEY_ENV] = api_key
    put_checkout_on_path(env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _number(value: str) -> float:
    # Locust writes "N/A" for percentiles of a name without requests.
    try:
        return float(value)
    except ValueError:
        return float("nan")


def read_stats(path: Path) -> list[RequestRow]:
    with path.open(newline="") as handle:
        return [
            RequestRow(
                method=row["Type"],
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                median_ms=_number(row["Median Response Time"]),
                p95_ms=_number(row["95%"]),
                p99_ms=_number(row["99%"]),
                rps=_number(row["Requests/s"]),
            )
            for row in csv.DictReader(handle)
        ]


def evaluate(
    slo: SloConfig, p99_ms: float, error_rate: float, fallback_rate: float
) -> list[SloCheck]:
    # NaN (nothing measured) compares False, so an unmeasured objective is missed.
    return [
        SloCheck("p99_ms", slo.p99_ms, p99_ms, p99_ms <= slo.p99_ms),
        SloCheck(
            "max_error_rate", slo.max_error_rate, error_rate, error_rate <= slo.max_error_rate
        ),
        SloCheck(
            "max_fallback_rate",
            slo.max_fallback_rate,
            fallback_rate,
            fallback_rate <= slo.max_fallback_rate,
        ),
    ]


def run_loadtest(
    host: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    output_dir: Path | None,
    slo_path: Path | None,
    say: Say,
    api_key: str | None = None,
) -> LoadtestResult:
    """Run Locust headless against `host`, then read its figures and check the SLOs.

    Without `api_key`, a temporary key of this home (application `loadtest`, every
    purpose) is created for the run and revoked afterwards. `output_dir` and
    `slo_path` default to `locust/` in `results_folder()` and DEFAULT_SLO.
    """
    require_locust()
    if users < 1 or spawn_rate <= 0:
        raise RankgateError("--users must be at least 1 and --spawn-rate positive")
    run_time_seconds(run_time)  # a bad --run-time is refused before anything runs
    # The SLO file is read first: a bad one should not cost a whole run.
    slo = load_slo(slo_path or DEFAULT_SLO)
    host = host.rstrip("/")
    check_server(host)

    output_dir = output_dir or results_folder() / "locust"
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "stats": output_dir / "locust_stats.csv",
        "html": output_dir / "locust.html",
        "log": output_dir / "locust.log",
        "outcomes": output_dir / "outcomes.json",
    }
    # Leftovers of an earlier run must not pass for this run's results.
    for path in files.values():
        path.unlink(missing_ok=True)

    with contextlib.nullcontext(api_key) if api_key else temporary_key(TEMPORARY_KEY_APP) as key:
        completed = _run_locust(host, users, spawn_rate, run_time, output_dir, files, key, say)
    # Exit code 1 only says some requests failed, which the error-rate SLO judges;
    # missing statistics mean Locust itself did not run.
    if not files["stats"].exists() or not files["outcomes"].exists():
        raise RankgateError(
            f"locust exited with code {completed.returncode} without results; "
            f"last lines of {files['log']}:\n{log_tail(files['log'], 15)}"
        )

    rows = read_stats(files["stats"])
    total = next((r for r in rows if r.name == "Aggregated"), None)
    if total is None or total.requests == 0:
        raise RankgateError(f"locust sent no requests to {host}; see {files['log']}")
    counters: dict[str, Any] = json.loads(files["outcomes"].read_text())
    rank_answers = int(counters["rank_answers"])
    degraded = int(counters["degraded"])
    error_rate = total.failures / total.requests
    fallback_rate = degraded / rank_answers if rank_answers else float("nan")
    return LoadtestResult(
        host=host,
        users=users,
        spawn_rate=spawn_rate,
        run_time=run_time,
        requests=total.requests,
        failures=total.failures,
        error_rate=error_rate,
        p50_ms=total.median_ms,
        p95_ms=total.p95_ms,
        p99_ms=total.p99_ms,
        rps=total.rps,
        rank_answers=rank_answers,
        degraded=degraded,
        fallback_rate=fallback_rate,
        outcomes={str(k): int(v) for k, v in counters["outcomes"].items()},
        rows=[r for r in rows if r.name != "Aggregated"],
        checks=evaluate(slo, total.p99_ms, error_rate, fallback_rate),
        files=files,
    )


def _run_locust(
    host: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    output_dir: Path,
    files: dict[str, Path],
    api_key: str,
    say: Say,
) -> subprocess.CompletedProcess[bytes]:
    command = locust_command(host, users, spawn_rate, run_time, output_dir)
    hard_timeout = run_time_seconds(run_time) + STOP_TIMEOUT_S + STARTUP_ALLOWANCE_S
    say(f"locust: {users} users (spawn rate {spawn_rate:g}/s) for {run_time} against {host}")
    with files["log"].open("wb") as log:
        try:
            completed = subprocess.run(
                command,
                cwd=SOURCE_CHECKOUT,
                env=locust_env(files["outcomes"], api_key),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=hard_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            # subprocess.run has already killed it.
            raise RankgateError(
                f"locust did not finish within {hard_timeout}s and was stopped; see {files['log']}"
            ) from exc
    return completed


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"


def render_summary(result: LoadtestResult) -> list[str]:
    header = ("REQUEST", "COUNT", "FAILED", "P50 MS", "P95 MS", "P99 MS", "REQ/S")
    body = [
        (
            f"{r.method} {r.name}",
            str(r.requests),
            str(r.failures),
            _ms(r.median_ms),
            _ms(r.p95_ms),
            _ms(r.p99_ms),
            f"{r.rps:.1f}",
        )
        for r in result.rows
    ]
    body.append(
        (
            "all",
            str(result.requests),
            str(result.failures),
            _ms(result.p50_ms),
            _ms(result.p95_ms),
            _ms(result.p99_ms),
            f"{result.rps:.1f}",
        )
    )
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *body]
    ]
    answers = ", ".join(
        f"{k.removeprefix('fallback:')} {v}"
        for k, v in result.outcomes.items()
        if k == "personalized" or k.startswith("fallback:")
    )
    explained = ", ".join(
        f"{k.removeprefix('explain:')} {v}"
        for k, v in result.outcomes.items()
        if k.startswith("explain:")
    )
    fallback = "n/a" if math.isnan(result.fallback_rate) else f"{result.fallback_rate:.2%}"
    lines += [
        "",
        f"rank answers: {result.rank_answers} ({answers or 'none'})",
        f"explain requests: {explained or 'none'}",
        (
            f"error rate {result.error_rate:.2%}; degraded answers {result.degraded} = "
            f"fallback rate {fallback} (no_consent is policy, not counted)"
        ),
    ]
    if result.outcomes.get("unexpected_policy_decision"):
        lines.append(
            f"policy decisions other than expected from the consent records read at start: "
            f"{result.outcomes['unexpected_policy_decision']} (consent changed during the run?)"
        )
    lines += ["", "SLOs:", *[f"  {check.line()}" for check in result.checks]]
    return lines
