"""Starting an earlier build of rankgate beside this one (`rankgate bench
--against-build DIR`), with its own code and its own launch settings.

Its command and environment are not this build's: a Python process with DIR first
on PYTHONPATH and DIR as its working folder runs the earlier build's own
loadtests.bench.systems (`_rankgate_command`, `process_env`: its serve_env, its serve
config's defaults) and prints them as JSON. The server then starts from DIR with
that environment as it is, so PYTHONPATH names DIR first and Ray, which adds the
driver's working folder to its workers' path, adds DIR too: the replicas import
the earlier build's packages. That is checked once the server answers, on every
replica (/proc/PID/environ and /proc/PID/cwd), and the run stops when a replica
would run other code.

A build's home is written in its own format (its manifests, its Feast repository,
its markers), which a build from before a change of format cannot read: an earlier
build that answered every request `model_unavailable` would look cheaper than it is.
So with the embedded Redis (REDIS_URL unset) the earlier build serves a home of its
own, `<home>/bench/earlier-<commit>`, prepared by its own `rankgate setup` at every
run (minutes the first time, next to nothing once done), with its own embedded Redis, whose CPU counts in its
stack as this build's Redis counts in this one's; it gets an API key of its own from
its own `rankgate keys create`, and the run stops unless every user the requests name
has consent granted there too. With REDIS_URL set, both builds share this home.

The earlier build writes its serve config where this build writes its own
(`<home>/ray/bench.yaml`); it is moved to a name of its own and this build's file
put back, so each running server keeps its own file.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil

from loadtests.bench import memory
from loadtests.bench.against import EARLIER
from loadtests.bench.systems import System, Workload, wait_ready
from serving.ops.launch import start_server, stop_server

LABEL = "earlier build (--against-build)"

LAUNCH = """
import json, sys
from pathlib import Path
from loadtests.bench.systems import _rankgate_command, process_env
from rankgate.ops.environment import Environment

port, name = int(sys.argv[1]), sys.argv[2]
env = Environment.open()
folder = env.home.root / "ray"
kept = {p: p.read_bytes() for p in folder.glob("*.yaml")} if folder.is_dir() else {}
command = _rankgate_command(env, port)
index, written = next((i, Path(a)) for i, a in enumerate(command) if a.endswith(".yaml"))
own = written.with_name(f"{name}.yaml")
written.replace(own)
if written in kept:
    written.write_bytes(kept[written])
command[index] = str(own)
try:
    from loadtests.bench.systems import request_bodies
except ImportError:
    granted = None
else:
    granted = [b["user_id"] for b in request_bodies(env, 10**9)]
print(json.dumps({"command": command, "env": process_env(env, True, name), "granted": granted}))
"""
"""Run in the earlier build's checkout: its command and environment, as JSON."""


@dataclass(frozen=True)
class Launch:
    """How the earlier build starts, as its own code says."""

    command: list[str]
    env: dict[str, str]
    granted: set[str] | None
    """The users with consent granted in its home (None: its code does not say)."""


@dataclass(frozen=True)
class EarlierHome:
    """Where the earlier build serves from: its home (None: this one) and its API key."""

    root: Path | None
    api_key: str


