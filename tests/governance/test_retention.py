"""Retention by time: the policy's rules, and the removal of each kind of record on
the session's real Redis, in a namespace of the test's own (other tests' records are
never touched)."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError
from rankgate.core.home import Home
from rankgate.core.redis_server import connect, connect_async, resolve_redis_url
from rankgate.governance.notifications import Notification
from rankgate.governance.policy import load_policy_set
from rankgate.governance.retention import DAY_S, KINDS, RetentionRules
from serving.contract.config import RetentionJobConfig
from serving.observe.metrics import ServingMetrics
from serving.observe.retention import LEASE_S, RetentionFailure, RetentionJob, Trimmer

EXAMPLE_POLICIES = Path(__file__).parents[2] / "examples" / "default" / "policies"
NOW = 2_000_000_000.0
"""The tests' 'now' (2033): every record is written with a time relative to it."""


# -- the rules ------------------------------------------------------------------


def policy_with(tmp_path: Path, retention: Any) -> Path:
    policy = yaml.safe_load((EXAMPLE_POLICIES / "policy.yaml").read_text())
    policy["retention"] = retention
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    shutil.copy(EXAMPLE_POLICIES / "fallback.yaml", tmp_path / "fallback.yaml")
    return tmp_path


@pytest.mark.parametrize("days", [0, -3, "forever", None])
def test_a_limit_that_is_not_a_positive_number_of_days_is_refused_naming_file_and_field(
    tmp_path: Path, days: Any
) -> None:
    folder = policy_with(tmp_path, {"decision_audit": 365, "events": days})
    with pytest.raises(ConfigError) as refused:
        load_policy_set(folder)
    message = str(refused.value)
    assert str(folder / "policy.yaml") in message and "'retention.events'" in message
    if days is not None:  # None: an empty value in YAML is refused as not a number
        assert "retention.decision_audit" not in message


def test_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="retention.audit_logs"):
        load_policy_set(policy_with(tmp_path, {"audit_logs": 30}))


def test_days_may_be_fractions_and_a_kind_not_stated_is_kept(tmp_path: Path) -> None:
    rules = load_policy_set(policy_with(tmp_path, {"decision_audit": 0.5, "events": 90})).policy
    assert rules.retention.limit_s("decision_audit") == 0.5 * DAY_S
    assert rules.retention.limit_s("events") == 90 * DAY_S
    assert rules.retention.limit_s("outcomes") is None
    assert set(rules.retention.stated()) == {"decision_audit", "events"}
    assert RetentionRules().stated() == {}


def test_the_example_policy_states_every_kind() -> None:
    stated = load_policy_set(EXAMPLE_POLICIES).policy.retention.stated()
    assert set(stated) == set(KINDS)


# -- the removal, per kind ---------------------------------------------------------


@pytest.fixture
def namespace(session_home: Home) -> Iterator[str]:
    """A namespace of the test's own on the session's Redis, emptied afterwards."""
    ns = f"rt-{uuid.uuid4().hex[:8]}"
    yield ns
    client = connect(resolve_redis_url())
    for key in client.scan_iter(match=f"{ns}:*", count=1000):
        client.delete(key)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def with_client(work: Any) -> Any:
    client = connect_async(resolve_redis_url())
    try:
        return await work(client)
    finally:
        await client.aclose()


def fill_stream(key: str, ages_s: list[float], fields: dict[str, str] | None = None) -> None:
    client = connect(resolve_redis_url())
    with client.pipeline(transaction=False) as pipe:
        for n, age in enumerate(sorted(ages_s, reverse=True)):
            pipe.xadd(key, fields or {"n": str(n)}, id=f"{int((NOW - age) * 1000)}-{n}")
        pipe.execute()


def stream_ages(key: str) -> list[float]:
    entries = connect(resolve_redis_url()).xrange(key)
    return sorted(round(NOW - int(i.decode().split("-")[0]) / 1000, 3) for i, _ in entries)


