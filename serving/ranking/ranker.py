"""Loaded model versions and batched ONNX scoring.

`ModelSet` loads the versions named in config from the model store; a version
that fails to load is kept with its error (requests that would use it degrade,
the others are served). `Ranker.score_batch` scores many requests' matrices with
one onnxruntime call per version: the Ray wrapper decorates it with
`@serve.batch` so concurrent requests share a call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.spec import FeatureSpec
from model_store.manifest import ONNX_FILE, Manifest
from model_store.onnx_scoring import OnnxScorer
from model_store.store import ModelStore
from rankgate.core.errors import RankgateError


class ModelUnavailable(RankgateError):
    """A configured version could not be loaded; requests degrade to the fallback."""


@dataclass
class LoadedModel:
    name: str
    version: str
    manifest: Manifest
    specs: list[FeatureSpec]
    scorer: OnnxScorer

    @property
    def views(self) -> frozenset[str]:
        return frozenset(spec.view for spec in self.specs if spec.view is not None)


class ModelSet:
    def __init__(self, store: ModelStore, versions: Sequence[str]) -> None:
        self.name = store.name
        self.loaded: dict[str, LoadedModel] = {}
        self.errors: dict[str, str] = {}
        self.views_of = store.views_of(versions)
        self.origins = store.origins(versions)
        """Each version's training data regions, as residency reads them."""
        for version in versions:
            try:
                self.loaded[version] = self._load(store, version)
            except Exception as exc:  # noqa: BLE001 - any failure marks the version unusable
                self.errors[version] = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _load(store: ModelStore, version: str) -> LoadedModel:
        manifest = store.manifest(version)
        report = store.check_hashes(version)
        if not report.ok:
            raise ModelUnavailable("; ".join(report.failures()))
        return LoadedModel(
            name=store.name,
            version=version,
            manifest=manifest,
            specs=manifest.specs,
            scorer=OnnxScorer(store.path(version) / ONNX_FILE, manifest.onnx.output_name),
        )


class Ranker:
    """Scores feature matrices with the loaded versions."""

    def __init__(self, models: ModelSet) -> None:
        self.models = models

    def score_batch(
        self, requests: Sequence[tuple[str, np.ndarray]]
    ) -> list[np.ndarray | Exception]:
        """One onnxruntime call per version over all requests of that version.

        Returns, per request, its scores or the exception that stopped them (one
        bad version never fails another's requests).
        """
        results: list[np.ndarray | Exception] = [ModelUnavailable("not scored")] * len(requests)
        by_version: dict[str, list[int]] = {}
        for index, (version, _) in enumerate(requests):
            by_version.setdefault(version, []).append(index)
        for version, indices in by_version.items():
            model = self.models.loaded.get(version)
            if model is None:
                error = ModelUnavailable(self.models.errors.get(version, f"{version} not loaded"))
                for index in indices:
                    results[index] = error
                continue
            matrices = [requests[i][1] for i in indices]
            try:
                scores = model.scorer.score(np.concatenate(matrices))
            except Exception as exc:  # noqa: BLE001 - onnxruntime errors degrade the request
                for index in indices:
                    results[index] = exc
                continue
            bounds = np.cumsum([0] + [len(m) for m in matrices])
            for n, index in enumerate(indices):
                results[index] = scores[bounds[n] : bounds[n + 1]]
        return results
