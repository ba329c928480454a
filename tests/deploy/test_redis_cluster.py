"""A Redis Cluster as rankgate's store and Feast's online store.

Three masters of the embedded valkey binary (`--cluster-enabled yes`, free
loopback ports, slots split in three with CLUSTER ADDSLOTSRANGE, joined with
CLUSTER MEET), a copy of the session's home pointed at them with
`REDIS_URL=redis+cluster://...`: `rankgate setup --demo-consent` materializes into the
cluster and writes the demo consent there, `rankgate serve` answers over HTTP from it (ranking,
consent writes, events, the consumer's streaming features and outcome join), and
`rankgate privacy forget` leaves nothing of the person on any master.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from rankgate.core import redis_keys
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import _binary_path, connect
from rankgate.core.settings import get_project, get_settings
from rankgate.governance.api_keys import ApiKeyStore
from rankgate.governance.consent import ConsentState, ConsentStore
from rankgate.governance.policy import load_policy
from rankgate.ops.erasure import feast_user_key, offline_tables
from serving.events.consumer import GROUP
from serving.observe.outcomes import project_outcomes, read_outcomes
from tests.cli_server import CliServer, cli_env, start
from tests.redis_contents import places_holding
from tests.serving_support import user_with

# `rankgate serve` runs in a subprocess for the module's tests that use `served`.
pytestmark = pytest.mark.slow
MASTERS = 3
SLOTS = 16384
STREAMING_VIEW = "recent_clicks"
OUTCOMES = project_outcomes(get_project())
assert OUTCOMES is not None and OUTCOMES.impression and OUTCOMES.click, OUTCOMES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalCluster:
    """Masters of one cluster on loopback ports, each in a folder of its own."""

    processes: list[subprocess.Popen[bytes]]
    ports: list[int]
    root: Path

    @property
    def url(self) -> str:
        # Two seed nodes: the clients find the third themselves.
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def masters(self) -> list[redis.Redis]:
        return [redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) for port in self.ports]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_master(folder: Path, deadline: float) -> tuple[subprocess.Popen[bytes], int, int]:
    """One master on free loopback ports (its own and its cluster bus's, which would
    otherwise be its port + 10,000), answering PING; tried again on other ports when
    another process took one meanwhile."""
    while True:
        port, bus = free_port(), free_port()
        process = subprocess.Popen(
            [
                str(_binary_path()),
                *("--port", str(port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-port", str(bus)),
                *("--cluster-config-file", str(folder / "nodes.conf")),
                *("--dir", str(folder), "--logfile", str(folder / "valkey.log")),
                # An append-only file, as the event intake waits for it (WAITAOF).
                *("--save", "", "--appendonly", "yes", "--appendfsync", "everysec"),
            ],
            stdin=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        while process.poll() is None:
            try:
                client.ping()
                return process, port, bus
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    raise AssertionError(f"no master answered; see {folder}/valkey.log") from None
                time.sleep(0.02)
        (folder / "nodes.conf").unlink(missing_ok=True)


def start_cluster(masters: int = MASTERS, timeout_s: float = 30.0) -> LocalCluster:
    root = Path(tempfile.mkdtemp(prefix="rankgate-redis-cluster-"))
    cluster = LocalCluster([], [], root)
    buses: list[int] = []
    deadline = time.monotonic() + timeout_s
    try:
        for n in range(masters):
            folder = root / f"master-{n}"
            folder.mkdir()
            process, port, bus = start_master(folder, deadline)
            cluster.processes.append(process)
            cluster.ports.append(port)
            buses.append(bus)
        clients = cluster.masters()
        share = SLOTS // masters
        for n, client in enumerate(clients):
            last = SLOTS - 1 if n == masters - 1 else (n + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", n * share, last)
        for port, bus in zip(cluster.ports[1:], buses[1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        # Formed when every master knows every other one and every slot.
        while not all(
            (info := client.cluster("info"))["cluster_state"] == "ok"
            and int(info["cluster_known_nodes"]) == masters
            for client in clients
        ):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.05)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    started = start_cluster()
    try:
        yield started
    finally:
        started.stop()


@dataclass
class Served:
    cluster: LocalCluster
    home: Home
    server: CliServer
    headers: dict[str, str]
    client: redis.RedisCluster

    @property
    def namespace(self) -> str:
        return self.home.namespace

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.server.base_url}{path}", json=body, headers=self.headers, timeout=10
        )

    def rank(self, user_id: str, **extra: Any) -> dict[str, Any]:
        body = {"user_id": user_id, "purpose": "onsite_personalization", "region": "EU", "k": 5}
        response = self.post("/v1/rank", body | {"budget_ms": 1000} | extra)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(cluster: LocalCluster, ready_home: Home) -> Iterator[Served]:
    """A copy of the session's home (its data, models and Feast registry) whose Redis
    is the cluster: set up there, then served by `rankgate serve`."""
    from rankgate.ops.setup import run_setup

    root = Path(tempfile.mkdtemp(prefix="rankgate-cluster-home-"))
    shutil.copytree(
        ready_home.root,
        root,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("redis", "ray", "pycache", "*.log", "serve_config.yaml"),
    )
    home = Home(root)
    saved = {path: path.read_bytes() for path in offline_tables(home, get_project())}
    server = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKGATE_HOME", str(root))
        patch.setenv("REDIS_URL", cluster.url)
        get_settings.cache_clear()
        try:
            started = time.monotonic()
            run_setup(lambda _line: None, demo_consent=True)
            print(f"\nsetup into the cluster: {time.monotonic() - started:.1f}s")
            client = connect(cluster.url)
            assert isinstance(client, redis.RedisCluster)
            purposes = list(load_policy().purposes)
            api_key = ApiKeyStore(client, home.namespace).create(
                "tests", purposes, purposes, ["events"]
            )
            server = start(
                root,
                free_port(),
                root / "serve.log",
                env=cli_env(root, REDIS_URL=cluster.url),
            )
            print(f"serving from the cluster after {server.wait_ready(timeout_s=180):.1f}s")
            yield Served(cluster, home, server, {"Authorization": f"Bearer {api_key}"}, client)
        finally:
            if server is not None:
                os.killpg(server.process.pid, signal.SIGTERM)
                try:
                    server.wait_gone(60)
                except AssertionError:
                    server.kill_everything()
            for path, content in saved.items():
                path.write_bytes(content)  # erasure rewrote the person's offline rows
            shutil.rmtree(root, ignore_errors=True)
    get_settings.cache_clear()


@contextmanager
def on_cluster(served: Served) -> Iterator[None]:
    """The CLI's settings for the served home on the cluster, for what runs in this process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKGATE_HOME", str(served.home.root))
        patch.setenv("REDIS_URL", served.cluster.url)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()


