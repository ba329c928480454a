"""Retrieval: what narrows a request without candidates before the ranker scores it.

A request that names no candidates asks about the whole catalogue. Over a large one
(more allowed items than `retrieval.above_items`) the `retrieve` stage
(serving/ranking/stages.py), after the
person's features are fetched and before the ranker, gathers a few hundred items
from its sources (serving config `retrieval.sources`, each with a quota, merged in
order without duplicates):

- `ann`: the items nearest the person's vector in the version's item embeddings
  (model_store/embeddings.py). The vector is fitted to the ranker's scores of the
  version's anchor items for this person and this request's context (one batched
  ranker call of ~100 rows), so nothing is read or stored per person beyond the
  features the ranker reads anyway. faiss searches inner product over every item
  exactly, the policy's excluded items filtered *inside* the search (an
  `IDSelector`), so k allowed items come back however many rules exclude.
- `recent`: the person's recent items, from their per-item features (a streaming
  view `per: item`), highest value first, then the items nearest the first two.
- `popular`: the most clicked items of the person's segments (the values of their
  categorical features), then overall, from the version's training log.

The index follows the catalogue: when the item table is re-read (`features.
item_refresh_s`) new items get a vector from the ranker's scores of them for the
version's prototypes and are added, removed items are removed; nothing is rebuilt
and nothing restarts. A person the gate does not clear never reaches this stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faiss as _faiss
import numpy as np

from features.spec import FeatureSpec
from features.vector import ItemTable
from model_store.embeddings import ItemEmbeddings, pair_rows, to_logit
from rankgate.core.project import ItemId
from serving.contract.config import RetrievalSource

logger = logging.getLogger(__name__)
faiss: Any = _faiss
"""Untyped here: faiss's generated stubs do not match its SWIG signatures (search
parameters, `remove_ids` with an array of ids)."""

MAX_SELECTORS = 64
"""Filters kept per index (one per distinct set of excluded items: purposes x regions)."""
NEIGHBOUR_SEEDS = 2
"""Recent items whose nearest items the `recent` source adds."""

faiss.omp_set_num_threads(1)  # one query at a time per request: threads cost more than they save


@dataclass(frozen=True)
class Anchors:
    """The items whose scores fix a person's vector, and how."""

    ids: list[ItemId]
    mapping: np.ndarray
    """(dims, anchors): the anchors' scores (transformed) -> the person's vector."""
    transform: str

    def query(self, anchor_scores: np.ndarray) -> np.ndarray:
        """The person's vector (1, dims) from the ranker's scores of `ids` for them."""
        vector = self.mapping @ to_logit(anchor_scores, self.transform)
        return np.ascontiguousarray(vector[None, :], dtype=np.float32)


