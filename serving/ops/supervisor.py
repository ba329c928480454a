"""What `rankgate serve` becomes once setup is done: a small process that runs
`serve run` in the foreground and waits on it.

Setup imports Feast, pandas, onnx and the model trainers; a process that only
waits on `serve run` should not keep them for the server's whole life. So
`rankgate serve` sets up, then replaces itself (exec, same process id) with
`python -S` running serving.ops.supervisor, which imports only the standard library:

- it echoes `serve run`'s output and records the server in
  `<home>/ray/server.json` (config, port, Ray dashboard address) so that
  `rankgate model promote` can apply routing changes to it; the file is removed
  when the server stops;
- it says "rankgate ready at ..." once /healthz answers;
- Ctrl-C or SIGTERM (to it or to its process group) reaches `serve run` as
  SIGINT, which shuts its Ray instance down, HAProxy included (see `supervise`);
- as a container's PID 1 it is the container's init: it reaps the orphans the
  container's processes leave, and once `serve run` is done it stops what is
  left (the embedded Redis saves its data) before the container ends;
- with `--log-format json` (RANKGATE_LOG_FORMAT=json) every line it prints is a
  JSON object: its own messages, and `serve run`'s output line by line.
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
    from rankgate.core.home import Home

SERVER_FILE = Path("ray") / "server.json"
LOG_FORMATS = ("text", "json")
# Every process of a container gets this long to stop once `serve run` is done,
# before PID 1 ends (and the kernel kills what is left).
REST_STOP_TIMEOUT_S = 10.0


@dataclass
class ServerInfo:
    """What a running `rankgate serve` (or the test server) left in `<home>/ray/server.json`."""

    base_config: Path
    port: int
    dashboard: str
    host: str = "127.0.0.1"
    log_format: str = "text"
    """What the server was started with: `rankgate model promote` derives its configs
    alike (http_options cannot change under a running server)."""

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
            return cls(
                Path(raw["base_config"]),
                int(raw["port"]),
                str(raw["dashboard"]),
                str(raw.get("host", cls.host)),
                str(raw.get("log_format", cls.log_format)),
            )
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
            "host": self.host,
            "log_format": self.log_format,
        }
        path.write_text(json.dumps(payload) + "\n")

    @property
    def local_host(self) -> str:
        """Where this machine reaches the server: loopback when it listens everywhere."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def base_url(self) -> str:
        return f"http://{self.local_host}:{self.port}"

    def health(self) -> dict[str, Any] | None:
        """/healthz's answer, or None (not up, not healthy). Straight to the server,
        never through an HTTP proxy of the environment."""
        connection = http.client.HTTPConnection(self.local_host, self.port, timeout=2)
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


LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def log_record(message: str, name: str, level: str = "INFO") -> str:
    """One JSON log line, with the keys Ray Serve's JSON logs use for the same facts."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    record = {"asctime": stamp, "levelname": level, "name": name, "message": message}
    return json.dumps(record, ensure_ascii=False)


def as_json_line(line: str, name: str) -> str:
    """A line of output as a JSON log line: kept when it is one already, else wrapped
    (its level read from the line, INFO when it names none)."""
    text = line.rstrip("\n")
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(text), dict):
                return text
    level = LEVEL_WORD.search(text)
    return log_record(text, name, level.group(1) if level else "INFO")


class Output:
    """What the supervisor prints, as text or as JSON lines."""

    def __init__(self, log_format: str) -> None:
        self.json = log_format == "json"

    def say(self, message: str, level: str = "INFO") -> None:
        print(log_record(message, "rankgate", level) if self.json else message, flush=True)

    def echo(self, line: str) -> None:
        """A line of `serve run`'s output."""
        sys.stdout.write(as_json_line(line, "serve run") + "\n" if self.json else line)
        sys.stdout.flush()