@pytest.mark.parametrize("kind", ["decision_audit", "events"])
def test_a_stream_keeps_exactly_the_entries_younger_than_its_limit(
    namespace: str, kind: str
) -> None:
    key = (redis_keys.audit if kind == "decision_audit" else redis_keys.events)(namespace)
    # 25,000 entries a second apart: the approximate trims remove whole nodes in
    # batches of 1,000, the exact one what is left in the first node.
    ages = [float(n) for n in range(25_000)]
    fill_stream(key, ages)
    connect(resolve_redis_url()).xgroup_create(key, "readers", id="0")
    limit = 12_345.5

    async def trim(client: Any) -> Any:
        trimmer = Trimmer(client, namespace, batch=1000)
        result = await trimmer.enforce(kind, limit, NOW)  # type: ignore[arg-type]
        return result, trimmer

    result, trimmer = run(with_client(trim))
    assert stream_ages(key) == [a for a in ages if a <= limit]
    assert result.removed == len([a for a in ages if a > limit])
    assert result.oldest_at == NOW - 12_345
    assert trimmer.calls > 3  # in batches, not one call


def test_a_stream_without_a_limit_is_only_measured(namespace: str) -> None:
    key = redis_keys.audit(namespace)
    fill_stream(key, [100.0, 50.0])

    async def measure(client: Any) -> Any:
        return await Trimmer(client, namespace).enforce("decision_audit", None, NOW)

    result = run(with_client(measure))
    assert result.removed == 0 and result.oldest_at == NOW - 100
    assert len(stream_ages(key)) == 2


def test_keyed_records_older_than_their_limit_are_removed_and_the_rest_kept(
    namespace: str,
) -> None:
    client = connect(resolve_redis_url())
    iso = lambda age: datetime.fromtimestamp(NOW - age, UTC).isoformat()
    day = DAY_S
    for n, age in enumerate([40 * day, 10 * day, 1 * day]):
        client.hset(redis_keys.decision(namespace, f"r{n}"), mapping={"u": "k", "at": NOW - age})
        client.hset(redis_keys.outcomes(namespace, f"v{n}", "stable"), "at", repr(NOW - age))
        client.hset(redis_keys.drift(namespace, f"v{n}"), "at", repr(NOW - age))
        client.hset(
            redis_keys.consent_import(namespace, f"d{n}"), mapping={"finished_at": iso(age)}
        )
    # The drift history the report draws: entries older than the limit go, younger stay.
    fill_stream(redis_keys.drift_history(namespace, "v0"), [2 * day, 0.6 * day, 0.2 * day])
    # Kept whatever their age: counters from before `at` existed, an unfinished import.
    client.hset(redis_keys.outcomes(namespace, "old", "stable"), "clicks", 3)
    client.hset(redis_keys.consent_import(namespace, "running"), "rows_done", 10)
    rules = RetentionRules(decision_index=5, outcomes=30, consent_history=20, drift_windows=0.5)

    async def enforce(client: Any) -> Any:
        trimmer = Trimmer(client, namespace, batch=1000)
        return {
            kind: await trimmer.enforce(kind, rules.limit_s(kind), NOW)
            for kind in ("decision_index", "outcomes", "consent_history", "drift_windows")
        }

    results = run(with_client(enforce))
    left = {k.decode() for k in client.scan_iter(match=f"{namespace}:*")}
    assert stream_ages(redis_keys.drift_history(namespace, "v0")) == [0.2 * day]
    assert left == {
        redis_keys.drift_history(namespace, "v0"),
        redis_keys.decision(namespace, "r2"),
        redis_keys.outcomes(namespace, "v1", "stable"),
        redis_keys.outcomes(namespace, "v2", "stable"),
        redis_keys.outcomes(namespace, "old", "stable"),
        redis_keys.consent_import(namespace, "d1"),
        redis_keys.consent_import(namespace, "d2"),
        redis_keys.consent_import(namespace, "running"),
    }
    assert {k: r.removed for k, r in results.items()} == {
        "decision_index": 2,
        "outcomes": 1,
        "consent_history": 1,
        "drift_windows": 3 + 2,
    }
    assert results["decision_index"].oldest_at == NOW - day
    assert results["outcomes"].oldest_at == NOW - 10 * day
    assert results["consent_history"].oldest_at == pytest.approx(NOW - 10 * day)
    assert results["drift_windows"].oldest_at == pytest.approx(NOW - 0.2 * day, abs=0.002)


