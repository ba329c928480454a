"""Propensities and exploration on the real server: every decision logs the probability
of each shown item; a purpose with exploration draws its answers, logs the draw and
never explores on people the gate does not clear; replay reproduces a draw."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.samples import Sample

from loadtests.ray_metrics import total
from rankgate.cli.main import main
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.observe.test_audit_http import decide, wait_for
from tests.serving_support import deploy, ingress_user_config, metrics_when, ray_metrics, user_with

PURPOSE = "onsite_personalization"
EXPLORATION = {"method": "plackett_luce", "temperature": 1.0, "max_shift": 2}


@pytest.fixture
def exploring(server: Server, tmp_path: Path) -> Iterator[None]:
    """The server with exploration enabled for PURPOSE; the default policy afterwards."""
    from rankgate.governance.policy import load_policy_set, policy_dir

    policy = yaml.safe_load((policy_dir() / "policy.yaml").read_text())
    policy["purposes"][PURPOSE]["exploration"] = EXPLORATION
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    (tmp_path / "fallback.yaml").write_bytes((policy_dir() / "fallback.yaml").read_bytes())
    digest = load_policy_set(tmp_path).digest
    user_config = ingress_user_config(policy={"dir": str(tmp_path)})
    deploy(server, "exploring", user_config, lambda h: h["policy_digest"] == digest)
    yield
    default = load_policy_set().digest
    deploy(server, "default", ingress_user_config(), lambda h: h["policy_digest"] == default)


def explored_counts(samples: list[Sample]) -> dict[str, float]:
    """Exploration answers of PURPOSE by `explored`, summed over replicas."""
    name = "rankgate_exploration_answers_total"
    return {
        flag: total(samples, name, purpose=PURPOSE, explored=flag) for flag in ("true", "false")
    }


def test_deterministic_answers_log_probability_one(server: Server, env: Environment) -> None:
    granted = user_with(env.consent, PURPOSE, ConsentState.GRANTED)
    denied = user_with(env.consent, PURPOSE, ConsentState.DENIED)
    ids = [decide(server, user_id=u, purpose=PURPOSE, region="US", k=4) for u in (granted, denied)]
    records = wait_for(env, ids)
    ranked, fallback = records[ids[0]], records[ids[1]]
    assert ranked.choice is not None and ranked.choice.method == "top_k"
    assert ranked.choice.deterministic and ranked.propensities == [1.0] * 4
    assert fallback.choice is not None and fallback.choice.method == "fallback"
    assert fallback.choice.deterministic and fallback.propensities == [1.0] * 4


@pytest.mark.usefixtures("exploring")
def test_exploration_draws_logs_and_replays(server: Server, env: Environment) -> None:
    granted = [user_with(env.consent, PURPOSE, ConsentState.GRANTED, skip=n) for n in range(5)]
    denied = user_with(env.consent, PURPOSE, ConsentState.DENIED)
    before = explored_counts(ray_metrics(server))
    ids = [
        decide(server, user_id=granted[n % 5], purpose=PURPOSE, region="US", k=5) for n in range(60)
    ]
    denied_ids = [decide(server, user_id=denied, purpose=PURPOSE, region="US") for _ in range(5)]
    records = wait_for(env, ids + denied_ids)
    drawn = [records[rid] for rid in ids]
    assert all(r.fallback is None for r in drawn)
    assert all(r.choice is not None and r.choice.method == "plackett_luce" for r in drawn)
    explored = [r for r in drawn if r.choice is not None and r.choice.explored]
    # With temperature 1 and a cap of 2, most answers of 5 differ from the top 5.
    assert len(explored) > len(drawn) // 2, len(explored)
    for record in drawn:
        assert record.propensities is not None and len(record.propensities) == 5
        assert all(0 < p <= 1 for p in record.propensities)
        assert record.choice is not None and record.choice.exploration == EXPLORATION
    # An explored answer differs from the top 5: another item, or another order. At
    # temperature 1 some of them put a lower score above a higher one (one that only
    # swapped in the 6th item for the 5th is still in score order). Their propensities
    # are below 1.
    out_of_order = [
        r
        for r in explored
        if [s for _, s in r.items] != sorted((s for _, s in r.items), reverse=True)
    ]
    assert out_of_order, [r.items for r in explored]
    sample = out_of_order[0]
    assert min(sample.propensities or [1.0]) < 1.0

    # The gate did not clear this person: the fallback answered, nothing was drawn.
    for rid in denied_ids:
        record = records[rid]
        assert record.fallback is not None and record.choice is not None
        assert record.choice.method == "fallback" and record.propensities == [1.0] * len(
            record.items
        )

    def gained(samples: list[Sample]) -> dict[str, float]:
        after = explored_counts(samples)
        return {k: after[k] - before[k] for k in after}

    counted = gained(metrics_when(server, lambda s: sum(gained(s).values()) >= len(drawn)))
    assert counted == {"true": len(explored), "false": len(drawn) - len(explored)}

    # Replay draws the same answer from the recorded seed.
    result = CliRunner().invoke(main, ["audit", "replay", sample.request_id])
    assert result.exit_code == 0, result.output
    assert "reproduced: v2 ranks the recorded features exactly as recorded" in result.output


def test_exploration_is_off_by_default(server: Server) -> None:
    health = httpx.get(f"{server.base_url}/healthz", timeout=10)
    assert health.status_code == 200
    from rankgate.governance.policy import load_policy

    assert all(p.exploration is None for p in load_policy().purposes.values())