def keys_per_master(cluster: LocalCluster, pattern: str) -> list[int]:
    return [len(list(m.scan_iter(match=pattern, count=1000))) for m in cluster.masters()]


def consumed(served: Served, through: str, limit_s: float = 30.0) -> None:
    """Wait until the consumer group has read and acknowledged everything up to `through`."""
    stream = redis_keys.events(served.namespace)
    wanted = tuple(int(p) for p in through.split("-"))
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for group in served.client.xinfo_groups(stream):
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            delivered = group["last-delivered-id"]
            delivered = delivered.decode() if isinstance(delivered, bytes) else delivered
            if (
                name == GROUP
                and tuple(int(p) for p in delivered.split("-")) >= wanted
                and group["pending"] == 0
            ):
                return
        time.sleep(0.05)
    raise AssertionError(f"the consumer did not get through {through} in {limit_s} s")


def event(kind: str, user_id: str, item_id: Any, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "type": kind,
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": time.time(),
        **extra,
    }


def test_setup_spreads_consent_and_features_over_every_master(served: Served) -> None:
    namespace = served.namespace
    consent = keys_per_master(served.cluster, redis_keys.consent(namespace, "*"))
    feast_rows = [
        sum(1 for name in m.scan_iter(count=1000) if name.endswith(namespace.encode()))
        for m in served.cluster.masters()
    ]
    print(f"consent records per master {consent}, Feast rows per master {feast_rows}")
    assert all(n > 0 for n in consent) and all(n > 0 for n in feast_rows)


