"""The benchmark's pure parts: wrk's summary, ratios and peaks, open-loop accounting,
memory totals and the report's targets. No server is started here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.bench import memory, wrk
from loadtests.bench import others as bench_others
from loadtests.bench import report as bench_report
from loadtests.bench.run import phases_seen
from loadtests.drive import Arrival, open_loop_summary

WRK_STDOUT = """Running 6s test @ http://127.0.0.1:4000/v1/rank
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    1.20ms  40.00ms   90.00%
  1200 requests in 6.00s, 1.2MB read
  Non-2xx or 3xx responses: 3
Requests/sec:    200.00
RANKGATE_WRK {"requests":1200,"duration_us":6000000,"socket_errors":{"connect":0,"read":1,"write":0,"timeout":1},"status_errors":3,"latency_us":{"50":2500.0,"99":9000.0,"99.9":15250.0},"latency_mean_us":3100.0,"latency_max_us":40000.0,"outcomes":{"personalized":1190,"fallback:budget_exhausted":7,"http_503":3}}
"""


def test_wrk_summary_is_read_from_its_marked_line() -> None:
    raw = wrk.parse_output(WRK_STDOUT)
    figures = wrk.summarize(raw, concurrency=4)
    assert figures["driver"] == "wrk"
    assert figures["requests"] == 1200
    assert figures["throughput_rps"] == 200.0
    assert (figures["p50_ms"], figures["p99_ms"], figures["p999_ms"]) == (2.5, 9.0, 15.25)
    # Non-2xx answers and socket errors are both errors.
    assert figures["errors"] == 3 + 2
    assert figures["ok"] == 1197
    assert figures["outcomes"]["fallback:budget_exhausted"] == 7
    assert figures["outcomes"]["socket_error"] == 2


def test_wrk_without_a_summary_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no summary line"):
        wrk.parse_output("Running 6s test\nRequests/sec: 1.0\n")


def test_the_lua_script_carries_every_body_and_the_key_safely() -> None:
    bodies = [json.dumps({"user_id": "u-1", "note": "a]]b"}).encode(), b'{"user_id": "u-2"}']
    script = wrk.lua_script(bodies, "key-123")
    # A body containing "]]" gets a long bracket of a higher level.
    assert '[=[{"user_id": "u-1", "note": "a]]b"}]=]' in script
    assert '[[{"user_id": "u-2"}]]' in script
    assert "[[key-123]]" in script
    assert '"RANKGATE_WRK "' in script
    assert "latency:percentile(q)" in script
    for q in ("50", "99", "99.9"):
        assert q in script
    assert wrk.lua_long_string("x]=]y]]") == "[==[x]=]y]]]==]"


def test_wrk_reads_whole_seconds() -> None:
    command = wrk.wrk_command("wrk", "http://h/v1/rank", 8, 2.5, Path("s.lua"))
    assert command[:4] == ["wrk", "-t1", "-c8", "-d3s"]


def run(level: int, rps: float, p50: float, p99: float, **outcomes: int) -> dict[str, Any]:
    return {
        "concurrency": level,
        "throughput_rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p99 * 1.5,
        "errors": 0,
        "requests": int(rps * 6),
        "outcomes": {k.replace("__", ":"): v for k, v in outcomes.items()} or {"ranked": 1},
    }


def test_ratios_are_taken_within_each_round() -> None:
    ours = [run(1, 100, 2.0, 4), run(1, 90, 3.0, 4), run(1, 120, 2.0, 4)]
    floor = [run(1, 200, 1.0, 2), run(1, 100, 2.0, 2), run(1, 150, 1.0, 2)]
    figures = bench_report.ratios(ours, floor)
    assert figures["throughput"]["per_round"] == [0.5, 0.9, 0.8]
    assert figures["throughput"]["median"] == 0.8
    assert (figures["throughput"]["min"], figures["throughput"]["max"]) == (0.5, 0.9)
    assert figures["p50"]["per_round"] == [2.0, 1.5, 2.0]
    assert figures["p50"]["median"] == 2.0


def test_median_row_keeps_the_spread_and_adds_up_answers() -> None:
    row = bench_report.median_row(
        [
            run(8, 100, 5, 20, personalized=10),
            run(8, 300, 4, 30, personalized=5, fallback__budget_exhausted=1),
            run(8, 200, 6, 10, personalized=7),
        ]
    )
    assert row["throughput_rps"] == 200
    assert row["throughput_rps_spread"] == [100, 300]
    assert row["p99_ms"] == 20
    assert row["outcomes"] == {"personalized": 22, "fallback:budget_exhausted": 1}


def test_peak_is_the_best_level_within_p99_and_its_ratio_has_a_spread() -> None:
    runs = {
        "rankgate": {
            "1": [run(1, 100, 1, 3), run(1, 110, 1, 3)],
            "8": [run(8, 400, 10, 40), run(8, 500, 10, 60)],
            "32": [run(32, 600, 40, 120), run(32, 650, 40, 130)],
        },
        "plain_fastapi": {
            "1": [run(1, 200, 1, 2), run(1, 200, 1, 2)],
            "8": [run(8, 500, 5, 20), run(8, 500, 5, 20)],
            "32": [run(32, 700, 20, 80), run(32, 700, 20, 80)],
        },
    }
    rows = {
        name: [bench_report.median_row(r) for r in levels.values()] for name, levels in runs.items()
    }
    # rankgate's c=8 median p99 is 50 ms: within; c=32 is not.
    assert bench_report.peak(rows["rankgate"]) == {"rps": 450, "concurrency": 8}
    found = bench_report.peaks(runs, rows)
    assert found["ratio_of_medians"] == 0.9
    # Round 1: 400/500; round 2: c=8 had p99 60 ms, so c=1's 110 is that round's peak.
    assert found["ratio_spread"]["per_round"] == [0.8, 0.22]
    # Judged like the other ratios: within each round, the median over rounds.
    assert found["ratio"] == 0.51


def test_a_level_with_errors_is_no_peak() -> None:
    broken = {**run(8, 900, 5, 10), "errors": 3}
    assert bench_report.peak([run(1, 100, 1, 2), broken]) == {"rps": 100, "concurrency": 1}
    assert bench_report.peak([broken]) == {"rps": 0.0, "concurrency": None}


def test_budget_fallbacks_count_only_levels_up_to_16() -> None:
    levels = {
        "1": [run(1, 1, 1, 1, fallback__budget_exhausted=1)],
        "16": [run(16, 1, 1, 1, fallback__budget_exhausted=2)] * 2,
        "32": [run(32, 1, 1, 1, fallback__budget_exhausted=50)],
    }
    assert bench_report.budget_fallbacks(levels, 16) == 5


def test_open_loop_latency_counts_from_when_a_request_was_due() -> None:
    # 10 requests due every 10 ms; the server answers in 2 ms, but the 6th waited
    # 30 ms behind a stall and the driver sent the 4th 3 ms late.
    arrivals = []
    for i in range(10):
        due = i * 0.010
        sent = due + (0.003 if i == 3 else 0.0)
        done = sent + (0.032 if i == 5 else 0.002)
        outcome = "fallback:budget_exhausted" if i == 5 else "personalized"
        arrivals.append(Arrival(due, sent, done, outcome))
    arrivals.append(Arrival(0.1, 0.1, 0.102, "http_503"))
    figures = open_loop_summary(arrivals, rate=100.0, duration_s=0.1, max_outstanding=2)
    assert figures["requests"] == 11
    assert figures["p50_ms"] == pytest.approx(2.0)
    # The 4th: 3 ms late + 2 ms = 5 ms from due; the 6th: 32 ms.
    assert figures["p99_ms"] == pytest.approx(32.0)
    assert figures["errors"] == 1
    assert figures["fallbacks"] == 1 and figures["budget_fallbacks"] == 1
    assert figures["driver_lag_ms"]["max"] == pytest.approx(3.0)
    assert figures["sent_late_share"] == pytest.approx(1 / 11, abs=1e-4)
    # 11 answers between t=0 and the last one done at 102 ms.
    assert figures["achieved_rps"] == pytest.approx(11 / 0.102, abs=0.1)
    assert figures["max_outstanding"] == 2


def test_open_loop_latency_includes_queueing_behind_a_slow_server() -> None:
    # Due every 10 ms, each answered 15 ms after the previous: the wait piles up.
    arrivals, free_at = [], 0.0
    for i in range(5):
        due = i * 0.010
        free_at = max(free_at, due) + 0.015
        arrivals.append(Arrival(due, due, free_at, "personalized"))
    latencies = sorted(round((a.done - a.due) * 1000, 3) for a in arrivals)
    assert latencies == [15.0, 20.0, 25.0, 30.0, 35.0]
    assert open_loop_summary(arrivals, 100.0, 0.05)["p99_ms"] == 35.0


def test_memory_totals_of_rss_and_pss() -> None:
    mib = memory.MIB
    processes = [
        memory.ProcessMemory(1, "serve run", 200 * mib, 120 * mib),
        memory.ProcessMemory(2, "ray::ServeReplica:rankgate:RankIngress", 500 * mib, 300 * mib),
        memory.ProcessMemory(3, "valkey-server", 15 * mib, None),
    ]
    figures = memory.aggregate(processes)
    assert figures["count"] == 3
    assert figures["rss_total_mib"] == 715.0
    assert figures["pss_total_mib"] == 420.0
    assert figures["pss_missing"] == 1
    assert [p["pid"] for p in figures["processes"]] == [2, 1, 3]
    assert figures["processes"][2]["pss_mib"] is None


def test_pss_is_read_from_smaps_rollup(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "smaps_rollup").write_text(
        "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  2048 kB\nPss:  1024 kB\n"
    )
    assert memory.pss_bytes(42, proc=tmp_path) == 1024 * 1024
    assert memory.pss_bytes(43, proc=tmp_path) is None


def test_process_labels() -> None:
    label = memory.process_label
    assert label("ray::ServeRepli", ["ray::ServeReplica:rankgate:RankIngress"]) == (
        "ray::ServeReplica:rankgate:RankIngress"
    )
    assert label("python3", ["/v/bin/python3", "/v/bin/serve", "run", "c.yaml"]) == "serve run"
    assert label("python3", ["/v/bin/python3", "-u", "/x/dashboard.py", "--port=1"]) == (
        "python dashboard.py"
    )
    assert label("python", ["python", "-m", "loadtests.baselines.plain_fastapi"]) == (
        "python -m loadtests.baselines.plain_fastapi"
    )
    assert label("python3", ["/v/python3", "-B", "-c", "from a import main; main(1)"]) == (
        "python -c from a import main"
    )
    assert label("valkey-server", ["/x/valkey-server 127.0.0.1:1"]) == "valkey-server"
    assert label("haproxy", []) == "haproxy"


def synthetic_report(**changes: Any) -> dict[str, Any]:
    """A small report as loadtests/bench/run.py builds it: two levels, two rounds."""
    runs = {
        "rankgate": {
            "1": [run(1, 600, 1.6, 4.0), run(1, 580, 1.8, 4.5)],
            "16": [run(16, 1900, 8.0, 30.0), run(16, 1850, 8.5, 35.0)],
        },
        "plain_fastapi": {
            "1": [run(1, 700, 1.2, 3.0), run(1, 690, 1.3, 3.0)],
            "16": [run(16, 2000, 7.0, 25.0), run(16, 2000, 7.0, 25.0)],
        },
    }
    results = {
        name: [bench_report.median_row(r) for r in levels.values()] for name, levels in runs.items()
    }
    report: dict[str, Any] = {
        "measured_at": "2026-01-01T00:00:00+00:00",
        "command": "rankgate bench --duration 6",
        "machine": {
            "cores": 2,
            "platform": "Linux",
            "python": "3.11",
            "ray": "2",
            "onnxruntime": "1",
            "load_1min_start": 1.5,
            "load_1min_end": 2.25,
        },
        "driver": {"closed_loop": "wrk", "why": "wrk found on PATH", "open_loop": "python"},
        "duration_s": 6.0,
        "warmup_s": 1.5,
        "rounds": 2,
        "concurrency": [1, 16],
        "systems": {"rankgate": "rankgate", "plain_fastapi": "floor"},
        "results": results,
        "ratios": {
            level: bench_report.ratios(runs["rankgate"][level], runs["plain_fastapi"][level])
            for level in ("1", "16")
        },
        "peak": bench_report.peaks(runs, results),
        "budget_fallbacks": 0,
        "explain": {
            "p50_without_ms": 1.7,
            "p50_with_ms": 4.9,
            "p99_with_ms": 8.0,
            "added_ms": bench_report.spread([3.1, 3.3], 2),
            "outcomes": {"personalized": 10},
        },
        "memory": {
            "measured": "After the load rounds",
            **memory.aggregate(
                [memory.ProcessMemory(1, "serve run", 1000 * memory.MIB, 600 * memory.MIB)]
            ),
        },
        "ranker": None,
        "ready": {
            "starts_s": [11.0, 12.0],
            "median_s": 11.5,
            "phases": [{"setup checked": 2.5, "Ray started": 6.0}, {"setup checked": 2.0}],
        },
        "skipped": ["ranker"],
        "notes": ["a note"],
    }
    report.update(changes)
    report["targets"] = bench_report.evaluate(report)
    return report


def target_line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"- {start}"))


def test_the_report_says_which_targets_are_met() -> None:
    text = bench_report.render_markdown(synthetic_report())
    # p50 at c=1: 1.7 ms ≤ 2 ms; against the floor 1.4× (median of 1.333 and 1.385) ≤ 1.5×.
    assert target_line(text, "p50 at concurrency 1, end").endswith("**met**")
    assert target_line(text, "p50 at concurrency 1 against").endswith("**met**")
    assert target_line(text, "p99 at concurrency 1").endswith("**met**")
    # Peak: 1875 vs 2000 req/s = 0.9375×, short of 1×.
    assert "0.938×" in target_line(text, "peak throughput")
    assert target_line(text, "peak throughput").endswith("**MISSED**")
    assert target_line(text, "budget fallbacks").endswith("**met**")
    # Explain adds 3.2 ms > 2 ms.
    assert target_line(text, "`explain: true`").endswith("**MISSED**")
    assert target_line(text, "ranker under load").endswith("**not measured**")
    # Judged on PSS: 600 MiB ≤ 1 GiB (RSS 1000 MiB beside it).
    assert "600 MiB PSS (1000 MiB RSS)" in target_line(text, "whole stack PSS")
    assert target_line(text, "whole stack PSS").endswith("**met**")
    assert target_line(text, "CPU per decision").endswith("**not measured**")
    assert target_line(text, "ready after").endswith("**met**")
    assert "Command: `rankgate bench --duration 6`" in text
    assert "Closed-loop load: **wrk**" in text
    assert "at the start and end of the run: 1.5 and 2.25." in text
    assert "| 1 | 590 | 1.7 | 4.25 | 695 | 1.25 |" in text
    assert "- a note" in text
    assert "| start | setup checked | Ray started | answers 200 |" in text
    assert "| 2 | 2 | — | 12 |" in text


def test_ready_phases_are_taken_from_the_servers_output() -> None:
    seen: dict[str, float] = {}
    phases_seen("nothing to do\nserving /h/ray/serve_config.yaml (Ctrl-C stops)\n", seen, 1.234)
    phases_seen("serving ...\nINFO -- Started a local Ray instance. View ...\n", seen, 5.0)
    assert seen == {"setup checked": 1.23, "Ray started": 5.0}


def test_missed_targets_say_missed() -> None:
    report = synthetic_report(
        budget_fallbacks=4,
        ready={"starts_s": [20.0, 22.0], "median_s": 21.0},
        memory={
            "measured": "After the load rounds",
            **memory.aggregate(
                [
                    memory.ProcessMemory(1, "serve run", 2000 * memory.MIB, 900 * memory.MIB),
                    memory.ProcessMemory(2, "valkey-server", 15 * memory.MIB, None),
                ]
            ),
        },
        ranker={
            "concurrency": 16,
            "rows_per_request": 79,
            "batching": {},
            "rounds": 1,
            "duration_s": 5,
            "under_load": [{"rows_per_s": 50.0, "mean_batch_requests": 8.0}],
            "raw": [{"rows_per_s": 100.0, "rows": 632}],
            "under_load_rows_per_s": 50.0,
            "raw_rows_per_s": 100.0,
            "mean_batch_requests": 8.0,
            "ratio": bench_report.spread([0.5]),
        },
    )
    text = bench_report.render_markdown(report)
    assert target_line(text, "budget fallbacks").endswith("**MISSED**")
    assert target_line(text, "ready after").endswith("**MISSED**")
    # 900 MiB PSS is within 1 GiB, but one process's PSS could not be read: no verdict.
    line = target_line(text, "whole stack PSS")
    assert "900 MiB PSS (2015 MiB RSS) over 2 processes, PSS unread for 1" in line
    assert line.endswith("**not measured**")
    assert target_line(text, "ranker under load").endswith("**MISSED**")
    assert {t["key"]: t["met"] for t in report["targets"]}["ranker_ratio"] is False


def test_a_floor_without_a_peak_leaves_the_ratio_undecided() -> None:
    slow = {
        "rankgate": {"1": [run(1, 100, 1, 3)]},
        "plain_fastapi": {"1": [run(1, 200, 1, 90)]},
    }
    rows = {n: [bench_report.median_row(r) for r in lv.values()] for n, lv in slow.items()}
    report = synthetic_report(peak=bench_report.peaks(slow, rows))
    line = target_line(bench_report.render_markdown(report), "peak throughput")
    assert "floor none (no level had p99 ≤ 50 ms" in line
    assert line.endswith("**not measured**")


def test_the_cpu_rate_is_half_the_lower_peak_so_neither_system_is_overloaded() -> None:
    from loadtests.bench.figures import FLOOR, OURS
    from loadtests.bench.run import cpu_rate

    def rows(*levels: tuple[int, float, float]) -> list[dict[str, Any]]:
        return [
            {"concurrency": c, "throughput_rps": rps, "p99_ms": p99, "errors": 0}
            for c, rps, p99 in levels
        ]

    floor = rows((1, 900.0, 3.0), (4, 1200.0, 6.0))
    slow = {OURS: rows((1, 450.0, 8.0), (8, 576.0, 40.0)), FLOOR: floor}
    rate, source = cpu_rate(slow)
    assert rate == 288.0 and "rankgate's peak" in source
    fast = {OURS: rows((1, 700.0, 2.0), (8, 1500.0, 30.0)), FLOOR: floor}
    rate, source = cpu_rate(fast)
    assert rate == 600.0 and "the floor's peak" in source


def test_two_replicas_are_set_against_one_and_the_floor() -> None:
    rows = {
        "rankgate": [run(1, 200, 2, 8), run(8, 300, 20, 45), run(16, 320, 40, 70)],
        "rankgate_two_replicas": [run(1, 210, 2, 8), run(8, 450, 15, 48), run(16, 500, 30, 60)],
        "plain_fastapi": [run(1, 500, 1, 3), run(8, 900, 8, 30), run(16, 880, 16, 60)],
    }
    line = bench_others.two_replicas_line(rows)
    # The peaks: two replicas 450 at c=8 (c=16 is past 50 ms), one 300, the floor 900.
    assert line.startswith("- Two ingress replicas: peak 450 req/s at c=8, 1.50× one replica's")
    assert "0.50× the floor's (900)" in line
    assert "c=1: 1.05×; c=8: 1.50×; c=16: 1.56×" in line
    none = {**rows, "rankgate_two_replicas": [run(8, 450, 15, 80)]}
    assert "no level with p99" in bench_others.two_replicas_line(none)


def test_the_bench_config_of_two_replicas_changes_only_the_ingress_count(tmp_path: Path) -> None:
    from rankgate.core.home import Home
    from serving.ops.launch import derived_config
    from serving.ops.serve_config import ServeConfig

    home = Home(tmp_path / "home")
    one = ServeConfig.read(derived_config(home, port=8123, name="one"))
    two = ServeConfig.read(derived_config(home, port=8123, name="two", ingress_replicas=2))
    assert two.ingress["num_replicas"] == 2
    assert {**two.ingress, "num_replicas": one.ingress["num_replicas"]} == one.ingress
    assert (
        two.document["applications"][0]["deployments"][1:]
        == one.document["applications"][0]["deployments"][1:]
    )


def test_a_server_answering_only_fallbacks_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import http.server
    import subprocess
    import sys
    import threading

    from loadtests.bench import systems

    fallback = {"reason": "model_unavailable", "strategy": "popularity", "detail": "no v2"}
    answers: Iterator[dict[str, Any]] = iter(
        [{"items": [{"item_id": 1}], "fallback": fallback}] * 10**6
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps(next(answers)).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(systems, "FALLBACK_GRACE_S", 0.3)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/rank"
    try:
        with pytest.raises(RuntimeError, match=r"fallback model_unavailable \(no v2\)"):
            systems.wait_ready(url, {}, process, tmp_path / "log", "key", interval_s=0.05)
        answers = iter([{"items": [{"item_id": 1}], "fallback": fallback}, {"items": [1]}])
        systems.wait_ready(url, {}, process, tmp_path / "log", "key", interval_s=0.05)
    finally:
        process.kill()
        server.shutdown()
    assert systems.personalized({"items": [1], "fallback": None}) == (True, None)
    assert systems.personalized({"items": []}) == (False, None)
    assert systems.personalized({"items": [1], "fallback": {"reason": "no_consent"}}) == (
        False,
        "no_consent",
    )


SERVER_THAT_FAILS_FIRST = """
import http.server, json, pathlib, sys

