"""Native models registered beside an ONNX file: LightGBM, XGBoost, scikit-learn.

They serve two purposes: registration checks the ONNX conversion against them
(parity), and SHAP explains them: TreeExplainer for trees, LinearExplainer for a
scikit-learn linear model behind a StandardScaler (what `trainer:
logistic_regression` fits). Each kind is loaded by its own library, imported only
when a model of that kind is loaded.

The two kinds `rankgate setup` trains are explained without importing the shap
package (which brings numba and LLVM: ~75 MB and most of a second in every
serving replica), with the very computation SHAP makes for them: a LightGBM
booster's values come from LightGBM's own TreeSHAP (`pred_contrib`, which is
what TreeExplainer calls for LightGBM), a standardized linear model's are
coef * (x - mean) (LinearExplainer's interventional values). Any other model is
given to SHAP.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from model_store.manifest import BoosterKind
from rankgate.core.errors import ModelStoreError


def load_native(path: Path, kind: BoosterKind) -> Any:
    """The tree model in `path`; ModelStoreError names the file when it does not load."""
    try:
        if kind == "lightgbm":
            import lightgbm as lgb

            return lgb.Booster(model_file=str(path))
        if kind == "xgboost":
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(str(path))
            return booster
        import joblib

        return joblib.load(path)  # the project's own file: trusted as its code is
    except ImportError as exc:
        raise ModelStoreError(
            f"--booster: a {kind} model needs the {exc.name} package"
            + (" (pip install 'rankgate[xgboost]')" if kind == "xgboost" else "")
        ) from exc
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a {kind} model ({exc})", 422) from exc


def predict_native(model: Any, kind: BoosterKind, matrix: np.ndarray) -> np.ndarray:
    """Probability of the positive class per row, as the ONNX model should score it."""
    if kind == "lightgbm":
        return np.asarray(model.predict(matrix), dtype=np.float64)
    if kind == "xgboost":
        import xgboost as xgb

        return np.asarray(model.predict(xgb.DMatrix(matrix)), dtype=np.float64)
    return np.asarray(model.predict_proba(matrix)[:, 1], dtype=np.float64)


class LightGBMTreeShap:
    """SHAP values of a LightGBM booster as TreeExplainer computes them: LightGBM's
    TreeSHAP (`pred_contrib`) over every tree, without its last column (the base value)."""

    def __init__(self, booster: Any) -> None:
        self.booster = booster

    @property
    def expected_value(self) -> float:
        """The base value: what the contributions of any row add to (log-odds)."""
        row = np.zeros((1, self.booster.num_feature()))
        return float(self.booster.predict(row, num_iteration=-1, pred_contrib=True)[0, -1])

    def shap_values(self, matrix: np.ndarray, threads: int | None = None) -> np.ndarray:
        options = {} if threads is None else {"num_threads": threads}
        # num_iteration=-1: every tree, as TreeExplainer asks for.
        raw = self.booster.predict(matrix, num_iteration=-1, pred_contrib=True, **options)
        return np.asarray(raw)[:, :-1].reshape(len(matrix), -1)


class LinearShap:
    """SHAP values of a linear model with independent inputs, as LinearExplainer gives
    them for a (mean, covariance) background: coef * (x - mean) in log-odds."""

    def __init__(self, coef: np.ndarray, intercept: float, mean: np.ndarray) -> None:
        self.coef, self.mean = coef, mean
        self.expected_value = float(np.dot(coef, mean) + intercept)

    def shap_values(self, matrix: np.ndarray) -> np.ndarray:
        return np.array(np.multiply(matrix - self.mean, self.coef))


def tree_explainer(model: Any) -> Any:
    """The model's SHAP explainer: a LightGBM booster's own TreeSHAP, linear SHAP for a
    standardized linear pipeline, else shap's TreeExplainer (which refuses what is not
    a tree model)."""
    booster = getattr(model, "booster_", model)  # LightGBM's scikit-learn wrapper holds one
    if type(booster).__module__.startswith("lightgbm") and type(booster).__name__ == "Booster":
        return LightGBMTreeShap(booster)
    linear = standardized_linear(model)
    if linear is not None:
        raw, (mean, _) = linear
        coef, intercept = np.asarray(raw.coef_), np.asarray(raw.intercept_).reshape(-1)
        if coef.ndim == 2 and coef.shape[0] == 1 and intercept.size == 1:  # binary
            return LinearShap(coef[0], float(intercept[0]), mean)
    import shap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if linear is not None:
            return shap.LinearExplainer(*linear)
        return shap.TreeExplainer(model)


def standardized_linear(model: Any) -> tuple[Any, tuple[np.ndarray, np.ndarray]] | None:
    """A scikit-learn Pipeline(StandardScaler, linear classifier) as one linear model on
    the raw inputs, with the training mean and (diagonal) covariance the scaler learned
    as SHAP's background: a contribution is coef_j * (x_j - mean_j) / scale_j in log-odds.
    None for any other model."""
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if not isinstance(model, Pipeline) or len(model.steps) != 2:
        return None
    scaler, classifier = model.steps[0][1], model.steps[1][1]
    if not isinstance(scaler, StandardScaler) or not hasattr(classifier, "coef_"):
        return None
    if scaler.mean_ is None or scaler.scale_ is None:
        return None
    coef = np.asarray(classifier.coef_, dtype=np.float64) / scaler.scale_
    raw = clone(classifier)
    raw.coef_ = coef
    raw.intercept_ = classifier.intercept_ - coef @ scaler.mean_
    raw.classes_ = classifier.classes_
    return raw, (np.asarray(scaler.mean_), np.diag(np.asarray(scaler.scale_) ** 2))


def contributions(explainer: Any, matrix: np.ndarray, threads: int | None = None) -> np.ndarray:
    """SHAP values of the positive class: shape (rows, features).

    `threads` caps the threads a LightGBM model computes with (None: LightGBM's
    default, every core): work done beside the serving path leaves the other core
    to it, and the few rows of an answer are faster on one thread."""
    if isinstance(explainer, LightGBMTreeShap):
        return explainer.shap_values(matrix, threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = explainer.shap_values(matrix)
    if isinstance(values, list):  # one array per class (older scikit-learn explanations)
        values = values[-1]
    values = np.asarray(values)
    if values.ndim == 3:  # (rows, features, classes)
        values = values[:, :, -1]
    return values.reshape(len(matrix), -1)
