"""A version's retrieval artifact: item embeddings the ranker's own scores span.

A request without candidates over a large catalogue is narrowed by retrieval before
the ranker scores it (serving/ranking/retrieval.py). What retrieval searches is
this file, `retrieval.npz` beside the version's model, hashed in its manifest:

- `vectors`: one embedding per catalogue item (n x d, float32). Distilled from the
  ranker (`distil`): the ranker scores a sample of logged people (*prototypes*,
  their rows of the training matrix with the item's columns replaced) against every
  item; the truncated SVD of that score matrix (logits, for a probability output)
  gives each item a vector whose inner product with a person's vector approximates
  the ranker's score. Or registered with the version (`model register
  --item-embeddings FILE`), made by any means.
- `anchors`: m items whose scores fix a person's vector. At a request the ranker
  scores the person against the anchors and the person's vector is the least-squares
  fit of those scores (`query_map`): nothing is stored per person, the vector follows
  the person's current features and the request's context, and a person the gate
  does not clear is never scored or searched for.
- `prototypes` and their anchor scores: an item added to the catalogue later gets
  its vector from the ranker's scores of it for the prototypes (`embed`), without
  rebuilding the rest.
- `popular`: the catalogue's items by clicks in the training log, overall and per
  value of each categorical person feature (segments), best first.

Every loop here is over prototypes or chunks of items, never over log rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from features.spec import FeatureSpec
from features.vector import MISSING, ItemTable
from model_store.manifest import RETRIEVAL_FILE
from rankgate.core.errors import ModelStoreError
from rankgate.core.project import ItemId

ITEM_CHUNK = 1 << 18
"""Items per scored block when distilling (bounded memory at 10^6 items)."""
POPULAR_TOP = 500
"""Items kept per popularity list."""
PROTOTYPE_POOL = 50
"""Prototypes are drawn from this many random rows per prototype."""
MAX_SEGMENTS = 1000
"""Values kept per categorical person feature (the most frequent)."""
_EPS = 1e-6

Score = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DistilSettings:
    dims: int = 64
    """Embedding dimensions (at most the prototypes and items). At 10^5 items of the
    scale project 32 left some people's top items out of the nearest 300; 64 did not
    (docs/retrieval.md)."""
    prototypes: int = 128
    """Logged people the ranker scores against every distinct item row."""
    anchors: int = 256
    """Items a request scores to fit the person's vector (at least `dims`)."""
    seed: int = 0


def to_logit(scores: np.ndarray, transform: str) -> np.ndarray:
    """Scores in the space the embeddings factorize (logits of a probability)."""
    if transform == "logit":
        p = np.clip(scores, _EPS, 1.0 - _EPS)
        return np.log(p / (1.0 - p))
    return np.asarray(scores, dtype=np.float64)


def transform_of(scores: np.ndarray) -> str:
    """ "logit" for a model whose scores are probabilities (in [0, 1]), else "identity"."""
    return "logit" if scores.min() >= 0.0 and scores.max() <= 1.0 else "identity"


