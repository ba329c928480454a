"""The decision audit log: one record per ranking decision in a Redis Stream.

    redis_keys.audit(namespace)     stream, one entry per decision, field "record" = JSON

A record (`AuditRecord`) holds the request id, the pseudonymous user key (never
the raw id), the purpose and region, the policy version and its checks, the
model version and variant, the user feature values the model read and their age,
the digest of the item table used, the candidates, the ranking, the fallback
reason, the explanation when one was asked for or sampled (`explained` says
which), the stage timings, and the lineage digest of the version that ranked the
answer (`lineage_digest`: its training data's input tables). The pipeline writes it, `rankgate audit
tail/replay` and `rankgate privacy forget` read it back. `rankgate audit replay` re-scores a personalized decision from
these and checks that it reproduces the recorded ranking.

Beside each record, in the same pipelined batch, the decision index:

    redis_keys.decision(namespace, request_id)   hash, expires after events.decision_ttl_s

with `u` (the pseudonymous user key: erasure finds a person's decisions by it),
`v` (model version, "" when the fallback answered), `var` (variant, or
`fallback`), `items` (JSON list of the answer's item ids, best first) and `at`.
Outcomes (impressions, clicks, conversions) join it by request id
(serving/observe/outcomes.py). It is written only when the project declares outcome
event types: without them nothing would ever read it.

Records are queued in memory and written by one background task in pipelined
batches (it waits `LINGER_S` for a batch to gather), so a request pays for a
queue put, not for a Redis round trip, and a short Redis outage loses nothing
(up to `MAX_PENDING` records wait for it). What a replica has queued is lost if
its node vanishes; with `audit.before_answer` an answer leaves only once its
record is written (or `BEFORE_ANSWER_WAIT_S` has passed: a Redis outage delays
answers by that much, never refuses them), so every answer a client received
has its record. The record of a decision sampled for
an explanation is held until its explanation is computed (milliseconds after
the answer), so the stream's order is nearly, not exactly, the order of
decisions (`at` is exact).
Retention: the stream is trimmed to about `audit.max_records` entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from rankgate.core import redis_keys
from rankgate.core.redis_server import AsyncRedisClient
from serving.contract.schemas import ExplanationStatus, Fallback, ModelRef, PolicyBlock, Reason

logger = logging.getLogger("ray.serve")
MAX_PENDING = 50_000
BATCH = 256
LINGER_S = 0.01
"""How long the writer waits for more records before it writes a batch smaller than BATCH."""
BEFORE_ANSWER_WAIT_S = 0.5
"""With `audit.before_answer`: how long an answer waits for its record at most."""


class RecordedFeatures(BaseModel):
    values: dict[str, Any]
    """Feast field name -> the value the model read."""
    age_s: dict[str, float]
    """View -> age of its row in seconds."""
    context: dict[str, str] = {}
    """The request's context (context features are model inputs)."""
    events_through: float | None = None
    """Acceptance time (Unix s) of the newest event in the streaming views read: with
    the record's `at`, how old the freshest streaming feature was."""


class Choice(BaseModel):
    """How the shown items were chosen (what off-policy evaluation needs to know)."""

    method: str
    """top_k (the model's order), fallback (the rules' order), or the purpose's
    exploration method (epsilon_greedy, plackett_luce)."""
    deterministic: bool
    explored: bool = False
    """An exploration draw that differs from the model's top k."""
    seed: int | None = None
    """The draw's seed: `rankgate audit replay` draws the same answer."""
    exploration: dict[str, Any] | None = None
    """The exploration settings the draw used (from the policy)."""


class ExplanationNote(BaseModel):
    """How a record's `explanation` came about, or why it has none."""

    kind: Literal["requested", "sampled"]
    """requested: the request asked (`explain: true`) and the answer carried it;
    sampled: chosen by `explainer.sample_rate`, computed after the answer was sent."""
    status: ExplanationStatus
    reason: str | None = None
    """Why it was omitted (budget_exhausted, explainer_unavailable, explainer_error,
    queue_full, not_personalized)."""


