"""Explanations: SHAP TreeExplainer on the native tree model stored beside the ONNX
file (LightGBM, XGBoost or scikit-learn trees). A version registered without one
has no explainer: its answers say `explainer_unavailable`, never an invented reason.

Only the returned top-k rows are explained (SHAP costs about a millisecond per
ten rows here), each with its top positive contributions rendered as
plain-language reasons from policies/reasons.yaml. The same two steps
(`contributions`, then `reasons`) serve explanations asked for on the response
path (serving/ranking/stages.py) and those sampled after it (serving/observe/sampling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.spec import FeatureSpec
from model_store.manifest import Manifest
from model_store.native import contributions, load_native, tree_explainer
from rankgate.core.config_files import load_yaml_model
from rankgate.core.errors import ModelStoreError
from rankgate.governance.policy import policy_dir
from serving.contract.schemas import Reason


class ReasonTemplates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    max_reasons_per_item: int = Field(3, ge=1, le=10)
    templates: dict[str, str] = Field(min_length=1)

    def text(self, group: str, feature: str) -> str:
        """The reason shown for the input `feature` of `group`."""
        return self.templates.get(group, "{feature} raised this item's score").format(
            feature=feature
        )


def load_reason_templates(path: Path | None = None) -> ReasonTemplates:
    return load_yaml_model(path or policy_dir() / "reasons.yaml", ReasonTemplates)


class Explainer:
    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        specs: Sequence[FeatureSpec],
        templates: ReasonTemplates,
    ) -> None:
        if manifest.booster is None:
            raise ModelStoreError(f"{manifest.version}: registered without a tree model")
        self.specs = list(specs)
        self.templates = templates
        native = load_native(model_dir / manifest.booster.file, manifest.booster.kind)
        self.tree = tree_explainer(native)

    def contributions(self, rows: np.ndarray, threads: int | None = None) -> np.ndarray:
        """SHAP values per row and input (rows x features, log-odds units, in the
        order of `specs`): what reasons are chosen from, and what a monitor of
        explanations aggregates. `threads`: see model_store.native.contributions."""
        return contributions(self.tree, rows, threads)

    def reasons(self, values: np.ndarray) -> list[list[Reason]]:
        """Reasons per row of `contributions`: the inputs that raised its score most."""
        limit = self.templates.max_reasons_per_item
        explained = []
        for row in values:
            order = [int(i) for i in np.argsort(-row) if row[i] > 0][:limit]
            explained.append([self._reason(self.specs[i], float(row[i])) for i in order])
        return explained

    def _reason(self, spec: FeatureSpec, contribution: float) -> Reason:
        return Reason(
            feature=spec.name,
            group=spec.group,
            contribution=round(contribution, 6),
            text=self.templates.text(spec.group, spec.name),
        )
