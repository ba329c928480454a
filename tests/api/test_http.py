"""The real server over HTTP: `serve run` of serve_config.yaml, real Redis, Feast, ONNX, SHAP."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from prometheus_client.samples import Sample

from loadtests.ray_metrics import total
from rankgate.core import redis_keys
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import EmbeddedRedis
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.serving_support import (
    NEAR_MISSES,
    PATIENT_BUDGET_MS,
    copy_with_wrong_width,
    deploy,
    health,
    ingress_user_config,
    metrics_when,
    near_miss,
    ray_metrics,
    routing,
    user_with,
)


def post_rank(server: Server, timeout: float = 10, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/rank", json=body, headers=server.headers, timeout=timeout
    )


def post_consent(server: Server, body: dict[str, Any]) -> httpx.Response:
    """The documented consent write: the user id in the body, never in the URL."""
    return httpx.post(
        f"{server.base_url}/v1/consent", json=body, headers=server.headers, timeout=10
    )


def put_consent(server: Server, user_id: str, body: dict[str, Any]) -> httpx.Response:
    """The path form, kept for existing callers (the id ends up in access logs)."""
    url = f"{server.base_url}/v1/consent/{quote(user_id, safe='')}"
    return httpx.put(url, json=body, headers=server.headers, timeout=10)


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
        budget_ms=PATIENT_BUDGET_MS,
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
    assert set(body["timings_ms"]) == {
        "queued",
        "policy",
        "features",
        "retrieve",
        "rank",
        "explain",
        "total",
    }


def test_explained_answer_has_reasons(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED, skip=2)
    body = post_rank(
        server,
        user_id=uid,
        purpose="onsite_personalization",
        region="US",
        k=3,
        explain=True,
        budget_ms=PATIENT_BUDGET_MS,
    ).json()
    assert body["explanation"] == {"status": "explained"}
    assert all("reasons" in item for item in body["items"])


def test_no_consent_is_a_degraded_200(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "email_marketing", ConsentState.DENIED)
    response = post_rank(
        server,
        user_id=uid,
        purpose="email_marketing",
        region="US",
        k=5,
        budget_ms=PATIENT_BUDGET_MS,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] is None
    assert body["fallback"] == {"reason": "no_consent", "strategy": "popularity"}
    assert len(body["items"]) == 5


@pytest.mark.parametrize(("form", "skip"), [("body", 3), ("path", 5)])
def test_a_consent_write_changes_the_next_answer(
    server: Server, env: Environment, form: str, skip: int
) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.DENIED, skip=skip)
    request = {
        "user_id": uid,
        "purpose": "onsite_personalization",
        "region": "EU",
        "budget_ms": PATIENT_BUDGET_MS,
    }
    before = post_rank(server, **request).json()
    assert before["fallback"]["reason"] == "no_consent"
    decisions = {"purposes": {"onsite_personalization": True}, "source": "cmp"}
    if form == "body":
        written = post_consent(server, {"user_id": uid, **decisions})
    else:
        written = put_consent(server, uid, decisions)
    assert written.status_code == 200, written.text
    assert written.json() == {"recorded": {"onsite_personalization": True}, "source": "cmp"}
    after = post_rank(server, **request).json()
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
    uid = user_with(env.consent, "email_marketing", ConsentState.DENIED, skip=4)
    for body, field in [
        ({"purposes": {"telepathy": True}, "source": "cmp"}, "purposes.telepathy"),
        ({"purposes": {"email_marketing": "yes"}, "source": "cmp"}, "purposes.email_marketing"),
        ({"purposes": {"email_marketing": True}}, "source"),
        ({"purposes": {"email_marketing": True}, "source": "cmp", "extra": 1}, "extra"),
    ]:
        response = post_consent(server, {"user_id": uid, **body})
        assert response.status_code == 422, response.text
        assert [p["field"] for p in response.json()["problems"]] == [field]
        in_path = put_consent(server, uid, body)
        assert in_path.status_code == 422 and in_path.json() == response.json()
    for written in (
        post_consent(server, {"purposes": {"email_marketing": True}, "source": "x"}),
        post_consent(
            server, {"user_id": "bad id", "purposes": {"email_marketing": True}, "source": "x"}
        ),
        put_consent(server, "bad id", {"purposes": {"email_marketing": True}, "source": "x"}),
        # The path form takes the id from the path only.
        put_consent(
            server, uid, {"user_id": uid, "purposes": {"email_marketing": True}, "source": "x"}
        ),
    ):
        assert written.status_code == 422, written.text
        assert [p["field"] for p in written.json()["problems"]] == ["user_id"]
    assert env.consent.state(user_key(uid), "email_marketing") == ConsentState.DENIED


def test_a_422_lists_every_problem_at_once(server: Server, env: Environment) -> None:
    rank = post_rank(
        server,
        user_id="u-1",
        purpose="newsletter",
        region="FR",
        candidates=[3, 999],
        k=0,
        budget_ms=0,
    )
    assert rank.status_code == 422, rank.text
    assert [p["field"] for p in rank.json()["problems"]] == [
        "purpose",
        "region",
        "candidates",
        "k",
        "budget_ms",
    ]
    assert "unknown item ids: 999" in rank.json()["problems"][2]["problem"]

    uid = user_with(env.consent, "email_marketing", ConsentState.DENIED, skip=6)
    body = {"purposes": {"newsletter": True, "email_marketing": "yes"}, "extra": 1}
    consent = post_consent(server, {"user_id": uid + "!", **body})
    assert consent.status_code == 422, consent.text
    assert {p["field"] for p in consent.json()["problems"]} == {
        "purposes.newsletter",
        "purposes.email_marketing",
        "source",
        "extra",
        "user_id",
    }
    in_path = put_consent(server, "bad id", body)
    assert {p["field"] for p in in_path.json()["problems"]} == {
        "purposes.newsletter",
        "purposes.email_marketing",
        "source",
        "extra",
        "user_id",
    }
    assert env.consent.state(user_key(uid), "email_marketing") == ConsentState.DENIED


def test_integral_floats_are_integers(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    request = {"user_id": uid, "purpose": "onsite_personalization", "region": "US"}
    # JSON Schema counts 3.0 as an integer; so does the server.
    answer = post_rank(server, **request, k=3.0, candidates=[3.0, 17, 42.0, 8])
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["items"]) == 3
    assert {i["item_id"] for i in answer.json()["items"]} <= {3, 17, 42, 8}
    for wrong, field in [
        ({"k": 3.5}, "k"),
        ({"k": "3"}, "k"),
        ({"k": True}, "k"),
        ({"candidates": [3, 17.5]}, "candidates.1"),
        ({"candidates": ["3"]}, "candidates.0"),
    ]:
        refused = post_rank(server, **{**request, **wrong})
        assert refused.status_code == 422, (wrong, refused.text)
        assert [p["field"] for p in refused.json()["problems"]] == [field]


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_identifiers_are_matched_whole(server: Server, env: Environment, kind: str) -> None:
    """A user id or context key with a trailing newline, a NUL or a lookalike
    character is refused, never taken as another identity."""
    valid = "u-5c111b923688"
    bad = near_miss(valid, kind)
    request = {"purpose": "onsite_personalization", "region": "US"}
    decisions = {"purposes": {"onsite_personalization": True}, "source": "cmp"}
    for response in (
        post_rank(server, user_id=bad, **request),
        post_consent(server, {"user_id": bad, **decisions}),
        put_consent(server, bad, decisions),  # percent-encoded: /v1/consent/u-…%0A
    ):
        assert response.status_code == 422, (kind, response.request.url, response.text)
        assert [p["field"] for p in response.json()["problems"]] == ["user_id"]
        assert bad not in response.text
    key = near_miss("channel", kind)
    context = post_rank(server, user_id=valid, context={key: "web"}, **request)
    assert context.status_code == 422, context.text
    assert [p["field"] for p in context.json()["problems"]] == ["context"]
    assert not env.redis.exists(redis_keys.consent(env.home.namespace, user_key(bad)))


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
        decisions = {"purposes": {"email_marketing": True}, "source": "cmp"}
        for written in (
            post_consent(server, {"user_id": uid, **decisions}),
            put_consent(server, uid, decisions),
        ):
            assert written.status_code == 503 and written.headers["retry-after"] == "1"
            assert written.json()["error"] == "consent_store_unavailable"
    finally:
        assert embedded.ensure_running() == url_before  # same address again
    deadline = time.monotonic() + 15
    back = {"purpose": "onsite_personalization", "region": "EU", "budget_ms": PATIENT_BUDGET_MS}
    while time.monotonic() < deadline:
        body = post_rank(server, user_id=uid, **back).json()
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
        "budget_ms": PATIENT_BUDGET_MS,
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


def body_schema(document: dict[str, Any], path: str, method: str = "post") -> dict[str, Any]:
    operation = document["paths"][path][method]
    schema: dict[str, Any] = operation["requestBody"]["content"]["application/json"]["schema"]
    return schema


def openapi(server: Server) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_openapi_document_is_as_strict_as_the_server(server: Server, ready_home: Home) -> None:
    """Enums of the loaded policy, bounds of the loaded config, the catalogue's ids
    and the identifier patterns: what the validators check, the document says."""
    from rankgate.governance.policy import load_policy
    from rankgate.ops.environment import Environment
    from serving.runtime import parse_config

    document = openapi(server)
    policy, config = load_policy(), parse_config(ingress_user_config())
    limits, budget = config.limits, config.budget
    rank = body_schema(document, "/v1/rank")["properties"]
    assert rank["purpose"]["enum"] == sorted(policy.purposes)
    assert rank["region"]["enum"] == sorted(policy.regions)
    assert (rank["k"]["minimum"], rank["k"]["maximum"]) == (1, limits.max_k)
    for name in ("user_id", "anonymous_id"):  # one of them, or both
        assert rank[name]["anyOf"][0]["maxLength"] == limits.max_user_id_chars
        assert rank[name]["anyOf"][0]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
    assert rank["context"]["maxProperties"] == limits.max_context_entries
    assert rank["context"]["propertyNames"] == {"pattern": "^[a-z][a-z0-9_]{0,31}$"}
    assert rank["context"]["additionalProperties"]["maxLength"] == limits.max_context_value_chars
    bounded_budget = rank["budget_ms"]["anyOf"][0]
    assert (bounded_budget["minimum"], bounded_budget["maximum"]) == (budget.min_ms, budget.max_ms)
    candidates = rank["candidates"]["anyOf"][0]
    assert candidates["maxItems"] == limits.max_candidates and candidates["uniqueItems"]
    catalogue = Environment.open().catalogue()
    assert (candidates["items"]["minimum"], candidates["items"]["maximum"]) == (
        catalogue[0],
        catalogue[-1],
    )
    assert len(catalogue) == catalogue[-1] - catalogue[0] + 1  # no gaps: the range is exact

    consent = body_schema(document, "/v1/consent")
    assert set(consent["required"]) == {"purposes", "source"}
    either = [set(alternative["required"]) for alternative in consent["anyOf"]]
    assert either == [{"user_id"}, {"anonymous_id"}]  # and one of the ids
    assert set(consent["properties"]["purposes"]["properties"]) == set(policy.purposes)
    assert consent["properties"]["purposes"]["additionalProperties"] is False
    path_form = document["paths"]["/v1/consent/{user_id}"]["put"]
    assert path_form["deprecated"] is True
    (user_id,) = path_form["parameters"]
    assert user_id["schema"]["pattern"] == rank["user_id"]["anyOf"][0]["pattern"]
    assert "user_id" not in body_schema(document, "/v1/consent/{user_id}", "put")["properties"]
    page = httpx.get(f"{server.base_url}/docs", timeout=10)
    assert page.status_code == 200 and "/openapi.json" in page.text


@pytest.fixture
def default_config_afterwards(server: Server) -> Iterator[None]:
    from rankgate.governance.policy import load_policy_set

    yield
    digest = load_policy_set().digest
    deploy(server, "default", ingress_user_config(), lambda h: h["policy_digest"] == digest)


@pytest.mark.usefixtures("default_config_afterwards")
def test_openapi_document_follows_a_reconfigure(server: Server, tmp_path: Path) -> None:
    """A new policy and new limits, deployed without a restart, are in the next document."""
    import yaml

    from rankgate.governance.policy import load_policy_set, policy_dir

    policy = yaml.safe_load((policy_dir() / "policy.yaml").read_text())
    policy["regions"]["UK"] = {"regime": "opt_in"}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    (tmp_path / "fallback.yaml").write_bytes((policy_dir() / "fallback.yaml").read_bytes())
    digest = load_policy_set(tmp_path).digest
    user_config = ingress_user_config(
        policy={"dir": str(tmp_path)},
        limits={**ingress_user_config()["limits"], "max_k": 20},
    )
    assert openapi(server)["paths"]  # FastAPI would have cached this one
    deploy(server, "uk", user_config, lambda h: h["policy_digest"] == digest)

    rank = body_schema(openapi(server), "/v1/rank")["properties"]
    assert rank["region"]["enum"] == ["EU", "UK", "US"]
    assert rank["k"]["maximum"] == 20
    request = {"user_id": "u-1", "purpose": "onsite_personalization", "region": "UK"}
    assert post_rank(server, **request, k=20).status_code == 200
    refused = post_rank(server, **request, k=21)
    assert refused.status_code == 422
    assert refused.json()["problems"] == [{"field": "k", "problem": "between 1 and 20"}]
    assert health(server)["config_error"] is None


def test_metrics_move_by_the_right_amounts(server: Server, env: Environment) -> None:
    granted = user_with(env.consent, "onsite_personalization", ConsentState.GRANTED)
    denied = user_with(env.consent, "onsite_personalization", ConsentState.DENIED)
    before = ray_metrics(server)
    for _ in range(3):
        # The counts under test are the outcomes' labels, not whether a busy
        # machine answers within the default 50 ms.
        assert (
            post_rank(
                server,
                user_id=granted,
                purpose="onsite_personalization",
                region="US",
                budget_ms=PATIENT_BUDGET_MS,
            ).status_code
            == 200
        )
    for _ in range(2):
        assert (
            post_rank(
                server,
                user_id=denied,
                purpose="onsite_personalization",
                region="US",
                budget_ms=PATIENT_BUDGET_MS,
            ).status_code
            == 200
        )
    assert post_rank(server, user_id=granted, purpose="telepathy", region="US").status_code == 422
    # Summed over replicas, as Prometheus would (sum by the labels named).
    after: list[Sample] = []

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    def all_in(samples: list[Sample]) -> bool:
        nonlocal after
        after = samples
        return moved("rankgate_rank_requests_total") == 6 and (
            moved("rankgate_stage_seconds_count", stage="total") == 5
        )

    after = metrics_when(server, all_in)

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
