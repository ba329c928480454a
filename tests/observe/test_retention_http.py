"""Retention on the real server: with a policy that keeps audit records a few seconds,
the server's own job removes a record once it is older than that, and keeps a
younger one.

The session's audit stream is shared with other tests: it is read before and, once
the usual policy serves again, every record the short retention removed that was
not this test's is put back with its own id (one transaction)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtests.ray_metrics import total
from rankgate.core import redis_keys
from rankgate.governance.policy import load_policy_set, policy_dir
from rankgate.governance.retention import DAY_S
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.serving_support import deploy, ingress_user_config, metrics_when

RETENTION_S = 6.0
GAP_S = 3.0


@pytest.fixture
def audit_kept(server: Server) -> Iterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """The audit stream as it was, put back afterwards. Set up before `restore`, so
    its teardown runs after `restore` has served the usual policy again."""
    env = Environment.open()
    key = redis_keys.audit(env.home.namespace)
    before = env.redis.xrange(key)
    yield before
    last = before[-1][0] if before else b"0-0"
    later = env.redis.xrange(key, b"(" + last, "+")
    with env.redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        for stream_id, fields in [*before, *later]:
            pipe.xadd(key, fields, id=stream_id)
        pipe.execute()


def records_since(env: Environment, since: bytes) -> dict[str, bytes]:
    """request_id -> stream id of the audit records written after `since`."""
    from serving.observe.audit import AuditRecord

    found = {}
    for stream_id, fields in env.redis.xrange(redis_keys.audit(env.home.namespace), since, "+"):
        found[AuditRecord.read(fields[b"record"]).request_id] = stream_id
    return found


def rank(client: httpx.Client, user: str) -> str:
    answer = client.post(
        "/v1/rank",
        json={"user_id": user, "purpose": "onsite_personalization", "region": "US", "k": 3},
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["request_id"])


def wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_audit_record_older_than_its_retention_is_gone_after_the_job_runs_and_a_younger_one_stays(
    audit_kept: list[Any],
    restore: None,
    server: Server,
    personalizable: list[str],
    tmp_path: Path,
) -> None:
    policy = yaml.safe_load((policy_dir() / "policy.yaml").read_text())
    policy["retention"] = {"decision_audit": RETENTION_S / DAY_S}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    shutil.copy(policy_dir() / "fallback.yaml", tmp_path / "fallback.yaml")
    digest = load_policy_set(tmp_path).digest
    deploy(
        server,
        "short-retention",
        ingress_user_config(
            policy={"dir": str(tmp_path)}, retention={"interval_s": 1, "pause_s": 0}
        ),
        lambda h: h["policy_digest"] == digest,
    )
    env = Environment.open()
    since = audit_kept[-1][0] if audit_kept else "-"
    removed_before = total(metrics_when(server, lambda s: True), "rankgate_retention_removed_total")
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=10) as client:
        old = rank(client, personalizable[0])
        assert wait_for(lambda: old in records_since(env, since), 5), "the record was not written"
        time.sleep(GAP_S)
        young = rank(client, personalizable[1])
        assert wait_for(lambda: young in records_since(env, since), 5)
        # The job runs every second and removes what is older than RETENTION_S: the old
        # record goes at an age between RETENTION_S and about a second more, when the
        # young one is GAP_S younger.
        assert wait_for(lambda: old not in records_since(env, since), RETENTION_S + 5)
        left = records_since(env, since)
    assert young in left
    young_age = time.time() - int(left[young].split(b"-")[0]) / 1000
    assert young_age < RETENTION_S
    # Everything older than the limit is gone, the other tests' records too (put back
    # afterwards by `audit_kept`).
    oldest = env.redis.xrange(redis_keys.audit(env.home.namespace), "-", "+", count=1)[0][0]
    assert time.time() - int(oldest.split(b"-")[0]) / 1000 < RETENTION_S + 2
    samples = metrics_when(
        server,
        lambda s: (
            total(s, "rankgate_retention_removed_total", kind="decision_audit") > removed_before
        ),
    )
    assert total(samples, "rankgate_retention_removed_total", kind="decision_audit") > 0
    assert total(samples, "rankgate_retention_oldest_age_seconds", kind="decision_audit") < (
        RETENTION_S + 2
    )
