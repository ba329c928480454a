"""The soak's plain parts, in milliseconds: its fault schedule, what counts as a
documented answer, memory growth per hour, and the report's verdicts."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import numpy as np

from loadtests.bench.memory import process_label
from loadtests.soak.faults import ALL, SHORT, schedule, youngest
from loadtests.soak.memory import MemorySampler, judge, judgments
from loadtests.soak.report import (
    MEMORY_VERDICT,
    documented,
    requests_section,
    verdicts,
    windows_section,
)
from loadtests.soak.traffic import Answer, Ledger


def test_an_hour_runs_every_fault_more_than_once_some_overlapping() -> None:
    plan = schedule(3600.0, ALL, 300.0)
    runs = Counter(name for _, name in plan)
    assert set(runs) == set(ALL) and min(runs.values()) >= 2, runs
    assert plan[0][0] == 300.0 and plan[-1][0] < 3600.0 - 250  # warm-up, then a quiet tail
    starts = [at for at, _ in plan]
    assert any(b - a < 5.0 for a, b in itertools.pairwise(starts))  # overlaps
    # Every rollback follows a canary of its round.
    canaries = [at for at, name in plan if name == "canary"]
    rollbacks = [at for at, name in plan if name == "rollback"]
    assert all(c < r for c, r in zip(canaries, rollbacks, strict=True))


def test_the_short_variant_runs_each_of_its_faults_once() -> None:
    plan = schedule(90.0, SHORT, 8.0)
    assert sorted(name for _, name in plan) == sorted(SHORT)
    assert all(8.0 <= at < 90.0 - 20.0 for at, _ in plan)


def test_only_200_202_4xx_and_503_with_retry_after_are_documented() -> None:
    def answer(status: int, retry_after: bool = False) -> Answer:
        return Answer("rank", 0.0, 1.0, status, "x", retry_after)

    assert all(documented(answer(s)) for s in (200, 202, 401, 422))
    assert documented(answer(503, retry_after=True))
    assert not any(documented(answer(s)) for s in (0, 500, 502, 503))
    # A 500 is a request in flight on a node lost up to 10 s before it came back
    # (docs/cluster.md, Node loss), and nothing else.
    lost = Answer("rank", 30.0, 2_000.0, 500, "http_500")
    assert documented(lost, losses=(25.0,))
    assert not documented(lost, losses=(33.0,)) and not documented(lost, (10.0,))
    assert not documented(Answer("rank", 30.0, 2_000.0, 502, "x"), losses=(25.0,))


def test_growth_per_hour_is_the_slope_after_warm_up() -> None:
    sampler = MemorySampler([])
    mb = 2**20
    # 100 MB growing 10 MB an hour over 20 minutes after a 5-minute warm-up, sampled
    # every 10 s; a second process lives only 5 minutes: no figure for it.
    sampler.samples[("raylet", 1)] = [
        (t, int((100 + 10 * t / 3600) * mb)) for t in range(0, 1500, 10)
    ]
    sampler.samples[("ServeReplica:rankgate:RankIngress", 2)] = [
        (t, 400 * mb) for t in range(900, 1200, 10)
    ]
    growth = sampler.growth(300.0)
    raylet = growth["raylet (1)"]
    assert abs(raylet["growth_mb_per_hour"] - 10.0) < 0.01
    assert abs(raylet["growth_percent_per_hour"] - 10.0 / 100.83 * 100) < 0.1
    assert "growth_percent_per_hour" not in growth["ServeReplica:rankgate:RankIngress (2)"]
    windows = sampler.windows(300.0)
    assert (
        len(windows["raylet (1)"]) == 5
        and windows["ServeReplica:rankgate:RankIngress (2)"][0] is None
    )


def test_growth_is_judged_by_the_interval_of_its_second_half() -> None:
    rng = np.random.default_rng(7)
    jitter = rng.normal(0.0, 3.0, 120)
    # Two hours of means per minute, 430 MB with 3 MB of jitter: flat, then leaking
    # 10 % an hour; a replica replaced after 20 minutes; Ray's helpers that never move.
    flat = judge(list(430.0 + jitter), 60.0, 300.0)
    leak = judge([430.0 + 43.0 * t / 60 + j for t, j in enumerate(jitter)], 60.0, 300.0)
    short = judge([None] * 60 + list(430.0 + jitter[:20]) + [None] * 40, 60.0, 300.0)
    still = judge([105.7] * 120, 60.0, 300.0)
    assert flat["verdict"] == "under" and flat["low"] < 0 < flat["high"] < 5, flat
    assert leak["verdict"] == "grows" and leak["low"] > 5, leak
    assert abs(leak["mb_per_hour"] - 43.0) < 10, leak
    assert short == {"verdict": "too short", "lived_s": 900}
    assert still["verdict"] == "under" and still["percent_per_hour"] == 0.0
    # Six 5-minute windows of a half hour with jitter of a few MB: the interval spans 5 %.
    windows = [430.0, 437.0, 431.0, 442.0, 433.0, 440.0, 436.0, 434.0]
    assert judge(windows, 300.0, 300.0)["verdict"] == "cannot tell"
    # A report written before the means per minute were kept is judged on its windows.
    assert judgments({"windows": {"x (1)": windows}}, 300.0, 300.0)["x (1)"]["points"] == 4


def test_the_replica_killed_is_the_youngest() -> None:
    import subprocess
    import sys
    import time

    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.05)
    younger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert youngest([younger.pid, older.pid]) == younger.pid
        assert youngest([older.pid, younger.pid]) == younger.pid
    finally:
        older.kill()
        younger.kill()
        older.wait()
        younger.wait()


def test_ray_processes_are_named_without_the_method_they_run() -> None:
    label = process_label
    assert label("ray::Serv", ["ray::ServeController.listen_for_change"]) == "ray::ServeController"
    assert label("ray::Serv", ["ray::ServeReplica:rankgate:RankIngress.reconfigure"]) == (
        "ray::ServeReplica:rankgate:RankIngress"
    )


def report_of(**changes: Any) -> dict[str, Any]:
    ledger = Ledger(
        answers=[
            Answer("rank", 1.0, 5.0, 200, "personalized", request_id="a"),
            Answer("rank", 2.0, 7.0, 200, "fallback:consent_unavailable", request_id="b"),
            Answer("consent", 3.0, 30.0, 503, "consent_store_unavailable", retry_after=True),
        ]
    )
    report: dict[str, Any] = {
        "requests": requests_section(ledger, 10.0),
        "windows": windows_section(ledger, 5.0),
        "audit": {"missing": 0, "duplicated": 0},
        "events": {"lost": 0, "applied_twice": 0},
        "consent": {"lost": 0},
        "withdrawals_before_kills": {"lost": 0},
        "keys": [{"refused_after_s": 0.4, "bound_s": 1.0}],
        "window_s": 300.0,
        "warmup_s": 300.0,
        "memory": {
            "windows": {},
            "minutes": {
                # a cache filling for the first 40 minutes, then flat
                "raylet (1)": [30.0 + min(t, 40) * 0.1 for t in range(120)],
                # Redis's data: its own section, not this verdict
                "valkey-server (2)": [400.0 + t for t in range(120)],
            },
        },
        "faults": [{"recovered_s": 3.0}],
    }
    return report | changes


def test_the_verdicts_pass_only_on_zero_losses_and_documented_answers() -> None:
    report = report_of()
    assert report["requests"]["other_than_200"] == {
        "503 consent_store_unavailable (Retry-After)": 1
    }
    assert report["windows"][0]["answers"] == {"personalized": 1, "fallback:consent_unavailable": 1}
    assert all(verdicts(report).values())
    failing = {
        "audit: 0 missing, 0 duplicated": {"audit": {"missing": 1, "duplicated": 0}},
        "events: 0 lost, 0 applied twice": {"events": {"lost": 0, "applied_twice": 2}},
        "keys: no revoked key accepted past the bound": {
            "keys": [{"refused_after_s": None, "bound_s": 1.0}]
        },
        "faults: every one recovered": {"faults": [{"recovered_s": None}]},
        MEMORY_VERDICT: {
            "memory": {
                "windows": {},
                "minutes": {"raylet (1)": [30.0 + t * 0.05 for t in range(120)]},
            }
        },
    }
    for name, change in failing.items():
        judged = verdicts(report_of(**change))
        assert not judged[name] and sum(not ok for ok in judged.values()) == 1, name


def test_an_undocumented_answer_is_shown_with_the_fault_under_way() -> None:
    from loadtests.soak.report import fault_at

    faults = [
        {"name": "redis_kill", "started": 57.8, "ended": 63.5, "recovered_s": 0.2},
        {"name": "replica_kill", "started": 153.6, "ended": 153.8, "recovered_s": 9.6},
        {"name": "slow_redis", "started": 160.0, "ended": 170.0, "recovered_s": 0.4},
    ]
    assert fault_at(faults, 153.6) == "replica_kill@153.6 s"
    assert fault_at(faults, 163.0) == "replica_kill@153.6 s, slow_redis@160.0 s"
    assert fault_at(faults, 100.0) == "none"
    # Until recovered (and a second either side), not only while injected.
    assert fault_at(faults, 64.5) == "redis_kill@57.8 s" and fault_at(faults, 65.0) == "none"


def test_a_record_of_a_server_that_does_not_answer_is_removed_one_that_answers_refused(
    tmp_path: Any,
) -> None:
    import http.server
    import threading

    import pytest

    from loadtests.soak.cluster import refuse_a_running_server
    from rankgate.core.home import Home
    from serving.ops.launch import free_port
    from serving.ops.supervisor import ServerInfo

    home = Home(tmp_path)
    ServerInfo(tmp_path / "serve_config.yaml", free_port(), "").write(home)  # nothing there
    refuse_a_running_server(home)
    assert not ServerInfo.path(home).exists()

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ServerInfo(tmp_path / "serve_config.yaml", server.server_address[1], "").write(home)
        with pytest.raises(RuntimeError, match="is running at http://127.0.0.1"):
            refuse_a_running_server(home)
        assert ServerInfo.path(home).exists()
    finally:
        server.shutdown()