def audit_record(kind: str | None, status: str = "explained") -> dict[str, str]:
    record: dict[str, Any] = {"request_id": uuid.uuid4().hex, "explanation": [[]]}
    if kind is not None:
        record["explained"] = {"kind": kind, "status": status}
    return {"record": json.dumps(record, separators=(",", ":"))}


def test_records_with_a_sampled_explanation_go_after_its_limit_and_others_stay(
    namespace: str,
) -> None:
    key = redis_keys.audit(namespace)
    client = connect(resolve_redis_url())
    plan = [  # (age in days, what the record carries)
        (9, "sampled"),
        (8, None),
        (7, "requested"),
        (6, "sampled-omitted"),
        (5, "sampled"),
        (1, "sampled"),
    ]
    for n, (age, kind) in enumerate(plan):
        record = (
            audit_record("sampled", "omitted") if kind == "sampled-omitted" else audit_record(kind)
        )
        client.xadd(key, record, id=f"{int((NOW - age * DAY_S) * 1000)}-{n}")

    async def enforce(client: Any, now: float) -> Any:
        return await Trimmer(client, namespace, batch=1000).enforce(
            "sampled_explanations", 3 * DAY_S, now
        )

    first = run(with_client(lambda c: enforce(c, NOW)))
    kept = [round((NOW - int(i.split(b"-")[0]) / 1000) / DAY_S) for i, _ in client.xrange(key)]
    assert kept == [8, 7, 6, 1] and first.removed == 2
    assert first.oldest_at == NOW - DAY_S
    # The cursor: a later round reads only what aged since (none of the kept is read again).
    cursor = client.get(redis_keys.retention_cursor(namespace, "sampled_explanations"))
    assert cursor == f"{int((NOW - 5 * DAY_S) * 1000)}-4".encode()  # the last record read
    second = run(with_client(lambda c: enforce(c, NOW + 3 * DAY_S)))
    assert second.removed == 1 and len(client.xrange(key)) == 3


# -- the job ---------------------------------------------------------------------


def test_one_replica_runs_a_round_per_interval_measured_and_a_failing_kind_is_reported(
    namespace: str,
) -> None:
    client = connect(resolve_redis_url())
    fill_stream(redis_keys.events(namespace), [10 * DAY_S, 2 * DAY_S, DAY_S])
    # A key of the wrong type where the audit stream should be: that kind fails.
    client.set(redis_keys.audit(namespace), "not a stream")
    rules = RetentionRules(decision_audit=1, events=3)
    failures: list[RetentionFailure] = []

    async def round_(client: Any) -> Any:
        metrics = ServingMetrics(to_ray=False, flush_s=None)
        first, second = RetentionJob(client, namespace, metrics), RetentionJob(client, namespace)
        first.on_failure.append(failures.append)
        took = await first.take_lease()
        other_took = await second.take_lease()
        results = await first.run(rules, RetentionJobConfig(pause_s=0), now=NOW)
        await asyncio.gather(*first.sending)  # the notifications of the failures
        return took, other_took, results, metrics.render().decode()

    took, other_took, results, exposition = run(with_client(round_))
    assert took and not other_took
    assert 25_000 < client.pttl(redis_keys.retention_lease(namespace)) <= LEASE_S * 1000
    assert results["events"].removed == 1 and results["events"].oldest_at == NOW - 2 * DAY_S
    assert results["decision_audit"].error == "ResponseError"
    # The sampled explanations are read from the same (broken) audit key.
    assert [f.kind for f in failures] == ["decision_audit", "sampled_explanations"]
    assert "WRONGTYPE" in failures[0].error and failures[0].namespace == namespace
    assert 'rankgate_retention_removed_total{kind="events"} 1.0' in exposition
    assert f'rankgate_retention_oldest_age_seconds{{kind="events"}} {2 * DAY_S}' in exposition
    assert 'rankgate_retention_failures_total{kind="decision_audit"} 1.0' in exposition
    assert set(results) == set(KINDS)  # the other kinds were done all the same
    # Each failing kind went to the outbox for the webhooks that take retention failures.
    sent = [
        Notification.read(i, f)
        for i, f in client.xrange(redis_keys.notifications(namespace))  # type: ignore[union-attr]
    ]
    assert sorted(n.data["record_kind"] for n in sent if n.kind == "retention_failure") == [
        "decision_audit",
        "sampled_explanations",
    ]
    assert all("WRONGTYPE" in n.text for n in sent)


