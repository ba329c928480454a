"""A second project, served without a line of code changed.

Trail Outfitters (tests/second_project.py) differs from the Open Bandit example
in everything a project declares: 37 products with string SKUs, a `customer`
entity joined on `customer_key` and a `product` entity joined on `sku`, its own
views and fields, a catalogue file, a `device` context feature, its own
purposes, regions, item rules and popularity fallback with a boost. Its models
are trained here as the shop's own job would train them, with scikit-learn, and
converted with skl2onnx: a gradient-boosting model registered with its tree
(SHAP explains it) and a logistic regression registered without one.

The module builds the project in a temporary folder, runs `rankgate --project DIR
setup` and `model register` as commands in a home of its own (with its own
embedded Redis), and starts a real `serve run` for it, as the session's `server`
fixture does for the example. Every answer is then checked over HTTP; the scores
against the shop's own models scoring rows it encoded itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest

from rankgate.core.home import Home
from rankgate.core.project import load_project
from rankgate.core.redis_server import EmbeddedRedis
from tests import REPO
from tests.conftest import wait_until_healthy
from tests.second_project import (
    BOOSTED,
    CLEARANCE,
    DEVICES,
    GB_INPUTS,
    LR_INPUTS,
    N_PRODUCTS,
    REASONS_YAML,
    RESTRICTED_IN_EEA,
    SKUS,
    RawData,
    popularity,
    popularity_order,
    rows_for,
    train_models,
    write_project,
)
from tests.serving_support import ingress_user_config, routing

GRANTED = "cust-0001"  # granted both purposes
OBJECTED = "cust-0002"  # denied the storefront
SILENT = "cust-0003"  # no consent record at all
STRANGER = "guest-4711"  # never seen by the shop: no features


@dataclass
class Shop:
    """The served project: its address, keys and what it was built from."""

    base_url: str
    project: Path
    home: Home
    raw: RawData
    trained: dict[str, Path]
    keys: dict[str, str]

    def post(self, path: str, body: dict[str, Any], key: str = "crm") -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        return httpx.post(f"{self.base_url}{path}", json=body, headers=headers, timeout=30)

    def rank(self, key: str = "crm", **body: Any) -> httpx.Response:
        return self.post("/v1/rank", {"budget_ms": 1000, **body}, key)


def start(project: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`rankgate --project DIR ARGS...`, started as a command."""
    return subprocess.Popen(
        [sys.executable, "-m", "rankgate.cli", "--project", str(project), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(command: subprocess.Popen[str], timeout_s: float = 180) -> str:
    """The output of a command once it succeeded; the test fails otherwise."""
    try:
        output, _ = command.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        command.kill()
        output, _ = command.communicate()
    assert command.returncode == 0, f"{command.args!r}:\n{output}"
    return output


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    from rankgate.core.redis_server import connect
    from rankgate.governance.api_keys import ApiKeyStore
    from rankgate.governance.policy import load_policy
    from serving.ops.launch import (
        derived_config,
        free_port,
        serve_env,
        serve_run_command,
        start_server,
        stop_server,
    )

    root = tmp_path_factory.mktemp("second-project")
    project_dir, home = root / "trail_outfitters", Home(root / "home")
    raw = write_project(project_dir)
    env = {
        **os.environ,
        "RANKGATE_HOME": str(home.root),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    process = None
    try:
        # The shop trains its models while rankgate prepares the home.
        setup = start(project_dir, env, "setup")
        trained = train_models(raw, root / "trained")
        assert "catalogue: 37 items" in finished(setup)
        models = project_dir / "models"
        with_tree = start(
            project_dir,
            env,
            *("model", "register", "gb-1", "--onnx", str(trained["gb.onnx"])),
            *("--features", str(models / "gb.yaml"), "--booster", str(trained["gb.joblib"])),
            *("--metrics", str(trained["gb.metrics"])),
        )
        without_tree = start(
            project_dir,
            env,
            *("model", "register", "lr-1", "--onnx", str(trained["lr.onnx"])),
            *("--features", str(models / "lr.yaml"), "--metrics", str(trained["lr.metrics"])),
        )
        assert "explained by SHAP" in finished(with_tree)
        assert "explainer_unavailable" in finished(without_tree)

        redis_url = EmbeddedRedis(home).ensure_running()
        purposes = list(load_policy(project_dir / "policies" / "policy.yaml").purposes)
        key_store = ApiKeyStore(connect(redis_url), home.namespace)
        keys = {
            "web": key_store.create("shop-web", ["storefront"], purposes),
            "crm": key_store.create("shop-crm", purposes, purposes),
        }

        port = free_port()
        config = derived_config(
            home,
            port=port,
            user_config=ingress_user_config(routing=routing("gb-1", alternate=["lr-1"])),
        )
        log_path = home.root / "serve.log"
        process = start_server(
            serve_run_command(config),
            serve_env(home, redis_url, project=load_project(project_dir)),
            log_path,
        )
        base_url = f"http://127.0.0.1:{port}"
        health = wait_until_healthy(base_url, process, 180, log_path)
        assert health["models"] == {"loaded": ["gb-1", "lr-1"], "unavailable": {}}, health

        served = Shop(base_url, project_dir, home, raw, trained, keys)
        # Consent arrives as it would from the shop's consent platform.
        for user, decisions in (
            (GRANTED, {"storefront": True, "newsletter": True}),
            (OBJECTED, {"storefront": False}),
        ):
            body = {"user_id": user, "purposes": decisions, "source": "shop-cmp"}
            response = served.post("/v1/consent", body)
            assert response.status_code == 200, response.text
        yield served
    finally:
        if process is not None:
            stop_server(process)
        EmbeddedRedis(home).stop()


def item_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def expected_scores(
    shop: Shop, model: str, inputs: Any, user: str, skus: list[str], context: dict[str, str]
) -> np.ndarray:
    """What the shop's own model says of rows the shop encoded itself."""
    native = joblib.load(shop.trained[f"{model}.joblib"]) if model == "gb" else None
    rows = rows_for(shop.raw, inputs, user, skus, context)
    if native is not None:
        return np.asarray(native.predict_proba(rows)[:, 1])
    import onnxruntime as ort

    session = ort.InferenceSession(str(shop.trained[f"{model}.onnx"]))
    (name,) = [i.name for i in session.get_inputs()]
    return np.asarray(session.run(["probabilities"], {name: rows})[0][:, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_personalized_answers_rank_string_ids_with_the_registered_model(
    shop: Shop, device: str
) -> None:
    response = shop.rank(
        user_id=GRANTED,
        purpose="storefront",
        region="EEA",
        k=N_PRODUCTS,
        context={"device": device},
    )
    ranked = item_ids(response)
    body = response.json()
    assert body["model"] == {"name": "ranker", "version": "gb-1", "variant": "stable"}
    assert body["fallback"] is None and body["policy"]["decision"] == "personalize"
    # The whole catalogue but the item the EEA rule excludes, as the shop's strings.
    assert sorted(ranked) == sorted(set(SKUS) - {RESTRICTED_IN_EEA})
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # The scores are the shop's model's, on the features it trained on and this device.
    expected = expected_scores(shop, "gb", GB_INPUTS, GRANTED, ranked, {"device": device})
    assert scores == pytest.approx(expected, abs=2e-6)


def test_the_device_in_the_request_reaches_the_model(shop: Shop) -> None:
    candidates = SKUS[:12]
    answers = {
        device: {
            item["item_id"]: item["score"]
            for item in shop.rank(
                user_id=GRANTED,
                purpose="storefront",
                region="NA",
                k=12,
                candidates=candidates,
                context={"device": device},
            ).json()["items"]
        }
        for device in DEVICES
    }
    assert answers["mobile"] != answers["desktop"]
    # Without a device the input is missing (-1), as the declaration's contract says.
    response = shop.rank(
        user_id=GRANTED, purpose="storefront", region="NA", k=12, candidates=candidates
    )
    ranked = item_ids(response)
    expected = expected_scores(shop, "gb", GB_INPUTS, GRANTED, ranked, {})
    assert [i["score"] for i in response.json()["items"]] == pytest.approx(expected, abs=2e-6)


def test_explained_answers_name_the_declared_inputs(shop: Shop) -> None:
    import shap
    import yaml

    response = shop.rank(
        user_id=GRANTED,
        purpose="storefront",
        region="EEA",
        k=5,
        context={"device": "mobile"},
        explain=True,
    )
    ranked = item_ids(response)
    body = response.json()
    assert body["explanation"] == {"status": "explained"}
    templates = yaml.safe_load(REASONS_YAML)["templates"]
    declared = {name: (column, group) for column, (name, *_, group) in enumerate(GB_INPUTS)}
    native = joblib.load(shop.trained["gb.joblib"])
    rows = rows_for(shop.raw, GB_INPUTS, GRANTED, ranked, {"device": "mobile"})
    values = np.asarray(shap.TreeExplainer(native).shap_values(rows)).reshape(len(rows), -1)
    for n, item in enumerate(body["items"]):
        reasons = item["reasons"]
        assert 1 <= len(reasons) <= 2, item
        top = sorted((v for v in values[n] if v > 0), reverse=True)[: len(reasons)]
        assert [r["contribution"] for r in reasons] == pytest.approx(top, abs=1e-5)
        for reason in reasons:
            column, group = declared[reason["feature"]]
            assert reason["group"] == group
            assert reason["text"] == templates[group].format(feature=reason["feature"])
            assert reason["contribution"] == pytest.approx(values[n][column], abs=1e-5)


def test_a_version_registered_without_its_tree_is_not_explained(shop: Shop) -> None:
    """The newsletter may not read activity: the alternate version (a logistic
    regression, no tree) answers, and says it cannot explain."""
    response = shop.rank(
        user_id=GRANTED, purpose="newsletter", region="EEA", k=N_PRODUCTS, explain=True
    )
    ranked = item_ids(response)
    body = response.json()
    assert body["model"] == {"name": "ranker", "version": "lr-1", "variant": "alternate"}
    assert body["explanation"] == {"status": "omitted", "reason": "explainer_unavailable"}
    assert all("reasons" not in item for item in body["items"])
    assert sorted(ranked) == sorted(set(SKUS) - {RESTRICTED_IN_EEA, *CLEARANCE})
    expected = expected_scores(shop, "lr", LR_INPUTS, GRANTED, ranked, {})
    assert [i["score"] for i in body["items"]] == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize(
    ("user", "region", "reason"),
    [(SILENT, "EEA", "no_consent"), (STRANGER, "NA", "features_missing")],
)
def test_fallback_answers_rank_by_the_shops_popularity(
    shop: Shop, user: str, region: str, reason: str
) -> None:
    response = shop.rank(user_id=user, purpose="storefront", region=region, k=8)
    ranked = item_ids(response)
    fallback = response.json()["fallback"]
    assert (fallback["reason"], fallback["strategy"]) == (reason, "popularity")
    allowed = [s for s in SKUS if region != "EEA" or s != RESTRICTED_IN_EEA]
    assert ranked == popularity_order(shop.raw, allowed)[:8]
    expected = popularity(shop.raw, ranked)
    assert [i["score"] for i in response.json()["items"]] == pytest.approx(
        [expected[sku] for sku in ranked], abs=1e-6
    )
    # The new arrivals' boost lifts them to the top.
    assert set(ranked[:2]) == set(BOOSTED)


def test_item_rules_name_the_shops_ids(shop: Shop) -> None:
    candidates = [RESTRICTED_IN_EEA, *CLEARANCE, "sku-1001"]
    for purpose, region, shown in (
        ("storefront", "EEA", [*CLEARANCE, "sku-1001"]),
        ("storefront", "NA", candidates),
        ("newsletter", "EEA", ["sku-1001"]),
        ("newsletter", "NA", [RESTRICTED_IN_EEA, "sku-1001"]),
    ):
        response = shop.rank(user_id=GRANTED, purpose=purpose, region=region, candidates=candidates)
        assert sorted(item_ids(response)) == sorted(shown), (purpose, region)
        assert response.json()["policy"]["decision"] == "personalize"


def test_the_versions_are_registered_as_declared(shop: Shop) -> None:
    import json

    import onnx

    from model_store.store import ModelStore

    store = ModelStore(shop.home)
    for version, inputs, booster in (("gb-1", GB_INPUTS, "sklearn"), ("lr-1", LR_INPUTS, None)):
        manifest = store.manifest(version)
        assert manifest.feature_names == [name for name, *_ in inputs]
        assert (manifest.booster.kind if manifest.booster else None) == booster
        assert manifest.lineage.made_by == "rankgate model register"
        assert manifest.lineage.project == "trail_outfitters"
        assert manifest.metrics is not None and manifest.metrics.auc is not None
        model = onnx.load(str(store.path(version) / "model.onnx"))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["rankgate.version"] == version
        assert [f["name"] for f in json.loads(meta["rankgate.features"])] == manifest.feature_names


def test_denied_answers(shop: Shop) -> None:
    objected = shop.rank(user_id=OBJECTED, purpose="storefront", region="NA", k=3)
    body = objected.json()
    assert objected.status_code == 200 and body["model"] is None
    assert body["policy"]["decision"] == "non_personalized"
    assert body["fallback"]["reason"] == "no_consent"
    consent = next(c for c in body["policy"]["checks"] if c["check"] == "consent")
    assert consent["result"] == "denied"
    # The newsletter needs explicit consent, even where profiling is opt-out.
    silent = shop.rank(user_id=SILENT, purpose="newsletter", region="NA", k=3).json()
    assert silent["fallback"]["reason"] == "no_consent"
    # A key of the storefront may not ask for the newsletter.
    forbidden = shop.rank(key="web", user_id=GRANTED, purpose="newsletter", region="NA")
    assert forbidden.status_code == 403, forbidden.text
    assert forbidden.json()["error"] == "forbidden"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"candidates": [1001, "sku-1002"]}, "candidates"),
        ({"candidates": ["sku-9999"]}, "candidates"),
        ({"context": {"device": "smartwatch"}}, "context"),
    ],
)
def test_input_of_another_shape_is_refused(shop: Shop, change: dict[str, Any], field: str) -> None:
    body = {"user_id": GRANTED, "purpose": "storefront", "region": "NA", **change}
    response = shop.rank(**body)
    assert response.status_code == 422, response.text
    problems = response.json()["problems"]
    assert [p["field"].split(".")[0] for p in problems] == [field], problems


def test_the_openapi_document_says_items_are_the_shops_strings(shop: Shop) -> None:
    document = httpx.get(f"{shop.base_url}/openapi.json", timeout=10).json()
    schema = document["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]
    props = schema["schema"]["properties"]
    listed = next(s for s in props["candidates"]["anyOf"] if s.get("type") == "array")
    assert listed["items"]["type"] == "string"
    assert sorted(listed["items"]["enum"]) == SKUS
    assert props["context"]["properties"]["device"]["enum"] == DEVICES


def test_the_promotion_gate_refuses_a_worse_version_unless_forced(
    shop: Shop, tmp_path: Path
) -> None:
    """A storefront model fitted to shuffled clicks, estimated off-policy on the shop's
    uniformly logged impressions, is refused with the figures; --force promotes it and
    the audit of routing changes keeps what was overridden."""
    import yaml

    from tests.second_project import train_shuffled
    from tests.serving_support import SERVE_CONFIG

    env = {
        **os.environ,
        "RANKGATE_HOME": str(shop.home.root),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    shuffled = train_shuffled(shop.raw, tmp_path / "trained")
    finished(
        start(
            shop.project,
            env,
            *("model", "register", "gb-shuffled", "--onnx", str(shuffled["onnx"])),
            *("--features", str(shop.project / "models" / "gb.yaml")),
            *("--booster", str(shuffled["joblib"])),
        )
    )
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    ingress = next(
        d for d in document["applications"][0]["deployments"] if d["name"] == "RankIngress"
    )
    ingress["user_config"]["routing"] = routing("gb-1", alternate=["lr-1"])
    requirement = {"min_lift": -0.05, "min_effective_sample_size": 50}
    ingress["user_config"]["promotion"] = {"require_evaluation": requirement}
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(document))
    promote = ("model", "promote", "gb-shuffled", "--canary", "10", "--config", str(config))

    refused = start(shop.project, env, *promote)
    output, _ = refused.communicate(timeout=180)
    print(output)
    assert refused.returncode == 1, output
    assert "refused by promotion.require_evaluation" in output
    assert "effective sample size" in output and "gb-shuffled" in output and "worse" in output
    after = yaml.safe_load(config.read_text())
    versions = next(
        d for d in after["applications"][0]["deployments"] if d["name"] == "RankIngress"
    )["user_config"]["routing"]["versions"]
    assert [v["version"] for v in versions] == ["gb-1", "lr-1"]  # nothing changed

    forced = finished(start(shop.project, env, *promote, "--force"))
    assert "WARNING (--force): promoted without the required evidence" in forced
    assert "gb-shuffled is now canary at 10 %" in forced
    history = finished(start(shop.project, env, "model", "history"))
    print(history)
    assert "promote gb-shuffled -> canary at 10 %  FORCED past: promotion.require_evaluation" in (
        history
    )
    assert "off-policy evidence" in history
