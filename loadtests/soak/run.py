"""`rankgate bench --soak DURATION`: the whole run, from the peak to the report.

1. A server of its own (two RankIngress replicas), or the one given (the suite's).
2. The peak: the soak's own mix, closed loop at concurrency 8 for 8 s (answers
   per second); the soak's rate is `share` of it (50 % by default).
3. The traffic (loadtests/soak/traffic.py), the fault schedule
   (loadtests/soak/faults.py), a key created, used and revoked every `key_every_s`,
   the audit tail and the memory sampler, all at once, for `duration_s`.
4. The counts (loadtests/soak/ledger_checks.py) and the report
   (`<output>/soak.md`, `soak.json`; the multi-node variant's `soak-cluster.*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench.run import redis_pid
from loadtests.bench.systems import request_bodies
from loadtests.soak import faults as soak_faults
from loadtests.soak.faults import Context, FaultRun
from loadtests.soak.ledger_checks import (
    AuditTail,
    audit_counts,
    consent_counts,
    drained,
    event_counts,
    outcome_totals,
)
from loadtests.soak.memory import MINUTE_S, MemorySampler
from loadtests.soak.redis_watch import RedisWatch
from loadtests.soak.report import render_markdown, requests_section, verdicts, windows_section
from loadtests.soak.server import SoakServer, started
from loadtests.soak.traffic import Traffic
from rankgate.core import redis_keys
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import connect
from rankgate.governance.api_keys import ApiKeyStore, temporary_key
from rankgate.governance.consent import ConsentState
from rankgate.governance.policy import load_policy
from rankgate.ops.environment import Environment
from serving.ops.serve_config import ServeConfig

Say = Callable[[str], None]
PEAK_CONCURRENCY = 8
PEAK_SECONDS = 8.0


def denied_bodies(env: Environment, purpose: str, region: str) -> list[dict[str, Any]]:
    ids = env.project.demo_user_ids()
    states = env.consent.states([user_key(u) for u in ids], purpose)
    return [
        {"user_id": u, "purpose": purpose, "region": region, "k": 10}
        for u, s in zip(ids, states, strict=True)
        if s == ConsentState.DENIED
    ][:200]


def measure_peak(
    base_url: str,
    api_key: str,
    granted: list[dict[str, Any]],
    denied: list[dict[str, Any]],
    purpose: str,
) -> float:
    """Answers per second of the soak's own mix, closed loop (no faults)."""
    probe = Traffic(base_url, api_key, granted, denied, purpose, f"peak-{uuid.uuid4().hex[:6]}")
    peak = asyncio.run(probe.closed(PEAK_CONCURRENCY, PEAK_SECONDS))
    forget_people(probe)
    return peak


def forget_people(traffic: Traffic) -> None:
    """The soak's made-up people leave no consent records behind."""
    client = connect()
    namespace = Environment.open().home.namespace
    client.delete(*[redis_keys.consent(namespace, user_key(p)) for p in traffic.people])


def key_refresh_s(server: SoakServer) -> float:
    user_config = ServeConfig.read(server.config).ingress.get("user_config", {})
    return float(user_config.get("auth", {}).get("refresh_s", 1.0))


