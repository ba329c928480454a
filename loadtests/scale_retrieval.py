"""Retrieval at scale, for `rankgate bench --scale` (loadtests/scale_served.py): requests
without candidates to the served scale project, and how they compare with ranking
the whole catalogue.

- Latency by stage: one client, closed loop, each response's `timings_ms` (the
  server's own) beside the client's time.
- Recall@10 against exhaustive ranking: for each of those decisions, its audit
  record's features (what the ranker read) scored against every item the policy
  allows, by the same ONNX model, offline; the share of that exhaustive top 10 the
  served answer holds (an item tied with the 10th counts as one of it: the
  scale project's ranker gives many items the same score).
- The item index: built in-process from the version's artifact as a replica builds
  it (seconds), its faiss bytes and the artifact's bytes per item.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from loadtests.drive import percentile

Say = Callable[[str], None]

RECALL_DECISIONS = 200
"""Served decisions the recall is averaged over (each scores the whole catalogue offline)."""
STAGES = ("policy", "features", "retrieve", "rank", "total")


def recall_at(k: int, answer: list[Any], exhaustive: np.ndarray, position: dict[Any, int]) -> float:
    """Share of the exhaustive top k that `answer` holds; an item tied with the k-th
    counts as one of it."""
    kth = np.partition(exhaustive, -k)[-k]
    above = int((exhaustive > kth).sum())
    scores = exhaustive[[position[i] for i in answer[:k]]]
    return (int((scores > kth).sum()) + min(int((scores == kth).sum()), k - above)) / k


def stage_latency(
    url: str, bodies: list[dict[str, Any]], headers: dict[str, str], duration: float
) -> tuple[dict[str, Any], list[str]]:
    """p50/p99 per stage of requests without candidates, one client, closed loop; and
    the request ids of the model-ranked answers."""
    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    client_ms: list[float] = []
    reasons: dict[str, int] = {}
    ranked: list[str] = []
    end = time.monotonic() + duration
    with httpx.Client(timeout=10) as client:
        n = 0
        while time.monotonic() < end or n < RECALL_DECISIONS:
            started = time.perf_counter()
            response = client.post(url, json=bodies[n % len(bodies)], headers=headers)
            client_ms.append((time.perf_counter() - started) * 1000.0)
            n += 1
            body = response.json()
            reason = (body.get("fallback") or {}).get("reason", "personalized")
            reasons[reason] = reasons.get(reason, 0) + 1
            for stage in STAGES:
                timings[stage].append(float(body["timings_ms"].get(stage, 0.0)))
            if reason == "personalized":
                ranked.append(body["request_id"])
    figures: dict[str, Any] = {
        "requests": len(client_ms),
        "answers": reasons,
        "client_p50_ms": round(percentile(client_ms, 0.5), 2),
        "client_p99_ms": round(percentile(client_ms, 0.99), 2),
    }
    for stage, values in timings.items():
        figures[f"{stage}_p50_ms"] = round(percentile(values, 0.5), 2)
        figures[f"{stage}_p99_ms"] = round(percentile(values, 0.99), 2)
    return figures, ranked


@dataclass(frozen=True)
class ServedVersion:
    """What the measurements read of the served version, offline: its store entry,
    ranker, and the catalogue's item table."""

    store: Any
    manifest: Any
    scorer: Any
    catalogue: list[Any]
    items: Any

    @classmethod
    def open(cls, env: Any, version: str) -> ServedVersion:
        from features.tables import load_catalogue
        from model_store.logged import load_item_table
        from model_store.manifest import ONNX_FILE
        from model_store.onnx_scoring import OnnxScorer
        from model_store.store import ModelStore

        store = ModelStore(env.home)
        manifest = store.manifest(version)
        scorer = OnnxScorer(store.path(version) / ONNX_FILE, manifest.onnx.output_name)
        views = env.views()
        catalogue = load_catalogue(env.project, views, env.data_dir)
        items = load_item_table(env.project, views).over(catalogue)
        return cls(store, manifest, scorer, catalogue, items)


