"""Logs never carry raw user ids: a run's logs are searched for the ids it served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from loadtests.ray_metrics import ray_session_dir
from rankgate.core.home import Home
from rankgate.ops.environment import Environment
from serving.ops.launch import (
    SERVE_CONFIG,
    derived_config,
    free_port,
    haproxy_dir,
    ray_client_env,
    serve_deploy_command,
    serve_env,
)
from tests.cli_server import cli_env, command_of, run_cli, start
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


def json_lines(path: Path) -> list[dict[str, object]]:
    """Every non-empty line of a log file, parsed: a line that is no JSON object fails."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                raise AssertionError(f"{path}:{number} is not JSON: {line[:200]}") from None
            assert isinstance(record, dict), f"{path}:{number}: {line[:200]}"
            records.append(record)
    return records


@pytest.mark.slow
def test_json_logs_parse_and_carry_no_raw_user_id(cli_home: Path, tmp_path: Path) -> None:
    """`rankgate serve --log-format json`: what the command prints (setup, the
    supervisor, `serve run`'s output) and the Serve logs of the application's
    replicas are JSON lines, and no log of the run names a raw user id.

    It stops as a process supervisor stops it (systemd's KillMode=mixed, a container
    runtime's stop): SIGTERM to the main pid only, and everything it started is gone
    within the bound of tests/deploy/test_lifecycle.py, with exit status 0 (that
    file's other cases need a server each; this one shares this test's)."""
    from tests.deploy.test_lifecycle import STOP_BOUND_S

    config = tmp_path / "serve_config.yaml"
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    document["applications"][0]["logging_config"] = dict(ACCESS_LOGS)
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    # Throughput-optimized Serve keeps up to 1000 replica log records in memory;
    # one at a time puts the access lines in the files while the test reads them.
    env = cli_env(cli_home, RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE="1")
    args = ["--log-format", "json", "--config", str(config)]
    server = start(cli_home, free_port(), tmp_path / "serve.log", args=args, env=env)
    probe = f"json-log-probe-{uuid.uuid4().hex}"
    try:
        server.wait_ready()
        key = run_cli(
            cli_home, "keys", "create", "json-logs", "--purpose", "onsite_personalization"
        )
        headers = {"Authorization": f"Bearer {key.split()[-1]}"}
        url = server.base_url
        ask = {"user_id": probe, "purpose": "onsite_personalization", "region": "US"}
        consent = {"purposes": {"onsite_personalization": True}, "source": "cmp"}
        calls = [
            httpx.post(f"{url}/v1/rank", json=ask, headers=headers, timeout=10),
            httpx.post(f"{url}/v1/rank", json={**ask, "region": "XX"}, headers=headers, timeout=10),
            httpx.post(f"{url}/v1/consent", json={"user_id": probe, **consent}, headers=headers),
            httpx.put(f"{url}/v1/consent/{probe}", json=consent, headers=headers, timeout=10),
        ]
        assert [c.status_code for c in calls] == [200, 422, 200, 200]
        session = ray_session_dir(cli_home) / "logs"
        server.snapshot = server.processes()
        # The supervisor, serve run, Ray's processes, the replicas, HAProxy.
        assert len(server.snapshot) >= 10, [command_of(p.pid) for p in server.snapshot]
    finally:
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGTERM)
        try:
            took = server.wait_gone(STOP_BOUND_S)
        finally:
            server.kill_everything()
    assert server.process.returncode == 0
    print(f"SIGTERM to the main pid: everything gone {took:.1f} s after the signal")
    printed = json_lines(server.log_path)
    messages = [str(r.get("message")) for r in printed]
    assert any(m.startswith("rankgate ready at") for m in messages), messages[-20:]
    assert any("rankgate stopped (SIGTERM)" in m for m in messages), messages[-20:]
    assert any("Got KeyboardInterrupt" in m for m in messages), messages[
        -20:
    ]  # serve run's clean path
    replica_logs = sorted((session / "serve").glob("replica_rankgate_*.log"))
    assert replica_logs, sorted(p.name for p in (session / "serve").iterdir())
    records = [record for path in replica_logs for record in json_lines(path)]
    routes = {record.get("route") for record in records}
    assert "/v1/consent/{user_id}" in routes, routes  # the access log was on, in JSON
    files = [server.log_path, *session.rglob("*"), *haproxy_dir(Home(cli_home)).rglob("*")]
    files = [f for f in files if f.is_file()]
    assert len(files) > 10
    named = [str(f) for f in files if probe.encode() in f.read_bytes()]
    assert not named
