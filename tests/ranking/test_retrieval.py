"""Retrieval in memory: item embeddings distilled from a ranker, the faiss index over
them, the `retrieve` stage.

The ranker is a small numpy function of a person's and an item's features (so the
exhaustive ranking is known); the distillation, faiss, the index's filters and live
changes, the stage and its runner are the real ones. Milliseconds, no server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.spec import FeatureSpec
from features.vector import ItemTable
from model_store.embeddings import DistilSettings, ItemEmbeddings, distil, pair_rows, popularity
from rankgate.core.errors import ModelStoreError
from rankgate.governance.consent import ConsentState
from serving.contract.config import RetrievalSource
from serving.contract.reasons import FallbackReason
from serving.ranking.retrieval import ItemIndex
from tests.ranking.test_stages import Consent, Features, Scorer, run, services

SPECS = [
    FeatureSpec("taste", "user", "profile", "taste", "number", "profile"),
    FeatureSpec("budget", "user", "profile", "budget", "number", "profile"),
    FeatureSpec("segment", "user", "profile", "segment", "hash", "profile"),
    FeatureSpec("style", "item", "items", "style", "number", "item"),
    FeatureSpec("price", "item", "items", "price", "number", "item"),
]
N_ITEMS = 3000


def ranker(rows: np.ndarray) -> np.ndarray:
    """Click probability: taste matches style, price within budget."""
    taste, budget, _, style, price = rows.T
    logit = 2.0 * np.cos(taste - style) - 0.8 * np.abs(price - budget) + 0.1 * style
    return 1.0 / (1.0 + np.exp(-logit))


def item_table(ids: list[int], seed: int = 1) -> ItemTable:
    rng = np.random.default_rng(seed)
    return ItemTable(
        {i: {"style": float(rng.uniform(0, 6.28)), "price": float(rng.uniform(0, 5))} for i in ids}
    )


def people(count: int, seed: int) -> np.ndarray:
    """Model rows of logged people (item columns hold a logged item's, unused)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((count, len(SPECS)), dtype=np.float32)
    rows[:, 0] = rng.uniform(0, 6.28, count)
    rows[:, 1] = rng.uniform(0, 5, count)
    rows[:, 2] = rng.integers(0, 3, count)
    return rows


@pytest.fixture(scope="module")
def catalogue() -> list[int]:
    return list(range(N_ITEMS))


@pytest.fixture(scope="module")
def items(catalogue: list[int]) -> ItemTable:
    return item_table(catalogue)


@pytest.fixture(scope="module")
def embeddings(catalogue: list[int], items: ItemTable) -> ItemEmbeddings:
    return distil(ranker, SPECS, people(2000, 0), items, catalogue, DistilSettings(dims=16))


def index_of(embeddings: ItemEmbeddings, items: ItemTable) -> ItemIndex:
    index = ItemIndex(embeddings, SPECS, ranker)
    index.follow(items)
    return index


def retrieved_top(
    index: ItemIndex, items: ItemTable, person: np.ndarray, quota: int, k: int = 10
) -> list[int]:
    """What the stage does for one person: fit the vector on the anchors, search,
    rank what was found exactly."""
    anchor_scores = ranker(pair_rows(SPECS, person, items, index.anchors.ids))
    found = index.nearest(index.anchors.query(anchor_scores), quota, frozenset())
    scores = ranker(pair_rows(SPECS, person, items, found))
    return [found[i] for i in np.argsort(-scores, kind="stable")[:k]]


def recall_at(k: int, found: list, exhaustive: np.ndarray, ids: list) -> float:
    """Share of the exhaustive top k that `found` holds (an item tied with the k-th
    counts as one of it)."""
    kth = np.sort(exhaustive)[-k]
    score_of = dict(zip(ids, exhaustive, strict=True))
    above = int((exhaustive > kth).sum())
    got_above = sum(score_of[i] > kth for i in found)
    got_tied = sum(score_of[i] == kth for i in found)
    return (got_above + min(got_tied, k - above)) / k


def test_retrieval_then_ranking_finds_the_exhaustive_top_10(
    embeddings: ItemEmbeddings, items: ItemTable, catalogue: list[int]
) -> None:
    index = index_of(embeddings, items)
    recalls = []
    for person in people(100, 7):
        exhaustive = ranker(pair_rows(SPECS, person, items, catalogue))
        found = retrieved_top(index, items, person, quota=150)
        recalls.append(recall_at(10, found, exhaustive, catalogue))
    assert np.mean(recalls) >= 0.9, np.mean(recalls)


def test_the_person_vector_approximates_the_rankers_logits(
    embeddings: ItemEmbeddings, items: ItemTable, catalogue: list[int]
) -> None:
    index = index_of(embeddings, items)
    person = people(1, 9)[0]
    exact = ranker(pair_rows(SPECS, person, items, catalogue))
    vector = index.anchors.query(ranker(pair_rows(SPECS, person, items, index.anchors.ids)))[0]
    approx = embeddings.vectors @ vector
    assert np.corrcoef(approx, np.log(exact / (1 - exact)))[0, 1] > 0.95


def test_excluded_items_are_filtered_inside_the_search_and_k_still_come_back(
    embeddings: ItemEmbeddings, items: ItemTable
) -> None:
    index = index_of(embeddings, items)
    person = people(1, 3)[0]
    query = index.anchors.query(ranker(pair_rows(SPECS, person, items, index.anchors.ids)))
    best = index.nearest(query, 50, frozenset())
    excluded = frozenset(best[:40])  # the 40 nearest items may not be shown
    found = index.nearest(query, 50, excluded)
    assert len(found) == 50 and not excluded & set(found)
    assert found[:10] == best[40:50]  # the next nearest, in order


def test_an_item_added_live_is_found_and_a_removed_one_is_gone(
    embeddings: ItemEmbeddings, items: ItemTable, catalogue: list[int]
) -> None:
    index = index_of(embeddings, items)
    person = people(1, 5)[0]
    # A new item made to be this person's best: their taste, their budget.
    rows = {i: items.row(i) for i in catalogue}
    rows[99_999] = {"style": float(person[0]), "price": float(person[1])}
    grown = ItemTable(rows)
    assert index.follow(grown) == (1, 0)
    assert retrieved_top(index, grown, person, quota=50)[0] == 99_999
    shrunk = ItemTable({i: r for i, r in rows.items() if i not in (99_999, 0, 1)})
    assert index.follow(shrunk) == (0, 3)
    anchor_scores = ranker(pair_rows(SPECS, person, shrunk, index.anchors.ids))
    found = index.nearest(index.anchors.query(anchor_scores), N_ITEMS, frozenset())
    assert len(found) == N_ITEMS - 2 and not {99_999, 0, 1} & set(found)
    assert index.describe()["items"] == N_ITEMS - 2


def test_the_artifact_round_trips(tmp_path: Path, embeddings: ItemEmbeddings) -> None:
    embeddings.popular = {"": np.array([3, 1, 2]), "2=7.0": np.array([5])}
    loaded = ItemEmbeddings.load(embeddings.save(tmp_path).parent)
    assert loaded is not None
    assert loaded.item_ids == embeddings.item_ids
    np.testing.assert_array_equal(loaded.vectors, embeddings.vectors)
    assert {k: v.tolist() for k, v in loaded.popular.items()} == {"": [3, 1, 2], "2=7.0": [5]}
    assert ItemEmbeddings.load(tmp_path / "none") is None


def test_popularity_is_per_segment_then_overall() -> None:
    specs = SPECS
    matrix = np.zeros((6, len(specs)), dtype=np.float32)
    matrix[:, 2] = [1, 1, 1, 2, 2, 2]  # the segment column
    labels = np.array([1, 1, 0, 1, 1, 1], dtype=np.int8)
    logged = np.array([10, 10, 11, 12, 12, 12])
    lists = popularity(matrix, labels, logged, [10, 11, 12, 13], specs)
    assert lists[""].tolist() == [2, 0, 1]  # 12 (three clicks), 10 (two), 11 (none)
    assert lists["2=1.0"].tolist() == [0, 1]
    assert lists["2=2.0"].tolist() == [2]


def test_distilling_an_empty_catalogue_says_so() -> None:
    with pytest.raises(ModelStoreError, match="catalogue is empty"):
        distil(ranker, SPECS, people(10, 0), ItemTable({}), [])


def test_sources_are_merged_in_order_without_duplicates(
    embeddings: ItemEmbeddings, items: ItemTable
) -> None:
    index = index_of(embeddings, items)
    query = index.anchors.query(ranker(pair_rows(SPECS, people(1, 2)[0], items, index.anchors.ids)))
    sources = [
        RetrievalSource(source="ann", quota=5),
        RetrievalSource(source="recent", quota=5),
        RetrievalSource(source="ann", quota=8),
    ]
    found, counts = index.gather(sources, 3, query, people(1, 2)[0], {}, frozenset())
    assert found == index.nearest(query, 8, frozenset())  # the second ann adds 3 more
    assert counts == {"ann": 8, "recent": 0}


# -- the stage ------------------------------------------------------------------------


class SpyIndex:
    """Records what the stage asked of it."""

    def __init__(self, nearest: list[int]) -> None:
        self.anchors = self
        self.ids = [1, 2]
        self.found = nearest
        self.calls: list[str] = []

    def describe(self) -> dict:
        return {}

    def query(self, anchor_scores: np.ndarray) -> np.ndarray:
        self.calls.append("query")
        return np.zeros((1, 2), dtype=np.float32)

    def nearest(self, query: np.ndarray, k: int, excluded: frozenset) -> list[int]:
        self.calls.append("nearest")
        return [i for i in self.found if i not in excluded][:k]

    def popular(self, row: np.ndarray, k: int, excluded: frozenset) -> list[int]:
        self.calls.append("popular")
        return [5, 1][:k]

    def recent(self, user: dict, k: int, excluded: frozenset) -> list[int]:
        self.calls.append("recent")
        return []

    gather = ItemIndex.gather  # the real merging, over the recorded sources


CONFIG = {"retrieval": {"above_items": 2}}


def test_the_stage_narrows_a_request_without_candidates_to_what_it_retrieved() -> None:
    index, scorer = SpyIndex([2, 6, 3]), Scorer()
    deps = services(config=CONFIG, retrieval={"v1": index}, score=scorer)
    context = run(deps, k=3)
    assert context.fallback is None
    assert context.eligible == [2, 3, 5, 1]  # ann (6 excluded by the policy), then popular
    assert context.retrieved == {"ann": 2, "recent": 0, "popular": 2}
    assert [item for item, _ in context.ranked] == [5, 3, 2]
    assert scorer.calls == 2  # the anchors, then the retrieved items
    assert context.timings["retrieve"] > 0


def test_a_person_the_gate_does_not_clear_is_never_retrieved_for() -> None:
    index, scorer = SpyIndex([2, 3]), Scorer()
    deps = services(
        config=CONFIG,
        retrieval={"v1": index},
        score=scorer,
        consent=Consent(ConsentState.DENIED),
    )
    context = run(deps)
    assert context.fallback is not None and context.fallback.reason == FallbackReason.NO_CONSENT
    assert index.calls == [] and scorer.calls == 0
    assert context.timings["retrieve"] == 0 and context.retrieved is None


def test_a_small_catalogue_or_named_candidates_skip_retrieval() -> None:
    index = SpyIndex([2, 3])
    context = run(services(retrieval={"v1": index}))  # 5 allowed items, above_items 2000
    assert index.calls == [] and context.eligible == [1, 2, 3, 4, 5]
    assert context.timings["retrieve"] == 0


def test_a_version_without_an_index_degrades_and_says_so() -> None:
    context = run(services(config=CONFIG, fetcher=Features()))
    assert context.fallback is not None
    assert context.fallback.reason == FallbackReason.RETRIEVAL_UNAVAILABLE
    assert context.fallback.detail == "v1 has no item index"


def test_the_ranker_failing_on_the_anchors_degrades_like_scoring() -> None:
    deps = services(
        config=CONFIG, retrieval={"v1": SpyIndex([2])}, score=Scorer(error=RuntimeError("x"))
    )
    context = run(deps)
    assert context.fallback is not None and context.fallback.reason == FallbackReason.MODEL_ERROR


def test_allowed_catalogue_is_computed_once_per_exclusion_set() -> None:
    deps = services()
    first = deps.allowed_catalogue(frozenset({6}))
    assert first == [1, 2, 3, 4, 5] and deps.allowed_catalogue(frozenset({6})) is first
    assert deps.allowed_catalogue(frozenset()) is deps.fetcher.catalogue


def test_recent_items_come_first_then_their_neighbours(
    embeddings: ItemEmbeddings, items: ItemTable
) -> None:
    specs = [*SPECS, FeatureSpec("clicks", "user", "recent", "clicks_{item_id}", "number", "a")]
    index = ItemIndex(embeddings, specs, ranker)
    index.follow(items)
    user = {"clicks_7": 0.5, "clicks_9": 2.0, "clicks_11": 0.0, "clicks_13": 1.0, "age": 3}
    assert index.recent(user, 3, frozenset()) == [9, 13, 7]
    assert index.recent(user, 2, frozenset({9})) == [13, 7]
    grown = index.recent(user, 10, frozenset())
    assert grown[:3] == [9, 13, 7] and len(set(grown)) == 10
    assert index.recent({"age": 3}, 5, frozenset()) == []


def test_an_item_gone_from_the_item_table_mid_request_is_dropped_not_an_error() -> None:
    # The catalogue the request was checked against still lists 99; the table does not.
    fetcher = Features(catalogue=[1, 2, 3, 4, 5, 99])
    context = run(services(fetcher=fetcher))
    assert context.fallback is None
    assert 99 not in context.eligible and [i for i, _ in context.ranked] == [5, 4, 3]
