"""Outcomes joined to decisions: what people did with the answers they were given.

    redis_keys.decision(ns, request_id)           hash, written beside the audit record
    redis_keys.outcomes(ns, version, variant)     hash of counters (serving/observe/outcomes.py)
    redis_keys.outcomes_unjoined(ns)              hash: `<outcome>:<reason>` -> count

The project's rankgate.yaml names which event types are outcomes
(`events.outcomes`: impression, click, conversion). The event consumer hands
every batch it reads to `OutcomeJoiner.join`, which keeps the outcome events
that carry a `request_id`, looks their decisions up (one pipelined round trip),
finds the item's position in the answer (1-based) and then, per event, in one
Lua script: marks the event in the decision hash (`o:<digest of event_id>`,
holding what was joined), increments the counters of the decision's version and
variant (`impressions`, `clicks`, `conversions`, and per position
`impressions:<n>`, ...) and, the first time a decision gets an outcome, its
`decisions`. A script runs whole or not at all, and an event already marked
changes nothing, so a batch delivered again after a crash counts once.

On a Redis Cluster the decision and its counters are in different slots, which one
script cannot span: the decision is marked by a script of its own, then the
counters are incremented (`_count_on_cluster`). An event is still counted at most
once; a consumer that dies between the two steps leaves that batch's outcomes
uncounted (docs/cluster.md, "A Redis Cluster").

An outcome no decision takes is counted as unjoined, never an error:
`unknown_request` (no such decision, or it expired after
`events.decision_ttl_s`), `item_not_shown` (the item was not in the answer),
`other_user` (the decision answered someone else) or `no_request_id`. These
counters are diagnostics: a batch delivered again may count its unjoined
events twice (there is no decision to mark them in).

A decision the fallback answered (also a degraded one, whose items are the
fallback's) has version "" and variant `fallback`: its outcomes never count for
a model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from rankgate.core import redis_keys
from rankgate.core.project import Outcomes
from rankgate.core.redis_server import AsyncRedisClient, is_cluster, register_async_script
from rankgate.governance.identity import resolve_persons
from serving.events.intake import StoredEvent, event_digest, stream_time
from serving.observe.metrics import Metrics
from serving.observe.outcomes import COUNTERS, outcome_roles

MARKER_PREFIX = "o:"
LATE_DECISION_S = 60.0
"""How long an outcome waits for its decision. A decision is written beside its audit
record, after the answer, by a background writer that keeps records in memory while
Redis is away: an impression sent right after the answer can reach the consumer
first. Such an event stays pending in the stream and is joined again (every
`RETRY_WAITING_S`, serving/events/consumer.py) until its decision is there; past
this age it is counted `unknown_request`. An outcome of a decision that will never
come (a made-up or expired request id) stays pending that long: the waiting entries
are at most a minute's worth of such outcomes."""
DECISION_FIELDS = ("u", "v", "var", "items")
JOINED_FLAG = "joined"

# KEYS[1]: the decision hash; KEYS[2]: the counters of its version and variant.
# ARGV[1]: this event's marker field; ARGV[2]: what the decision records of it;
# ARGV[3..]: the counters to increment. The counters' `at` is the server's time of
# the latest outcome counted (retention: serving/observe/retention.py).
# Returns {status, impressions, clicks}: 1 joined, 0 joined before, -1 the decision
# expired since it was looked up (nothing is written: an outcome never outlives or
# revives a decision, which names a person).
JOIN_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return {0, 0, 0} end
for i = 3, #ARGV do redis.call('HINCRBY', KEYS[2], ARGV[i], 1) end
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'at', now[1] .. '.' .. string.format('%06d', now[2]))
if redis.call('HSETNX', KEYS[1], 'joined', '1') == 1 then
  redis.call('HINCRBY', KEYS[2], 'decisions', 1)
end
local counts = redis.call('HMGET', KEYS[2], 'impressions', 'clicks')
return {1, tonumber(counts[1]) or 0, tonumber(counts[2]) or 0}
"""

# On a Redis Cluster a decision and its counters live in different slots, which no
# script may span: the decision is marked first (this script, on the decision's
# slot), then the counters are incremented. KEYS[1]: the decision hash; ARGV[1], ARGV[2]
# as above. Returns {status, first}: status as above; first: 1 when this is the
# decision's first joined outcome.
MARK_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return {0, 0} end
return {1, redis.call('HSETNX', KEYS[1], 'joined', '1')}
"""
CLUSTER_SCRIPT_CONCURRENCY = 64
"""Marks in flight at once on a cluster (scripts cannot be pipelined there)."""