# -- the report ------------------------------------------------------------------


def test_the_report_sets_each_kinds_oldest_against_its_limit() -> None:
    from rankgate.ops.retention import statuses

    rules = RetentionRules(decision_audit=2, events=10)
    oldest = dict.fromkeys(KINDS, None) | {"decision_audit": NOW - 3 * DAY_S, "events": NOW - DAY_S}
    found = {s.kind: s for s in statuses(rules, oldest, NOW)}  # type: ignore[arg-type]
    assert found["decision_audit"].over_limit and found["decision_audit"].age_days == 3
    assert not found["events"].over_limit and found["events"].limit_days == 10
    assert found["outcomes"].limit_days is None and found["outcomes"].age_days is None


def test_privacy_retention_reads_redis_and_the_policy(session_home: Home, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rankgate.cli.main import main

    shown = CliRunner().invoke(main, ["privacy", "retention", "--json", str(EXAMPLE_POLICIES)])
    assert shown.exit_code == 0, shown.output
    figures = json.loads(shown.output)
    assert [f["kind"] for f in figures] == list(KINDS)
    assert figures[0]["limit_days"] == 365 and "<ns>:audit" in figures[0]["where"]
    table = CliRunner().invoke(main, ["privacy", "retention", str(EXAMPLE_POLICIES)])
    assert table.exit_code == 0 and all(kind in table.output for kind in KINDS)
    refused = CliRunner().invoke(
        main, ["privacy", "retention", str(policy_with(tmp_path, {"events": -1}))]
    )
    assert refused.exit_code != 0 and "'retention.events'" in refused.output


def test_the_job_runs_on_the_lease_holder_and_a_redeploy_starts_a_round(namespace: str) -> None:
    import time

    key = redis_keys.events(namespace)
    now = time.time()
    client = connect(resolve_redis_url())
    client.xadd(key, {"n": "old"}, id=f"{int((now - 2 * DAY_S) * 1000)}-0")
    client.xadd(key, {"n": "new"}, id=f"{int(now * 1000)}-0")
    current = {"rules": RetentionRules()}
    config = RetentionJobConfig(interval_s=3600, pause_s=0)

    async def replicas(client: Any) -> Any:
        holder, other = RetentionJob(client, namespace), RetentionJob(client, namespace)
        for job in (holder, other):
            job.keep_running(lambda: current["rules"], lambda: config)
            await asyncio.sleep(0.2)  # the first round: nothing stated, nothing removed
        first = connect(resolve_redis_url()).xlen(key)
        current["rules"] = RetentionRules(events=1)
        for job in (holder, other):  # what a reconfigure does on each replica
            job.keep_running(lambda: current["rules"], lambda: config)
        await asyncio.sleep(0.3)
        rounds = (holder.last, other.last)
        for job in (holder, other):
            await job.close()
        return first, rounds

    first, (holder, other) = run(with_client(replicas))
    assert first == 2
    assert holder["events"].removed == 1 and other == {}  # only the holder ran
    assert not client.exists(redis_keys.retention_lease(namespace))  # given up on close
    assert [f[b"n"] for _, f in client.xrange(key)] == [b"new"]
