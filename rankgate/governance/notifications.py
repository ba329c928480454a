"""Notifications: what the team hears at once (rollbacks, promotions, approvals, drift
flags, retention failures), through a durable outbox in Redis.

Whoever has news appends it to the outbox stream with `publish` (the CLI) or
`publish_async` (a replica); neither ever raises into its caller: a Redis that does
not answer is logged and the call returns False (a replica counts it), because a
notification is never worth a failed promotion or a 5xx. The ingress replicas'
notifier (serving/observe/notifier.py) reads the outbox, one consumer group per
webhook of the serving config, and POSTs each notification the webhook asked for,
signed with `sign`, retried with backoff.

The body a webhook receives (`Notification.body`) is JSON with a human-readable
`text` (what Slack and Teams incoming webhooks show) beside the structured fields:

    {"id": "1765100000000-0", "kind": "rollback", "at": "2026-12-07T09:30:00Z",
     "source": "<namespace>", "text": "...", "data": {...}}

`id` is the same on every attempt (a receiver may drop repeats: delivery is at least
once). No notification carries a user id: fields that could (`PERSONAL_FIELDS`) are
dropped from `data` wherever they appear, and callers put in only versions, purposes,
rules, figures and names of operators.

The signature (header `Rankgate-Signature: t=<unix seconds>,v1=<hex>`) is
HMAC-SHA256 with the webhook's secret over `t + "." + body`; `verify` is how a
receiver checks it (docs/operating.md, "Notifications").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from rankgate.core import redis_keys
from rankgate.core.redis_server import AsyncRedisClient, RedisClient

logger = logging.getLogger("rankgate.notifications")

NotificationKind = Literal["rollback", "promotion", "approval", "drift_flag", "retention_failure"]
"""rollback: a canary taken out (automatically by a rule, or `rankgate model rollback`);
promotion: `rankgate model promote` or `retire` changed the routing; approval: a version
was approved for a purpose; drift_flag: a drift figure of a version crossed its
threshold; retention_failure: a retention run could not delete what it should."""
KINDS: tuple[NotificationKind, ...] = get_args(NotificationKind)
SIGNATURE_HEADER = "Rankgate-Signature"
ID_HEADER = "Rankgate-Notification-Id"
OUTBOX_MAXLEN = 10_000
"""The outbox is trimmed to about this many notifications (a webhook down for longer
than that many notifications take loses the oldest)."""
DEFAULT_TOLERANCE_S = 300
"""How old a signature's timestamp a receiver accepts by default (replayed requests are refused)."""
PERSONAL_FIELDS = frozenset(
    {"user_id", "user_ids", "anonymous_id", "anonymous_ids", "user_key", "person_key"}
)


def scrub(value: Any) -> Any:
    """`value` without fields that could name a person, at any depth."""
    if isinstance(value, Mapping):
        return {str(k): scrub(v) for k, v in value.items() if str(k) not in PERSONAL_FIELDS}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


@dataclass(frozen=True)
class Notification:
    """One entry of the outbox."""

    kind: str
    text: str
    """For people: what Slack or Teams shows."""
    data: dict[str, Any] = field(default_factory=dict)
    """The structured fields (versions, rules, figures), no user ids."""
    at: float = field(default_factory=time.time)
    id: str = ""
    """The stream id (set once stored): the same on every delivery attempt."""

    def fields(self) -> dict[str, str]:
        """As stored in the stream."""
        return {
            "kind": self.kind,
            "at": repr(self.at),
            "text": self.text,
            "data": json.dumps(scrub(self.data), separators=(",", ":"), default=str),
        }

    @classmethod
    def read(cls, stream_id: bytes | str, stored: Mapping[bytes, bytes]) -> Notification:
        """An outbox entry; KeyError or ValueError when it is not a notification."""
        return cls(
            kind=stored[b"kind"].decode(),
            text=stored[b"text"].decode(),
            data=json.loads(stored[b"data"]),
            at=float(stored[b"at"]),
            id=stream_id.decode() if isinstance(stream_id, bytes) else stream_id,
        )

    def body(self, source: str) -> bytes:
        """What a webhook receives (see the module); `source` names the deployment."""
        at = datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds")
        payload = {
            "id": self.id,
            "kind": self.kind,
            "at": at.replace("+00:00", "Z"),
            "source": source,
            "text": self.text,
            "data": scrub(self.data),
        }
        return json.dumps(payload, separators=(",", ":"), default=str).encode()


def _checked(kind: str, text: str, data: Mapping[str, Any] | None) -> Notification | None:
    if kind not in KINDS:
        logger.error("notification of unknown kind %r not published (known: %s)", kind, KINDS)
        return None
    return Notification(kind, text, dict(data or {}))


def _once_key(namespace: str, topic: str) -> str:
    return redis_keys.notification_once(namespace, hashlib.sha256(topic.encode()).hexdigest())


def publish(
    client: RedisClient,
    namespace: str,
    kind: NotificationKind,
    text: str,
    data: Mapping[str, Any] | None = None,
    once: str | None = None,
    once_s: float = 3600.0,
) -> bool:
    """Append a notification to the outbox (for every webhook that takes `kind`).

    `once`: a topic (e.g. `drift_flag:v2:score`) published at most once per `once_s`,
    whoever publishes it (a repeat within it is dropped, and counts as done). Never
    raises: False when it could not be published (Redis did not answer, or an unknown
    kind; both logged)."""
    notification = _checked(kind, text, data)
    if notification is None:
        return False
    try:
        if once is not None and not client.set(
            _once_key(namespace, once), "1", nx=True, px=max(int(once_s * 1000), 1)
        ):
            return True  # published within once_s already
        client.xadd(
            redis_keys.notifications(namespace),
            notification.fields(),  # type: ignore[arg-type]
            maxlen=OUTBOX_MAXLEN,
        )
    except Exception as exc:  # noqa: BLE001 - a notification never fails its caller
        logger.warning("notification %s not published: %s: %s", kind, type(exc).__name__, exc)
        return False
    return True


async def publish_async(
    client: AsyncRedisClient,
    namespace: str,
    kind: NotificationKind,
    text: str,
    data: Mapping[str, Any] | None = None,
    once: str | None = None,
    once_s: float = 3600.0,
) -> bool:
    """`publish` for a replica's event loop."""
    notification = _checked(kind, text, data)
    if notification is None:
        return False
    try:
        if once is not None and not await client.set(
            _once_key(namespace, once), "1", nx=True, px=max(int(once_s * 1000), 1)
        ):
            return True  # published within once_s already
        await client.xadd(
            redis_keys.notifications(namespace),
            notification.fields(),  # type: ignore[arg-type]
            maxlen=OUTBOX_MAXLEN,
        )
    except Exception as exc:  # noqa: BLE001 - a notification never fails its caller
        logger.warning("notification %s not published: %s: %s", kind, type(exc).__name__, exc)
        return False
    return True


# -- signatures ------------------------------------------------------------------------


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The `Rankgate-Signature` header of `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: bytes,
    body: bytes,
    header: str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether `header` signs `body` with `secret`, sent within `tolerance_s` of `now`
    (what a receiver checks; docs/operating.md shows it without rankgate installed)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
