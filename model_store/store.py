"""The model store: one folder per version under `<home>/models/<name>/`.

    <home>/models/ranker/v1/model.onnx          scored online by onnxruntime
    <home>/models/ranker/v1/booster.txt         native tree model, if any (SHAP explains it;
                                                booster.json for XGBoost, .joblib for sklearn)
    <home>/models/ranker/v1/parity_inputs.npy   rows that check ONNX against native
    <home>/models/ranker/v1/manifest.json       hashes, features, data, metrics

A version is written into a temporary folder and renamed into place, so a reader
never sees half a version, and an existing version is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from model_store.approvals import ApprovalLog
from model_store.manifest import (
    MANIFEST_FILE,
    MAX_PARITY_DIFF,
    ONNX_FILE,
    PARITY_INPUTS_FILE,
    Manifest,
)
from rankgate.core.errors import ModelStoreError, UnknownVersion, VersionExists
from rankgate.core.home import Home
from rankgate.governance.residency import DataOrigin

if TYPE_CHECKING:
    from features.spec import ViewInfo

DEFAULT_MODEL_NAME = "ranker"
VERSION_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_version_name(version: str) -> str:
    if not version or len(version) > 64 or not set(version) <= VERSION_CHARS or version[0] == ".":
        raise ModelStoreError(
            f"version {version!r}: use 1-64 letters, digits, '.', '_' or '-'", 422
        )
    return version


@dataclass
class ValidationReport:
    version: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def add(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append((name, passed, detail))
        return passed

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, passed, detail in self.checks if not passed]


class ModelStore:
    def __init__(self, home: Home, name: str = DEFAULT_MODEL_NAME) -> None:
        self.name = name
        self.root = home.models_dir / name

    def path(self, version: str) -> Path:
        return self.root / check_version_name(version)

    def versions(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def exists(self, version: str) -> bool:
        return self.path(version).is_dir()

    def folder(self, version: str) -> Path:
        """A registered version's folder (UnknownVersion, naming the known ones, when it is not)."""
        folder = self.path(version)
        if not folder.is_dir():
            known = ", ".join(self.versions()) or "none"
            raise UnknownVersion(
                f"model version {version!r} not found in {self.root} (known: {known})"
            )
        return folder

    def manifest(self, version: str) -> Manifest:
        manifest_path = self.folder(version) / MANIFEST_FILE
        try:
            return Manifest.model_validate_json(manifest_path.read_bytes())
        except FileNotFoundError as exc:
            raise ModelStoreError(f"{manifest_path}: missing") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ModelStoreError(f"{manifest_path}: field {where!r}: {first['msg']}") from exc
        except ValueError as exc:
            raise ModelStoreError(f"{manifest_path}: not valid JSON ({exc})") from exc

    def approvals(self, version: str) -> ApprovalLog:
        """The approvals of a registered version (UnknownVersion when it is not)."""
        return ApprovalLog(self.folder(version))

    def views_of(self, versions: Iterable[str]) -> dict[str, frozenset[str] | None]:
        """The feature views each version reads, which decide the purposes it may serve
        (None: no readable manifest; such a version is unusable anyway)."""
        views: dict[str, frozenset[str] | None] = {}
        for version in versions:
            try:
                views[version] = frozenset(self.manifest(version).feature_views)
            except ModelStoreError:
                views[version] = None
        return views

    def origins(self, versions: Iterable[str]) -> dict[str, DataOrigin | None]:
        """What residency reads of each version's lineage (None: no lineage recorded, or
        no readable manifest)."""
        origins: dict[str, DataOrigin | None] = {}
        for version in versions:
            try:
                origins[version] = self.manifest(version).lineage.origin()
            except ModelStoreError:
                origins[version] = None
        return origins

    def register(self, version: str, staged: Path) -> Path:
        """Move a fully written staging folder into place as `version`; never overwrite."""
        target = self.path(version)
        if target.exists():
            shutil.rmtree(staged, ignore_errors=True)
            raise VersionExists(
                f"model version {version!r} already exists at {target}; "
                "choose a new version (registered versions are immutable)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, target)  # atomic; fails if another writer won the race
        except OSError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            raise VersionExists(f"model version {version!r} already exists at {target}") from exc
        return target

    def staging_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def check_hashes(
        self, version: str, report: ValidationReport | None = None
    ) -> ValidationReport:
        report = report or ValidationReport(version)
        try:
            manifest = self.manifest(version)
        except ModelStoreError as exc:
            report.add("manifest", False, exc.message)
            return report
        report.add("manifest", True, "readable")
        folder = self.path(version)
        for name, expected in manifest.artifacts.items():
            artifact = folder / name
            if not artifact.exists():
                report.add(f"sha256 {name}", False, f"{artifact} is missing")
                continue
            actual = sha256_file(artifact)
            report.add(
                f"sha256 {name}",
                actual == expected,
                "matches"
                if actual == expected
                else f"is {actual[:12]}…, manifest says {expected[:12]}…",
            )
        return report

    def validate(
        self, version: str, views: Mapping[str, ViewInfo] | None, parity: bool = True
    ) -> ValidationReport:
        """Hashes, the ONNX file's inputs against the manifest's, ONNX/native parity on
        the stored inputs, and features known to the repo.

        `views` are the views of the project's applied Feast registry (None or empty:
        the repository has not been applied). Without `parity`, nothing is scored and
        the tree model is not loaded (the hashes show the files are those whose parity
        registration checked); the ONNX file is still opened (onnxruntime, about 0.15 s)
        to check it takes as many inputs as the manifest lists, which a hand-edited
        manifest can break with every hash intact.
        """
        report = self.check_hashes(version)
        if not report.ok:
            return report
        manifest = self.manifest(version)
        folder = self.path(version)
        if parity:
            self._check_parity(manifest, folder, report)
        else:
            self._check_width(manifest, folder, report)
        self._check_features(manifest, views, report)
        return report

    @staticmethod
    def _check_width(manifest: Manifest, folder: Path, report: ValidationReport) -> None:
        from model_store.onnx_scoring import OnnxScorer

        try:
            width = OnnxScorer(folder / ONNX_FILE, manifest.onnx.output_name).n_features
        except Exception as exc:  # noqa: BLE001 - any load failure is a failed check
            report.add("onnx inputs", False, f"could not load model.onnx: {exc}")
            return
        listed = len(manifest.features)
        report.add(
            "onnx inputs",
            width in (None, listed),
            f"model.onnx takes {width} features, the manifest lists {listed}"
            if width not in (None, listed)
            else f"model.onnx takes the {listed} features the manifest lists",
        )

    @staticmethod
    def _check_parity(manifest: Manifest, folder: Path, report: ValidationReport) -> None:
        # Imported here, not at the top: listing versions and checking hashes
        # (`rankgate model list`) must not pay for numpy, the tree libraries and onnxruntime.
        import numpy as np

        from model_store.native import load_native, predict_native
        from model_store.onnx_scoring import OnnxScorer

        try:
            inputs = np.load(folder / PARITY_INPUTS_FILE, allow_pickle=False)
            scorer = OnnxScorer(folder / ONNX_FILE, manifest.onnx.output_name)
            if scorer.n_features != len(manifest.features):
                report.add(
                    "onnx inputs",
                    False,
                    f"model.onnx takes {scorer.n_features} features, the manifest lists {len(manifest.features)}",
                )
                return
            onnx_scores = scorer.score(inputs)
            if manifest.booster is None:
                report.add(
                    "onnx scores",
                    bool(np.all(np.isfinite(onnx_scores))),
                    f"{len(inputs)} sample rows scored; no tree model to compare with",
                )
                return
            native_model = load_native(folder / manifest.booster.file, manifest.booster.kind)
            native = predict_native(native_model, manifest.booster.kind, inputs)
        except Exception as exc:  # noqa: BLE001 - any load failure is a failed check
            report.add("onnx/native parity", False, f"could not score: {exc}")
            return
        diff = float(np.max(np.abs(onnx_scores - native))) if len(inputs) else 0.0
        report.add(
            "onnx/native parity",
            diff <= MAX_PARITY_DIFF,
            f"max |diff| {diff:.2e} over {len(inputs)} rows (limit {MAX_PARITY_DIFF:.0e})",
        )

    @staticmethod
    def _check_features(
        manifest: Manifest, views: Mapping[str, ViewInfo] | None, report: ValidationReport
    ) -> None:
        from features.spec import template_fields

        if not views:
            report.add("features", False, "feature repository not applied (run `rankgate setup`)")
            return
        missing = []
        for feature in manifest.features:
            if feature.view is None:
                continue  # a request-context feature
            view = views.get(feature.view)
            if view is None:
                missing.append(f"{feature.name} (view {feature.view!r} not defined)")
            elif "{item_id}" in feature.field:
                if not template_fields(feature.field, view.fields):
                    missing.append(
                        f"{feature.name} (no field like {feature.field!r} in {feature.view!r})"
                    )
            elif feature.field not in view.fields:
                missing.append(f"{feature.name} (field {feature.field!r} not in {feature.view!r})")
        report.add(
            "features",
            not missing,
            f"all {len(manifest.features)} defined"
            if not missing
            else "unknown: " + ", ".join(missing),
        )


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
