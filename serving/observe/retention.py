"""Retention by time: the job that removes records older than the policy allows.

The policy's `retention` (rankgate/governance/retention.py) says how long each kind
of record lives. Each serving replica runs `RetentionJob` as a background task of
its event loop; only the replica holding the lease runs a round:

    redis_keys.retention_lease(ns)         SET NX PX: the replica that runs the rounds
    redis_keys.retention_cursor(ns, kind)  how far the audit stream has been checked
                                           for sampled explanations

so one round runs per `retention.interval_s` whatever the number of replicas and
nodes, with nothing for the operator to schedule. The lease is short (LEASE_S):
its holder renews it every HEARTBEAT_S between rounds and between batches, and
gives it up when it closes; when a holder dies, another replica takes over within
LEASE_S, whatever the interval (a replica killed holding a lease of hours would stop
retention for hours). A new config or policy starts a round at once.

Each kind is removed in bounded batches, with a pause (`retention.pause_s`) between
two Redis calls, so that no call holds the server for long and serving's calls
and the event loop go first:

- streams (decision audit, events): `XTRIM MINID ~ <cutoff> LIMIT <n>` until it
  removes nothing (whole stream nodes; n starts at `batch` and halves while a call
  takes over 2 ms, for streams of large entries), then one exact `XTRIM MINID`, which
  removes what is left before the cutoff in the first node (at most a node's
  entries). An entry's time is its stream id's, the server's clock when it was
  written (an audit record is written milliseconds after its decision: never
  removed early).
- sampled explanations, kept inside audit records: the records from the cursor to
  the cutoff are read (`XRANGE`, `batch / 20` at a time: records are kilobytes),
  those carrying a sampled explanation are deleted (`XDEL`), the cursor moves on.
- keyed records (decision index, outcome counters, consent imports, drift figures):
  `SCAN` (1,000 slots a call); a script takes 50 keys at a time, compares each
  key's time field with the cutoff and removes it when older, in one step (a
  counter that counts an outcome meanwhile is never removed with it).
- the drift history (one capped stream per version, `rankgate model report`'s): each
  stream found by `SCAN` is trimmed as a stream is, under `drift_windows`.

Each round measures: records removed per kind (a counter), the age of each kind's
oldest record (a gauge; for keyed kinds only when a limit is stated, since it
takes a whole SCAN), failures per kind (a counter, logged, and handed to every
function in `RetentionJob.on_failure`: notifications hook in there). A failing kind
never stops the others, nor serving; the next round tries again.

The count caps of the serving config (`audit.max_records`, `events.max_stream_len`)
stay: retention only ever removes more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rankgate.core import redis_keys
from rankgate.core.lease import Lease
from rankgate.core.redis_server import AsyncRedisClient, is_cluster, register_async_script
from rankgate.governance.notifications import publish_async
from rankgate.governance.retention import KINDS, RecordKind, RetentionRules
from serving.contract.config import RetentionJobConfig
from serving.observe.metrics import ServingMetrics

logger = logging.getLogger("ray.serve")

STREAM_KINDS: dict[RecordKind, Callable[[str], str]] = {
    "decision_audit": redis_keys.audit,
    "events": redis_keys.events,
}


@dataclass(frozen=True)
class KeyedKind:
    """Records kept one per key, each with its time in a hash field."""

    pattern: Callable[[str], str]
    """Namespace (glob-escaped) -> the SCAN pattern of the kind's keys."""
    field: str
    iso: bool = False
    """The field holds ISO 8601 UTC text (which orders as text), else Unix seconds."""


