"""Native tree models registered beside an ONNX file: LightGBM, XGBoost, scikit-learn.

They serve two purposes: registration checks the ONNX conversion against them
(parity), and SHAP's TreeExplainer explains them. Each kind is loaded by its own
library, imported only when a model of that kind is loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from model_store.manifest import BoosterKind
from rankgate.errors import ModelStoreError


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
        raise ModelStoreError(f"--booster: a {kind} model needs the {exc.name} package") from exc
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


def tree_explainer(model: Any) -> Any:
    import shap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return shap.TreeExplainer(model)


def contributions(explainer: Any, matrix: np.ndarray) -> np.ndarray:
    """SHAP values of the positive class: shape (rows, features)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = explainer.shap_values(matrix)
    if isinstance(values, list):  # one array per class (older scikit-learn explanations)
        values = values[-1]
    values = np.asarray(values)
    if values.ndim == 3:  # (rows, features, classes)
        values = values[:, :, -1]
    return values.reshape(len(matrix), -1)