def build_env(build: Path, home: Path | None) -> dict[str, str]:
    """The environment of the earlier build's own commands: its checkout first on the
    path; its own home, with its own embedded Redis, when it has one."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(build)
    if home is not None:
        env["RANKGATE_HOME"] = str(home)
    return env


def cli(build: Path, home: Path, *arguments: str, timeout_s: float) -> str:
    """Run the earlier build's own `rankgate` (its [project.scripts] entry) on `home`;
    its standard output."""
    scripts = tomllib.loads((build / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["rankgate"].partition(":")
    code = (
        f"import sys; from {module} import {function} as main; "
        f"sys.argv = ['rankgate', *sys.argv[1:]]; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
        cwd=build,
        env=build_env(build, home),
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"--against-build: `rankgate {' '.join(arguments)}` of {build} on {home} failed: "
            f"{(result.stderr or result.stdout)[-2000:]}"
        )
    return result.stdout


def own_home(work: Workload, build: Path, commit: str) -> EarlierHome:
    """The earlier build's own home, set up by its own code, and an API key of its own
    for the requests' purpose; this home when REDIS_URL names a shared Redis (two
    homes in one Redis would write the same Feast keys)."""
    if os.environ.get("REDIS_URL"):
        return EarlierHome(None, work.api_key)
    root = work.env.home.root / "bench" / f"earlier-{commit[:12]}"
    # Its setup does what this home still lacks: everything the first time (minutes),
    # next to nothing once done.
    work.say(f"• {LABEL}: its own home {root}, set up by its own `rankgate setup`")
    root.mkdir(parents=True, exist_ok=True)
    cli(build, root, "setup", timeout_s=3600)
    purpose = work.bodies[0]["purpose"]
    printed = cli(
        build, root, "keys", "create", "bench-earlier", "--purpose", purpose, timeout_s=300
    )
    lines = [line.strip() for line in printed.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"--against-build: {build}'s `rankgate keys create` printed no key")
    return EarlierHome(root, lines[-1])


def redis_of(env: dict[str, str]) -> int | None:
    """The pid of the Redis-compatible server the environment's REDIS_URL names, when it
    listens on this machine: found by its port, not by this build's pid file, which an
    earlier build may keep elsewhere."""
    url = urlparse(env.get("REDIS_URL", ""))
    if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
        return None
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == url.port:
            return connection.pid
    return None


def check_users(bodies: list[dict[str, Any]], granted: set[str] | None) -> None:
    """Stop the run when a user the requests name may not be personalized by the
    earlier build: its answers would be cheaper fallbacks."""
    if granted is None:
        return
    missing = sorted({b["user_id"] for b in bodies} - granted)
    if missing:
        raise RuntimeError(
            f"--against-build: {len(missing)} of the requests' users have no consent granted "
            f"in the earlier build's home (first: {missing[0]})"
        )


def launch(build: Path, port: int, home: Path | None = None) -> Launch:
    """The earlier build's `serve run` command on `port` and its environment, from
    its own code, on `home` (default: this build's)."""
    env = build_env(build, home)
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(port), EARLIER],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=build,
        env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"--against-build: {build} could not say how it starts: {result.stderr[-2000:]}"
        )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    granted = found.get("granted")
    return Launch(
        list(found["command"]), dict(found["env"]), None if granted is None else set(granted)
    )


def system(build: Path) -> System:
    """The earlier build as the runner lists it (its name and label in the rounds and
    the report). It is never started from `System.command`: a command alone would
    lack its environment and folder, so `started` starts it."""

    def not_by_command(_env: object, _port: int) -> list[str]:
        raise RuntimeError(f"{LABEL} from {build} is started by loadtests.bench.earlier.started")

    return System(EARLIER, LABEL, not_by_command, True)


def replicas_seen(root: int) -> list[dict[str, Any]]:
    """Every Serve replica below `root`: its pid, first PYTHONPATH entry and working
    folder, as /proc shows them."""
    seen = []
    for pid in memory.tree(root):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                continue
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        path = next((v[11:].decode() for v in variables if v.startswith(b"PYTHONPATH=")), "")
        seen.append({"pid": pid, "pythonpath_first": path.split(os.pathsep)[0], "cwd": cwd})
    return seen


def check_replicas(build: Path, seen: list[dict[str, Any]]) -> None:
    """Stop the run when a replica of the earlier build would import other code."""
    if not seen:
        raise RuntimeError(f"--against-build: no replica of {build}'s server was found")
    wrong = [r for r in seen if Path(r["pythonpath_first"]) != build or Path(r["cwd"]) != build]
    if wrong:
        raise RuntimeError(f"--against-build: replicas would not run {build}'s code: {wrong}")


@dataclass(frozen=True)
class Started:
    """The earlier build's server, answering."""

    url: str
    """Its /v1/rank."""
    process: subprocess.Popen[bytes]
    replicas: list[dict[str, Any]]
    """What its replicas were seen to run."""
    home: EarlierHome
    redis_pid: int | None
    """Its own Redis, when it has one (counted in its stack)."""


@contextlib.contextmanager
def started(work: Workload, build: Path, port: int, commit: str) -> Iterator[Started]:
    """The earlier build's server on `port` (on its own home when it has one),
    answering, its replicas checked."""
    url = f"http://127.0.0.1:{port}/v1/rank"
    log = work.env.home.root / "bench" / f"{EARLIER}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    home = own_home(work, build, commit)
    where = f"its own home {home.root}" if home.root is not None else "this home"
    work.say(f"• {LABEL} from {build}: starting on port {port}, on {where}")
    found = launch(build, port, home.root)
    check_users(work.bodies, found.granted)
    process = start_server(found.command, found.env, log, cwd=build)
    try:
        wait_ready(url, work.bodies[0], process, log, home.api_key)
        seen = replicas_seen(process.pid)
        check_replicas(build, seen)
        work.say(f"    its replicas run {build}'s code: {seen}")
        redis = redis_of(found.env) if home.root is not None else None
        yield Started(url, process, seen, home, redis)
    finally:
        stop_server(process)
        if home.root is not None:
            # Its home's embedded Redis, started for this run, stops with it.
            try:
                cli(build, home.root, "redis", "stop", timeout_s=120)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                work.say(f"    its home's Redis was not stopped: {exc}")