def reap_exited_orphans(keep: int) -> None:
    """Reap every child that has exited, except `keep` (its Popen waits for it).

    A container's PID 1 adopts every orphan in the container (Ray's processes once
    `serve run` is gone, the embedded Redis, which daemonizes); one nobody waits for
    stays a zombie until the container ends."""
    while True:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if found is None or found.si_pid == keep:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(found.si_pid, 0)


def stop_the_rest(timeout_s: float = REST_STOP_TIMEOUT_S) -> None:
    """As PID 1, once `serve run` is done: SIGTERM to every process left in the
    container, reaping them, then SIGKILL after `timeout_s`. When PID 1 exits the
    kernel kills what is left with SIGKILL; SIGTERM first lets the embedded Redis
    save its data."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)  # from PID 1: every other process of its namespace
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # nothing left
        if pid:
            continue
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)


def supervise(
    server_file: Path,
    base_config: Path,
    port: int,
    command: list[str],
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    log_format: str = "text",
) -> int:
    """Run `command` (`serve run`) in the foreground, echoing its output; record the
    server in `server_file` while it runs.

    Ctrl-C (SIGINT) and SIGTERM, to this process or to its process group, reach the
    command as SIGINT: `serve run` shuts Serve down cleanly, HAProxy included. (A
    SIGTERM straight to `serve run` kills it at once and leaves HAProxy holding
    the port, so the command runs in its own session and only hears it from
    here.) A second signal terminates the command's session. Both are handled,
    never left to their default: a signal a background job inherited as ignored
    still stops the server, and so does one sent to a container's PID 1 (which the
    kernel drops unless it is handled)."""
    dashboard = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    output = Output(log_format)
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
    info = ServerInfo(base_config, port, dashboard, host, log_format)
    container_init = os.getpid() == 1
    done = threading.Event()

    def announce_when_ready() -> None:
        # Ray's own "deployed" line can sit in a log buffer: say it plainly here.
        while process.poll() is None:
            if info.health() is not None:
                output.say(
                    f"rankgate ready at {info.base_url} (callers need an API key: "
                    "rankgate keys create APP --purpose PURPOSE)"
                )
                return
            time.sleep(0.5)

    def reap_while_running() -> None:
        while not done.wait(0.5):
            reap_exited_orphans(keep=process.pid)

    threading.Thread(target=announce_when_ready, daemon=True).start()
    if container_init:
        threading.Thread(target=reap_while_running, daemon=True).start()
    try:
        info.write_file(server_file)
        assert process.stdout is not None
        for line in process.stdout:
            output.echo(line)
            found = dashboard_address(line)
            if found:
                info.dashboard = found
                info.write_file(server_file)
        return process.wait()
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server_file.unlink(missing_ok=True)
        if container_init:
            output.say("stopping the container's other processes")
            stop_the_rest()
        if signals:
            output.say(f"rankgate stopped ({signal.Signals(signals[0]).name})")


# `-S` leaves site-packages off the path, and with it an installed rankgate: the
# folder this package was imported from (site-packages, or a checkout) is added by
# hand, after the standard library.
BOOT = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from serving.ops.supervisor import main; sys.exit(main(sys.argv[1:]))"
)


def command_line(
    server_file: Path,
    base_config: Path,
    port: int,
    command: list[str],
    host: str = "127.0.0.1",
    log_format: str = "text",
) -> list[str]:
    """How to start this module as its own process (`-S`: it needs no site-packages)."""
    return [
        sys.executable,
        "-S",
        "-c",
        BOOT,
        str(Path(__file__).resolve().parents[2]),
        str(server_file),
        str(base_config),
        str(port),
        host,
        log_format,
        "--",
        *command,
    ]


def main(argv: list[str]) -> int:
    server_file, base_config, port, host, log_format, separator, *command = argv
    if separator != "--" or not command or log_format not in LOG_FORMATS:
        print(
            "usage: serving.ops.supervisor SERVER_FILE BASE_CONFIG PORT HOST text|json -- COMMAND..."
        )
        return 2
    return supervise(
        Path(server_file), Path(base_config), int(port), command, host=host, log_format=log_format
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