class TcfNote(BaseModel):
    """What a request's TC string granted, as decoded (the string itself is not kept)."""

    field: str
    """Where it came from: consent.tcf (the body) or Rankgate-TCF (the header)."""
    granted: bool
    vendor_id: int
    required: list[int]
    """TCF purposes the policy maps the purpose to."""
    missing: list[int]
    """Of those, the ones the string does not grant."""
    vendor_consent: bool
    restricted: list[int]
    """Of those, the ones the publisher restricts for the vendor."""
    vendor_list_version: int
    vendor_list_known: bool
    tcf_policy_version: int
    cmp_id: int


class ConsentNote(BaseModel):
    """Which consent source decided, and what the request's signals meant."""

    source: str
    """stored, linked-id, gpc or tcf."""
    gpc: str | None = None
    """objection, not_counted, or None (no signal)."""
    tcf: TcfNote | str | None = None
    """The decoded facts, not_counted, or None (no TC string)."""


class AuditRecord(BaseModel):
    """One decision as the audit stream keeps it (no raw user id).

    Stored as compact JSON of the fields set, in this order: optional parts of the
    answer (a policy check's or the fallback's `detail`) are absent when the answer
    left them out, as in records written before this model existed."""

    # A field a later version adds is kept when this one reads and prints the record.
    model_config = ConfigDict(extra="allow")

    request_id: str
    at: float
    """Unix time of the decision."""
    app: str | None = None
    """The application whose API key asked (absent from records older than API keys)."""
    user_key: str
    purpose: str
    region: str
    k: int
    policy: PolicyBlock
    model: ModelRef | None
    candidates: list[int | str]
    """The items the policy allowed, in the request's order: the rows of the model input
    (for a request without candidates over a large catalogue: the retrieved items)."""
    whole_catalogue: bool | None = None
    """True: no candidates named, the fallback ranked the whole allowed catalogue (not
    listed in `candidates`)."""
    retrieved: dict[str, int] | None = None
    """Items each retrieval source gave, when the candidates were retrieved."""
    features: RecordedFeatures | None
    item_table: str | None
    """Digest of the item table the model input was built from."""
    items: list[tuple[int | str, float]]
    """The answer: (item id, score), best first."""
    fallback: Fallback | None
    explanation: list[list[Reason]] | None
    """Reasons per returned item (the first `explainer.max_items`; [] after them),
    when they were computed."""
    explained: ExplanationNote | None = None
    """Set when an explanation was asked for or sampled (absent from records older
    than sampling, and from decisions neither asked nor sampled)."""
    timings_ms: dict[str, float]
    propensities: list[float] | None = None
    """Per shown item, the probability with which the serving policy put it at its
    position: 1 for a deterministic ranking (absent in records older than this field)."""
    choice: Choice | None = None
    """How the items were chosen (absent in records older than this field)."""
    consent: ConsentNote | None = None
    """Set when the request carried consent signals or a linked id's record decided
    (the policy checks name the source of every decision)."""
    lineage_digest: str | None = None
    """Set when a model ranked the answer: the sha256 of its training data's input
    tables (its manifest's `lineage.data.digest`; null: the version records none).
    Absent when the fallback answered, and in records older than this field."""
    stream_id: str | None = None
    """Id of the stream entry: set when read back, never written."""

    def stored(self) -> str:
        """The JSON the stream keeps."""
        return self.model_dump_json(exclude_unset=True, exclude={"stream_id"})

    def shown(self) -> str:
        """One line for `rankgate audit tail`: the record with its stream id."""
        return json.dumps(self.model_dump(exclude_unset=True))

    @classmethod
    def read(cls, raw: bytes | str, stream_id: bytes | None = None) -> AuditRecord:
        record = cls.model_validate_json(raw)
        if stream_id is not None:
            record.stream_id = stream_id.decode()
        return record


FALLBACK_VARIANT = "fallback"
"""The variant of a decision the fallback answered (its version is "")."""


