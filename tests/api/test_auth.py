"""API keys: hashed at rest, scoped to purposes, checked on every /v1 call, revocable live."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.pseudonym import user_key
from rankgate.governance.api_keys import ApiKeyError, ApiKeyStore, key_digest
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.serving_support import user_with

PURPOSES = ("onsite_personalization", "email_marketing")


def store(env: Environment) -> ApiKeyStore:
    return ApiKeyStore(env.redis, env.home.namespace)


def rank_body(user_id: str, purpose: str = "onsite_personalization") -> dict[str, object]:
    return {"user_id": user_id, "purpose": purpose, "region": "US", "k": 3}


def test_only_the_digest_is_stored(env: Environment) -> None:
    key = store(env).create("shop-web", ["onsite_personalization"], PURPOSES)
    stored = env.redis.hgetall(redis_keys.api_keys(env.home.namespace))
    assert key_digest(key).encode() in stored
    everything = b" ".join([*stored.keys(), *stored.values()])
    assert key.encode() not in everything and key[7:].encode() not in everything
    assert store(env).table().lookup(key).purposes == {"onsite_personalization"}  # type: ignore[union-attr]
    assert store(env).table().lookup(key + "x") is None


@pytest.mark.parametrize(
    ("app", "purposes", "message"),
    [
        ("bad app", ["onsite_personalization"], "application name 'bad app'"),
        ("crm", ["sms_marketing"], "unknown purpose 'sms_marketing'"),
        ("crm", [], "at least one --purpose"),
    ],
)
def test_bad_key_requests_are_refused(
    env: Environment, app: str, purposes: list[str], message: str
) -> None:
    before = env.redis.hlen(redis_keys.api_keys(env.home.namespace))
    with pytest.raises(ApiKeyError, match=message):
        store(env).create(app, purposes, PURPOSES)
    assert env.redis.hlen(redis_keys.api_keys(env.home.namespace)) == before


def test_keys_cli_creates_lists_and_revokes(env: Environment) -> None:
    runner = CliRunner()
    created = runner.invoke(
        main, ["keys", "create", "crm-tool", "--purpose", "email_marketing"], catch_exceptions=False
    )
    assert created.exit_code == 0, created.output
    key = created.output.split()[-1]
    assert key.startswith("rg_") and store(env).table().lookup(key) is not None

    listed = runner.invoke(main, ["keys", "list"])
    line = next(li for li in listed.output.splitlines() if li.startswith("crm-tool"))
    assert "email_marketing" in line and key[:7] in line and key not in listed.output

    revoked = runner.invoke(main, ["keys", "revoke", "crm-tool"])
    assert revoked.exit_code == 0 and "revoked 1 key of crm-tool" in revoked.output
    assert store(env).table().lookup(key) is None
    again = runner.invoke(main, ["keys", "revoke", "crm-tool"])
    assert again.exit_code == 1 and "no API keys for application 'crm-tool'" in again.output

    unknown = runner.invoke(main, ["keys", "create", "x", "--purpose", "nope"])
    assert unknown.exit_code == 1 and "unknown purpose 'nope'" in unknown.output


def test_missing_and_wrong_keys_get_the_same_401(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    url = f"{server.base_url}/v1/rank"
    missing = httpx.post(url, json=rank_body(uid), timeout=10)
    wrong = httpx.post(
        url, json=rank_body(uid), headers={"Authorization": "Bearer rg_not-a-key"}, timeout=10
    )
    basic = httpx.post(url, json=rank_body(uid), auth=("shop", "secret"), timeout=10)
    for response in (missing, wrong, basic):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == missing.json()
    assert missing.json()["error"] == "unauthorized"
    # A bad body without a key is still a 401: nothing about the schema leaks.
    assert httpx.post(url, json={"nonsense": 1}, timeout=10).status_code == 401
    consent = httpx.post(
        f"{server.base_url}/v1/consent",
        json={"user_id": uid, "purposes": {"onsite_personalization": False}, "source": "cmp"},
        timeout=10,
    )
    assert consent.status_code == 401
    assert env.consent.state(user_key(uid), "onsite_personalization") is ConsentState.GRANTED


def test_a_key_is_limited_to_its_purposes(server: Server, env: Environment) -> None:
    key = store(env).create("newsletter", ["email_marketing"], PURPOSES)
    headers = {"Authorization": f"Bearer {key}"}
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    deadline = time.monotonic() + 10  # replicas re-read the key table every second
    while True:
        allowed = httpx.post(
            f"{server.base_url}/v1/rank",
            json=rank_body(uid, "email_marketing"),
            headers=headers,
            timeout=10,
        )
        if allowed.status_code != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert allowed.status_code == 200, allowed.text

    onsite = httpx.post(
        f"{server.base_url}/v1/rank", json=rank_body(uid), headers=headers, timeout=10
    )
    assert onsite.status_code == 403
    assert onsite.json() == {
        "error": "forbidden",
        "problems": [],
        "detail": "this API key may not be used for purpose 'onsite_personalization'",
    }
    # A write needs every purpose it records, whichever form carries the id.
    decisions = {"purposes": {"onsite_personalization": False}, "source": "cmp"}
    for consent in (
        httpx.post(
            f"{server.base_url}/v1/consent",
            json={"user_id": uid, **decisions},
            headers=headers,
            timeout=10,
        ),
        httpx.put(
            f"{server.base_url}/v1/consent/{uid}", json=decisions, headers=headers, timeout=10
        ),
    ):
        assert consent.status_code == 403, consent.text
    assert env.consent.state(user_key(uid), "onsite_personalization") is ConsentState.GRANTED


def test_a_revoked_key_stops_working_without_a_restart(server: Server, env: Environment) -> None:
    key = store(env).create("campaigns", list(PURPOSES), PURPOSES)
    headers = {"Authorization": f"Bearer {key}"}
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    started = httpx.get(f"{server.base_url}/healthz", timeout=10).json()["replica_started"]

    def status() -> int:
        return httpx.post(
            f"{server.base_url}/v1/rank", json=rank_body(uid), headers=headers, timeout=10
        ).status_code

    def wait_for(expected: int) -> float:
        begun = time.monotonic()
        while status() != expected:
            assert time.monotonic() - begun < 10, f"still not {expected} after 10 s"
            time.sleep(0.1)
        return time.monotonic() - begun

    wait_for(200)
    time.sleep(3)  # no traffic: the replica must re-read the table on its own
    assert store(env).revoke("campaigns") == 1
    time.sleep(1.5)  # auth.refresh_s is 1 s
    assert status() == 401
    assert httpx.get(f"{server.base_url}/healthz", timeout=10).json()["replica_started"] == started


def test_key_checks_while_redis_is_unreachable(env: Environment) -> None:
    """Known keys keep working from the replica's copy; an unknown key cannot be
    told apart from one created during the outage, so it gets a 503, not a 401."""
    import asyncio

    import redis.asyncio as aioredis

    from serving.http.auth import AuthUnavailable, KeyCache, Unauthorized
    from serving.ops.launch import free_port

    key = store(env).create("offline-check", ["onsite_personalization"], PURPOSES)

    async def scenario() -> None:
        live = KeyCache(aioredis.Redis.from_url(env.redis_url), env.home.namespace)
        assert await live.load()
        assert (await live.authenticate(key)).app == "offline-check"
        with pytest.raises(Unauthorized):
            await live.authenticate("rg_wrong")  # Redis up: a wrong key is a 401
        live.client = aioredis.Redis.from_url(
            f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2
        )
        assert (await live.authenticate(key)).app == "offline-check"
        live.loaded_at = 0.0
        with pytest.raises(AuthUnavailable):
            # Shaped like a key: it could be one created during the outage.
            await live.authenticate("rg_" + secrets.token_urlsafe(32))

    asyncio.run(scenario())