class Unjoined(StrEnum):
    """Why an outcome joined no decision."""

    NO_REQUEST_ID = "no_request_id"
    UNKNOWN_REQUEST = "unknown_request"
    """No decision of that id: never made here, or expired (events.decision_ttl_s)."""
    ITEM_NOT_SHOWN = "item_not_shown"
    OTHER_USER = "other_user"
    """The decision answered another person than the event names."""


@dataclass
class JoinCounts:
    """What one `join` did with a batch."""

    joined: int = 0
    """Outcome events counted for their decision."""
    duplicates: int = 0
    """Outcome events counted before (a batch delivered again)."""
    unjoined: Tally[str] = field(default_factory=Tally)
    """Outcome events no decision took, by reason."""
    ignored: int = 0
    """Events that are not outcomes."""
    waiting: list[str] = field(default_factory=list)
    """Stream ids of outcome events whose decision is not in Redis yet but may still
    come (`LATE_DECISION_S`): left unacknowledged, to be joined again."""


@dataclass(frozen=True)
class _Decision:
    user_key: str
    version: str
    variant: str
    positions: dict[str, int]
    """str(item id) -> 1-based position in the answer."""

    @classmethod
    def read(cls, raw: Sequence[bytes | None]) -> _Decision | None:
        user, version, variant, items = raw
        if user is None or variant is None or items is None:
            return None
        shown = json.loads(items)
        return cls(
            user.decode(),
            (version or b"").decode(),
            variant.decode(),
            {str(item): n for n, item in enumerate(shown, 1)},
        )