def key_cycles(
    server: SoakServer,
    traffic: Traffic,
    body: dict[str, Any],
    every_s: float,
    stop: threading.Event,
) -> list[dict[str, Any]]:
    """A key created, used until it works, revoked and used until it is refused,
    every `every_s`: how long each took. The stated bound (`auth.refresh_s`) is judged
    on the last request still accepted: when it was sent after the revocation (the
    first refusal's arrival adds that request's own round trip)."""
    cycles: list[dict[str, Any]] = []
    purposes = list(load_policy().purposes)
    bound = key_refresh_s(server)

    def status(key: str) -> int:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.post(
                f"{server.base_url}/v1/rank",
                json=body,
                headers={"authorization": f"Bearer {key}"},
                timeout=5,
            ).status_code
        return 0

    def until(wanted: int, limit_s: float = 30.0) -> tuple[float | None, float | None]:
        """Seconds until an answer was `wanted` (when it came back), and when the last
        request still answered otherwise was sent."""
        started_at = time.monotonic()
        last_other = None
        while time.monotonic() - started_at < limit_s:
            sent = time.monotonic() - started_at
            if status(key) == wanted:
                return round(time.monotonic() - started_at, 2), last_other
            last_other = round(sent, 2)
            time.sleep(0.05)
        return None, last_other

    while not stop.wait(every_s):
        try:
            store = ApiKeyStore(connect(), server.home.namespace)
            created = traffic.now()
            key = store.create("soak-rotation", purposes, purposes)
            accepted, _ = until(200)
            revoked = traffic.now()
            store.revoke_key(key)
            refused, still_accepted = until(401)
        except Exception as exc:  # noqa: BLE001 - Redis down at that moment: say so
            cycles.append(
                {
                    "created_at_s": round(traffic.now()),
                    "error": str(exc)[:200],
                    "accepted_after_s": None,
                    "revoked_at_s": None,
                    "refused_after_s": None,
                    "bound_s": bound,
                }
            )
            continue
        cycles.append(
            {
                "created_at_s": round(created, 1),
                "accepted_after_s": accepted,
                "revoked_at_s": round(revoked, 1),
                "refused_after_s": refused,
                "last_accepted_sent_s": still_accepted,
                "bound_s": bound,
            }
        )
    return cycles


def versions(env: Environment, server: SoakServer) -> tuple[str, str]:
    """(stable, the version the canaries promote): a version the routing already
    names (an alternate, a canary), else another registered one."""
    routing: Any = server.health().get("routing", {})
    routed = routing.get("versions", [])
    stable = next((v["version"] for v in routed if v.get("role") == "stable"), "")
    known = [v["version"] for v in routed if v.get("role") in ("alternate", "canary")]
    others = known + [v for v in env.models.versions() if v not in (stable, *known)]
    return stable, (others[0] if others else stable)


@contextlib.contextmanager
def soak_server(
    given: SoakServer | None,
    env: Environment,
    body: dict[str, Any],
    api_key: str,
    replicas: int,
    nodes: int,
) -> Iterator[SoakServer]:
    if given is not None:
        yield given
        return
    with started(env.home, body, api_key, replicas, nodes) as server:
        yield server


def join(thread: threading.Thread, server: SoakServer) -> None:
    """Wait for `thread`; meanwhile make the node changes faults ask for (which only
    the main thread can make: loadtests/soak/cluster.py)."""
    while thread.is_alive():
        if server.nodes is not None:
            server.nodes.serve_calls(0.2)
        else:
            thread.join(0.2)


def stack_roots(server: SoakServer, env: Environment) -> tuple[list[int], Callable[[], list[int]]]:
    """What the memory sampler measures: the tree of `serve run` (or every live node's
    processes, asked at each sample as nodes come and go) and the embedded Redis."""

    def extra() -> list[int]:
        pids = server.nodes.pids() if server.nodes is not None else []
        return pids + ([pid] if (pid := redis_pid(env)) is not None else [])

    return ([server.process.pid] if server.process else []), extra


