"""`rankgate model evaluate` on the example's logs: the Open Bandit sample, logged by a
uniformly random policy with its propensities (1/80 per position)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.ops.environment import Environment


@pytest.fixture(scope="module")
def evaluated(ready_home) -> dict:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, ["model", "evaluate", "v1", "--against", "v2", "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_the_example_logs_give_estimates_with_intervals_and_a_verdict(evaluated: dict) -> None:
    assert evaluated["slots"] == 10_000 and evaluated["clicks"] == 38
    assert evaluated["logged_click_rate"] == pytest.approx(0.0038)
    for version in ("v1", "v2"):
        for name in ("ips", "snips", "dr"):
            found = evaluated["versions"][version][name]
            assert found["low"] <= found["value"] <= found["high"], (version, name, found)
            # A deterministic ranking keeps about one logged slot in 80 (3 positions).
            assert 60 < found["effective_sample_size"] < 250
    for name in ("ips", "snips", "dr"):
        # The sanity line: on its own slots the logging policy's estimate is its rate.
        logging = evaluated["logging_policy"][name]
        assert logging["value"] == pytest.approx(0.0038)
        assert logging["low"] <= 0.0038 <= logging["high"]
    for name in ("ips", "snips", "dr"):
        comparison = evaluated["comparisons"][name]
        assert comparison["low"] <= comparison["difference"] <= comparison["high"]
        assert comparison["verdict"] in ("better", "worse", "cannot tell")
    print(
        "\nexample logs, v1 vs v2: "
        + "; ".join(
            f"{name} v1 {evaluated['versions']['v1'][name]['value']:.4f} "
            f"v2 {evaluated['versions']['v2'][name]['value']:.4f} diff "
            f"[{c['low']:+.4f}, {c['high']:+.4f}] {c['verdict']}"
            for name, c in evaluated["comparisons"].items()
        )
    )


def test_the_plain_output_says_how_much_evidence_there_is(ready_home) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, ["model", "evaluate", "v2"])
    assert result.exit_code == 0, result.output
    assert "10000 logged slots, 38 clicks" in result.output
    assert "the intervals are wide" in result.output
    # v2 learned from the first 80 % of these slots (its training window says so).
    assert "v2's training window 2019-11-24T00:00:34" in result.output
    assert "v2 - the logging policy = " in result.output and "clicks weighed" in result.output
    assert "click rate 0.0038 is inside every interval" in result.output
    assert any(line.startswith("logging      snips") for line in result.output.splitlines())


def test_a_sample_of_slots_is_drawn_with_the_seed(ready_home) -> None:  # type: ignore[no-untyped-def]
    """`--slots N`: N logged slots drawn at random; the same seed draws the same ones."""
    args = ["model", "evaluate", "v2", "--slots", "2000", "--json"]
    first, again = (CliRunner().invoke(main, [*args, "--seed", "3"]) for _ in range(2))
    assert first.exit_code == 0, first.output
    figures = json.loads(first.output)
    assert figures["slots"] == 2000 and "2000 slots drawn at random" in figures["source"]
    assert figures == json.loads(again.output)
    refused = CliRunner().invoke(main, ["model", "evaluate", "v2", "--slots", "0"])
    assert refused.exit_code == 2 and "--slots" in refused.output


def test_the_target_is_the_versions_own_top_k(env: Environment) -> None:
    """Slots where the version shows the logged item at its position weigh 80 (1 / 0.0125)."""
    from features.tables import load_catalogue
    from model_store.evaluation import decisions_from_logs, slots_for
    from model_store.logged import load_item_table
    from model_store.manifest import ONNX_FILE
    from model_store.onnx_scoring import OnnxScorer
    from rankgate.core.topk import top_k

    views = env.views()
    manifest = env.models.manifest("v2")
    catalogue = load_catalogue(env.project, views, env.data_dir)
    decisions = decisions_from_logs(env.project, views, env.data_dir, manifest.specs, catalogue)[
        :300
    ]
    items = load_item_table(env.project, views)
    scorer = OnnxScorer(env.models.path("v2") / ONNX_FILE, manifest.onnx.output_name)
    slots = decisions.slots(manifest.specs, items, scorer)
    assert set(np.unique(slots.weights)) <= {0.0, 80.0}
    for n, target in enumerate(slots.target):
        from features.vector import build_matrix

        decision = decisions.decision(n, manifest.specs, items)
        scores = scorer.score(
            build_matrix(manifest.specs, decision.user, items, catalogue, decision.context)
        )
        (shown,) = decision.shown
        ranked = top_k(catalogue, scores, shown.position)
        assert target == float(ranked[-1].item_id == shown.item_id)
    # The per-decision path (the audit log's) gives the same slots.
    reference = slots_for(
        [decisions.decision(n, manifest.specs, items) for n in range(len(decisions))],
        manifest.specs,
        items,
        scorer,
    )
    for name in ("reward", "propensity", "target", "target_q", "logged_q", "group"):
        np.testing.assert_array_equal(getattr(slots, name), getattr(reference, name))


def test_a_log_without_propensities_is_refused_naming_the_field(
    env: Environment, tmp_path: Path
) -> None:
    import pandas as pd

    spec = env.project.spec.interactions
    logs = pd.read_parquet(env.project.path(spec.path, env.data_dir))
    logs[spec.propensity_column] = 0.0
    path = tmp_path / "logs.parquet"
    logs.to_parquet(path)
    result = CliRunner().invoke(main, ["model", "evaluate", "v1", "--logs", str(path)])
    assert result.exit_code == 1
    assert "interactions.propensity_column" in result.output and "above 0" in result.output
    unknown = CliRunner().invoke(main, ["model", "evaluate", "v9"])
    assert unknown.exit_code == 1 and "no model version 'v9'" in unknown.output
