"""Notifications, plain classes: the signature, the webhooks' config, the outbox on the
session's embedded Redis, and the notifier delivering it to real local receivers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from model_store.reference import compute_reference
from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError
from rankgate.core.home import Home
from rankgate.core.redis_server import connect, connect_async, resolve_redis_url
from rankgate.core.settings import get_settings
from rankgate.governance.notifications import (
    ID_HEADER,
    SIGNATURE_HEADER,
    Notification,
    publish,
    publish_async,
    sign,
    verify,
)
from serving.contract.config import DriftConfig, NotificationsConfig
from serving.observe.drift import DriftMonitor, VersionInputs
from serving.observe.metrics import ServingMetrics
from serving.observe.notifier import Notifier, backoff_s, resolve_webhooks
from serving.runtime import parse_config
from tests.observe.test_drift import SPECS, reference_matrix, scores_of
from tests.serving_support import ingress_user_config
from tests.webhook_receiver import WebhookReceiver

SECRET = b"s3cret"


def receiver_verifies(secret: bytes, body: bytes, header: str, tolerance_s: int = 300) -> bool:
    """What docs/operating.md tells a receiver to do, with the standard library only."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    signed = fields["t"].encode() + b"." + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(fields["t"])) <= tolerance_s
    return fresh and hmac.compare_digest(expected, fields["v1"])


def test_a_signature_verifies_and_a_changed_body_or_an_old_one_does_not() -> None:
    body = b'{"kind":"rollback"}'
    now = int(time.time())
    header = sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, body, header) and receiver_verifies(SECRET, body, header)
    assert not verify(SECRET, body + b" ", header)
    assert not verify(b"other", body, header)
    assert not receiver_verifies(b"other", body, header)
    stale = sign(SECRET, body, now - 600)
    assert not verify(SECRET, body, stale) and not receiver_verifies(SECRET, body, stale)
    assert verify(SECRET, body, stale, tolerance_s=900)
    assert not verify(SECRET, body, "v1=abc") and not verify(SECRET, body, "garbage")


def notifications(**overrides: Any) -> dict[str, Any]:
    hook = {
        "name": "ops",
        "url": "https://hooks.example.com/T0/B0/x",
        "kinds": ["rollback", "promotion"],
        "secret_env": "OPS_WEBHOOK_SECRET",
        **overrides,
    }
    return {"webhooks": [hook]}


