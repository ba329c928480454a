"""The real server over HTTP: `serve run` of serve_config.yaml, real Redis, Feast, ONNX, SHAP."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from rankgate.consent import ConsentState
from rankgate.home import Home
from rankgate.redis_server import EmbeddedRedis
from rankgate.setup import Environment
from tests.conftest import Server
from tests.serving_support import (
    copy_with_wrong_width,
    deploy,
    ingress_user_config,
    routing,
    user_with,
)


def post_rank(server: Server, timeout: float = 10, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/rank", json=body, headers=server.headers, timeout=timeout
    )


def test_contract_of_a_personalized_answer(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    response = post_rank(
        server,
        user_id=uid,
        purpose="onsite_personalization",
        region="EU",
        candidates=[3, 17, 42, 5],
        k=10,
        context={"channel": "web", "device": "mobile"},
        explain=False,
        budget_ms=200,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "items", "model", "fallback", "policy", "timings_ms"}
    assert body["fallback"] is None
    assert body["model"] == {"name": "ranker", "version": "v2", "variant": "stable"}
    assert [i["item_id"] for i in body["items"]] != [] and 5 not in [
        i["item_id"] for i in body["items"]
    ]
    assert [i["rank"] for i in body["items"]] == [1, 2, 3]
    assert body["policy"]["decision"] == "personalize" and body["policy"]["version"]
    assert set(body["timings_ms"]) == {"queued", "policy", "features", "rank", "explain", "total"}


def test_explained_answer_has_reasons(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=2)
    body = post_rank(
        server,
        user_id=uid,
        purpose="onsite_personalization",
        region="US",
        k=3,
        explain=True,
        budget_ms=300,
    ).json()
    assert body["explanation"] == {"status": "explained"}
    assert all("reasons" in item for item in body["items"])


def test_no_consent_is_a_degraded_200(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "email_marketing", ConsentState.DENIED)
    response = post_rank(server, user_id=uid, purpose="email_marketing", region="US", k=5)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] is None
    assert body["fallback"] == {"reason": "no_consent", "strategy": "popularity"}
    assert len(body["items"]) == 5


def test_put_consent_changes_the_next_answer(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.DENIED, skip=3)
    before = post_rank(server, user_id=uid, purpose="onsite_personalization", region="EU").json()
    assert before["fallback"]["reason"] == "no_consent"
    put = httpx.put(
        f"{server.base_url}/v1/consent/{uid}",
        json={"purposes": {"onsite_personalization": True}, "source": "cmp"},
        headers=server.headers,
        timeout=10,
    )
    assert put.status_code == 200, put.text
    assert put.json() == {"recorded": {"onsite_personalization": True}, "source": "cmp"}
    after = post_rank(server, user_id=uid, purpose="onsite_personalization", region="EU").json()
    assert after["fallback"] is None and after["model"]["version"] == "v2"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"purpose": "telepathy"}, 422, "purpose"),
        ({"k": 1000}, 422, "k"),
        ({"budget_ms": 0}, 422, "budget_ms"),
        ({"candidates": list(range(600))}, 422, "candidates"),
        ({"user_id": 42}, 422, "user_id"),
        ({"debug": True}, 422, "debug"),
        ({"context": {"notes": "x" * 70_000}}, 413, "body"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    server: Server, body: dict[str, Any], status: int, field: str
) -> None:
    request = {"user_id": "u-1", "purpose": "onsite_personalization", "region": "EU", **body}
    response = httpx.post(
        f"{server.base_url}/v1/rank", json=request, headers=server.headers, timeout=10
    )
    assert response.status_code == status, response.text
    assert field in [p["field"] for p in response.json()["problems"]]


def test_non_json_body_is_a_422(server: Server) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/rank", content=b"user_id=u-1", headers=server.headers, timeout=10
    )
    assert response.status_code == 422
    assert response.json()["problems"][0]["field"] == "body"


def test_bad_consent_changes_nothing(server: Server, env: Environment) -> None:
    from rankgate.pseudonym import user_key

    uid = user_with(env.consent, "email_marketing", ConsentState.DENIED, skip=4)
    for body, field in [
        ({"purposes": {"telepathy": True}, "source": "cmp"}, "purposes.telepathy"),
        ({"purposes": {"email_marketing": "yes"}, "source": "cmp"}, "purposes.email_marketing"),
        ({"purposes": {"email_marketing": True}}, "source"),
        ({"purposes": {"email_marketing": True}, "source": "cmp", "extra": 1}, "extra"),
    ]:
        response = httpx.put(
            f"{server.base_url}/v1/consent/{uid}", json=body, headers=server.headers, timeout=10
        )
        assert response.status_code == 422, response.text
        assert response.json()["problems"][0]["field"] == field
    bad_id = httpx.put(
        f"{server.base_url}/v1/consent/bad%20id",
        json={"purposes": {"email_marketing": True}, "source": "x"},
        headers=server.headers,
        timeout=10,
    )
    assert bad_id.status_code == 422 and bad_id.json()["problems"][0]["field"] == "user_id"
    assert env.consent.state(user_key(uid), "email_marketing") == ConsentState.DENIED


def test_slow_redis_gives_a_fast_degraded_200(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    sleeper = threading.Thread(
        target=lambda: redis.Redis.from_url(env.redis_url).execute_command("DEBUG", "SLEEP", "1.5")
    )
    sleeper.start()
    time.sleep(0.1)
    started = time.monotonic()
    response = post_rank(
        server, user_id=uid, purpose="onsite_personalization", region="EU", budget_ms=50
    )
    wall = time.monotonic() - started
    sleeper.join()
    assert response.status_code == 200
    body = response.json()
    assert body["fallback"]["reason"] in {"consent_unavailable", "feature_timeout"}
    assert len(body["items"]) == 10
    assert wall < 1.0  # the budget, not Redis, decided when to answer


def test_redis_down_then_back(server: Server, env: Environment, ready_home: Home) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    embedded = EmbeddedRedis(ready_home)
    url_before = embedded.running_url()
    assert embedded.stop()
    try:
        answers = [
            post_rank(server, user_id=uid, purpose="onsite_personalization", region="EU")
            for _ in range(20)
        ]
        assert [r.status_code for r in answers] == [200] * 20
        assert {r.json()["fallback"]["reason"] for r in answers} == {"consent_unavailable"}
        put = httpx.put(
            f"{server.base_url}/v1/consent/{uid}",
            json={"purposes": {"email_marketing": True}, "source": "cmp"},
            headers=server.headers,
            timeout=10,
        )
        assert put.status_code == 503 and put.headers["retry-after"] == "1"
        assert put.json()["error"] == "consent_store_unavailable"
    finally:
        assert embedded.ensure_running() == url_before  # same address again
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        body = post_rank(server, user_id=uid, purpose="onsite_personalization", region="EU").json()
        if body["fallback"] is None:
            break
        time.sleep(0.2)
    assert body["fallback"] is None, body  # personalization resumed by itself


# -- model and explainer failures, applied with `serve deploy` (reconfigure) --


@pytest.fixture
def redeploy_default(server: Server) -> Iterator[None]:
    yield
    deploy(
        server, "default", ingress_user_config(), lambda h: h["models"]["loaded"] == ["v1", "v2"]
    )


@pytest.fixture
def odd_versions(env: Environment) -> Iterator[None]:
    """v1-shape: manifest says 9 features, its ONNX takes 8 (onnxruntime raises).
    v2-nobooster: registered without its native booster (no SHAP explainer).
    v2-nofile: its model.onnx was deleted."""
    shape = copy_with_wrong_width(env.models, "v1", "v1-shape")
    nobooster, nofile = env.models.path("v2-nobooster"), env.models.path("v2-nofile")
    shutil.copytree(env.models.path("v2"), nobooster)
    shutil.copytree(env.models.path("v2"), nofile)
    (nofile / "model.onnx").unlink()
    (nobooster / "booster.txt").unlink()
    manifest = json.loads((nobooster / "manifest.json").read_text())
    del manifest["artifacts"]["booster.txt"]
    (nobooster / "manifest.json").write_text(json.dumps(manifest))
    yield
    for folder in (shape, nobooster, nofile):
        shutil.rmtree(folder)


@pytest.mark.usefixtures("odd_versions", "redeploy_default")
def test_model_and_explainer_failures_are_degraded_200s(server: Server, env: Environment) -> None:
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    request = {
        "user_id": granted,
        "purpose": "onsite_personalization",
        "region": "US",
        "explain": True,
        "budget_ms": 300,
    }

    # A version whose files are missing is refused; the running config keeps serving.
    deploy(
        server,
        "missing",
        ingress_user_config(routing=routing("v2-nofile")),
        lambda h: "'v2-nofile' does not load" in (h["config_error"] or ""),
    )
    body = post_rank(server, **request).json()
    assert body["fallback"] is None and body["model"]["version"] == "v2"

    deploy(
        server,
        "shape",
        ingress_user_config(routing=routing("v1-shape")),
        lambda h: h["models"]["loaded"] == ["v1-shape"],
    )
    response = post_rank(server, **request)
    assert response.status_code == 200
    assert response.json()["fallback"]["reason"] == "model_error"

    deploy(
        server,
        "nobooster",
        ingress_user_config(routing=routing("v2-nobooster")),
        lambda h: h["models"]["loaded"] == ["v2-nobooster"],
    )
    body = post_rank(server, **request).json()
    assert body["fallback"] is None and body["model"]["version"] == "v2-nobooster"
    assert body["explanation"] == {"status": "omitted", "reason": "explainer_unavailable"}


def test_openapi_document_describes_the_api(server: Server) -> None:
    document = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    assert "/v1/rank" in document["paths"] and "/v1/consent/{user_id}" in document["paths"]


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_move_by_the_right_amounts(server: Server, env: Environment) -> None:
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    before = scrape(server)
    for _ in range(3):
        assert (
            post_rank(
                server, user_id=granted, purpose="onsite_personalization", region="US"
            ).status_code
            == 200
        )
    for _ in range(2):
        assert (
            post_rank(
                server, user_id=denied, purpose="onsite_personalization", region="US"
            ).status_code
            == 200
        )
    assert post_rank(server, user_id=granted, purpose="telepathy", region="US").status_code == 422
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    on = {"purpose": "onsite_personalization"}
    assert (
        moved(
            "rankgate_rank_requests_total",
            outcome="personalized",
            model_version="v2",
            variant="stable",
            **on,
        )
        == 3
    )
    assert (
        moved(
            "rankgate_rank_requests_total",
            outcome="non_personalized",
            model_version="",
            variant="",
            **on,
        )
        == 2
    )
    assert (
        moved(
            "rankgate_rank_requests_total",
            outcome="bad_request",
            purpose="",
            model_version="",
            variant="",
        )
        == 1
    )
    assert moved("rankgate_fallbacks_total", reason="no_consent", model_version="", variant="") == 2
    assert moved("rankgate_policy_decisions_total", decision="personalize", **on) == 3
    assert moved("rankgate_policy_decisions_total", decision="non_personalized", **on) == 2
    assert (
        moved("rankgate_stage_seconds_count", stage="rank", model_version="v2", variant="stable")
        == 3
    )
    assert moved("rankgate_feature_age_seconds_count", view="user_item_affinity") == 3
    assert moved("rankgate_ranker_batch_size_count", model_version="v2") >= 1
