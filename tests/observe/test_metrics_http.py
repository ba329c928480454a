"""Metrics across replicas: two RankIngress replicas behind HAProxy, and totals read
from Ray's metrics agents (every target of Ray's service-discovery file), summed over
replicas as the Grafana dashboard sums them."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import yaml

from loadtests.ray_metrics import Sample, matches, targets, total
from rankgate.ops.environment import Environment
from serving.ops.launch import derived_config
from tests.conftest import Server, wait_until_healthy
from tests.serving_support import (
    metrics_when,
    ray_metrics,
    ray_session_dir,
    replica_pids,
    serve_deploy,
)

REQUESTS = 80
CLIENTS = 4


def by_replica(samples: list[Sample], name: str, **labels: str) -> dict[str, float]:
    """The sum of `name` with `labels` per replica (Ray Serve's `replica` tag)."""
    sums: dict[str, float] = {}
    for s in samples:
        if matches(s, name, labels):
            replica = s.labels.get("replica", "")
            sums[replica] = sums.get(replica, 0.0) + s.value
    return sums


def scale_ingress(server: Server, replicas: int) -> None:
    """`serve deploy` the server's config with `replicas` RankIngress replicas, and wait
    until HAProxy sends requests to each (each replica names itself in /healthz)."""
    from serving.ops.launch import serve_env

    port = int(server.base_url.rsplit(":", 1)[1])
    config = derived_config(server.home, port=port, name="two_replicas")
    document = yaml.safe_load(config.read_text())
    for deployment in document["applications"][0]["deployments"]:
        if deployment["name"] == "RankIngress":
            deployment["num_replicas"] = replicas
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    serve_deploy(
        config,
        server.dashboard_address(),
        serve_env(server.home, Environment.open().redis_url or ""),
    )
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    while len(seen) < replicas and time.monotonic() < deadline:
        health = wait_until_healthy(server.base_url, None, 60, server.log_path)
        seen.add(health["replica_started"])
        time.sleep(0.2)
    assert len(seen) == replicas, f"replicas answering: {len(seen)}"


def test_request_totals_across_two_replicas_are_the_requests_sent(
    server: Server, personalizable: list[str], restore: None
) -> None:
    scale_ingress(server, 2)
    assert len(replica_pids(server.home)) == 2
    # One agent per node; on this machine one node, as listed for Prometheus.
    assert targets(ray_session_dir(server.home.root))
    name, on = "rankgate_rank_requests_total", {"purpose": "onsite_personalization"}
    before = ray_metrics(server)

    def rank(n: int) -> int:
        body = {
            "user_id": personalizable[n % len(personalizable)],
            "purpose": "onsite_personalization",
            "region": "US",
            "budget_ms": 1000,
        }
        url = f"{server.base_url}/v1/rank"
        return httpx.post(url, json=body, headers=server.headers, timeout=30).status_code

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = list(pool.map(rank, range(REQUESTS)))
    assert statuses == [200] * REQUESTS

    after = metrics_when(
        server, lambda s: total(s, name, **on) - total(before, name, **on) >= REQUESTS
    )
    assert total(after, name, **on) - total(before, name, **on) == REQUESTS
    stage = {"stage": "total"}
    counted = "rankgate_stage_seconds_count"
    assert total(after, counted, **stage) - total(before, counted, **stage) == REQUESTS
    earlier = by_replica(before, name, **on)
    moved = {
        replica: count - earlier.get(replica, 0.0)
        for replica, count in by_replica(after, name, **on).items()
    }
    contributed = {replica: n for replica, n in moved.items() if n > 0}
    print(f"requests per replica: {contributed}")
    assert len(contributed) == 2, moved
    assert sum(contributed.values()) == REQUESTS
