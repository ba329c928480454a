"""Streaming features: decayed counts of a person's recent events, per item or in total.

A streaming view (rankgate.yaml `streaming`) is a Feast feature view whose source
is a PushSource. The event consumer (serving/events/consumer.py) applies each event of
the counted types to the person's state and pushes the resulting row to the
online store with `FeatureStore.push_async(..., to=PushMode.ONLINE)`.

    redis_keys.streaming_state(ns, view, user_key)   hash:
        _at       the event time (Unix s) the counts are decayed to
        _through  stream id of the newest event applied
        <field>   the count of that field at `_at`

Counting: an event adds 1 at its own time, and every count halves each
`half_life_s`. The sum does not depend on the order events arrive in: a late event
adds `0.5 ** ((_at - t) / half_life_s)`, a newer one decays the counts to its time
first. An event whose stream id is not after `_through` was applied already (a
redelivery after a crash) and changes nothing, so the update is idempotent.

The pushed row's timestamp is the acceptance time of the newest event applied
(from its stream id, with the id's sequence number as microseconds): a decision
that reads the row knows which events it includes, and how old the newest is.
The pushed counts are decayed to that time, and a reader decays them on to its
own time (`decayed`), so serving reads what training computes from the log
(features/history.py): the counts as of the moment of the decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from features.spec import item_field
from rankgate.core.project import ItemId, StreamingView

AT, THROUGH = "_at", "_through"


class Counted(Protocol):
    """What a streaming count needs of an event (serving.events.intake.StoredEvent)."""

    @property
    def type(self) -> str: ...
    @property
    def item_id(self) -> ItemId: ...
    @property
    def at(self) -> float: ...
    @property
    def stream_id(self) -> str | None: ...


def stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def row_time(stream_id: str) -> datetime:
    """The row timestamp for events through `stream_id` (ms, and the sequence as µs)."""
    ms, seq = stream_order(stream_id)
    return datetime.fromtimestamp(ms / 1000.0 + min(seq, 999) / 1e6, UTC)


def through_of(stamp: datetime) -> float:
    """The acceptance time (Unix s) a row timestamp stands for (row_time's inverse, to the ms)."""
    return int(stamp.timestamp() * 1000.0) / 1000.0


@dataclass
class CountState:
    """One person's counts of one streaming view."""

    at: float = 0.0
    through: str | None = None
    counts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, raw: Mapping[bytes, bytes]) -> CountState:
        state = cls()
        for name, value in raw.items():
            key = name.decode()
            if key == AT:
                state.at = float(value)
            elif key == THROUGH:
                state.through = value.decode()
            else:
                state.counts[key] = float(value)
        return state

    def stored(self) -> dict[str, str]:
        fields = {AT: repr(self.at), THROUGH: self.through or "0-0"}
        fields.update({name: repr(value) for name, value in self.counts.items()})
        return fields

    def applied(self, stream_id: str) -> bool:
        return self.through is not None and stream_order(stream_id) <= stream_order(self.through)


class StreamingCounts:
    """The counting rule of one streaming view (plain logic: no Redis, no Feast)."""

    def __init__(self, spec: StreamingView, catalogue: Iterable[ItemId]) -> None:
        self.spec = spec
        self.types = frozenset(spec.events)
        if spec.per == "item":
            self.field_of_item = {item: item_field(spec.field, item) for item in catalogue}
            self.fields = list(self.field_of_item.values())
        else:
            self.field_of_item = {}
            self.fields = [spec.field]

    @property
    def view(self) -> str:
        return self.spec.view

    def counts(self, event: Counted) -> bool:
        return event.type in self.types

    def field_of(self, item_id: ItemId) -> str | None:
        if self.spec.per == "total":
            return self.spec.field
        return self.field_of_item.get(item_id)

    def decay(self, seconds: float) -> float:
        return decayed(1.0, seconds, self.spec.half_life_s)

    def apply(self, state: CountState, events: Sequence[Counted]) -> int:
        """Add the events not applied before to `state` (in place); how many were new."""
        new = 0
        for event in sorted(events, key=lambda e: stream_order(e.stream_id or "0-0")):
            assert event.stream_id is not None, "events are read back from the stream"
            name = self.field_of(event.item_id)
            if name is None or state.applied(event.stream_id):
                continue
            if event.at >= state.at:
                factor = self.decay(event.at - state.at)
                state.counts = {k: v * factor for k, v in state.counts.items()}
                state.at = event.at
                weight = 1.0
            else:
                weight = self.decay(state.at - event.at)
            state.counts[name] = state.counts.get(name, 0.0) + weight
            state.through = event.stream_id
            new += 1
        return new

    def merge(self, state: CountState, others: Sequence[CountState], through: str) -> None:
        """Add the counts of `others` (the states of ids linked to the person) into
        `state`, each decayed to the latest of their times, and mark it applied
        through the link's stream id (a redelivered link then changes nothing)."""
        at = max([state.at, *(other.at for other in others)])
        factor = self.decay(at - state.at)
        counts = {name: value * factor for name, value in state.counts.items()}
        for other in others:
            factor = self.decay(at - other.at)
            for name, value in other.counts.items():
                counts[name] = counts.get(name, 0.0) + value * factor
        state.at, state.counts, state.through = at, counts, through

    def row(self, state: CountState, as_of: float | None = None) -> dict[str, Any]:
        """Every field of the view, decayed to `as_of` (default: the state's time);
        the default where never counted."""
        factor = 1.0 if as_of is None else self.decay(as_of - state.at)
        default = self.spec.default
        return {
            name: state.counts[name] * factor if name in state.counts else default
            for name in self.fields
        }


def decayed(value: float, age_s: float, half_life_s: float) -> float:
    """A count `age_s` seconds later: an event counts half as much per half-life (the
    one rule of streaming counts, online and in training)."""
    return float(value * 0.5 ** (max(age_s, 0.0) / half_life_s))
