"""The request path's lean Redis calls (rankgate/core/redis_calls.py), on the real server:
the same bytes and replies as redis-py's own path, a pooled connection the server
closed is replaced, and a read cut off mid-reply never leaves its reply to the next."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError

from rankgate.core import redis_calls
from rankgate.core.home import Home
from rankgate.core.redis_calls import VARY, Packed, read
from rankgate.core.redis_server import connect_async, resolve_redis_url

SCRIPT = "return {KEYS[1], ARGV[1]}"


def test_packed_commands_are_the_bytes_redis_py_sends() -> None:
    connection = Connection()
    fields = [b"\x00\xffbinary", "caf\u00e9", 7, "x" * 300]
    packed = Packed("HMGET", VARY, *fields)
    assert packed.command(b"key\r\n") == b"".join(
        connection.pack_command("HMGET", b"key\r\n", *fields)
    )
    script = Packed("EVALSHA", "abc", 2, VARY, VARY, VARY)
    assert script.command("k1", b"k2", "p\u00e9") == b"".join(
        connection.pack_command("EVALSHA", "abc", 2, "k1", b"k2", "p\u00e9")
    )
    assert script.args("k1", b"k2", "p") == ["EVALSHA", "abc", 2, "k1", b"k2", "p"]
    with pytest.raises(AssertionError):
        script.command("only one")


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_replies_equal_redis_py_and_errors_are_typed(session_home: Home) -> None:
    async def check() -> None:
        client = connect_async(resolve_redis_url())
        key = f"{session_home.namespace}:calls-test:{uuid.uuid4().hex}"
        fields = [f"f{n}" for n in range(100)] + ["missing"]
        await client.hset(key, mapping={f: f"v{n}".encode() for n, f in enumerate(fields[:-1])})
        hmget = Packed("HMGET", VARY, *fields)
        assert await read(client, hmget, key) == await client.hmget(key, fields)
        sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
        evalsha = Packed("EVALSHA", sha, 1, VARY, VARY)
        await client.script_flush()
        with pytest.raises(NoScriptError):
            await read(client, evalsha, key, "purpose")
        await client.script_load(SCRIPT)
        assert await read(client, evalsha, key, "purpose") == [key.encode(), b"purpose"]
        await client.delete(key)
        await redis_calls.close(client)
        await client.aclose()

    run(check())


def test_a_connection_the_server_closed_is_replaced(session_home: Home) -> None:
    async def check() -> None:
        client = connect_async(resolve_redis_url())
        key = f"{session_home.namespace}:calls-test:{uuid.uuid4().hex}"
        await client.hset(key, "f", "v")
        hmget = Packed("HMGET", VARY, "f")
        assert await read(client, hmget, key) == [b"v"]
        # The server closes the idle connection `read` keeps (a restart looks the same).
        own = await read(client, Packed("CLIENT", "ID"))
        killer = connect_async(resolve_redis_url())
        assert await killer.client_kill_filter(_id=own) == 1
        assert await read(client, hmget, key) == [b"v"]
        assert await read(client, Packed("CLIENT", "ID")) != own
        await client.delete(key)
        await killer.aclose()
        await redis_calls.close(client)
        await client.aclose()

    run(check())


def test_connections_are_kept_for_the_next_call_and_closed_with_the_client(
    session_home: Home,
) -> None:
    async def check() -> None:
        client = connect_async(resolve_redis_url())
        client_id = Packed("CLIENT", "ID")
        first = await read(client, client_id)
        assert await read(client, client_id) == first  # one call at a time: one connection
        # Calls in flight together each take a connection; all are kept afterwards.
        ids = await asyncio.gather(*(read(client, client_id) for _ in range(5)))
        assert len(set(ids)) == 5 and first in ids
        assert await read(client, Packed("PING")) == b"PONG"  # as read: no response callback
        await redis_calls.close(client)
        listed = await client.client_list()
        assert not {int(c["id"]) for c in listed} & set(ids)
        await client.aclose()

    run(check())


def test_a_read_cut_off_mid_reply_closes_its_connection(session_home: Home) -> None:
    async def check() -> None:
        client = connect_async(resolve_redis_url())
        assert isinstance(client, aioredis.Redis)
        queue = f"{session_home.namespace}:calls-test:{uuid.uuid4().hex}"
        blpop = Packed("BLPOP", VARY, 2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await read(client, blpop, queue)
        # Were the cut-off connection still open, the server would hand this element
        # to its BLPOP and the next reader of that connection would get it.
        await client.rpush(queue, "element")
        assert await read(client, Packed("LRANGE", VARY, 0, -1), queue) == [b"element"]
        await client.delete(queue)
        await redis_calls.close(client)
        await client.aclose()

    run(check())
