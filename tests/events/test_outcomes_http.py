"""Outcomes over HTTP on the real server: impressions and clicks posted to /v1/events
join the answers they name (the consumer deployment), and a canary whose answers
are clicked less is rolled back by the click-rate rule.

Event type names come from the served project's `events.outcomes`: nothing here
assumes the example's catalogue or its ids.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.settings import get_project
from rankgate.ops.environment import Environment
from serving.observe.outcomes import project_outcomes, read_outcomes
from serving.observe.routing_log import read_rollbacks
from serving.ops.promotion import reset_canary_outcomes
from tests.conftest import Server
from tests.serving_support import deploy, health, ingress_user_config, routing

# The served project's outcome types (the example declares them; the test fails,
# not skips, if they are gone).
OUTCOMES = project_outcomes(get_project())
assert OUTCOMES is not None and OUTCOMES.impression and OUTCOMES.click, OUTCOMES
# Deterministic click rates: stable's first item is clicked in every 3rd answer,
# the canary's in every 25th (about 6.7 % and 0.8 % of impressions at k=5).
STABLE_EVERY, CANARY_EVERY, K = 3, 25, 5
RULES = {
    "min_impressions": 150,
    "ctr_p_value": 0.01,
    # The request-window rules must not be what fires.
    "min_requests": 1_000_000,
}


@pytest.fixture
def counters(server: Server) -> Iterator[Environment]:
    env = Environment.open()
    namespace = env.home.namespace

    def clear() -> None:
        keys = list(env.redis.scan_iter(match=redis_keys.outcomes(namespace, "*", "*")))
        env.redis.delete(redis_keys.outcomes_unjoined(namespace), *keys)

    clear()
    yield env
    clear()


def outcome(kind: str, user_id: str, item_id: Any, request_id: str) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "type": kind,
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": time.time(),
        "request_id": request_id,
    }


@pytest.mark.usefixtures("restore")
def test_a_canary_clicked_less_is_rolled_back_by_the_ctr_rule(
    server: Server, personalizable: list[str], counters: Environment
) -> None:
    assert OUTCOMES is not None and OUTCOMES.impression and OUTCOMES.click
    env = counters
    # As `rankgate model promote v1 --canary 50` does: the canary counts from zero.
    reset_canary_outcomes(env.redis, env.home.namespace, "v1", "v2")
    section = {
        **routing("v2", canary="v1", weight=50),
        "rollback": {**ingress_user_config()["routing"]["rollback"], **RULES},
    }
    deploy(
        server,
        "ctr-canary",
        ingress_user_config(routing=section),
        lambda h: h["routing"]["canary_weight"] == 50,
    )
    answered = {"stable": 0, "canary": 0}
    started = time.monotonic()
    n = 0
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=10) as client:
        while not health(server)["routing"]["rolled_back"]:
            assert time.monotonic() - started < 90, f"no rollback: {answered}"
            events = []
            for _ in range(10):
                user = personalizable[n % len(personalizable)]
                n += 1
                answer = client.post(
                    "/v1/rank",
                    json={
                        "user_id": user,
                        "purpose": "onsite_personalization",
                        "region": "US",
                        "k": K,
                        "budget_ms": 500,
                    },
                ).json()
                if answer["fallback"] is not None or answer["model"] is None:
                    continue
                variant = answer["model"]["variant"]
                answered[variant] += 1
                request_id, items = answer["request_id"], [i["item_id"] for i in answer["items"]]
                events += [outcome(OUTCOMES.impression, user, i, request_id) for i in items]
                every = STABLE_EVERY if variant == "stable" else CANARY_EVERY
                if answered[variant] % every == 0:
                    events.append(outcome(OUTCOMES.click, user, items[0], request_id))
            if events:
                posted = client.post("/v1/events", json={"events": events})
                assert posted.status_code == 202, posted.text
    elapsed = time.monotonic() - started
    print(f"\nrolled back after {elapsed:.1f}s; answers {answered}")
    assert health(server)["routing"]["rolled_back"] == ["v1"]
    event = read_rollbacks(env.redis, env.home.namespace)["v1"]
    assert event["rule"] == "ctr" and "Fisher exact" in event["detail"]
    canary, stable = event["canary"], event["stable"]
    assert min(canary["impressions"], stable["impressions"]) >= RULES["min_impressions"]
    assert canary["ctr"] < stable["ctr"] and canary["p_value"] < RULES["ctr_p_value"]
    # The counters the rule read are the joined outcomes, by position.
    joined = read_outcomes(env.redis, env.home.namespace, "v1", "canary")
    assert joined.impressions >= canary["impressions"]
    by_position = joined.by_position.values()
    assert sum(p.get("impressions", 0) for p in by_position) == joined.impressions
    assert sum(p.get("clicks", 0) for p in by_position) == joined.clicks
    assert set(joined.by_position) <= set(range(1, K + 1))
    status = CliRunner().invoke(main, ["model", "status"])
    assert status.exit_code == 0, status.output
    assert "automatic rollback of v1" in status.output and "rule ctr fired" in status.output
    assert "CTR by position" in status.output


@pytest.mark.usefixtures("restore")
def test_the_audit_log_joined_with_outcomes_evaluates_versions_and_shadows(
    server: Server, personalizable: list[str], tmp_path: Path
) -> None:
    """Answers drawn by epsilon-greedy exploration, with v1 in shadow: their impressions
    and clicks make logged slots with the logged propensities; `model evaluate --audit`
    and `model status` estimate v1 against stable on them."""
    import json

    import yaml

    from rankgate.governance.policy import load_policy_set, policy_dir
    from serving.ops.audit_evidence import read_audit_evidence

    assert OUTCOMES is not None and OUTCOMES.impression and OUTCOMES.click
    policy = yaml.safe_load((policy_dir() / "policy.yaml").read_text())
    policy["purposes"]["onsite_personalization"]["exploration"] = {
        "method": "epsilon_greedy",
        "epsilon": 0.5,
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    (tmp_path / "fallback.yaml").write_bytes((policy_dir() / "fallback.yaml").read_bytes())
    digest = load_policy_set(tmp_path).digest
    deploy(
        server,
        "shadow-exploring",
        ingress_user_config(policy={"dir": str(tmp_path)}, routing=routing("v2", shadow=["v1"])),
        lambda h: h["policy_digest"] == digest,
    )
    env = Environment.open()
    started = time.time()
    answered: list[str] = []
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=10) as client:
        events = []
        for n in range(90):
            user = personalizable[n % len(personalizable)]
            answer = client.post(
                "/v1/rank",
                json={
                    "user_id": user,
                    "purpose": "onsite_personalization",
                    "region": "US",
                    "k": 3,
                    "budget_ms": 500,
                },
            ).json()
            if answer["fallback"] is not None:
                continue
            request_id, items = answer["request_id"], [i["item_id"] for i in answer["items"]]
            answered.append(request_id)
            events += [outcome(OUTCOMES.impression, user, i, request_id) for i in items]
            if n % 4 == 0:
                events.append(outcome(OUTCOMES.click, user, items[n % 3], request_id))
        for start in range(0, len(events), 100):
            posted = client.post("/v1/events", json={"events": events[start : start + 100]})
            assert posted.status_code == 202, posted.text
    deadline = time.monotonic() + 30
    while True:
        logs = read_audit_evidence(env.redis, env.home.namespace, OUTCOMES, "10m")
        mine = {d.group for d in logs.decisions} & set(answered)
        if len(mine) == len(answered) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(mine) == len(answered) > 60, (len(mine), len(answered), logs.skipped)
    ours = [d for d in logs.decisions if d.group in mine]
    assert all(len(d.shown) == 3 for d in ours)
    propensities = {s.propensity for d in ours for s in d.shown}
    assert any(p < 1 for p in propensities)  # what exploration logged
    since = f"{int(time.time() - started) + 5}s"
    result = CliRunner().invoke(
        main,
        ["model", "evaluate", "v1", "--against", "v2", "--audit", "--since", since, "--json"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    # The window may hold other tests' decisions too: at least ours are in it.
    assert figures["slots"] >= 3 * len(answered), figures["source"]
    assert figures["clicks"] >= sum(1 for e in events if e["type"] == OUTCOMES.click)
    for name in ("ips", "snips", "dr"):
        found = figures["versions"]["v1"][name]
        assert found["low"] <= found["value"] <= found["high"]
    print(
        f"\naudit: {figures['slots']} slots, {figures['clicks']} clicks; v1 snips "
        f"{figures['versions']['v1']['snips']['value']:.4f} vs v2 "
        f"{figures['versions']['v2']['snips']['value']:.4f}, "
        f"{figures['comparisons']['snips']['verdict']}"
    )
    # The status of a config whose routing has v1 in shadow, as the server serves it.
    document = yaml.safe_load(server.config_path.read_text())
    for deployment in document["applications"][0]["deployments"]:
        if deployment["name"] == "RankIngress":
            deployment["user_config"]["routing"] = routing("v2", shadow=["v1"])
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(document))
    status = CliRunner().invoke(
        main, ["model", "status", "--since", since, "--config", str(config)]
    )
    assert status.exit_code == 0, status.output
    assert "off-policy evidence (audit since" in status.output, status.output
    assert "v1 " in status.output and "effective sample size" in status.output
