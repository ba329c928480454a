"""`rankgate loadtest`: real Locust runs against the real server, and the SLO checks.

Runs are short (a few seconds each) to keep the suite fast; the 2-core machine is
shared by Locust and the server, hence the modest user counts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loadtests.loadtest import DEFAULT_SLO, SloConfig, load_slo, run_loadtest
from rankgate.cli.main import main
from rankgate.core.errors import ConfigError, RankgateError
from tests.conftest import Server


def _silent(_line: str) -> None:
    return None


def test_default_slo_file_is_valid() -> None:
    slo = load_slo(DEFAULT_SLO)
    assert isinstance(slo, SloConfig)
    assert slo.p99_ms > 0 and 0 < slo.max_error_rate < 1 and 0 < slo.max_fallback_rate < 1


def test_realistic_mix_meets_the_slos(server: Server, tmp_path: Path) -> None:
    result = run_loadtest(server.base_url, 8, 8, "12s", tmp_path, None, _silent)

    assert (tmp_path / "locust_stats.csv").stat().st_size > 0
    assert "<html" in (tmp_path / "locust.html").read_text().lower()
    assert result.requests > 100, result.rows
    assert result.failures == 0, (tmp_path / "locust_failures.csv").read_text()
    names = {row.name: row for row in result.rows}
    # Every part of the mix ran; the bad inputs were all answered 422 (else failures).
    for name in ("rank personalized-eligible", "rank no-consent", "rank explain", "consent write"):
        assert names[name].requests > 0, name
    bad = names["rank bad-input"]
    assert bad.requests > 0 and bad.failures == 0
    # Policy outcomes are answers like any other, never degradation.
    assert result.outcomes.get("fallback:no_consent", 0) > 0
    assert result.outcomes.get("personalized", 0) > 0
    assert result.rank_answers == sum(
        v for k, v in result.outcomes.items() if k == "personalized" or k.startswith("fallback:")
    )
    assert result.ok, [check.line() for check in result.checks]


def test_missed_slo_fails_the_command(server: Server, tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("p99_ms: 0.001\nmax_error_rate: 0.01\nmax_fallback_rate: 0.05\n")
    outcome = CliRunner().invoke(
        main,
        [
            "loadtest",
            "--host",
            server.base_url,
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "4s",
            "--output",
            str(tmp_path / "out"),
            "--slo",
            str(slo),
        ],
    )
    assert outcome.exit_code == 1, outcome.output
    assert "MISSED p99_ms" in outcome.output
    assert "SLO missed: p99_ms" in outcome.output
    # Only the impossible objective is missed.
    assert "met    max_error_rate" in outcome.output
    assert (tmp_path / "out" / "locust_stats.csv").exists()


def test_no_server_is_a_clear_error_and_no_locust(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is free again: nothing listens there.
    host = f"http://127.0.0.1:{port}"
    with pytest.raises(RankgateError, match=f"no rankgate server answering at {host}"):
        run_loadtest(host, 2, 2, "5s", tmp_path, None, _silent)
    assert not (tmp_path / "locust.log").exists()

    outcome = CliRunner().invoke(
        main, ["loadtest", "--host", host, "--run-time", "5s", "--output", str(tmp_path)]
    )
    assert outcome.exit_code == 1
    assert f"error: no rankgate server answering at {host}" in outcome.output
    assert "Traceback" not in outcome.output
    assert not (tmp_path / "locust.log").exists()


def test_bad_slo_file_is_refused_naming_file_and_field(tmp_path: Path) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("p99_ms: 250\nmax_error_rate: 2\nmax_fallback_rate: 0.05\n")
    with pytest.raises(ConfigError) as refused:
        load_slo(slo)
    assert str(slo) in refused.value.message and "'max_error_rate'" in refused.value.message

    slo.write_text("p99_ms: 250\nmax_error_rate: 0.01\nmax_fallback_rate: 0.05\np999_ms: 1\n")
    # Refused before any server is contacted: the host does not matter.
    outcome = CliRunner().invoke(
        main,
        [
            "loadtest",
            "--host",
            "http://127.0.0.1:9",
            "--slo",
            str(slo),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert outcome.exit_code == 1
    assert f"error: {slo}: field 'p999_ms'" in outcome.output
    assert "Traceback" not in outcome.output


def test_locustfile_runs_without_the_runner(server: Server, tmp_path: Path) -> None:
    """Plain `locust -f loadtests/locustfile.py --host ...`, as docs/operating.md documents."""
    from tests import REPO

    completed = subprocess.run(
        [
            str(Path(sys.executable).with_name("locust")),
            "-f",
            "loadtests/locustfile.py",
            "--host",
            server.base_url,
            "--headless",
            "-u",
            "2",
            "-r",
            "2",
            "--run-time",
            "3s",
            "--stop-timeout",
            "3",
            "--only-summary",
        ],
        cwd=REPO,
        env={**os.environ, "RANKGATE_API_KEY": server.api_key},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rank outcomes" in completed.stderr