KEYED_KINDS: dict[RecordKind, KeyedKind] = {
    "outcomes": KeyedKind(lambda ns: redis_keys.outcomes(ns, "*", "*"), "at"),
    "decision_index": KeyedKind(lambda ns: redis_keys.decision(ns, "*"), "at"),
    "consent_history": KeyedKind(
        lambda ns: redis_keys.consent_import(ns, "*"), "finished_at", iso=True
    ),
    "drift_windows": KeyedKind(lambda ns: redis_keys.drift(ns, "*"), "at"),
}
STREAM_SETS: dict[RecordKind, Callable[[str], str]] = {
    # The drift history `rankgate model report` draws: one capped stream per version.
    "drift_windows": lambda ns: redis_keys.drift_history(ns, "*"),
}
"""Kinds kept (also) as entries of several streams, found by SCAN: namespace
(glob-escaped) -> the pattern of their keys."""
SAMPLED: RecordKind = "sampled_explanations"
RECORD_BYTES = 20
"""Audit records are kilobytes: a read of them takes `batch / RECORD_BYTES` at a time."""
CALL_TARGET_S = 0.002
"""What one trimming call should take at most (measured by the client, so an upper
bound of the server's time)."""
MIN_TRIM = 200
"""The fewest entries a trimming call may remove: more than a stream node holds
(`stream-node-max-entries`, 100 by default), or it would remove nothing."""
SCAN_COUNT = 1000
"""Slots one SCAN call looks at, at most."""
KEYS_PER_CALL = 50
"""Keyed records one script call examines (a few microseconds each)."""
CLUSTER_SCRIPT_CONCURRENCY = 64
"""Scripts in flight at once on a Redis Cluster (scripts cannot be pipelined there)."""
PROBE_RECORDS = 10_000
"""How far past the cursor the oldest sampled explanation is looked for (report)."""

# KEYS: records' hashes; ARGV: their time field, the cutoff ("": only measure), "iso"
# or "n". A hash whose time is before the cutoff is removed, in the same step as the
# check. Returns {removed, the oldest time left or ""}: a hash without the field
# (written before it existed, or an import that has not finished) is kept.
DROP_IF_OLDER = """
local field, cutoff, iso = ARGV[1], ARGV[2], ARGV[3] == 'iso'
local removed, oldest, oldest_t = 0, '', nil
for _, key in ipairs(KEYS) do
  local at = redis.call('HGET', key, field)
  local t = at and (iso and at or tonumber(at))
  if t then
    if cutoff ~= '' and ((iso and t < cutoff) or (not iso and t < tonumber(cutoff))) then
      redis.call('UNLINK', key)
      removed = removed + 1
    elseif oldest_t == nil or t < oldest_t then
      oldest_t, oldest = t, at
    end
  end
end
return {removed, oldest}
"""


@dataclass
class KindResult:
    """One kind in one round."""

    kind: RecordKind
    limit_s: float | None
    removed: int = 0
    oldest_at: float | None = None
    """Unix time of the oldest record left (None: none, or not measured)."""
    error: str | None = None


@dataclass(frozen=True)
class RetentionFailure:
    """What a failed round of a kind reports (to the log, the metrics and the hooks)."""

    kind: str
    """A record kind, or `lease` when the job could not reach Redis for its lease."""
    error: str
    namespace: str
    at: float


def stream_ms(stream_id: bytes | str) -> int:
    raw = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(raw.split("-", 1)[0])


def parse_time(raw: bytes | str, iso: bool) -> float | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp() if iso else float(text)
    except ValueError:
        return None


def cutoff_arg(cutoff: float, iso: bool) -> str:
    return datetime.fromtimestamp(cutoff, UTC).isoformat() if iso else repr(cutoff)


