"""Counted to the last record: what the traffic was told, checked against what Redis holds.

- **Audit**: every rank answered 200 (personalized or fallback) has exactly one
  audit record. The stream is trimmed (`audit.max_records`), so `AuditTail` reads
  it as the run goes (every few seconds, from the id the run started at) and counts
  request ids; a Redis restart in between is read through (the ids go on).
- **Events**: every event answered 202 whose decision was personalized is joined
  to that decision exactly once: its mark (`o:<sha256 of event id>`) is in the
  decision's hash, and the outcome counters grew by exactly the number of marks;
  the consumer group has nothing pending and no lag (every entry applied).
- **Consent**: what each soak person holds after the run is what was last
  acknowledged (people with a write that was not acknowledged aside); the
  withdrawals made right before each Redis kill are read back right after the
  restart (loadtests/soak/faults.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, Self

from loadtests.soak.traffic import Ledger
from rankgate.core import redis_keys
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import connect
from rankgate.governance.consent import ConsentState, ConsentStore
from serving.events.intake import event_digest
from serving.events.outcome_join import MARKER_PREFIX
from serving.observe.outcomes import COUNTERS, outcome_keys

READ_EVERY_S = 3.0
PAGE = 5_000


class AuditTail:
    """Counts the request ids of the audit stream's records from `start` on."""

    def __init__(self, namespace: str) -> None:
        self.key = redis_keys.audit(namespace)
        self.seen: Counter[str] = Counter()
        self.last = f"{int(time.time() * 1000)}-0"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="audit-tail", daemon=True)
        self.errors = 0

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def read(self) -> int:
        client = connect()
        read = 0
        while True:
            entries = client.xrange(self.key, min=f"({self.last}", max="+", count=PAGE)
            for stream_id, fields in entries:  # type: ignore[union-attr]
                record = json.loads(fields[b"record"])
                self.seen[record["request_id"]] += 1
                self.last = stream_id.decode()
                read += 1
            if len(entries) < PAGE:  # type: ignore[arg-type]
                return read

    def _run(self) -> None:
        while not self.stop.wait(READ_EVERY_S):
            try:
                self.read()
            except Exception:  # noqa: BLE001 - Redis down for a while: read on later
                self.errors += 1

    def settle(self, expected: set[str], limit_s: float = 60.0) -> None:
        """Read until every expected record is in, or nothing new came for 10 s."""
        deadline, quiet_since = time.monotonic() + limit_s, time.monotonic()
        while time.monotonic() < deadline:
            try:
                got = self.read()
            except Exception:  # noqa: BLE001
                got = 0
            if expected <= set(self.seen):
                return
            quiet_since = time.monotonic() if got else quiet_since
            if time.monotonic() - quiet_since > 10:
                return
            time.sleep(1.0)


def audit_counts(ledger: Ledger, tail: AuditTail) -> dict[str, int]:
    answered = [a.request_id for a in ledger.rank_answers() if a.status == 200]
    expected = set(answered)
    tail.settle(expected)
    return {
        "answered": len(answered),
        "answered_distinct": len(expected),
        "records": sum(tail.seen[r] for r in expected),
        "missing": len(expected - set(tail.seen)),
        "duplicated": sum(1 for r in expected if tail.seen[r] > 1),
        "other_records": sum(c for r, c in tail.seen.items() if r not in expected),
    }


def drained(namespace: str, limit_s: float = 60.0) -> bool:
    """Wait until the consumer has applied everything (nothing pending, no lag): the
    counters are then a baseline no earlier event will still move."""
    client: Any = connect()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        groups = client.xinfo_groups(redis_keys.events(namespace))
        if all(int(g.get("pending", 0)) == 0 and int(g.get("lag") or 0) == 0 for g in groups):
            return True
        time.sleep(0.5)
    return False


