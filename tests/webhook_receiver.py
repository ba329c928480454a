"""A real webhook receiver for the notification tests: an HTTP server on 127.0.0.1 in a
thread (the standard library's), answering with the statuses it is given in turn
(then 200), or hanging, and keeping every request it got."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int
    """The status it was answered with (0: hung up on before an answer)."""


class WebhookReceiver:
    """`statuses`: the answers to the first requests, in order (200 after them);
    `hang_s`: each request waits this long (or until the receiver closes) first."""

    def __init__(self, statuses: list[int] | None = None, hang_s: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.hang_s = hang_s
        self.received: list[Received] = []
        self.hanging = threading.Event()
        """Set once a request is being held (hang_s)."""
        self.closing = threading.Event()
        self.lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.hang_s:
                    receiver.hanging.set()
                    receiver.closing.wait(receiver.hang_s)
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                    receiver.lock.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, count: int, timeout_s: float) -> list[Received]:
        """The requests received once there are `count` (or the time is up)."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while len(self.received) < count and time.monotonic() < deadline:
                self.lock.wait(max(deadline - time.monotonic(), 0.01))
            return list(self.received)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
