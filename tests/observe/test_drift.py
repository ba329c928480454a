"""Drift per version, as plain classes: binning, PSI, the sliding window, flags."""

from __future__ import annotations

import numpy as np
import pytest

from features.spec import FeatureSpec
from model_store.reference import Bins, bin_index, compute_reference
from serving.contract.config import DriftConfig
from serving.observe.drift import (
    WINDOW_BUCKETS,
    DriftMonitor,
    DriftWindow,
    VersionInputs,
    l1_shift,
    psi,
)
from serving.observe.drift_figures import DriftFigures
from serving.observe.metrics import ServingMetrics

SPECS = [
    FeatureSpec("price", "item", "items", "price", "number", "item"),
    FeatureSpec("visits", "user", "users", "visits", "number", "user"),
    FeatureSpec("segment", "user", "users", "segment", "number", "user"),
]
NOW = 1_000_000.0


def reference_matrix(rng: np.random.Generator, rows: int = 5000) -> np.ndarray:
    matrix = np.column_stack(
        [
            rng.normal(50, 10, rows),
            rng.poisson(3, rows).astype(float),
            rng.integers(0, 4, rows).astype(float),
        ]
    ).astype(np.float32)
    matrix[rng.random(rows) < 0.1, 1] = -1.0  # some visits missing
    return matrix


def scores_of(matrix: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(matrix[:, 0] - 50) / 10))


@pytest.fixture
def window() -> DriftWindow:
    rng = np.random.default_rng(0)
    matrix = reference_matrix(rng)
    explain = lambda rows: np.column_stack([rows[:, 0] / 10, rows[:, 1], np.ones(len(rows))])
    reference = compute_reference(SPECS, matrix, scores_of(matrix), "training matrix", explain)
    config = DriftConfig(window_s=300, min_rows=1000, min_explained_rows=50)
    return DriftWindow("v1", [s.name for s in SPECS], [s.group for s in SPECS], reference, config)


def test_bins_of_constant_discrete_and_missing() -> None:
    constant = Bins.of(np.full(100, 7.0))
    assert constant.edges == [] and constant.proportions == [0.0, 1.0]
    discrete = Bins.of(np.array([0, 0, 1, 1, 1, 3, -1, -1], dtype=float))
    assert discrete.edges == [0.5, 2.0]  # one bin per value, halfway between them
    assert discrete.proportions == [2 / 8, 2 / 8, 3 / 8, 1 / 8]  # missing first
    spread = Bins.of(np.arange(1000, dtype=float))
    assert len(spread.edges) == 9 and spread.proportions[0] == 0.0
    assert np.allclose(spread.proportions[1:], 0.1)
    assert list(bin_index(np.array([-1.0, -5.0, 7.0]), [0.5, 2.0])) == [0, 1, 3]


def test_psi_identical_is_zero_and_shifted_is_large(window: DriftWindow) -> None:
    assert psi(np.array([0.2, 0.8]), np.array([0.2, 0.8])) == pytest.approx(0.0)
    rng = np.random.default_rng(1)
    same = reference_matrix(rng, 2000)
    window.observe(same, scores_of(same))
    figures = window.figures(NOW)
    assert figures.rows == 2000 and figures.flags == []
    assert max(figures.feature_psi.values()) < 0.02 and figures.score_psi is not None
    assert figures.score_psi < 0.02

    shifted = reference_matrix(rng, 4000)
    shifted[:, 0] += 15  # prices went up
    window.observe(shifted, scores_of(shifted))
    figures = window.figures(NOW)
    print(figures.describe())
    assert figures.top_features(1)[0][0] == "price"
    assert figures.feature_psi["price"] > 0.25 > figures.feature_psi["visits"]
    assert figures.score_psi > 0.25
    assert figures.flags == ["feature", "score"]


def test_no_flag_below_min_rows(window: DriftWindow) -> None:
    shifted = reference_matrix(np.random.default_rng(2), 500)
    shifted[:, 2] = 9.0  # an unseen segment
    window.observe(shifted, scores_of(shifted))
    figures = window.figures(NOW)
    assert figures.feature_psi["segment"] > 1 and figures.flags == []


