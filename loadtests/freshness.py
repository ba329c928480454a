"""`rankgate bench --freshness`: event-to-decision latency under event load.

One rankgate server (`serve run`, the fast path of `rankgate serve`) routes a
version that reads a streaming view as its stable version. For each event rate
(events/s, posted in the background in batches by a separate thread), a probe
repeatedly:

1. posts one event of a type the streaming view counts, for a person who may be
   personalized, on a catalogue item, and notes when the 202 arrived and the
   stream id it names;
2. ranks for that person back to back until an answer's `freshness.events_through`
   reaches that stream id's time: the first decision that includes the event.

Two figures per probe: *client*, from the 202 arriving to that answer arriving
(what an application sees, including one rank round trip), and *server*, the
answer's `event_age_ms` (from the event's acceptance to the decision). Rates are
run in interleaved rounds; percentiles are over all probes of a rate. The report
goes to `<output>/freshness.json` and `<output>/freshness.md`.
"""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtests.drive import percentile, stamped, write_results
from model_store.store import ModelStore
from rankgate.core.errors import RankgateError
from rankgate.core.pseudonym import user_key
from rankgate.governance.api_keys import temporary_key
from rankgate.governance.consent import ConsentState
from rankgate.governance.policy import load_policy
from rankgate.ops.environment import Environment
from serving.events.intake import stream_time
from serving.ops.launch import (
    SERVE_CONFIG,
    derived_config,
    free_port,
    ingress_deployment,
    serve_run_command,
)

RATES = (0, 100, 1000)
Say = Callable[[str], None]


def streaming_version(env: Environment) -> tuple[str, str]:
    """A model version of the home that reads a streaming view, and that view."""
    streaming = set(env.project.streaming)
    store = ModelStore(env.home)
    for version in store.versions():
        views = store.manifest(version).feature_views & streaming
        if views:
            return version, min(views)
    raise RankgateError(
        "no model version reads a streaming view (rankgate.yaml `streaming`): "
        "register one before measuring event-to-decision latency"
    )


def server_config(env: Environment, port: int, version: str) -> Path:
    user_config = ingress_deployment(SERVE_CONFIG)["user_config"]
    user_config["routing"]["versions"] = [{"version": version, "role": "stable", "weight": 100}]
    return derived_config(env.home, port=port, user_config=user_config, name="bench-freshness")


