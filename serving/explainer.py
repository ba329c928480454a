"""Explanations: SHAP TreeExplainer on the native booster stored beside the ONNX file.

Only the returned top-k rows are explained (SHAP costs about a millisecond per
ten rows here), each with its top positive contributions rendered as
plain-language reasons from policies/reasons.yaml.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.vector import FeatureSpec
from model_store.manifest import BOOSTER_FILE
from rankgate.config_files import load_yaml_model
from rankgate.policy import POLICY_DIR
from serving.schemas import Reason


class ReasonTemplates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    max_reasons_per_item: int = Field(3, ge=1, le=10)
    templates: dict[str, str] = Field(min_length=1)


def load_reason_templates(path: Path | None = None) -> ReasonTemplates:
    return load_yaml_model(path or POLICY_DIR / "reasons.yaml", ReasonTemplates)


class Explainer:
    def __init__(
        self, model_dir: Path, specs: Sequence[FeatureSpec], templates: ReasonTemplates
    ) -> None:
        import lightgbm as lgb
        import shap

        self.specs = list(specs)
        self.templates = templates
        booster = lgb.Booster(model_file=str(model_dir / BOOSTER_FILE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tree = shap.TreeExplainer(booster)

    def explain(self, matrix: np.ndarray) -> list[list[Reason]]:
        """Reasons per row: the features that raised its score most (log-odds units)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            contributions = np.asarray(self.tree.shap_values(matrix))
        limit = self.templates.max_reasons_per_item
        explained = []
        for row in contributions.reshape(len(matrix), len(self.specs)):
            order = [int(i) for i in np.argsort(-row) if row[i] > 0][:limit]
            explained.append([self._reason(self.specs[i], float(row[i])) for i in order])
        return explained

    def _reason(self, spec: FeatureSpec, contribution: float) -> Reason:
        template = self.templates.templates.get(spec.group, "{feature} raised this item's score")
        return Reason(
            feature=spec.name,
            group=spec.group,
            contribution=round(contribution, 6),
            text=template.format(feature=spec.name),
        )
