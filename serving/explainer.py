"""Explanations: SHAP TreeExplainer on the native tree model stored beside the ONNX
file (LightGBM, XGBoost or scikit-learn trees). A version registered without one
has no explainer: its answers say `explainer_unavailable`, never an invented reason.

A replica builds its explainers in the background (`background=True`): loading
the tree model's library (LightGBM, scikit-learn) costs about a second of CPU
that need not delay the replica's start. An explanation asked for before its
explainer is built waits for it.

Only the returned top-k rows are explained (SHAP costs about a millisecond per
ten rows here), each with its top positive contributions rendered as
plain-language reasons from policies/reasons.yaml. The same two steps
(`contributions`, then `reasons`) serve explanations asked for on the response
path (serving/stages.py) and those sampled after it (serving/sampling.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from features.spec import FeatureSpec
from model_store.manifest import Manifest
from model_store.native import contributions, load_native, tree_explainer
from rankgate.config_files import load_yaml_model
from rankgate.errors import ModelStoreError
from rankgate.policy import policy_dir
from serving.schemas import Reason

logger = logging.getLogger("ray.serve")


class ReasonTemplates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    max_reasons_per_item: int = Field(3, ge=1, le=10)
    templates: dict[str, str] = Field(min_length=1)


def load_reason_templates(path: Path | None = None) -> ReasonTemplates:
    return load_yaml_model(path or policy_dir() / "reasons.yaml", ReasonTemplates)


class Explainer:
    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        specs: Sequence[FeatureSpec],
        templates: ReasonTemplates,
        background: bool = False,
    ) -> None:
        """Loads the tree model and builds its SHAP explainer now (errors raise here),
        or with `background` in a thread of its own (an error then raises at first use)."""
        if manifest.booster is None:
            raise ModelStoreError(f"{manifest.version}: registered without a tree model")
        self.specs = list(specs)
        self.templates = templates
        self.version = manifest.version
        self._booster = (model_dir / manifest.booster.file, manifest.booster.kind)
        self._tree: Any = None
        self._error: Exception | None = None
        self._built = threading.Event()
        if not background:
            self._build()
            if self._error is not None:
                raise self._error
            return
        name = f"explainer-{manifest.version}"
        threading.Thread(target=self._build, name=name, daemon=True).start()

    def _build(self) -> None:
        try:
            self._tree = tree_explainer(load_native(*self._booster))
        except Exception as exc:  # noqa: BLE001 - raised where the explainer is used
            self._error = exc
            logger.warning("explainer for %s unavailable: %s", self.version, exc)
        finally:
            self._built.set()

    @property
    def tree(self) -> Any:
        """The SHAP explainer (waits until it is built; raises what stopped it)."""
        self._built.wait()
        if self._error is not None:
            raise self._error
        return self._tree

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
        template = self.templates.templates.get(spec.group, "{feature} raised this item's score")
        return Reason(
            feature=spec.name,
            group=spec.group,
            contribution=round(contribution, 6),
            text=template.format(feature=spec.name),
        )