class ItemIndex:
    """faiss over one version's item vectors: inner product, pre-filtered, items added
    and removed in place. Searched and changed on the replica's event loop only."""

    def __init__(
        self,
        embeddings: ItemEmbeddings,
        specs: Sequence[FeatureSpec],
        score: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        self.embeddings = embeddings
        self.specs = specs
        self.score = score
        """The version's ranker, synchronous (new items' vectors: off the request path)."""
        self.ids: list[ItemId] = []
        """Item of each faiss label (labels are positions here, never reused)."""
        self.label_of: dict[ItemId, int] = {}
        self.vectors = np.zeros((0, embeddings.dims), dtype=np.float32)
        """Each label's vector (removed items' rows stay: labels are positions)."""
        self.selectors: dict[frozenset[ItemId], Any] = {}
        self.segments = [
            col
            for col, spec in enumerate(specs)
            if spec.source == "user" and spec.encoding == "hash" and not spec.per_item
        ]
        self.per_item = [spec for spec in specs if spec.per_item]
        self.item_of_field: dict[str, ItemId] = {}
        """Per-item person fields (`aff_{item_id}`) -> their item (the `recent` source)."""
        dims = embeddings.dims
        # Exact inner product over every held item (1.0-1.5 ms at 10^5 items and 64
        # dimensions, 13 ms at 10^6): recall is the embeddings', not the search's.
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dims))
        self._add(embeddings.item_ids, embeddings.vectors)
        self.anchors = Anchors([], np.zeros((dims, 0)), embeddings.transform)
        """Replaced whole when items are removed: a request reads ids and map together."""

    # -- the catalogue ---------------------------------------------------------------

    def changes(self, items: ItemTable) -> tuple[list[ItemId], np.ndarray, list[ItemId]]:
        """What `follow` would change to hold exactly the items of `items`: (new items,
        their vectors from the ranker's scores of them for the prototypes, removed
        items). Reads the index only: run it off the event loop."""
        new = [i for i in items.item_ids if i not in self.label_of]
        gone = [i for i in self.label_of if i not in items]
        vectors = np.zeros((0, self.embeddings.dims), dtype=np.float32)
        if new:
            scores = np.stack(
                [
                    self.score(pair_rows(self.specs, base, items, new))
                    for base in self.embeddings.prototypes
                ]
            )
            vectors = self.embeddings.embed(scores)
        return new, vectors, gone

    def follow(self, items: ItemTable) -> tuple[int, int]:
        """Hold exactly the items of `items` (see `changes`); (added, removed)."""
        return self.apply(*self.changes(items))

    def apply(self, new: list[ItemId], vectors: np.ndarray, gone: list[ItemId]) -> tuple[int, int]:
        """Add `new` with `vectors`, remove `gone`; the anchors the person's vector is
        fitted on are those still held."""
        new = [i for i in new if i not in self.label_of]
        if new:
            self._add(new, vectors[: len(new)])
        gone = [i for i in gone if i in self.label_of]
        if gone:
            labels = np.array([self.label_of.pop(i) for i in gone], dtype=np.int64)
            self.index.remove_ids(labels)
        if gone or not self.anchors.ids:
            self._fit_anchors()
        if gone or new:
            self.selectors.clear()
        return len(new), len(gone)

    def _add(self, item_ids: Sequence[ItemId], vectors: np.ndarray) -> None:
        labels = np.arange(len(self.ids), len(self.ids) + len(item_ids), dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for item, label in zip(item_ids, labels.tolist(), strict=True):
            self.ids.append(item)
            self.label_of[item] = label
            for spec in self.per_item:
                self.item_of_field[spec.field_for(item)] = item
        self.vectors = np.concatenate([self.vectors, vectors]) if len(self.vectors) else vectors
        self.index.add_with_ids(vectors, labels)

    def _fit_anchors(self) -> None:
        """The anchors still held, and the map from their scores to a person's vector."""
        ids = [i for i in self.embeddings.anchor_ids if i in self.label_of]
        if len(ids) == len(self.embeddings.anchor_ids):
            mapping = self.embeddings.query_map
        else:
            vectors = self.vectors[[self.label_of[i] for i in ids]].astype(np.float64)
            mapping = np.asarray(np.linalg.pinv(vectors))
        self.anchors = Anchors(ids, mapping, self.embeddings.transform)

    def gather(
        self,
        sources: Sequence[RetrievalSource],
        k: int,
        query: np.ndarray,
        row: np.ndarray,
        user: Mapping[str, Any],
        excluded: frozenset[ItemId],
    ) -> tuple[list[ItemId], dict[str, int]]:
        """What the sources give for one person, in order, each item once; and how many
        items each source gave. `query`: the person's vector; `row`: their model row
        (their segments); `user`: their features (their recent items)."""
        lists = []
        for source in sources:
            if source.source == "ann":  # at least k: an answer is never short
                lists.append(self.nearest(query, max(source.quota, k), excluded))
            elif source.source == "popular":
                lists.append(self.popular(row, source.quota, excluded))
            else:
                lists.append(self.recent(user, source.quota, excluded))
        found: dict[ItemId, None] = {}
        for items in lists:
            found.update(dict.fromkeys(items))
        counts: dict[str, int] = {s.source: len(i) for s, i in zip(sources, lists, strict=True)}
        return list(found), counts

    def describe(self) -> dict[str, Any]:
        """What /healthz says of the index."""
        return {
            "items": int(self.index.ntotal),
            "dims": self.embeddings.dims,
            "anchors": len(self.anchors.ids),
            "embeddings": self.embeddings.source,
        }

    # -- a request -------------------------------------------------------------------

    def nearest(self, query: np.ndarray, k: int, excluded: frozenset[ItemId]) -> list[ItemId]:
        """The k allowed items of highest inner product with `query`, best first."""
        k = min(k, self.index.ntotal)
        if k <= 0:
            return []
        params = faiss.SearchParameters(sel=self._selector(excluded))
        _, labels = self.index.search(query, k, params=params)
        ids = self.ids
        return [ids[label] for label in labels[0].tolist() if label >= 0]

    def _selector(self, excluded: frozenset[ItemId]) -> Any:
        if not excluded:
            return None
        selector = self.selectors.get(excluded)
        if selector is None:
            if len(self.selectors) >= MAX_SELECTORS:
                self.selectors.clear()
            labels = np.array(
                [self.label_of[i] for i in excluded if i in self.label_of], dtype=np.int64
            )
            batch = faiss.IDSelectorBatch(labels)
            selector = faiss.IDSelectorNot(batch)
            selector.batch = batch  # the Not holds a raw pointer: keep the batch alive
            self.selectors[excluded] = selector
        return selector

    def popular(self, row: np.ndarray, k: int, excluded: frozenset[ItemId]) -> list[ItemId]:
        """The most clicked allowed items of the person's segments, then overall."""
        found: dict[ItemId, None] = {}
        item_ids = self.embeddings.item_ids
        for positions in self.embeddings.popular_for(row, self.segments):
            for position in positions.tolist():
                item = item_ids[position]
                if item in self.label_of and item not in excluded:
                    found[item] = None
                    if len(found) >= k:
                        return list(found)
        return list(found)

    def recent(self, user: Mapping[str, Any], k: int, excluded: frozenset[ItemId]) -> list[ItemId]:
        """The person's items of highest per-item feature value (their recent items),
        then the nearest items to the first `NEIGHBOUR_SEEDS` of them."""
        if not self.per_item:
            return []
        values: dict[ItemId, float] = {}
        item_of_field, held = self.item_of_field, self.label_of
        for name, value in user.items():
            item = item_of_field.get(name)
            if item is None or item in excluded or item not in held:
                continue
            if isinstance(value, (int, float)) and value > 0:
                values[item] = max(values.get(item, 0.0), float(value))
        found = dict.fromkeys(sorted(values, key=values.__getitem__, reverse=True)[:k])
        seeds = list(found)[:NEIGHBOUR_SEEDS]
        for seed in seeds:
            if len(found) >= k:
                break
            share = -(-(k - len(found)) // len(seeds))
            query = self.vectors[self.label_of[seed]][None, :]
            for item in self.nearest(query, share + len(found), excluded):
                if len(found) >= k:
                    break
                found.setdefault(item)
        return list(found)
