"""CPU per decision and the benchmark's guard: `rankgate bench --compare` fails on
a ratio that got worse than the committed run's by more than the tolerance.

The pure parts first (CPU accounting, the comparison, tolerances, history, the
README's table), in milliseconds; then one small real run: rankgate and the floor
measured for a few seconds, then again with a busy loop seeded into rankgate's
`score` stage, and the guard catching it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from loadtests.bench import compare, cpu, readme
from loadtests.drive import cpu_seconds, cpu_used
from rankgate.core.errors import RankgateError
from rankgate.ops.bench import BenchOptions, check_regressions

REPO = Path(__file__).resolve().parents[2]


# -- CPU per decision ---------------------------------------------------------


def test_cpu_time_is_read_from_proc_stat(tmp_path: Path) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    (tmp_path / "7").mkdir()
    # A command name with spaces and ")" must not shift the fields.
    fields = ["S", *["0"] * 10, str(3 * tick), str(tick), *["0"] * 20]
    (tmp_path / "7" / "stat").write_text(f"7 (odd) name) {' '.join(fields)}\n")
    assert cpu_seconds([7, 8], proc=tmp_path) == {7: 4.0}
    assert cpu_used({7: 4.0, 9: 1.0}, {7: 5.25}) == {"7": 1.25}
    # This very process: it has used some CPU, and the reading only grows.
    first = cpu_seconds([os.getpid()])[os.getpid()]
    sum(i * i for i in range(200_000))
    assert cpu_seconds([os.getpid()])[os.getpid()] >= first > 0


def open_run(requests: int, errors: int, cpu_by_pid: dict[str, float]) -> dict[str, Any]:
    return {
        "requests": requests,
        "errors": errors,
        "achieved_rps": requests / 2,
        "p50_ms": 2.0,
        "p99_ms": 9.0,
        "fallbacks": 1,
        "cpu_seconds": cpu_by_pid,
    }


OURS_STACK = cpu.Stack({1: "serve run", 2: "ray::ServeReplica:rankgate:RankIngress", 3: "valkey"})
FLOOR_STACK = cpu.Stack({10: "python -m loadtests.baselines.plain_fastapi", 3: "valkey"})


def cpu_part(ours_ms: tuple[float, float], floor_ms: tuple[float, float]) -> dict[str, Any]:
    """Two rounds of 1,000 answered requests, CPU spread over each stack's processes."""
    rounds: dict[str, list[dict[str, Any]]] = {"rankgate": [], "plain_fastapi": []}
    for ours, floor in zip(ours_ms, floor_ms, strict=True):
        # ms per decision × 1,000 decisions = that many seconds / 1,000 × 1,000.
        rankgate = {"1": 0.1 * ours, "2": 0.8 * ours, "3": 0.1 * ours}
        plain = {"10": 0.9 * floor, "3": 0.1 * floor}
        rounds["rankgate"].append(cpu.round_figures(open_run(1010, 10, rankgate), OURS_STACK))
        rounds["plain_fastapi"].append(cpu.round_figures(open_run(1000, 0, plain), FLOOR_STACK))
    stacks = {"rankgate": OURS_STACK, "plain_fastapi": FLOOR_STACK}
    return cpu.cpu_figures(250.0, "a fixed rate", 4.0, rounds, stacks)


def test_cpu_per_decision_is_per_answered_request_and_its_ratio_per_round() -> None:
    figures = cpu_part(ours_ms=(4.0, 3.0), floor_ms=(2.0, 1.0))
    ours = figures["systems"]["rankgate"]
    # 1,010 requests, 10 of them errors: 1,000 answered.
    assert ours["ms_per_decision"]["per_round"] == [4.0, 3.0]
    assert ours["answered"] == 2000 and ours["errors"] == 20
    assert figures["ratio"]["per_round"] == [2.0, 3.0]
    assert figures["ratio"]["median"] == 2.5
    replica, *_ = ours["breakdown"]
    assert replica == {
        "process": "ray::ServeReplica:rankgate:RankIngress",
        "count": 1,
        "ms_per_decision": 2.8,
    }
    assert {row["process"] for row in ours["breakdown"]} == {
        "serve run",
        "ray::ServeReplica:rankgate:RankIngress",
        "valkey",
    }
    target = cpu.cpu_target(figures)
    assert target["met"] is False
    assert "rankgate 3.5 ms vs floor 1.5 ms" in target["figure"]
    assert "2.5× (2–3)" in target["figure"]
    assert cpu.cpu_target(cpu_part((1.2, 1.2), (1.0, 1.0)))["met"] is True
    assert cpu.cpu_target(None)["met"] is None


