"""`rankgate bench --scale`: rankgate at a size, from `rankgate init` to served decisions.

For each size (people, items, impressions) it writes a scale project into a scratch
folder with `rankgate init --sample-size` (the template's generated shop at that
size) and adds what the measurement needs and the template leaves out: event types,
a streaming view (each person's decayed click count, `per: total`), a model v3 that
reads it, and the log's propensity (the sample shows items uniformly at random,
1/items). Then, in a fresh home:

- `rankgate setup` in a process of its own, timed by phase from its own output
  (prepare, feature repository apply, materialize, each model's training, demo
  consent), with that process's peak memory;
- the Redis-compatible server's memory: `INFO memory` and `MEMORY USAGE` of sampled
  keys, per person (feature rows and consent records) and per item;
- one server started as `rankgate serve` starts it (`serve run` of the project's
  serve config, on a free port) with v3 as its stable version: seconds until
  /healthz answers 200, then the memory (RSS, PSS) of its Serve replicas;
- rank latency (closed loop, one client) with 10, 100 and 500 candidates and with
  none (the whole catalogue), at the default budget and the largest;
- throughput: decisions/s with 8 clients (closed loop, 100 candidates) and the CPU
  each decision cost in the server's processes and in Redis (`INFO cpu`);
- event ingest: events/s accepted by `POST /v1/events` (batches of 50, a few
  clients);
- event-to-decision latency at 0 and 100 events/s: loadtests/freshness.py's probe
  (ranking 100 candidates) and background events, on the same server;
- `rankgate model evaluate v2 --logs FILE --slots N` on the whole log (each slot a
  decision over the whole catalogue): the evaluation timed in this process, and the
  imports the command adds timed in a fresh one.

The report (`<output>/scale.json`, `.md`) puts the sizes side by side with the
ratio of the largest to the smallest for each figure.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench import memory
from loadtests.drive import percentile, stamped, write_results
from rankgate.core.errors import RankgateError
from rankgate.core.settings import SOURCE_CHECKOUT, put_checkout_on_path

Say = Callable[[str], None]

CANDIDATES: tuple[int | None, ...] = (10, 100, 500, None)
"""Candidates per rank request; None: the whole catalogue."""
EVENT_BATCH = 50
EVENT_CLIENTS = 4
FRESHNESS_RATES = [0, 100]
FRESHNESS_CANDIDATES = 100


@dataclass(frozen=True)
class Size:
    people: int
    items: int
    impressions: int

    @property
    def label(self) -> str:
        return f"{short(self.people)}/{short(self.items)}/{short(self.impressions)}"

    def sample_size(self) -> str:
        return f"people={self.people},items={self.items},impressions={self.impressions}"


DEFAULT_SIZES = (Size(10**5, 10**4, 10**6), Size(10**6, 10**5, 10**7))


def short(number: int) -> str:
    """10^6 as 1e6, 2,000 as 2e3: how sizes are named in the report."""
    text = f"{number:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if float(text) == number else str(number)


def parse_size(text: str) -> Size:
    """`1e5,1e4,1e6` (people, items, impressions) as a Size; ValueError says why."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"{text!r}: three numbers, people,items,impressions (e.g. 1e5,1e4,1e6)")
    numbers = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{text!r}: {part!r} is not a number") from None
        if not value.is_integer() or value < 1:
            raise ValueError(f"{text!r}: {part!r} is not a whole number of at least 1")
        numbers.append(int(value))
    return Size(*numbers)


# -- the scale project -------------------------------------------------------------

STREAMING_VIEW = "recent_activity"
STREAMING_FIELD = "recent_clicks"

