"""Reading the audit stream: tail it, and replay a decision from its record."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from model_store.manifest import ONNX_FILE
from model_store.store import ModelStore
from rankgate.core import redis_keys
from rankgate.core.errors import RankgateError
from rankgate.core.home import Home
from rankgate.core.redis_server import RedisClient
from rankgate.core.streams import stream_pages
from rankgate.core.topk import SCORE_DIGITS, Pick, top_k
from rankgate.governance.policy import Exploration
from serving.observe.audit import AuditRecord

if TYPE_CHECKING:
    import numpy as np

    from features.vector import ItemTable

SCAN_CHUNK = 1000


def _decode(entry: tuple[bytes, dict[bytes, bytes]]) -> AuditRecord:
    stream_id, fields = entry
    return AuditRecord.read(fields[b"record"], stream_id)


def require_stream(client: RedisClient, namespace: str) -> str:
    key = redis_keys.audit(namespace)
    if not client.exists(key):
        raise RankgateError(
            f"the audit stream {key} does not exist: no decision was recorded in this home", 404
        )
    return key


def tail(client: RedisClient, namespace: str, count: int) -> list[AuditRecord]:
    key = require_stream(client, namespace)
    return [_decode(e) for e in reversed(client.xrevrange(key, count=count))]  # type: ignore[arg-type]


def follow(client: RedisClient, namespace: str, after: str = "$") -> Iterator[AuditRecord]:
    key = require_stream(client, namespace)
    last = after
    while True:
        for _, entries in client.xread({key: last}, block=1000) or []:  # type: ignore[union-attr]
            for entry in entries:
                last = entry[0]
                yield _decode(entry)


def find(client: RedisClient, namespace: str, request_id: str) -> AuditRecord:
    key = require_stream(client, namespace)
    needle = request_id.encode()
    for page in stream_pages(client, key, SCAN_CHUNK, newest_first=True):
        for entry in page:
            # The substring test is cheap; parsing confirms it is the record's request id.
            if (
                needle in entry[1][b"record"]
                and (record := _decode(entry)).request_id == request_id
            ):
                return record
    total = client.xlen(key)
    oldest = client.xrange(key, count=1)
    since = ""
    if oldest:
        at = AuditRecord.read(oldest[0][1][b"record"]).at  # type: ignore[index]
        since = f", oldest from {datetime.fromtimestamp(at, UTC).isoformat(timespec='seconds')}"
    raise RankgateError(
        f"request {request_id!r} is not in the audit stream ({total} records{since}): "
        "trimmed by retention, or never recorded",
        404,
    )


Ranking = list[list[int | str | float]]
"""[[item id, score], ...], best first, as `rankgate audit replay` prints it."""


@dataclass
class Replay:
    reproduced: bool | None
    """None: nothing to re-score (the decision was not personalized)."""
    message: str
    recorded: Ranking
    replayed: Ranking


def ranking(record: AuditRecord, candidates: list[int | str], scores: np.ndarray) -> list[Pick]:
    """The recorded decision's ranking of these scores: the model's top k, or the
    same exploration draw (its settings and seed are in the record)."""
    choice = record.choice
    if choice is None or choice.deterministic or choice.seed is None:
        return top_k(candidates, scores, record.k)
    from pydantic import TypeAdapter

    from serving.ranking.exploration import explore

    exploration = TypeAdapter(Exploration).validate_python(choice.exploration)
    return explore(exploration, candidates, scores, record.k, choice.seed).picks


def replay(record: AuditRecord, home: Home, items: ItemTable) -> Replay:
    """Re-score a recorded decision with its model version and recorded features."""
    # Imported here, not at the top: `rankgate audit tail` only reads the stream
    # and should not wait seconds for Feast and onnxruntime.
    from features.vector import build_matrix
    from model_store.onnx_scoring import OnnxScorer

    recorded: Ranking = [[item, score] for item, score in record.items]
    if record.model is None or record.features is None or record.fallback is not None:
        reason = record.fallback.reason if record.fallback else "not personalized"
        return Replay(
            None,
            f"not a model ranking ({reason}): the fallback answered, nothing to re-score",
            recorded,
            [],
        )
    version = record.model.version
    store = ModelStore(home, record.model.name)
    manifest = store.manifest(version)
    scorer = OnnxScorer(store.path(version) / ONNX_FILE, manifest.onnx.output_name)
    candidates = record.candidates
    features = record.features
    matrix = build_matrix(manifest.specs, features.values, items, candidates, features.context)
    scores = scorer.score(matrix)
    replayed: Ranking = [
        [pick.item_id, round(pick.score, SCORE_DIGITS)]
        for pick in ranking(record, candidates, scores)
    ]
    same = replayed == recorded
    table_note = (
        "" if items.digest == record.item_table else " (item features changed since the decision)"
    )
    message = (
        f"reproduced: {version} ranks the recorded features exactly as recorded"
        if same
        else f"differs from the recorded ranking{table_note}"
    )
    return Replay(same, message, recorded, replayed)