def bench_report(
    cpu_ratio: tuple[float, float], peak: float, p50_c1: float, **changes: Any
) -> dict[str, Any]:
    """A report with the figures the guard reads, as run.py writes them."""
    ours_p50 = 2.0 * p50_c1
    report: dict[str, Any] = {
        "measured_at": "2026-12-01T10:00:00+00:00",
        "command": "rankgate bench",
        "machine": {"cores": 2},
        "rounds": 2,
        "duration_s": 6.0,
        "results": {
            "rankgate": [{"concurrency": 1, "p50_ms": ours_p50, "p99_ms": 5.0}],
            "plain_fastapi": [{"concurrency": 1, "p50_ms": 2.0, "p99_ms": 3.0}],
        },
        "ratios": {"1": {"p50": {"median": p50_c1, "min": p50_c1, "max": p50_c1}}},
        "peak": {
            "systems": {
                "rankgate": {"rps": 500 * peak, "concurrency": 8},
                "plain_fastapi": {"rps": 500.0, "concurrency": 8},
            },
            "ratio": peak,
            "ratio_spread": {"median": peak, "min": peak, "max": peak},
        },
        "cpu": cpu_part(cpu_ratio, (1.0, 1.0)),
        "memory": {"pss_total_mib": 900.0, "rss_total_mib": 1800.0, "count": 20},
        "ready": {"median_s": 12.0, "starts_s": [12.0]},
    }
    report.update(changes)
    return report


# -- the comparison -------------------------------------------------------------


def test_a_worse_ratio_fails_and_one_within_tolerance_passes() -> None:
    committed = compare.headline(bench_report((2.0, 2.0), peak=0.5, p50_c1=2.0))
    assert committed == {"cpu_per_decision": 2.0, "peak_throughput": 0.5, "p50_c1": 2.0}
    # 10 % worse on every figure: within the default 15 %.
    within = compare.headline(bench_report((2.2, 2.2), peak=0.45, p50_c1=2.2))
    verdicts = compare.compare(committed, within)
    assert [v.regressed for v in verdicts] == [False, False, False]
    assert [v.worse_by for v in verdicts] == [0.1, 0.1, 0.1]
    # CPU per decision 30 % worse, peak 20 % lower: both regress; p50 improved.
    worse = compare.headline(bench_report((2.6, 2.6), peak=0.4, p50_c1=1.5))
    verdicts = compare.compare(committed, worse)
    assert {v.key: v.regressed for v in verdicts} == {
        "cpu_per_decision": True,
        "peak_throughput": True,
        "p50_c1": False,
    }
    assert verdicts[2].worse_by == -0.25
    # A wider tolerance for one figure lets it pass.
    tolerances = compare.parse_tolerances("cpu_per_decision=35")
    assert [v.regressed for v in compare.compare(committed, worse, tolerances)][:2] == [
        False,
        True,
    ]


def test_a_figure_missing_from_either_run_is_not_compared() -> None:
    old = {"cpu_per_decision": None, "peak_throughput": 0.5, "p50_c1": 2.0}
    new = {"cpu_per_decision": 2.0, "peak_throughput": 0.5, "p50_c1": None}
    verdicts = {v.key: v for v in compare.compare(old, new)}
    assert verdicts["cpu_per_decision"].regressed is None
    assert verdicts["p50_c1"].regressed is None
    assert verdicts["peak_throughput"].regressed is False