_DEFINITIONS = f'''

# Added by `rankgate bench --scale`: each person's decayed count of their recent
# clicks, kept fresh from the event stream (rankgate.yaml `streaming`, per: total).
# The batch source behind the push source has no rows (Feast needs it for its
# registry); training computes the count at each logged impression from the log.
from feast import PushSource  # noqa: E402
from feast.types import Float32  # noqa: E402

{STREAMING_VIEW}_push = PushSource(
    name="{STREAMING_VIEW}_push",
    batch_source=FileSource(
        name="{STREAMING_VIEW}_source",
        path=str(Path(__file__).parent / "{STREAMING_VIEW}.parquet"),
        timestamp_field="event_timestamp",
    ),
)
{STREAMING_VIEW} = FeatureView(
    name="{STREAMING_VIEW}",
    entities=[shopper],
    ttl=timedelta(days=2),
    schema=[Field(name="{STREAMING_FIELD}", dtype=Float32)],
    source={STREAMING_VIEW}_push,
    online=True,
    tags={{"group": "activity"}},
)
'''

_V3 = f"""# Added by `rankgate bench --scale`: v2's inputs and the person's recent clicks.
inputs:
  - {{name: segment, feature: shopper_profile:segment, encoding: hash, group: profile}}
  - {{name: visits_30d, feature: shopper_profile:visits_30d, group: profile}}
  - {{name: category, feature: item_attributes:category, encoding: hash, group: item}}
  - {{name: price, feature: item_attributes:price, group: item}}
  - {{name: device, context: device, encoding: hash, group: context}}
  - {{name: recent_clicks, feature: {STREAMING_VIEW}:{STREAMING_FIELD}, group: activity}}
"""


