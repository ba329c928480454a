"""`rankgate bench --against-build DIR`: the checkout's check, the ratios this / earlier
within each round, the report's section and the CPU part's rate, from made-up
runs. No server is started here: the earlier build is started for real only in a
benchmark run."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from loadtests.bench import report as bench_report
from loadtests.bench.against import (
    CHECKOUT_FILES,
    EARLIER,
    against_figures,
    against_markdown,
    check_build,
)
from loadtests.bench.earlier import check_replicas, check_users, cli, redis_of
from loadtests.bench.figures import FLOOR, OURS
from loadtests.bench.run import cpu_rate
from rankgate.cli.main import main
from tests.ops.test_bench import run, synthetic_report


def checkout(folder: Path) -> Path:
    for name in CHECKOUT_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    return folder


def test_the_earlier_build_must_be_a_checkout_of_rankgate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_build(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        check_build(tmp_path / "file")
    (tmp_path / "half" / "serving" / "ops").mkdir(parents=True)
    (tmp_path / "half" / "serving" / "ops" / "launch.py").write_text("")
    with pytest.raises(ValueError, match="not a checkout of rankgate .*no loadtests/bench/sys"):
        check_build(tmp_path / "half")
    assert check_build(checkout(tmp_path / "good") / ".." / "good") == tmp_path / "good"


def test_a_bad_earlier_build_is_a_cli_error_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, why in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "is not a checkout of rankgate (it has no serving/ops/launch.py"),
    ):
        result = CliRunner().invoke(
            main, ["bench", "--against-build", str(folder)], prog_name="rankgate"
        )
        assert result.exit_code != 0
        assert f"--against-build: {folder} {why}" in result.output
    result = CliRunner().invoke(
        main,
        ["bench", "--against-build", str(checkout(tmp_path / "good")), "--overload"],
        prog_name="rankgate",
    )
    assert "--against-build: measures beside the main benchmark, not --overload" in result.output


def cpu_round(ms: float) -> dict[str, Any]:
    return {"ms_per_decision": ms, "achieved_rps": 200.0, "p99_ms": 5.0}


def made_up_run() -> tuple[dict[str, Any], dict[str, Any]]:
    """Two rounds: this build, the floor and an earlier build, with the CPU part."""
    runs = {
        OURS: {
            "1": [run(1, 400, 2.0, 4), run(1, 380, 2.2, 5)],
            "8": [run(8, 900, 8.0, 30), run(8, 800, 9.0, 45)],
        },
        FLOOR: {
            "1": [run(1, 500, 1.5, 3), run(1, 500, 1.5, 3)],
            "8": [run(8, 1000, 7.0, 20), run(8, 1000, 7.0, 20)],
        },
        EARLIER: {
            "1": [run(1, 200, 4.0, 9), run(1, 190, 4.4, 10)],
            # Round 2's c=8 misses p99 ≤ 50 ms: that round's peak is its c=1.
            "8": [run(8, 450, 16.0, 48), run(8, 500, 15.0, 70)],
        },
    }
    cpu = {
        "rate_rps": 200.0,
        "systems": {
            OURS: {"rounds": [cpu_round(2.0), cpu_round(2.5)]},
            FLOOR: {"rounds": [cpu_round(1.5), cpu_round(1.5)]},
            EARLIER: {"rounds": [cpu_round(4.4), cpu_round(3.0)]},
        },
    }
    return runs, cpu


def figures(cpu: dict[str, Any] | None, home: Path | None = None) -> dict[str, Any]:
    runs, _ = made_up_run()
    return against_figures(
        runs,
        cpu,
        Path("/w/base"),
        {"this": "abc123-dirty", "earlier": "db8f019"},
        [{"pid": 7, "pythonpath_first": "/w/base", "cwd": "/w/base"}],
        home,
    )


def test_ratios_against_the_earlier_build_are_taken_within_each_round() -> None:
    found = figures(made_up_run()[1])
    # Peaks per round: 900 vs 450, then 800 vs 190 (the earlier's c=8 is over 50 ms).
    assert found["peak_throughput"]["ratio"]["per_round"] == [2.0, 4.211]
    assert found["peak_throughput"]["ratio"]["median"] == 3.105
    assert (found["peak_throughput"]["this_rps"], found["peak_throughput"]["earlier_rps"]) == (
        850.0,
        320.0,
    )
    assert found["p50_c1"]["ratio"]["per_round"] == [0.5, 0.5]
    # CPU: 4.4 / 2.0 = 2.2× cheaper, then 3.0 / 2.5 = 1.2×; median 1.7×.
    cpu = found["cpu_per_decision"]
    assert cpu["times_cheaper"]["per_round"] == [2.2, 1.2]
    assert cpu["times_cheaper"]["median"] == 1.7
    assert cpu["ratio"]["per_round"] == [0.455, 0.833]
    assert (cpu["this_ms"], cpu["earlier_ms"]) == (2.25, 3.7)
    assert found["met"] == {"cpu_per_decision": True, "peak_throughput": True}


def test_the_report_says_whether_each_improvement_is_met() -> None:
    _, cpu = made_up_run()
    cpu["systems"][EARLIER]["rounds"] = [cpu_round(2.4), cpu_round(3.0)]
    report = synthetic_report(against=figures(cpu))
    text = bench_report.render_markdown(report)
    section = text.split("## Against an earlier build", 1)[1]
    assert "This build (commit `abc123-dirty`) against an earlier build in `/w/base`" in section
    assert "(commit `db8f019`)" in section
    assert "pid 7: PYTHONPATH first entry /w/base, working folder /w/base" in section
    assert "| CPU ms per decision at 200 req/s | 2.25 | 2.7 | 0.833× (0.833–0.833) |" in section
    assert "| peak req/s with p99 ≤ 50 ms | 850 | 320 | 3.105× (2–4.211) |" in section
    assert "| p50 ms at concurrency 1 | 2.1 | 4.2 | 0.5× (0.5–0.5) | — |" in section
    lines = section.splitlines()
    cpu_line = next(line for line in lines if line.startswith("- CPU per decision at least 1.5×"))
    assert cpu_line.endswith("1.2× (1.2–1.2): **MISSED**")
    peak_line = next(line for line in lines if line.startswith("- Peak throughput at least 1.5×"))
    assert peak_line.endswith("**met**")


def test_without_the_cpu_part_its_improvement_is_not_measured() -> None:
    found = figures(None)
    assert found["met"]["cpu_per_decision"] is None
    text = "\n".join(against_markdown(found))
    assert "CPU ms per decision" not in text
    assert "not measured (cpu skipped): **not measured**" in text
    assert against_markdown(None) == []


def test_the_cpu_rate_keeps_the_earlier_build_below_its_peak() -> None:
    def rows(rps: float) -> list[dict[str, Any]]:
        return [{"concurrency": 8, "throughput_rps": rps, "p99_ms": 20.0, "errors": 0}]

    results = {OURS: rows(1200.0), FLOOR: rows(1000.0), EARLIER: rows(400.0)}
    rate, source = cpu_rate(results, {OURS: "rankgate", EARLIER: "the earlier build"})
    assert rate == 200.0 and "of the earlier build's peak" in source
    assert cpu_rate(results) == (500.0, "50 % of the floor's peak, 1000 req/s at c=8")


def test_replicas_must_run_the_earlier_builds_code() -> None:
    build = Path("/w/base")
    check_replicas(build, [{"pid": 1, "pythonpath_first": "/w/base", "cwd": "/w/base"}])
    for seen, why in (
        ([], "no replica"),
        ([{"pid": 1, "pythonpath_first": "/work/main", "cwd": "/w/base"}], "would not run"),
        ([{"pid": 1, "pythonpath_first": "/w/base", "cwd": "/work/main"}], "would not run"),
    ):
        with pytest.raises(RuntimeError, match=why):
            check_replicas(build, seen)


def test_the_report_names_the_earlier_builds_own_home() -> None:
    shared = "\n".join(against_markdown(figures(None)))
    assert "on the same home, Redis and Feast data" in shared
    own = "\n".join(against_markdown(figures(None, Path("/h/bench/earlier-db8f0195c440"))))
    assert "on a home of its own (`/h/bench/earlier-db8f0195c440`)" in own
    assert "with its own embedded Redis" in own and "same home" not in own


def test_every_user_asked_about_needs_consent_in_the_earlier_home() -> None:
    bodies: list[dict[str, Any]] = [{"user_id": "u-1"}, {"user_id": "u-2"}]
    check_users(bodies, {"u-1", "u-2", "u-3"})
    check_users(bodies, None)  # its code does not say
    with pytest.raises(RuntimeError, match="1 of the requests' users have no consent .*u-2"):
        check_users(bodies, {"u-1"})


def test_the_earlier_builds_redis_is_found_by_its_port() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert redis_of({"REDIS_URL": f"redis://127.0.0.1:{port}/0"}) == os.getpid()
    assert redis_of({"REDIS_URL": "redis://redis.example:6379/0"}) is None
    assert redis_of({}) is None


def test_the_earlier_builds_own_cli_runs_its_script_entry(tmp_path: Path) -> None:
    build = tmp_path / "build"
    (build / "old").mkdir(parents=True)
    (build / "pyproject.toml").write_text('[project.scripts]\nrankgate = "old.cli:main"\n')
    (build / "old" / "__init__.py").write_text("")
    (build / "old" / "cli.py").write_text(
        "import os, sys\n"
        "def main():\n"
        "    if sys.argv[1:] == ['fail']:\n"
        "        sys.exit('no such thing')\n"
        "    print(os.environ['RANKGATE_HOME'], *sys.argv[1:])\n"
    )
    home = tmp_path / "home"
    printed = cli(build, home, "keys", "create", "x", timeout_s=60)
    assert printed.split() == [str(home), "keys", "create", "x"]
    with pytest.raises(RuntimeError, match="`rankgate fail` of .* failed: no such thing"):
        cli(build, home, "fail", timeout_s=60)
