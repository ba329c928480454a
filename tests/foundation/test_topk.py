"""The one top-k: best first, ties by item id, for int and string item ids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rankgate.core.topk import Pick, plain_item_id, top_k


def test_best_first_and_ties_by_item_id() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9], dtype=np.float32)
    picks = top_k([7, 3, 2, 5, 8], scores, 4)
    assert [(p.item_id, p.position) for p in picks] == [(3, 1), (8, 4), (2, 2), (7, 0)]
    assert picks[0] == Pick(1, 3, float(np.float32(0.9)))


def test_string_item_ids_tie_by_id_too() -> None:
    picks = top_k(["sku-b", "sku-a", "sku-c"], [1.0, 1.0, 2.0], 3)
    assert [p.item_id for p in picks] == ["sku-c", "sku-a", "sku-b"]


def test_numpy_ids_and_scores_come_back_as_python_values() -> None:
    numpy_ids: Any = np.array([4, 9], dtype=np.int64)  # as a catalogue read with pandas has them
    (pick,) = top_k(numpy_ids, np.array([0.2, 0.3]), 1)
    assert type(pick.item_id) is int and type(pick.score) is float
    assert plain_item_id(np.str_("x")) == "x" and type(plain_item_id(np.str_("x"))) is str


def test_k_beyond_the_items_and_empty_input() -> None:
    assert [p.item_id for p in top_k([1, 2], [0.1, 0.2], 10)] == [2, 1]
    assert top_k([], [], 5) == []


def test_other_item_id_types_are_refused() -> None:
    with pytest.raises(TypeError, match="ints or strings"):
        plain_item_id(1.5)


@pytest.mark.parametrize("kind", ["int", "str", "mixed"])
def test_numpy_order_is_the_python_order(kind: str) -> None:
    """Sorting in numpy (one kind of id) gives exactly the order of the plain
    sort by (-score, is a string, id), ties included (replay compares them)."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(1, 120))
        numbers = rng.permutation(10_000)[:n].tolist()
        ids: list[Any] = {
            "int": numbers,
            "str": [f"sku-{i}" for i in numbers],
            "mixed": [i if i % 2 else f"sku-{i}" for i in numbers],
        }[kind]
        scores = rng.integers(0, 5, n) / 4.0  # many ties
        expected = sorted(range(n), key=lambda j: (-scores[j], isinstance(ids[j], str), ids[j]))[
            :10
        ]
        assert [p.position for p in top_k(ids, scores, 10)] == expected
