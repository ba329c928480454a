"""Reading a request: its body within the limits, and how long it queued before a replica took it."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.requests import ClientDisconnect

from serving.contract.config import ServingConfig
from serving.contract.parsing import BadRequest
from serving.contract.schemas import ErrorProblem
from serving.http import edge
from serving.http.errors import ClientGone, RequestTimeout


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, read within `timeout_s`: a slow client gets a 408 and frees its slot."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > max_bytes
    ):
        raise BadRequest(
            [ErrorProblem(field="body", problem=f"larger than {max_bytes} bytes")], 413
        )
    body = b""
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise BadRequest(
                        [ErrorProblem(field="body", problem=f"larger than {max_bytes} bytes")],
                        413,
                    )
    except TimeoutError as exc:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from exc
    except ClientDisconnect as exc:
        raise ClientGone("the client disconnected before its body was read") from exc
    return body


async def body_of(request: Request, config: ServingConfig) -> bytes:
    return await read_body(request, config.limits.max_body_bytes, config.connections.body_timeout_s)


def queued_ms(request: Request) -> float:
    """How long the request waited before this replica took it up: from the arrival
    stamp the edge (HAProxy) set, or 0 where no edge stamps (HAProxy mode off).

    Never negative (clocks of two nodes may differ a little); a client that sets
    the header itself can only shorten its own budget."""
    raw = request.headers.get(edge.RECEIVED_HEADER)
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return 0.0
    return max(time.time() * 1000.0 - int(raw) / 1000.0, 0.0)
