"""Events in: validation of batches, the idempotent append, and streaming counts.

The counting rule and the parser are plain code (milliseconds); the append runs
against the session's real embedded Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from features.streaming import CountState, StreamingCounts, decayed, row_time, through_of
from rankgate.core import redis_keys
from rankgate.core.home import Home
from rankgate.core.project import EventsConfig, StreamingView
from rankgate.core.pseudonym import user_key
from serving.contract.config import BudgetConfig, EventLimits, LimitsConfig
from serving.contract.parsing import BadRequest
from serving.contract.schemas import RequestRules
from serving.events.intake import EventLog, EventRules, StoredEvent, parse_events

TYPES = EventsConfig.model_validate(
    {
        "types": {
            "impression": {},
            "click": {},
            "purchase": {"fields": {"value": {"type": "number"}, "coupon": {"required": False}}},
        },
        "outcomes": {"impression": "impression", "click": "click", "conversion": "purchase"},
    }
)


def rules(
    item_type: str = "int", items: tuple[object, ...] = (1, 2, 3), **limits: float
) -> EventRules:
    request = RequestRules.of(
        LimitsConfig(),
        BudgetConfig(),
        ["onsite"],
        ["EU", "US"],
        items,
        item_type,  # type: ignore[arg-type]
    )
    return EventRules(request, TYPES, EventLimits(**limits))  # type: ignore[arg-type]


def event(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e-1",
        "type": "click",
        "user_id": "alice",
        "item_id": 2,
        "timestamp": time.time(),
    }
    return base | overrides


def body(*events: dict[str, object]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def problems(raw: bytes, event_rules: EventRules | None = None) -> dict[str, str]:
    with pytest.raises(BadRequest) as caught:
        parse_events(raw, event_rules or rules())
    return {p.field: p.problem for p in caught.value.problems}


# -- parsing -------------------------------------------------------------------


def test_a_valid_batch_parses_with_iso_and_unix_timestamps() -> None:
    parsed = parse_events(
        body(
            event(),
            event(
                event_id="e-2",
                type="purchase",
                timestamp="2026-11-23T10:00:00",
                fields={"value": 12.5},
            ),
        ),
        rules(max_age_s=10 * 365 * 86400),
    )
    assert [e.type for e in parsed] == ["click", "purchase"]
    assert parsed[1].timestamp.tzinfo is not None  # no offset given: UTC


def test_bad_events_name_their_field() -> None:
    found = problems(
        body(
            event(type="teleport"),
            event(event_id="e-2", item_id="2"),
            event(event_id="e-3", item_id=99),
            event(event_id="e-4", timestamp=time.time() + 3600),
            event(event_id="e-5", type="purchase"),
            event(event_id="e-6", user_id=""),
            event(event_id="e-7", region="Mars"),
            event(event_id="e-8", fields={"value": 3}),
        )
    )
    assert "undeclared event type" in found["events.0.type"]
    assert "valid integer" in found["events.1.item_id"]
    assert "catalogue" in found["events.2.item_id"]
    assert "future" in found["events.3.timestamp"]
    assert "'value' is required" in found["events.4"]
    assert "events.5.user_id" in found
    assert "unknown region" in found["events.6.region"]
    assert "not a field of click" in found["events.7"]


def test_missing_fields_too_old_and_wrong_field_types_are_refused() -> None:
    missing = dict(event())
    del missing["timestamp"]
    assert "events.0.timestamp" in problems(body(missing))
    assert (
        "older than"
        in problems(body(event(timestamp=time.time() - 3600)), rules(max_age_s=60))[
            "events.0.timestamp"
        ]
    )
    found = problems(body(event(type="purchase", fields={"value": "12"})))
    assert "must be a number" in found["events.0"]


def test_batch_limits_and_repeated_ids_in_one_batch() -> None:
    over = [event(event_id=f"e-{n}") for n in range(4)]
    assert "between 1 and 3 events" in problems(body(*over), rules(max_batch=3))["events"]
    assert "between 1 and" in problems(body())["events"]
    assert "appears twice" in problems(body(event(), event()))["events"]
    assert "body" in problems(b"{not json")


def test_string_catalogues_take_string_item_ids() -> None:
    string_rules = rules("string", ("sku-1", "sku-2"))
    assert parse_events(body(event(item_id="sku-2")), string_rules)[0].item_id == "sku-2"
    assert "valid string" in problems(body(event(item_id=2)), string_rules)["events.0.item_id"]


def test_the_stored_event_keeps_no_raw_user_id() -> None:
    parsed = parse_events(body(event(request_id="r-1", region="EU")), rules())[0]
    stored = StoredEvent.of(parsed)
    text = stored.stored()
    assert "alice" not in text and stored.user_key == user_key("alice")
    back = StoredEvent.read(b"1700000000000-3", {b"e": text.encode()})
    assert back == replace(stored, stream_id="1700000000000-3")
    assert back.accepted_at == 1_700_000_000.0


# -- streaming counts ----------------------------------------------------------


def counted(
    event_id: str, stream_id: str, at: float, item: int = 1, kind: str = "click"
) -> StoredEvent:
    return StoredEvent(event_id, kind, "k", item, at, stream_id=stream_id)


SPEC = StreamingView(
    view="recent", push_source="recent_push", events=["click"], field="c_{item_id}", half_life_s=100
)


def test_counts_decay_by_half_life_and_do_not_depend_on_arrival_order() -> None:
    counts = StreamingCounts(SPEC, [1, 2])
    events = [
        counted("a", "1-0", 1000.0),
        counted("b", "2-0", 1100.0, item=2),
        counted("c", "3-0", 1050.0),
    ]
    in_order, shuffled = CountState(), CountState()
    assert counts.apply(in_order, events) == 3
    # The same events, arriving in another order (stream ids say which came first).
    late_first = [
        replace(events[2], stream_id="1-0"),
        replace(events[0], stream_id="2-0"),
        replace(events[1], stream_id="3-0"),
    ]
    counts.apply(shuffled, late_first)
    expected_item1 = 0.5 ** (100 / 100) + 0.5 ** (50 / 100)
    assert in_order.counts["c_1"] == pytest.approx(expected_item1)
    assert shuffled.counts["c_1"] == pytest.approx(expected_item1)
    assert in_order.counts["c_2"] == pytest.approx(1.0)
    assert in_order.at == 1100.0 and in_order.through == "3-0"
    assert counts.row(in_order) == {"c_1": pytest.approx(expected_item1), "c_2": 1.0}


def test_a_redelivered_event_changes_nothing_and_other_types_and_items_are_ignored() -> None:
    counts = StreamingCounts(SPEC, [1])
    state = CountState()
    counts.apply(state, [counted("a", "5-0", 10.0)])
    again = CountState.read({k.encode(): v.encode() for k, v in state.stored().items()})
    assert counts.apply(again, [counted("a", "5-0", 10.0)]) == 0
    assert again.counts == {"c_1": 1.0}
    assert counts.field_of(7) is None and not counts.counts(
        counted("x", "6-0", 10.0, kind="impression")
    )


def test_rows_are_decayed_to_their_time_and_readers_decay_them_on() -> None:
    counts = StreamingCounts(SPEC, [1, 2])
    state = CountState()
    counts.apply(state, [counted("a", "1-0", 1000.0)])
    assert counts.row(state, as_of=1100.0) == {"c_1": pytest.approx(0.5), "c_2": 0.0}
    assert decayed(0.5, 100.0, SPEC.half_life_s) == pytest.approx(0.25)


def test_a_total_count_has_one_field() -> None:
    spec = StreamingView(
        view="v", push_source="p", events=["click"], per="total", field="clicks", half_life_s=10
    )
    counts = StreamingCounts(spec, [1, 2])
    state = CountState()
    counts.apply(state, [counted("a", "1-0", 0.0, item=1), counted("b", "2-0", 0.0, item=2)])
    assert counts.row(state) == {"clicks": 2.0}


def test_row_time_encodes_the_stream_id_to_the_millisecond() -> None:
    stamp = row_time("1763900000123-7")
    assert through_of(stamp) == pytest.approx(1763900000.123)
    assert row_time("1763900000123-8") > stamp


# -- the append, on the real embedded Redis -------------------------------------


def test_append_is_idempotent_and_durable(session_home: Home) -> None:
    from rankgate.core.redis_server import resolve_redis_url

    async def scenario() -> None:
        client = aioredis.Redis.from_url(resolve_redis_url())
        namespace = f"{session_home.namespace}-events-test"
        log = EventLog(client, namespace, EventLimits())
        first = parse_events(body(event(), event(event_id="e-2", item_id=3)), rules())
        stored = [StoredEvent.of(e) for e in first]
        accepted = await log.append(stored)
        assert accepted.accepted == 2 and accepted.duplicates == 0
        assert all(accepted.stream_ids)
        again = await log.append([stored[1], replace(stored[0], event_id="e-3")])
        assert (again.accepted, again.duplicates) == (1, 1)
        assert again.stream_ids[0] is None
        entries = await client.xrange(redis_keys.events(namespace))
        assert [StoredEvent.read(i, e).event_id for i, e in entries] == ["e-1", "e-2", "e-3"]
        # The embedded server keeps an append-only file: the answer waited for it.
        assert log.wait_for_disk
        keys = [k async for k in client.scan_iter(f"{namespace}:*")]
        await client.delete(*keys)
        await client.aclose()

    asyncio.run(scenario())
