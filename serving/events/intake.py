"""Events in: `POST /v1/events` validates a batch and appends it to the event stream.

    redis_keys.events(namespace)            stream, one entry per accepted event
    redis_keys.event_seen(namespace, d)     an event id was accepted (expires)

An event is accepted (202) only once it is in the stream: the batch goes to Redis
in one Lua script, which appends each event whose id it has not seen within
`events.max_age_s` and skips the others (a repeated id changes nothing). A script
runs whole or not at all, so a batch is never half-written. Where Redis keeps an
append-only file (the embedded server does), the answer also waits for it to be
written to disk (`WAITAOF`), so an accepted event survives a crash of Redis too.
Redis down, or the file not written within `durable.AOF_WAIT_MS`, is a 503 with
Retry-After, and nothing is claimed as accepted (a retry of the same ids is safe).

What is stored is a `StoredEvent`: the pseudonymous user key, never the raw id.
The stream entry's id is the time Redis accepted the event (ms) and orders the
stream; the event's own `timestamp` is when it happened.

Late and out-of-order events: an event may be up to `events.max_age_s` old (the
idempotency window: an id older than that could no longer be recognised as a
repeat) and at most `events.max_future_s` ahead of the server's clock. Within
that, it is accepted whatever its order: streaming counts weigh it by its age
(features/streaming.py), and an outcome joins its decision while the decision is
kept (`events.decision_ttl_s`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rankgate.core import redis_keys
from rankgate.core.durable import NotDurable, on_disk_async
from rankgate.core.errors import RETRY_SOON, RankgateError
from rankgate.core.project import EventsConfig, ItemId
from rankgate.core.redis_server import AsyncRedisClient, register_async_script
from rankgate.governance.identity import request_key
from serving.contract.config import EventLimits
from serving.contract.parsing import BadRequest, problems_of
from serving.contract.schemas import ItemIdValue, RequestRules, UserId

EVENT_ID_CHARS = 128
REQUEST_ID_CHARS = 64


@dataclass(frozen=True)
class EventRules:
    """What an event batch may say: the request rules (user ids, items, regions), the
    project's declared event types and the serving config's event limits."""

    request: RequestRules
    types: EventsConfig
    limits: EventLimits


def _event_rules(info: ValidationInfo) -> EventRules:
    rules = (info.context or {}).get("event_rules")
    if not isinstance(rules, EventRules):
        raise TypeError("validate event batches with context={'event_rules': EventRules, ...}")
    return rules


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("printable characters only")
    return value


Printable = Annotated[str, AfterValidator(_printable)]


class Event(BaseModel):
    """One thing a person did (or was shown), as the application reports it."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    event_id: Printable = Field(min_length=1, max_length=EVENT_ID_CHARS)
    """The application's id of this event: an id seen before is not counted again."""
    type: str
    """A type declared in the project's rankgate.yaml (`events.types`)."""
    user_id: UserId | None = None
    """The person (signed in); only a pseudonymous key of it is stored. One of
    `user_id` and `anonymous_id` is needed; with both, the user id."""
    anonymous_id: UserId | None = None
    """A visitor's anonymous id: the event is the person's it is linked to (also
    when the link comes after the event: the consumer resolves it as it applies it)."""
    item_id: ItemIdValue
    """The catalogue item the event is about."""
    timestamp: datetime = Field(strict=False)
    """When it happened: ISO 8601 (UTC when no offset is given) or Unix seconds."""
    request_id: Printable | None = Field(None, min_length=1, max_length=REQUEST_ID_CHARS)
    """The ranking decision it answers (outcomes: impressions, clicks, conversions)."""
    region: str | None = None
    """Where the person is (a region of the policy): consent of opt-out regions then
    counts as the gate counts it; without it only a recorded grant lets the event
    become a feature."""
    fields: dict[str, str | float | int] = {}
    """The fields the event's type declares."""

    @field_validator("type")
    @classmethod
    def _declared(cls, value: str, info: ValidationInfo) -> str:
        types = _event_rules(info).types.types
        if value not in types:
            raise ValueError(f"undeclared event type (declared: {', '.join(sorted(types))})")
        return value

    @field_validator("timestamp")
    @classmethod
    def _recent(cls, value: datetime, info: ValidationInfo) -> datetime:
        limits = _event_rules(info).limits
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        delta = value.timestamp() - time.time()
        if delta > limits.max_future_s:
            raise ValueError(f"more than {limits.max_future_s:g} s in the future")
        if -delta > limits.max_age_s:
            raise ValueError(f"older than {limits.max_age_s:g} s (events.max_age_s)")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = _event_rules(info).request.regions
        if value is not None and value not in known:
            raise ValueError(f"unknown region (known: {', '.join(known)})")
        return value

    @field_validator("item_id")
    @classmethod
    def _known_item(cls, value: ItemId, info: ValidationInfo) -> ItemId:
        if value not in _event_rules(info).request.items:
            raise ValueError("not an item of the catalogue")
        return value

    @model_validator(mode="after")
    def _fields(self, info: ValidationInfo) -> Event:
        if self.user_id is None and self.anonymous_id is None:
            raise ValueError("user_id: field required (or anonymous_id)")
        declared = _event_rules(info).types.types[self.type].fields
        problems = []
        for name, spec in declared.items():
            value = self.fields.get(name)
            if value is None:
                if spec.required:
                    problems.append(f"{name!r} is required for {self.type} events")
            elif spec.type == "number" and isinstance(value, str | bool):
                problems.append(f"{name!r} must be a number")
            elif spec.type == "string" and not isinstance(value, str):
                problems.append(f"{name!r} must be a string")
        problems += [
            f"{name!r} is not a field of {self.type} events"
            for name in self.fields
            if name not in declared
        ]
        if problems:
            raise ValueError("fields: " + "; ".join(problems[:5]))
        return self


