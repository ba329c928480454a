"""`rankgate serve` stops cleanly however it was started, and takes its Ray instance
with it.

Each case starts the real command on a set-up home (its own, shared by these tests),
waits until it answers, sends the signal the situation sends, and checks that every
process it started (its process tree, the sessions of that tree, anything whose
environment names the home) is gone within the bound. The embedded Redis is not
one of them: `rankgate serve` reuses and leaves it (`rankgate redis stop` stops it),
except as a container's PID 1, where nothing outlives the container.

SIGTERM to the main pid (a process supervisor's stop) is checked by the JSON-logs run
of tests/deploy/test_logs.py, which needs a server of its own anyway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rankgate.core.home import Home
from rankgate.core.redis_server import EmbeddedRedis
from serving.ops.launch import free_port
from tests.cli_server import CliServer, command_of, start

# Measured here: 10-15 s from the signal to the last process (a replica drains for
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S = 5 s); the bound leaves room for
# a busy 2-core machine.
STOP_BOUND_S = 60.0


def signal_and_wait(server: CliServer, send: object) -> float:
    server.wait_ready()
    server.snapshot = server.processes()
    # The supervisor, serve run, Ray's processes, the replicas, HAProxy.
    assert len(server.snapshot) >= 10, [command_of(p.pid) for p in server.snapshot]
    send()  # type: ignore[operator]
    return server.wait_gone(STOP_BOUND_S)


def stopped_cleanly(server: CliServer, signal_name: str) -> None:
    log = server.log()
    assert f"rankgate stopped ({signal_name})" in log, log[-2000:]
    assert "Got KeyboardInterrupt, shutting down" in log, log[-2000:]  # serve run's clean path


def inner_pid(wrapper_pid: int) -> int:
    """The child of a wrapper (bash, unshare): the process that runs `rankgate serve`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in Path(f"/proc/{wrapper_pid}/task").iterdir():
            children = (entry / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.1)
    raise AssertionError(f"no child of {wrapper_pid}")


@pytest.mark.slow
def test_foreground_ctrl_c(cli_home: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C: SIGINT to the foreground process group."""
    server = start(cli_home, free_port(), tmp_path / "serve.log")
    try:
        took = signal_and_wait(server, lambda: os.killpg(server.process.pid, signal.SIGINT))
    finally:
        server.kill_everything()
    stopped_cleanly(server, "SIGINT")
    print(f"foreground Ctrl-C: everything gone {took:.1f} s after the signal")


@pytest.mark.slow
def test_background_job_interrupted(cli_home: Path, tmp_path: Path) -> None:
    """`rankgate serve &` from a script: the job inherits SIGINT ignored, and
    `kill -INT` still stops it."""
    shell = ["bash", "-c", '"$0" "$@" & wait']
    probe = subprocess.run(
        ["bash", "-c", "grep SigIgn /proc/self/status & wait"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(probe.stdout.split()[1], 16) & (1 << (signal.SIGINT - 1))  # ignored in a job
    server = start(cli_home, free_port(), tmp_path / "serve.log", wrapper=shell)
    try:
        job = inner_pid(server.process.pid)
        took = signal_and_wait(server, lambda: os.kill(job, signal.SIGINT))
    finally:
        server.kill_everything()
    stopped_cleanly(server, "SIGINT")
    print(f"background job, kill -INT: everything gone {took:.1f} s after the signal")


@pytest.mark.slow
def test_container_pid_1_sigterm(cli_home: Path, tmp_path: Path) -> None:
    """As a container's PID 1 (`unshare --pid --fork --mount-proc`: root and
    util-linux's unshare, as on this machine and CI; a container runtime does the same): the kernel drops every signal PID 1 does not handle, and
    PID 1 must reap the orphans and stop what is left before it ends. The home's
    embedded Redis is started inside the namespace, like in a container, and must
    be stopped cleanly (its data saved) rather than killed with the namespace."""
    EmbeddedRedis(Home(cli_home)).stop()
    redis_log = cli_home / "redis" / "valkey.log"
    redis_log.unlink(missing_ok=True)
    wrapper = ["unshare", "--pid", "--fork", "--mount-proc"]
    server = start(cli_home, free_port(), tmp_path / "serve.log", wrapper=wrapper)
    try:
        init = inner_pid(server.process.pid)
        status = Path(f"/proc/{init}/status").read_text().splitlines()
        namespace_pids = next(line for line in status if line.startswith("NSpid:")).split()
        assert namespace_pids[-1] == "1", namespace_pids  # PID 1 in its namespace
        took = signal_and_wait(server, lambda: os.kill(init, signal.SIGTERM))
    finally:
        server.kill_everything()
    stopped_cleanly(server, "SIGTERM")
    assert "stopping the container's other processes" in server.log()
    assert server.process.returncode == 0, server.log()[-2000:]
    # The embedded Redis got SIGTERM and saved its data before the namespace ended.
    stopped = redis_log.read_text()
    assert "Received SIGTERM" in stopped and "ready to exit" in stopped, stopped[-1500:]
    print(f"container PID 1, SIGTERM: everything gone {took:.1f} s after the signal")