class Trimmer:
    """The removal (and measuring) of each kind on one Redis; the job and
    `rankgate privacy retention` share it."""

    def __init__(
        self, client: AsyncRedisClient, namespace: str, batch: int = 2000, pause_s: float = 0.0
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.pattern_ns = redis_keys.glob_escape(namespace)
        self.batch = batch
        self.pause_s = pause_s
        self.drop_script = register_async_script(client, DROP_IF_OLDER)
        self.cluster = is_cluster(client)
        self.between: Callable[[], Any] | None = None
        """Called between two batches (the job renews its lease there)."""
        self.calls = 0
        self.slowest_call_s = 0.0
        """The longest single Redis call or pipeline of the last runs (measuring)."""

    async def _call(self, awaitable: Any) -> Any:
        started = time.perf_counter()
        result = await awaitable
        self.calls += 1
        self.slowest_call_s = max(self.slowest_call_s, time.perf_counter() - started)
        return result

    async def _pause(self) -> None:
        await asyncio.sleep(self.pause_s)
        if self.between is not None:
            await self.between()

    # -- streams ------------------------------------------------------------------

    async def trim_stream(self, key: str, cutoff: float) -> int:
        """Entries of stream `key` written before `cutoff` (Unix s) removed."""
        minid = f"{int(cutoff * 1000)}-0"
        removed = 0
        # Entries per call adapt to their size: a call that took long removes half as
        # many next time (audit records are kilobytes, events a hundred bytes).
        limit = self.batch
        while True:
            started = time.perf_counter()
            n = int(
                await self._call(self.client.xtrim(key, minid=minid, approximate=True, limit=limit))
            )
            took = time.perf_counter() - started
            removed += n
            if n == 0:
                break
            if took > CALL_TARGET_S:
                limit = max(limit // 2, MIN_TRIM)
            elif took < CALL_TARGET_S / 4:
                limit = min(limit * 2, self.batch)
            await self._pause()
        # What is left before the cutoff shares the first node with younger entries.
        removed += int(await self._call(self.client.xtrim(key, minid=minid, approximate=False)))
        return removed

    async def stream_oldest(self, key: str) -> float | None:
        first = await self._call(self.client.xrange(key, "-", "+", count=1))
        return stream_ms(first[0][0]) / 1000 if first else None

    async def trim_streams(self, pattern: str, cutoff: float | None) -> tuple[int, float | None]:
        """(removed, oldest entry left) over every stream matching `pattern` (a few:
        one per model version); `cutoff` None: only measured."""
        removed, oldest = 0, None
        async for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT, _type="stream"):
            if cutoff is not None:
                removed += await self.trim_stream(key, cutoff)
            oldest = min_time(oldest, await self.stream_oldest(key))
            await self._pause()
        return removed, oldest

    # -- sampled explanations (inside audit records) -------------------------------

    async def drop_sampled(self, cutoff: float) -> int:
        """Audit records carrying a sampled explanation, written before `cutoff`, deleted."""
        key = redis_keys.audit(self.namespace)
        cursor_key = redis_keys.retention_cursor(self.namespace, SAMPLED)
        raw = await self._call(self.client.get(cursor_key))
        start = "(" + raw.decode() if raw else "-"
        end = f"({int(cutoff * 1000)}-0"
        count = max(self.batch // RECORD_BYTES, 10)
        removed = 0
        while True:
            entries = await self._call(self.client.xrange(key, start, end, count=count))
            if not entries:
                break
            doomed = [stream_id for stream_id, fields in entries if sampled(fields)]
            if doomed:
                removed += int(await self._call(self.client.xdel(key, *doomed)))
            last = entries[-1][0]
            await self._call(self.client.set(cursor_key, last))
            start = "(" + last.decode()
            if len(entries) < count:
                break
            await self._pause()
        return removed

    async def sampled_oldest(self) -> float | None:
        """The oldest audit record with a sampled explanation at or after the cursor
        (looked for among the first PROBE_RECORDS; None: none there)."""
        key = redis_keys.audit(self.namespace)
        raw = await self._call(
            self.client.get(redis_keys.retention_cursor(self.namespace, SAMPLED))
        )
        start = "(" + raw.decode() if raw else "-"
        count = max(self.batch // RECORD_BYTES, 10)
        for _ in range(PROBE_RECORDS // count):
            entries = await self._call(self.client.xrange(key, start, "+", count=count))
            for stream_id, fields in entries:
                if sampled(fields):
                    return stream_ms(stream_id) / 1000
            if len(entries) < count:
                return None
            start = "(" + entries[-1][0].decode()
            await self._pause()
        return None

    # -- keyed records --------------------------------------------------------------

    async def scan_keyed(self, kind: KeyedKind, cutoff: float | None) -> tuple[int, float | None]:
        """(removed, oldest time left) of the kind's keys; `cutoff` None: only measured."""
        pattern = kind.pattern(self.pattern_ns)
        removed, oldest = 0, None
        keys: list[Any] = []
        async for key in self.client.scan_iter(match=pattern, count=min(self.batch, SCAN_COUNT)):
            keys.append(key)
            if len(keys) >= KEYS_PER_CALL:
                r, o = await self._examine(kind, keys, cutoff)
                removed, oldest = removed + r, min_time(oldest, o)
                keys = []
                await self._pause()
        if keys:
            r, o = await self._examine(kind, keys, cutoff)
            removed, oldest = removed + r, min_time(oldest, o)
        return removed, oldest

    async def _examine(
        self, kind: KeyedKind, keys: list[Any], cutoff: float | None
    ) -> tuple[int, float | None]:
        args = [kind.field, "" if cutoff is None else cutoff_arg(cutoff, kind.iso)]
        args.append("iso" if kind.iso else "n")
        if self.cluster:
            # A cluster runs a script on keys of one slot, not in a pipeline: a key a
            # call, a few calls at a time.
            limit = asyncio.Semaphore(CLUSTER_SCRIPT_CONCURRENCY)

            async def drop(key: Any) -> Any:
                async with limit:
                    return await self.drop_script(keys=[key], args=args)

            replies = await self._call(asyncio.gather(*(drop(key) for key in keys)))
        else:
            # One call for the batch: the replica's event loop encodes and parses one
            # command, not one per key.
            replies = [await self._call(self.drop_script(keys=keys, args=args))]
        removed, oldest = 0, None
        for gone, at in replies:
            removed += int(gone)
            oldest = min_time(oldest, parse_time(at, kind.iso))
        return removed, oldest

    # -- one kind -----------------------------------------------------------------

    async def enforce(self, kind: RecordKind, limit_s: float | None, now: float) -> KindResult:
        """Remove the kind's records older than `limit_s` (None: only measure, where
        measuring is cheap) and measure its oldest record."""
        result = KindResult(kind, limit_s)
        cutoff = None if limit_s is None else now - limit_s
        if kind in STREAM_KINDS:
            key = STREAM_KINDS[kind](self.namespace)
            if cutoff is not None:
                result.removed = await self.trim_stream(key, cutoff)
            result.oldest_at = await self.stream_oldest(key)
        elif kind == SAMPLED:
            if cutoff is not None:
                result.removed = await self.drop_sampled(cutoff)
            result.oldest_at = await self.sampled_oldest()
        elif cutoff is not None:
            result.removed, result.oldest_at = await self.scan_keyed(KEYED_KINDS[kind], cutoff)
        if kind in STREAM_SETS and cutoff is not None:
            removed, oldest = await self.trim_streams(STREAM_SETS[kind](self.pattern_ns), cutoff)
            result.removed += removed
            result.oldest_at = min_time(result.oldest_at, oldest)
        return result

    async def measure(self, kind: RecordKind) -> float | None:
        """The oldest record of a kind, whatever it costs (a SCAN for keyed kinds)."""
        if kind in KEYED_KINDS:
            oldest = (await self.scan_keyed(KEYED_KINDS[kind], None))[1]
            if kind in STREAM_SETS:
                streams = await self.trim_streams(STREAM_SETS[kind](self.pattern_ns), None)
                oldest = min_time(oldest, streams[1])
            return oldest
        return (await self.enforce(kind, None, time.time())).oldest_at


def sampled(fields: dict[bytes, bytes] | None) -> bool:
    """Whether an audit entry's record carries a sampled explanation."""
    raw = (fields or {}).get(b"record", b"")
    if b'"sampled"' not in raw:
        return False
    try:
        note = json.loads(raw).get("explained") or {}
    except ValueError:
        return False
    return bool(note.get("kind") == "sampled" and note.get("status") == "explained")


def min_time(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


LEASE_S = 30.0
"""How long the lease outlives its holder's last renewal."""
HEARTBEAT_S = 10.0
"""How often every replica wakes: the holder renews the lease, the others try to take it."""


class RetentionJob:
    """Runs the policy's retention every interval on the replica that holds the lease."""

    def __init__(
        self, client: AsyncRedisClient, namespace: str, metrics: ServingMetrics | None = None
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.metrics = metrics
        self.name = f"replica-{uuid.uuid4().hex[:12]}"
        self.lease_key = redis_keys.retention_lease(namespace)
        self.lease = Lease(client, self.lease_key, self.name)
        self.on_failure: list[Callable[[RetentionFailure], None]] = [self.notify]
        """Called with each failure (after it is logged and counted), on the event
        loop; the first sends it to the webhooks that take retention failures. A hook
        must return at once (queue what it sends); one that raises is logged and skipped."""
        self.sending: set[asyncio.Task[bool]] = set()
        self.task: asyncio.Task[None] | None = None
        self.wakeup = asyncio.Event()
        self.reported: set[str] = set()
        """Kinds whose oldest-age gauge this replica set (removed when another runs)."""
        self.last: dict[RecordKind, KindResult] = {}

    # -- the background task ---------------------------------------------------------

    def keep_running(
        self, rules: Callable[[], RetentionRules], config: Callable[[], RetentionJobConfig]
    ) -> None:
        """Run from now on, with the policy and config current at each round."""
        if self.task is None or self.task.done():
            self.wakeup = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._forever(rules, config))
        else:
            # A new config or policy: a round now, then at the (maybe new) interval.
            self.wakeup.set()

    async def _forever(
        self, rules: Callable[[], RetentionRules], config: Callable[[], RetentionJobConfig]
    ) -> None:
        last_round = float("-inf")  # monotonic time of this replica's latest round
        while True:
            settings = config()
            if settings.enabled:
                try:
                    if await self.take_lease():
                        due = time.monotonic() - last_round >= settings.interval_s
                        if due or self.wakeup.is_set():
                            last_round = time.monotonic()
                            await self.run(rules(), settings)
                    else:
                        self._stop_reporting()
                        last_round = float("-inf")  # taking over, it runs a round at once
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    self.failed("lease", exc)
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), min(settings.interval_s, HEARTBEAT_S))

    async def close(self) -> None:
        """Stop, and give the lease up if held: another replica takes it at its next
        heartbeat instead of when it expires."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(Exception):
            await self.lease.release()

    async def take_lease(self) -> bool:
        """The right to run rounds: taken when free (`SET NX PX`), renewed by its holder
        at every heartbeat, for LEASE_S, so one replica keeps running the job and
        another takes over within LEASE_S of its end."""
        return await self.lease.hold(LEASE_S)

    # -- one round -----------------------------------------------------------------

    async def run(
        self,
        rules: RetentionRules,
        settings: RetentionJobConfig | None = None,
        now: float | None = None,
        kinds: Iterable[RecordKind] = KINDS,
    ) -> dict[RecordKind, KindResult]:
        """One round over `kinds` (every kind by default) as of `now`; measured, each
        kind's failure reported and the others done all the same."""
        settings = settings or RetentionJobConfig()
        trimmer = Trimmer(self.client, self.namespace, settings.batch, settings.pause_s)

        async def renew() -> None:
            await self.lease.hold(LEASE_S)

        trimmer.between = renew
        started = time.perf_counter()
        results: dict[RecordKind, KindResult] = {}
        for kind in kinds:
            at = time.time() if now is None else now
            try:
                result = await trimmer.enforce(kind, rules.limit_s(kind), at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one kind never stops the others
                results[kind] = KindResult(kind, rules.limit_s(kind), error=type(exc).__name__)
                self.failed(kind, exc)
                continue
            results[kind] = result
            self._observe(result, at)
        if self.metrics is not None:
            self.metrics.retention_run_seconds.set(time.perf_counter() - started)
        self.last = results
        return results

    def _observe(self, result: KindResult, now: float) -> None:
        if result.removed:
            logger.info("retention: %d %s records removed", result.removed, result.kind)
        if self.metrics is None:
            return
        if result.removed:
            self.metrics.retention_removed.labels(result.kind).inc(result.removed)
        if result.oldest_at is not None:
            self.metrics.retention_oldest_age.labels(result.kind).set(
                max(now - result.oldest_at, 0.0)
            )
            self.reported.add(result.kind)
        elif result.kind in self.reported:
            self.metrics.retention_oldest_age.remove(result.kind)
            self.reported.discard(result.kind)

    def _stop_reporting(self) -> None:
        """Another replica runs the job: its gauges are the ones that count."""
        if self.metrics is not None:
            for kind in self.reported:
                self.metrics.retention_oldest_age.remove(kind)
        self.reported.clear()

    def failed(self, kind: str, exc: BaseException) -> None:
        """A failure: logged, counted, and handed to each `on_failure` function."""
        failure = RetentionFailure(
            kind, f"{type(exc).__name__}: {exc}", self.namespace, time.time()
        )
        logger.error("retention of %s failed: %s", kind, failure.error)
        if self.metrics is not None:
            self.metrics.retention_failures.labels(kind).inc()
        for hook in self.on_failure:
            try:
                hook(failure)
            except Exception:  # a hook never stops the job
                logger.exception("retention failure hook %r failed", hook)

    def notify(self, failure: RetentionFailure) -> None:
        """Queue a `retention_failure` notification: at most one an hour per kind, from
        whichever replica fails first. The outbox is in the same Redis: when that is
        what fails, the notification fails too, and is counted as unpublished."""
        task = asyncio.get_running_loop().create_task(
            publish_async(
                self.client,
                self.namespace,
                "retention_failure",
                f"Retention of {failure.kind} failed: {failure.error}",
                {"record_kind": failure.kind, "error": failure.error, "at": failure.at},
                once=f"retention_failure:{failure.kind}",
                once_s=3600,
            )
        )
        self.sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[bool]) -> None:
        self.sending.discard(task)
        if not task.cancelled() and not task.result() and self.metrics is not None:
            self.metrics.notifications_unpublished.labels("retention_failure").inc()