class EventBatch(BaseModel):
    """`POST /v1/events`: a batch of events."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    events: list[Event]
    """At most `events.max_batch` events."""

    @field_validator("events", mode="before")
    @classmethod
    def _size(cls, value: object, info: ValidationInfo) -> object:
        limit = _event_rules(info).limits.max_batch
        if isinstance(value, list) and not 1 <= len(value) <= limit:
            raise ValueError(f"between 1 and {limit} events")
        return value

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[Event]) -> list[Event]:
        ids = [event.event_id for event in value]
        if len(set(ids)) != len(ids):
            raise ValueError("an event_id appears twice in the batch")
        return value


class EventsAccepted(BaseModel):
    """The answer to an accepted batch (202): every event in it is durable."""

    accepted: int
    """Events appended to the stream."""
    duplicates: int
    """Events whose id was accepted before: not appended again."""
    stream_ids: list[str | None]
    """Per event of the batch, in order: the stream id it was stored under (its ms part
    is when it was accepted), or null for a duplicate."""


@dataclass(frozen=True)
class StoredEvent:
    """An event as the stream keeps it (no raw user id)."""

    event_id: str
    type: str
    user_key: str
    item_id: ItemId
    at: float
    """When it happened (Unix seconds)."""
    request_id: str | None = None
    region: str | None = None
    fields: Mapping[str, Any] | None = None
    stream_id: str | None = None
    """Set when read back from the stream."""
    person: str | None = None
    """The person key of `user_key`, when the consumer resolved it (never stored)."""

    @property
    def person_key(self) -> str:
        return self.person or self.user_key

    @classmethod
    def of(cls, event: Event) -> StoredEvent:
        return cls(
            event_id=event.event_id,
            type=event.type,
            user_key=request_key(event.user_id, event.anonymous_id),
            item_id=event.item_id,
            at=event.timestamp.timestamp(),
            request_id=event.request_id,
            region=event.region,
            fields=dict(event.fields) or None,
        )

    def stored(self) -> str:
        data: dict[str, Any] = {
            "id": self.event_id,
            "type": self.type,
            "user": self.user_key,
            "item": self.item_id,
            "at": self.at,
        }
        for name, value in (
            ("request", self.request_id),
            ("region", self.region),
            ("fields", self.fields),
        ):
            if value is not None:
                data[name] = value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def read(cls, stream_id: bytes | str, entry: Mapping[bytes, bytes]) -> StoredEvent:
        data = json.loads(entry[b"e"])
        return cls(
            event_id=data["id"],
            type=data["type"],
            user_key=data["user"],
            item_id=data["item"],
            at=data["at"],
            request_id=data.get("request"),
            region=data.get("region"),
            fields=data.get("fields"),
            stream_id=stream_id.decode() if isinstance(stream_id, bytes) else stream_id,
        )

    @property
    def accepted_at(self) -> float:
        """When the stream accepted it (Unix seconds), from the stream id."""
        assert self.stream_id is not None, "read back from the stream"
        return stream_time(self.stream_id)


def stream_time(stream_id: str) -> float:
    """The Unix time (s) of a stream id (`<ms>-<seq>`)."""
    return int(stream_id.split("-", 1)[0]) / 1000.0


def parse_events(body: bytes, rules: EventRules) -> list[Event]:
    try:
        batch = EventBatch.model_validate_json(
            body, context={"event_rules": rules, "rules": rules.request}
        )
    except ValidationError as exc:
        raise BadRequest(problems_of(exc)) from exc
    return batch.events


def event_digest(event_id: str) -> str:
    return hashlib.sha256(event_id.encode()).hexdigest()[:32]


# KEYS: the stream, then one "seen" key per event; ARGV: max stream length, the
# dedup window (s), then one stored event per seen key. Appends the events not
# seen before, returns each one's stream id (false for a repeat).
APPEND = """
local ids = {}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    ids[i - 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i + 1])
  else
    ids[i - 1] = false
  end
