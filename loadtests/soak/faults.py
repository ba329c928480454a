"""The soak's faults: what each does, when it runs, and how long until service is back.

Each fault runs in a thread of its own at its time in the schedule, so two may
overlap. Its `FaultRun` says when it started, when the injection was over, and
how long after that the service was back (`recovered_s`): a personalized answer to
a request due after the end, plus what the fault itself needs (the replica count
restored, the consumer caught up, the routing or policy in place).

- `redis_kill`: withdrawals of consent, each acknowledged, then SIGKILL of the
  embedded Redis right away; restarted 2 s later on the same address.
- `replica_kill`: SIGKILL of the youngest RankIngress replica (Ray starts another),
  so that the oldest lives through the run and its memory can be judged over it.
- `consumer_kill`: SIGKILL of the event consumer's replica.
- `slow_redis`: Redis answers nothing for 400 ms out of every 500 ms, for 10 s
  (`CLIENT PAUSE 400 ALL`, repeated).
- `canary`: `rankgate model promote <other version> --canary 20 --force`.
- `rollback`: `rankgate model rollback`.
- `policy_redeploy`: `rankgate policy deploy` of the policy in place.
- `haproxy_reload`: one more RankIngress replica (`serve deploy`), then back: Ray
  regenerates HAProxy's configuration and reloads it each time.
- `node_loss` (the multi-node variant, `--soak-nodes`): a worker node and every
  process on it removed at once, a new node (empty cache) added `NODE_DOWN_S`
  later; back when its replica serves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtests.ray_metrics import own_processes
from loadtests.soak.server import SoakServer
from loadtests.soak.traffic import Traffic
from rankgate.core import redis_keys
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import EmbeddedRedis, connect
from rankgate.governance.consent import ConsentState, ConsentStore

RECOVERY_LIMIT_S = 120.0
WITHDRAWALS_PER_KILL = 10
ALL = (
    "redis_kill",
    "canary",
    "replica_kill",
    "slow_redis",
    "policy_redeploy",
    "consumer_kill",
    "rollback",
    "haproxy_reload",
)
CLUSTER = (
    "node_loss",
    "redis_kill",
    "canary",
    "replica_kill",
    "slow_redis",
    "policy_redeploy",
    "consumer_kill",
    "rollback",
)
"""The multi-node variant's: node loss, and no HAProxy (the cluster's head runs Ray
Serve's proxy, as `rankgate cluster config` deploys it)."""
NODE_DOWN_S = 15.0
SHORT = ("redis_kill", "canary", "slow_redis", "consumer_kill", "policy_redeploy", "rollback")
"""The short variant's (the suite's): no replica killed, no scaling (the session
server has one RankIngress replica)."""


@dataclass
class FaultRun:
    name: str
    started: float
    ended: float = 0.0
    recovered_s: float | None = None
    detail: str = ""
    error: str = ""


@dataclass
class Context:
    server: SoakServer
    traffic: Traffic
    versions: tuple[str, str]
    """(stable, canary) versions for the promotion."""
    cli_env: dict[str, str]
    runs: list[FaultRun] = field(default_factory=list)
    withdrawals: Counter[str] = field(default_factory=Counter)
    """Consent withdrawals made right before Redis kills: acknowledged, read back, lost."""
    losses: list[float] = field(default_factory=list)
    """Seconds of the run at which a replica behind Ray Serve's proxy was lost (a node,
    or one replica, in the multi-node variant): its requests in flight fail with 500
    (docs/cluster.md, Node loss)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def processes(server: SoakServer, title: str) -> list[int]:
    return server.pids(title)


def haproxy_pids(server: SoakServer) -> set[int]:
    return {pid for pid, command in own_processes(server.home.root, b"haproxy") if b"-f" in command}


def rankgate(ctx: Context, *args: str) -> str:
    """The operator's command, as an operator runs it: in a process of its own, so that
    a promotion's model checks never hold the traffic driver's interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "rankgate.cli", *args],
        env=ctx.cli_env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rankgate {' '.join(args)}: {(result.stderr or result.stdout)[-500:]}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def personalized_after(ctx: Context, since: float) -> bool:
    """A personalized answer to a request due after `since` (once the traffic is
    over, a request of its own)."""
    if ctx.traffic.done:
        probe = httpx.post(
            f"{ctx.server.base_url}/v1/rank",
            json=ctx.traffic.granted[0],
            headers=ctx.traffic.headers,
            timeout=5,
        )
        return probe.status_code == 200 and not probe.json().get("fallback")
    answers = ctx.traffic.ledger.answers
    for answer in reversed(answers[-400:]):
        if answer.due < since:
            break
        if answer.what == "personalized":
            return True
    return False