def test_rank_consent_events_and_outcomes_over_http(served: Served) -> None:
    assert OUTCOMES is not None and OUTCOMES.impression and OUTCOMES.click
    namespace, client = served.namespace, served.client
    consent = ConsentStore(client, namespace)
    person = user_with(consent, "onsite_personalization", ConsentState.GRANTED)
    # Ranking: consent and features read from the cluster, a model answers.
    answer = served.rank(person)
    assert answer["fallback"] is None and answer["model"]["version"] == "v2", answer
    items = [item["item_id"] for item in answer["items"]]
    # A consent write lands in the person's slot and changes the next answer.
    other = user_with(consent, "onsite_personalization", ConsentState.GRANTED, skip=1)
    written = served.post(
        "/v1/consent",
        {"user_id": other, "purposes": {"onsite_personalization": False}, "source": "cmp"},
    )
    assert written.status_code == 200, written.text
    assert consent.states([user_key(other)], "onsite_personalization") == [ConsentState.DENIED]
    assert served.rank(other)["fallback"]["reason"] == "no_consent"
    # Events: clicks for the streaming view, outcomes of the answer; a batch sent
    # twice is accepted once (the stream and its idempotency keys share a slot).
    batch = [event("click", person, items[-1], region="EU") for _ in range(2)]
    batch += [event(OUTCOMES.impression, person, i, request_id=answer["request_id"]) for i in items]
    batch.append(event(OUTCOMES.click, person, items[0], request_id=answer["request_id"]))
    posted = served.post("/v1/events", {"events": batch})
    assert posted.status_code == 202, posted.text
    assert (posted.json()["accepted"], posted.json()["duplicates"]) == (len(batch), 0)
    # The answer waited for the append-only file of the master that holds the stream.
    holder = client.get_node_from_key(redis_keys.events(namespace))
    waits = redis.Redis(host=holder.host, port=holder.port).info("commandstats")
    assert waits["cmdstat_waitaof"]["calls"] >= 1, waits
    again = served.post("/v1/events", {"events": batch})
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, len(batch))
    consumed(served, max(posted.json()["stream_ids"], key=lambda s: tuple(map(int, s.split("-")))))
    # The consumer kept the person's streaming state beside their consent record.
    key = user_key(person)
    state = redis_keys.streaming_state(namespace, STREAMING_VIEW, key)
    assert client.exists(state)
    assert client.keyslot(state) == client.keyslot(redis_keys.consent(namespace, key))
    # ...and the outcomes were joined to the decision and counted once.
    decision = client.hgetall(redis_keys.decision(namespace, answer["request_id"]))
    marks = [f for f in decision if f.startswith(b"o:")]
    assert len(marks) == len(items) + 1 and decision[b"joined"] == b"1"
    totals = read_outcomes(client, namespace, "v2", "stable")  # type: ignore[arg-type]
    assert (totals.impressions, totals.clicks) == (len(items), 1)


def test_events_replay_rebuilds_the_same_streaming_states(served: Served) -> None:
    """`rankgate events replay --since 0`: every state dropped (found by a scan of
    every master) and rebuilt from the stream, to the same counts."""
    from rankgate.ops.replays import replay_events

    namespace, client = served.namespace, served.client
    pattern = redis_keys.streaming_state(namespace, STREAMING_VIEW, "*")
    before = {name: client.hgetall(name) for name in client.scan_iter(match=pattern)}
    assert before, "no streaming state to rebuild"
    with on_cluster(served):
        report = replay_events("0", lambda _line: None)
    assert report.people_reset == len(before) and report.applied > 0
    assert report.rows_defaulted == 0  # everyone reset had events since 0: rebuilt, none defaulted
    after = {name: client.hgetall(name) for name in client.scan_iter(match=pattern)}
    assert after == before


def test_consent_import_writes_later_decisions_on_every_master(
    served: Served, tmp_path: Path
) -> None:
    """`rankgate consent import` on the cluster: each person's record on the master of
    their slot, a later decision replaces an earlier one, a second import writes nothing."""
    from rankgate.ops.consent_import import import_consent

    people = [f"imported-{uuid.uuid4().hex[:8]}-{n}" for n in range(40)]
    lines = ["user_id,purpose,decision,source,updated_at"]
    for n, uid in enumerate(people):
        lines.append(f"{uid},onsite_personalization,granted,cmp,2026-03-01T12:00:00+00:00")
        if n % 2:  # a later denial of the same purpose, earlier in the file
            lines.insert(1, f"{uid},onsite_personalization,denied,cmp,2026-03-02T12:00:00+00:00")
    path = tmp_path / "consent.csv"
    path.write_text("\n".join(lines) + "\n")
    with on_cluster(served):
        first = import_consent(path)
        again = import_consent(path)
    # Chunks are written by two connections at once: a later denial may land before or
    # after the earlier grant it beats (40 to 60 writes); what stays is the later one.
    assert first.rows == 60 and 40 <= first.written <= 60
    assert again.finished_before is not None and again.written == first.written
    consent = ConsentStore(served.client, served.namespace)
    states = [consent.state(user_key(uid), "onsite_personalization") for uid in people]
    assert states == [
        ConsentState.DENIED if n % 2 else ConsentState.GRANTED for n in range(len(people))
    ]
    mine = {redis_keys.consent(served.namespace, user_key(uid)).encode() for uid in people}
    pattern = redis_keys.consent(served.namespace, "*")
    holding = [
        len(mine & set(m.scan_iter(match=pattern, count=1000))) for m in served.cluster.masters()
    ]
    assert sum(holding) == len(people) and all(n > 0 for n in holding), holding


