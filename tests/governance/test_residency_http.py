"""Residency on the real server: a version registered as trained on US people's data
only (`model register --data-regions US`) never answers an EU request, over many
users and both purposes, whatever its role; the answer says why when no accepted
version is left (fallback reason `residency`); the audit record names the answering
version's lineage digest; `model promote`/`retire` refuses a routing that leaves a
(purpose, region) pair without an accepted version; `model list` shows lineage."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from model_store.manifest import ONNX_FILE
from rankgate.cli.main import main
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.contract.reasons import FallbackReason
from tests.conftest import Server
from tests.observe.test_audit_http import wait_for
from tests.serving_support import (
    PATIENT_BUDGET_MS,
    SERVE_CONFIG,
    deploy,
    example_user_ids,
    health,
    ingress_user_config,
    model_commands,
    routing,
)

US_ONLY = "v-us-only"
PURPOSES = ("onsite_personalization", "email_marketing")


@pytest.fixture(scope="module")
def us_only(ready_home: Home) -> Iterator[str]:
    """v1's model registered again, declared as trained on US people's data only (not
    cleared for transfer), with the digest of the log it was trained on."""
    env = Environment.open(redis=False)
    v1 = env.models.path("v1")
    features = env.models.manifest("v1").lineage.features_source
    assert features is not None
    log = env.data_dir / "impressions.parquet"
    result = CliRunner().invoke(
        main,
        [
            *("model", "register", US_ONLY, "--onnx", str(v1 / ONNX_FILE)),
            *("--booster", str(v1 / "booster.txt"), "--features", features),
            *("--data-regions", "US", "--training-rows", "10000", "--data-file", str(log)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{US_ONLY}: lineage: US (declared), 10,000 rows, sha256 " in result.output
    yield US_ONLY
    shutil.rmtree(env.models.path(US_ONLY), ignore_errors=True)


def granted_for_both(env: Environment, count: int) -> list[str]:
    """Example users with a recorded grant for both purposes (EU is opt-in)."""
    ids = example_user_ids()
    keys = [user_key(u) for u in ids]
    states = [env.consent.states(keys, purpose) for purpose in PURPOSES]
    both = [u for u, *s in zip(ids, *states, strict=True) if set(s) == {ConsentState.GRANTED}]
    assert len(both) >= count, len(both)
    return both[:count]


def ask(client: httpx.Client, server: Server, user: str, purpose: str, region: str) -> dict:
    response = client.post(
        f"{server.base_url}/v1/rank",
        json={
            "user_id": user,
            "purpose": purpose,
            "region": region,
            "k": 5,
            "budget_ms": PATIENT_BUDGET_MS,
        },
        headers=server.headers,
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def answers(server: Server, users: list[str]) -> list[tuple[str, str, dict]]:
    with httpx.Client(timeout=10) as client:
        return [
            (purpose, region, ask(client, server, user, purpose, region))
            for user in users
            for purpose in PURPOSES
            for region in ("EU", "US")
        ]


@pytest.mark.usefixtures("restore")
def test_a_version_trained_on_us_data_never_answers_an_eu_request(
    server: Server, us_only: str
) -> None:
    env = Environment.open()
    users = granted_for_both(env, 40)

    # Half of the users are in its canary (it reads what e-mail may use, v2 does not):
    # EU requests go to the next accepted version (stable v2 on-site, alternate v1 for
    # e-mail), US requests of its users to it.
    deploy(
        server,
        "default",
        ingress_user_config(routing=routing("v2", canary=us_only, weight=50, alternate=["v1"])),
        lambda h: h["routing"]["canary_weight"] == 50,
    )
    routed = health(server)["routing"]["residency"]
    assert routed == {"EU": ["v1", "v2"], "US": [us_only, "v1", "v2"]}, routed
    mixed = answers(server, users)
    by_region = {
        region: Counter((p, a["model"]["version"]) for p, r, a in mixed if r == region)
        for region in ("EU", "US")
    }
    assert all(a["fallback"] is None for _, _, a in mixed), [a["fallback"] for *_, a in mixed]
    assert not any(version == us_only for _, version in by_region["EU"]), by_region
    assert by_region["EU"] == Counter(
        {("onsite_personalization", "v2"): 40, ("email_marketing", "v1"): 40}
    )
    assert by_region["US"][("onsite_personalization", us_only)] > 5, by_region  # its canary share

    # As the only version: EU requests get the fallback, which says why; US ones get it.
    deploy(
        server,
        "default",
        ingress_user_config(routing=routing(us_only)),
        lambda h: [v["version"] for v in h["routing"]["versions"]] == [us_only],
    )
    alone = answers(server, users)
    for purpose, region, answer in alone:
        if region == "EU":
            assert answer["fallback"]["reason"] == FallbackReason.RESIDENCY, answer
            assert answer["fallback"]["detail"].startswith("residency.EU accepts the training data")
            assert answer["model"] is None and answer["items"], answer
        else:
            assert answer["fallback"] is None and answer["model"]["version"] == us_only, answer

    # The audit names the lineage digest of the version that ranked each answer.
    digests = {
        version: env.models.manifest(version).lineage.data.digest  # type: ignore[union-attr]
        for version in ("v1", "v2", us_only)
    }
    ids = [a["request_id"] for _, _, a in [*mixed, *alone]]
    records = wait_for(env, ids)
    assert all(rid in records for rid in ids)
    for rid in ids:
        record = records[rid]
        if record.fallback is None:
            assert record.model is not None
            assert record.lineage_digest == digests[record.model.version], record
        else:
            assert record.fallback.reason == FallbackReason.RESIDENCY
            assert "lineage_digest" not in record.model_fields_set


def test_promote_refuses_to_leave_a_purpose_without_an_accepted_version_in_a_region(
    us_only: str, tmp_path: Path
) -> None:
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text())
    runner = CliRunner()
    model = model_commands(config)

    code, output = model("promote", us_only, "--alternate")
    assert code == 0, output
    # Without v1, e-mail in the US keeps the US-only alternate; in the EU it has none.
    code, output = model("retire", "v1")
    assert code == 1, output
    assert (
        "refused: email_marketing in EU would be left without a permitted model for 100 % of "
        "its users (residency)" in output
    ), output
    assert "email_marketing in US" in output  # the table: what the US-only version serves
    assert "v1" in config.read_text()
    code, output = model("status")
    assert code == 0, output
    assert "      lineage: US (declared), 10,000 rows, sha256 " in output, output
    assert "; residency: answers US, not EU" in output
    assert "(EU,US cleared)" in output and "; residency: answers EU, US" in output

    listed = runner.invoke(main, ["model", "list"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert "US (declared), 10,000 rows, sha256 " in rows[us_only]
    assert " rows (EU,US cleared), sha256 " in rows["v2"] and "EU " in rows["v2"]


def test_a_policy_deploy_says_which_pairs_lose_their_model_to_residency(
    ready_home: Home, tmp_path: Path
) -> None:
    """The policy takes effect (it is the privacy office's to set); the deploy names
    what it leaves without an accepted version."""
    policies = tmp_path / "policies"
    shutil.copytree(Environment.open(redis=False).project.policies, policies)
    policy = policies / "policy.yaml"
    text = policy.read_text()
    strict = text.replace(
        "    data_regions: [EU]\n    cleared_for_transfer: [US]\n", "    data_regions: [EU]\n"
    )
    assert strict != text
    policy.write_text(strict)
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text())
    result = CliRunner().invoke(main, ["policy", "deploy", str(policies), "--config", str(config)])
    assert result.exit_code == 0, result.output
    for purpose in PURPOSES:
        assert (
            f"warning: under this policy {purpose} in EU has no permitted model for 100 % of its "
            "users: they get the non-personalized fallback (residency)"
        ) in result.output
    assert "in US" not in result.output
    assert str(policies) in config.read_text()


def test_a_version_trained_before_lineage_gets_it_from_the_log_it_was_trained_on(
    ready_home: Home,
) -> None:
    import json

    env = Environment.open(redis=False)
    runner = CliRunner()
    copies = {"v1-before-lineage": None, "v1-other-log": "0" * 64}
    try:
        for name, fingerprint in copies.items():
            shutil.copytree(env.models.path("v1"), env.models.path(name))
            path = env.models.path(name) / "manifest.json"
            manifest = json.loads(path.read_text())
            del manifest["lineage"]["data"]
            if fingerprint is not None:  # as if it had been trained on another log
                manifest["training_data"]["fingerprint"] = fingerprint
            path.write_text(json.dumps(manifest))
        assert env.models.manifest("v1-before-lineage").lineage.shown() == "no lineage recorded"
        result = runner.invoke(main, ["model", "lineage", "v1-before-lineage"])
        assert result.exit_code == 0, result.output
        assert env.models.manifest("v1-before-lineage").lineage.data == (
            env.models.manifest("v1").lineage.data
        )
        again = runner.invoke(main, ["model", "lineage", "v1-before-lineage"])
        assert again.exit_code == 1 and "already has its lineage" in again.output
        other = runner.invoke(main, ["model", "lineage", "v1-other-log"])
        assert other.exit_code == 1 and "not the ones it was trained on" in other.output
        assert env.models.manifest("v1-other-log").lineage.data is None
    finally:
        for name in copies:
            shutil.rmtree(env.models.path(name), ignore_errors=True)
