"""Durable acknowledgements: a write rankgate acknowledges is on disk first.

Redis applies a write in memory and appends it to its append-only file (AOF); with
`appendfsync everysec`, the embedded server's setting, the file is fsynced about
once a second. A crash of the Redis *process* loses nothing written (the bytes are
in the operating system's cache), but a crash of the *machine* (power loss, kernel
panic, a VM reset) loses what was not yet fsynced. So every write the API or the
CLI acknowledges (events, consent, API keys, erasure, links of ids) ends with
`on_disk`/`on_disk_async`, and is acknowledged only once that returned.

How: `WAITAOF numlocal numreplicas timeout` blocks until the AOF holds, fsynced,
every write *of the connection it is sent on*. A client's pool may send the write
and the WAITAOF on different connections, so `on_disk` sends a barrier instead: a
write of its own (`SET <ns>:durable:{<tag>} 1 PX 60000`, no person's data, gone
after a minute) and the WAITAOF, pipelined on one connection. Redis orders writes
in one replication stream, so when the barrier is fsynced every write that was
answered before it is too. When the fsync takes longer than `AOF_WAIT_MS` the
write is refused as not durable (`NotDurable`: a 503 with Retry-After, or the
CLI's error) even though Redis may hold it; a retry writes the same again.

`WAITAOF` answers with an error when the server keeps no AOF (`appendonly no`):
memory is all there is, and the write is acknowledged as written (an external
`REDIS_URL` chooses its own persistence: docs/operating.md, "Durable
acknowledgements"). `RANKGATE_DURABLE_REPLICAS` asks for that many replicas' AOFs
too. On a Redis Cluster the barrier goes to the master of `key` (a tag of the same
slot), or to every master when the writes were spread over many keys.
"""

from __future__ import annotations

import weakref
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from rankgate.core import redis_keys
from rankgate.core.errors import RETRY_SOON, RankgateError

AOF_WAIT_MS = 1000
"""How long an acknowledgement waits for the fsync before the write is refused."""
MARK_TTL_MS = 60_000


class NotDurable(RankgateError):
    """The write reached Redis's memory but not its disk in time: not acknowledged."""

    status_code = 503
    error = "not_durable"
    headers = RETRY_SOON


@cache
def slot_tags() -> tuple[str, ...]:
    """A short hash tag per cluster slot (the tag of slot s hashes to s): the barrier
    of a write lands on the master of the written key without naming the key."""
    tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing, n = REDIS_CLUSTER_HASH_SLOTS, 0
    while missing:
        tag = format(n, "x")
        slot = key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def _replicas() -> int:
    from rankgate.core.settings import get_settings

    return get_settings().durable_replicas


def _marks(client: Any, namespace: str, key: str | None) -> list[str]:
    """The barrier keys: one (any slot), the slot of `key`, or a slot of each master."""
    if not isinstance(client, redis.RedisCluster | aioredis.RedisCluster):
        return [redis_keys.durable_mark(namespace, "")]
    if key is not None:
        return [redis_keys.durable_mark(namespace, slot_tags()[key_slot(key.encode())])]
    owners: dict[str, int] = {}
    for slot, nodes in client.nodes_manager.slots_cache.items():
        owners.setdefault(nodes[0].name, slot)
    return [redis_keys.durable_mark(namespace, slot_tags()[slot]) for slot in owners.values()]


def _checked(reply: Any, what: str, replicas: int) -> bool:
    """True when fsynced as asked; False when the server keeps no AOF; else NotDurable."""
    if isinstance(reply, redis.ResponseError):
        if "appendonly" in str(reply).lower():
            return False
        raise reply
    if isinstance(reply, BaseException):
        raise reply
    local, remote = int(reply[0]), int(reply[1])
    if local < 1 or remote < replicas:
        raise NotDurable(
            f"{what} was not written to disk within {AOF_WAIT_MS} ms "
            f"(fsynced locally: {local}, by replicas: {remote} of {replicas}); retry"
        )
    return True


def on_disk(client: Any, namespace: str, what: str, key: str | None = None) -> bool:
    """Block until every write answered so far is in the AOF, fsynced; False when the
    server keeps no AOF (nothing to wait for). `NotDurable` past `AOF_WAIT_MS`."""
    replicas, durable = _replicas(), True
    for mark in _marks(client, namespace, key):
        target = (
            client.get_redis_connection(client.get_node_from_key(mark))
            if isinstance(client, redis.RedisCluster)
            else client
        )
        with target.pipeline(transaction=False) as pipe:
            pipe.set(mark, 1, px=MARK_TTL_MS)
            pipe.execute_command("WAITAOF", 1, replicas, AOF_WAIT_MS)
            _, reply = pipe.execute(raise_on_error=False)
        durable = _checked(reply, what, replicas) and durable
    return durable


_NODE_CLIENTS: weakref.WeakKeyDictionary[Any, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def _node_client(client: aioredis.RedisCluster, mark: str) -> aioredis.Redis:
    """A plain client of the master holding `mark` (its pipeline keeps one connection
    for the barrier and the wait; a cluster client's need not)."""
    node: Any = client.get_node_from_key(mark)
    clients = _NODE_CLIENTS.setdefault(client, {})
    if node.name not in clients:
        kwargs = node.connection_kwargs
        clients[node.name] = aioredis.Redis(
            host=node.host,
            port=int(node.port),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
        )
    return clients[node.name]


async def on_disk_async(client: Any, namespace: str, what: str, key: str | None = None) -> bool:
    """`on_disk` for an asyncio client (the serving replicas)."""
    replicas, durable = _replicas(), True
    for mark in _marks(client, namespace, key):
        target = _node_client(client, mark) if isinstance(client, aioredis.RedisCluster) else client
        async with target.pipeline(transaction=False) as pipe:
            pipe.set(mark, 1, px=MARK_TTL_MS)
            pipe.execute_command("WAITAOF", 1, replicas, AOF_WAIT_MS)
            _, reply = await pipe.execute(raise_on_error=False)
        durable = _checked(reply, what, replicas) and durable
    return durable