class OutcomeJoiner:
    """Joins outcome events to the decisions they answer and counts them."""

    def __init__(
        self,
        client: AsyncRedisClient,
        namespace: str,
        outcomes: Outcomes,
        metrics: Metrics,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.roles = outcome_roles(outcomes)
        self.script = register_async_script(client, JOIN_SCRIPT)
        self.mark_script = register_async_script(client, MARK_SCRIPT)
        self.cluster = is_cluster(client)
        self.joined_total = metrics.counter(
            "rankgate_outcomes_joined",
            "Outcome events joined to a decision, by its model version and variant, the "
            "outcome and the item's position in the answer",
            ["model_version", "variant", "outcome", "position"],
        )
        self.unjoined_total = metrics.counter(
            "rankgate_outcomes_unjoined",
            "Outcome events no decision took, by outcome and reason",
            ["outcome", "reason"],
        )
        self.ctr = metrics.gauge(
            "rankgate_ctr",
            "Click-through rate of a model version and variant: joined clicks / impressions",
            ["model_version", "variant"],
        )

    async def join(self, events: Sequence[StoredEvent]) -> JoinCounts:
        """Count the outcome events of a batch for their decisions (idempotent per
        event id). Redis errors propagate: the caller leaves the batch unacknowledged
        and it comes again."""
        counts = JoinCounts()
        outcomes = [event for event in events if event.type in self.roles]
        counts.ignored = len(events) - len(outcomes)
        unjoined: list[tuple[StoredEvent, Unjoined]] = []
        with_request = []
        for event in outcomes:
            if event.request_id is None:
                unjoined.append((event, Unjoined.NO_REQUEST_ID))
            else:
                with_request.append(event)
        decisions = await self._decisions({e.request_id for e in with_request if e.request_id})
        # A decision made for an id linked since belongs to the person now, as the event does.
        persons = await resolve_persons(
            self.client, self.namespace, [d.user_key for d in decisions.values() if d is not None]
        )
        joins: list[tuple[StoredEvent, _Decision, int]] = []
        for event in with_request:
            assert event.request_id is not None
            decision = decisions.get(event.request_id)
            position = decision.positions.get(str(event.item_id)) if decision else None
            if decision is None:
                if (
                    event.stream_id is not None
                    and time.time() - stream_time(event.stream_id) < LATE_DECISION_S
                ):
                    counts.waiting.append(event.stream_id)  # its decision may not be written yet
                else:
                    unjoined.append((event, Unjoined.UNKNOWN_REQUEST))
            elif (
                persons[decision.user_key] != event.person_key
                and decision.user_key != event.user_key
            ):
                unjoined.append((event, Unjoined.OTHER_USER))
            elif position is None:
                unjoined.append((event, Unjoined.ITEM_NOT_SHOWN))
            else:
                joins.append((event, decision, position))
        for (event, decision, position), result in zip(
            joins, await self._count(joins), strict=True
        ):
            status, impressions, clicks = (int(value) for value in result)
            if status == -1:
                unjoined.append((event, Unjoined.UNKNOWN_REQUEST))
                continue
            if status == 0:
                counts.duplicates += 1
                continue
            counts.joined += 1
            for role in self.roles[event.type]:
                self.joined_total.labels(
                    decision.version, decision.variant, role, str(position)
                ).inc()
            if impressions:
                self.ctr.labels(decision.version, decision.variant).set(clicks / impressions)
        await self._count_unjoined(unjoined)
        for _, reason in unjoined:
            counts.unjoined[reason] += 1
        return counts

    async def _decisions(self, request_ids: set[str]) -> dict[str, _Decision]:
        ids = sorted(request_ids)
        if not ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hmget(redis_keys.decision(self.namespace, request_id), list(DECISION_FIELDS))
            raw = await pipe.execute()
        found = {
            request_id: _Decision.read(fields) for request_id, fields in zip(ids, raw, strict=True)
        }
        return {request_id: d for request_id, d in found.items() if d is not None}

    async def _count(self, joins: list[tuple[StoredEvent, _Decision, int]]) -> list[Any]:
        if not joins:
            return []
        if self.cluster:
            return await self._count_on_cluster(joins)
        assert isinstance(self.client, aioredis.Redis)
        async with self.client.pipeline(transaction=False) as pipe:
            for event, decision, position in joins:
                assert event.request_id is not None
                counters = []
                for role in self.roles[event.type]:
                    counters += [COUNTERS[role], f"{COUNTERS[role]}:{position}"]
                recorded = {"type": event.type, "item": event.item_id, "position": position}
                await self.script(
                    keys=[
                        redis_keys.decision(self.namespace, event.request_id),
                        redis_keys.outcomes(self.namespace, decision.version, decision.variant),
                    ],
                    args=[
                        marker(event.event_id),
                        json.dumps({**recorded, "at": event.at}, separators=(",", ":")),
                        *counters,
                    ],
                    client=pipe,
                )
            return await pipe.execute()  # type: ignore[no-any-return]

    async def _count_on_cluster(self, joins: list[tuple[StoredEvent, _Decision, int]]) -> list[Any]:
        """As `_count`, in two steps: mark the decisions (scripts, run concurrently),
        then increment the counters of the newly marked ones (one pipeline). A
        consumer that dies between the two leaves those outcomes marked but not
        counted: the counts can fall short by a batch, never count an outcome twice."""
        limit = asyncio.Semaphore(CLUSTER_SCRIPT_CONCURRENCY)

        async def mark(event: StoredEvent, position: int) -> Any:
            assert event.request_id is not None
            recorded = {"type": event.type, "item": event.item_id, "position": position}
            async with limit:
                return await self.mark_script(
                    keys=[redis_keys.decision(self.namespace, event.request_id)],
                    args=[
                        marker(event.event_id),
                        json.dumps({**recorded, "at": event.at}, separators=(",", ":")),
                    ],
                )

        marks = await asyncio.gather(*(mark(e, p) for e, _, p in joins))
        counted = [
            (join, int(first))
            for join, (status, first) in zip(joins, marks, strict=True)
            if int(status) == 1
        ]
        totals: list[Any] = []
        if counted:
            async with self.client.pipeline(transaction=False) as pipe:
                for (event, decision, position), first in counted:
                    key = redis_keys.outcomes(self.namespace, decision.version, decision.variant)
                    for role in self.roles[event.type]:
                        pipe.hincrby(key, COUNTERS[role], 1)
                        pipe.hincrby(key, f"{COUNTERS[role]}:{position}", 1)
                    if first:
                        pipe.hincrby(key, "decisions", 1)
                    pipe.hset(key, "at", repr(time.time()))
                    pipe.hmget(key, ["impressions", "clicks"])
                replies = await pipe.execute()
            totals = [reply for reply in replies if isinstance(reply, list)]
        counts = iter(totals)
        results: list[Any] = []
        for status, _ in marks:
            if int(status) == 1:
                impressions, clicks = next(counts)
                results.append([1, int(impressions or 0), int(clicks or 0)])
            else:
                results.append([int(status), 0, 0])
        return results

    async def _count_unjoined(self, unjoined: list[tuple[StoredEvent, Unjoined]]) -> None:
        tally: Tally[tuple[str, str]] = Tally(
            (role, reason) for event, reason in unjoined for role in self.roles[event.type]
        )
        if not tally:
            return
        key = redis_keys.outcomes_unjoined(self.namespace)
        async with self.client.pipeline(transaction=False) as pipe:
            for (role, reason), n in tally.items():
                pipe.hincrby(key, f"{role}:{reason}", n)
            await pipe.execute()
        for (role, reason), n in tally.items():
            self.unjoined_total.labels(role, reason).inc(n)


def marker(event_id: str) -> str:
    """The decision hash's field that says this event was counted."""
    return MARKER_PREFIX + event_digest(event_id)
