"""`rankgate serve` itself, started in a subprocess on a home of its own, and the
processes it starts (for the lifecycle and JSON-log tests).

Other Ray instances run on the machine (the session's server, other work): the
processes counted here are only those of the started command's process tree, of
the sessions of that tree (Ray's processes stay in `serve run`'s session), and
those whose environment names this home.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository


RANKGATE = str(Path(sys.executable).with_name("rankgate"))


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment a person would have: this home, the repository on PYTHONPATH,
    no REDIS_URL (the home's embedded Redis)."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "RANKGATE_REDIS_URL"}}
    env["RANKGATE_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
    )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks since boot: a reused pid is another process
    ppid: int
    sid: int
    state: str


def proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[19]), int(fields[1]), int(fields[3]), fields[0])


def all_procs() -> list[Proc]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            p = proc(int(entry.name))
            if p is not None:
                found.append(p)
    return found


def names_home(pid: int, home: Path) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RANKGATE_HOME={home}".encode() in environ


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def embedded_redis_pid(home: Path) -> int | None:
    try:
        return int((home / "redis" / "valkey.pid").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class CliServer:
    """A started command that runs `rankgate serve` (directly or inside a wrapper)."""

    process: subprocess.Popen[bytes]
    home: Path
    port: int
    log_path: Path
    api_key: str = ""
    snapshot: list[Proc] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240) -> float:
        """Seconds until /healthz answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server exited ({self.process.returncode}):\n{self.log()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready in {timeout_s}s:\n{self.log()[-3000:]}")

    def processes(self) -> list[Proc]:
        """Every process of the server now, but the embedded Redis (which outlives
        `rankgate serve` by design): the started command's tree, the sessions of
        that tree, and whatever names the home in its environment."""
        procs = all_procs()
        children: dict[int, list[Proc]] = {}
        for p in procs:
            children.setdefault(p.ppid, []).append(p)
        tree: dict[int, Proc] = {}
        todo = [p for p in procs if p.pid == self.process.pid]
        while todo:
            p = todo.pop()
            if p.pid not in tree:
                tree[p.pid] = p
                todo.extend(children.get(p.pid, []))
        sessions = {p.sid for p in tree.values()} - {os.getsid(0)}
        redis = embedded_redis_pid(self.home)
        return [
            p
            for p in procs
            if p.pid != redis
            and p.state != "Z"
            and (p.pid in tree or p.sid in sessions or names_home(p.pid, self.home))
        ]

    def left_behind(self) -> list[str]:
        """What of the snapshot still runs (zombies are dead)."""
        left = []
        for before in self.snapshot:
            now = proc(before.pid)
            if now is not None and now.start == before.start and now.state != "Z":
                left.append(f"{before.pid} {command_of(before.pid)}")
        return left

    def wait_gone(self, timeout_s: float) -> float:
        """Seconds until the started command has exited and nothing of the
        snapshot runs any more."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None and not self.left_behind():
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(
            f"after {timeout_s}s: exit {self.process.poll()}, left: {self.left_behind()}\n"
            f"{self.log()[-3000:]}"
        )

    def kill_everything(self) -> None:
        """Clean-up after a failed test: SIGKILL to what still runs of the server
        (taken now when no snapshot was: killing a wrapper such as unshare leaves
        its child running)."""
        import signal

        if not self.snapshot:
            self.snapshot = self.processes()
        for line in self.left_behind():
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start(
    home: Path,
    port: int,
    log_path: Path,
    wrapper: Sequence[str] = (),
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> CliServer:
    """`[*wrapper] rankgate serve --port PORT *args` in a session of its own."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(
        [*wrapper, RANKGATE, "serve", "--port", str(port), *args],
        env=env or cli_env(home),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return CliServer(process, home, port, log_path)


def run_cli(home: Path, *args: str) -> str:
    """A `rankgate` command on this home; its output."""
    result = subprocess.run(
        [RANKGATE, *args],
        env=cli_env(home),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
