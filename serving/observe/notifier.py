"""The notifier: delivers the outbox of notifications (rankgate/governance/notifications.py)
to the webhooks of the serving config, off the request path.

Every ingress replica holds one (`ReplicaRuntime.notifier`); one of them delivers at
a time: it holds a lease in Redis (`notifier_lease`, LEASE_S long, renewed every
RENEW_S), and the others wait to take over. The one that delivers runs a task per
webhook on the replica's event loop. Each webhook reads the outbox through its own
consumer group (`webhook:<name>`, created at the outbox's end when the webhook is
first configured), so a webhook that hangs or fails delays only its own
notifications, in order, and never a request: an attempt is bounded by the
webhook's `timeout_s`, and waiting is `asyncio.sleep`.

Per notification and webhook: POST the JSON body, signed (`Rankgate-Signature`),
with its id (`Rankgate-Notification-Id`, the same on every attempt); a 2xx is
delivered and acknowledged; a timeout, a connection error, 408, 429 or 5xx is
retried after an exponential backoff with jitter (a 429's Retry-After is
honoured up to max_backoff_s), up to `max_attempts`; any other 4xx is refused at
once. What is given up on goes to the dead-letter stream (`notifications_dead`)
and `rankgate_notifications_failed_total`, and is acknowledged. A notification
acknowledged by nobody (the replica died mid-delivery) is claimed by the next
holder of the lease and sent again: delivery is at least once, and receivers may
drop a repeated id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import httpx
import redis.asyncio as aioredis

from rankgate.core import redis_keys
from rankgate.core.errors import ConfigError
from rankgate.core.lease import Lease
from rankgate.core.redis_server import AsyncRedisClient
from rankgate.governance.notifications import ID_HEADER, SIGNATURE_HEADER, Notification, sign
from serving.contract.config import NotificationsConfig, WebhookConfig, http_url_problem
from serving.observe.metrics import Series, ServingMetrics

logger = logging.getLogger("ray.serve")

LEASE_S = 10.0
"""A replica that stops renewing (it died) is replaced as deliverer after this long."""
RENEW_S = 2.0
POLL_S = 0.5
"""How often an idle webhook looks at the outbox (a notification waits at most this)."""
READ_COUNT = 16
DEAD_MAXLEN = 1000
RETRYABLE_STATUSES = frozenset({408, 429})

Entry = tuple[bytes, Mapping[bytes, bytes]]


@dataclass(frozen=True)
class Webhook:
    """A webhook of the config with its URL and secret, as the replica's environment has them."""

    config: WebhookConfig
    url: str
    secret: bytes

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def group(self) -> str:
        return f"webhook:{self.config.name}"


def resolve_webhooks(
    config: NotificationsConfig, environ: Mapping[str, str] | None = None
) -> list[Webhook]:
    """The configured webhooks with their URLs and secrets; ConfigError naming the field
    when a variable is not set (a webhook would get unsigned, unverifiable posts) or
    `url_env` holds no http(s) URL."""
    env = os.environ if environ is None else environ
    webhooks = []
    for index, hook in enumerate(config.webhooks):
        field = f"serve_config.yaml user_config: field 'notifications.webhooks.{index}"
        secret = env.get(hook.secret_env, "")
        if not secret:
            raise ConfigError(
                f"{field}.secret_env': the environment variable {hook.secret_env} is not set "
                f"on the replica (it holds the signing secret of webhook {hook.name!r})"
            )
        # One of url and url_env, by the config's validation.
        url = hook.url or env.get(hook.url_env or "", "")
        if not url:
            raise ConfigError(
                f"{field}.url_env': the environment variable {hook.url_env} is not set "
                f"on the replica (it holds the URL of webhook {hook.name!r})"
            )
        problem = http_url_problem(url)
        if problem:  # the URL itself is not shown: it may be a secret
            raise ConfigError(f"{field}.url_env': {hook.url_env} {problem}")
        webhooks.append(Webhook(hook, url, secret.encode()))
    return webhooks


def backoff_s(
    attempt: int, config: NotificationsConfig, draw: Callable[[], float] = random.random
) -> float:
    """The wait after failed attempt `attempt` (1-based): backoff_s doubled per attempt,
    capped at max_backoff_s, the upper half drawn at random."""
    full = min(config.max_backoff_s, config.backoff_s * 2 ** (attempt - 1))
    return full / 2 + draw() * full / 2


@dataclass(frozen=True)
class Attempt:
    """How one POST went."""

    delivered: bool
    retry: bool
    error: str = ""
    retry_after_s: float | None = None
    number: int = 0
    """Which attempt this was (1-based), once made."""


def judged(response: httpx.Response) -> Attempt:
    """A webhook's answer: 2xx delivered; 408, 429 and 5xx worth another try; other 4xx not."""
    status = response.status_code
    if 200 <= status < 300:
        return Attempt(delivered=True, retry=False)
    retry_after = None
    with contextlib.suppress(ValueError):
        retry_after = float(response.headers.get("retry-after", ""))
    retry = status >= 500 or status in RETRYABLE_STATUSES
    return Attempt(False, retry, f"HTTP {status}", retry_after)


