"""What `rankgate serve` becomes once setup is done: a small process that runs
`serve run` in the foreground and waits on it.

Setup imports Feast, pandas, onnx and the model trainers; a process that only
waits on `serve run` should not keep them for the server's whole life. So
`rankgate serve` sets up, then replaces itself (exec, same process id) with
`python -S` running serving.supervisor, which imports only the standard library:

- it echoes `serve run`'s output and records the server in
  `<home>/ray/server.json` (config, port, Ray dashboard address) so that
  `rankgate model promote` can apply routing changes to it; the file is removed
  when the server stops;
- it says "rankgate ready at ..." once /healthz answers;
- Ctrl-C or SIGTERM (to it or to its process group) reaches `serve run` as
  SIGINT, which shuts its Ray instance down, HAProxy included (see `supervise`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rankgate.home import Home

SERVER_FILE = Path("ray") / "server.json"


@dataclass
class ServerInfo:
    """What a running `rankgate serve` (or the test server) left in `<home>/ray/server.json`."""

    base_config: Path
    port: int
    dashboard: str

    @classmethod
    def path(cls, home: Home) -> Path:
        return home.root / SERVER_FILE

    @classmethod
    def read(cls, home: Home) -> ServerInfo | None:
        return cls.read_file(cls.path(home))

    @classmethod
    def read_file(cls, path: Path) -> ServerInfo | None:
        try:
            raw = json.loads(path.read_text())
            return cls(Path(raw["base_config"]), int(raw["port"]), str(raw["dashboard"]))
        except (OSError, ValueError, KeyError):
            return None

    def write(self, home: Home) -> None:
        self.write_file(self.path(home))

    def write_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "base_config": str(self.base_config),
            "port": self.port,
            "dashboard": self.dashboard,
        }
        path.write_text(json.dumps(payload) + "\n")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any] | None:
        """/healthz's answer, or None (not up, not healthy). Straight to 127.0.0.1,
        never through an HTTP proxy of the environment."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                return None
            answer = json.loads(body)
            return answer if isinstance(answer, dict) else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            connection.close()


DASHBOARD_LINE = re.compile(r"dashboard at \S*?(http://[0-9.]+:\d+)")


def dashboard_address(text: str) -> str | None:
    """The Ray dashboard address `serve run` prints when it starts a local instance."""
    found = DASHBOARD_LINE.findall(text)
    return found[-1] if found else None


def supervise(
    server_file: Path,
    base_config: Path,
    port: int,
    command: list[str],
    env: dict[str, str] | None = None,
) -> int:
    """Run `command` (`serve run`) in the foreground, echoing its output; record the
    server in `server_file` while it runs.

    Ctrl-C (SIGINT) and SIGTERM, to this process or to its process group, reach the
    command as SIGINT: `serve run` shuts Serve down cleanly, HAProxy included. (A
    SIGTERM straight to `serve run` kills it at once and leaves HAProxy holding
    the port, so the command runs in its own session and only hears it from
    here.) A second signal terminates the command's session."""
    dashboard = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    children: list[subprocess.Popen[str]] = []
    signals: list[int] = []

    def stop(signum: int, frame: object) -> None:
        signals.append(signum)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                if len(signals) == 1:
                    child.send_signal(signal.SIGINT)
                else:
                    os.killpg(child.pid, signal.SIGTERM)

    # Handled here, not ignored: a handled signal is back to its default in the
    # command (an ignored one, as in a background job, would stay ignored).
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    children.append(process)
    info = ServerInfo(base_config, port, dashboard)

    def announce_when_ready() -> None:
        # Ray's own "deployed" line can sit in a log buffer: say it plainly here.
        while process.poll() is None:
            if info.health() is not None:
                print(
                    f"rankgate ready at {info.base_url} (callers need an API key: "
                    "rankgate keys create APP --purpose PURPOSE)",
                    flush=True,
                )
                return
            time.sleep(0.5)

    threading.Thread(target=announce_when_ready, daemon=True).start()
    try:
        info.write_file(server_file)
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            found = dashboard_address(line)
            if found:
                ServerInfo(base_config, port, found).write_file(server_file)
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server_file.unlink(missing_ok=True)


# `-S` leaves site-packages off the path, and with it an installed rankgate: the
# folder this package was imported from (site-packages, or a checkout) is added by
# hand, after the standard library.
BOOT = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from serving.supervisor import main; sys.exit(main(sys.argv[1:]))"
)


def command_line(server_file: Path, base_config: Path, port: int, command: list[str]) -> list[str]:
    """How to start this module as its own process (`-S`: it needs no site-packages)."""
    return [
        sys.executable,
        "-S",
        "-c",
        BOOT,
        str(Path(__file__).resolve().parent.parent),
        str(server_file),
        str(base_config),
        str(port),
        "--",
        *command,
    ]


def main(argv: list[str]) -> int:
    server_file, base_config, port, separator, *command = argv
    if separator != "--" or not command:
        print("usage: serving.supervisor SERVER_FILE BASE_CONFIG PORT -- COMMAND...")
        return 2
    return supervise(Path(server_file), Path(base_config), int(port), command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
