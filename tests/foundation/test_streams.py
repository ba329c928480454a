"""Reading a Redis stream a page at a time (rankgate/core/streams.py), as the audit
readers and erasure do, against the session's embedded Redis."""

from __future__ import annotations

from rankgate.core.home import Home
from rankgate.core.redis_server import connect, resolve_redis_url
from rankgate.core.settings import get_settings
from rankgate.core.streams import stream_pages


def test_pages_cover_the_stream_in_order_from_either_end(session_home: Home) -> None:
    client = connect(resolve_redis_url(get_settings()))
    stream = f"{session_home.namespace}:test:pages"
    client.delete(stream)
    ids = [client.xadd(stream, {"n": str(n)}) for n in range(7)]

    def numbers(**kwargs: object) -> list[list[int]]:
        pages = stream_pages(client, stream, 3, **kwargs)  # type: ignore[arg-type]
        return [[int(fields[b"n"]) for _, fields in page] for page in pages]

    try:
        assert numbers() == [[0, 1, 2], [3, 4, 5], [6]]
        assert numbers(newest_first=True) == [[6, 5, 4], [3, 2, 1], [0]]
        assert numbers(start=ids[3].decode()) == [[3, 4, 5], [6]]
        assert numbers(start=ids[2].decode(), newest_first=True) == [[2, 1, 0]]
        # A last page that is full: the read after it finds nothing.
        client.xtrim(stream, maxlen=6, approximate=False)
        assert numbers() == [[1, 2, 3], [4, 5, 6]]
    finally:
        client.delete(stream)
    assert numbers() == []
