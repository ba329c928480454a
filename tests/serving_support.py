"""Shared helpers for the serving tests (plain pipeline and HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx
import yaml
from prometheus_client.samples import Sample

from loadtests.ray_metrics import own_processes, ray_session_dir, scrape
from rankgate.core.pseudonym import user_key
from rankgate.core.settings import get_project
from rankgate.governance.consent import ConsentState
from serving.contract.config import BudgetConfig
from serving.contract.reasons import FallbackReason
from serving.ops.launch import SERVE_CONFIG

if TYPE_CHECKING:
    from rankgate.core.home import Home
    from tests.conftest import Server


PATIENT_BUDGET_MS = int(BudgetConfig().max_ms)
"""The budget tests of behaviour ask with: the serving config's cap, which a machine
busy with other work still meets. A test of drift, events, routing, audit... that
asked with the default 50 ms would see an honest `consent_unavailable` or
`feature_timeout` whenever the machine is loaded (the request queued 44 ms, the
policy took 18). Only the benchmark judges speed; tests about budgets and timeouts
name their own."""


# Near misses of a valid identifier: each must be refused wherever the identifier
# is taken (a trailing newline slipped past `re.match(... $)`; the others are
# lookalikes a person cannot tell from the real thing).
NEAR_MISSES = ("trailing newline", "NUL", "Cyrillic a", "fullwidth digit", "no-break space")


def near_miss(valid: str, kind: str) -> str:
    return {
        "trailing newline": valid + "\n",
        "NUL": valid + "\x00",
        "Cyrillic a": valid + "\u0430",
        "fullwidth digit": valid + "\uff18",
        "no-break space": valid + "\u00a0",
    }[kind]


def example_user_ids() -> list[str]:
    """The demo users of the project served (the example's 561 visitors)."""
    return get_project().demo_user_ids()


def train_version(env, version: str, params, features=None, features_file: str = "models/v2.yaml"):  # type: ignore[no-untyped-def]
    """Train `version` on the project's log with `features` (a FeaturesFile), or the
    inputs of one of the project's declarations."""
    from features.spec import load_features_file
    from rankgate.ops.models import train_in

    return train_in(
        env, version, params, features or load_features_file(env.project.path(features_file))
    )


def model_commands(config: Path) -> Callable[..., tuple[int, str]]:
    """`rankgate model ARGS --config CONFIG` in-process: (exit code, output)."""
    from click.testing import CliRunner

    from rankgate.cli.main import main

    runner = CliRunner()

    def model(*args: str) -> tuple[int, str]:
        result = runner.invoke(main, ["model", *args, "--config", str(config)])
        return result.exit_code, result.output

    return model


def serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ingress_user_config(**overrides: Any) -> dict[str, Any]:
    """The RankIngress user_config of serve_config.yaml, with top-level sections replaced."""
    from serving.ops.launch import ingress_deployment

    return {**ingress_deployment()["user_config"], **overrides}


def user_with(consent_store, purpose: str, state: ConsentState, skip: int = 0) -> str:  # type: ignore[no-untyped-def]
    """An example user whose recorded consent for `purpose` is `state`."""
    ids = example_user_ids()
    states = consent_store.states([user_key(u) for u in ids], purpose)
    matches = [uid for uid, s in zip(ids, states, strict=True) if s == state]
    return matches[skip]


def routing(
    stable: str, *, canary: str | None = None, weight: float = 0, **roles: Any
) -> dict[str, Any]:
    """A routing section: `stable` (and a canary at `weight` %), plus shadow=[...], alternate=[...]."""
    base = ingress_user_config()["routing"]
    versions: list[dict[str, Any]] = [{"version": stable, "role": "stable", "weight": 100 - weight}]
    if canary is not None:
        versions.append({"version": canary, "role": "canary", "weight": weight})
    for role in ("shadow", "alternate"):
        versions += [{"version": v, "role": role} for v in roles.get(role, [])]
    return {**base, "versions": versions}


def copy_with_wrong_width(models, source: str, target: str) -> Path:  # type: ignore[no-untyped-def]
    """A copy of a version whose manifest lists one feature more than its ONNX takes:
    it loads (hashes match) but every onnxruntime call raises."""
    import json
    import shutil

    folder = models.path(target)
    shutil.copytree(models.path(source), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    extra = {
        "name": "user_item_affinity",
        "view": "user_item_affinity",
        "field": "affinity_{item_id}",
    }
    manifest["features"].append({**extra, "group": "affinity"})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def copy_slowed(models, source: str, target: str, layers: int = 6, width: int = 1024) -> Path:  # type: ignore[no-untyped-def]
    """A copy of a version that scores exactly as it does, slowly: its ONNX graph gets a
    branch of `layers` dense layers (`width` wide) over the same inputs, multiplied by
    zero and added to the probabilities, which onnxruntime computes on every call.
    The manifest's hash of the graph is updated, so the copy loads and validates."""
    import hashlib
    import json
    import shutil

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    folder = models.path(target)
    shutil.rmtree(folder, ignore_errors=True)  # a run stopped before its clean-up
    shutil.copytree(models.path(source), folder)
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    manifest = json.loads((folder / "manifest.json").read_text())
    input_name = manifest["onnx"]["input_name"]
    output_name = manifest["onnx"]["output_name"]
    (declared,) = [i for i in graph.input if i.name == input_name]
    columns = declared.type.tensor_type.shape.dim[1].dim_value or len(manifest["features"])
    rng = np.random.default_rng(0)
    previous, size = input_name, columns
    for layer in range(layers):
        weights = numpy_helper.from_array(
            (rng.normal(0, 1.0 / np.sqrt(size), (size, width))).astype(np.float32), f"slow_w{layer}"
        )
        graph.initializer.append(weights)
        graph.node.extend(
            [
                helper.make_node("MatMul", [previous, weights.name], [f"slow_m{layer}"]),
                helper.make_node("Tanh", [f"slow_m{layer}"], [f"slow_t{layer}"]),
            ]
        )
        previous, size = f"slow_t{layer}", width
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "slow_zero"))
    produced = f"{output_name}_fast"
    for node in graph.node:
        node.output[:] = [produced if o == output_name else o for o in node.output]
    graph.node.extend(
        [
            helper.make_node("ReduceSum", [previous], ["slow_sum"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
            helper.make_node("Add", [produced, "slow_nothing"], [output_name]),
        ]
    )
    onnx.save(model, str(path))
    manifest["artifacts"]["model.onnx"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


class Load:
    """Closed-loop load from a thread: `concurrency` loops posting rank requests.

    Counts what fault tests assert on: `sent`, `answered` (200), `degraded`
    (200 with a fallback that is not the policy's doing) and `failed` (anything
    else, connection errors included), each with the time it happened.
    """

    def __init__(
        self,
        server: Server,
        users: list[str],
        concurrency: int,
        region: str = "US",
        budget_ms: int = 500,
    ) -> None:
        self.url = f"{server.base_url}/v1/rank"
        self.headers = server.headers
        self.users = users
        self.concurrency = concurrency
        self.region = region
        self.budget_ms = budget_ms
        self.stop = threading.Event()
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.answers: list[tuple[float, dict[str, Any]]] = []
        self.failures: list[tuple[float, int]] = []
        self.refusals_without_retry_after = 0
        self.errors: Counter[str] = Counter()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _loop(self, client: httpx.AsyncClient, offset: int) -> None:
        n = offset
        while not self.stop.is_set():
            body = {
                "user_id": self.users[n % len(self.users)],
                "purpose": "onsite_personalization",
                "region": self.region,
                "budget_ms": self.budget_ms,
            }
            n += self.concurrency
            self.sent += 1
            try:
                response = await client.post(self.url, json=body, headers=self.headers, timeout=60)
                status = response.status_code
            except httpx.HTTPError as exc:
                status = 0
                self.errors[type(exc).__name__] += 1
            self.statuses[status] += 1
            if status == 200:
                self.answers.append((time.monotonic(), response.json()))
            else:
                self.failures.append((time.monotonic(), status))
                if status == 0 or "retry-after" not in response.headers:
                    self.refusals_without_retry_after += 1
                else:  # a well-behaved client waits as told
                    await asyncio.sleep(float(response.headers["retry-after"]))

    async def _run(self) -> None:
        async with httpx.AsyncClient() as client:
            await asyncio.gather(*[self._loop(client, i) for i in range(self.concurrency)])

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    @property
    def answered(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return self.sent - self.answered

    def degraded(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        """Fallback reasons of degraded answers between two times."""
        return Counter(
            a["fallback"]["reason"]
            for t, a in self.answers
            if since <= t < until
            and a["fallback"]
            and FallbackReason(a["fallback"]["reason"]).degraded
        )

    def personalized(self, since: float = 0.0) -> int:
        return sum(1 for t, a in self.answers if t >= since and a["fallback"] is None)

    def counts(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "degraded": sum(self.degraded().values()),
            "failed": self.failed,
        }


def deploy(server: Server, name: str, user_config: dict[str, Any], expect) -> None:  # type: ignore[no-untyped-def]
    """`serve deploy` the server's config with this ingress user_config; wait for `expect`."""
    from rankgate.ops.environment import Environment
    from serving.ops.launch import derived_config, serve_env
    from tests.conftest import wait_until_healthy

    port = int(server.base_url.rsplit(":", 1)[1])
    config = derived_config(server.home, port=port, user_config=user_config, name=name)
    env = serve_env(server.home, Environment.open().redis_url or "")
    serve_deploy(config, server.dashboard_address(), env)
    wait_until_healthy(server.base_url, None, 60, server.log_path, expect=expect)


def serve_deploy(config: Path, dashboard: str, env: dict[str, str]) -> None:
    """`serve deploy` a config to a Ray dashboard; the CLI's output if it fails."""
    import subprocess

    from serving.ops.launch import ray_client_env, serve_deploy_command

    result = subprocess.run(
        serve_deploy_command(config, dashboard),
        env=ray_client_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def replica_pids(home: Home, deployment: str = "RankIngress") -> list[int]:
    """Replica processes of this home's server (Ray titles them ray::ServeReplica:...)."""
    title = f"ServeReplica:rankgate:{deployment}".encode()
    return [pid for pid, _ in own_processes(home.root, title)]


def edge_config(home: Home) -> str:
    """The HAProxy configuration the server of `home` runs (with rankgate's guards)."""
    from serving.ops.launch import haproxy_dir

    for _, command in own_processes(home.root, b"raylet"):
        for arg in command.split(b"\0"):
            if arg.startswith(b"--node_id="):
                node_id = arg.split(b"=", 1)[1].decode()
                return (haproxy_dir(home) / node_id / "haproxy.rankgate.cfg").read_text()
    raise AssertionError(f"no raylet of the server of {home.root} found")


def health(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/healthz", timeout=5).json()  # type: ignore[no-any-return]


def ray_metrics(server: Server) -> list[Sample]:
    """The server's metrics as Prometheus scrapes them: every agent Ray's
    service-discovery file lists (loadtests/ray_metrics.py)."""
    return scrape(ray_session_dir(server.home.root))


def metrics_when(
    server: Server, condition: Callable[[list[Sample]], bool], timeout_s: float = 30
) -> list[Sample]:
    """Scrapes until `condition` holds, or the time is up: the last scrape. Replicas hand
    their records to Ray every 0.1 s and Ray reports them every second (the session
    server's RAY_metrics_report_interval_ms), so what was recorded shows up soon."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = ray_metrics(server)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)
