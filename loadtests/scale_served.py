"""The served part of `rankgate bench --scale`: one server of the scale project, its
start, memory, rank latency, throughput, event intake and event-to-decision
latency (loadtests/scale.py)."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtests import log_tail
from loadtests.bench import memory
from loadtests.drive import cpu_seconds as process_cpu_seconds
from loadtests.drive import percentile
from loadtests.scale_home import granted_people
from loadtests.scale_retrieval import retrieval_figures
from rankgate.core.errors import RankgateError

Say = Callable[[str], None]


CANDIDATES: tuple[int | None, ...] = (10, 100, 500, None)
"""Candidates per rank request; None: the whole catalogue."""
EVENT_BATCH = 50
EVENT_CLIENTS = 4
FRESHNESS_RATES = [0, 100]
FRESHNESS_CANDIDATES = 100


def wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RankgateError(f"server exited ({process.returncode}); see {log}\n{log_tail(log)}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RankgateError(f"server not healthy in {timeout_s:.0f} s; see {log}\n{log_tail(log)}")


def replica_memory(server_pid: int) -> dict[str, Any]:
    processes = memory.stack([server_pid], [])
    replicas = [p for p in processes if p.name.startswith("ray::ServeReplica")]
    return {
        "replicas": memory.aggregate(replicas),
        "stack": {k: v for k, v in memory.aggregate(processes).items() if k != "processes"},
    }


def rank_latency(
    url: str,
    bodies: list[dict[str, Any]],
    catalogue: list[Any],
    budgets: dict[str, float],
    duration: float,
    api_key: str,
    folder: Path,
    say: Say,
) -> dict[str, Any]:
    """p50/p99 (one client, closed loop) per candidate count and budget."""
    from loadtests.bench.systems import drive

    rng = random.Random(11)
    results: dict[str, Any] = {}
    for count in CANDIDATES:
        if count is not None and count > len(catalogue):
            continue
        name = "all" if count is None else str(count)
        for budget_name, budget in budgets.items():
            requests = [
                {
                    **body,
                    "budget_ms": budget,
                    **({} if count is None else {"candidates": rng.sample(catalogue, count)}),
                }
                for body in bodies
            ]
            file = folder / f"bodies-{name}-{budget_name}.json"
            file.write_text(json.dumps(requests))
            run = drive(url, 1, duration, file, api_key, warmup=1.0)
            outcomes = run.get("outcomes", {})
            answered = sum(outcomes.values()) or 1
            row = {
                "p50_ms": round(run["p50_ms"], 2),
                "p99_ms": round(run["p99_ms"], 2),
                "requests": run["requests"],
                "budget_exhausted_share": round(
                    outcomes.get("fallback:budget_exhausted", 0) / answered, 3
                ),
                "personalized_share": round(outcomes.get("personalized", 0) / answered, 3),
                "errors": run.get("errors", 0),
            }
            results[f"{name}@{budget_name}"] = row
            say(
                f"    {name:>4} candidates, budget {budget:g} ms: p50 {row['p50_ms']} ms, "
                f"p99 {row['p99_ms']} ms, budget exhausted {row['budget_exhausted_share']:.1%}"
            )
    return results


THROUGHPUT_CONCURRENCY = 8
THROUGHPUT_CANDIDATES = 100


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (those still running)."""
    return sum(process_cpu_seconds(pids).values())