@pytest.mark.parametrize(
    ("section", "field", "problem"),
    [
        (
            notifications(kinds=["rollback", "deploy"]),
            "notifications.webhooks.0.kinds.1",
            "Input should be",
        ),
        (notifications(kinds=[]), "notifications.webhooks.0.kinds", "at least 1"),
        (
            notifications(url="ftp://example.com/x"),
            "notifications.webhooks.0.url",
            "http:// or https://",
        ),
        (notifications(url="https://"), "notifications.webhooks.0.url", "with a host"),
        (notifications(secret_env="my-secret"), "notifications.webhooks.0.secret_env", "pattern"),
        (
            notifications(url_env="OPS_URL"),
            "notifications.webhooks.0",
            "exactly one of url and url_env",
        ),
        (notifications(secret="inline"), "notifications.webhooks.0.secret", "Extra inputs"),
        (notifications(name="Ops Channel"), "notifications.webhooks.0.name", "pattern"),
        (notifications(timeout_s=0), "notifications.webhooks.0.timeout_s", "greater than 0"),
        (
            {"webhooks": notifications()["webhooks"] * 2},
            "notifications",
            "webhook name 'ops' is used twice",
        ),
        (
            {**notifications(), "max_attempts": 0},
            "notifications.max_attempts",
            "greater than or equal to 1",
        ),
    ],
)
def test_a_bad_webhook_config_is_refused_naming_the_field(
    section: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(ingress_user_config(notifications=section))
    message = refused.value.message
    assert f"field {field!r}" in message and problem in message, message


def test_a_webhook_whose_secret_is_not_in_the_environment_is_refused() -> None:
    config = parse_config(ingress_user_config(notifications=notifications())).notifications
    with pytest.raises(ConfigError) as refused:
        resolve_webhooks(config, {})
    assert "field 'notifications.webhooks.0.secret_env'" in refused.value.message
    assert "OPS_WEBHOOK_SECRET is not set" in refused.value.message
    (hook,) = resolve_webhooks(config, {"OPS_WEBHOOK_SECRET": "abc"})
    assert (hook.name, hook.group, hook.secret) == ("ops", "webhook:ops", b"abc")
    # A URL that is a secret itself (Slack's) comes from the environment too.
    from_env = notifications(url=None, url_env="OPS_WEBHOOK_URL")
    config = parse_config(ingress_user_config(notifications=from_env)).notifications
    secret = {"OPS_WEBHOOK_SECRET": "abc"}
    with pytest.raises(ConfigError) as refused:
        resolve_webhooks(config, secret)
    assert "field 'notifications.webhooks.0.url_env'" in refused.value.message
    assert "OPS_WEBHOOK_URL is not set" in refused.value.message
    with pytest.raises(ConfigError) as refused:
        resolve_webhooks(config, {**secret, "OPS_WEBHOOK_URL": "hooks.example.com/T0"})
    assert "OPS_WEBHOOK_URL must be an http:// or https:// URL" in refused.value.message
    assert "hooks.example.com/T0" not in refused.value.message  # it may be a secret
    url = "https://hooks.example.com/services/T0/B0/x"
    (hook,) = resolve_webhooks(config, {**secret, "OPS_WEBHOOK_URL": url})
    assert hook.url == url
    assert parse_config(ingress_user_config()).notifications.webhooks == []


def test_backoff_doubles_up_to_the_cap_with_the_upper_half_drawn() -> None:
    config = NotificationsConfig(backoff_s=1.0, max_backoff_s=8.0)
    assert [backoff_s(n, config, lambda: 0.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 4, 4]
    assert [backoff_s(n, config, lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]


@pytest.fixture
def namespace(session_home: Home) -> Iterator[str]:
    """A namespace of its own: the session server's notifier never reads it."""
    name = f"{session_home.namespace}-notify-{uuid.uuid4().hex[:8]}"
    yield name
    client = connect(resolve_redis_url(get_settings()))
    keys = [key for key in client.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        client.delete(*keys)


def test_the_outbox_keeps_a_text_and_no_user_ids(namespace: str) -> None:
    client = connect(resolve_redis_url(get_settings()))
    data = {"version": "v2", "user_id": "u-123", "by": [{"anonymous_id": "a-1", "name": "ana"}]}
    assert publish(client, namespace, "approval", "v2 approved for email_marketing", data)
    ((stream_id, fields),) = client.xrange(redis_keys.notifications(namespace))
    stored = Notification.read(stream_id, fields)
    assert stored.kind == "approval" and stored.text == "v2 approved for email_marketing"
    assert stored.data == {"version": "v2", "by": [{"name": "ana"}]}
    body = json.loads(stored.body("ns"))
    assert body["id"] == stream_id.decode() and body["source"] == "ns"
    assert body["text"] == stored.text and body["at"].endswith("Z")
    assert "u-123" not in stored.body("ns").decode() and "a-1" not in stored.body("ns").decode()
    # A topic meant once per period is published once, whoever publishes it again.
    for _ in range(3):
        assert publish(client, namespace, "drift_flag", "flag", {}, once="drift_flag:v2:score")
    assert client.xlen(redis_keys.notifications(namespace)) == 2
    # An unknown kind is logged, not published, and never raises.
    assert not publish(client, namespace, "deploy", "x")  # type: ignore[arg-type]


def test_publishing_never_raises_when_redis_does_not_answer(namespace: str) -> None:
    gone = "redis://127.0.0.1:9"  # discard port: nothing listens
    # A client as a replica or the CLI holds one when Redis goes away after it connected.
    client = redis.Redis.from_url(gone, socket_connect_timeout=0.2, socket_timeout=0.2)
    assert publish(client, namespace, "promotion", "v3 promoted") is False

    async def publish_from_a_replica() -> bool:
        replica = connect_async(gone, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            return await publish_async(replica, namespace, "rollback", "v3 rolled back")
        finally:
            await replica.aclose()

    assert asyncio.run(publish_from_a_replica()) is False


def sample(metrics: ServingMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_the_notifier_retries_signs_and_keeps_each_webhook_to_itself(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_TEST_SECRET", SECRET.decode())
    hooks = {"flaky": ["rollback", "promotion"], "refusing": ["rollback"], "stuck": ["rollback"]}
    metrics = ServingMetrics(to_ray=False, flush_s=None)
    with (
        WebhookReceiver(statuses=[500]) as flaky,
        WebhookReceiver(statuses=[404]) as refusing,
        WebhookReceiver(hang_s=10) as stuck,
    ):
        urls = {"flaky": flaky.url, "refusing": refusing.url, "stuck": stuck.url}
        config = NotificationsConfig.model_validate(
            {
                "webhooks": [
                    {
                        "name": name,
                        "url": urls[name],
                        "kinds": kinds,
                        "secret_env": "NOTIFY_TEST_SECRET",
                        "timeout_s": 0.3,
                    }
                    for name, kinds in hooks.items()
                ],
                "max_attempts": 3,
                "backoff_s": 0.05,
            }
        )

        async def deliver() -> list[dict[str, str]]:
            client = connect_async(resolve_redis_url(get_settings()))
            notifier = Notifier(client, namespace, metrics)
            try:
                await notifier.use(config, resolve_webhooks(config))
                for kind, text in (("rollback", "v3 rolled back"), ("approval", "v3 approved")):
                    assert await publish_async(client, namespace, kind, text, {"version": "v3"})  # type: ignore[arg-type]
                assert await publish_async(client, namespace, "promotion", "v4 promoted")
                # The flaky webhook has all of its own while the stuck one still hangs.
                await asyncio.to_thread(flaky.wait_for, 3, 10)
                assert stuck.hanging.is_set()
                dead = redis_keys.notifications_dead(namespace)
                deadline = time.monotonic() + 10
                while await client.xlen(dead) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert notifier.describe() == {
                    "webhooks": ["flaky", "refusing", "stuck"],
                    "delivering": True,
                }
                entries = await client.xrange(dead)
                return [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
            finally:
                await notifier.close()
                await client.aclose()

        dead = asyncio.run(deliver())

    first, second, promoted = flaky.received
    assert [r.answered for r in flaky.received] == [500, 200, 200]
    # The retry is the same notification (same id), signed afresh.
    assert (
        first.body == second.body
        and first.headers[ID_HEADER.lower()] == second.headers[ID_HEADER.lower()]
    )
    for received in flaky.received:
        assert receiver_verifies(SECRET, received.body, received.headers[SIGNATURE_HEADER.lower()])
        assert received.headers["content-type"] == "application/json"
    body = json.loads(second.body)
    assert (body["kind"], body["text"], body["data"]) == (
        "rollback",
        "v3 rolled back",
        {"version": "v3"},
    )
    assert json.loads(promoted.body)["kind"] == "promotion"  # the approval is not flaky's kind
    assert [r.answered for r in refusing.received] == [404]  # a 4xx is not retried
    assert {(d["webhook"], d["reason"], d["attempts"]) for d in dead} == {
        ("refusing", "refused", "1"),
        ("stuck", "attempts", "3"),
    }
    assert all(d["kind"] == "rollback" and d["id"] == body["id"] for d in dead)
    labels = {"webhook": "flaky", "kind": "rollback"}
    assert sample(metrics, "rankgate_notifications_delivered_total", **labels) == 1
    assert sample(metrics, "rankgate_notifications_retried_total", **labels) == 1
    assert sample(metrics, "rankgate_notification_delivery_seconds_count", **labels) == 1
    assert (
        sample(metrics, "rankgate_notifications_delivered_total", webhook="flaky", kind="promotion")
        == 1
    )
    assert (
        sample(
            metrics,
            "rankgate_notifications_failed_total",
            webhook="refusing",
            kind="rollback",
            reason="refused",
        )
        == 1
    )
    assert (
        sample(
            metrics,
            "rankgate_notifications_failed_total",
            webhook="stuck",
            kind="rollback",
            reason="attempts",
        )
        == 1
    )
    assert (
        sample(metrics, "rankgate_notifications_retried_total", webhook="stuck", kind="rollback")
        == 2
    )


def test_a_drift_flag_is_published_once_across_replicas_while_it_stays_raised(
    namespace: str,
) -> None:
    rng = np.random.default_rng(0)
    matrix = reference_matrix(rng)
    reference = compute_reference(SPECS, matrix, scores_of(matrix), "training matrix")
    inputs = VersionInputs([s.name for s in SPECS], [s.group for s in SPECS], reference)
    config = DriftConfig(window_s=300, min_rows=1000)
    replicas = [DriftMonitor(ServingMetrics(to_ray=False, flush_s=None)) for _ in range(2)]

    async def refresh_all(rounds: int) -> None:
        client = connect_async(resolve_redis_url(get_settings()))
        try:
            for _ in range(rounds):
                for monitor in replicas:
                    shifted = reference_matrix(rng, 2000)
                    shifted[:, 0] += 20  # prices went up: the feature and score flags
                    monitor.observe("v1", shifted, scores_of(shifted))
                    await monitor.refresh_and_write(client, namespace)
        finally:
            await client.aclose()

    for monitor in replicas:
        monitor.use(config, {"v1": inputs})
    asyncio.run(refresh_all(rounds=2))
    client = connect(resolve_redis_url(get_settings()))
    published = [
        Notification.read(i, f)
        for i, f in client.xrange(redis_keys.notifications(namespace))  # type: ignore[union-attr]
    ]
    assert sorted(n.data["flag"] for n in published) == ["feature", "score"]
    for n in published:
        assert n.kind == "drift_flag" and n.data["version"] == "v1"
        assert n.text.startswith(f"Drift flag '{n.data['flag']}' raised for model version v1")
        assert n.data["top_feature_psi"]["price"] > config.feature_psi
    assert all(m.windows["v1"].notified == {"feature", "score"} for m in replicas)
