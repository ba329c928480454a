"""Top-k: the one ordering of scored items, for the ranker, the fallback, shadows, replay
and off-policy evaluation.

Best first; equal scores are ordered by item id, so the same scores always give
the same answer, and `rankgate audit replay` can check a ranking exactly. Item ids
are ints or strings (a catalogue uses one kind); numpy scalars come back as plain
Python values, ready for JSON.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

if TYPE_CHECKING:
    # Only for types: `rankgate audit tail` imports this module and stays without numpy.
    import numpy as np

Item = TypeVar("Item", bound=int | str)
SCORE_DIGITS = 6
"""Scores in answers (and so in audit records) are rounded to this many decimals."""


class Pick(NamedTuple, Generic[Item]):
    position: int
    """Index of the item in the ranked sequence (and of its row in the model input)."""
    item_id: Item
    score: float


def plain_item_id(item: Any) -> Any:
    """An item id as a Python int or str (numpy's integers and str_ included)."""
    if isinstance(item, str):
        return str(item)
    try:
        return operator.index(item)
    except TypeError:
        raise TypeError(f"item ids are ints or strings, not {type(item).__name__}") from None


def top_k(
    item_ids: Sequence[Item], scores: Sequence[float] | np.ndarray, k: int
) -> list[Pick[Item]]:
    """The `k` best of `item_ids` by `scores` (same length), best first, ties by item id."""
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    keys = np.asarray(item_ids) if len(item_ids) else None
    if keys is not None and (
        keys.dtype.kind in "iu"
        or (keys.dtype.kind == "U" and all(isinstance(item, str) for item in item_ids))
    ):
        # One kind of id (as a catalogue has): sort in numpy, by score then id.
        order = np.lexsort((keys, -values))[:k].tolist()
    else:
        ids = [plain_item_id(item) for item in item_ids]
        # (is a string, id): never compares an int with a str.
        order = sorted(
            range(len(ids)), key=lambda n: (-values[n], isinstance(ids[n], str), ids[n])
        )[:k]
    return [Pick(n, plain_item_id(item_ids[n]), float(values[n])) for n in order]
