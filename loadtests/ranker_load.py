"""The ranker under load against raw onnxruntime, in a process of its own.

`python -m loadtests.ranker_load --user-id U --purpose P --region R` builds the
server's real pieces: the item table from the fetcher (Runtime.open), the stable
model (serving.ranking.ranker.ModelSet from the model store), the items the consent
gate leaves eligible for (P, R), and U's features from the online store. Then,
in rounds:

- **under load**: `--concurrency` coroutines, each building the matrix for the
  eligible items (features.vector.build_matrix) and scoring it through the
  ingress's own `@serve.batch` (serving.runtime.BatchedScoring.score_many, with
  serve_config.yaml's batching), as the ingress does per request. Counts rows
  scored per second and the mean batch (requests per onnxruntime call).
- **raw**: `InferenceSession.run` on a ready matrix with that round's mean batch
  of rows, in a tight loop.

Outside a replica, Ray Serve's batching only lacks the replica context it reads
to warn when `max_batch_size` exceeds `max_ongoing_requests`; a stand-in gives it
serve_config.yaml's value. Prints one JSON object (rows/s of both per round,
their ratio, the batch sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from features.vector import ItemTable, build_matrix, user_fields
from loadtests.baselines.common import stable_version
from loadtests.bench.figures import spread
from model_store.store import ModelStore
from rankgate.core.project import ItemId
from rankgate.core.pseudonym import user_key
from rankgate.governance.consent import ConsentState
from serving.contract.config import BatchingConfig
from serving.ops.launch import ingress_deployment
from serving.ranking.gate import ConsentGate
from serving.ranking.ranker import LoadedModel, ModelSet, Ranker
from serving.runtime import ReplicaRuntime


def ingress_settings() -> tuple[BatchingConfig, int, str]:
    """serve_config.yaml's RankIngress: its batching, max_ongoing_requests, stable version."""
    ingress = ingress_deployment()
    batching = BatchingConfig.model_validate(ingress["user_config"].get("batching", {}))
    return batching, int(ingress.get("max_ongoing_requests", 16)), stable_version()


def batched_scorer(ranker: Ranker, batching: BatchingConfig, max_ongoing: int) -> Any:
    """An object scoring through serving.runtime.BatchedScoring, as the ingress does."""
    from ray import serve

    from serving.runtime import BatchedScoring

    # The only thing @serve.batch reads from a replica (for a warning).
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=max_ongoing))
    setattr(serve, "get_replica_context", lambda: context)  # noqa: B010 - a stand-in, this process only

    class LoadScorer(BatchedScoring):
        def __init__(self) -> None:
            self.batches: list[int] = []

        def scoring_ranker(self) -> Ranker:
            return ranker

        def observe_batch(self, versions: list[str]) -> None:
            self.batches.append(len(versions))

    scorer = LoadScorer()
    scorer.tune_batching(batching)
    return scorer


async def under_load(
    scorer: Any,
    model: LoadedModel,
    values: dict[str, Any],
    items: ItemTable,
    eligible: list[ItemId],
    concurrency: int,
    duration_s: float,
) -> dict[str, float]:
    rows = 0
    first_batch = len(scorer.batches)
    stop = time.perf_counter() + duration_s

    async def client() -> None:
        nonlocal rows
        while time.perf_counter() < stop:
            matrix = build_matrix(model.specs, values, items, eligible)
            await scorer.score(model.version, matrix)
            rows += len(matrix)

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    batches = scorer.batches[first_batch:]
    mean_batch = sum(batches) / len(batches) if batches else 0.0
    return {
        "rows_per_s": round(rows / wall, 1),
        "requests_per_s": round(sum(batches) / wall, 1),
        "mean_batch_requests": round(mean_batch, 2),
        "mean_batch_rows": round(mean_batch * len(eligible), 1),
    }


def raw(model: LoadedModel, matrix: np.ndarray, duration_s: float) -> dict[str, float]:
    scorer = model.scorer
    feed = {scorer.input_name: np.ascontiguousarray(matrix, dtype=np.float32)}
    outputs = [scorer.output_name]
    calls = 0
    started = time.perf_counter()
    stop = started + duration_s
    while time.perf_counter() < stop:
        scorer.session.run(outputs, feed)
        calls += 1
    wall = time.perf_counter() - started
    return {"rows_per_s": round(calls * len(matrix) / wall, 1), "rows": len(matrix)}


async def measure(
    user_id: str,
    purpose: str,
    region: str,
    concurrency: int | None,
    duration_s: float,
    warmup_s: float,
    rounds: int,
) -> dict[str, Any]:
    batching, max_ongoing, version = ingress_settings()
    runtime = ReplicaRuntime.open()
    fetcher = runtime.fetcher
    models = ModelSet(ModelStore(runtime.home), [version])
    model = models.loaded[version]
    decision = ConsentGate(runtime.policy).decide(purpose, region, ConsentState.GRANTED)
    eligible = [c for c in fetcher.catalogue if c not in decision.excluded_items]
    user = await fetcher.fetch_user(user_key(user_id), user_fields(model.specs, fetcher.infos))
    scorer = batched_scorer(Ranker(models), batching, max_ongoing)
    clients = concurrency or max_ongoing
    one = build_matrix(model.specs, user.values, fetcher.items, eligible)
    if warmup_s > 0:
        await under_load(scorer, model, user.values, fetcher.items, eligible, clients, warmup_s / 2)
        raw(model, one, warmup_s / 2)
    loaded, raws = [], []
    for _ in range(rounds):
        loaded.append(
            await under_load(
                scorer, model, user.values, fetcher.items, eligible, clients, duration_s
            )
        )
        # The same batch of rows as the ranker's mean onnxruntime call this round.
        batch = max(1, round(loaded[-1]["mean_batch_requests"]))
        raws.append(raw(model, np.tile(one, (batch, 1)), duration_s))
    ratios = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(loaded, raws, strict=True)]
    return {
        "version": version,
        "concurrency": clients,
        "batching": batching.model_dump(),
        "rows_per_request": len(eligible),
        "rounds": rounds,
        "duration_s": duration_s,
        "under_load": loaded,
        "raw": raws,
        "under_load_rows_per_s": round(statistics.median(a["rows_per_s"] for a in loaded), 1),
        "raw_rows_per_s": round(statistics.median(b["rows_per_s"] for b in raws), 1),
        "mean_batch_requests": round(
            statistics.median(a["mean_batch_requests"] for a in loaded), 2
        ),
        "ratio": spread(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--user-id", required=True)
    parser.add_argument("--purpose", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="Coroutines (default: the ingress's max_ongoing_requests).",
    )
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(
        measure(
            args.user_id,
            args.purpose,
            args.region,
            args.concurrency,
            args.duration,
            args.warmup,
            args.rounds,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