def test_the_failure_names_each_regressed_figure_and_its_tolerance() -> None:
    committed = bench_report((2.0, 2.0), peak=0.5, p50_c1=2.0)
    current = bench_report((3.0, 3.0), peak=0.5, p50_c1=2.1)
    found = compare.comparison(
        committed, Path("loadtests/results/bench.json"), current, compare.parse_tolerances("15")
    )
    assert found["regressed"] == ["cpu_per_decision"]
    message = compare.failure(found)
    assert message == (
        "regressed against loadtests/results/bench.json:\n"
        "  CPU per decision, rankgate / floor: 2× → 3×, 50.0 % worse (tolerance 15 %): REGRESSED"
    )
    # The report says it too, for every figure.
    text = "\n".join(compare.comparison_markdown(found))
    assert "## Against the committed run" in text
    assert "- p50 at concurrency 1, rankgate / floor: 2× → 2.1×, 5.0 % worse (tolerance 15 %)" in (
        text
    )
    # Nothing in common to compare: that fails too, rather than passing unseen.
    empty = compare.comparison({}, Path("old.json"), current, compare.parse_tolerances("15"))
    assert "nothing to compare" in (compare.failure(empty) or "")
    passing = compare.comparison(committed, Path("x"), committed, compare.parse_tolerances("15"))
    assert compare.failure(passing) is None


def test_tolerances_are_percent_for_all_or_per_figure() -> None:
    assert compare.parse_tolerances("15") == dict.fromkeys(compare.KEYS, 0.15)
    assert compare.parse_tolerances("p50_c1=25, 10") == {
        "cpu_per_decision": 0.1,
        "peak_throughput": 0.1,
        "p50_c1": 0.1,
    }
    assert compare.parse_tolerances("peak_throughput=30")["peak_throughput"] == 0.3
    for bad, why in (("cpu=5", "unknown figure 'cpu'"), ("x", "'x' is not a percentage")):
        with pytest.raises(ValueError, match=why):
            compare.parse_tolerances(bad)


def test_bad_compare_and_tolerance_options_name_the_option(tmp_path: Path) -> None:
    def options(**changes: Any) -> BenchOptions:
        fields: dict[str, Any] = {
            "concurrency": None,
            "duration": None,
            "repeats": 1,
            "warmup": 1.0,
            "extras": "",
            "skip": "",
            "driver": "auto",
            "allow_install": False,
            "output": None,
            "overload": False,
            "freshness": False,
            "explain_sampling": False,
        }
        return BenchOptions(**(fields | changes))

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"sizes": []}))
    (tmp_path / "bench.json").write_text(json.dumps(bench_report((2, 2), 0.5, 2.0)))
    for changes, why in (
        ({"compare": tmp_path / "bad.json"}, "--compare: .*bad.json is not JSON"),
        ({"compare": tmp_path / "other.json"}, "--compare: .* is not a report of `rankgate bench`"),
        ({"compare": tmp_path / "bench.json", "overload": True}, "not --overload"),
        ({"tolerance": "fast"}, "--tolerance: 'fast' is not a percentage"),
        ({"soak": "10 minutes"}, "--soak: '10 minutes' is not a duration like 30s"),
        ({"soak": "30s"}, "--soak: '30s' is too short"),
        ({"soak": "2m", "soak_faults": "redis_kill,meteor"}, "--soak-faults: unknown meteor"),
        ({"soak": "2m", "soak_share": 150.0}, "--soak-share: 150.0 is not a percent"),
        ({"soak": "2m", "soak_faults": "node_loss"}, "node_loss needs the multi-node variant"),
        (
            {"soak": "2m", "soak_nodes": 2, "soak_faults": "haproxy_reload"},
            "haproxy_reload does not apply to the multi-node variant",
        ),
        ({"compare": tmp_path / "bench.json", "soak": "2m"}, "not --soak"),
    ):
        with pytest.raises(RankgateError, match=why):
            chosen = options(**changes)
            chosen.soak_plan()
            chosen.committed()
            chosen.tolerances()
    assert options(soak="1h", soak_faults="redis_kill, canary").soak_plan() == (
        3600.0,
        ("redis_kill", "canary"),
    )
    _, on_nodes = options(soak="1h", soak_nodes=2).soak_plan() or (0, ())
    assert "node_loss" in on_nodes and "haproxy_reload" not in on_nodes
    path, report = options(compare=tmp_path / "bench.json").committed() or (None, {})
    assert path == tmp_path / "bench.json" and report["rounds"] == 2