def redis_cpu_seconds(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def throughput(
    url: str,
    bodies: list[dict[str, Any]],
    catalogue: list[Any],
    budget_ms: float,
    duration: float,
    api_key: str,
    folder: Path,
    server_pid: int,
    redis_client: Any,
) -> dict[str, Any]:
    """Decisions per second with THROUGHPUT_CONCURRENCY clients (closed loop, 100
    candidates, the default budget) and the CPU each decision cost: every process of
    the server's tree, and Redis (INFO cpu): what the capacity model is built on."""
    from loadtests.bench.systems import drive

    rng = random.Random(13)
    count = min(THROUGHPUT_CANDIDATES, len(catalogue))
    requests = [
        {**body, "budget_ms": budget_ms, "candidates": rng.sample(catalogue, count)}
        for body in bodies
    ]
    file = folder / "bodies-throughput.json"
    file.write_text(json.dumps(requests))
    pids = memory.tree(server_pid)
    stack_before, redis_before = cpu_seconds(pids), redis_cpu_seconds(redis_client)
    run = drive(url, THROUGHPUT_CONCURRENCY, duration, file, api_key, warmup=0.0)
    stack_cpu = cpu_seconds(pids) - stack_before
    redis_cpu = redis_cpu_seconds(redis_client) - redis_before
    decisions = max(int(run["requests"]), 1)
    outcomes = run.get("outcomes", {})
    return {
        "concurrency": THROUGHPUT_CONCURRENCY,
        "candidates": count,
        "decisions_per_s": round(run["requests"] / duration, 1),
        "p50_ms": round(run["p50_ms"], 2),
        "p99_ms": round(run["p99_ms"], 2),
        "budget_exhausted_share": round(
            outcomes.get("fallback:budget_exhausted", 0) / decisions, 3
        ),
        "server_cpu_ms_per_decision": round(1000 * stack_cpu / decisions, 3),
        "redis_cpu_ms_per_decision": round(1000 * redis_cpu / decisions, 3),
    }


def ingest_rate(
    base: str,
    api_key: str,
    people: list[str],
    catalogue: list[Any],
    region: str,
    duration: float,
) -> dict[str, Any]:
    """Events/s accepted by POST /v1/events: EVENT_CLIENTS clients, batches of EVENT_BATCH."""
    headers = {"Authorization": f"Bearer {api_key}"}
    accepted = [0] * EVENT_CLIENTS
    refused = [0] * EVENT_CLIENTS
    latencies: list[float] = []
    end = time.monotonic() + duration

    def client(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < end:
                events = [
                    {
                        "event_id": uuid.uuid4().hex,
                        "type": "click",
                        "user_id": rng.choice(people),
                        "item_id": rng.choice(catalogue),
                        "timestamp": time.time(),
                        "region": region,
                    }
                    for _ in range(EVENT_BATCH)
                ]
                started = time.perf_counter()
                try:
                    response = http.post(
                        f"{base}/v1/events", json={"events": events}, headers=headers
                    )
                    ok = response.status_code == 202
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - started) * 1000)
                if ok:
                    accepted[n] += EVENT_BATCH
                else:
                    refused[n] += EVENT_BATCH

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(EVENT_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "events_per_s": round(sum(accepted) / elapsed, 1),
        "refused": sum(refused),
        "batch": EVENT_BATCH,
        "clients": EVENT_CLIENTS,
        "batch_p50_ms": round(percentile(latencies, 0.5), 2),
        "batch_p99_ms": round(percentile(latencies, 0.99), 2),
    }


def caught_up(
    base: str, headers: dict[str, str], body: dict[str, Any], event: dict[str, Any]
) -> float:
    """Seconds from posting `event` until a decision includes it (rank `body` for the
    same person, back to back): after a burst, how long the event consumer's backlog
    takes to drain. Gives up after 300 s."""
    from serving.events.intake import stream_time

    with httpx.Client(timeout=10) as client:
        response = client.post(f"{base}/v1/events", json={"events": [event]}, headers=headers)
        response.raise_for_status()
        posted = time.perf_counter()
        through = stream_time(response.json()["stream_ids"][0])
        while time.perf_counter() - posted < 300:
            answer = client.post(f"{base}/v1/rank", json=body, headers=headers)
            fresh = answer.json().get("freshness") if answer.status_code == 200 else None
            if fresh is not None and fresh["events_through"] >= through:
                return round(time.perf_counter() - posted, 2)
            time.sleep(0.05)
    raise RankgateError("an event posted after the ingest burst was not decided on in 300 s")