end
return ids
"""


class EventStoreUnavailable(RankgateError):
    """Redis could not take the batch: nothing of it was accepted."""

    status_code = 503
    error = "unavailable"
    headers = RETRY_SOON
    rejection = "events_unavailable"


class EventLog:
    """Appends event batches to the stream (the writer side; serving/events/consumer.py
    reads it)."""

    def __init__(self, client: AsyncRedisClient, namespace: str, limits: EventLimits) -> None:
        self.client = client
        self.namespace = namespace
        self.limits = limits
        self.stream = redis_keys.events(namespace)
        self.append_script = register_async_script(client, APPEND)
        self.wait_for_disk = True
        """False once Redis said it keeps no append-only file (nothing to wait for)."""

    async def append(self, events: Sequence[StoredEvent]) -> EventsAccepted:
        keys = [self.stream] + [
            redis_keys.event_seen(self.namespace, event_digest(e.event_id)) for e in events
        ]
        args: list[Any] = [self.limits.max_stream_len, int(self.limits.max_age_s)]
        args += [event.stored() for event in events]
        try:
            ids = await self.append_script(keys=keys, args=args)
            if self.wait_for_disk and any(ids):
                await self.on_disk()
        except (OSError, aioredis.RedisError) as exc:
            raise EventStoreUnavailable(
                f"the event stream cannot be written now ({type(exc).__name__}); retry"
            ) from exc
        stream_ids = [i.decode() if isinstance(i, bytes) else None for i in ids]
        # A Lua false is None here; pad in case Redis trims trailing nils from the table.
        stream_ids += [None] * (len(events) - len(stream_ids))
        accepted = sum(1 for i in stream_ids if i is not None)
        return EventsAccepted(
            accepted=accepted, duplicates=len(events) - accepted, stream_ids=stream_ids
        )

    async def on_disk(self) -> None:
        """Wait until Redis's append-only file holds the batch, fsynced
        (rankgate/core/durable.py); remembers a Redis that keeps no such file."""
        try:
            self.wait_for_disk = await on_disk_async(
                self.client, self.namespace, "the event batch", self.stream
            )
        except NotDurable as exc:
            raise EventStoreUnavailable(exc.message) from exc
