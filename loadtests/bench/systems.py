"""What the benchmark starts and how it loads it: the systems (rankgate, the floor,
the naive graph, rankgate without its audit log, rankgate with two ingress
replicas), each on a free loopback port;
the request bodies; the drivers (wrk, else the Python driver of loadtests.drive).
The runner (loadtests/bench/run.py) interleaves them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests import log_tail
from loadtests.bench.report import (
    FLOOR,
    OURS,
)
from loadtests.bench.wrk import ensure_wrk, run_wrk
from rankgate.core.errors import RankgateError
from rankgate.core.pseudonym import user_key
from rankgate.core.settings import SOURCE_CHECKOUT, put_checkout_on_path
from rankgate.governance.api_keys import temporary_key
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from serving.ops.launch import (
    derived_config,
    ingress_deployment,
    serve_binary,
    serve_env,
    serve_run_command,
    start_server,
    stop_server,
)

Say = Callable[[str], None]


@dataclass
class System:
    name: str
    label: str
    command: Callable[[Environment, int], list[str]]
    fast_path: bool


def _rankgate_command(env: Environment, port: int) -> list[str]:
    return serve_run_command(derived_config(env.home, port=port, name="bench"))


def _rankgate_no_audit_command(env: Environment, port: int) -> list[str]:
    # The same server with the decision audit log off: the difference is its cost.
    user_config = ingress_deployment()["user_config"]
    user_config["audit"] = {**user_config.get("audit", {}), "enabled": False}
    return serve_run_command(
        derived_config(env.home, port=port, user_config=user_config, name="bench-no-audit")
    )


def _rankgate_two_replicas_command(env: Environment, port: int) -> list[str]:
    # The same server with one ingress replica per core of a 2-core machine (each takes
    # num_cpus 0.5 of serve_config.yaml): how far a second replica takes the peak.
    return serve_run_command(
        derived_config(env.home, port=port, name="bench-two-replicas", ingress_replicas=2)
    )


def _naive_command(env: Environment, port: int) -> list[str]:
    # Ray Serve's defaults everywhere except the port.
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "naive",
                "route_prefix": "/",
                "import_path": "loadtests.baselines.naive_graph:app",
            }
        ],
    }
    path = env.home.root / "bench" / "naive_graph.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return [serve_binary(), "run", str(path), "--address", "local"]


def _plain_command(env: Environment, port: int) -> list[str]:
    return [sys.executable, "-m", "loadtests.baselines.plain_fastapi", "--port", str(port)]


SYSTEMS = [
    System(
        OURS,
        "rankgate (Ray Serve, HAProxy ingress, in-process stages)",
        _rankgate_command,
        True,
    ),
    System(
        "rankgate_no_audit",
        "rankgate, audit log off (to measure its cost)",
        _rankgate_no_audit_command,
        True,
    ),
    System(
        "rankgate_two_replicas",
        "rankgate, two ingress replicas",
        _rankgate_two_replicas_command,
        True,
    ),
    System("naive_graph", "naive Ray Serve graph", _naive_command, False),
    System(FLOOR, "floor: plain FastAPI, one process", _plain_command, False),
]


def request_bodies(env: Environment, count: int = 200) -> list[dict[str, Any]]:
    """Personalizable requests (consent granted for the policy's first purpose, in its
    first region), the whole catalogue as candidates."""
    from rankgate.governance.policy import load_policy

    policy = load_policy()
    purpose, region = next(iter(policy.purposes)), next(iter(policy.regions))
    ids = env.project.demo_user_ids()
    states = env.consent.states([user_key(u) for u in ids], purpose)
    granted = [u for u, s in zip(ids, states, strict=True) if s == ConsentState.GRANTED][:count]
    if not granted:
        raise RankgateError(
            f"no demo user has consent granted for {purpose}: the benchmark ranks the demo "
            "users with their made-up consent (`rankgate setup --demo-consent`)"
        )
    return [{"user_id": u, "purpose": purpose, "region": region, "k": 10} for u in granted]


def process_env(env: Environment, fast_path: bool, name: str = OURS) -> dict[str, str]:
    """A server's environment. A fast-path server other than the main one gets
    HAProxy files of its own, so two can run side by side on one home."""
    assert env.redis_url is not None
    if fast_path:
        return serve_env(env.home, env.redis_url, instance="" if name == OURS else name)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    base.update(
        RANKGATE_HOME=str(env.home.root),
        REDIS_URL=env.redis_url,
    )
    put_checkout_on_path(base)
    return base


START_ATTEMPTS = 2
"""How many times a server that exits before it answers is started (see `started_process`)."""

FALLBACK_GRACE_S = 30.0
"""How long a server that answers only with fallbacks gets to start personalizing."""


def personalized(answer: Any) -> tuple[bool, str | None]:
    """Whether a rank answer is a personalized decision (items, no fallback); else the
    fallback's reason and detail, when it names one."""
    if not isinstance(answer, dict) or not answer.get("items"):
        return False, None
    fallback = answer.get("fallback")
    if not fallback:
        return True, None
    detail = f" ({fallback['detail']})" if fallback.get("detail") else ""
    return False, f"{fallback.get('reason')}{detail}"


