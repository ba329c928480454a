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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
print(json.dumps({"command": command, "env": process_env(env, True, name)}))
"""
"""Run in the earlier build's checkout: its command and environment, as JSON."""


def launch(build: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The earlier build's `serve run` command on `port` and its environment, from
    its own code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(build)
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
    return list(found["command"]), dict(found["env"])


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


@contextlib.contextmanager
def started(
    work: Workload, build: Path, port: int
) -> Iterator[tuple[str, subprocess.Popen[bytes], list[dict[str, Any]]]]:
    """The earlier build's server on `port`, answering, its replicas checked; yields
    its /v1/rank URL, its process and what its replicas were seen to run."""
    url = f"http://127.0.0.1:{port}/v1/rank"
    log = work.env.home.root / "bench" / f"{EARLIER}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    work.say(f"• {LABEL} from {build}: starting on port {port}")
    command, env = launch(build, port)
    process = start_server(command, env, log, cwd=build)
    try:
        wait_ready(url, work.bodies[0], process, log, work.api_key)
        seen = replicas_seen(process.pid)
        check_replicas(build, seen)
        work.say(f"    its replicas run {build}'s code: {seen}")
        yield url, process, seen
    finally:
        stop_server(process)