def test_window_expires_old_buckets(window: DriftWindow) -> None:
    shifted = reference_matrix(np.random.default_rng(3), 2000)
    shifted[:, 0] -= 30
    window.pending.append((NOW, shifted, scores_of(shifted)))
    assert window.figures(NOW).flags == ["feature", "score"]
    later = NOW + window.config.window_s + window.config.window_s / WINDOW_BUCKETS
    figures = window.figures(later)
    assert figures.rows == 0 and figures.feature_psi == {} and figures.flags == []


def test_explanation_drift(window: DriftWindow) -> None:
    assert window.reference is not None and window.reference.shap_groups is not None
    assert set(window.reference.shap_groups) == {"item", "user"}
    rows = reference_matrix(np.random.default_rng(4), 100)
    alike = np.column_stack([rows[:, 0] / 10, rows[:, 1], np.ones(len(rows))])
    window.observe_explanations(alike)
    figures = window.figures(NOW)
    assert figures.explanation_drift is not None and figures.explanation_drift < 0.05
    assert "explanation" not in figures.flags
    # The item group now explains everything.
    window.observe_explanations(
        np.column_stack([alike[:, 0] * 20, alike[:, 1] * 0, alike[:, 2] * 0])
    )
    figures = window.figures(NOW)
    assert figures.explanation_drift > 0.3 and "explanation" in figures.flags
    assert l1_shift({"a": 1.0}, {"b": 3.0}) == pytest.approx(2.0)


def test_a_reference_without_the_versions_inputs_is_not_compared(window: DriftWindow) -> None:
    """A version whose inputs the reference lacks (a copy with another input list) is
    counted as having no reference; building its window never raises."""
    names = [s.name for s in SPECS] + ["extra"]
    other = DriftWindow("v1-other", names, ["g"] * len(names), window.reference, window.config)
    assert other.reference is None
    other.observe(np.zeros((2, len(names)), dtype=np.float32), np.zeros(2))
    assert other.figures().rows == 2 and not other.figures().has_reference


def test_monitor_without_reference_counts_rows_and_reports_it() -> None:
    metrics = ServingMetrics()
    monitor = DriftMonitor(metrics)
    monitor.use(DriftConfig(), {"v9": VersionInputs(["a"], ["g"], None)})
    monitor.observe("v9", np.zeros((3, 1), dtype=np.float32), np.zeros(3))
    monitor.observe("unknown", np.zeros((3, 1), dtype=np.float32), np.zeros(3))
    [figures] = monitor.refresh()
    assert figures.rows == 3 and not figures.has_reference and figures.flags == []
    assert figures.describe().startswith("no reference")
    assert b"rankgate_drift_flag{" not in metrics.render()
    again = DriftFigures.from_hash("v9", figures.to_hash())
    assert again == figures


def test_monitor_publishes_metrics(window: DriftWindow) -> None:
    metrics = ServingMetrics()
    monitor = DriftMonitor(metrics)
    inputs = VersionInputs(window.features, ["item", "user", "user"], window.reference)
    monitor.use(window.config, {"v1": inputs})
    shifted = reference_matrix(np.random.default_rng(5), 2000)
    shifted[:, 0] += 20
    monitor.observe("v1", shifted, scores_of(shifted))
    monitor.refresh()
    text = metrics.render().decode()
    assert 'rankgate_drift_flag{kind="feature",model_version="v1"} 1.0' in text
    assert 'rankgate_feature_psi{feature="price",model_version="v1"}' in text
    assert 'rankgate_score_psi{model_version="v1"}' in text
    monitor.use(window.config, {})
    assert "rankgate_feature_psi{" not in metrics.render().decode()


def test_the_history_keeps_one_entry_per_window_bucket_and_no_empty_window(
    window: DriftWindow,
) -> None:
    monitor = DriftMonitor(ServingMetrics())
    inputs = VersionInputs(window.features, ["item", "user", "user"], window.reference)
    monitor.use(window.config, {"v1": inputs})
    assert monitor.due_for_history(monitor.refresh(NOW)) == []  # nothing scored yet
    matrix = reference_matrix(np.random.default_rng(7), 500)
    monitor.observe("v1", matrix, scores_of(matrix))
    [first] = monitor.due_for_history(monitor.refresh(NOW))
    assert first.rows == 500 and first.feature_psi
    bucket_s = window.config.window_s / WINDOW_BUCKETS
    assert monitor.due_for_history(monitor.refresh(NOW + bucket_s / 2)) == []
    [later] = monitor.due_for_history(monitor.refresh(NOW + bucket_s))
    assert later.at == NOW + bucket_s