def write_scale_project(folder: Path, size: Size) -> None:
    """`rankgate init --sample-size` into `folder`, then the streaming view, events,
    model v3 and the log's propensity the measurement needs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from rankgate.ops.scaffold import parse_sample_size, write_skeleton

    write_skeleton(folder, "scale", parse_sample_size(size.sample_size()))
    repo = folder / "feature_repo"
    with (repo / "definitions.py").open("a") as handle:
        handle.write(_DEFINITIONS)
    empty = pa.table(
        {
            "shopper_key": pa.array([], pa.string()),
            "event_timestamp": pa.array([], pa.timestamp("ns", tz="UTC")),
            STREAMING_FIELD: pa.array([], pa.float32()),
        }
    )
    pq.write_table(empty, repo / f"{STREAMING_VIEW}.parquet")
    (folder / "models" / "FEATURES.recent.yaml").write_text(_V3)

    path = folder / "rankgate.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["interactions"]["propensity_column"] = "propensity"
    spec["events"] = {
        "types": {"impression": {}, "click": {}},
        "outcomes": {"impression": "impression", "click": "click"},
    }
    spec["streaming"] = [
        {
            "view": STREAMING_VIEW,
            "push_source": f"{STREAMING_VIEW}_push",
            "events": ["click"],
            "per": "total",
            "field": STREAMING_FIELD,
            "half_life_s": 3600,
        }
    ]
    spec["setup_models"].append(
        {
            "version": "v3",
            "features": "models/FEATURES.recent.yaml",
            "params": {"num_boost_round": 60, "num_leaves": 7, "min_child_samples": 20},
        }
    )
    path.write_text(
        "# The scale project of `rankgate bench --scale` (rankgate init --sample-size "
        f"{size.sample_size()}, then a streaming view, events and model v3).\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )
    policy_path = folder / "policies" / "policy.yaml"
    policy = policy_path.read_text()
    policy_path.write_text(
        policy.replace(
            "feature_views: [shopper_profile, item_attributes]",
            f"feature_views: [shopper_profile, item_attributes, {STREAMING_VIEW}]",
            1,
        )
    )
    reasons = folder / "policies" / "reasons.yaml"
    reasons.write_text(
        reasons.read_text().replace(
            "templates:\n", 'templates:\n  activity: "You clicked on items here recently"\n', 1
        )
    )


# -- setup, timed by phase -----------------------------------------------------------


def child_env(project: Path, home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "RANKGATE_REDIS_URL"} and not k.startswith("RAY_SERVE_")
    }
    env.update(RANKGATE_HOME=str(home), RANKGATE_PROJECT=str(project), PYTHONUNBUFFERED="1")
    put_checkout_on_path(env)
    return env


def phase_name(line: str) -> str | None:
    """The phase a line of setup's output starts ("• model v1: training ..." -> model
    v1), or None for a line within a phase."""
    if line.startswith("• data:"):
        return "prepare"
    if line.startswith("• feature repository"):
        return "apply"
    if line.startswith("• online store"):
        return "materialize"
    if line.startswith("• demo consent"):
        return "consent"
    if line.startswith("• model "):
        return "train " + line[len("• model ") :].split(":")[0]
    if line.startswith(("setup complete", "nothing to do")):
        return "end"
    return None


def timed_setup(project: Path, home: Path, say: Say, timeout_s: float) -> dict[str, Any]:
    """`rankgate setup` in a process of its own: seconds per phase, total, peak RSS."""
    command = [sys.executable, "-m", "rankgate.cli", "setup"]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=child_env(project, home),
        cwd=SOURCE_CHECKOUT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    marks: list[tuple[str, float]] = [("start (imports, Redis)", 0.0)]
    output: list[str] = []
    timer = threading.Timer(timeout_s, lambda: os.killpg(process.pid, 9))
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip())
            name = phase_name(line)
            if name is not None:
                marks.append((name, time.perf_counter() - started))
                say(f"    {time.perf_counter() - started:7.1f} s  {line.rstrip()}")
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - started
    if process.returncode != 0:
        raise RankgateError(
            f"rankgate setup failed ({process.returncode}) in {total:.0f} s:\n"
            + "\n".join(output[-30:])
        )
    phases = {name: round(marks[i + 1][1] - at, 2) for i, (name, at) in enumerate(marks[:-1])}
    return {
        "total_s": round(total, 1),
        "phases_s": phases,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


# -- in-process views of the home --------------------------------------------------


@contextmanager
def home_selected(project: Path, home: Path) -> Iterator[None]:
    """This process's settings point at `home` and `project` (restored afterwards)."""
    from rankgate.core.settings import get_settings

    names = ("RANKGATE_HOME", "RANKGATE_PROJECT", "REDIS_URL", "RANKGATE_REDIS_URL")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(RANKGATE_HOME=str(home), RANKGATE_PROJECT=str(project))
    os.environ.pop("REDIS_URL", None)
    os.environ.pop("RANKGATE_REDIS_URL", None)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def redis_memory(env: Any, size: Size, sample: int = 3000) -> dict[str, Any]:
    """INFO memory, and MEMORY USAGE of `sample` random keys by kind, scaled to the
    key count: bytes per person (feature rows + consent) and per item."""
    client = env.redis
    info = client.info("memory")
    keys = int(client.dbsize())
    rng_keys = (
        list(client.scan_iter(count=1000))
        if keys <= sample
        else [client.randomkey() for _ in range(sample)]
    )
    kinds: dict[str, list[int]] = {}
    namespace = env.home.namespace.encode()
    for key in rng_keys:
        if key is None:
            continue
        used = client.memory_usage(key, samples=0) or 0
        if b"shopper_key" in key:
            kind = "person features"
        elif b"product_id" in key:
            kind = "item features"
        elif key.startswith(namespace) and b":consent:" in key:
            kind = "consent"
        else:
            kind = "other"
        kinds.setdefault(kind, []).append(int(used))
    seen = sum(len(v) for v in kinds.values()) or 1
    estimated = {
        kind: {
            "sampled": len(values),
            "keys_estimated": round(keys * len(values) / seen),
            "mean_bytes": round(sum(values) / len(values), 1),
            "bytes_estimated": round(keys * sum(values) / seen),
        }
        for kind, values in sorted(kinds.items())
    }

    def total(*names: str) -> float:
        return sum(estimated.get(n, {}).get("bytes_estimated", 0) for n in names)

    return {
        "used_memory_mib": round(info["used_memory"] / memory.MIB, 1),
        "used_memory_rss_mib": round(info["used_memory_rss"] / memory.MIB, 1),
        "keys": keys,
        "sampled": "every key" if keys <= sample else f"{sample} random keys",
        "kinds": estimated,
        "per_person_bytes": round(total("person features", "consent") / size.people, 1),
        "per_item_bytes": round(total("item features") / size.items, 1),
        "used_per_person_bytes": round(info["used_memory"] / size.people, 1),
    }


