"""Where a byte string occurs anywhere in a Redis server: the privacy tests' search."""

from __future__ import annotations

import re
from typing import Any

PAGE = 5000
"""Stream entries read at a time."""
BATCH = 1000
"""Keys whose types and values are asked for in one round trip."""


def places_holding(client: Any, needles: list[bytes]) -> list[str]:
    """Where any needle occurs: every key name, string value, hash field and value,
    list, set and sorted-set member, and stream entry of the server.

    One regular expression of every needle searches each blob once, and the keys'
    types and values come in pipelined batches: the session's server holds tens of
    thousands of decisions by the time the privacy tests run."""
    if not needles:
        return []
    pattern = re.compile(
        b"|".join(re.escape(n) for n in sorted(set(needles), key=len, reverse=True))
    )
    found: list[str] = []

    def check(where: str, blob: bytes) -> None:
        if pattern.search(blob):
            found.extend(f"{where} holds {n!r}" for n in needles if n in blob)

    keys: list[bytes] = []
    for key in client.scan_iter(count=BATCH):
        keys.append(key)
        if len(keys) >= BATCH:
            inspect(client, keys, check)
            keys = []
    if keys:
        inspect(client, keys, check)
    return found


def inspect(client: Any, keys: list[bytes], check: Any) -> None:
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
        kinds = pipe.execute()
    readers = {
        b"string": lambda p, k: p.get(k),
        b"hash": lambda p, k: p.hgetall(k),
        b"list": lambda p, k: p.lrange(k, 0, -1),
        b"set": lambda p, k: p.smembers(k),
        b"zset": lambda p, k: p.zrange(k, 0, -1),
    }
    plain = [(k, kind) for k, kind in zip(keys, kinds, strict=True) if kind in readers]
    with client.pipeline(transaction=False) as pipe:
        for key, kind in plain:
            readers[kind](pipe, key)
        values = pipe.execute()
    for key in keys:
        check(f"key name {key!r}", key)
    for (key, kind), value in zip(plain, values, strict=True):
        if value is None:  # expired since the scan
            continue
        if kind == b"string":
            check(f"value of {key!r}", value)
        elif kind == b"hash":
            for field, item in value.items():
                check(f"hash {key!r} field {field!r}", field + b"\0" + item)
        else:
            name = {b"list": "list", b"set": "set", b"zset": "sorted set"}[kind]
            check(f"{name} {key!r}", b"\0".join(value))
    for key, kind in zip(keys, kinds, strict=True):
        if kind == b"stream":
            lower = "-"
            while page := client.xrange(key, min=lower, count=PAGE):
                for stream_id, fields in page:
                    entry = b"\0".join(k + b"\0" + v for k, v in fields.items())
                    check(f"stream {key!r} entry {stream_id!r}", entry)
                lower = "(" + page[-1][0].decode()
        elif kind not in readers and kind != b"none":
            raise AssertionError(f"{key!r}: type {kind!r} not inspected")