def wait_ready(
    url: str,
    body: dict[str, Any],
    process: subprocess.Popen[bytes],
    log: Path,
    api_key: str,
    timeout_s: float = 240,
    interval_s: float = 0.5,
    progress: Callable[[], None] | None = None,
) -> None:
    """Until a rank request gets a personalized answer (200, items, no fallback);
    `progress` is called at each try. A server that answers only with fallbacks for
    FALLBACK_GRACE_S is an error naming the reason: the benchmark measures decisions,
    and a fallback costs a fraction of one (an earlier build that cannot read this
    home's models answers `model_unavailable`)."""
    deadline = time.monotonic() + timeout_s
    first_fallback: float | None = None
    while time.monotonic() < deadline:
        if progress is not None:
            progress()
        if process.poll() is not None:
            raise ServerExited(process.returncode, log)
        try:
            response = httpx.post(
                url, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=5
            )
            if response.status_code == 200:
                ready, fallback = personalized(response.json())
                if ready:
                    return
                if fallback is not None:
                    first_fallback = first_fallback or time.monotonic()
                    if time.monotonic() - first_fallback > FALLBACK_GRACE_S:
                        raise RuntimeError(
                            f"server at {url} answers the benchmark's requests with the "
                            f"fallback {fallback} for {FALLBACK_GRACE_S:.0f} s, not "
                            f"personalized decisions; see {log}"
                        )
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(interval_s)
    raise RuntimeError(f"server not ready in {timeout_s:.0f}s; see {log}\n{log_tail(log)}")


class ServerExited(RuntimeError):
    """A server process ended before it answered; the message carries its log's tail."""

    def __init__(self, returncode: int, log: Path) -> None:
        super().__init__(f"server exited ({returncode}); see {log}\n{log_tail(log)}")
        self.returncode = returncode


def load_process(arguments: list[str], api_key: str, timeout_s: float) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", *arguments],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
        cwd=SOURCE_CHECKOUT,
        env={**os.environ, "RANKGATE_API_KEY": api_key},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments[:2])} failed: {result.stderr[-2000:]}")
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def drive(
    url: str,
    concurrency: int,
    duration: float,
    bodies_file: Path,
    api_key: str,
    extra: tuple[str, ...] = (),
    warmup: float | None = None,
) -> dict[str, Any]:
    """A closed-loop run of the Python driver in a process of its own."""
    arguments = ["loadtests.drive", url, "--concurrency", str(concurrency)]
    arguments += ["--duration", str(duration), "--bodies", str(bodies_file), *extra]
    if warmup is not None:
        arguments += ["--warmup", str(warmup)]
    return load_process(arguments, api_key, duration * 4 + 60)