def test_check_regressions_is_the_commands_error(tmp_path: Path) -> None:
    committed = bench_report((2.0, 2.0), peak=0.5, p50_c1=2.0)
    current = bench_report((2.1, 2.1), peak=0.3, p50_c1=2.0)
    tolerances = compare.parse_tolerances("15")
    figures = tmp_path / "bench.json"
    found = compare.comparison(committed, Path("committed.json"), current, tolerances)
    figures.write_text(json.dumps({**current, "comparison": found}))
    with pytest.raises(RankgateError, match=r"peak throughput .*: 0.5× → 0.3×, 40.0 % worse"):
        check_regressions(figures)
    figures.write_text(json.dumps(current))  # no --compare: nothing to check
    check_regressions(figures)
    # A soak's failed verdict is the command's error too.
    soak = tmp_path / "soak.json"
    soak.write_text(json.dumps({"verdicts": {"audit: 0 missing": True, "events: 0 lost": False}}))
    with pytest.raises(RankgateError, match="soak: events: 0 lost failed"):
        check_regressions(soak)


# -- history and the README --------------------------------------------------------


def test_history_keeps_the_last_runs_with_their_commit(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    for n in range(5):
        report = bench_report((2.0 + n, 2.0 + n), peak=0.5, p50_c1=2.0)
        compare.append_history(history, compare.history_entry(report, f"c{n}"), keep=3)
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert [line["commit"] for line in lines] == ["c2", "c3", "c4"]
    assert lines[-1]["cpu_per_decision"] == 6.0
    assert lines[-1]["peak_throughput"] == 0.5 and lines[-1]["p50_c1"] == 2.0
    assert compare.commit_of(None) == "unknown"
    assert compare.commit_of(tmp_path) == "unknown"  # not a git checkout
    commit = compare.commit_of(REPO)
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40


def test_the_readme_table_is_what_the_committed_run_renders() -> None:
    committed = json.loads((REPO / "loadtests" / "results" / "bench.json").read_text())
    text = (REPO / "README.md").read_text()
    assert readme.table_in(text) == readme.performance_table(committed), (
        "README.md's performance table differs from loadtests/results/bench.json: a run of "
        "`rankgate bench` into loadtests/results/ rewrites it (loadtests/bench/readme.py)"
    )


def test_the_readme_table_judges_each_figure(tmp_path: Path) -> None:
    report = bench_report((1.2, 1.2), peak=0.5, p50_c1=2.0)
    table = readme.performance_table(report)
    assert (
        "| CPU per decision, every process of the stack (250 req/s, open loop) | 1.2 ms " in table
    )
    assert "| 1.2× (1.2–1.2) | ≤ 1.3×: met |" in table
    assert "| 250 req/s | 500 req/s | 0.5× (0.5–0.5) | ≥ 1×: MISSED |" in table
    assert "| memory of the whole stack (PSS) | 900 MiB |  |  | ≤ 1024 MiB (1.0 GiB): met |" in (
        table
    )
    page = tmp_path / "README.md"
    page.write_text(f"# x\n\n{readme.START}\nold\n{readme.END}\n\nrest\n")
    assert readme.refresh_readme(page, report)
    assert page.read_text() == f"# x\n\n{table}\n\nrest\n"
    (tmp_path / "other.md").write_text("no markers\n")
    assert not readme.refresh_readme(tmp_path / "other.md", report)
    # The report's section: both systems and where each one's CPU goes.
    section = "\n".join(cpu.cpu_markdown(report["cpu"]))
    assert "Ratio rankgate / floor per round: **1.2× (1.2–1.2)** (target ≤ 1.3×)" in section
    assert "| rankgate | 1.2 [1.2, 1.2] | 3 | 505.0 | 9.0 | 2000 | 2 | 20 |" in section
    assert "| ray::ServeReplica:rankgate:RankIngress | 1 | 0.96 |" in section


# -- the seeded regression and a real run that catches it ------------------------------


def test_the_seeded_busy_loop_is_inert_unless_asked_for_and_checked() -> None:
    from rankgate.core.errors import ConfigError
    from serving.ranking.pipeline import TEST_STAGE_BUSY_ENV, seed_busy_loop
    from serving.ranking.stages import StageRunner, stage_class

    def runner() -> StageRunner:
        return StageRunner(
            [stage_class(name)(None) for name in ("gate", "score")],  # type: ignore[arg-type]
            stage_class("rules")(None),  # type: ignore[arg-type]
        )

    unset = runner()
    seed_busy_loop(unset, {})
    assert all("run" not in vars(stage) for stage in unset.stages)
    seeded = runner()
    seed_busy_loop(seeded, {TEST_STAGE_BUSY_ENV: "score=5"})
    assert ["run" in vars(stage) for stage in seeded.stages] == [False, True]
    for bad in ("fetch=5", "score", "score=x", "score=-1"):
        with pytest.raises(ConfigError, match=f"{TEST_STAGE_BUSY_ENV}=.*configured stages"):
            seed_busy_loop(runner(), {TEST_STAGE_BUSY_ENV: bad})


@pytest.mark.slow
def test_the_guard_catches_a_busy_loop_seeded_into_a_stage(
    ready_home: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's measurement, small: rankgate and the floor at concurrency 1 and CPU
    per decision, one round of 2 s each, nothing else; once as the code is, once with
    rankgate's `score` stage spinning 10 ms of CPU per request
    (RANKGATE_TEST_STAGE_BUSY_MS, read by the replicas; unset everywhere else). Each
    run starts its own servers: about two minutes in all, three with the session's
    setup. The CPU part runs at a fixed 40 req/s, which the slowed server still keeps
    up with, so the seeded cost shows as CPU per answer rather than as fallbacks.
    Measured on a busy 2-core machine, the seeded loop made the CPU ratio 76 % worse
    (4.7× -> 8.3×) and p50's 430 % (2.1× -> 10.9×): far past the 15 % tolerance, so
    the machine's noise can neither hide it nor fake it."""
    from loadtests.bench.run import PARTS, run_bench
    from serving.ranking.pipeline import TEST_STAGE_BUSY_ENV

    monkeypatch.delenv(TEST_STAGE_BUSY_ENV, raising=False)
    lines: list[str] = []
    settings: dict[str, Any] = {
        "levels": [1],
        "duration": 2.0,
        "repeats": 1,
        "say": lines.append,
        "warmup": 0.5,
        "skip": tuple(part for part in PARTS if part != "cpu"),
        "allow_install": False,
        "fixed_rate": 40.0,
    }
    committed = run_bench(output=tmp_path / "committed", **settings)
    before = compare.headline(committed)
    assert before["cpu_per_decision"] and before["p50_c1"], lines

    monkeypatch.setenv(TEST_STAGE_BUSY_ENV, "score=10")
    current = run_bench(
        output=tmp_path / "current",
        committed=(tmp_path / "committed" / "bench.json", committed),
        tolerances=compare.parse_tolerances("15"),
        **settings,
    )
    after = compare.headline(current)
    found = current["comparison"]
    assert {"cpu_per_decision", "p50_c1"} <= set(found["regressed"]), (before, after, lines)
    # The loop's 10 ms are CPU spent in the replica, per answer.
    replica = "ray::ServeReplica:rankgate:RankIngress"

    def replica_ms(report: dict[str, Any]) -> float:
        rows = report["cpu"]["systems"]["rankgate"]["breakdown"]
        return float(next(r["ms_per_decision"] for r in rows if r["process"] == replica))

    assert replica_ms(current) - replica_ms(committed) > 7.0, (before, after)
    with pytest.raises(RankgateError, match=r"(?s)--compare: regressed against .*CPU per decision"):
        check_regressions(tmp_path / "current" / "bench.json")
    history = (tmp_path / "current" / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["regressed"] == found["regressed"]
    assert "## Against the committed run" in (tmp_path / "current" / "bench.md").read_text()