class Background(threading.Thread):
    """Posts `rate` events/s in batches of up to 50 until stopped."""

    def __init__(
        self, url: str, headers: dict[str, str], rate: int, make: Callable[[], dict]
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.rate, self.make = url, headers, rate, make
        self.stop = threading.Event()
        self.sent = 0
        self.refused = 0

    def run(self) -> None:
        if self.rate <= 0:
            return
        batch = min(50, self.rate)
        interval = batch / self.rate
        with httpx.Client(timeout=10) as client:
            next_at = time.monotonic()
            while not self.stop.is_set():
                events = [self.make() for _ in range(batch)]
                try:
                    response = client.post(self.url, json={"events": events}, headers=self.headers)
                    if response.status_code == 202:
                        self.sent += batch
                    else:
                        self.refused += batch
                except httpx.HTTPError:
                    self.refused += batch
                next_at += interval
                self.stop.wait(max(next_at - time.monotonic(), 0.0))


def run_freshness(
    rates: list[int], duration: float, repeats: int, output: Path, say: Say
) -> dict[str, Any]:
    from loadtests.bench.systems import process_env, wait_ready
    from serving.ops.launch import start_server, stop_server

    env = Environment.open()
    version, view = streaming_version(env)
    spec = env.project.streaming[view]
    event_type = spec.events[0]
    policy = load_policy()
    purpose = next(p for p, d in policy.purposes.items() if view in d.feature_views)
    region = next(iter(policy.regions))
    ids = env.project.demo_user_ids()
    states = env.consent.states([user_key(u) for u in ids], purpose)
    people = [u for u, s in zip(ids, states, strict=True) if s == ConsentState.GRANTED]
    if len(people) < 2:
        raise RankgateError(
            f"need people with consent granted for {purpose} to measure: the demo users' "
            "made-up consent (`rankgate setup --demo-consent`)"
        )
    from features.tables import load_catalogue

    catalogue = load_catalogue(env.project, env.views(), env.data_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = env.home.root / "bench" / "freshness.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"• rankgate with {version} (reads {view}) on port {port}; probes post {event_type}")
    rng = random.Random(7)

    def event(person: str) -> dict[str, Any]:
        return {
            "event_id": uuid.uuid4().hex,
            "type": event_type,
            "user_id": person,
            "item_id": rng.choice(catalogue),
            "timestamp": time.time(),
            "region": region,
        }

    background_people = people[len(people) // 2 :]
    probe_people = itertools.cycle(people[: len(people) // 2])
    samples: dict[int, dict[str, list[float]]] = {r: {"client": [], "server": []} for r in rates}
    rounds: dict[int, list[float]] = {r: [] for r in rates}
    posted: dict[int, int] = dict.fromkeys(rates, 0)
    with temporary_key("bench-freshness") as key:
        headers = {"Authorization": f"Bearer {key}"}
        command = serve_run_command(server_config(env, port, version))
        process = start_server(command, process_env(env, True), log)
        try:
            body = {"user_id": people[0], "purpose": purpose, "region": region, "k": 10}
            wait_ready(f"{base}/v1/rank", body, process, log, key)
            with httpx.Client(timeout=10) as client:
                for round_number in range(repeats):
                    for rate in rates:
                        background = Background(
                            f"{base}/v1/events",
                            headers,
                            rate,
                            lambda: event(rng.choice(background_people)),
                        )
                        background.start()
                        time.sleep(1.0)  # the rate is reached before probing
                        client_ms, server_ms = probe(
                            client, base, headers, purpose, region, probe_people, event, duration
                        )
                        background.stop.set()
                        background.join()
                        posted[rate] += background.sent
                        samples[rate]["client"] += client_ms
                        samples[rate]["server"] += server_ms
                        rounds[rate].append(
                            statistics.median(client_ms) if client_ms else float("nan")
                        )
                        say(
                            f"    round {round_number + 1} {rate:>5} events/s: {len(client_ms)} probes, "
                            f"client p50 {percentile(client_ms, 0.5):.1f} ms, p99 "
                            f"{percentile(client_ms, 0.99):.1f} ms; server p50 "
                            f"{percentile(server_ms, 0.5):.1f} ms ({background.sent} sent, "
                            f"{background.refused} refused)"
                        )
        finally:
            stop_server(process)
    report = stamped(
        version=version,
        view=view,
        duration_s=duration,
        repeats=repeats,
        results={
            str(rate): {
                "probes": len(samples[rate]["client"]),
                "background_events": posted[rate],
                "client_p50_ms": round(percentile(samples[rate]["client"], 0.5), 2),
                "client_p99_ms": round(percentile(samples[rate]["client"], 0.99), 2),
                "server_p50_ms": round(percentile(samples[rate]["server"], 0.5), 2),
                "server_p99_ms": round(percentile(samples[rate]["server"], 0.99), 2),
                "round_p50_ms": [round(v, 2) for v in rounds[rate]],
            }
            for rate in rates
        },
    )
    write_results(output, "freshness", report, render)
    return report


def probe(
    client: httpx.Client,
    base: str,
    headers: dict[str, str],
    purpose: str,
    region: str,
    people: itertools.cycle[str],
    event: Callable[[str], dict[str, Any]],
    duration: float,
    extra: dict[str, Any] | None = None,
) -> tuple[list[float], list[float]]:
    """Probes for `duration` seconds: (client ms, server ms) per probe; `extra` is
    added to each rank request (e.g. its candidates)."""
    client_ms: list[float] = []
    server_ms: list[float] = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        person = next(people)
        response = client.post(
            f"{base}/v1/events", json={"events": [event(person)]}, headers=headers
        )
        acknowledged = time.perf_counter()
        if response.status_code != 202:
            continue
        through = stream_time(response.json()["stream_ids"][0])
        body = {"user_id": person, "purpose": purpose, "region": region, "k": 10, "budget_ms": 200}
        body.update(extra or {})
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up:
            answer = client.post(f"{base}/v1/rank", json=body, headers=headers)
            fresh = answer.json().get("freshness") if answer.status_code == 200 else None
            if fresh is not None and fresh["events_through"] >= through:
                client_ms.append((time.perf_counter() - acknowledged) * 1000.0)
                server_ms.append(float(fresh["event_age_ms"]))
                break
        time.sleep(0.05)
    return client_ms, server_ms


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Event-to-decision latency",
        "",
        (
            f"Measured {report['measured_at']} on {report['cores']} cores: "
            f"`rankgate bench --freshness` ({report['repeats']} interleaved rounds of "
            f"{report['duration_s']:g} s per rate). Stable version {report['version']} reads "
            f"the streaming view `{report['view']}`."
        ),
        "",
        (
            "*client*: from the 202 of a probe event to the first rank answer that includes "
            "it (one rank round trip included); *server*: that answer's `event_age_ms`, from "
            "the event's acceptance to the decision."
        ),
        "",
        "| events/s | probes | background events | client p50 ms | client p99 ms | server p50 ms | server p99 ms | per-round client p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate, row in report["results"].items():
        lines.append(
            f"| {rate} | {row['probes']} | {row['background_events']} | {row['client_p50_ms']} "
            f"| {row['client_p99_ms']} | {row['server_p50_ms']} | {row['server_p99_ms']} "
            f"| {', '.join(str(v) for v in row['round_p50_ms'])} |"
        )
    return "\n".join(lines) + "\n"
