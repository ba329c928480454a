"""A streaming view's values as they were at each logged impression, from the
interaction log: what training needs so that a model learns from the value serving
would have read.

A streaming view (rankgate.yaml `streaming`) holds, per person, a decayed count of
their events: an event counts 1 when it happens and half as much `half_life_s`
later, per item (`per: item`, one field per catalogue item) or in total. Online,
the event consumer pushes it through Feast's push path; nothing materializes it
from an offline table. Offline, the log is the record of what happened: each of
its rows is an impression (an event of the `outcomes.impression` type), and a row
whose outcome is 1 is also a click (`outcomes.click`, or `outcomes.conversion`
when that is what the log's outcome records). So for each logged impression the
value is the person's events strictly before it, counted as the view counts them
and decayed to the impression's time:

    value(t) = sum over counted events e with t_e < t of 0.5 ** ((t - t_e) / half_life_s)

A person with no counted event within the view's TTL before `t` has no row online,
and reads as the view's `default`; a person with a row reads 0 for an item they
have no event for. Events of types the log does not record (a project's own
behavioural types) cannot be reconstructed: such a view reads as its default in
training (`countable` says which types the log holds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from features.spec import item_field
from rankgate.core.project import ItemId, Project, StreamingView


def countable(project: Project, view: StreamingView) -> tuple[bool, bool]:
    """Whether the log's rows count for the view: (impressions, outcomes)."""
    outcomes = project.spec.events.outcomes if project.spec.events else None
    if outcomes is None:
        return False, False
    impressions = outcomes.impression is not None and outcomes.impression in view.events
    positives = any(
        name is not None and name in view.events for name in (outcomes.click, outcomes.conversion)
    )
    return impressions, positives


def field_names(view: StreamingView, item_ids: Sequence[ItemId]) -> dict[str, ItemId | None]:
    """The view's field names, each with the item it counts (None: `per: total`)."""
    if view.per == "total":
        return {view.field: None}
    return {item_field(view.field, item): item for item in item_ids}


EPOCH_HALF_LIVES = 512
"""Counts are summed as weights 2**((t - anchor) / half_life) against an anchor moved
forward every this many half-lives: the weights stay far inside float64's range
however long the log, and a count is decayed to its query's time in one product."""


def _paired(keys_a: np.ndarray, times_a: np.ndarray, keys_b: np.ndarray, times_b: np.ndarray):
    """(key, time) pairs of two sets as int64s that sort as the pairs do: each time
    replaced by its rank among both sets' times."""
    ranks = np.unique(np.concatenate([times_a, times_b]), return_inverse=True)[1].astype(np.int64)
    span = int(ranks.max(initial=0)) + 1
    return keys_a * span + ranks[: len(times_a)], keys_b * span + ranks[len(times_a) :]


def decayed_sums(
    query_keys: np.ndarray,
    query_times: np.ndarray,
    event_keys: np.ndarray,
    event_times: np.ndarray,
    weights: np.ndarray,
    half_life_s: float,
) -> np.ndarray:
    """For each query (int64 key, time in seconds), the sum over events of its key
    strictly before its time of weight * 0.5 ** ((query time - event time) / half-life)."""
    out = np.zeros(len(query_keys), dtype=np.float64)
    if not len(event_keys) or not len(query_keys):
        return out
    keys, codes = np.unique(np.concatenate([query_keys, event_keys]), return_inverse=True)
    q_code, e_code = codes[: len(query_keys)], codes[len(query_keys) :]
    carry = np.zeros(len(keys), dtype=np.float64)
    start = float(min(query_times.min(), event_times.min()))
    width = EPOCH_HALF_LIVES * half_life_s
    q_epoch = np.floor((query_times - start) / width).astype(np.int64)
    e_epoch = np.floor((event_times - start) / width).astype(np.int64)
    for epoch in range(int(max(q_epoch.max(), e_epoch.max())) + 1):
        anchor = start + epoch * width
        events = np.flatnonzero(e_epoch == epoch)
        queries = np.flatnonzero(q_epoch == epoch)
        ek, et = e_code[events], event_times[events]
        order = np.lexsort((et, ek))
        ek, et = ek[order], et[order]
        grown = weights[events][order] * np.exp2((et - anchor) / half_life_s)
        prefix = pd.Series(grown).groupby(ek, sort=False).cumsum().to_numpy()
        if len(queries):
            qk, qt = q_code[queries], query_times[queries]
            e_pairs, q_pairs = _paired(ek, et, qk, qt)
            before = np.searchsorted(e_pairs, q_pairs, side="left") - 1
            mine = before >= 0
            mine[mine] = ek[before[mine]] == qk[mine]
            summed = carry[qk] + np.where(mine, prefix[np.maximum(before, 0)], 0.0)
            out[queries] = summed * np.exp2(-(qt - anchor) / half_life_s)
        np.add.at(carry, ek, grown)
        carry *= np.exp2(-float(EPOCH_HALF_LIVES))
    return out


