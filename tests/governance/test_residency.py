"""Residency in memory: the rules, the policy that refuses a rule naming an unknown
region, the router that passes over versions a region does not accept, the route
stage's reason, promotion's coverage per (purpose, region), and the lineage a
version's training data gets (regions counted over 3·10^5 rows, tables digested in
chunks). Nothing here starts a server; the server's side is test_residency_http.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from model_store.lineage import declared_lineage, region_counts, table_digests
from model_store.manifest import DataLineage, Lineage
from rankgate.core.config_files import parse_yaml_model
from rankgate.core.errors import ConfigError, ModelStoreError
from rankgate.core.project import DataRegions, Project
from rankgate.governance.policy import Policy
from rankgate.governance.residency import DataOrigin, ResidencyRule, accepts, permitted_versions
from serving.contract.config import RoutingConfig
from serving.contract.reasons import FallbackReason
from serving.ops.coverage import PromotionRefused, coverage, unserved
from serving.ops.promotion import Move, plan
from serving.ranking.routing import Assignment, Router
from tests.ranking.test_stages import Models, fallback_of, run, services

EU_ONLY = DataOrigin(frozenset({"EU"}))
US_ONLY = DataOrigin(frozenset({"US"}))
US_CLEARED = DataOrigin(frozenset({"US"}), frozenset({"US"}))
BOTH = DataOrigin(frozenset({"EU", "US"}))
SOME_UNKNOWN = DataOrigin(frozenset({"EU"}), complete=False)
EU_RULE = ResidencyRule(data_regions=["EU"], cleared_for_transfer=["US"])
POLICY_FILE = Path(__file__).parents[2] / "examples" / "default" / "policies" / "policy.yaml"


# -- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (EU_ONLY, True),
        (US_ONLY, False),  # US data, not cleared
        (US_CLEARED, True),  # US data cleared for transfer, which EU accepts
        (BOTH, False),  # the US half is not cleared
        (DataOrigin(frozenset({"EU", "US"}), frozenset({"US"})), True),
        (SOME_UNKNOWN, False),  # rows of people of no known region
        (None, False),  # no lineage recorded
        (DataOrigin(frozenset()), False),
    ],
)
def test_a_rule_accepts_a_version_only_when_every_data_region_is_accepted(
    origin: DataOrigin | None, accepted: bool
) -> None:
    assert accepts(EU_RULE, origin) is accepted


def test_the_lookup_holds_per_ruled_region_the_versions_it_accepts() -> None:
    origins = {"v-eu": EU_ONLY, "v-us": US_ONLY, "v-none": None}
    table = permitted_versions({"EU": EU_RULE}, origins)
    assert table == {"EU": frozenset({"v-eu"})}  # US has no rule: absent, every version


def policy_with(residency: dict) -> bytes:
    raw = yaml.safe_load(POLICY_FILE.read_text())
    raw["residency"] = residency
    return yaml.safe_dump(raw).encode()


@pytest.mark.parametrize(
    ("residency", "field"),
    [
        ({"JP": {"data_regions": ["JP"]}}, "residency.JP: unknown region 'JP'"),
        ({"EU": {"data_regions": ["EU", "APAC"]}}, "residency.EU.data_regions: unknown region"),
        (
            {"EU": {"data_regions": ["EU"], "cleared_for_transfer": ["CN"]}},
            "residency.EU.cleared_for_transfer: unknown region 'CN'",
        ),
        ({"EU": {"data_regions": []}}, "residency.EU.data_regions"),
        ({"EU": {"data_region": ["EU"]}}, "residency.EU.data_region"),
    ],
)
def test_a_rule_naming_an_unknown_region_is_refused_with_the_file_and_field(
    residency: dict, field: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_yaml_model(policy_with(residency), POLICY_FILE, Policy)
    assert str(POLICY_FILE) in refused.value.message and field in refused.value.message


def test_the_example_policy_demonstrates_residency_for_both_regions() -> None:
    policy = parse_yaml_model(POLICY_FILE.read_bytes(), POLICY_FILE, Policy)
    assert set(policy.residency) == set(policy.regions) == {"EU", "US"}
    assert policy.residency["EU"].data_regions == ["EU"]


# -- the router ------------------------------------------------------------------------

ROUTING = RoutingConfig.model_validate(
    {
        "salt": "s",
        "versions": [
            {"version": "v2", "role": "stable", "weight": 50},
            {"version": "v-us", "role": "canary", "weight": 50},
            {"version": "v1", "role": "alternate"},
            {"version": "v-us-shadow", "role": "shadow"},
        ],
    }
)
VIEWS = {
    "v2": frozenset({"profile", "affinity"}),
    "v-us": frozenset({"profile"}),
    "v1": frozenset({"profile"}),
    "v-us-shadow": frozenset({"profile"}),
}
ONSITE, EMAIL = frozenset({"profile", "affinity"}), frozenset({"profile"})
ACCEPTED = {"EU": frozenset({"v2", "v1"})}  # v-us and its shadow learned from US data only


def test_a_version_the_region_does_not_accept_is_passed_over_for_the_next() -> None:
    router = Router(ROUTING, residency=ACCEPTED)
    canary = Assignment("v-us", "canary")
    assert router.answer(canary, ONSITE, VIEWS) == canary  # no region: as before
    assert router.answer(canary, ONSITE, VIEWS, ACCEPTED["EU"]) == Assignment("v2", "stable")
    # E-mail may not read v2's affinity: the alternate answers EU, the canary US.
    assert router.answer(canary, EMAIL, VIEWS, ACCEPTED["EU"]) == Assignment("v1", "alternate")
    assert router.answer(canary, EMAIL, VIEWS, None) == canary
    assert router.answer(canary, EMAIL, VIEWS, frozenset({"v-us"})) == canary
    assert router.answer(canary, EMAIL, VIEWS, frozenset()) is None


def test_choose_reads_the_request_region_and_shadows_follow_the_same_rule() -> None:
    router = Router(ROUTING, residency=ACCEPTED)
    keys = [f"key-{n}" for n in range(2_000)]
    eu = {router.choose(k, EMAIL, VIEWS, "EU") for k in keys}
    us = {router.choose(k, EMAIL, VIEWS, "US") for k in keys}
    assert eu == {Assignment("v1", "alternate")}  # never v-us, whoever the user
    assert us == {Assignment("v1", "alternate"), Assignment("v-us", "canary")}
    assert router.shadows(EMAIL, VIEWS, "EU") == []
    assert router.shadows(EMAIL, VIEWS, "US") == ["v-us-shadow"]


def test_the_route_stage_answers_with_the_fallback_named_residency() -> None:
    """A decision (like a consent refusal), not a degradation, with why in the detail."""
    config = {"routing": {"salt": "s", "versions": [{"version": "v1", "role": "stable"}]}}
    routing = RoutingConfig.model_validate(config["routing"])
    refused = services(config=config, router=Router(routing, residency={"EU": frozenset()}))
    context = run(refused, region="EU")
    assert fallback_of(context) == (
        FallbackReason.RESIDENCY,
        "residency.EU accepts the training data of none of the versions onsite may use here",
    )
    assert not FallbackReason.RESIDENCY.degraded
    assert context.model_ref is None and context.ranked  # the fallback's ranking
    us = run(
        services(config=config, router=Router(routing, residency={"EU": frozenset()})), region="US"
    )
    assert us.fallback is None and us.model_ref is not None
    # Views the purpose does not permit stay no_permitted_model, whatever the region.
    unviewed = services(
        config=config,
        router=Router(routing, residency={"EU": frozenset()}),
        models=Models(views_of={"v1": frozenset({"secret"})}),
    )
    assert fallback_of(run(unviewed, region="EU")) == (FallbackReason.NO_PERMITTED_MODEL, None)


def test_router_answer_costs_a_lookup(capsys: pytest.CaptureFixture[str]) -> None:
    """The residency check is a set lookup: Router.answer stays in microseconds."""
    router = Router(ROUTING, residency=ACCEPTED)
    canary, accepted = Assignment("v-us", "canary"), ACCEPTED["EU"]
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(20_000):
            router.answer(canary, ONSITE, VIEWS, accepted)
        rounds.append((time.perf_counter() - started) / 20_000 * 1e9)
    assert sorted(rounds)[2] < 20_000  # ns: far above what it costs (under 1 µs here)


# -- promotion -------------------------------------------------------------------------

PURPOSES = {"onsite": ONSITE, "email": EMAIL}
REGIONS = {"EU": frozenset({"v2", "v1", "v-eu"}), "US": frozenset({"v2", "v1", "v-us"})}
DEFAULT = RoutingConfig.model_validate(
    {
        "salt": "s",
        "versions": [{"version": "v2", "role": "stable"}, {"version": "v1", "role": "alternate"}],
    }
)
ALL_VIEWS = {**VIEWS, "v-eu": frozenset({"profile"})}


def test_coverage_names_a_region_only_where_it_differs() -> None:
    assert unserved(coverage(DEFAULT, PURPOSES, ALL_VIEWS, REGIONS)) == {"onsite": 0, "email": 0}
    routed = RoutingConfig.model_validate(
        {"salt": "s", "versions": [{"version": "v-us", "role": "stable"}]}
    )
    served = coverage(routed, PURPOSES, ALL_VIEWS, REGIONS)
    assert unserved(served) == {
        "onsite in EU": 100.0,
        "onsite in US": 0.0,
        "email in EU": 100.0,
        "email in US": 0.0,
    }
    assert {s.pair for s in served if s.residency} == {"onsite in EU", "email in EU"}


def test_promote_refuses_a_routing_that_leaves_a_pair_without_an_accepted_version() -> None:
    planned = plan(DEFAULT, Move("v1", None), PURPOSES, ALL_VIEWS, REGIONS)
    assert planned.losses() == {"email": 100.0}  # e-mail loses v1 everywhere: no region named
    retiring = plan(
        RoutingConfig.model_validate(
            {
                "salt": "s",
                "versions": [
                    {"version": "v2", "role": "stable"},
                    {"version": "v-us", "role": "alternate"},
                    {"version": "v1", "role": "alternate"},
                ],
            }
        ),
        Move("v1", None),
        PURPOSES,
        ALL_VIEWS,
        REGIONS,
    )
    assert retiring.losses() == {"email in EU": 100.0}  # the US keeps v-us
    with pytest.raises(PromotionRefused) as refused:
        retiring.guard(False, lambda _line: None)
    message = refused.value.message
    assert (
        "refused: email in EU would be left without a permitted model for 100 % of its users (residency)"
        in message
    )
    assert "policy.yaml `residency`" in message
    said: list[str] = []
    assert retiring.guard(True, said.append)
    assert any(
        "email in EU loses personalization" in line and "(residency)" in line for line in said
    )
    assert any(cell.startswith("  v-us") and "email in US" in cell for cell in retiring.table())


# -- lineage ---------------------------------------------------------------------------


def people_project(tmp_path: Path, path: str | None, column: str = "region") -> Project:
    from rankgate.core.project import ProjectFile

    spec = ProjectFile.model_validate(
        {
            "name": "p",
            "user": {"entity": "user", "join_key": "user_key"},
            "item": {"entity": "item", "join_key": "item_id", "id_type": "int"},
            "catalogue": {"file": "items.csv"},
            "data_regions": DataRegions(column=column, path=path).model_dump(),
        }
    )
    return Project(tmp_path, spec)


def test_regions_are_counted_over_a_log_in_one_vectorized_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    people = pd.DataFrame(
        {
            "user_key": [f"k{n}" for n in range(30_000)],
            "region": rng.choice(["EU", "US"], 30_000),
        }
    )
    people.loc[:9, "region"] = None  # ten people of no known region
    people.to_parquet(tmp_path / "people.parquet")
    rows = 300_000
    logs = pd.DataFrame({"user_key": people["user_key"].to_numpy()[rng.integers(0, 30_000, rows)]})
    logs.loc[:4, "user_key"] = "a stranger"  # not in the people table
    project = people_project(tmp_path, "people.parquet")
    started = time.perf_counter()
    by_region, unknown = region_counts(project, tmp_path, logs, "user_key")
    elapsed = time.perf_counter() - started
    region_of = dict(zip(people["user_key"], people["region"], strict=True))
    expected = logs["user_key"].map(region_of)
    assert by_region == {r: int((expected == r).sum()) for r in ("EU", "US")}
    assert unknown == int(expected.isna().sum()) and unknown >= 5
    assert elapsed < 5, elapsed  # one hashed lookup per row: ~1 s per 10^6 rows
    # A column of the log itself works the same way.
    logs["region"] = expected.fillna("EU")
    assert region_counts(people_project(tmp_path, None), tmp_path, logs, "user_key") == (
        {"EU": int((logs["region"] == "EU").sum()), "US": int((logs["region"] == "US").sum())},
        0,
    )
    with pytest.raises(ModelStoreError, match="data_regions.column': the interaction log has no"):
        region_counts(people_project(tmp_path, None, "country"), tmp_path, logs, "user_key")


def test_tables_are_digested_in_chunks_to_the_same_sha256(tmp_path: Path) -> None:
    table = tmp_path / "big.bin"
    table.write_bytes(np.random.default_rng(1).bytes(5_000_000))
    digests, combined = table_digests({"interactions": table})
    assert digests == {"interactions": hashlib.sha256(table.read_bytes()).hexdigest()}
    assert (
        combined
        == hashlib.sha256(f"interactions\0{digests['interactions']}\n".encode()).hexdigest()
    )
    table.write_bytes(table.read_bytes()[:-1] + b"x")
    assert table_digests({"interactions": table})[1] != combined


def test_declared_lineage_checks_its_options(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    declared = declared_lineage("US,EU", "US", 1000, [data])
    assert declared is not None
    assert declared.regions == ["EU", "US"] and declared.cleared_for_transfer == ["US"]
    assert declared.origin() == DataOrigin(frozenset({"EU", "US"}), frozenset({"US"}))
    assert declared.shown().startswith("EU,US (declared), 1,000 rows (US cleared), sha256 ")
    assert declared_lineage(None, None, None, []) is None
    for args, problem in (
        (("EU US", None, None, []), "--data-regions 'EU US': 'EU US' is not a region code"),
        (("EU", "US", None, []), "--cleared-for-transfer: 'US' is not one of --data-regions"),
        ((None, "US", None, []), "--cleared-for-transfer: give --data-regions too"),
        (("EU", None, 0, []), "--training-rows: 0 is not a positive number"),
    ):
        with pytest.raises(ModelStoreError, match=problem):
            declared_lineage(*args)  # type: ignore[arg-type]


def test_a_version_without_lineage_says_so() -> None:
    lineage = Lineage(made_by="rankgate model register", project="p")
    assert lineage.shown() == "no lineage recorded" and lineage.origin() is None
    with pytest.raises(ValueError, match="cleared_for_transfer: 'US' is not one of its regions"):
        DataLineage(regions=["EU"], source="declared", cleared_for_transfer=["US"])


def test_a_version_that_did_not_load_is_let_through_to_degrade_as_unavailable() -> None:
    """It never scores, so nothing it learned reaches an answer; its requests say
    model_unavailable (why), not residency."""
    from types import SimpleNamespace

    from serving.runtime import residency_of

    models = SimpleNamespace(
        origins={"v-eu": EU_ONLY, "v-us": US_ONLY, "v-gone": None}, errors={"v-gone": "missing"}
    )
    policy = parse_yaml_model(POLICY_FILE.read_bytes(), POLICY_FILE, Policy)
    accepted = residency_of(policy, models)  # type: ignore[arg-type]
    assert accepted == {"EU": frozenset({"v-eu", "v-gone"}), "US": frozenset({"v-us", "v-gone"})}
