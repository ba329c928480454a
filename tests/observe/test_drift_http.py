"""Drift per version on the real server: ordinary requests look like the training data;
requests whose candidates are a narrow set of items shift the inputs, and the PSI,
the flag, `rankgate model status` and the promotion block all see it."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.samples import Sample

from loadtests.ray_metrics import PREFIX
from rankgate.cli.main import main
from rankgate.core.pseudonym import user_key
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.observe.drift_figures import DriftFigures, read_drift
from tests.conftest import Server
from tests.serving_support import (
    PATIENT_BUDGET_MS,
    deploy,
    ingress_user_config,
    metrics_when,
    routing,
)

PURPOSE = "onsite_personalization"
WINDOW_S = 30.0
"""Long enough for a busy machine to send every request of a phase into one window
(each phase sends 300, from CLIENTS clients at once)."""
CLIENTS = 4
DRIFT = {
    "window_s": WINDOW_S,
    "min_rows": 300,
    "feature_psi": 0.25,
    "score_psi": 0.25,
    "explanation_shift": 0.3,
    "min_explained_rows": 100,
    "block_promotion": True,
    "refresh_s": 0.25,
}


def drift_user_config() -> dict[str, Any]:
    """v2 stable, v1 a shadow (it scores copies of the same requests), drift watched
    over a short window."""
    return ingress_user_config(drift=DRIFT, routing=routing("v2", shadow=["v1"]))


@pytest.fixture
def watched(server: Server) -> Iterator[None]:
    deploy(server, "drift", drift_user_config(), lambda h: h["drift"] == DRIFT)
    yield
    deploy(server, "default", ingress_user_config(), lambda h: h["drift"]["window_s"] == 3600)


def logged_users(env: Environment, count: int) -> list[str]:
    """Ordinary traffic: the people of `count` impressions drawn from the log the models
    were trained on (active people come back more often), of those whose consent lets
    them be personalized."""
    ids = env.project.prepare_module.impression_user_ids()  # type: ignore[union-attr]
    drawn = random.Random(14).sample(ids, 2 * count)
    states = env.consent.states([user_key(u) for u in drawn], PURPOSE)
    return [u for u, s in zip(drawn, states, strict=True) if s == ConsentState.GRANTED][:count]


def rank_all(server: Server, users: list[str], **extra: Any) -> None:
    """Every user asks once, from CLIENTS clients at once: the phase fits in the drift
    window however busy the machine is."""

    def ask(share: list[str]) -> None:
        with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=10) as client:
            for user in share:
                body = {
                    "user_id": user,
                    "purpose": PURPOSE,
                    "region": "US",
                    "k": 3,
                    "budget_ms": PATIENT_BUDGET_MS,
                    **extra,
                }
                response = client.post("/v1/rank", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["fallback"] is None, response.text

    with ThreadPoolExecutor(CLIENTS) as pool:
        for done in [pool.submit(ask, users[n::CLIENTS]) for n in range(CLIENTS)]:
            done.result()


def figures_after(env: Environment, version: str, rows: int, timeout_s: float = 15) -> DriftFigures:
    """The figures once a replica has folded at least `rows` rows into the window."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = read_drift(env.redis, env.home.namespace, version)
        if figures is not None and figures.rows >= rows:
            return figures
        assert time.monotonic() < deadline, figures
        time.sleep(0.1)


def gauges(
    server: Server, version: str, ready: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """The drift gauges of `version` (the highest of any replica) once `ready` holds
    of them, or the last ones read when 30 s have passed."""
    found: dict[str, float] = {}

    def read(samples: list[Sample]) -> bool:
        found.clear()
        for sample in samples:
            label, name = sample.labels, sample.name.removeprefix(PREFIX)
            if label.get("model_version") != version:
                continue
            if name == "rankgate_drift_flag":
                key = f"flag:{label['kind']}"
            elif name == "rankgate_feature_psi":
                key = f"psi:{label['feature']}"
            elif name in ("rankgate_score_psi", "rankgate_drift_window_rows"):
                key = name
            else:
                continue
            found[key] = max(found.get(key, sample.value), sample.value)
        return ready(found)

    metrics_when(server, read)
    return found


@pytest.mark.usefixtures("watched")
def test_shifted_requests_raise_the_drift_flag(
    server: Server, env: Environment, tmp_path: Path
) -> None:
    users = logged_users(env, 300)
    catalogue = len(env.catalogue())
    rank_all(server, users)
    ordinary = figures_after(env, "v2", len(users) * catalogue)
    print(f"\nordinary requests: {ordinary.describe()}")
    assert ordinary.has_reference and ordinary.flags == []
    assert max(ordinary.feature_psi.values()) < 0.25 and ordinary.score_psi is not None
    assert ordinary.score_psi < 0.25
    rows = len(users) * catalogue
    metrics = gauges(server, "v2", lambda m: m.get("rankgate_drift_window_rows", 0) >= rows)
    assert metrics["flag:feature"] == 0 and metrics["flag:score"] == 0
    assert metrics["rankgate_drift_window_rows"] >= len(users) * catalogue

    # The ordinary rows leave the window; then every request asks about three items.
    time.sleep(WINDOW_S + 1)
    narrow = env.catalogue()[:3]
    rank_all(server, users, candidates=narrow)
    shifted = figures_after(env, "v2", len(users) * len(narrow))
    print(f"candidates {narrow}: {shifted.describe()}")
    assert shifted.rows == len(users) * len(narrow)  # only the shifted rows
    assert "feature" in shifted.flags
    top_name, top_psi = shifted.top_features(1)[0]
    assert top_psi > 1.0 and top_psi > 4 * max(ordinary.feature_psi.values())
    metrics = gauges(server, "v2", lambda m: m.get("flag:feature") == 1)
    assert metrics["flag:feature"] == 1 and metrics[f"psi:{top_name}"] > 1.0

    # The shadow scored copies of the same requests: its inputs shifted too.
    shadow = figures_after(env, "v1", len(users) * len(narrow))
    assert "feature" in shadow.flags

    status = CliRunner().invoke(main, ["model", "status"])
    assert status.exit_code == 0, status.output
    print(status.output)
    assert f"top input PSI: {top_name}" in status.output and "flags: feature" in status.output

    # With drift.block_promotion, the flagged shadow may not get users, unless forced.
    config = tmp_path / "serve_config.yaml"
    document = yaml.safe_load(server.config_path.read_text())
    ingress = next(
        d for d in document["applications"][0]["deployments"] if d["name"] == "RankIngress"
    )
    ingress["user_config"] = drift_user_config()
    config.write_text(yaml.safe_dump(document))
    promote = ["model", "promote", "v1", "--canary", "10", "--config", str(config)]
    refused = CliRunner().invoke(main, promote)
    assert refused.exit_code == 1 and "v1 has drift flags" in refused.output, refused.output
    forced = CliRunner().invoke(main, [*promote, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "WARNING (--force): v1 has drift flags" in forced.output
    history = CliRunner().invoke(main, ["model", "history", "--count", "1"])
    assert "FORCED past: v1 has drift flags" in history.output, history.output