port, marker, failures = int(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
starts = int(marker.read_text()) if marker.exists() else 0
marker.write_text(str(starts + 1))
if starts < failures:
    print(f"start {starts + 1}: the Ray instance failed to start", flush=True)
    sys.exit(1)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        body = json.dumps({"items": [{"item_id": 1}], "fallback": None}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.parametrize("failures", [1, 2])
def test_a_server_that_exits_while_starting_is_started_once_more_and_said(
    tmp_path: Path, failures: int
) -> None:
    """A start that exits before answering is retried once, with the first log's tail said
    and kept; a second exit is the error, carrying its log's tail. Real processes, a real
    HTTP server; the workload's environment only names the folder and the Redis URL."""
    import sys
    from types import SimpleNamespace

    from loadtests.bench import systems
    from serving.ops.launch import free_port

    script = tmp_path / "server.py"
    script.write_text(SERVER_THAT_FAILS_FIRST)
    port, marker = free_port(), tmp_path / "starts"
    command = [sys.executable, str(script), str(port), str(marker), str(failures)]
    lines: list[str] = []
    env = SimpleNamespace(home=SimpleNamespace(root=tmp_path), redis_url="redis://127.0.0.1:1/0")
    work = systems.Workload(
        env,  # type: ignore[arg-type]
        [1],
        1.0,
        1,
        [{}],
        tmp_path / "bodies.json",
        "key",
        lines.append,
    )
    started = systems.started_process(work, "flaky", "flaky server", command, port, False)
    if failures == 1:
        with started as (url, process):
            answer = httpx.post(url, json={}, timeout=5).json()
            assert answer["items"] and process.poll() is None
        assert process.poll() is not None  # stopped afterwards
        retried = [line for line in lines if "once more" in line]
        assert len(retried) == 1 and "start 1: the Ray instance failed" in retried[0], lines
        assert "start 1:" in (tmp_path / "bench" / "flaky.failed.log").read_text()
    else:
        with (
            pytest.raises(systems.ServerExited, match=r"(?s)exited \(1\).*start 2: the Ray"),
            started,
        ):
            pass
    assert marker.read_text() == "2"
