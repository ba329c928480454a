"""The edge guards as plain code: the hardened HAProxy configuration and the
replica's own body read (milliseconds; the attacks themselves run in
test_edge_http.py against the real server)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import pytest
from starlette.requests import Request

from serving.contract.parsing import BadRequest
from serving.http import edge
from serving.http.body import read_body
from serving.http.errors import ClientGone, RequestTimeout

# A configuration as Ray Serve 2.60 generates it (folders replaced by @DIR@).
GENERATED = (Path(__file__).parents[1] / "data" / "ray_haproxy.cfg").read_text()
GUARDS = edge.EdgeGuards(
    header_timeout_s=5, body_timeout_s=4, idle_timeout_s=30, max_per_source=64, max_body_bytes=4096
)


def hardened(tmp_path: Path) -> tuple[Path, str]:
    source = tmp_path / "haproxy.cfg"
    source.write_text(GENERATED.replace("@DIR@", str(tmp_path)))
    for name in ("500.http",):
        (tmp_path / name).write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    args = edge.hardened_arguments(["-db", "-f", str(source), "-dR"], GUARDS)
    target = Path(args[2])
    return target, target.read_text()


def test_the_hardened_config_has_every_guard(tmp_path: Path) -> None:
    _, config = hardened(tmp_path)
    assert "timeout http-request 5000ms" in config
    assert "timeout client 30000ms" in config and "timeout client 3600s" not in config
    assert "http-request wait-for-body time 4000ms" in config
    assert "sc_conn_cur(0) gt 64" in config
    assert "req.hdr_val(content-length) gt 4096" in config
    assert f"http-request set-header {edge.RECEIVED_HEADER} %[date(0,us)]" in config
    # A cut answer: held as long as HAProxy waits for a server (Ray's `timeout server
    # 30s`), judged below half the buffer (Ray's `tune.bufsize 16384`).
    assert "http-response wait-for-body time 30s" in config
    assert "http-response return status 503 errorfile" in config
    assert "{ res.body_len lt 8192 }" in config
    assert "option httplog" not in config and "500.http" not in config
    assert config.count("rankgate-503.http") == 4  # 502, 503, 504 and a cut answer
    # The guards sit in the HTTP frontend, not in the metrics one.
    frontend = config.split("frontend http_frontend", 1)[1].split("\nbackend ", 1)[0]
    assert "wait-for-body" in frontend and "tcp-request connection reject" in frontend


def test_the_error_pages_are_complete_http_responses(tmp_path: Path) -> None:
    hardened(tmp_path)
    unavailable = (tmp_path / "rankgate-503.http").read_bytes().decode()
    head, body = unavailable.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 503 ") and "Retry-After: 1" in head
    assert f"Content-Length: {len(body.encode())}" in head
    assert (tmp_path / "rankgate-408.http").read_text().startswith("HTTP/1.1 408 ")


def test_haproxy_accepts_the_hardened_config(tmp_path: Path) -> None:
    target, _ = hardened(tmp_path)
    result = subprocess.run(
        [edge.real_binary(), "-c", "-f", str(target)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


CUTTING_REPLICA = """
import socket, sys, threading

listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))


def answer(connection):
    with connection:
        request = b""
        while b"\\r\\n\\r\\n" not in request:
            request += connection.recv(65536)
        method, path = request.split(b" ", 2)[:2]
        if path == b"/cut":  # dies between its headers and its body
            connection.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 60\\r\\n\\r\\n")
            return
        body = b"x" * 40000 if path == b"/long" else b'{"items":[]}'
        head = b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n" % len(body)
        connection.sendall(head + (b"" if method == b"HEAD" else body))


while True:
    threading.Thread(target=answer, args=(listener.accept()[0],)).start()
