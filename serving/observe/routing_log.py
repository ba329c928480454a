"""Where routing experiments leave their traces in Redis (key names: rankgate.core.redis_keys):

    rollbacks          hash: canary version -> RollbackEvent as JSON
    routing_events     stream: the audit of routing changes, one entry per automatic
                       rollback and per change made with `rankgate model promote`,
                       `retire` or `rollback` (forced ones and their evidence included)
    shadow(version)    hash: requests, errors, overlap_sum, score_diff_sum

and where the click-rate rule reads them: outcomes(version, variant), the
counters the event consumer keeps (serving/observe/outcomes.py).

Every replica reads the rollback hash, so a canary one replica rolls back is
rolled back on all of them within `ROLLBACK_SYNC_S`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from rankgate.core import redis_keys
from rankgate.core.redis_server import AsyncRedisClient, RedisClient
from rankgate.governance.notifications import NotificationKind, publish, publish_async
from serving.observe.outcomes import Exposure, read_outcomes_async

logger = logging.getLogger("ray.serve")
ROLLBACK_SYNC_S = 1.0


@dataclass(frozen=True)
class RollbackEvent:
    version: str
    rule: str
    detail: str
    canary: dict[str, float]
    stable: dict[str, float]
    at: float


class RoutingLog:
    """What replicas write and read of the routing's traces: a canary's rollback (kept,
    and appended to the audit of routing changes), the versions rolled back, the
    outcomes the click-rate rule compares, and each shadow's agreement."""

    def __init__(self, client: AsyncRedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    async def record_rollback(self, event: RollbackEvent) -> None:
        payload = json.dumps(asdict(event))
        logger.warning(
            "canary %s rolled back: rule %s fired: %s", event.version, event.rule, event.detail
        )
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(redis_keys.rollbacks(self.namespace), event.version, payload)
                pipe.xadd(
                    redis_keys.routing_events(self.namespace),
                    {"event": "rollback", "data": payload},
                    maxlen=10_000,
                )
                await pipe.execute()
        except (OSError, aioredis.RedisError) as exc:
            # The rollback already holds on this replica; others learn it when Redis is back.
            logger.warning("could not record rollback of %s: %s", event.version, exc)

    async def notify_rollback(self, event: RollbackEvent, stable: str) -> bool:
        """Tell the webhooks that take rollbacks (False: the outbox did not take it)."""
        text = (
            f"Canary {event.version} was rolled back automatically: rule {event.rule} fired "
            f"({event.detail}). {stable} (stable) answers all its users now."
        )
        data = {**asdict(event), "automatic": True, "stable_version": stable}
        return await publish_async(self.client, self.namespace, "rollback", text, data)

    async def rolled_back(self) -> set[str]:
        raw = await self.client.hkeys(redis_keys.rollbacks(self.namespace))  # type: ignore[misc]
        return {k.decode() if isinstance(k, bytes) else k for k in raw}

    async def exposures(self, canary: str, stable: str) -> tuple[Exposure, Exposure]:
        """Joined impressions and clicks of the canary since it started, and of stable
        over the same time (from where stable stood when the canary was promoted)."""
        canary_totals = await read_outcomes_async(self.client, self.namespace, canary, "canary")
        stable_totals = await read_outcomes_async(self.client, self.namespace, stable, "stable")
        return canary_totals.exposure, stable_totals.since(canary_totals)

    async def record_shadow(
        self, version: str, overlap: float | None, score_diff: float | None
    ) -> None:
        key = redis_keys.shadow(self.namespace, version)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "requests", 1)
            if overlap is None or score_diff is None:
                pipe.hincrby(key, "errors", 1)
            else:
                pipe.hincrbyfloat(key, "overlap_sum", overlap)
                pipe.hincrbyfloat(key, "score_diff_sum", score_diff)
            await pipe.execute()


def record_routing_change(client: RedisClient, namespace: str, change: dict[str, Any]) -> None:
    """Append a change made from the command line to the audit of routing changes:
    `command`, `version`, `role`, `forced` and, where a gate was consulted, its figures;
    and send it to the webhooks that take promotions (promote, retire), rollbacks or
    approvals."""
    client.xadd(
        redis_keys.routing_events(namespace),
        {"event": change["command"], "data": json.dumps(change, separators=(",", ":"))},
        maxlen=10_000,
    )
    kinds: dict[str, NotificationKind] = {"rollback": "rollback", "approve": "approval"}
    kind = kinds.get(change["command"], "promotion")
    publish(client, namespace, kind, change_text(change), {**change, "automatic": False})


def change_text(change: dict[str, Any]) -> str:
    """A routing change made from the command line, in a sentence for people."""
    version, role = change["version"], change.get("role")
    weight = change.get("weight")
    shown = f" at {weight:g} %" if weight is not None and role == "canary" else ""
    where = f"{role}{shown}" if role else "out of the routing"
    command = change["command"]
    if command == "approve":
        return (
            f"{version} was approved for {change['purpose']} by {change['by']} with "
            f"`rankgate model approve` (policy {change.get('policy_version', '?')})."
        )
    if command == "rollback":
        text = f"Canary {version} was rolled back with `rankgate model rollback`: now {where}."
    elif command == "retire":
        text = f"{version} was retired with `rankgate model retire`: it left the routing."
    else:
        text = f"{version} was promoted with `rankgate model {command}`: now {where}."
    if change.get("overrode"):
        text += " FORCED past: " + "; ".join(change["overrode"])
    return text + (f" ({change['config']})" if change.get("config") else "")


def read_routing_events(client: RedisClient, namespace: str, count: int) -> list[dict[str, Any]]:
    """The newest `count` entries of the audit of routing changes, oldest first."""
    entries = client.xrevrange(redis_keys.routing_events(namespace), count=count)
    return [
        {"event": fields[b"event"].decode(), **json.loads(fields[b"data"])}
        for _, fields in reversed(entries)  # type: ignore[arg-type]
    ]


def read_rollbacks(client: RedisClient, namespace: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(redis_keys.rollbacks(namespace))
    return {k.decode(): json.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]


def clear_rollback(client: RedisClient, namespace: str, version: str) -> None:
    client.hdel(redis_keys.rollbacks(namespace), version)


def read_shadow(client: RedisClient, namespace: str, version: str) -> dict[str, float]:
    stored = client.hgetall(redis_keys.shadow(namespace, version))
    raw = {k.decode(): float(v) for k, v in stored.items()}  # type: ignore[union-attr]
    scored = raw.get("requests", 0) - raw.get("errors", 0)
    return {
        "requests": raw.get("requests", 0),
        "errors": raw.get("errors", 0),
        "mean_topk_overlap": raw.get("overlap_sum", 0) / scored if scored else float("nan"),
        "mean_abs_score_diff": raw.get("score_diff_sum", 0) / scored if scored else float("nan"),
    }
