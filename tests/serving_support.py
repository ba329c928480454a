"""Shared helpers for the serving tests (plain pipeline and HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rankgate.consent import ConsentState
from rankgate.example_data import example_user_ids
from rankgate.pseudonym import user_key
from rankgate.settings import PROJECT_ROOT

SERVE_CONFIG = PROJECT_ROOT / "serve_config.yaml"


def serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ingress_user_config(**overrides: Any) -> dict[str, Any]:
    """The RankIngress user_config of serve_config.yaml, with top-level sections replaced."""
    app = serve_config()["applications"][0]
    config = next(d for d in app["deployments"] if d["name"] == "RankIngress")["user_config"]
    return {**config, **overrides}


def user_with(consent_store, purpose: str, state: ConsentState, skip: int = 0) -> str:  # type: ignore[no-untyped-def]
    """An example user whose recorded consent for `purpose` is `state`."""
    ids = example_user_ids()
    states = consent_store.states([user_key(u) for u in ids], purpose)
    matches = [uid for uid, s in zip(ids, states, strict=True) if s == state]
    return matches[skip]


def routing(
    stable: str, *, canary: str | None = None, weight: float = 0, **roles: Any
) -> dict[str, Any]:
    """A routing section: `stable` (and a canary at `weight` %), plus shadow=[...], alternate=[...]."""
    base = ingress_user_config()["routing"]
    versions: list[dict[str, Any]] = [{"version": stable, "role": "stable", "weight": 100 - weight}]
    if canary is not None:
        versions.append({"version": canary, "role": "canary", "weight": weight})
    for role in ("shadow", "alternate"):
        versions += [{"version": v, "role": role} for v in roles.get(role, [])]
    return {**base, "versions": versions}


def copy_with_wrong_width(models, source: str, target: str) -> Path:  # type: ignore[no-untyped-def]
    """A copy of a version whose manifest lists one feature more than its ONNX takes:
    it loads (hashes match) but every onnxruntime call raises."""
    import json
    import shutil

    folder = models.path(target)
    shutil.copytree(models.path(source), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    extra = {
        "name": "user_item_affinity",
        "view": "user_item_affinity",
        "field": "affinity_{item_id}",
    }
    manifest["features"].append({**extra, "group": "affinity"})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
