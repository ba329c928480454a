"""`rankgate events replay --since T`: rebuild the streaming features from the stream.

Every streaming view is recomputed from the events the stream holds since T,
with the consumer's own code (serving/events/consumer.py `StreamingUpdater`, so consent
filters them the same way): all counts are dropped, the events since T are
applied in stream order, and the rows are pushed again. People whose counts were
dropped and who have no event since T get their default row.

The running consumer steps aside meanwhile: the replay takes over its lease, waits
one lease period for a batch in flight to finish, and replays up to the last entry
the consumer group was given. It gives the lease back at the end; the consumer
then goes on after that entry (entries it had read but not acknowledged are
delivered again and find them applied already).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from feast import FeatureStore

from features.streaming import CountState, StreamingCounts, stream_order
from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError, RankgateError
from rankgate.core.project import ItemId, Project
from rankgate.core.redis_server import AsyncRedisClient
from rankgate.governance.policy import Policy
from serving.events.consumer import GROUP, StreamingUpdater, parse_entries, with_persons
from serving.events.intake import StoredEvent
from serving.observe.metrics import ConsumerMetrics

Say = Callable[[str], None]
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CHUNK = 1000


def since_stream_id(since: str, now: float | None = None) -> str:
    """A stream id from `--since`: a duration back from now (`90s`, `30m`, `2h`, `7d`),
    an ISO 8601 time (UTC without an offset), a stream id, or `0` (all retained)."""
    text = since.strip()
    if text == "0":
        return "0-0"
    if re.fullmatch(r"\d+-\d+", text):
        return text
    duration = DURATION.fullmatch(text)
    if duration:
        seconds = float(duration.group(1)) * UNITS[duration.group(2)]
        return f"{int(((now or time.time()) - seconds) * 1000)}-0"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--since {since!r}: give a duration (30m, 2h, 7d), an ISO 8601 time, a stream id or 0"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{int(moment.timestamp() * 1000)}-0"


@dataclass
class ReplayReport:
    events: int = 0
    applied: int = 0
    people_reset: int = 0
    rows_defaulted: int = 0


async def replay_streaming(
    client: AsyncRedisClient,
    namespace: str,
    store: FeatureStore,
    project: Project,
    policy: Policy,
    catalogue: list[ItemId],
    since: str,
    lease_s: float,
    say: Say,
) -> ReplayReport:
    if not project.spec.streaming:
        raise RankgateError(f"{project.file}: the project declares no streaming views")
    start = since_stream_id(since)
    views = [StreamingCounts(spec, catalogue) for spec in project.spec.streaming]
    updater = StreamingUpdater(client, namespace, store, project, views, policy, ConsumerMetrics())
    lease = redis_keys.consumer_lease(namespace)
    name = f"replay-{int(time.time())}"
    await client.set(lease, name, px=3600 * 1000)
    say(f"• paused the event consumer (lease taken); waiting {lease_s:g} s for its batch in flight")
    await asyncio.sleep(lease_s)
    report = ReplayReport()
    try:
        stream = redis_keys.events(namespace)
        end = await last_delivered(client, stream)
        # Drop every count, remembering whose, then apply the events since `start`.
        people: dict[str, set[str]] = {view.view: set() for view in views}
        for view in views:
            pattern = redis_keys.streaming_state(namespace, view.view, "*")
            async for key in client.scan_iter(match=pattern, count=1000):
                people[view.view].add(redis_keys.person_of(key.decode()))
                await client.delete(key)
        report.people_reset = len(set().union(*people.values()))
        cursor = start
        first = True
        while end is not None:
            low = cursor if first else "(" + cursor
            entries = await client.xrange(stream, min=low, max=end, count=CHUNK)
            first = False
            if not entries:
                break
            # Every event counts for its person as linked now: the links need no replay.
            parsed = await with_persons(client, namespace, parse_entries(entries, updater.metrics))
            events = [item for item in parsed if isinstance(item, StoredEvent)]
            report.events += len(events)
            report.applied += await updater.apply(events)
            cursor = entries[-1][0].decode()
            if stream_order(cursor) >= stream_order(end):
                break
        # People with counts before and no event since `start`: their default row.
        for view in views:
            stale = [
                user
                for user in people[view.view]
                if not await client.exists(redis_keys.streaming_state(namespace, view.view, user))
            ]
            if stale:
                await updater.push(view, [(user, CountState()) for user in stale])
                report.rows_defaulted += len(stale)
    finally:
        if (await client.get(lease)) == name.encode():
            await client.delete(lease)
        say("• resumed the event consumer (lease given back)")
    return report


async def last_delivered(client: AsyncRedisClient, stream: str) -> str | None:
    """The last entry the consumer group was given (the stream's last without a group)."""
    if not await client.exists(stream):
        return None
    for group in await client.xinfo_groups(stream):
        if group["name"] in (GROUP, GROUP.encode()):
            delivered = group["last-delivered-id"]
            return delivered.decode() if isinstance(delivered, bytes) else str(delivered)
    info = await client.xinfo_stream(stream)
    last = info["last-generated-id"]
    return last.decode() if isinstance(last, bytes) else str(last)