def run_soak(
    duration_s: float,
    output: Path,
    say: Say,
    *,
    share: float = 0.5,
    faults: tuple[str, ...] | None = None,
    window_s: float = 300.0,
    warmup_s: float | None = None,
    key_every_s: float = 60.0,
    server: SoakServer | None = None,
    replicas: int = 2,
    nodes: int = 0,
    command: str = "",
) -> dict[str, Any]:
    """The soak; `nodes` > 0 runs it on a cluster of a head and that many worker nodes
    (one replica each), with the node-loss fault (`faults` default: all that apply)."""
    if faults is None:
        faults = soak_faults.CLUSTER if nodes > 0 else soak_faults.ALL
    env = Environment.open()
    policy = load_policy()
    purpose, region = next(iter(policy.purposes)), next(iter(policy.regions))
    granted = request_bodies(env)
    denied = denied_bodies(env, purpose, region)
    warmup = warmup_s if warmup_s is not None else min(300.0, duration_s * 0.12)
    namespace = env.home.namespace
    with (
        temporary_key("soak") as api_key,
        soak_server(server, env, granted[0], api_key, replicas, nodes) as running,
    ):
        say(f"• soak server at {running.base_url}")
        peak = measure_peak(running.base_url, api_key, granted, denied, purpose)
        rate = max(1.0, share * peak)
        say(
            f"• the mix's peak: {peak:.1f} answers/s; the soak sends {rate:.1f} requests/s "
            f"for {duration_s:.0f} s"
        )
        run_id = uuid.uuid4().hex[:8]
        traffic = Traffic(running.base_url, api_key, granted, denied, purpose, run_id)
        ctx = Context(
            running, traffic, versions(env, running), soak_faults.cli_environment(running)
        )
        plan = soak_faults.schedule(duration_s, faults, warmup)
        say(f"• {len(plan)} faults: " + ", ".join(f"{name}@{at:.0f}s" for at, name in plan))
        drained(namespace)  # the peak's own events applied before the baseline
        outcomes_before = outcome_totals(namespace)
        stop = threading.Event()
        keys: list[dict[str, Any]] = []
        with (
            AuditTail(namespace) as tail,
            MemorySampler(*stack_roots(running, env)) as memory,
            RedisWatch() as redis_watch,
        ):
            driver = threading.Thread(
                target=lambda: asyncio.run(traffic.run(rate, duration_s)), name="traffic"
            )
            driver.start()
            while traffic.loop is None or traffic.started == 0.0:
                time.sleep(0.05)
            schedule = threading.Thread(
                target=soak_faults.run_schedule, args=(ctx, plan, stop), name="faults"
            )
            schedule.start()
            rotation = threading.Thread(
                target=lambda: keys.extend(
                    key_cycles(running, traffic, granted[0], key_every_s, stop)
                ),
                name="keys",
            )
            rotation.start()
            join(driver, running)
            say("• traffic done; waiting for the faults to recover")
            stop.set()
            join(schedule, running)
            join(rotation, running)
            say("• counting")
            audit = audit_counts(traffic.ledger, tail)
            events = event_counts(traffic.ledger, namespace, outcomes_before)
            consent = consent_counts(traffic.ledger, namespace, purpose)
            forget_people(traffic)
        growth = memory.growth(warmup)
    report: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": f"{os.cpu_count()} cores, {platform.platform()}",
        "duration_s": duration_s,
        "warmup_s": warmup,
        "window_s": window_s,
        "peak_rps": peak,
        "share": share,
        "rate": rate,
        "replicas": running.replicas(),
        "audit_before_answer": running.audit_before_answer(),
        "nodes": len(running.nodes.workers) if running.nodes else 0,
        "requests": requests_section(traffic.ledger, duration_s, tuple(ctx.losses)),
        "driver_late": late_figures(traffic.late_ms, traffic.ledger),
        "windows": windows_section(traffic.ledger, window_s),
        "audit": audit,
        "events": events,
        "consent": consent,
        "withdrawals_before_kills": {
            k: ctx.withdrawals[k] for k in ("acknowledged", "read_back", "lost")
        },
        "keys": keys,
        "faults": [fault_figures(f) for f in ctx.runs],
        "memory": {
            "windows": memory.windows(window_s),
            "minutes": memory.windows(MINUTE_S),
            "growth": growth,
        },
        "redis": redis_watch.windows(window_s),
    }
    report["verdicts"] = verdicts(report)
    output.mkdir(parents=True, exist_ok=True)
    stem = soak_report_stem(nodes)
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / f"{stem}.md").write_text(render_markdown(report))
    return report


def soak_report_stem(nodes: int) -> str:
    """The report's file name: the multi-node variant's beside the one-machine soak's."""
    return "soak-cluster" if nodes > 0 else "soak"


def late_figures(late_ms: list[float], ledger: Any) -> dict[str, Any]:
    """How far behind its schedule the driver sent: latencies count from the due
    time, so a late driver would show as a slow server."""
    sent = len(ledger.answers) + ledger.not_sent
    return {
        "late_share": round(len(late_ms) / max(1, sent), 4),
        "p99_ms": round(sorted(late_ms)[int(0.99 * (len(late_ms) - 1))], 1) if late_ms else 0.0,
        "max_ms": round(max(late_ms), 1) if late_ms else 0.0,
    }


def fault_figures(run: FaultRun) -> dict[str, Any]:
    return {
        "name": run.name,
        "started": round(run.started, 1),
        "ended": round(run.ended, 1),
        "recovered_s": None if run.recovered_s is None else round(run.recovered_s, 2),
        "detail": run.detail,
        "error": run.error,
    }
