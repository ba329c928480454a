"""Notifications on the real server: an automatic rollback reaches a local webhook
receiver signed, after a retry, while another webhook hangs and no request waits for it."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from itertools import cycle

import httpx
import pytest

from loadtests.ray_metrics import total
from rankgate.governance.notifications import ID_HEADER, SIGNATURE_HEADER, verify
from rankgate.ops.environment import Environment
from tests.conftest import WEBHOOK_SECRET_ENV, Server
from tests.serving_support import (
    PATIENT_BUDGET_MS,
    copy_with_wrong_width,
    deploy,
    health,
    ingress_user_config,
    metrics_when,
    routing,
)
from tests.webhook_receiver import WebhookReceiver

CANARY = "v1-raises-notify"


@pytest.fixture
def raising_canary(env: Environment) -> Iterator[str]:
    """A copy of v1 whose every scoring call raises (its manifest lists a feature more)."""
    folder = copy_with_wrong_width(env.models, "v1", CANARY)
    yield CANARY
    shutil.rmtree(folder)


def rank(client: httpx.Client, server: Server, user: str) -> int:
    body = {
        "user_id": user,
        "purpose": "onsite_personalization",
        "region": "US",
        "budget_ms": PATIENT_BUDGET_MS,
    }
    answer = client.post(f"{server.base_url}/v1/rank", json=body, headers=server.headers)
    return answer.status_code


@pytest.mark.usefixtures("restore")
def test_a_rollback_reaches_the_webhook_signed_and_a_hanging_webhook_delays_no_request(
    server: Server, personalizable: list[str], raising_canary: str
) -> None:
    secret = os.environ[WEBHOOK_SECRET_ENV].encode()
    with WebhookReceiver(statuses=[500]) as ops, WebhookReceiver(hang_s=30) as stuck:
        hook = {"kinds": ["rollback"], "secret_env": WEBHOOK_SECRET_ENV}
        notifications = {
            "webhooks": [
                {"name": "ops", "url": ops.url, **hook},
                {"name": "stuck", "url": stuck.url, **hook, "timeout_s": 3},
            ],
            "max_attempts": 2,
            "backoff_s": 0.2,
        }
        section = {
            **routing("v2", canary=raising_canary, weight=50, alternate=["v1"]),
            "rollback": {"window_s": 60, "min_requests": 10, "max_error_rate_delta": 0.05},
        }
        deploy(
            server,
            "notify",
            ingress_user_config(routing=section, notifications=notifications),
            lambda h: (
                h["routing"]["canary_weight"] == 50
                and h["notifications"]["webhooks"] == ["ops", "stuck"]
            ),
        )
        statuses: Counter[int] = Counter()
        users = cycle(personalizable)
        with httpx.Client(timeout=30) as client:
            for _ in range(40):  # batches of 10 requests: the rule needs 10 per variant
                for _ in range(10):
                    statuses[rank(client, server, next(users))] += 1
                if health(server)["routing"]["rolled_back"]:
                    break
            assert health(server)["routing"]["rolled_back"] == [raising_canary], statuses
            # The stuck webhook holds its delivery; requests meanwhile are answered.
            assert stuck.hanging.wait(15), "the rollback never reached the hanging webhook"
            for _ in range(30):
                statuses[rank(client, server, next(users))] += 1
            assert stuck.hanging.is_set() and not stuck.received  # still hanging
        assert statuses == Counter({200: sum(statuses.values())}), statuses

        first, retried = ops.wait_for(2, timeout_s=15)[:2]
    assert (first.answered, retried.answered) == (500, 200)
    assert first.headers[ID_HEADER.lower()] == retried.headers[ID_HEADER.lower()]
    for received in (first, retried):
        assert verify(secret, received.body, received.headers[SIGNATURE_HEADER.lower()])
    assert not verify(b"not the secret", retried.body, retried.headers[SIGNATURE_HEADER.lower()])
    payload = json.loads(retried.body)
    assert payload["kind"] == "rollback" and payload["id"] == retried.headers[ID_HEADER.lower()]
    data = payload["data"]
    assert (data["version"], data["rule"], data["automatic"]) == (
        raising_canary,
        "error_rate",
        True,
    )
    assert data["stable_version"] == "v2" and data["canary"]["requests"] >= 10
    assert payload["text"].startswith(
        f"Canary {raising_canary} was rolled back automatically: rule error_rate fired"
    )
    # No user id travels: none of the users who were ranked appears in the body.
    assert not any(user in retried.body.decode() for user in personalizable)

    # Delivery outcomes are metrics, where Prometheus scrapes them.
    ops_rollbacks = {"webhook": "ops", "kind": "rollback"}
    samples = metrics_when(
        server, lambda s: total(s, "rankgate_notifications_delivered_total", **ops_rollbacks) >= 1
    )
    assert total(samples, "rankgate_notifications_delivered_total", **ops_rollbacks) == 1
    assert total(samples, "rankgate_notifications_retried_total", **ops_rollbacks) == 1
