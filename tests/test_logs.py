"""Logs never carry raw user ids: a run's logs are searched for the ids it served."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from loadtests.ray_metrics import ray_session_dir
from rankgate.setup import Environment
from serving.launch import (
    derived_config,
    haproxy_dir,
    ray_client_env,
    serve_deploy_command,
    serve_env,
)
from tests.conftest import Server, wait_until_healthy
from tests.serving_support import deploy, ingress_user_config

ACCESS_LOGS = {"log_level": "INFO", "enable_access_log": True}


def deploy_with_logging(server: Server, user_config: dict[str, object], expect) -> None:  # type: ignore[no-untyped-def]
    port = int(server.base_url.rsplit(":", 1)[1])
    path = derived_config(server.home, port=port, user_config=user_config, name="logs")
    config = yaml.safe_load(path.read_text())
    config["applications"][0]["logging_config"] = ACCESS_LOGS
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = ray_client_env(serve_env(server.home, Environment.open().redis_url or ""))
    subprocess.run(
        serve_deploy_command(path, server.dashboard_address()),
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    time.sleep(1)
    wait_until_healthy(server.base_url, None, 90, server.log_path, expect=expect)


@pytest.fixture
def access_logs(server: Server) -> Iterator[None]:
    """Access logs on, at INFO (`rankgate serve` runs throughput-optimized without them)."""
    deploy_with_logging(server, ingress_user_config(), lambda h: h["config_error"] is None)
    yield
    deploy(server, "default", ingress_user_config(), lambda h: h["config_error"] is None)


def log_files(server: Server) -> list[Path]:
    """The server's own log, every log file of the Ray session it runs in (found
    from its own raylet, not `session_latest`), and HAProxy's files (configuration,
    its output)."""
    session = ray_session_dir(server.home.root) / "logs"
    assert session.is_dir(), session
    files = [server.log_path, *session.rglob("*"), *haproxy_dir(server.home).rglob("*")]
    return [f for f in files if f.is_file()]


@pytest.mark.usefixtures("access_logs")
def test_no_raw_user_id_reaches_any_log(server: Server) -> None:
    probe = f"log-probe-{uuid.uuid4().hex}"
    url = server.base_url
    since = len(server.edge_log.lines)
    calls = [
        httpx.post(
            f"{url}/v1/rank",
            json={"user_id": probe, "purpose": "onsite_personalization", "region": "US"},
            headers=server.headers,
            timeout=10,
        ),
        httpx.post(  # refused: the problem is named, the id is not repeated
            f"{url}/v1/rank",
            json={"user_id": probe, "purpose": "onsite_personalization", "region": "XX"},
            headers=server.headers,
            timeout=10,
        ),
        httpx.post(
            f"{url}/v1/consent",
            json={"user_id": probe, "purposes": {"onsite_personalization": True}, "source": "cmp"},
            headers=server.headers,
            timeout=10,
        ),
        httpx.put(  # the path form: Ray's access log names the route, a proxy's the URL
            f"{url}/v1/consent/{probe}",
            json={"purposes": {"onsite_personalization": True}, "source": "cmp"},
            headers=server.headers,
            timeout=10,
        ),
        httpx.post(  # refused before anything is read
            f"{url}/v1/consent",
            json={"user_id": probe, "purposes": {"onsite_personalization": True}, "source": "cmp"},
            timeout=10,
        ),
    ]
    assert [c.status_code for c in calls] == [200, 422, 200, 200, 401]
    assert probe not in calls[1].text
    # Throughput-optimized Ray Serve buffers replica logs until an ERROR record: a
    # refused config logs one, which writes the buffered access lines out.
    bad = ingress_user_config(budget={"default_ms": 5000, "min_ms": 1, "max_ms": 1000})
    deploy_with_logging(server, bad, lambda h: h["config_error"] is not None)
    time.sleep(1)
    files = log_files(server)
    assert len(files) > 10
    logged = b"".join(f.read_bytes() for f in files)
    assert b"/v1/consent/{user_id}" in logged  # the access log was on: it names the route
    assert probe.encode() not in logged, [str(f) for f in files if probe.encode() in f.read_bytes()]
    # HAProxy's access log (syslog datagrams, received by the test) saw every call
    # and names no path.
    edge = [
        line for line in server.edge_log.lines[since:] if line.rstrip().endswith(("PUT", "POST"))
    ]
    assert len(edge) >= len(calls), server.edge_log.lines[since:][-10:]
    assert not [line for line in server.edge_log.lines if probe in line]