def drive_open(
    url: str,
    rate: float,
    duration: float,
    warmup: float,
    bodies_file: Path,
    api_key: str,
    cpu_pids: list[int] | None = None,
) -> dict[str, Any]:
    """An open-loop run of the Python driver (requests due at a fixed rate); with
    `cpu_pids`, the CPU seconds those processes spent on the measured requests."""
    arguments = ["loadtests.drive", url, "--rate", f"{rate:.3f}", "--duration", str(duration)]
    arguments += ["--warmup", str(warmup), "--bodies", str(bodies_file)]
    if cpu_pids:
        arguments += ["--cpu-pids", ",".join(map(str, cpu_pids))]
    return load_process(arguments, api_key, (duration + warmup) * 4 + 60)


@dataclass
class Workload:
    """What every measured server gets: the same requests, levels and run lengths."""

    env: Environment
    levels: list[int]
    duration: float
    repeats: int
    bodies: list[dict[str, Any]]
    bodies_file: Path
    api_key: str
    say: Say
    folder: Path = field(default_factory=Path)
    """A temporary folder for this run's files."""


@contextlib.contextmanager
def workload(levels: list[int], duration: float, repeats: int, say: Say) -> Iterator[Workload]:
    """Request bodies in a file for the load processes, and a temporary API key."""
    env = Environment.open()
    bodies = request_bodies(env)
    with tempfile.TemporaryDirectory() as folder, temporary_key("bench") as api_key:
        bodies_file = Path(folder) / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        yield Workload(
            env, levels, duration, repeats, bodies, bodies_file, api_key, say, Path(folder)
        )


@contextlib.contextmanager
def started_process(
    work: Workload,
    name: str,
    label: str,
    command: list[str],
    port: int,
    fast_path: bool,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fresh server from `command` on `port`, answering; yields its /v1/rank URL and
    process, and stops it (SIGINT to its process group) afterwards.

    A server that exits before it answers is started once more, and the run says so
    with the first exit's log tail (kept as `<name>.failed.log`): starting a Ray
    instance on a busy machine can fail once without anything being wrong with the
    server measured, and a second exit is an error carrying its own log's tail."""
    url = f"http://127.0.0.1:{port}/v1/rank"
    log = work.env.home.root / "bench" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    work.say(f"• {label}: starting on port {port}")
    for attempt in range(START_ATTEMPTS):
        process = start_server(command, process_env(work.env, fast_path, name), log)
        try:
            wait_ready(url, work.bodies[0], process, log, work.api_key)
            break
        except ServerExited as exited:
            stop_server(process)
            if attempt + 1 == START_ATTEMPTS:
                raise
            kept = log.with_suffix(".failed.log")
            log.replace(kept)
            work.say(f"• {label}: {exited} (log kept as {kept}); starting it once more")
        except BaseException:
            stop_server(process)
            raise
    try:
        yield url, process
    finally:
        stop_server(process)


@contextlib.contextmanager
def started(
    work: Workload, name: str, label: str, command: list[str], port: int, fast_path: bool
) -> Iterator[str]:
    """A fresh server from `command` on `port`, answering; yields its /v1/rank URL."""
    with started_process(work, name, label, command, port, fast_path) as (url, _):
        yield url


@dataclass
class Driver:
    """Closed-loop load: wrk when there is one, else the Python driver."""

    wrk: str | None
    why: str
    warmup: float

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "python (loadtests.drive)"

    def closed(
        self,
        work: Workload,
        url: str,
        concurrency: int,
        bodies: list[dict[str, Any]],
        file: Path,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        """`api_key`: a server's own (default: the run's)."""
        key = api_key or work.api_key
        if self.wrk:
            encoded = [json.dumps(b).encode() for b in bodies]
            return run_wrk(self.wrk, url, concurrency, work.duration, self.warmup, encoded, key)
        return drive(url, concurrency, work.duration, file, key, warmup=self.warmup)


def choose_driver(choice: str, allow_install: bool, warmup: float, say: Say) -> Driver:
    if choice == "python":
        return Driver(None, "the Python driver was asked for (--driver python)", warmup)
    path, why = ensure_wrk(allow_install, say)
    if path is None and choice == "wrk":
        raise RuntimeError(f"--driver wrk: {why}")
    return Driver(path, why, warmup)
