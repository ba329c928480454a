"""Policy files and serving config: typed, and refused with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rankgate.core.errors import ConfigError
from rankgate.governance.consent import ConsentState
from rankgate.governance.policy import load_policy, load_policy_set, policy_dir
from serving.app import AppArgs, RankerDeployment, RankIngress, build_app
from serving.events.consumer import EventConsumer
from serving.ranking.explainer import load_reason_templates
from serving.ranking.gate import ConsentGate
from serving.runtime import parse_config
from tests.serving_support import ingress_user_config


def write_policy(tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    policy = yaml.safe_load((policy_dir() / "policy.yaml").read_text())
    mutate(policy)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def test_shipped_policy_files_load() -> None:
    policy = load_policy()
    assert {"onsite_personalization", "email_marketing"} <= set(policy.purposes)
    assert policy.regions["EU"].regime == "opt_in" and policy.regions["US"].regime == "opt_out"
    assert policy.purposes["email_marketing"].explicit_consent is True
    assert load_policy_set().fallback.boosts
    assert load_reason_templates().templates.keys() >= {"profile", "affinity", "item"}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p["regions"]["EU"].update(regime="maybe"), "regions.EU.regime"),
        (
            lambda p: p["purposes"]["email_marketing"].pop("explicit_consent"),
            "purposes.email_marketing.explicit_consent",
        ),
        (
            lambda p: p["purposes"]["email_marketing"].update(feature_views=[]),
            "purposes.email_marketing.feature_views",
        ),
        (lambda p: p.update(colour="blue"), "colour"),
        (
            lambda p: p["item_rules"][0].update(purposes=["telepathy"]),
            "item_rules.0.purposes: unknown purpose",
        ),
        # Consent signal rules (tests/governance/test_signals.py: what they do).
        (
            lambda p: p["regions"]["US"]["gpc"].update(objects_to=["telepathy"]),
            "regions.US.gpc.objects_to: unknown purpose 'telepathy'",
        ),
        (lambda p: p["regions"]["US"]["gpc"].update(objects_to=[]), "regions.US.gpc.objects_to"),
        (
            lambda p: p["regions"]["EU"]["tcf"]["purposes"].update(telepathy=[1]),
            "regions.EU.tcf.purposes: unknown purpose 'telepathy'",
        ),
        (
            lambda p: p["regions"]["EU"]["tcf"]["purposes"].update(email_marketing=[0]),
            "regions.EU.tcf.purposes.email_marketing.0",
        ),
        (lambda p: p["regions"]["EU"]["tcf"].pop("vendor_id"), "regions.EU.tcf.vendor_id"),
    ],
)
def test_a_policy_with_an_error_is_refused_naming_file_and_field(
    tmp_path: Path, mutate, field: str
) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path, mutate)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert str(path) in caught.value.message
    assert field in caught.value.message


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "policy.yaml"
    broken.write_text("version: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(broken)
    with pytest.raises(ConfigError, match="file not found"):
        load_policy(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("purpose", "region", "consent", "allowed", "reason"),
    [
        ("onsite_personalization", "EU", ConsentState.GRANTED, True, None),
        ("onsite_personalization", "EU", ConsentState.UNKNOWN, False, "no_consent"),
        ("onsite_personalization", "US", ConsentState.UNKNOWN, True, None),
        ("onsite_personalization", "US", ConsentState.DENIED, False, "no_consent"),
        ("email_marketing", "US", ConsentState.UNKNOWN, False, "no_consent"),
        ("email_marketing", "US", ConsentState.GRANTED, True, None),
        ("onsite_personalization", "US", None, False, "consent_unavailable"),
    ],
)
def test_gate_rules(
    purpose: str, region: str, consent: ConsentState | None, allowed: bool, reason: str | None
) -> None:
    decision = ConsentGate(load_policy()).decide(purpose, region, consent)
    assert decision.personalize is allowed and decision.reason == reason
    if not allowed:
        assert decision.allowed_views == frozenset()
    assert decision.block.version == load_policy().version


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"budget": {"default_ms": 5000, "max_ms": 1000}}, "budget"),
        ({"limits": {"max_k": 0}}, "limits.max_k"),
        ({"routing": {"salt": "s", "versions": []}}, "routing.versions"),
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_serving_config_is_refused_naming_the_field(override: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as caught:
        parse_config(ingress_user_config(**override))
    assert f"field '{field}" in caught.value.message


def test_the_shipped_serving_config_is_valid() -> None:
    config = parse_config(ingress_user_config())
    assert config.routing.stable == "v2" and config.routing.all_versions == ["v2", "v1"]
    assert (
        AppArgs.model_validate({"ranker_placement": "deployment"}).ranker_placement == "deployment"
    )
    with pytest.raises(ConfigError, match="ranker_placement"):
        build_app({"ranker_placement": "moon"})


def test_deployment_options_are_set_in_serve_config_only() -> None:
    # A value in a decorator as well as in the YAML is two values: the YAML wins
    # where it names the option, the decorator silently elsewhere.
    for deployment in (RankIngress, RankerDeployment, EventConsumer):
        assert not deployment._deployment_config.user_configured_option_names, deployment.name


def test_the_grafana_dashboard_queries_only_metrics_the_server_exports() -> None:
    import json
    import re

    from serving.observe.metrics import ServingMetrics
    from tests import REPO

    dashboard = json.loads((REPO / "loadtests" / "grafana" / "rankgate-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # Replicas export through Ray's metrics, which prefix every name with ray_.
    assert not [e for e in expressions if re.search(r"(?<!ray_)rankgate_", e)]
    used = {name for e in expressions for name in re.findall(r"ray_(rankgate_[a-z_]+)", e)}
    exported = {
        sample
        for family in ServingMetrics().registry.collect()
        for sample in [
            family.name,
            f"{family.name}_total",
            f"{family.name}_bucket",
            f"{family.name}_sum",
            f"{family.name}_count",
        ]
    }
    assert used and used <= exported, used - exported
