"""Reading the audit stream: tail it, and replay a decision from its record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

from model_store.manifest import ONNX_FILE
from model_store.store import ModelStore
from rankgate import redis_keys
from rankgate.errors import RankgateError
from rankgate.home import Home
from serving.topk import SCORE_DIGITS, top_k

if TYPE_CHECKING:
    from features.vector import ItemTable

SCAN_CHUNK = 1000


def _decode(entry: tuple[bytes, dict[bytes, bytes]]) -> dict[str, Any]:
    stream_id, fields = entry
    record: dict[str, Any] = json.loads(fields[b"record"])
    record["stream_id"] = stream_id.decode()
    return record


def require_stream(client: redis.Redis, namespace: str) -> str:
    key = redis_keys.audit(namespace)
    if not client.exists(key):
        raise RankgateError(
            f"the audit stream {key} does not exist: no decision was recorded in this home", 404
        )
    return key


def tail(client: redis.Redis, namespace: str, count: int) -> list[dict[str, Any]]:
    key = require_stream(client, namespace)
    return [_decode(e) for e in reversed(client.xrevrange(key, count=count))]  # type: ignore[arg-type]


def follow(client: redis.Redis, namespace: str, after: str = "$") -> Iterator[dict[str, Any]]:
    key = require_stream(client, namespace)
    last = after
    while True:
        for _, entries in client.xread({key: last}, block=1000) or []:  # type: ignore[union-attr]
            for entry in entries:
                last = entry[0]
                yield _decode(entry)


def find(client: redis.Redis, namespace: str, request_id: str) -> dict[str, Any]:
    key = require_stream(client, namespace)
    upper = "+"
    while True:
        entries = client.xrevrange(key, max=upper, count=SCAN_CHUNK)  # type: ignore[arg-type]
        for entry in entries:  # type: ignore[union-attr]
            if json.loads(entry[1][b"record"]).get("request_id") == request_id:
                return _decode(entry)
        if len(entries) < SCAN_CHUNK:  # type: ignore[arg-type]
            break
        upper = "(" + entries[-1][0].decode()  # type: ignore[index]
    total = client.xlen(key)
    oldest = client.xrange(key, count=1)
    since = ""
    if oldest:
        at = json.loads(oldest[0][1][b"record"])["at"]  # type: ignore[index]
        since = f", oldest from {datetime.fromtimestamp(at, UTC).isoformat(timespec='seconds')}"
    raise RankgateError(
        f"request {request_id!r} is not in the audit stream ({total} records{since}): "
        "trimmed by retention, or never recorded",
        404,
    )


@dataclass
class Replay:
    reproduced: bool | None
    """None: nothing to re-score (the decision was not personalized)."""
    message: str
    recorded: list[list[float]]
    replayed: list[list[float]]


def replay(record: dict[str, Any], home: Home, items: ItemTable) -> Replay:
    """Re-score a recorded decision with its model version and recorded features."""
    # Imported here, not at the top: `rankgate audit tail` only reads the stream
    # and should not wait seconds for Feast and onnxruntime.
    from features.vector import build_matrix, resolve
    from model_store.onnx_scoring import OnnxScorer

    recorded = record["items"]
    if record["model"] is None or record["features"] is None or record["fallback"] is not None:
        reason = (record["fallback"] or {}).get("reason", "not personalized")
        return Replay(
            None,
            f"not a model ranking ({reason}): the fallback answered, nothing to re-score",
            recorded,
            [],
        )
    version = record["model"]["version"]
    store = ModelStore(home, record["model"]["name"])
    manifest = store.manifest(version)
    specs = resolve(manifest.feature_names)
    scorer = OnnxScorer(store.path(version) / ONNX_FILE)
    candidates = record["candidates"]
    scores = scorer.score(build_matrix(specs, record["features"]["values"], items, candidates))
    replayed = [
        [pick.item_id, round(pick.score, SCORE_DIGITS)]
        for pick in top_k(candidates, scores, record["k"])
    ]
    same = replayed == recorded
    table_note = (
        ""
        if items.digest == record["item_table"]
        else " (item features changed since the decision)"
    )
    message = (
        f"reproduced: {version} ranks the recorded features exactly as recorded"
        if same
        else f"differs from the recorded ranking{table_note}"
    )
    return Replay(same, message, recorded, replayed)