"""


def test_an_answer_cut_short_by_its_replica_is_a_503_with_retry_after(tmp_path: Path) -> None:
    """The real HAProxy on the hardened configuration, in front of a replica that writes
    an answer's headers and dies before its body: the client gets the edge's 503 with
    Retry-After, never a 200 whose body breaks off. Whole answers pass unchanged,
    long ones (past the buffer) and HEAD's (headers only) included."""
    import sys

    import httpx

    from serving.ops.launch import free_port

    target, config = hardened(tmp_path)
    port, replica = free_port(), free_port()
    config = config.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{port}")
    config = config.replace("127.0.0.1:30001", f"127.0.0.1:{replica}")
    for fixed in ("bind :50753", "bind *:54627"):
        config = config.replace(fixed, f"bind 127.0.0.1:{free_port()}")
    target.write_text(config)
    script = tmp_path / "replica.py"
    script.write_text(CUTTING_REPLICA)
    processes = [
        subprocess.Popen([sys.executable, str(script), str(replica)]),
        subprocess.Popen([edge.real_binary(), "-db", "-f", str(target)], cwd=tmp_path),
    ]
    url = f"http://127.0.0.1:{port}"
    try:

        def whole_answered() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.post(f"{url}/whole", timeout=2).status_code == 200
            return False

        deadline = time.monotonic() + 10  # HAProxy up and its health check passed
        while not whole_answered() and time.monotonic() < deadline:
            time.sleep(0.1)
        cut = httpx.post(f"{url}/cut", timeout=10)
        assert cut.status_code == 503, cut.text
        assert cut.headers["retry-after"] == "1" and cut.json()["error"] == "unavailable"
        whole = httpx.post(f"{url}/whole", timeout=10)
        assert (whole.status_code, whole.json()) == (200, {"items": []})
        long = httpx.post(f"{url}/long", timeout=10)
        assert (long.status_code, len(long.content)) == (200, 40000)
        head = httpx.head(f"{url}/whole", timeout=10)
        assert (head.status_code, head.headers["content-length"]) == (200, "12")
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_a_config_of_another_shape_is_refused_not_served_unguarded(tmp_path: Path) -> None:
    source = tmp_path / "haproxy.cfg"
    source.write_text(GENERATED.replace("option httplog", "option tcplog"))
    with pytest.raises(edge.EdgeConfigError, match="option httplog"):
        edge.hardened_arguments(["-f", str(source)], GUARDS)
    source.write_text(GENERATED.replace("timeout server 30s", ""))
    with pytest.raises(edge.EdgeConfigError, match="timeout server"):
        edge.hardened_arguments(["-f", str(source)], GUARDS)


def test_guards_round_trip_through_the_environment() -> None:
    assert edge.EdgeGuards.from_env(GUARDS.to_env()) == GUARDS


def http_request(messages: list[dict[str, object]], content_length: int | None = None) -> Request:
    """A real Starlette request whose body arrives as `messages` (then nothing more)."""
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/rank", "headers": headers}
    pending = list(messages)

    async def receive() -> dict[str, object]:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # a client that stopped sending
        raise AssertionError("unreachable")

    return Request(scope, receive)


def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    request = http_request([{"type": "http.request", "body": b'{"user', "more_body": True}])
    with pytest.raises(RequestTimeout) as raised:
        asyncio.run(read_body(request, 4096, timeout_s=0.05))
    assert raised.value.status_code == 408


def test_a_client_that_disconnects_is_a_499_not_a_500() -> None:
    request = http_request(
        [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    )
    with pytest.raises(ClientGone) as raised:
        asyncio.run(read_body(request, 4096, timeout_s=1))
    assert raised.value.status_code == 499


def test_a_declared_body_over_the_limit_is_refused_before_reading() -> None:
    request = http_request([], content_length=104857600)
    with pytest.raises(BadRequest) as raised:
        asyncio.run(read_body(request, 4096, timeout_s=1))
    assert raised.value.status_code == 413


def test_a_whole_body_is_read() -> None:
    request = http_request(
        [
            {"type": "http.request", "body": b'{"a":', "more_body": True},
            {"type": "http.request", "body": b"1}", "more_body": False},
        ]
    )
    assert asyncio.run(read_body(request, 4096, timeout_s=1)) == b'{"a":1}'
