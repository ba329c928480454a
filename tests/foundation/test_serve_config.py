"""Each setting once: serve_config.yaml against the defaults in the code.

A default lives in the typed config class (serving/contract/config.py, the
EventConsumer's and the application's arguments). serve_config.yaml states a
setting only when an operator is meant to tune it (it then equals the code's
default, and is listed in OPERATOR_FACING) or when it deliberately differs from
the code (listed with its reason in DELIBERATE_OVERRIDES). Anything else is a
second copy of a default, and two copies drift apart: `events.max_batch` once
read 200 in the file, which every server ran with, and 500 in the code.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from serving.app import AppArgs
from serving.contract.config import EventLimits, ServingConfig
from serving.events.consumer import ConsumerConfig
from serving.ops.launch import SERVE_CONFIG
from tests.serving_support import serve_config

OPERATOR_FACING = {
    "args": {"ranker_placement"},
    "RankIngress": {
        "budget.default_ms",
        "budget.max_ms",
        "limits.max_body_bytes",
        "limits.max_candidates",
        "limits.max_k",
        "connections.header_timeout_s",
        "connections.body_timeout_s",
        "connections.idle_timeout_s",
        "connections.max_per_source",
        "routing.rollback.window_s",
        "routing.rollback.min_requests",
        "routing.rollback.max_error_rate_delta",
        "routing.rollback.max_degraded_rate_delta",
        "routing.rollback.max_p99_ratio",
        "routing.rollback.min_p99_delta_ms",
        "routing.rollback.min_impressions",
        "routing.rollback.ctr_p_value",
        "explainer.sample_rate",
        "drift.window_s",
        "drift.min_rows",
        "drift.feature_psi",
        "drift.score_psi",
        "drift.explanation_shift",
        "drift.block_promotion",
        "retention.interval_s",
    },
    "EventConsumer": {"lease_s"},
}
"""Settings an operator is meant to tune, stated in the file at the code's default
(with a comment there saying what they do)."""

DELIBERATE_OVERRIDES: dict[str, dict[str, str]] = {
    "args": {},
    "RankIngress": {},
    "EventConsumer": {},
}
"""Settings whose value in the file differs from the code's default on purpose:
path -> why. Empty: the shipped file runs on the code's defaults."""

REQUIRED = object()


def stated(model: type[BaseModel], values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Each setting the file states (dotted path -> (value, the code's default)).

    A section that is itself a config class is walked into; a setting without a
    default in the code (routing's salt and versions) has nothing to restate."""
    found: dict[str, Any] = {}
    for key, value in values.items():
        field = model.model_fields[key]
        path = f"{prefix}{key}"
        annotation = field.annotation
        if (
            isinstance(value, dict)
            and isinstance(annotation, type)
            and issubclass(annotation, BaseModel)
        ):
            found.update(stated(annotation, value, f"{path}."))
        elif field.is_required():
            found[path] = (value, REQUIRED)
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump()
            found[path] = (value, default)
    return found


def deployment(name: str) -> dict[str, Any]:
    application = serve_config()["applications"][0]
    return next(d for d in application["deployments"] if d["name"] == name)


SECTIONS: dict[str, tuple[type[BaseModel], Any]] = {
    "args": (AppArgs, lambda: serve_config()["applications"][0].get("args") or {}),
    "RankIngress": (ServingConfig, lambda: deployment("RankIngress").get("user_config") or {}),
    "EventConsumer": (
        ConsumerConfig,
        lambda: deployment("EventConsumer").get("user_config") or {},
    ),
}


def misplaced(section: str, settings: dict[str, Any]) -> list[str]:
    """What breaks the rule in one section of the file: restated defaults nobody is
    meant to tune, differences from the code nobody chose, and lists naming what the
    file no longer states (or states differently)."""
    facing, overrides = OPERATOR_FACING[section], DELIBERATE_OVERRIDES[section]
    problems = []
    for path, (value, default) in sorted(settings.items()):
        if default is REQUIRED:
            continue
        if value == default and path not in facing:
            problems.append(
                f"{section} {path}: {value!r} restates the code's default; remove it from "
                f"{SERVE_CONFIG.name}, or list it in OPERATOR_FACING"
            )
        if value != default and path not in overrides:
            problems.append(
                f"{section} {path}: {value!r} in {SERVE_CONFIG.name}, {default!r} in the code; "
                "make them one, or list it in DELIBERATE_OVERRIDES with the reason"
            )
        if value == default and path in overrides:
            problems.append(f"{section} {path}: listed as an override, but equals the default")
        if value != default and path in facing:
            problems.append(
                f"{section} {path}: operator-facing, so it must equal the code's default "
                f"({default!r}), not {value!r}"
            )
    for path in sorted((facing | overrides.keys()) - settings.keys()):
        problems.append(f"{section} {path}: listed here, but {SERVE_CONFIG.name} does not state it")
    return problems


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_serve_config_states_each_setting_once(section: str) -> None:
    model, values = SECTIONS[section]
    assert misplaced(section, stated(model, values())) == []


def test_a_default_stated_twice_differently_fails() -> None:
    """The drift this test is for: the file and the code disagree on a default."""
    drifted = stated(ServingConfig, {"events": {"max_batch": EventLimits().max_batch + 300}})
    assert any(
        "events.max_batch" in p and "in the code" in p for p in misplaced("RankIngress", drifted)
    )
    restated = stated(ServingConfig, {"features": {"item_refresh_s": 300}})
    assert any("restates" in p for p in misplaced("RankIngress", restated))
    tuned = stated(ServingConfig, {"budget": {"default_ms": 80}})
    assert any("operator-facing" in p for p in misplaced("RankIngress", tuned))