def test_demo_consent_is_counted_and_removed_on_every_master(cluster: LocalCluster) -> None:
    """The sweep reads every master (SCAN of each) and calls its script with one
    person a call (each in their own slot): demo records go from all of them, a real
    record beside a demo one stays. Needs the cluster only, not a server."""
    from rankgate.governance.demo_consent import DemoConsentSweep, demo_consent
    from rankgate.ops.setup import write_demo_consent

    client = connect(cluster.url)
    assert isinstance(client, redis.RedisCluster)
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    store = ConsentStore(client, namespace)
    purposes = ["email_marketing", "onsite_personalization"]
    people = [f"demo-{n}" for n in range(120)]
    write_demo_consent(store, people, purposes)
    kept = next(uid for uid in people if len(demo_consent(uid, purposes)) == 2)
    store.record(user_key(kept), {"email_marketing": True}, source="cmp")
    demo_records = sum(len(demo_consent(uid, purposes)) for uid in people) - 1
    pattern = redis_keys.consent(namespace, "*")
    holding = [len(list(m.scan_iter(match=pattern, count=1000))) for m in cluster.masters()]
    assert all(n > 0 for n in holding), holding

    sweep = DemoConsentSweep(client, namespace)
    assert sweep.count().records == demo_records
    assert sweep.remove().records == demo_records
    left = [name for m in cluster.masters() for name in m.scan_iter(match=pattern, count=1000)]
    assert left == [redis_keys.consent(namespace, user_key(kept)).encode()]
    assert store.state(user_key(kept), "email_marketing") == ConsentState.GRANTED
    assert store.state(user_key(kept), "onsite_personalization") == ConsentState.UNKNOWN
    client.delete(*left)


def test_forget_leaves_nothing_of_the_person_on_any_master(served: Served) -> None:
    from rankgate.ops.access import forget

    namespace, client = served.namespace, served.client
    consent = ConsentStore(client, namespace)
    person = user_with(consent, "onsite_personalization", ConsentState.GRANTED)
    control = user_with(consent, "onsite_personalization", ConsentState.GRANTED, skip=2)
    served.rank(person)
    served.rank(control)
    needles = [user_key(person).encode()]
    before = [place for m in served.cluster.masters() for place in places_holding(m, needles)]
    assert any(b"consent" in p.encode() for p in before) and len(before) > 3, before
    with on_cluster(served):
        summary = forget(person)
    print(summary)
    assert "1 consent record" in summary
    left = {
        f"master {m.connection_pool.connection_kwargs['port']}": places_holding(m, needles)
        for m in served.cluster.masters()
    }
    assert not any(left.values()), left
    assert not any(
        feast_user_key(name, namespace, "user_key") == user_key(person)
        for m in served.cluster.masters()
        for name in m.scan_iter(count=1000)
    )
    # Nobody else was touched.
    assert client.exists(redis_keys.consent(namespace, user_key(control)))


def test_routing_traces_and_a_canary_reset_are_written_on_the_cluster(
    cluster: LocalCluster,
) -> None:
    """A rollback and its routing event in one transaction (their keys share a slot),
    shadow figures, and a canary's counters reset in a transaction of one key."""
    from rankgate.core.redis_server import connect_async
    from serving.observe.routing_log import (
        RollbackEvent,
        RoutingLog,
        read_rollbacks,
        read_routing_events,
        read_shadow,
    )
    from serving.ops.promotion import reset_canary_outcomes

    namespace = f"rg_{uuid.uuid4().hex[:8]}"
    event = RollbackEvent("v9", "errors", "3 of 3 failed", {"errors": 3.0}, {"errors": 0.0}, 1.0)

    async def replica() -> set[str]:
        client = connect_async(cluster.url)
        try:
            log = RoutingLog(client, namespace)
            await log.record_rollback(event)  # logs, never raises, when it cannot write
            await log.record_shadow("v9", 0.5, 0.25)
            return await log.rolled_back()
        finally:
            await client.aclose()

    assert asyncio.run(replica()) == {"v9"}
    client = connect(cluster.url)
    assert read_rollbacks(client, namespace)["v9"]["rule"] == "errors"
    assert [e["event"] for e in read_routing_events(client, namespace, 10)] == ["rollback"]
    assert read_shadow(client, namespace, "v9")["mean_topk_overlap"] == 0.5
    client.hset(redis_keys.outcomes(namespace, "v8", "stable"), mapping={"impressions": 40})
    reset_canary_outcomes(client, namespace, "v9", "v8")
    canary = read_outcomes(client, namespace, "v9", "canary")
    assert canary.impressions == 0 and canary.baseline is not None
    assert canary.baseline[0] == "v8" and canary.baseline[1].impressions == 40
