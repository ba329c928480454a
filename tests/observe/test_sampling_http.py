"""Explanations on a sample of traffic, on the real server: in the audit records at the
configured rate, never in the answers, the same as asked-for ones, counted in the metrics."""

from __future__ import annotations

import itertools

import httpx
from click.testing import CliRunner
from prometheus_client.samples import Sample

from loadtests.ray_metrics import total
from rankgate.cli.main import main
from rankgate.ops.environment import Environment
from serving.observe.audit import AuditRecord
from serving.observe.sampling import chosen
from tests.conftest import Server
from tests.observe.test_audit_http import wait_for
from tests.observe.test_sampling import binomial_bounds
from tests.serving_support import (
    PATIENT_BUDGET_MS,
    deploy,
    ingress_user_config,
    metrics_when,
    ray_metrics,
)

RATE = 0.25
DECISIONS = 240


def sampled(record: AuditRecord) -> bool:
    note = record.explained
    return note is not None and note.kind == "sampled" and note.status == "explained"


def test_sampled_explanations_reach_the_audit_records_at_the_configured_rate(
    server: Server, env: Environment, personalizable: list[str], restore: None
) -> None:
    explainer = {**ingress_user_config()["explainer"], "sample_rate": RATE}
    deploy(
        server,
        "sampling",
        ingress_user_config(explainer=explainer),
        lambda h: h["sampled_explanations"]["sample_rate"] == RATE,
    )
    sampled_explained = {"kind": "sampled", "status": "explained", "model_version": "v2"}
    before = ray_metrics(server)
    bodies: dict[str, dict[str, object]] = {}
    with httpx.Client(headers=server.headers, timeout=10) as client:
        for user_id in itertools.islice(itertools.cycle(personalizable), DECISIONS):
            body = {
                "user_id": user_id,
                "purpose": "onsite_personalization",
                "region": "US",
                "budget_ms": PATIENT_BUDGET_MS,
            }
            response = client.post(f"{server.base_url}/v1/rank", json=body)
            assert response.status_code == 200, response.text
            answer = response.json()
            # The answer never carries a sampled explanation: only one asked for.
            assert "explanation" not in answer
            assert all("reasons" not in item for item in answer["items"])
            bodies[answer["request_id"]] = body
        records = wait_for(env, list(bodies))
        assert all(rid in records for rid in bodies)
        scored = [
            records[rid] for rid in bodies if records[rid].fallback is None and records[rid].items
        ]
        assert len(scored) > DECISIONS * 0.9
        explained = [r for r in scored if sampled(r)]
        low, high = binomial_bounds(len(scored), RATE)
        assert low <= len(explained) <= high, (len(explained), len(scored))
        # Exactly the decisions whose request ids the sample chooses, and only model answers.
        assert [r.request_id for r in explained] == [
            r.request_id for r in scored if chosen(r.request_id, RATE)
        ]
        assert not any(records[rid].explained for rid in bodies if records[rid].fallback)

        # The coverage counters (summed over replicas) agree with the records.
        def moved(samples: list[Sample], name: str, **labels: str) -> float:
            return total(samples, name, **labels) - total(before, name, **labels)

        scored_v2 = [r for r in scored if r.model is not None and r.model.version == "v2"]
        after = metrics_when(
            server,
            lambda s: (
                moved(s, "rankgate_explanations_total", **sampled_explained) >= len(explained)
                and moved(s, "rankgate_scored_decisions_total", model_version="v2")
                >= len(scored_v2)
            ),
        )
        assert moved(after, "rankgate_explanations_total", **sampled_explained) == len(explained)
        assert moved(after, "rankgate_scored_decisions_total", model_version="v2") == len(scored_v2)
        # They name the model's inputs, and say what an explanation asked for says.
        names = {spec.name for spec in env.models.manifest("v2").specs}
        assert {
            reason.feature for r in explained for row in r.explanation or [] for reason in row
        } <= names
        # A record with a sampled explanation replays like any other.
        replayed = CliRunner().invoke(main, ["audit", "replay", explained[0].request_id])
        assert replayed.exit_code == 0 and "reproduced: v2" in replayed.output, replayed.output
        for record in explained[:4]:
            asked = client.post(
                f"{server.base_url}/v1/rank",
                json={**bodies[record.request_id], "explain": True},
            ).json()
            assert [[i["item_id"], i["score"]] for i in asked["items"]] == [
                list(item) for item in record.items
            ]
            recorded = [[reason.model_dump() for reason in row] for row in record.explanation or []]
            assert recorded == [i.get("reasons", []) for i in asked["items"]]
