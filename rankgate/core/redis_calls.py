"""One command, one reply, on the request path: the lean way through redis-py.

`Redis.execute_command` (redis-py 7) wraps every call in its retry loop, its
observability hooks, the pool's checkout (a lock, and a read of the socket to see
that nothing is left on it) and the packing of each argument, and with a socket
timeout it sends through `asyncio.wait_for` (a task a command). For the person's
HMGET of about a hundred Feast hash fields that is 320-340 us of a replica's CPU a
call on a 2-core machine. The request path sends two commands a request (the
consent script, the features), so here:

- `Packed` keeps each command's fixed part as RESP bytes, and a call adds the keys;
- `read` sends it on a connection of its own idle list for that client (redis-py's
  `Connection`, made with the client's settings) and reads the reply.

The connections have no socket timeout: the caller bounds every call (the request's
deadline, `asyncio.timeout`). What redis-py's path did and this one keeps:
- on an error, a cancellation or a timeout mid-reply, redis-py closes the
  connection (`send_packed_command`, `read_response`) and it is not used again, so
  no later command reads this one's reply; only a connection whose reply was read
  whole goes back to the idle list;
- a connection the server closed while idle (a restart) is tried once more on a
  new one, as redis-py's retry does for a `ConnectionError` (`read` is for commands
  that change nothing, which may run twice), and the other idle ones are dropped;
- error replies raise as redis-py's typed exceptions (`NoScriptError`, ...).

A reply is returned as the parser reads it, without redis-py's response callbacks
(HMGET and EVALSHA have none; PING answers b"PONG", not True).

A Redis Cluster client (`redis+cluster://`) routes each command by its key's slot:
there `read` goes through `execute_command`, unchanged.
`python -m loadtests.redis_call_cost` measures both ways.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from rankgate.core.redis_server import AsyncRedisClient

Arg = str | bytes | int
VARY = object()
"""In `Packed`'s arguments: one that each call gives."""


def _bulk(value: Arg) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Packed:
    """A command whose arguments are fixed but for those marked `VARY`: the fixed
    ones packed once. `command(*values)` is the whole command in RESP, a value for
    each `VARY` in order; `args(*values)` the same as arguments."""

    def __init__(self, *parts: Arg | object) -> None:
        self.parts = parts
        self.varying = sum(part is VARY for part in parts)
        segments, current = [], b"*%d\r\n" % len(parts)
        for part in parts:
            if part is VARY:
                segments.append(current)
                current = b""
            else:
                current += _bulk(part)  # type: ignore[arg-type]
        self.segments, self.last = segments, current

    def command(self, *values: Arg) -> bytes:
        assert len(values) == self.varying, "one value per VARY"
        out = bytearray()
        for segment, value in zip(self.segments, values, strict=True):
            out += segment
            out += _bulk(value)
        out += self.last
        return bytes(out)

    def args(self, *values: Arg) -> list[Arg]:
        given = iter(values)
        return [next(given) if part is VARY else part for part in self.parts]  # type: ignore[misc]


MAX_IDLE = 64
"""Idle connections kept per client (more than a replica has requests in flight)."""


class _Idle:
    """A client's idle connections on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: list[AbstractConnection] = []


_IDLE: weakref.WeakKeyDictionary[aioredis.Redis, _Idle] = weakref.WeakKeyDictionary()


def _idle(client: aioredis.Redis) -> _Idle:
    loop = asyncio.get_running_loop()
    idle = _IDLE.get(client)
    if idle is None or idle.loop is not loop:  # a connection serves one event loop
        idle = _IDLE[client] = _Idle(loop)
    return idle


def _new_connection(client: aioredis.Redis) -> AbstractConnection:
    pool = client.connection_pool
    settings = {**pool.connection_kwargs, "socket_timeout": None}
    connection: AbstractConnection = pool.connection_class(**settings)
    return connection


async def read(client: AsyncRedisClient, packed: Packed, *varying: Arg) -> Any:
    """The reply of `packed` with these varying arguments (see the module docstring).
    For commands that change nothing, bounded by the caller."""
    if not isinstance(client, aioredis.Redis) or client.single_connection_client:
        return await client.execute_command(*packed.args(*varying))
    command = packed.command(*varying)
    idle = _idle(client)
    for attempt in (1, 2):
        pooled = idle.connections
        connection = pooled.pop() if pooled and attempt == 1 else _new_connection(client)
        try:
            await connection.send_packed_command(command, check_health=False)
            reply = await connection.read_response()
        except RedisConnectionError:
            # redis-py closed this one; after a restart the idle ones are closed too.
            stale, idle.connections = idle.connections, []
            for old in stale:
                await old.disconnect(nowait=True)
            if attempt == 2:
                raise
            continue
        except ResponseError:
            await _keep(idle, connection)  # an error reply, read whole: the connection is clean
            raise
        await _keep(idle, connection)
        return reply
    raise AssertionError("unreachable")  # pragma: no cover


async def _keep(idle: _Idle, connection: AbstractConnection) -> None:
    if len(idle.connections) < MAX_IDLE:
        idle.connections.append(connection)
    else:
        await connection.disconnect(nowait=True)


async def close(client: AsyncRedisClient) -> None:
    """Close `client`'s idle connections of this module (with the client itself)."""
    idle = _IDLE.pop(client, None) if isinstance(client, aioredis.Redis) else None
    for connection in idle.connections if idle is not None else []:
        await connection.disconnect(nowait=True)
