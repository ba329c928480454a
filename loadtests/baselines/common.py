"""The work every baseline does per request, built from rankgate's own pieces."""

from __future__ import annotations

from typing import Any

from features.vector import build_matrix
from model_store.store import ModelStore
from rankgate.pseudonym import user_key
from serving import topk
from serving.feature_fetch import FeatureFetcher
from serving.ranker import LoadedModel, ModelSet
from serving.runtime import Runtime

BASELINE_VERSION = "v2"


def open_parts() -> tuple[FeatureFetcher, LoadedModel]:
    runtime = Runtime.open()
    models = ModelSet(ModelStore(runtime.home), [BASELINE_VERSION])
    return runtime.fetcher, models.loaded[BASELINE_VERSION]


def top_k(
    model: LoadedModel, fetcher: FeatureFetcher, values: dict[str, Any], body: dict[str, Any]
) -> dict[str, Any]:
    candidates = body.get("candidates") or fetcher.catalogue
    scores = model.scorer.score(build_matrix(model.specs, values, fetcher.items, candidates))
    picks = topk.top_k(candidates, scores, int(body.get("k", 10)))
    return {"items": [{"item_id": pick.item_id, "score": pick.score} for pick in picks]}


def key_of(body: dict[str, Any]) -> str:
    return user_key(str(body["user_id"]))