@dataclass
class ItemEmbeddings:
    """The retrieval artifact of one version (see the module docstring)."""

    item_ids: list[ItemId]
    vectors: np.ndarray
    """(items, dims) float32, in `item_ids` order."""
    anchors: np.ndarray
    """Positions in `item_ids` of the anchor items."""
    prototypes: np.ndarray
    """(prototypes, model inputs) float32: the prototypes' rows (item columns unused)."""
    prototype_scores: np.ndarray
    """(prototypes, anchors): the ranker's scores of the anchors for each prototype."""
    transform: str
    """"logit" (the model outputs probabilities) or "identity"."""
    source: str
    """"distilled" or the registered file's name."""
    popular: dict[str, np.ndarray] = field(default_factory=dict)
    """Item positions by clicks, best first: "" overall, "<column>=<code>" per segment."""

    @property
    def dims(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def anchor_ids(self) -> list[ItemId]:
        return [self.item_ids[int(p)] for p in self.anchors]

    @cached_property
    def query_map(self) -> np.ndarray:
        """(dims, anchors): a person's anchor scores (transformed) -> their vector."""
        return np.linalg.pinv(self.vectors[self.anchors].astype(np.float64))

    @cached_property
    def item_map(self) -> np.ndarray:
        """(dims, prototypes): an item's prototype scores (transformed) -> its vector."""
        people = to_logit(self.prototype_scores, self.transform) @ self.query_map.T
        return np.linalg.pinv(people)

    def embed(self, prototype_scores: np.ndarray) -> np.ndarray:
        """Vectors of new items from the ranker's scores of them for each prototype
        ((prototypes, items) -> (items, dims))."""
        return (self.item_map @ to_logit(prototype_scores, self.transform)).T.astype(np.float32)

    def popular_for(self, row: np.ndarray, columns: Sequence[int]) -> list[np.ndarray]:
        """The popularity lists for a person's model row: their segments' first, then
        the overall one."""
        lists = [
            self.popular[key]
            for col in columns
            if (key := f"{col}={float(row[col])!r}") in self.popular
        ]
        if "" in self.popular:
            lists.append(self.popular[""])
        return lists

    # -- the file --------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        path = folder / RETRIEVAL_FILE
        keys = sorted(self.popular)
        ids = np.asarray(self.item_ids)
        with path.open("wb") as handle:
            np.savez(
                handle,
                item_ids=ids if ids.dtype.kind in "iu" else ids.astype(str),
                vectors=self.vectors.astype(np.float32),
                anchors=self.anchors.astype(np.int64),
                prototypes=self.prototypes.astype(np.float32),
                prototype_scores=self.prototype_scores.astype(np.float64),
                meta=np.array([self.transform, self.source]),
                popular_keys=np.array(keys, dtype=str),
                popular_lengths=np.array([len(self.popular[k]) for k in keys], dtype=np.int64),
                popular_items=np.concatenate([self.popular[k] for k in keys]).astype(np.int64)
                if keys
                else np.zeros(0, dtype=np.int64),
            )
        return path

    @classmethod
    def load(cls, folder: Path) -> ItemEmbeddings | None:
        """The version's artifact; None when it has none (registered before retrieval)."""
        path = folder / RETRIEVAL_FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            raw = data["item_ids"]
            item_ids: list[ItemId] = (
                [int(i) for i in raw] if raw.dtype.kind in "iu" else [str(i) for i in raw]
            )
            transform, source = (str(v) for v in data["meta"])
            popular, start = {}, 0
            for key, length in zip(data["popular_keys"], data["popular_lengths"], strict=True):
                popular[str(key)] = data["popular_items"][start : start + int(length)]
                start += int(length)
            return cls(
                item_ids,
                data["vectors"],
                data["anchors"],
                data["prototypes"],
                data["prototype_scores"],
                transform,
                source,
                popular,
            )


# -- building it ---------------------------------------------------------------------


def pair_rows(
    specs: Sequence[FeatureSpec], base: np.ndarray, items: ItemTable, item_ids: Sequence[ItemId]
) -> np.ndarray:
    """One base row (a person and a context) against each item: the base row with the
    items' columns; a per-item person field (it belongs to another item) is missing."""
    rows = items.rows(item_ids)
    matrix = np.repeat(base[None, :].astype(np.float32), len(rows), axis=0)
    for col, spec in enumerate(specs):
        if spec.source == "item":
            matrix[:, col] = items.column(spec.field, spec.encoding)[rows]
        elif spec.per_item:
            matrix[:, col] = MISSING
    return matrix


def prototype_scores(
    score: Score,
    specs: Sequence[FeatureSpec],
    prototypes: np.ndarray,
    items: ItemTable,
    item_ids: Sequence[ItemId],
) -> np.ndarray:
    """(prototypes, items): the ranker's score of each item for each prototype. Items
    whose model columns are the same score the same: each distinct item row is scored
    once, `ITEM_CHUNK` rows per call."""
    first = pair_rows(specs, prototypes[0], items, item_ids) if len(prototypes) else None
    if first is None:
        return np.zeros((0, len(item_ids)))
    item_cols = [c for c, s in enumerate(specs) if s.source == "item"]
    distinct, inverse = np.unique(first[:, item_cols], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = np.empty((len(prototypes), len(distinct)), dtype=np.float64)
    for start in range(0, len(distinct), ITEM_CHUNK):
        block = distinct[start : start + ITEM_CHUNK]
        for j, base in enumerate(prototypes):
            rows = np.repeat(base[None, :].astype(np.float32), len(block), axis=0)
            rows[:, item_cols] = block
            for col, spec in enumerate(specs):
                if spec.per_item:
                    rows[:, col] = MISSING
            out[j, start : start + len(block)] = score(rows)
    return out[:, inverse]


def choose_prototypes(
    rows: np.ndarray, specs: Sequence[FeatureSpec], count: int, seed: int
) -> np.ndarray:
    """Distinct people-and-context rows of the training matrix (item columns left out
    of the comparison), `count` of them at random: drawn from a random sample of
    `PROTOTYPE_POOL` times as many rows (a sort of the whole matrix is not needed)."""
    rng = np.random.default_rng(seed)
    pool = rows[np.sort(rng.choice(len(rows), min(len(rows), count * PROTOTYPE_POOL), False))]
    person = [c for c, s in enumerate(specs) if s.source != "item" and not s.per_item]
    keyed = pool[:, person] if person else pool[:, :0]
    _, first = np.unique(keyed, axis=0, return_index=True)
    chosen = rng.choice(first, min(count, len(first)), replace=False)
    return pool[np.sort(chosen)]


def choose_anchors(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Anchor items: sampled by leverage (how much of the embedding space each item
    carries), so that a person's vector is well determined by their scores."""
    q, _ = np.linalg.qr(vectors.astype(np.float64))
    leverage = np.einsum("ij,ij->i", q, q) + 1e-12
    count = min(count, len(vectors))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(vectors), count, replace=False, p=leverage / leverage.sum()))


def distil(
    score: Score,
    specs: Sequence[FeatureSpec],
    rows: np.ndarray,
    items: ItemTable,
    item_ids: Sequence[ItemId],
    settings: DistilSettings = DistilSettings(),
) -> ItemEmbeddings:
    """Item embeddings of the ranker `score` over `item_ids` (see the module docstring);
    `rows` are training-matrix rows the prototypes are drawn from."""
    if not len(item_ids):
        raise ModelStoreError("retrieval: the catalogue is empty", 422)
    if not len(rows):
        raise ModelStoreError("retrieval: no rows to draw prototypes from", 422)
    prototypes = choose_prototypes(rows, specs, settings.prototypes, settings.seed)
    scores = prototype_scores(score, specs, prototypes, items, item_ids)
    transform = transform_of(scores)
    logits = to_logit(scores, transform)
    _, sigma, vt = np.linalg.svd(logits, full_matrices=False)
    dims = max(1, min(settings.dims, int((sigma > sigma[0] * 1e-6).sum())))
    vectors = (vt[:dims].T * sigma[:dims]).astype(np.float32)
    anchors = choose_anchors(vectors, max(settings.anchors, dims), settings.seed)
    return ItemEmbeddings(
        list(item_ids), vectors, anchors, prototypes, scores[:, anchors], transform, "distilled"
    )


def registered(
    score: Score,
    specs: Sequence[FeatureSpec],
    rows: np.ndarray,
    items: ItemTable,
    item_ids: Sequence[ItemId],
    vectors: np.ndarray,
    source: str,
    settings: DistilSettings = DistilSettings(),
) -> ItemEmbeddings:
    """The artifact for item vectors made elsewhere (`vectors` in `item_ids` order): the
    person's vector is fitted to the ranker's anchor scores in their space."""
    if vectors.ndim != 2 or len(vectors) != len(item_ids) or not np.isfinite(vectors).all():
        raise ModelStoreError(
            f"--item-embeddings: {source}: one finite vector per catalogue item expected", 422
        )
    prototypes = choose_prototypes(rows, specs, settings.prototypes, settings.seed)
    anchors = choose_anchors(vectors, max(settings.anchors, vectors.shape[1]), settings.seed)
    anchor_ids = [item_ids[int(p)] for p in anchors]
    scores = prototype_scores(score, specs, prototypes, items, anchor_ids)
    transform = transform_of(scores)
    return ItemEmbeddings(
        list(item_ids),
        vectors.astype(np.float32),
        anchors,
        prototypes,
        scores,
        transform,
        source,
    )


def popularity(
    matrix: np.ndarray,
    labels: np.ndarray,
    logged_items: np.ndarray,
    item_ids: Sequence[ItemId],
    specs: Sequence[FeatureSpec],
    top: int = POPULAR_TOP,
) -> dict[str, np.ndarray]:
    """Item positions by clicks in a log (ties: by impressions), overall and per value
    of each categorical (hash-encoded) person feature; vectorized over the log."""
    position = pd.Index(pd.Series(list(item_ids), dtype=object)).get_indexer(
        pd.Series(logged_items, dtype=object)
    )
    known = position >= 0
    frame = pd.DataFrame(
        {"item": position[known], "click": labels[known].astype(np.int64), "shown": 1}
    )
    lists: dict[str, np.ndarray] = {"": _ranked(frame, top)}
    for col, spec in enumerate(specs):
        if spec.source != "user" or spec.encoding != "hash" or spec.per_item:
            continue
        frame["segment"] = matrix[known, col]
        counts = frame.groupby(["segment", "item"], sort=False)[["click", "shown"]].sum()
        frequent = frame["segment"].value_counts().index[:MAX_SEGMENTS]
        counts = counts[counts.index.get_level_values(0).isin(frequent)].reset_index()
        counts = counts.sort_values(["segment", "click", "shown"], ascending=[True, False, False])
        counts = counts.groupby("segment", sort=False).head(top)
        for value, group in counts.groupby("segment", sort=False):
            lists[f"{col}={float(value)!r}"] = group["item"].to_numpy(np.int64)
    return lists


def _ranked(frame: pd.DataFrame, top: int) -> np.ndarray:
    counts = frame.groupby("item")[["click", "shown"]].sum()
    counts = counts.sort_values(["click", "shown"], ascending=False)
    return counts.index.to_numpy(np.int64)[:top]


def build_artifact(
    score: Score,
    specs: Sequence[FeatureSpec],
    rows: np.ndarray,
    items: ItemTable,
    catalogue: Sequence[ItemId],
    log: tuple[np.ndarray, np.ndarray] | None = None,
    vectors: tuple[np.ndarray, str] | None = None,
    settings: DistilSettings = DistilSettings(),
) -> ItemEmbeddings:
    """A version's retrieval artifact over `catalogue`: distilled from `score`, or
    `vectors` (in catalogue order, and the file they came from) registered with it;
    `log` (labels, logged item ids, aligned with `rows`) gives the popularity lists."""
    table = items.over(catalogue)
    if vectors is None:
        embeddings = distil(score, specs, rows, table, catalogue, settings)
    else:
        embeddings = registered(score, specs, rows, table, catalogue, *vectors, settings)
    if log is not None:
        embeddings.popular = popularity(rows, log[0], log[1], catalogue, specs)
    return embeddings


def read_vectors(path: Path, key: str, catalogue: Sequence[ItemId], parse: Callable) -> np.ndarray:
    """Item vectors from a table (Parquet or CSV): the item key column `key`, and either
    one column of lists or one numeric column per dimension; in `catalogue` order.
    ModelStoreError (the option and the problem) when an item has none."""
    from features.tables import read_table

    option = f"--item-embeddings: {path}"
    try:
        frame = read_table(path)
    except Exception as exc:
        raise ModelStoreError(f"{option}: not a readable table ({exc})", 422) from exc
    if key not in frame.columns:
        raise ModelStoreError(f"{option}: no column {key!r} (the item key)", 422)
    rest = [c for c in frame.columns if c != key]
    try:
        if len(rest) == 1 and frame[rest[0]].dtype == object:
            vectors = np.stack([np.asarray(v, dtype=np.float32) for v in frame[rest[0]]])
        else:
            vectors = frame[rest].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ModelStoreError(
            f"{option}: vectors are not numbers of one length ({exc})", 422
        ) from exc
    if vectors.ndim != 2 or vectors.shape[1] == 0 or not np.isfinite(vectors).all():
        raise ModelStoreError(f"{option}: vectors must be finite, at least one dimension", 422)
    ids = pd.Index([parse(v) for v in frame[key]])
    if ids.has_duplicates:
        raise ModelStoreError(f"{option}: item {ids[ids.duplicated()][0]!r} twice", 422)
    wanted = pd.Index(pd.Series(list(catalogue), dtype=object))
    rows = ids.get_indexer(wanted)
    if (rows < 0).any():
        missing = wanted[rows < 0]
        raise ModelStoreError(
            f"{option}: no vector for {len(missing)} catalogue items (first: {missing[0]!r})", 422
        )
    return vectors[rows]