def wait_until(condition: Callable[[], bool], limit_s: float = RECOVERY_LIMIT_S) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        with contextlib.suppress(Exception):  # a probe that fails: not yet recovered
            if condition():
                return time.monotonic() - started
        time.sleep(0.2)
    return None


# -- the faults: each returns (detail, extra condition for recovery) -----------------
Injected = tuple[str, Callable[[], bool] | None]


def redis_kill(ctx: Context) -> Injected:
    embedded = EmbeddedRedis(ctx.server.home)
    withdrawn = ctx.traffic.call(ctx.traffic.withdraw(WITHDRAWALS_PER_KILL))
    pid = int(embedded.pid_path.read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(2.0)
    embedded.ensure_running()
    # Read back at once: each withdrawal still held that the mix has not written since.
    ledger = ctx.traffic.ledger
    still = [
        p for p in withdrawn if ledger.consent_acked.get(p) is False and p not in ledger.uncertain
    ]
    store = ConsentStore(connect(), ctx.server.home.namespace)
    states = store.states([user_key(p) for p in still], ctx.traffic.purpose)
    lost = sum(1 for s in states if s != ConsentState.DENIED)
    with ctx.lock:
        ctx.withdrawals["acknowledged"] += len(withdrawn)
        ctx.withdrawals["read_back"] += len(still)
        ctx.withdrawals["lost"] += lost
    return (
        f"{len(withdrawn)} withdrawals acknowledged right before SIGKILL of pid {pid}; "
        f"after the restart {len(still) - lost} of {len(still)} read back as withdrawn"
    ), None


def youngest(pids: list[int]) -> int:
    """The last started of `pids`. Killing the oldest replica each round left none
    older than 40 minutes in two hours: too short a life to tell whether a replica's
    memory grows (loadtests/soak/memory.py `judge`)."""

    def started(pid: int) -> float:
        try:
            return float(psutil.Process(pid).create_time())
        except psutil.Error:
            return 0.0

    return max(pids, key=started)


def replica_kill(ctx: Context) -> Injected:
    before = processes(ctx.server, "ServeReplica:rankgate:RankIngress")
    victim = youngest(before)
    os.kill(victim, signal.SIGKILL)
    if ctx.server.nodes is not None:  # Ray Serve's proxy answers 500 for its requests
        with ctx.lock:
            ctx.losses.append(ctx.traffic.now())
    want = ctx.server.replicas()

    def back() -> bool:
        now = processes(ctx.server, "ServeReplica:rankgate:RankIngress")
        return len(now) >= want and victim not in now

    return f"SIGKILL of RankIngress replica pid {victim} ({len(before)} running)", back


def consumer_kill(ctx: Context) -> Injected:
    before = processes(ctx.server, "ServeReplica:rankgate:EventConsumer")
    os.kill(before[0], signal.SIGKILL)
    client: Any = connect()
    stream = redis_keys.events(ctx.server.home.namespace)

    def caught_up() -> bool:
        now = processes(ctx.server, "ServeReplica:rankgate:EventConsumer")
        if not now or before[0] in now:
            return False
        groups = client.xinfo_groups(stream)
        return all(int(g.get("pending", 0)) == 0 and int(g.get("lag") or 0) < 50 for g in groups)

    return f"SIGKILL of the event consumer, pid {before[0]}", caught_up


def slow_redis(ctx: Context) -> Injected:
    client = connect()
    until = time.monotonic() + 10.0
    pauses = 0
    while time.monotonic() < until:
        client.execute_command("CLIENT", "PAUSE", 400, "ALL")
        pauses += 1
        time.sleep(0.5)
    return f"{pauses} pauses of 400 ms in 10 s (CLIENT PAUSE ALL)", None


def routing_has(ctx: Context, variant: str) -> Callable[[], bool]:
    def check() -> bool:
        routing: Any = ctx.server.health().get("routing", {})
        weight = float(routing.get("canary_weight", 0))
        return weight > 0 if variant == "canary" else weight == 0

    return check


def canary(ctx: Context) -> Injected:
    out = rankgate(ctx, "model", "promote", ctx.versions[1], "--canary", "20", "--force")
    return out, routing_has(ctx, "canary")


def rollback(ctx: Context) -> Injected:
    out = rankgate(ctx, "model", "rollback")
    return out, routing_has(ctx, "stable")


def policy_redeploy(ctx: Context) -> Injected:
    return rankgate(ctx, "policy", "deploy"), None


def haproxy_reload(ctx: Context) -> Injected:
    before = haproxy_pids(ctx.server)
    seen: set[int] = set()
    replicas = ctx.server.replicas()

    def count(wanted: int) -> Callable[[], bool]:
        def check() -> bool:
            seen.update(haproxy_pids(ctx.server))  # each reload starts a new HAProxy
            return len(processes(ctx.server, "ServeReplica:rankgate:RankIngress")) == wanted

        return check

    ctx.server.deploy_with_replicas(replicas + 1)
    up = wait_until(count(replicas + 1), 90)
    ctx.server.deploy_with_replicas(replicas)
    down = wait_until(count(replicas), 90)
    reloads = len(seen - before)

    def took(seconds: float | None) -> str:
        return "not within 90 s" if seconds is None else f"in {seconds:.1f} s"

    detail = f"scaled to {replicas + 1} replicas ({took(up)}) and back ({took(down)}); "
    return detail + f"{reloads} new HAProxy processes (reloads)", count(replicas)


def node_loss(ctx: Context) -> Injected:
    nodes = ctx.server.nodes
    if nodes is None:
        raise RuntimeError("node_loss needs the multi-node variant (--soak-nodes)")
    title = "ServeReplica:rankgate:RankIngress"
    lost = next(iter(nodes.workers))
    nodes.remove(lost)
    with ctx.lock:
        ctx.losses.append(ctx.traffic.now())
    time.sleep(NODE_DOWN_S)
    added = nodes.add()
    want = ctx.server.replicas()

    def serving() -> bool:
        on_new = [pid for pid, _ in own_processes(nodes.home_of(added), title.encode())]
        return bool(on_new) and len(processes(ctx.server, title)) >= want

    return f"{lost} removed with its processes; {added} added {NODE_DOWN_S:.0f} s later", serving


FAULTS: dict[str, Callable[[Context], Injected]] = {
    "node_loss": node_loss,
    "redis_kill": redis_kill,
    "replica_kill": replica_kill,
    "consumer_kill": consumer_kill,
    "slow_redis": slow_redis,
    "canary": canary,
    "rollback": rollback,
    "policy_redeploy": policy_redeploy,
    "haproxy_reload": haproxy_reload,
}


def run_fault(ctx: Context, name: str) -> FaultRun:
    run = FaultRun(name, ctx.traffic.now())
    with ctx.lock:
        ctx.runs.append(run)
    try:
        run.detail, extra = FAULTS[name](ctx)
    except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
        run.error = f"{type(exc).__name__}: {exc}"[:300]
        extra = None
    run.ended = ctx.traffic.now()
    ended = run.ended
    run.recovered_s = wait_until(
        lambda: personalized_after(ctx, ended) and (extra is None or extra())
    )
    return run


def schedule(duration_s: float, names: tuple[str, ...], warmup_s: float) -> list[tuple[float, str]]:
    """(second, fault) for a run of `duration_s`: the faults in turn from `warmup_s`,
    evenly spaced, as many rounds as fit (a canary always before its rollback),
    leaving a quiet tail to recover; from the second round, a slow Redis overlaps
    the consumer's kill and a policy redeploy overlaps the replica's."""
    tail = max(20.0, duration_s * 0.08)
    span = duration_s - warmup_s - tail
    gap = max(8.0, min(150.0, span / max(1, len(names))))
    rounds = max(1, int(span // (gap * len(names))))
    plan: list[tuple[float, str]] = []
    at = warmup_s
    for round_ in range(rounds):
        for name in names:
            plan.append((at, name))
            if round_ >= 1 and name == "consumer_kill" and "slow_redis" in names:
                plan.append((at + 3.0, "slow_redis"))
            if round_ >= 1 and name == "replica_kill" and "policy_redeploy" in names:
                plan.append((at + 2.0, "policy_redeploy"))
            at += gap
    return sorted(plan)


def run_schedule(ctx: Context, plan: list[tuple[float, str]], stop: threading.Event) -> None:
    """Start each fault at its time (threads of their own); return once all are done."""
    threads = []
    for at, name in plan:
        while ctx.traffic.now() < at and not stop.is_set():
            time.sleep(0.2)
        if stop.is_set():
            break
        thread = threading.Thread(target=run_fault, args=(ctx, name), name=f"fault-{name}")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


def cli_environment(server: SoakServer) -> dict[str, str]:
    env = dict(os.environ)
    env["RANKGATE_HOME"] = str(server.home.root)
    checkout = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    return env
