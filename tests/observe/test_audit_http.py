"""The decision audit log on the real server: one record per decision, tail, replay."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.errors import RankgateError
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import ModelRef
from serving.observe.audit import AuditRecord
from serving.ops import audit_replay as replay
from tests.conftest import Server
from tests.serving_support import PATIENT_BUDGET_MS, user_with


def decide(server: Server, **body: object) -> str:
    response = httpx.post(
        f"{server.base_url}/v1/rank",
        json={"budget_ms": PATIENT_BUDGET_MS, **body},
        headers=server.headers,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def wait_for(
    env: Environment, request_ids: list[str], timeout_s: float = 15
) -> dict[str, AuditRecord]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = {r.request_id: r for r in replay.tail(env.redis, env.home.namespace, 5000)}
        if all(rid in records for rid in request_ids) or time.monotonic() > deadline:
            return records


def test_every_decision_is_recorded_without_the_raw_id(server: Server, env: Environment) -> None:
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    ids = [
        decide(
            server,
            user_id=granted if n % 3 else denied,
            purpose="onsite_personalization",
            region="US",
        )
        for n in range(60)
    ]
    records = wait_for(env, ids)
    assert all(rid in records for rid in ids), sum(rid in records for rid in ids)
    raw = env.redis.xrevrange(redis_keys.audit(env.home.namespace), count=5000)
    blob = b"".join(fields[b"record"] for _, fields in raw)
    assert granted.encode() not in blob and denied.encode() not in blob
    sample = records[ids[1]]
    assert sample.model == ModelRef(name="ranker", version="v2", variant="stable")
    assert sample.app == "tests"  # the application whose API key asked
    assert sample.features is not None and sample.features.age_s["user_item_affinity"] > 0
    assert sample.policy.version and len(sample.features.values) == 84 and sample.item_table
    denied_record = records[ids[0]]
    assert denied_record.fallback is not None and denied_record.features is None
    assert denied_record.fallback.reason == FallbackReason.NO_CONSENT


@pytest.mark.parametrize(
    ("purpose", "version"), [("onsite_personalization", "v2"), ("email_marketing", "v1")]
)
def test_replay_reproduces_the_recorded_ranking_for_every_model(
    server: Server, env: Environment, purpose: str, version: str
) -> None:
    uid = user_with(env.consent, purpose, ConsentState.GRANTED, skip=5)
    request_id = decide(server, user_id=uid, purpose=purpose, region="EU", k=7, explain=True)
    record = wait_for(env, [request_id])[request_id]
    assert record.model is not None and record.model.version == version and record.explanation
    result = CliRunner().invoke(main, ["audit", "replay", request_id])
    assert result.exit_code == 0, result.output
    assert f"reproduced: {version} ranks the recorded features exactly as recorded" in result.output


def test_replay_of_a_fallback_says_there_is_nothing_to_rescore(
    server: Server, env: Environment
) -> None:
    uid = user_with(env.consent, "email_marketing", ConsentState.DENIED)
    request_id = decide(server, user_id=uid, purpose="email_marketing", region="US")
    wait_for(env, [request_id])
    result = CliRunner().invoke(main, ["audit", "replay", request_id])
    assert result.exit_code == 0 and "nothing to re-score" in result.output


def test_unknown_request_and_missing_stream_are_said_plainly(
    server: Server, env: Environment
) -> None:
    decide(server, user_id="u-5c111b923688", purpose="onsite_personalization", region="US")
    result = CliRunner().invoke(main, ["audit", "replay", "no-such-request"])
    assert result.exit_code == 1
    assert "'no-such-request' is not in the audit stream" in result.output
    assert "trimmed by retention, or never recorded" in result.output
    with pytest.raises(RankgateError, match="audit stream rg_nowhere:audit does not exist"):
        replay.find(env.redis, "rg_nowhere", "x")


def test_tail_prints_the_latest_records(server: Server, env: Environment) -> None:
    request_id = decide(
        server, user_id="u-5c111b923688", purpose="onsite_personalization", region="US"
    )
    wait_for(env, [request_id])
    result = CliRunner().invoke(main, ["audit", "tail", "--count", "3"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(lines) == 3 and lines[-1]["request_id"] == request_id