class WebhookSender:
    """Sends one notification to one webhook, with retries (no Redis: a plain class)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        source: str,
        config: NotificationsConfig,
        metrics: ServingMetrics,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.http = http
        self.source = source
        self.config = config
        self.metrics = metrics
        self.sleep = sleep

    async def attempt(self, hook: Webhook, notification: Notification, body: bytes) -> Attempt:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "rankgate-notifier",
            ID_HEADER: notification.id,
            # Signed afresh per attempt: a receiver's replay window counts from the send.
            SIGNATURE_HEADER: sign(hook.secret, body, int(time.time())),
        }
        try:
            async with asyncio.timeout(hook.config.timeout_s):
                response = await self.http.post(
                    hook.url,
                    content=body,
                    headers=headers,
                    timeout=hook.config.timeout_s,
                )
        except (TimeoutError, httpx.TimeoutException):
            return Attempt(False, True, f"no answer within {hook.config.timeout_s:g} s")
        except httpx.HTTPError as exc:
            return Attempt(False, True, f"{type(exc).__name__}: {exc}")
        return judged(response)

    async def deliver(self, hook: Webhook, notification: Notification) -> Attempt:
        """Attempts until delivered, refused or out of attempts; the last attempt."""
        body = notification.body(self.source)
        labels = (hook.name, notification.kind)
        last = Attempt(False, False, "no attempt")
        for number in range(1, self.config.max_attempts + 1):
            last = replace(await self.attempt(hook, notification, body), number=number)
            if last.delivered:
                self.metrics.notifications_delivered.labels(*labels).inc()
                self.metrics.notification_seconds.labels(*labels).observe(
                    max(time.time() - notification.at, 0.0)
                )
                return last
            if not last.retry or number == self.config.max_attempts:
                break
            self.metrics.notifications_retried.labels(*labels).inc()
            wait = backoff_s(number, self.config)
            if last.retry_after_s is not None:
                wait = max(wait, min(last.retry_after_s, self.config.max_backoff_s))
            logger.info(
                "notification %s to webhook %s: %s; retry %d in %.1f s",
                notification.id,
                hook.name,
                last.error,
                number,
                wait,
            )
            await self.sleep(wait)  # type: ignore[misc]
        reason = "attempts" if last.retry else "refused"
        self.metrics.notifications_failed.labels(*labels, reason).inc()
        logger.warning(
            "notification %s (%s) to webhook %s given up (%s): %s",
            notification.id,
            notification.kind,
            hook.name,
            reason,
            last.error,
        )
        return last


class OutboxGroup:
    """One webhook's consumer group of the outbox: create, claim, read, acknowledge."""

    def __init__(self, client: AsyncRedisClient, namespace: str, group: str, name: str) -> None:
        self.client = client
        self.stream = redis_keys.notifications(namespace)
        self.group = group
        self.name = name
        self.own_pending = True

    async def ensure(self) -> None:
        """The group, at the outbox's end when new: a new webhook gets what comes next,
        not the history."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="$", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def take_over(self) -> None:
        """Claim what a previous deliverer read and never acknowledged."""
        start = "0-0"
        while True:
            result = await self.client.xautoclaim(
                self.stream, self.group, self.name, min_idle_time=0, start_id=start, count=100
            )
            start = result[0]
            if start in (b"0-0", "0-0"):
                break
        self.own_pending = True

    async def read(self, count: int) -> list[Entry]:
        """Own pending entries first, then new ones (never blocks)."""
        if self.own_pending:
            reply = await self.client.xreadgroup(self.group, self.name, {self.stream: "0"}, count)
            entries = reply[0][1] if reply else []
            if entries:
                return entries  # type: ignore[no-any-return]
            self.own_pending = False
        reply = await self.client.xreadgroup(self.group, self.name, {self.stream: ">"}, count)
        return reply[0][1] if reply else []  # type: ignore[no-any-return]

    async def ack(self, stream_id: bytes) -> None:
        await self.client.xack(self.stream, self.group, stream_id)


class Notifier:
    """The replica's notifier (see the module): `use` each serving config's webhooks,
    `close` with the replica."""

    def __init__(self, client: AsyncRedisClient, namespace: str, metrics: ServingMetrics) -> None:
        self.client = client
        self.namespace = namespace
        self.metrics = metrics
        self.lease = Lease(
            client, redis_keys.notifier_lease(namespace), f"notifier-{uuid.uuid4().hex[:12]}"
        )
        self.config = NotificationsConfig()
        self.webhooks: dict[str, Webhook] = {}
        self.workers: dict[str, tuple[Webhook, asyncio.Task[None]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.leased = False
        self.http: httpx.AsyncClient | None = None

    async def use(self, config: NotificationsConfig, webhooks: Sequence[Webhook]) -> None:
        """Deliver to `webhooks` from now on. Their groups are made here, so that what is
        published once a config is applied reaches its webhooks."""
        self.config = config
        self.webhooks = {hook.name: hook for hook in webhooks}
        for hook in webhooks:
            try:
                await OutboxGroup(
                    self.client, self.namespace, hook.group, self.lease.holder
                ).ensure()
            except (OSError, aioredis.RedisError) as exc:  # the worker makes it when Redis is back
                logger.warning(
                    "notifications: group of webhook %s not made yet: %s", hook.name, exc
                )
        if self.webhooks and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self.run())

    def describe(self) -> dict[str, object]:
        """For /healthz: the webhooks and whether this replica delivers now."""
        return {"webhooks": sorted(self.webhooks), "delivering": self.leased}

    async def run(self) -> None:
        """Hold the lease while there are webhooks; run one worker per webhook meanwhile."""
        while self.webhooks:
            try:
                held = await self.lease.hold(LEASE_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - another replica may take over meanwhile
                logger.warning("notifications: lease not renewed: %s: %s", type(exc).__name__, exc)
                held = False
            if held != self.leased:
                logger.info(
                    "notifier %s %s the lease", self.lease.holder, "took" if held else "lost"
                )
            self.leased = held
            self.sync_workers()
            await asyncio.sleep(RENEW_S)
        self.leased = False
        self.sync_workers()
        with contextlib.suppress(Exception):
            await self.lease.release()

    def sync_workers(self) -> None:
        """A worker per configured webhook while leased (a changed webhook's restarts);
        none otherwise."""
        wanted = self.webhooks if self.leased else {}
        for name, (hook, task) in list(self.workers.items()):
            if wanted.get(name) != hook or task.done():
                task.cancel()
                del self.workers[name]
                # Only the replica that delivers reports a webhook's lag.
                self.metrics.notification_lag.remove(name)
        for name, hook in wanted.items():
            if name not in self.workers:
                task = asyncio.get_running_loop().create_task(self.work(hook))
                self.workers[name] = (hook, task)

    def sender(self) -> WebhookSender:
        if self.http is None:
            self.http = httpx.AsyncClient(follow_redirects=False)
        return WebhookSender(self.http, self.namespace, self.config, self.metrics)

    async def work(self, hook: Webhook) -> None:
        """Deliver `hook`'s notifications in order, while this replica holds the lease."""
        group = OutboxGroup(self.client, self.namespace, hook.group, self.lease.holder)
        lag = self.metrics.notification_lag.labels(hook.name)
        ready, pause = False, POLL_S
        while True:
            try:
                if not ready:
                    await group.ensure()
                    await group.take_over()
                    ready = True
                entries = await group.read(READ_COUNT)
                if not entries:
                    lag.set(0.0)
                    await asyncio.sleep(POLL_S)
                    continue
                for stream_id, fields in entries:
                    await self.handle(hook, stream_id, fields, lag)
                    await group.ack(stream_id)
                pause = POLL_S
            except (OSError, aioredis.RedisError) as exc:
                # What was read and not acknowledged is read again (own pending first).
                logger.warning("notifications to %s: Redis: %s", hook.name, exc)
                group.own_pending = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)

    async def handle(
        self, hook: Webhook, stream_id: bytes, fields: Mapping[bytes, bytes], lag: Series
    ) -> None:
        """One outbox entry for one webhook: sent, skipped (not a kind it takes), or
        given up on (malformed, too old, undeliverable: into the dead-letter stream)."""
        try:
            notification = Notification.read(stream_id, fields)
        except (KeyError, ValueError) as exc:
            logger.warning(
                "notifications: outbox entry %r is not a notification: %s", stream_id, exc
            )
            return
        if notification.kind not in hook.config.kinds:
            return
        age = max(time.time() - notification.at, 0.0)
        lag.set(age)
        if age > self.config.max_age_s:
            self.metrics.notifications_failed.labels(hook.name, notification.kind, "expired").inc()
            await self.dead_letter(hook, notification, "expired", f"{age:.0f} s old", 0)
            return
        last = await self.sender().deliver(hook, notification)
        if not last.delivered:
            reason = "attempts" if last.retry else "refused"
            await self.dead_letter(hook, notification, reason, last.error, last.number)

    async def dead_letter(
        self, hook: Webhook, notification: Notification, reason: str, error: str, attempts: int
    ) -> None:
        entry = {
            "webhook": hook.name,
            "id": notification.id,
            "kind": notification.kind,
            "reason": reason,
            "error": error[:500],
            "attempts": str(attempts),
            "at": repr(time.time()),
        }
        with contextlib.suppress(OSError, aioredis.RedisError):
            await self.client.xadd(
                redis_keys.notifications_dead(self.namespace),
                entry,  # type: ignore[arg-type]
                maxlen=DEAD_MAXLEN,
            )

    async def close(self) -> None:
        """Stop delivering (what was not acknowledged is the next deliverer's) and let
        the lease go."""
        self.webhooks = {}
        if self.task is not None:
            self.task.cancel()
        for _, task in self.workers.values():
            task.cancel()
        self.workers = {}
        with contextlib.suppress(Exception):
            await self.lease.release()
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.aclose()
