"""HTTP's own errors, and the one handler that turns every domain error into an answer.

Domain errors (rankgate.core.errors.RankgateError and its subclasses) carry their
status, their `error` name and the headers their answer needs; only this handler
maps them to responses, and counts the refusals.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from fastapi.responses import JSONResponse, Response

from rankgate.core.errors import RankgateError
from serving.contract.schemas import ErrorBody

CLIENT_CLOSED = 499
"""The status access logs use for a client that went away (nginx's convention)."""


class RequestTimeout(RankgateError):
    """The body did not arrive within `connections.body_timeout_s`."""

    status_code = 408
    error = rejection = "request_timeout"
    # A client that sent too slowly is not kept: its connection is closed.
    headers = MappingProxyType({"Connection": "close"})


class ClientGone(RankgateError):
    """The client went away before its request was read: nobody to answer."""

    status_code = CLIENT_CLOSED
    rejection = "client_closed"


class EventsNotDeclared(RankgateError):
    """The project declares no event types (rankgate.yaml `events`)."""

    status_code = 404
    error = "events_not_declared"
    rejection = "events_not_declared"


class NotConfigured(RankgateError):
    """The replica has not applied a serving config yet."""

    status_code = 503
    error = "not_configured"


def error_response(exc: RankgateError, count_rejection: Callable[[str], None]) -> Response:
    """The answer to a domain error; `count_rejection` counts a refused request."""
    if exc.rejection is not None:
        count_rejection(exc.rejection)
    if exc.status_code == CLIENT_CLOSED:
        # Logged as 499 (client closed), never as a server error; nobody reads the body.
        return Response(status_code=CLIENT_CLOSED)
    if exc.problems:
        body = ErrorBody(error=exc.error, problems=list(exc.problems))
    else:
        body = ErrorBody(error=exc.error, detail=exc.message)
    headers = dict(exc.headers) if exc.headers else None
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=exc.status_code, headers=headers
    )
