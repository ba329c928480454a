"""Reading a Redis stream a page at a time: the audit log and the event stream may hold
millions of entries, which one XRANGE would bring into memory at once."""

from __future__ import annotations

from collections.abc import Iterator

from rankgate.core.redis_server import RedisClient

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: (stream id, fields)."""


def stream_pages(
    client: RedisClient,
    stream: str,
    size: int,
    start: str | None = None,
    newest_first: bool = False,
) -> Iterator[list[Entry]]:
    """The entries of `stream`, `size` at a time: oldest first from `start` (a stream id,
    included; default: the first entry), or with `newest_first` from `start` (default:
    the last entry) back to the first."""
    bound = start or ("+" if newest_first else "-")
    while True:
        if newest_first:
            page = client.xrevrange(stream, max=bound, count=size)
        else:
            page = client.xrange(stream, min=bound, count=size)
        entries: list[Entry] = list(page)  # type: ignore[arg-type]
        if entries:
            yield entries
        if len(entries) < size:
            return
        bound = "(" + entries[-1][0].decode()
