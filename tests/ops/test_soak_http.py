"""The chaos soak's short variant (loadtests/soak/), on the session's real server:
about 90 s of the realistic mix at half its measured peak while Redis is killed
and slowed, the consumer is killed, a canary is promoted and rolled back and the
policy redeployed; then every record is counted. Assertions are on counts, not on
timings (the one-hour run's figures are in loadtests/results/soak.md)."""

from __future__ import annotations

from pathlib import Path

from loadtests.soak.faults import SHORT
from loadtests.soak.run import run_soak
from loadtests.soak.server import SoakServer
from rankgate.core.home import Home
from tests.conftest import Server


def test_a_short_soak_loses_and_duplicates_nothing(
    server: Server, ready_home: Home, restore: None, tmp_path: Path
) -> None:
    running = SoakServer(
        server.base_url, ready_home, server.config_path, server.log_path, server.process
    )
    report = run_soak(
        90.0,
        tmp_path,
        print,
        faults=SHORT,
        window_s=15.0,
        warmup_s=8.0,
        key_every_s=20.0,
        server=running,
    )
    print((tmp_path / "soak.md").read_text())
    requests, audit, events = report["requests"], report["audit"], report["events"]
    assert requests["answered"] > 1_000
    assert not requests["undocumented"], requests["undocumented"]
    # Every rank answered has exactly one audit record.
    assert audit["answered"] > 500
    assert (audit["missing"], audit["duplicated"]) == (0, 0), audit
    # Every accepted outcome is joined to its decision once; the consumer is caught up.
    assert events["accepted"] > 100
    assert (events["lost"], events["applied_twice"]) == (0, 0), events
    assert (events["consumer_pending"], events["consumer_lag"]) == (0, 0), events
    # Every acknowledged consent decision is what Redis holds, withdrawals made right
    # before the Redis kill included.
    consent, withdrawals = report["consent"], report["withdrawals_before_kills"]
    assert consent["writes_acknowledged"] > 50 and consent["lost"] == 0, consent
    assert withdrawals["acknowledged"] > 0 and withdrawals["lost"] == 0, withdrawals
    # Each fault was injected and the service came back after it.
    faults = report["faults"]
    assert sorted({f["name"] for f in faults}) == sorted(SHORT)
    assert not [f for f in faults if f["error"]], faults
    assert all(f["recovered_s"] is not None for f in faults), faults
    # No revoked key is accepted past the stated bound.
    assert report["keys"] and all(
        k["refused_after_s"] is not None and (k["last_accepted_sent_s"] or 0.0) <= k["bound_s"]
        for k in report["keys"]
    ), report["keys"]
    assert all(report["verdicts"].values()), report["verdicts"]
