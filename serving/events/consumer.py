"""The event consumer: turns the event stream into streaming features and outcomes.

A Ray Serve deployment of the application (`EventConsumer`), started with the
server and restarted by Ray when it dies. It reads the stream with a consumer
group (at-least-once): an entry is acknowledged only after its feature updates
were pushed to the online store and its outcome was joined, so an entry a dead
replica had read is delivered again, and both updates are idempotent.

One replica reads at a time: it holds a lease in Redis (`consumer_lease`,
`lease_s` long), renewed every `lease_s / 3` and at most every second, not on
every read (an idle consumer wakes twice a second). A replica that takes the
lease over first claims every entry its predecessor left pending, then reads its
own pending entries, then new ones, so each person's events are applied in
stream order.

Data minimization: an event becomes a streaming feature only when the person may
be personalized with that view for some purpose that permits it, by the gate's
own rule (with the event's region; without one, only a recorded grant counts).
The others are counted (`rankgate_streaming_events_unused_total`), not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import redis.asyncio as aioredis
from feast import FeatureStore
from feast.data_source import PushMode
from pydantic import Field, ValidationError
from ray import serve

from features.applied import of_feast
from features.streaming import CountState, StreamingCounts, row_time
from features.tables import load_catalogue
from rankgate.core import redis_keys
from rankgate.core.config_files import Strict, validation_message
from rankgate.core.errors import ConfigError
from rankgate.core.lease import LEASE
from rankgate.core.project import Project
from rankgate.core.redis_server import (
    SERVING_CONNECT_TIMEOUT_S,
    AsyncRedisClient,
    connect_async,
    is_cluster,
    register_async_script,
)
from rankgate.governance.consent import ConsentState, parse_state
from rankgate.governance.identity import LINK_FIELD, LinkEntry, resolve_persons
from rankgate.governance.policy import Policy, load_policy_set
from serving.events.intake import StoredEvent, stream_time
from serving.events.outcome_join import OutcomeJoiner
from serving.observe.metrics import ConsumerMetrics
from serving.observe.outcomes import project_outcomes
from serving.ranking.gate import ConsentGate
from serving.runtime import ReplicaRuntime

logger = logging.getLogger("ray.serve")
GROUP = "rankgate-consumer"
RETRY_WAITING_S = 2.0
"""How often outcomes waiting for their decision are joined again (outcome_join.LATE_DECISION_S)."""


class ConsumerConfig(Strict):
    """user_config of the EventConsumer deployment."""

    batch: int = Field(256, ge=1, le=10_000)
    """Stream entries read (and pushed) at a time."""
    block_ms: int = Field(500, ge=1, le=10_000)
    """How long a read waits for new entries (at most until the lease is due for
    renewal). A read returns as soon as entries arrive: this sets how often an idle
    consumer wakes, not how late an event is applied."""
    lease_s: float = Field(3.0, gt=0.5, le=60)
    """A replica that stops renewing its lease is replaced after this long."""


def view_purposes(policy: Policy, views: Sequence[str]) -> dict[str, list[str]]:
    """Each streaming view and the purposes that may read it."""
    return {
        view: [name for name, p in policy.purposes.items() if view in p.feature_views]
        for view in views
    }


def timestamp_field(view: Any) -> str:
    """The column of row times a push to `view` carries (its batch source's)."""
    source = view.batch_source
    if source is None or not source.timestamp_field:
        raise ConfigError(f"streaming view {view.name!r}: its source names no timestamp_field")
    return str(source.timestamp_field)


class StreamingUpdater:
    """Applies a batch of events to the streaming views and pushes the changed rows."""

    def __init__(
        self,
        client: AsyncRedisClient,
        namespace: str,
        store: FeatureStore,
        project: Project,
        views: Sequence[StreamingCounts],
        policy: Policy,
        metrics: ConsumerMetrics,
    ) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self.namespace = namespace
        self.store = store
        self.views = list(views)
        self.gate = ConsentGate(policy)
        self.purposes = view_purposes(policy, [v.view for v in self.views])
        self.join_key = project.spec.user.join_key
        self.metrics = metrics
        feast_views = {v.name: v for v in store.list_feature_views()}
        self.timestamp_field = {v.view: timestamp_field(feast_views[v.view]) for v in self.views}

    async def consent_of(self, keys: Sequence[str]) -> dict[str, dict[str, ConsentState]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(redis_keys.consent(self.namespace, key))
            rows = await pipe.execute()
        return {
            key: {name.decode(): parse_state(value) for name, value in row.items()}
            for key, row in zip(keys, rows, strict=True)
        }

    def permitted(self, view: str, consent: Mapping[str, ConsentState], region: str | None) -> bool:
        """May this person's events become features of `view`? As the gate decides."""
        for purpose in self.purposes[view]:
            state = consent.get(purpose, ConsentState.UNKNOWN)
            if region is None:
                if state is ConsentState.GRANTED:
                    return True
            elif self.gate.decide(purpose, region, state).personalize:
                return True
        return False

    async def apply(self, events: Sequence[StoredEvent]) -> int:
        """Apply and push; how many events changed a feature."""
        counted = [(v, e) for v in self.views for e in events if v.counts(e)]
        if not counted:
            return 0
        consent = await self.consent_of(sorted({e.person_key for _, e in counted}))
        touched: dict[tuple[str, str], list[StoredEvent]] = {}
        for view, event in counted:
            if view.field_of(event.item_id) is None:
                self.metrics.unused.labels(view.view, "unknown_item").inc()
            elif not self.permitted(view.view, consent[event.person_key], event.region):
                self.metrics.unused.labels(view.view, "not_permitted").inc()
            else:
                touched.setdefault((view.view, event.person_key), []).append(event)
        if not touched:
            return 0
        by_name = {v.view: v for v in self.views}
        keys = list(touched)
        async with self.client.pipeline(transaction=False) as pipe:
            for view_name, user in keys:
                pipe.hgetall(redis_keys.streaming_state(self.namespace, view_name, user))
            raw = await pipe.execute()
        states = {key: CountState.read(row) for key, row in zip(keys, raw, strict=True)}
        applied: Counter[str] = Counter()
        for key, batch in touched.items():
            new = by_name[key[0]].apply(states[key], batch)
            applied[key[0]] += new
            if len(batch) > new:
                self.metrics.unused.labels(key[0], "redelivered").inc(len(batch) - new)
        # State first (with its marker), then the rows: a crash in between pushes the
        # same rows again on redelivery, and the marker keeps the counts from doubling.
        # Each state carries its own marker, so on a cluster, where people's states
        # are in different slots (no transaction spans them), they are written apart.
        async with self.client.pipeline(transaction=not self.cluster) as pipe:
            for (view_name, user), state in states.items():
                pipe.hset(
                    redis_keys.streaming_state(self.namespace, view_name, user),
                    mapping=state.stored(),  # type: ignore[arg-type]
                )
            await pipe.execute()
        for view in self.views:
            rows = [(user, s) for (name, user), s in states.items() if name == view.view]
            if rows:
                await self.push(view, rows)
        pushed_at = time.time()
        for (view_name, _), batch in touched.items():
            for event in batch:
                self.metrics.event_to_feature.labels(view_name).observe(
                    max(pushed_at - event.accepted_at, 0.0)
                )
        for name, count in applied.items():
            self.metrics.applied.labels(name).inc(count)
        return sum(applied.values())

    async def merge(self, link: LinkEntry) -> int:
        """Add the streaming counts of the ids a link joined into the person's, where
        the person's consent lets the view have them (with the link's region, as an
        event's), and push the person's rows; the joined ids' states are deleted
        either way. How many views changed."""
        if not self.views:
            return 0
        ns, person = self.namespace, link.person
        consent = (await self.consent_of([person]))[person]
        names = [(v.view, key) for v in self.views for key in (person, *link.joined)]
        async with self.client.pipeline(transaction=False) as pipe:
            for view_name, key in names:
                pipe.hgetall(redis_keys.streaming_state(ns, view_name, key))
            raw = await pipe.execute()
        states = {name: CountState.read(row) for name, row in zip(names, raw, strict=True)}
        changed = []
        for view in self.views:
            mine = states[(view.view, person)]
            theirs = [states[(view.view, key)] for key in link.joined]
            theirs = [state for state in theirs if state.through is not None]
            if not theirs or mine.applied(link.stream_id):
                continue  # nothing to add, or added before (a redelivered link)
            if not self.permitted(view.view, consent, link.region):
                self.metrics.unused.labels(view.view, "not_permitted").inc(len(theirs))
                continue
            view.merge(mine, theirs, link.stream_id)
            changed.append(view)
        # The person's states first (marked through the link), then the joined ids'
        # are deleted: a crash in between leaves states nobody reads, never counts twice.
        async with self.client.pipeline(transaction=not self.cluster) as pipe:
            for view in changed:
                pipe.hset(
                    redis_keys.streaming_state(ns, view.view, person),
                    mapping=states[(view.view, person)].stored(),  # type: ignore[arg-type]
                )
            await pipe.execute()
        joined = [
            redis_keys.streaming_state(ns, v.view, k) for v in self.views for k in link.joined
        ]
        async with self.client.pipeline(transaction=False) as pipe:
            for name in joined:
                pipe.delete(name)
            await pipe.execute()
        for view in changed:
            await self.push(view, [(person, states[(view.view, person)])])
        return len(changed)

    async def push(self, view: StreamingCounts, rows: Sequence[tuple[str, CountState]]) -> None:
        frame = pd.DataFrame(
            [
                {
                    self.join_key: user,
                    self.timestamp_field[view.view]: row_time(state.through or "0-0"),
                    **view.row(state, as_of=row_time(state.through or "0-0").timestamp()),
                }
                for user, state in rows
            ]
        )
        await self.store.push_async(view.spec.push_source, frame, to=PushMode.ONLINE)
        self.metrics.rows.labels(view.view).inc(len(rows))


class EventReader:
    """The consumer-group side of the stream: lease, claim, read, acknowledge."""

    def __init__(self, client: AsyncRedisClient, namespace: str, name: str) -> None:
        self.client = client
        self.stream = redis_keys.events(namespace)
        self.lease_key = redis_keys.consumer_lease(namespace)
        self.name = name
        self.lease_script = register_async_script(client, LEASE)
        self.own_pending = True
        self.pending_from = "0"
        self.retry_at = float("inf")

    def reread_pending(self, after_s: float = 0.0) -> None:
        """Read own pending entries again (from the first), now or after `after_s`."""
        if after_s <= 0:
            self.own_pending, self.pending_from = True, "0"
        else:
            self.retry_at = min(self.retry_at, time.monotonic() + after_s)

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def hold_lease(self, lease_s: float) -> bool:
        return bool(
            await self.lease_script(keys=[self.lease_key], args=[self.name, int(lease_s * 1000)])
        )

    async def release(self) -> None:
        if (await self.client.get(self.lease_key)) == self.name.encode():
            await self.client.delete(self.lease_key)

    async def take_over(self) -> int:
        """Claim every entry other consumers left pending (they no longer hold the lease)."""
        claimed, start = 0, "0-0"
        while True:
            result = await self.client.xautoclaim(
                self.stream, GROUP, self.name, min_idle_time=0, start_id=start, count=1000
            )
            start, entries = result[0], result[1]
            claimed += len(entries)
            if start in (b"0-0", "0-0"):
                break
        self.reread_pending()
        return claimed

    async def read(self, count: int, block_ms: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Own pending entries first (delivered but not acknowledged), one pass over
        them, then new ones; entries left waiting are read again at `retry_at`."""
        if not self.own_pending and time.monotonic() >= self.retry_at:
            self.reread_pending()
            self.retry_at = float("inf")
        if self.own_pending:
            reply = await self.client.xreadgroup(
                GROUP, self.name, {self.stream: self.pending_from}, count=count
            )
            entries = reply[0][1] if reply else []
            if len(entries) < count:
                self.own_pending, self.pending_from = False, "0"
            else:
                last = entries[-1][0]
                self.pending_from = last.decode() if isinstance(last, bytes) else last
            if entries:
                return entries  # type: ignore[no-any-return]
        reply = await self.client.xreadgroup(
            GROUP, self.name, {self.stream: ">"}, count=count, block=block_ms
        )
        return reply[0][1] if reply else []  # type: ignore[no-any-return]

    async def ack(self, ids: Sequence[bytes]) -> None:
        if ids:
            await self.client.xack(self.stream, GROUP, *ids)


def parse_entries(
    entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], metrics: ConsumerMetrics
) -> list[StoredEvent | LinkEntry]:
    """The events and links of a batch, in stream order."""
    parsed: list[StoredEvent | LinkEntry] = []
    for stream_id, entry in entries:
        try:
            if LINK_FIELD in entry:
                parsed.append(LinkEntry.read(stream_id, entry))
            else:
                parsed.append(StoredEvent.read(stream_id, entry))
        except (KeyError, ValueError, TypeError):
            metrics.malformed.inc()  # acknowledged with the batch: it can never succeed
    return parsed


async def with_persons(
    client: AsyncRedisClient, namespace: str, parsed: Sequence[StoredEvent | LinkEntry]
) -> list[StoredEvent | LinkEntry]:
    """The batch with each event its id's person's, as the links stand now (a link
    accepted after an event still takes it: its person's counts and decisions)."""
    persons = await resolve_persons(
        client, namespace, [item.user_key for item in parsed if isinstance(item, StoredEvent)]
    )
    return [
        replace(item, person=persons[item.user_key]) if isinstance(item, StoredEvent) else item
        for item in parsed
    ]


# Deployment options (replicas, CPUs) are set in serve_config.yaml only; one replica.
@serve.deployment
class EventConsumer:
    """Reads the event stream into streaming features and outcomes (see the module)."""

    def __init__(self, carried: Mapping[str, str] | None = None) -> None:
        """`carried`: the project's files carried in the application's args (a cluster)."""
        runtime = ReplicaRuntime.open(carried)
        home, self.project, store = runtime.home, runtime.project, runtime.feast
        # Its own client: a read of the stream blocks longer than serving reads may.
        self.client = connect_async(
            runtime.redis_url, socket_connect_timeout=SERVING_CONNECT_TIMEOUT_S, socket_timeout=10.0
        )
        views = store.list_feature_views()
        catalogue = load_catalogue(
            self.project, of_feast(views), home.data_dir, runtime.files["catalogue"]
        )
        policies = load_policy_set(self.project.policies, catalogue, self.project.item_type)
        self.metrics = ConsumerMetrics()
        self.updater = StreamingUpdater(
            self.client,
            home.namespace,
            store,
            self.project,
            [StreamingCounts(spec, catalogue) for spec in self.project.spec.streaming],
            policies.policy,
            self.metrics,
        )
        outcomes = project_outcomes(self.project)
        self.joiner = (
            OutcomeJoiner(self.client, home.namespace, outcomes, self.metrics)
            if outcomes is not None
            else None
        )
        self.reader = EventReader(self.client, home.namespace, f"consumer-{uuid.uuid4().hex[:12]}")
        self.config = ConsumerConfig()
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        try:
            self.config = ConsumerConfig.model_validate(user_config or {})
        except ValidationError as exc:
            raise ConfigError(validation_message("EventConsumer user_config", exc)) from exc
        self.start()

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run())

    async def check_health(self) -> None:
        """Ray restarts the replica when this raises: a loop that died is a dead consumer."""
        if self.task is not None and self.task.done() and not self.stopping:
            error = self.task.exception() if not self.task.cancelled() else None
            raise RuntimeError(f"the event loop stopped: {error!r}")
        self.start()

    @property
    def renew_every_s(self) -> float:
        return min(1.0, self.config.lease_s / 3)

    async def run(self) -> None:
        backoff = 0.05
        leased = False
        renewed_at = -float("inf")
        while not self.stopping:
            try:
                now = time.monotonic()
                if not leased or now - renewed_at >= self.renew_every_s:
                    if not await self.reader.hold_lease(self.config.lease_s):
                        leased = False
                        await asyncio.sleep(self.renew_every_s)
                        continue
                    renewed_at = now
                if not leased:
                    await self.reader.ensure_group()
                    claimed = await self.reader.take_over()
                    leased = True
                    logger.info(
                        "event consumer %s took the lease (%d entries claimed)",
                        self.reader.name,
                        claimed,
                    )
                await self.step()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the entries stay pending: retried
                logger.warning("event consumer: %s: %s", type(exc).__name__, exc)
                self.metrics.failures.labels(type(exc).__name__).inc()
                self.reader.reread_pending()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def step(self) -> int:
        """One batch: read, apply, join, acknowledge; renews the lease as it goes."""
        block_ms = min(self.config.block_ms, round(self.renew_every_s * 1000))
        entries = await self.reader.read(self.config.batch, block_ms)
        if not entries:
            return 0
        parsed = parse_entries(entries, self.metrics)
        events: list[StoredEvent] = []
        segment: list[StoredEvent] = []
        for item in await with_persons(self.client, self.updater.namespace, parsed):
            if isinstance(item, LinkEntry):
                if segment:
                    await self.updater.apply(segment)
                    segment = []
                await self.updater.merge(item)
                continue
            self.metrics.read.labels(item.type).inc()
            events.append(item)
            segment.append(item)
        if segment:
            await self.updater.apply(segment)
        waiting: set[str] = set()
        if self.joiner is not None:
            waiting = set((await self.joiner.join(events)).waiting)
        # An outcome whose decision may still come stays pending: joined again later.
        await self.reader.ack([i for i, _ in entries if i.decode() not in waiting])
        if waiting:
            self.reader.reread_pending(RETRY_WAITING_S)
        newest = entries[-1][0].decode()
        self.metrics.lag.set(max(time.time() - stream_time(newest), 0.0))
        return len(entries)

    async def __del__(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        with contextlib.suppress(Exception):
            await self.reader.release()
