"""Every Redis key rankgate writes, named in one place.

Each key of a home starts with its namespace (`home.json`), so homes sharing a
Redis never meet. Writers build key names only with the functions below.
`KEYS` describes each kind for people and for erasure: the table in
docs/reference.md is made from it (`markdown_table`), and `rankgate privacy
forget` erases every kind that names people (`personal`) and nothing else.

On a Redis Cluster only the part of a name in braces (its hash tag) picks the
slot, and one transaction or script may touch only keys of one slot. So:

- a person's keys (consent, streaming states) carry the person's key as their tag,
  `{<user_key>}`: they live together, and erasing a person reads one node;
- a key that one script or transaction writes beside another carries that other
  key's whole name as its tag (`same_slot_as`): the idempotency keys of the event
  stream, and the rollback hash beside the routing events.

Every other key is hashed whole and spreads over the cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def glob_escape(text: str) -> str:
    """`text` matched literally in a Redis SCAN pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def person_tag(user_key: str) -> str:
    """The hash tag of a person's keys: one slot per person."""
    return "{" + user_key + "}"


def person_of(name: str) -> str:
    """The user key in the name of one of a person's keys (its tag's content)."""
    start = name.index("{") + 1
    return name[start : name.index("}", start)]


def same_slot_as(key: str) -> str:
    """A hash tag putting a key in the slot of `key`, a name without braces (which
    Redis Cluster hashes whole, as it hashes a tag's content)."""
    assert "{" not in key, key
    return "{" + key + "}"


def consent(namespace: str, user_key: str) -> str:
    return f"{namespace}:consent:{person_tag(user_key)}"


def consent_import(namespace: str, file_digest: str) -> str:
    return f"{namespace}:consent_import:{file_digest}"


def api_keys(namespace: str) -> str:
    return f"{namespace}:apikeys"


def audit(namespace: str) -> str:
    return f"{namespace}:audit"


def rollbacks(namespace: str) -> str:
    # Written with its routing event in one transaction.
    return f"{namespace}:routing:rollback:{same_slot_as(routing_events(namespace))}"


def routing_events(namespace: str) -> str:
    return f"{namespace}:routing:events"


def shadow(namespace: str, version: str) -> str:
    return f"{namespace}:shadow:{version}"


def drift(namespace: str, version: str) -> str:
    return f"{namespace}:drift:{version}"


def drift_history(namespace: str, version: str) -> str:
    return f"{namespace}:drift_history:{version}"


def events(namespace: str) -> str:
    return f"{namespace}:events"


def event_seen(namespace: str, event_digest: str) -> str:
    # Set by the script that appends the event to the stream.
    return f"{namespace}:events:seen:{same_slot_as(events(namespace))}:{event_digest}"


def consumer_lease(namespace: str) -> str:
    return f"{namespace}:events:consumer"


def streaming_state(namespace: str, view: str, user_key: str) -> str:
    return f"{namespace}:streaming:{view}:{person_tag(user_key)}"


def identity_link(namespace: str, id_key: str) -> str:
    # In the id's slot: the gate reads it with the id's consent in one script.
    return f"{namespace}:identity:link:{person_tag(id_key)}"


def identity_ids(namespace: str, person_key: str) -> str:
    return f"{namespace}:identity:ids:{person_tag(person_key)}"


def decision(namespace: str, request_id: str) -> str:
    return f"{namespace}:decision:{request_id}"


def outcomes(namespace: str, version: str, variant: str) -> str:
    return f"{namespace}:outcomes:{version}:{variant}"


def outcomes_unjoined(namespace: str) -> str:
    return f"{namespace}:outcomes_unjoined"


def retention_lease(namespace: str) -> str:
    return f"{namespace}:retention:lease"


def retention_cursor(namespace: str, kind: str) -> str:
    return f"{namespace}:retention:cursor:{kind}"


def durable_mark(namespace: str, tag: str) -> str:
    """The barrier `rankgate.core.durable` writes before WAITAOF; on a cluster `tag`
    is a hash tag of the written key's slot (empty: no cluster)."""
    return f"{namespace}:durable" + (f":{{{tag}}}" if tag else "")


def setup_marker(namespace: str, step: str) -> str:
    return f"{namespace}:setup:{step}"


def notifications(namespace: str) -> str:
    return f"{namespace}:notify:outbox"


def notifications_dead(namespace: str) -> str:
    return f"{namespace}:notify:dead"


def notifier_lease(namespace: str) -> str:
    return f"{namespace}:notify:lease"


def notification_once(namespace: str, digest: str) -> str:
    return f"{namespace}:notify:once:{digest}"


