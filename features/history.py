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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from features.spec import item_field
from features.streaming import decayed
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


def values_at_impressions(
    project: Project,
    view: StreamingView,
    ttl_s: float | None,
    logs: pd.DataFrame,
    item_ids: Sequence[ItemId],
    wanted: Sequence[Sequence[str]],
) -> list[dict[str, float]]:
    """For each row of `logs` (sorted by time), the view's fields named in `wanted[row]`
    as the row's person had them just before the row's time.

    `logs` has the interaction log's declared columns; `item_ids` are the rows' items
    as the project's type; `ttl_s` is the view's TTL (None or 0: none)."""
    spec = project.spec.interactions
    assert spec is not None and spec.user_column and spec.time_column
    count_impressions, count_outcomes = countable(project, view)
    times = pd.to_datetime(logs[spec.time_column], utc=True).to_numpy("datetime64[ns]")
    seconds = times.astype(np.int64) / 1e9
    outcomes = logs[spec.outcome_column].to_numpy()
    fields = field_names(view, sorted(set(item_ids), key=lambda i: (str(type(i)), i)))
    values: list[dict[str, float]] = [{} for _ in range(len(logs))]
    for positions in logs.groupby(spec.user_column, sort=False).indices.values():
        state: dict[ItemId | None, tuple[float, float]] = {}
        last_event: float | None = None
        start = 0
        while start < len(positions):
            # Rows of one instant see the events before it, not each other.
            now = seconds[positions[start]]
            end = start
            while end < len(positions) and seconds[positions[end]] == now:
                end += 1
            group = positions[start:end]
            expired = last_event is None or (bool(ttl_s) and now - last_event > (ttl_s or 0))
            for pos in group:
                values[pos] = {
                    name: view.default
                    if expired
                    else _read(state, fields.get(name), now, view.half_life_s)
                    for name in wanted[pos]
                }
            for pos in group:
                counted = int(count_impressions) + int(count_outcomes and outcomes[pos] == 1)
                if counted:
                    key = None if view.per == "total" else item_ids[pos]
                    state[key] = (_read(state, key, now, view.half_life_s) + counted, now)
                    last_event = now
            start = end
    return values


def _read(
    state: Mapping[ItemId | None, tuple[float, float]],
    key: ItemId | None,
    now: float,
    half_life_s: float,
) -> float:
    value, at = state.get(key, (0.0, now))
    return decayed(value, now - at, half_life_s)


def ttl_seconds(view: Any) -> float | None:
    """A Feast view's TTL in seconds (None: none)."""
    ttl = getattr(view, "ttl", None)
    return ttl.total_seconds() if ttl else None