def granted_people(env: Any, purpose: str, count: int, seed: int = 7) -> list[str]:
    """Up to `count` people (a random sample) who may be personalized for `purpose`."""
    from rankgate.core.pseudonym import user_key
    from rankgate.governance.consent import ConsentState

    ids = env.project.demo_user_ids()
    rng = random.Random(seed)
    sample = rng.sample(ids, min(len(ids), count * 3))
    states = env.consent.states([user_key(u) for u in sample], purpose)
    return [u for u, s in zip(sample, states, strict=True) if s == ConsentState.GRANTED][:count]


# -- the served part ---------------------------------------------------------------


def wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RankgateError(f"server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RankgateError(f"server not healthy in {timeout_s:.0f} s; see {log}")


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
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


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
    from features.store import load_catalogue
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
    catalogue = load_catalogue(env.project, env.feast.list_feature_views(), env.data_dir)
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


def evaluate_time(env: Any, size: Size, rows: int, folder: Path, say: Say) -> dict[str, Any]:
    """`rankgate model evaluate v2 --logs FILE --slots ROWS`: the whole log (with the
    sample's propensity, 1/items: its items were drawn uniformly), `rows` slots drawn
    from it; the evaluation timed in this process, the import of what the command
    loads timed in a fresh one (the command's time is their sum)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rankgate.ops.evaluation import EvaluationRequest, evaluate

    spec = env.project.spec.interactions
    source = pq.ParquetFile(env.project.path(spec.path, env.data_dir))
    logs = folder / "evaluate-logs.parquet"
    writer: pq.ParquetWriter | None = None
    for batch in source.iter_batches(batch_size=1_000_000):
        table = pa.Table.from_batches([batch])
        table = table.append_column(
            "propensity", pa.array([1.0 / size.items] * table.num_rows, pa.float64())
        )
        writer = writer or pq.ParquetWriter(logs, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    log_rows = source.metadata.num_rows
    slots = min(rows, log_rows)
    started = time.perf_counter()
    evaluate(EvaluationRequest("v2", None, logs, False, "7d", 0.95, 200, 0, slots=slots))
    elapsed = time.perf_counter() - started
    imports = (
        "import rankgate.ops.evaluation, model_store.evaluation, model_store.train, "
        "serving.ops.evidence, features.store"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", imports], check=True, env=os.environ.copy())
    imported = time.perf_counter() - started
    say(
        f"    model evaluate v2 --slots {slots} on a log of {log_rows} rows x {size.items} "
        f"items: {elapsed:.1f} s (+ {imported:.1f} s of imports in the command)"
    )
    return {
        "log_rows": log_rows,
        "rows": slots,
        "items": size.items,
        "seconds": round(elapsed, 2),
        "command_imports_s": round(imported, 2),
        "rows_per_s": round(slots / elapsed, 1),
        "scored_pairs_per_s": round(slots * size.items / elapsed),
    }


# -- one size, then all of them ------------------------------------------------------


def measure_size(
    size: Size,
    scratch: Path,
    duration: float,
    evaluate_rows: int,
    setup_timeout_s: float,
    say: Say,
) -> dict[str, Any]:
    from rankgate.core.home import Home
    from rankgate.core.redis_server import EmbeddedRedis
    from rankgate.ops.environment import Environment

    folder = scratch / f"scale-{size.people}-{size.items}-{size.impressions}"
    if folder.exists():
        shutil.rmtree(folder)
    project, home = folder / "project", folder / "home"
    say(
        f"• size {size.label}: {size.people:,} people, {size.items:,} items, "
        f"{size.impressions:,} impressions ({folder})"
    )
    write_scale_project(project, size)
    figures: dict[str, Any] = {"size": size.__dict__, "folder": str(folder)}
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        figures["setup"] = timed_setup(project, home, say, setup_timeout_s)
        with home_selected(project, home):
            env = Environment.open()
            figures["redis"] = redis_memory(env, size)
            say(
                f"    redis {figures['redis']['used_memory_mib']} MiB: "
                f"{figures['redis']['per_person_bytes']} B/person, "
                f"{figures['redis']['per_item_bytes']} B/item"
            )
            work = folder / "bench"
            work.mkdir(exist_ok=True)
            figures["served"] = served(env, duration, work, say)
            figures["evaluate"] = evaluate_time(env, size, evaluate_rows, work, say)
    finally:
        EmbeddedRedis(Home(home)).stop()
    figures["load_1min"] = [load_at_start, round(os.getloadavg()[0], 2)]
    return figures


def run_scale(
    sizes: list[Size],
    output: Path,
    say: Say,
    scratch: Path | None = None,
    duration: float = 5.0,
    evaluate_rows: int = 1000,
    setup_timeout_s: float = 3600,
    name: str = "scale",
) -> dict[str, Any]:
    """Measure each size in turn; write `<output>/<name>.json` and `.md`."""
    import tempfile

    scratch = scratch or Path(tempfile.gettempdir()) / "rankgate-bench-scale"
    results = {
        size.label: measure_size(size, scratch, duration, evaluate_rows, setup_timeout_s, say)
        for size in sizes
    }
    report = stamped(
        duration_s=duration,
        evaluate_rows=evaluate_rows,
        sizes=[size.label for size in sizes],
        results=results,
        growth=growth(results),
    )
    write_results(output, name, report, render)
    return report


# -- the report ----------------------------------------------------------------------


def figure_rows(result: dict[str, Any]) -> dict[str, float]:
    """Every figure of one size, by its name in the report."""
    rows: dict[str, float] = {}
    setup = result["setup"]
    rows["setup: total s"] = setup["total_s"]
    for phase, seconds in setup["phases_s"].items():
        rows[f"setup: {phase} s"] = seconds
    rows["setup: peak RSS MiB"] = setup["peak_rss_mib"]
    redis = result["redis"]
    rows["redis: used MiB"] = redis["used_memory_mib"]
    rows["redis: bytes per person"] = redis["per_person_bytes"]
    rows["redis: bytes per item"] = redis["per_item_bytes"]
    served = result["served"]
    rows["serve: start s (until /healthz 200)"] = served["start_s"]
    replicas = served["memory"]["replicas"]
    rows["serve: replicas"] = replicas["count"]
    rows["serve: replica RSS MiB (at start)"] = replicas["rss_total_mib"]
    rows["serve: replica PSS MiB (at start)"] = replicas["pss_total_mib"]
    after = served["memory_after"]
    rows["serve: replica RSS MiB (after load)"] = after["replicas"]["rss_total_mib"]
    rows["serve: stack RSS MiB (after load)"] = after["stack"]["rss_total_mib"]
    rows["serve: stack PSS MiB (after load)"] = after["stack"]["pss_total_mib"]
    for key, row in served["rank"].items():
        count, budget = key.split("@")
        label = "whole catalogue" if count == "all" else f"{count} candidates"
        rows[f"rank {label}, {budget} budget: p50 ms"] = row["p50_ms"]
        rows[f"rank {label}, {budget} budget: p99 ms"] = row["p99_ms"]
        rows[f"rank {label}, {budget} budget: budget exhausted share"] = row[
            "budget_exhausted_share"
        ]
    load = served["throughput"]
    where = f"{THROUGHPUT_CANDIDATES} candidates, concurrency {THROUGHPUT_CONCURRENCY}"
    rows[f"throughput ({where}): decisions per s"] = load["decisions_per_s"]
    rows[f"throughput ({where}): p99 ms"] = load["p99_ms"]
    rows[f"throughput ({where}): budget exhausted share"] = load["budget_exhausted_share"]
    rows["throughput: server CPU ms per decision"] = load["server_cpu_ms_per_decision"]
    rows["throughput: Redis CPU ms per decision"] = load["redis_cpu_ms_per_decision"]
    rows["events: accepted per s"] = served["ingest"]["events_per_s"]
    rows["events: s until an event after the burst is decided on"] = served["ingest"]["caught_up_s"]
    for rate, row in served["freshness"].items():
        rows[f"event-to-decision at {rate} events/s: probes"] = row["probes"]
        rows[f"event-to-decision at {rate} events/s: client p50 ms"] = row["client_p50_ms"]
        rows[f"event-to-decision at {rate} events/s: client p99 ms"] = row["client_p99_ms"]
        rows[f"event-to-decision at {rate} events/s: server p50 ms"] = row["server_p50_ms"]
    evaluation = result["evaluate"]
    rows["model evaluate: log rows read"] = evaluation["log_rows"]
    rows["model evaluate: slots drawn (each over the whole catalogue)"] = evaluation["rows"]
    rows["model evaluate: s"] = evaluation["seconds"]
    rows["model evaluate: the command's imports s"] = evaluation["command_imports_s"]
    rows["model evaluate: scored pairs per s"] = evaluation["scored_pairs_per_s"]
    return rows


def growth(results: dict[str, Any]) -> dict[str, float | None]:
    """Each figure at the largest size over the same at the smallest."""
    if len(results) < 2:
        return {}
    tables = [figure_rows(r) for r in results.values()]
    first, last = tables[0], tables[-1]
    return {
        name: (round(last[name] / first[name], 2) if first.get(name) else None)
        for name in last
        if name in first
    }


def render(report: dict[str, Any]) -> str:
    labels = list(report["results"])
    tables = {label: figure_rows(report["results"][label]) for label in labels}
    names: list[str] = []
    for table in tables.values():
        names += [n for n in table if n not in names]
    ratio = len(labels) >= 2
    header = "| figure | " + " | ".join(labels) + (" | largest / smallest |" if ratio else " |")
    lines = [
        "# rankgate at scale",
        "",
        (
            f"Measured {report['measured_at']} on {report['cores']} cores: `rankgate bench "
            f"--scale` at {', '.join(labels)} (people/items/impressions). Each size: the "
            "template's sample shop generated at that size (`rankgate init --sample-size`) "
            "with a streaming view of each person's recent clicks and model v3 reading it, "
            "set up in a fresh home, then served (one `serve run` of the project's serve "
            "config, v3 stable). Latency: one client, closed loop, "
            f"{report['duration_s']:g} s per row; events: "
            f"{EVENT_CLIENTS} clients posting batches of {EVENT_BATCH}; event-to-decision: "
            "loadtests/freshness.py's probe (an event, then rank requests of "
            f"{FRESHNESS_CANDIDATES} candidates until one includes it); throughput: "
            f"{THROUGHPUT_CONCURRENCY} clients, closed loop, {THROUGHPUT_CANDIDATES} "
            "candidates, with the CPU the server's processes and Redis spent per decision; "
            f"`model evaluate --slots {report['evaluate_rows']}` on the whole log, each slot a "
            "decision over the whole catalogue."
        ),
        "",
        header,
        "|---" * (len(labels) + 1 + int(ratio)) + "|",
    ]
    for name in names:
        cells = [fmt(tables[label].get(name)) for label in labels]
        row = f"| {name} | " + " | ".join(cells)
        if ratio:
            grew = report["growth"].get(name)
            row += f" | {fmt(grew)}×" if grew is not None else " | —"
        lines.append(row + " |")
    lines += [
        "",
        (
            "Setup phases are timed from `rankgate setup`'s own output lines (*start*: its "
            "imports and the embedded Redis; *prepare*: the generator and the project's "
            "checks). Redis bytes per person: the person's feature row and consent record "
            "(`MEMORY USAGE` of sampled keys, scaled to the key count). Replica memory: the "
            "`ray::ServeReplica` processes; stack: every process the server started. "
            "`model evaluate` is timed in-process; the command adds its imports."
        ),
    ]
    loads = {label: r.get("load_1min") for label, r in report["results"].items()}
    if all(loads.values()):
        lines += [
            "",
            "Load average (1 min) of the machine at each size's start and end: "
            + "; ".join(f"{label} {a}–{b}" for label, (a, b) in loads.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:g}"