def outcome_totals(namespace: str) -> dict[tuple[str, str], int]:
    """Impressions and clicks counted per (version, variant)."""
    client: Any = connect()
    totals = {}
    for version, variant in outcome_keys(client, namespace):
        raw = client.hmget(
            redis_keys.outcomes(namespace, version, variant),
            [COUNTERS["impression"], COUNTERS["click"]],
        )
        totals[(version, variant)] = sum(int(v or 0) for v in raw)
    return totals


def event_counts(
    ledger: Ledger, namespace: str, before: dict[tuple[str, str], int], limit_s: float = 120.0
) -> dict[str, Any]:
    """Joined, lost and double-counted outcome events, and the consumer's backlog.

    An event applied twice would count twice: per (version, variant), the counters
    grew by more than the events marked in decisions of it. A refused event may still
    have been written (the append landed, its fsync was not confirmed in time) and
    then joins like any other, so the marks counted are those of every event sent,
    refused ones included. Canary counters are left out of that check, as each new
    canary experiment starts them from zero (serving/ops/promotion.py)."""
    client: Any = connect()
    stream = redis_keys.events(namespace)
    deadline = time.monotonic() + limit_s
    accepted = ledger.accepted_events
    while True:
        groups = client.xinfo_groups(stream)
        pending = sum(int(g.get("pending", 0)) for g in groups)
        lag = sum(int(g.get("lag") or 0) for g in groups)
        marks = joined_marks(client, namespace, accepted.items())
        if sum(marks.values()) == len(accepted) and pending == 0 and lag == 0:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(2.0)
    refused_marks = joined_marks(
        client, namespace, ((e, (r, 0.0)) for e, r in ledger.refused_events.items())
    )
    after = outcome_totals(namespace)
    joined = sum(marks.values())
    checked = [key for key in marks | refused_marks if key[1] != "canary"]
    counted = {key: after.get(key, 0) - before.get(key, 0) for key in checked}
    return {
        "accepted": len(accepted),
        "refused": len(ledger.refused_events),
        "refused_joined": sum(refused_marks.values()),
        "joined": joined,
        "lost": len(accepted) - joined,
        "joined_by_variant": {f"{v}:{var}": n for (v, var), n in sorted(marks.items())},
        "counted_by_variant": {f"{v}:{var}": n for (v, var), n in sorted(counted.items())},
        "applied_twice": sum(
            max(0, counted[key] - marks[key] - refused_marks[key]) for key in checked
        ),
        "consumer_pending": pending,
        "consumer_lag": lag,
    }


def joined_marks(
    client: Any, namespace: str, accepted: Iterable[tuple[str, tuple[str, float]]]
) -> Counter[tuple[str, str]]:
    """Events marked in their decision's hash, per the decision's (version, variant)."""
    found: Counter[tuple[str, str]] = Counter()
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        with client.pipeline(transaction=False) as pipe:
            for event_id, request_id in batch:
                key = redis_keys.decision(namespace, request_id)
                pipe.hmget(key, ["v", "var", MARKER_PREFIX + event_digest(event_id)])
            for version, variant, mark in pipe.execute():
                if mark is not None:
                    found[((version or b"").decode(), (variant or b"").decode())] += 1
        batch.clear()

    for event_id, (request_id, _) in accepted:
        batch.append((event_id, request_id))
        if len(batch) >= 2_000:
            flush()
    if batch:
        flush()
    return found


def consent_counts(ledger: Ledger, namespace: str, purpose: str) -> dict[str, int]:
    store = ConsentStore(connect(), namespace)
    people = [p for p in ledger.consent_acked if p not in ledger.uncertain]
    states = store.states([user_key(p) for p in people], purpose)
    held = dict(zip(people, states, strict=True))

    def wrong(person: str) -> bool:
        want = ConsentState.GRANTED if ledger.consent_acked[person] else ConsentState.DENIED
        return held[person] != want

    acknowledged = sum(1 for a in ledger.answers if a.kind == "consent" and a.status == 200)
    return {
        "writes_acknowledged": acknowledged,
        "people_checked": len(people),
        "lost": sum(1 for p in people if wrong(p)),
        "uncertain_people": len(ledger.uncertain),
    }