@dataclass(frozen=True)
class Decision:
    """What outcomes join: who was answered, by which model, with which items."""

    request_id: str
    user_key: str
    version: str
    """"" when the fallback answered (also when it answered for a chosen model)."""
    variant: str
    items: list[int | str]
    """The answer's item ids, best first (position n is items[n - 1])."""
    at: float

    @classmethod
    def of(cls, record: AuditRecord) -> Decision:
        # A degraded answer's items are the fallback's ranking, not the model's: its
        # outcomes must not count for the model (the degraded-rate rule covers it).
        model = record.model if record.fallback is None else None
        return cls(
            request_id=record.request_id,
            user_key=record.user_key,
            version=model.version if model is not None else "",
            variant=model.variant if model is not None else FALLBACK_VARIANT,
            items=[item for item, _ in record.items],
            at=record.at,
        )

    def fields(self) -> dict[str, str]:
        """The decision hash as written (field names are read by serving/observe/outcomes.py
        and by erasure, which looks for `u`)."""
        return {
            "u": self.user_key,
            "v": self.version,
            "var": self.variant,
            "items": json.dumps(self.items, separators=(",", ":")),
            "at": repr(self.at),
        }


@dataclass(frozen=True)
class Pending:
    record: str | None
    """The audit record's JSON (None: the audit stream is off)."""
    decision: Decision | None
    """The decision index entry (None: the project has no outcomes to join)."""
    written: asyncio.Future[None] | None = None
    """Resolved once written (an answer that waits for its record: `audit.before_answer`)."""


class AuditWriter:
    """Queues audit records and decision index entries; one background task writes them."""

    def __init__(
        self,
        client: AsyncRedisClient,
        namespace: str,
        max_records: int,
        decision_ttl_s: float | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.key = redis_keys.audit(namespace)
        self.max_records = max_records
        self.decision_ttl_s = decision_ttl_s
        """How long a decision waits for its outcomes; None: no decision index."""
        self.pending: deque[Pending] = deque()
        self.held = 0
        """Records to be queued later (waiting for their sampled explanation)."""
        self.written = 0
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def record(
        self, entry: AuditRecord, audit: bool = True, written: asyncio.Future[None] | None = None
    ) -> None:
        """Queue the audit record (unless `audit` is off) and, when outcomes are
        joined, the decision index entry; `written` is resolved once they are in Redis."""
        decision = Decision.of(entry) if self.decision_ttl_s is not None else None
        if not audit and decision is None:
            if written is not None and not written.done():
                written.set_result(None)
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()  # Redis has been away too long: keep the newest
        self.pending.append(Pending(entry.stored() if audit else None, decision, written))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        self.wakeup.set()

    def hold(self) -> None:
        """A record will be queued later by `release`: `flush` waits for it too."""
        self.held += 1

    def unhold(self) -> None:
        """A record announced by `hold` was queued some other way (or not at all)."""
        self.held -= 1

    def release(
        self, entry: AuditRecord, audit: bool = True, written: asyncio.Future[None] | None = None
    ) -> None:
        """Queue a record announced by `hold`."""
        self.unhold()
        self.record(entry, audit, written)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            if len(self.pending) < BATCH and self.pending[-1].written is None:
                # Let a few more records come: one pipeline for several decisions
                # costs the event loop far less than one each. Not when an answer
                # waits for its record: those that queue meanwhile form the next batch.
                await asyncio.sleep(LINGER_S)
            batch = [self.pending[n] for n in range(min(BATCH, len(self.pending)))]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for entry in batch:
                        self._write(pipe, entry)
                    await pipe.execute()
            except (OSError, aioredis.RedisError) as exc:
                logger.warning(
                    "audit write failed, %d records wait: %s", len(self.pending), type(exc).__name__
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            for _ in batch:
                done = self.pending.popleft().written
                if done is not None and not done.done():
                    done.set_result(None)
            self.written += len(batch)

    def _write(self, pipe: Any, entry: Pending) -> None:
        if entry.record is not None:
            pipe.xadd(self.key, {"record": entry.record}, maxlen=self.max_records, approximate=True)
        if entry.decision is not None and self.decision_ttl_s is not None:
            key = redis_keys.decision(self.namespace, entry.decision.request_id)
            pipe.hset(key, mapping=entry.decision.fields())
            pipe.expire(key, max(1, round(self.decision_ttl_s)))

    async def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued or held record is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while (self.pending or self.held) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not (self.pending or self.held)

    async def close(self) -> None:
        await self.flush()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