def last_before(
    query_keys: np.ndarray, query_times: np.ndarray, event_keys: np.ndarray, event_times: np.ndarray
) -> np.ndarray:
    """For each query, the time of the latest event of its key strictly before its
    time (NaN: none)."""
    out = np.full(len(query_keys), np.nan)
    if not len(event_keys) or not len(query_keys):
        return out
    order = np.lexsort((event_times, event_keys))
    ek, et = event_keys[order], event_times[order]
    e_pairs, q_pairs = _paired(ek, et, query_keys, query_times)
    before = np.searchsorted(e_pairs, q_pairs, side="left") - 1
    mine = before >= 0
    mine[mine] = ek[before[mine]] == query_keys[mine]
    out[mine] = et[before[mine]]
    return out


def view_values(
    project: Project,
    view: StreamingView,
    ttl_s: float | None,
    logs: pd.DataFrame,
    item_ids: np.ndarray,
    query_rows: np.ndarray,
    query_items: np.ndarray | None,
) -> np.ndarray:
    """The view's value for each query: log row `query_rows[q]`'s person, just before
    the row's time, counting item `query_items[q]` (None: `per: total`).

    `logs` (sorted by time) has the interaction log's declared columns; `item_ids`
    are its rows' items as the project's type; `ttl_s` is the view's TTL (None or 0:
    none)."""
    spec = project.spec.interactions
    assert spec is not None and spec.user_column and spec.time_column
    count_impressions, count_outcomes = countable(project, view)
    times = pd.to_datetime(logs[spec.time_column], utc=True).to_numpy("datetime64[ns]")
    seconds = times.astype(np.int64) / 1e9
    weights = np.full(len(logs), int(count_impressions), dtype=np.float64)
    if count_outcomes:
        weights += logs[spec.outcome_column].to_numpy() == 1
    users = pd.factorize(logs[spec.user_column])[0].astype(np.int64)
    counted = np.flatnonzero(weights > 0)
    q_users, q_times = users[query_rows], seconds[query_rows]
    if view.per == "total" or query_items is None:
        e_keys, q_keys = users[counted], q_users
    else:
        catalogue = pd.Index(pd.unique(np.concatenate([item_ids, query_items])))
        n_items = len(catalogue) + 1
        e_keys = users[counted] * n_items + catalogue.get_indexer(item_ids[counted])
        q_keys = q_users * n_items + catalogue.get_indexer(query_items)
    sums = decayed_sums(
        q_keys, q_times, e_keys, seconds[counted], weights[counted], view.half_life_s
    )
    last = last_before(q_users, q_times, users[counted], seconds[counted])
    expired = np.isnan(last)
    if ttl_s:
        expired |= q_times - np.nan_to_num(last) > ttl_s
    return np.where(expired, view.default, sums)


def values_at_impressions(
    project: Project,
    view: StreamingView,
    ttl_s: float | None,
    logs: pd.DataFrame,
    item_ids: Sequence[ItemId],
    wanted: Sequence[Sequence[str]],
) -> list[dict[str, float]]:
    """For each row of `logs` (sorted by time), the view's fields named in `wanted[row]`
    as the row's person had them just before the row's time (`view_values`, by name)."""
    ids = np.asarray(list(item_ids), dtype=object)
    fields = field_names(view, sorted(set(item_ids), key=lambda i: (str(type(i)), i)))
    rows = [row for row, names in enumerate(wanted) for _ in names]
    names = [name for names in wanted for name in names]
    counts = fields.get
    query_items = None if view.per == "total" else np.array([counts(n) for n in names], object)
    values = view_values(
        project, view, ttl_s, logs, ids, np.asarray(rows, dtype=np.int64), query_items
    )
    out: list[dict[str, float]] = [{} for _ in range(len(logs))]
    for row, name, value in zip(rows, names, values.tolist(), strict=True):
        out[row][name] = value
    return out
