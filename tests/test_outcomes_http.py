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
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from rankgate import redis_keys
from rankgate.cli import main
from rankgate.settings import get_project
from rankgate.setup import Environment
from serving.experiments import read_rollbacks
from serving.feedback import project_outcomes, read_outcomes
from serving.promotion import reset_canary_outcomes
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