def served(env: Any, duration: float, folder: Path, say: Say) -> dict[str, Any]:
    """One server, started as `rankgate serve` starts it, with the version that reads
    the streaming view as its stable version: its start time, replica memory, rank
    latency, event ingest and event-to-decision latency (loadtests/freshness.py's
    probe, with its background events)."""
    from features.tables import load_catalogue
    from loadtests.freshness import Background, probe, server_config, streaming_version
    from rankgate.governance.api_keys import temporary_key
    from rankgate.governance.policy import load_policy
    from serving.ops.launch import (
        free_port,
        ingress_deployment,
        project_serve_config,
        serve_env,
        serve_run_command,
        start_server,
        stop_server,
    )

    version, view = streaming_version(env)
    policy = load_policy()
    purpose = next(p for p, d in policy.purposes.items() if view in d.feature_views)
    region = next(iter(policy.regions))
    people = granted_people(env, purpose, 400)
    if len(people) < 4:
        raise RankgateError(f"too few people of the sample may be personalized for {purpose}")
    catalogue = load_catalogue(env.project, env.views(), env.data_dir)
    base_config = project_serve_config(env.project)
    budget = ingress_deployment(base_config)["user_config"]["budget"]
    budgets = {"default": float(budget["default_ms"]), "max": float(budget["max_ms"])}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = env.home.root / "bench" / "scale-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"• serving {version} (reads {view}) on port {port} (log {log})")
    bodies = [{"user_id": u, "purpose": purpose, "region": region, "k": 10} for u in people[::2]]
    figures: dict[str, Any] = {"version": version, "budgets_ms": budgets}
    rng = random.Random(7)

    def event(person: str) -> dict[str, Any]:
        return {
            "event_id": uuid.uuid4().hex,
            "type": env.project.streaming[view].events[0],
            "user_id": person,
            "item_id": rng.choice(catalogue),
            "timestamp": time.time(),
            "region": region,
        }

    with temporary_key("bench-scale") as key:
        headers = {"Authorization": f"Bearer {key}"}
        started = time.perf_counter()
        process = start_server(
            serve_run_command(server_config(env, port, version)),
            serve_env(env.home, env.redis_url, config=base_config, project=env.project),
            log,
        )
        try:
            wait_healthy(base, process, log, 900)
            figures["start_s"] = round(time.perf_counter() - started, 2)
            say(f"    /healthz 200 after {figures['start_s']} s")
            figures["memory"] = replica_memory(process.pid)
            replicas = figures["memory"]["replicas"]
            say(
                f"    {replicas['count']} replica(s): RSS {replicas['rss_total_mib']} MiB, "
                f"PSS {replicas['pss_total_mib']} MiB"
            )
            figures["rank"] = rank_latency(
                f"{base}/v1/rank", bodies, catalogue, budgets, duration, key, folder, say
            )
            figures["retrieval"] = retrieval_figures(
                env, base, bodies, headers, version, budgets["default"], duration, say
            )
            figures["throughput"] = throughput(
                f"{base}/v1/rank",
                bodies,
                catalogue,
                budgets["default"],
                duration,
                key,
                folder,
                process.pid,
                env.redis,
            )
            say(
                "    throughput: {decisions_per_s} decisions/s at concurrency {concurrency} "
                "({candidates} candidates), p99 {p99_ms} ms; CPU per decision: server "
                "{server_cpu_ms_per_decision} ms, Redis {redis_cpu_ms_per_decision} ms".format(
                    **figures["throughput"]
                )
            )
            probed = itertools.cycle(people[1::2])
            # Probes rank FRESHNESS_CANDIDATES items: the event's path, not the
            # whole catalogue's scoring (measured above), is what they time.
            probe_body = {
                "candidates": rng.sample(catalogue, min(FRESHNESS_CANDIDATES, len(catalogue)))
            }
            freshness: dict[str, Any] = {}
            with httpx.Client(timeout=10) as client:
                for rate in FRESHNESS_RATES:
                    background = Background(
                        f"{base}/v1/events", headers, rate, lambda: event(rng.choice(people[::2]))
                    )
                    background.start()
                    time.sleep(1.0 if rate else 0.0)
                    client_ms, server_ms = probe(
                        client, base, headers, purpose, region, probed, event, duration, probe_body
                    )
                    background.stop.set()
                    background.join()
                    freshness[str(rate)] = {
                        "probes": len(client_ms),
                        "client_p50_ms": round(percentile(client_ms, 0.5), 2),
                        "client_p99_ms": round(percentile(client_ms, 0.99), 2),
                        "server_p50_ms": round(percentile(server_ms, 0.5), 2),
                    }
                    say(
                        f"    event-to-decision at {rate} events/s: {len(client_ms)} probes, "
                        f"client p50 {freshness[str(rate)]['client_p50_ms']} ms, server p50 "
                        f"{freshness[str(rate)]['server_p50_ms']} ms"
                    )
            figures["freshness"] = freshness
            # Last: the burst leaves the event consumer a backlog that later probes
            # would wait behind.
            figures["ingest"] = ingest_rate(base, key, people, catalogue, region, duration)
            figures["ingest"]["caught_up_s"] = caught_up(
                base, headers, {**bodies[0], **probe_body}, event(people[0])
            )
            say(
                f"    events: {figures['ingest']['events_per_s']} /s accepted "
                f"({figures['ingest']['refused']} refused); an event posted after the burst "
                f"decided on after {figures['ingest']['caught_up_s']} s"
            )
            figures["memory_after"] = replica_memory(process.pid)
        finally:
            stop_server(process)
    return figures