def served_recall(env: Any, served: ServedVersion, request_ids: list[str]) -> dict[str, Any]:
    """Recall@10 of the served answers against the exhaustive ranking (module docstring)."""
    from features.vector import build_matrix
    from rankgate.governance.consent import ConsentState
    from rankgate.governance.policy import load_policy
    from serving.ops import audit_replay as replay
    from serving.ranking.gate import ConsentGate

    wanted = set(request_ids[:RECALL_DECISIONS])
    records: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while len(records) < len(wanted) and time.monotonic() < deadline:
        for record in replay.tail(env.redis, env.home.namespace, 20 * len(wanted)):
            if record.request_id in wanted:
                records[record.request_id] = record
        time.sleep(0.5)
    catalogue, items, manifest = served.catalogue, served.items, served.manifest
    gate = ConsentGate(load_policy())
    recalls, retrieved = [], []
    for record in records.values():
        if record.features is None or record.fallback is not None:
            continue
        excluded = gate.decide(record.purpose, record.region, ConsentState.GRANTED).excluded_items
        allowed = [i for i in catalogue if i not in excluded]
        position = {item: n for n, item in enumerate(allowed)}
        matrix = build_matrix(
            manifest.specs, record.features.values, items, allowed, record.features.context
        )
        exhaustive = served.scorer.score(matrix)
        recalls.append(recall_at(10, [item for item, _ in record.items], exhaustive, position))
        retrieved.append(len(record.candidates))
    if not recalls:
        return {"decisions": 0}
    return {
        "decisions": len(recalls),
        "recall_at_10_mean": round(float(np.mean(recalls)), 4),
        "recall_at_10_p10": round(float(np.percentile(recalls, 10)), 4),
        "recall_at_10_min": round(float(np.min(recalls)), 4),
        "retrieved_per_decision": round(float(np.mean(retrieved)), 1),
        "catalogue_items": len(catalogue),
    }


def index_build(served: ServedVersion, version: str) -> dict[str, Any]:
    """The version's item index built in-process as a replica builds it: seconds, and
    bytes per item of the faiss index and of the artifact."""
    import faiss

    from model_store.embeddings import RETRIEVAL_FILE, ItemEmbeddings
    from serving.ranking.retrieval import ItemIndex

    store = served.store
    started = time.perf_counter()
    embeddings = ItemEmbeddings.load(store.path(version))
    if embeddings is None:
        return {}
    loaded = time.perf_counter()
    index = ItemIndex(embeddings, served.manifest.specs, served.scorer.score)
    index.follow(served.items)
    built = time.perf_counter()
    n = int(index.index.ntotal)
    return {
        "items": n,
        "dims": embeddings.dims,
        "load_s": round(loaded - started, 3),
        "build_s": round(built - loaded, 3),
        "faiss_bytes_per_item": round(len(faiss.serialize_index(index.index)) / n, 1),
        "artifact_bytes_per_item": round(
            (store.path(version) / RETRIEVAL_FILE).stat().st_size / n, 1
        ),
    }


def retrieval_figures(
    env: Any,
    base: str,
    bodies: list[dict[str, Any]],
    headers: dict[str, str],
    version: str,
    budget_ms: float,
    duration: float,
    say: Say,
) -> dict[str, Any]:
    """Stage latency and recall of requests without candidates, and the index build."""
    requests = [{**body, "budget_ms": budget_ms} for body in bodies]
    latency, ranked = stage_latency(f"{base}/v1/rank", requests, headers, duration)
    say(
        f"    no candidates, one client: p50 {latency['client_p50_ms']} ms, p99 "
        f"{latency['client_p99_ms']} ms (retrieve p50 {latency['retrieve_p50_ms']} ms, "
        f"p99 {latency['retrieve_p99_ms']} ms; answers {latency['answers']})"
    )
    served = ServedVersion.open(env, version)
    recall = served_recall(env, served, ranked)
    say(
        f"    recall@10 against ranking all {recall.get('catalogue_items')} items: "
        f"{recall.get('recall_at_10_mean')} over {recall['decisions']} decisions "
        f"(p10 {recall.get('recall_at_10_p10')})"
    )
    index = index_build(served, version)
    say(
        f"    item index of {index.get('items')} items: built in {index.get('build_s')} s, "
        f"{index.get('faiss_bytes_per_item')} faiss bytes per item"
    )
    return {"latency": latency, "recall": recall, "index": index}
