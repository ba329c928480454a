"""Role changes of the routing: who serves each purpose before and after, refusals,
--force, and a rollback that gives a canary its previous role back.

The plan is a pure function over the routing, the policy's purposes and the views
each version reads, so most tests here are plain and take milliseconds; the last
one runs the commands against a copy of serve_config.yaml (no server).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.governance.notifications import Notification
from rankgate.governance.policy import load_policy
from rankgate.ops.environment import Environment
from serving.contract.config import Role, RoutingConfig
from serving.ops.coverage import (
    PromotionRefused,
    RoutingChange,
    coverage,
    permitted_views,
    unserved,
)
from serving.ops.promotion import Move, RoutingFile, plan, rollback_move
from serving.ranking.routing import Router
from tests.serving_support import SERVE_CONFIG, ingress_user_config, model_commands, routing

PURPOSES = permitted_views(load_policy())
ONSITE, EMAIL = "onsite_personalization", "email_marketing"
# v1 and v2 as `rankgate setup` trains them (v2 reads user-item affinity, which e-mail
# may not use); v3 is a new candidate with v2's features.
VIEWS: dict[str, frozenset[str] | None] = {
    "v1": frozenset({"visitor_profile", "item_context"}),
    "v2": frozenset({"visitor_profile", "item_context", "user_item_affinity"}),
}
VIEWS["v3"] = VIEWS["v2"]
DEFAULT = RoutingConfig.model_validate(ingress_user_config()["routing"])  # v2 stable, v1 alternate


def roles(config: RoutingConfig) -> list[tuple[str, str, float | None, str | None]]:
    return [(r.version, r.role, r.weight, r.previous_role) for r in config.versions]


def change(config: RoutingConfig, move: Move) -> RoutingChange:
    return plan(config, move, PURPOSES, VIEWS)


def forced(config: RoutingConfig, move: Move) -> RoutingConfig:
    planned = change(config, move)
    planned.guard(force=True, say=lambda _line: None)
    return planned.after


def test_the_default_routing_serves_every_purpose() -> None:
    v1_views = VIEWS["v1"]
    assert (
        PURPOSES[EMAIL] < PURPOSES[ONSITE] and v1_views is not None and v1_views <= PURPOSES[EMAIL]
    )
    assert unserved(coverage(DEFAULT, PURPOSES, VIEWS)) == {ONSITE: 0.0, EMAIL: 0.0}


def test_promoting_the_only_alternate_to_canary_is_refused_naming_the_purpose() -> None:
    planned = change(DEFAULT, Move("v1", "canary", 10))
    # A canary serves only its share: the other 90 % of e-mail users would have no model.
    assert planned.losses() == {EMAIL: 90.0}
    with pytest.raises(PromotionRefused) as refused:
        planned.guard(force=False, say=lambda _line: None)
    assert (
        "email_marketing would be left without a permitted model for 90 % of its users"
        in refused.value.message
    )
    assert "make a version that email_marketing may use an alternate" in refused.value.message
    assert "--alternate" in refused.value.message and "--force" in refused.value.message


def test_force_applies_it_and_says_loudly_which_purposes_lose_personalization() -> None:
    said: list[str] = []
    planned = change(DEFAULT, Move("v1", "canary", 10))
    planned.guard(force=True, say=said.append)
    assert said == [
        (
            "WARNING (--force): email_marketing loses personalization for 90 % of its users: "
            "they get the non-personalized fallback (no_permitted_model)"
        )
    ]
    assert roles(planned.after) == [("v2", "stable", 90, None), ("v1", "canary", 10, "alternate")]


def test_rollback_gives_the_canary_its_previous_role_back() -> None:
    canary = forced(DEFAULT, Move("v1", "canary", 10))
    move = rollback_move(canary)
    assert move == Move("v1", "alternate")
    planned = change(canary, move)
    assert planned.losses() == {}
    assert planned.after == DEFAULT  # v1 is the alternate again; e-mail is served
    assert rollback_move(DEFAULT) is None


def test_a_canary_new_to_the_routing_leaves_it_on_rollback() -> None:
    planned = change(DEFAULT, Move("v3", "canary", 10))
    assert planned.losses() == {}  # e-mail stays with the alternate v1
    assert roles(planned.after) == [
        ("v2", "stable", 90, None),
        ("v3", "canary", 10, None),
        ("v1", "alternate", None, None),
    ]
    move = rollback_move(planned.after)
    assert move == Move("v3", None)
    assert change(planned.after, move).after == DEFAULT


def test_raising_the_weight_keeps_the_previous_role() -> None:
    at_10 = forced(DEFAULT, Move("v1", "canary", 10))
    at_50 = change(at_10, Move("v1", "canary", 50))
    # Fewer e-mail users without a model than before: allowed, with a reminder.
    assert at_50.losses() == {} and at_50.still_unserved() == {EMAIL: 50.0}
    said: list[str] = []
    at_50.guard(force=False, say=said.append)
    assert said == ["warning: email_marketing still has no permitted model for 50 % of its users"]
    assert roles(at_50.after) == [("v2", "stable", 50, None), ("v1", "canary", 50, "alternate")]
    assert change(at_50.after, rollback_move(at_50.after)).after == DEFAULT  # type: ignore[arg-type]


def test_a_canary_taken_over_by_another_returns_to_its_previous_role() -> None:
    v1_canary = forced(DEFAULT, Move("v1", "canary", 10))
    planned = change(v1_canary, Move("v3", "canary", 20))
    assert planned.losses() == {}  # v1 back as the alternate serves e-mail again
    assert roles(planned.after) == [
        ("v2", "stable", 80, None),
        ("v3", "canary", 20, None),
        ("v1", "alternate", None, None),
    ]


def test_promoting_to_stable_replaces_the_stable_and_ends_the_canary() -> None:
    with_canary = change(DEFAULT, Move("v3", "canary", 10)).after
    planned = change(with_canary, Move("v3", "stable"))
    assert roles(planned.after) == [("v3", "stable", 100, None), ("v1", "alternate", None, None)]
    assert planned.losses() == {}
    # The alternate as stable serves both purposes itself.
    assert roles(change(DEFAULT, Move("v1", "stable")).after) == [("v1", "stable", 100, None)]


def test_shadowing_or_retiring_the_only_alternate_is_refused() -> None:
    for move in (Move("v1", "shadow"), Move("v1", None)):
        assert change(DEFAULT, move).losses() == {EMAIL: 100.0}, move
    shadowed = forced(DEFAULT, Move("v1", "shadow"))
    assert roles(shadowed) == [("v2", "stable", 100, None), ("v1", "shadow", None, None)]
    # ...and the alternate role can be given back.
    planned = change(shadowed, Move("v1", "alternate"))
    assert planned.losses() == {} and planned.still_unserved() == {}
    assert planned.after == DEFAULT


def test_the_stable_version_keeps_its_role_until_another_takes_over() -> None:
    for move in (Move("v2", "shadow"), Move("v2", "canary", 10), Move("v2", None)):
        with pytest.raises(PromotionRefused, match="v2 is the stable version"):
            change(DEFAULT, move)
    with pytest.raises(PromotionRefused, match="v9 is not in the routing"):
        change(DEFAULT, Move("v9", None))


def test_only_a_canary_remembers_a_previous_role() -> None:
    section = routing("v2", alternate=["v1"])
    section["versions"][1]["previous_role"] = "shadow"
    with pytest.raises(ValueError, match="only a canary has a previous_role"):
        RoutingConfig.model_validate(section)
    section = routing("v2", canary="v1", weight=10)
    section["versions"][1]["previous_role"] = "stable"
    with pytest.raises(ValueError, match="previous_role"):
        RoutingConfig.model_validate(section)


def test_coverage_is_what_the_router_answers() -> None:
    config = RoutingConfig.model_validate(routing("v2", canary="v1", weight=30))
    router = Router(config)
    keys = [user_key(f"u-{n}") for n in range(10_000)]
    served = coverage(config, PURPOSES, VIEWS)
    for purpose, allowed in PURPOSES.items():
        answers: Counter[tuple[str | None, Role | None]] = Counter(
            (chosen.version, chosen.variant)
            if (chosen := router.choose(k, allowed, VIEWS))
            else (None, None)  # no permitted model, as coverage writes it
            for k in keys
        )
        shares = {(s.version, s.variant): s.share for s in served if s.purpose == purpose}
        assert set(answers) == set(shares), purpose
        for answer, share in shares.items():
            assert abs(answers[answer] / len(keys) * 100 - share) < 2, (purpose, answer)


def test_the_table_shows_what_each_version_serves_before_and_after() -> None:
    lines = change(DEFAULT, Move("v1", "canary", 10)).table()
    cells = [line.split("  ") for line in lines]
    assert [[c.strip() for c in row if c.strip()] for row in cells] == [
        ["version", "before", "after"],
        ["v2", "stable: onsite_personalization", "stable 90 %: onsite_personalization (90 %)"],
        [
            "v1",
            "alternate: email_marketing",
            "canary 10 %: onsite_personalization (10 %), email_marketing (10 %)",
        ],
        ["no model", "-", "email_marketing (90 %)"],
    ]


def test_the_commands_keep_email_served_and_rollback_restores_the_alternate(
    ready_home: Home, tmp_path: Path
) -> None:
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text())
    runner = CliRunner()
    model = model_commands(config)

    code, output = model("promote", "v1", "--canary", "10")
    assert code == 1, output
    assert "email_marketing (90 %)" in output  # the table, then the refusal
    assert (
        "refused: email_marketing would be left without a permitted model for 90 % of its users"
        in output
    )
    assert config.read_text() == SERVE_CONFIG.read_text()

    code, output = model("promote", "v1", "--canary", "10", "--force")
    assert code == 0, output
    assert "WARNING (--force): email_marketing loses personalization for 90 %" in output
    assert "no running server uses this config" in output
    assert "{version: v1, role: canary, weight: 10, previous_role: alternate}" in config.read_text()

    code, output = model("rollback")
    assert code == 0, output
    assert "canary v1 back to alternate; v2 is stable for all users" in output
    assert config.read_text() == SERVE_CONFIG.read_text()  # v1 alternate again, comments kept

    code, output = model("retire", "v1")
    assert code == 1 and "refused: email_marketing would be left without" in output, output
    code, output = model("promote", "v2", "--shadow")
    assert code == 1 and "v2 is the stable version" in output, output
    assert config.read_text() == SERVE_CONFIG.read_text()

    # The audit of changes tells the command's rollback from a replica's automatic one.
    result = runner.invoke(main, ["model", "history", "--count", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].endswith("rollback v1 -> alternate"), result.output

    # Each change went to the outbox of notifications, for the webhooks that take it.
    env = Environment.open()
    entries = env.redis.xrevrange(redis_keys.notifications(env.home.namespace), count=2)
    promoted, rolled_back = [Notification.read(i, f) for i, f in reversed(entries)]  # type: ignore[union-attr]
    assert promoted.kind == "promotion" and promoted.text.startswith(
        "v1 was promoted with `rankgate model promote`: now canary at 10 %. FORCED past: "
        "email_marketing would be left without a permitted model for 90 % of its users"
    )
    assert (promoted.data["version"], promoted.data["forced"]) == ("v1", True)
    assert rolled_back.kind == "rollback" and rolled_back.text.startswith(
        "Canary v1 was rolled back with `rankgate model rollback`: now alternate."
    )
    assert rolled_back.data["automatic"] is False


def test_a_broken_routing_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text().replace("role: alternate", "role: alternative"))
    with pytest.raises(ConfigError, match=r"routing: field 'versions.1.role'"):
        RoutingFile.open(config)


def test_every_gate_refusal_names_the_setting_it_fell_below() -> None:
    from serving.contract.config import EvaluationRequirement
    from serving.ops.evidence import Evidence

    evidence = Evidence(
        version="v3",
        baseline="v2",
        source="logs",
        estimator="snips",
        value=0.01,
        baseline_value=0.02,
        low=-0.02,
        high=0.01,
        confidence=0.95,
        effective_sample_size=80,
        slots=10_000,
        clicks=38,
        weighted_clicks=3,
        verdict="cannot tell",
        deterministic_logs=False,
        logged_value=0.0038,
        logging_value=0.0038,
        logging_low=0.0027,
        logging_high=0.0051,
    )
    assert (
        "the logging policy: observed click rate 0.0038, snips 0.0038 [0.0027, 0.0051] on "
        "its own slots (inside its interval)" in evidence.lines()
    )
    failures = evidence.failures(EvaluationRequirement())
    assert [f.split(" below ")[1].split()[0] for f in failures] == [
        "promotion.require_evaluation.min_effective_sample_size",
        "promotion.require_evaluation.min_clicks",
        "promotion.require_evaluation.min_lift",
    ]
    assert "min_clicks 5" in failures[1]
    from model_store.offpolicy import MIN_CLICKS

    assert EvaluationRequirement().min_clicks == MIN_CLICKS  # one floor, two places
    assert (
        evidence.failures(
            EvaluationRequirement(min_clicks=3, min_effective_sample_size=50, min_lift=-1)
        )
        == []
    )
