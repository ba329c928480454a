"""The work every baseline does per request, built from rankgate's own pieces."""

from __future__ import annotations

from typing import Any

from features.vector import build_matrix, user_fields
from model_store.store import ModelStore
from rankgate.core import topk
from rankgate.core.pseudonym import user_key
from serving.ranking.feature_fetch import FeatureFetcher
from serving.ranking.ranker import LoadedModel, ModelSet
from serving.runtime import ReplicaRuntime


def stable_version() -> str:
    """The version serve_config.yaml serves as stable: the one every system scores with."""
    from serving.ops.launch import ingress_deployment

    versions = ingress_deployment()["user_config"]["routing"]["versions"]
    return str(next(v["version"] for v in versions if v["role"] == "stable"))


def open_parts() -> tuple[FeatureFetcher, LoadedModel, dict[str, list[str]]]:
    """The fetcher, the model, and the fields per user view the model reads."""
    runtime = ReplicaRuntime.open()
    version = stable_version()
    models = ModelSet(ModelStore(runtime.home), [version])
    model = models.loaded[version]
    return runtime.fetcher, model, user_fields(model.specs, runtime.fetcher.infos)


def top_k(
    model: LoadedModel, fetcher: FeatureFetcher, values: dict[str, Any], body: dict[str, Any]
) -> dict[str, Any]:
    candidates = body.get("candidates") or fetcher.catalogue
    scores = model.scorer.score(build_matrix(model.specs, values, fetcher.items, candidates))
    picks = topk.top_k(candidates, scores, int(body.get("k", 10)))
    return {"items": [{"item_id": pick.item_id, "score": pick.score} for pick in picks]}


def key_of(body: dict[str, Any]) -> str:
    return user_key(str(body["user_id"]))