@dataclass(frozen=True)
class RedisKey:
    """One kind of key: its name pattern, Redis type, writer and contents."""

    pattern: str
    type: str
    writer: str
    holds: str
    personal: bool
    """Holds pseudonymous user keys: `rankgate privacy forget` erases the person from it."""


NS = "<ns>"
CONSENT = RedisKey(
    consent(NS, "<user_key>"),
    "hash",
    "`/v1/consent`, `rankgate consent import`, `rankgate setup --demo-consent` (made-up "
    "records, source `rankgate-demo`)",
    'purpose → `{"granted", "source", "updated_at"}`, with `"via": "linked-id"` when '
    "a linked id's record decided it",
    personal=True,
)
CONSENT_IMPORTS = RedisKey(
    consent_import(NS, "<digest>"),
    "hash",
    "`rankgate consent import`",
    "progress of one file's import (rows written in file order, counts; `finished_at` once "
    "done), by sha256 of the file, the column mapping and the pseudonymisation key",
    personal=False,
)
AUDIT = RedisKey(
    audit(NS),
    "stream",
    "every ranking decision (`serving/observe/audit.py`)",
    "one `AuditRecord` (JSON) per decision, trimmed to `audit.max_records` and by the "
    "policy's `retention`",
    personal=True,
)
FEAST_ROWS = RedisKey(
    "<entity key><ns>",
    "hash",
    "Feast, at `rankgate features materialize` (named by Feast)",
    "online feature rows: a field per feature and `_ts:<view>` per view",
    personal=True,
)
API_KEYS = RedisKey(
    api_keys(NS),
    "hash",
    "`rankgate keys create/revoke`",
    'sha256(key) → `{"app", "purposes", "created_at", "hint"}`',
    personal=False,
)
ROLLBACKS = RedisKey(
    rollbacks(NS),
    "hash",
    "replicas, on an automatic canary rollback",
    "canary version → the rollback event (rule, figures)",
    personal=False,
)
ROUTING_EVENTS = RedisKey(
    routing_events(NS),
    "stream",
    "replicas, on an automatic canary rollback; `rankgate model promote/retire/rollback`",
    "one entry per routing change (rule or evidence figures, forced or not)",
    personal=False,
)
SHADOW = RedisKey(
    shadow(NS, "<version>"),
    "hash",
    "replicas, per shadow scoring",
    "requests, errors, overlap_sum, score_diff_sum",
    personal=False,
)
DRIFT = RedisKey(
    drift(NS, "<version>"),
    "hash",
    "replicas, every `drift.refresh_s` (`serving/observe/drift.py`); expires after `drift.window_s`",
    "the version's drift figures over the window: rows, PSI per input, score PSI, "
    "explanation shift, flags, thresholds",
    personal=False,
)
DRIFT_HISTORY = RedisKey(
    drift_history(NS, "<version>"),
    "stream",
    "replicas, at most one entry per replica per `drift.window_s` / 30 "
    "(`serving/observe/drift.py`); capped at the newest 10,000 entries",
    "the version's drift figures as they were over time (the same fields as `drift`), for "
    "`rankgate model report`",
    personal=False,
)
SETUP_MARKERS = RedisKey(
    setup_marker(NS, "<step>"),
    "string",
    "`rankgate setup`",
    "a step whose result lives in Redis is done (`materialized`, `demo_consent`: removed by "
    "`rankgate privacy demo-consent remove`)",
    personal=False,
)
EVENTS = RedisKey(
    events(NS),
    "stream",
    "`/v1/events`, once each event is durable (`serving/events/intake.py`)",
    "one entry per accepted event: `StoredEvent` JSON (pseudonymous user key); one per "
    "link of ids (`l`: the ids' person keys joined, for the consumer to merge their "
    "streaming counts)",
    personal=True,
)
EVENT_SEEN = RedisKey(
    event_seen(NS, "<sha256(event_id)>"),
    "string",
    "`/v1/events`",
    "an event id was accepted (idempotency), expires after `events.max_age_s`",
    personal=False,
)
CONSUMER_LEASE = RedisKey(
    consumer_lease(NS),
    "string",
    "the event consumer",
    "the name of the one consumer replica that may read the stream now (expires)",
    personal=False,
)
STREAMING_STATE = RedisKey(
    streaming_state(NS, "<view>", "<user_key>"),
    "hash",
    "the event consumer (`features/streaming.py`)",
    "a person's decayed counts of a streaming view, their time and the last event applied",
    personal=True,
)
IDENTITY_LINK = RedisKey(
    identity_link(NS, "<id_key>"),
    "string",
    "`/v1/identify` (linking), `/v1/unlink`",
    "the key of the person a linked id belongs to (`docs/privacy.md`, identity)",
    personal=True,
)
IDENTITY_IDS = RedisKey(
    identity_ids(NS, "<person_key>"),
    "hash",
    "`/v1/identify`, `/v1/unlink`",
    'each id key of a person with linked ids → `{"kind", "linked_at"}`',
    personal=True,
)
DECISIONS = RedisKey(
    decision(NS, "<request_id>"),
    "hash",
    "every ranking decision, beside its audit record",
    "version, variant, shown items and the outcomes joined to it; expires",
    personal=True,
)
OUTCOMES = RedisKey(
    outcomes(NS, "<version>", "<variant>"),
    "hash",
    "the event consumer, joining outcomes to decisions",
    "impressions, clicks, conversions (in total and per position), decisions with outcomes, "
    "`at`: when the latest was counted (retention)",
    personal=False,
)
OUTCOMES_UNJOINED = RedisKey(
    outcomes_unjoined(NS),
    "hash",
    "the event consumer, for outcomes no decision takes",
    "`<outcome>:<reason>` (unknown_request, item_not_shown, other_user, no_request_id) -> count",
    personal=False,
)
NOTIFICATIONS = RedisKey(
    notifications(NS),
    "stream",
    "replicas (automatic rollbacks, drift flags), `rankgate model promote/retire/rollback` "
    "(`rankgate/governance/notifications.py`)",
    "the outbox of notifications to webhooks: kind, time, text and JSON data (no user ids); "
    "one consumer group per webhook (`webhook:<name>`); trimmed to about 10,000",
    personal=False,
)
NOTIFICATIONS_DEAD = RedisKey(
    notifications_dead(NS),
    "stream",
    "the notifier (`serving/observe/notifier.py`), when a webhook refused a notification or "
    "every attempt failed",
    "webhook, kind, notification id, attempts and the last error; trimmed to about 1,000",
    personal=False,
)
NOTIFIER_LEASE = RedisKey(
    notifier_lease(NS),
    "string",
    "the notifier",
    "the name of the one ingress replica that delivers notifications now (expires)",
    personal=False,
)
NOTIFICATION_ONCE = RedisKey(
    notification_once(NS, "<sha256(topic)>"),
    "string",
    "replicas, before they publish a notification meant once per period (a drift flag per "
    "version and kind)",
    "a notification of that topic was published; expires after the period",
    personal=False,
)
RETENTION_LEASE = RedisKey(
    retention_lease(NS),
    "string",
    "the retention job of a serving replica (`serving/observe/retention.py`)",
    "the name of the replica that runs the policy's retention this interval (expires)",
    personal=False,
)
RETENTION_CURSOR = RedisKey(
    retention_cursor(NS, "<kind>"),
    "string",
    "the retention job",
    "the stream id up to which a kind kept inside another's records (`sampled_explanations` "
    "in the audit stream) has been checked",
    personal=False,
)
DURABLE_MARK = RedisKey(
    durable_mark(NS, "<slot tag>"),
    "string",
    "every acknowledged write of the API and the CLI (`rankgate/core/durable.py`)",
    "`1`, the barrier written right before `WAITAOF` so that the acknowledgement waits for "
    "the fsync of everything written before it; expires after a minute (on a Redis Cluster, "
    "one per slot written, `{<slot tag>}` a tag of that slot)",
    personal=False,
)
KEYS = (
    CONSENT,
    CONSENT_IMPORTS,
    AUDIT,
    FEAST_ROWS,
    API_KEYS,
    ROLLBACKS,
    ROUTING_EVENTS,
    SHADOW,
    DRIFT,
    DRIFT_HISTORY,
    SETUP_MARKERS,
    EVENTS,
    EVENT_SEEN,
    CONSUMER_LEASE,
    STREAMING_STATE,
    IDENTITY_LINK,
    IDENTITY_IDS,
    DECISIONS,
    OUTCOMES,
    OUTCOMES_UNJOINED,
    NOTIFICATIONS,
    NOTIFICATIONS_DEAD,
    NOTIFIER_LEASE,
    NOTIFICATION_ONCE,
    RETENTION_LEASE,
    RETENTION_CURSOR,
    DURABLE_MARK,
)


def markdown_table() -> str:
    """The table of keys in docs/reference.md ("Redis keys")."""
    rows = [
        "| key | type | written by | holds | names people |",
        "|---|---|---|---|---|",
    ]
    for key in KEYS:
        people = "yes: erased by `privacy forget`" if key.personal else "no"
        rows.append(f"| `{key.pattern}` | {key.type} | {key.writer} | {key.holds} | {people} |")
    return "\n".join(rows)
