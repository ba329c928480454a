"""One command, one reply, on the request path: the lean way through redis-py.

`Redis.execute_command` (redis-py 7) wraps every call in its retry loop, its
observability hooks and the packing of each argument: for the person's HMGET of
about a hundred Feast hash fields, 320-340 us of a replica's CPU a call on a
2-core machine, against 170-190 us for the same command packed once and sent on a
connection of the same pool (loadtests/redis_call_cost.py measures both). The
request path sends two commands a request (the consent script, the features), so
`Packed` keeps each one's fixed part as RESP bytes and `call` sends the whole.

What redis-py's path did and this one keeps:
- the pool, its connections and their socket timeouts;
- on an error, a cancellation or a timeout mid-reply, the connection is closed
  (`read_response` does it), so no later command reads this one's reply;
- a connection that the server closed while it sat in the pool (a restart) is
  tried once more on a new one, as redis-py's retry does for a `ConnectionError`
  (`read` is for commands that change nothing, which may run twice);
- error replies raise, as redis-py's typed exceptions (`NoScriptError`, ...).

A Redis Cluster client (`redis+cluster://`) routes each command by its key's slot:
there `read` goes through `execute_command`, unchanged.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

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


async def read(client: AsyncRedisClient, packed: Packed, *varying: Arg) -> Any:
    """The reply of `packed` with these varying arguments (see the module docstring).
    For commands that change nothing: a connection that fails is tried once more."""
    if not isinstance(client, aioredis.Redis) or client.single_connection_client:
        return await client.execute_command(*packed.args(*varying))
    command = packed.command(*varying)
    pool = client.connection_pool
    for attempt in (1, 2):
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(command, check_health=False)
            return await connection.read_response()
        except RedisConnectionError:
            # Closed while pooled (a restart): redis-py has closed this connection.
            if attempt == 2:
                raise
        finally:
            await pool.release(connection)
    raise AssertionError("unreachable")  # pragma: no cover
