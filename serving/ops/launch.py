"""Start the server: `rankgate serve` runs `serve run` on serve_config.yaml.

`serve run serve_config.yaml` alone works too; `rankgate serve` adds what makes
it fast and self-contained on one machine:

- Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, which implies
  direct ingress: replicas take HTTP themselves, no proxy actor hop) and
  `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`. Each can be turned off by setting it to 0.
- Ray settings that cost CPU on every request or every tenth of a second and buy
  nothing rankgate needs (`QUIET_ENV`); each can be set back.
- HAProxy's files in a folder of their own per home, so two homes never share them.
- rankgate's connection guards around Ray's generated HAProxy configuration
  (serving/http/edge.py): HAProxy runs as `rankgate-haproxy`, which adds them.
- The home and the Redis URL passed to the replicas (inherited by a local Ray
  instance; written into the application's runtime_env when `RAY_ADDRESS`
  names an existing cluster).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from rankgate.core.errors import ConfigError
from rankgate.core.home import Home
from rankgate.core.project import Project
from rankgate.core.resources import SERVE_CONFIG_NAME, default_serve_config
from rankgate.core.settings import SOURCE_CHECKOUT, get_project, put_checkout_on_path
from serving import without_feast_metrics_dir
from serving.http import edge
from serving.ops.serve_config import ServeConfig, load, plain, render
from serving.ops.supervisor import ServerInfo
from serving.ops.supervisor import command_line as supervisor_command_line

# Shipped with the package; a project's own serve_config.yaml wins (project_serve_config).
SERVE_CONFIG = default_serve_config()

FAST_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}

QUIET_ENV = {
    # HAProxy logs every request to a socket that Ray's HAProxy manager parses into
    # Ray's per-request HTTP metrics (serve_num_http_requests, ...): 0.13 ms of CPU a
    # request in the manager, more in the metrics agent. rankgate's replicas count
    # every answer themselves (rankgate_rank_requests_total by outcome, the stage
    # latencies), and HAProxy's own counters stay on its metrics port.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # Serve's controller wakes every 0.1 s to reconcile (41 ms of CPU a second, idle);
    # every 0.25 s it costs about half. Deploys and replica restarts converge
    # up to 0.15 s later per step.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25",
    # HAProxy's threads: one per core, as HAProxy itself would choose, up to Ray's 4
    # (4 threads on 2 cores polled and switched for nothing: 0.16 -> 0.12 ms of
    # HAProxy's CPU a request at 8 connections).
    "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, os.cpu_count() or 1))),
}
"""Ray settings for a quieter server: what each costs and buys is measured in
`rankgate bench` (idle CPU and CPU per decision). Each can be set back."""


def project_serve_config(project: Project | None = None) -> Path:
    """The serve config of a project: its own serve_config.yaml (`rankgate init` writes
    one), else the one shipped with rankgate."""
    own = (project or get_project()).root / SERVE_CONFIG_NAME
    return own if own.is_file() else SERVE_CONFIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_dir(home: Home, instance: str = "") -> Path:
    """HAProxy's files of this home's server (Ray adds a folder per node below it);
    `instance` names another server of the same home (the benchmark runs several)."""
    # Per home, but short: Ray adds a 56-character node id below it, and HAProxy's
    # admin socket path may not exceed 97 characters.
    name = f"{home.root}:{instance}" if instance else str(home.root)
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"rg-haproxy-{digest}"


def ingress_deployment(config: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The RankIngress deployment of a serve config: its options and `user_config`."""
    return dict(plain(ServeConfig.read(config).ingress))


def edge_guards(config: Path = SERVE_CONFIG) -> edge.EdgeGuards:
    """The HAProxy guards of a serve config: its RankIngress `connections` and body limit."""
    from serving.contract.config import ServingConfig

    serving = ServeConfig.read(config).section(ServingConfig)
    guards = serving.connections
    return edge.EdgeGuards(
        header_timeout_s=guards.header_timeout_s,
        body_timeout_s=guards.body_timeout_s,
        idle_timeout_s=guards.idle_timeout_s,
        max_per_source=guards.max_per_source,
        max_body_bytes=serving.limits.max_body_bytes,
    )


def serve_env(
    home: Home,
    redis_url: str,
    base: dict[str, str] | None = None,
    config: Path = SERVE_CONFIG,
    project: Project | None = None,
    instance: str = "",
) -> dict[str, str]:
    """The server's environment: `base` (default: this process's) with the fast path,
    the edge's settings, and the home, project and Redis the replicas must use;
    `instance`: see `haproxy_dir`."""
    env = without_feast_metrics_dir(dict(os.environ if base is None else base))
    for name, value in (FAST_PATH_ENV | QUIET_ENV).items():
        env.setdefault(name, value)
    # HAProxy runs as rankgate-haproxy, which adds the connection guards to the
    # configuration Ray generates (serving/http/edge.py).
    if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        wrapper = Path(sys.executable).with_name("rankgate-haproxy")
        if not wrapper.exists():
            raise ConfigError(
                f"{wrapper} is missing: reinstall rankgate (./run does) so that HAProxy "
                "runs with rankgate's connection guards"
            )
        env.setdefault(edge.ENV_REAL_BINARY, edge.real_binary())
        env.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", str(wrapper))
        env.setdefault(edge.ENV_GUARDS, edge_guards(config).to_env())
    # A replica that accepted a request but never answers is given up on (and the
    # caller gets 503 + Retry-After) instead of being waited for without end.
    env.setdefault("RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S", "30")
    # A replica that dies mid-request closes the connection without an answer:
    # HAProxy retries on another replica (ranking, consent writes and events are
    # idempotent) and otherwise answers 503 with Retry-After (serving/http/edge.py).
    env.setdefault("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response")
    haproxy = haproxy_dir(home, instance)
    haproxy.mkdir(parents=True, exist_ok=True)
    env.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(haproxy / "haproxy.cfg"))
    env.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", str(haproxy / "admin.sock"))
    env.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", str(haproxy))
    env.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", str(haproxy / "server-state"))
    # HAProxy mode also opens fixed ports (fallback proxy 8500/9500, HAProxy stats
    # 8404 and metrics 9101); free ones let two servers run side by side.
    env.setdefault("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(free_port()))
    env.setdefault("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", str(free_port()))
    env.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    env.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    # Direct ingress drains a replica for at least 30 s before it stops; on one
    # machine that only delays Ctrl-C. Operators can set it back.
    env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    env["RANKGATE_HOME"] = str(home.root)
    env["RANKGATE_PROJECT"] = str((project or get_project()).root)
    env["REDIS_URL"] = redis_url
    # Replicas import rankgate's packages from a checkout, however Ray was started.
    put_checkout_on_path(env)
    return env


def optimize_level() -> str | None:
    """PYTHONOPTIMIZE for the application's processes (see `application_env`); None: off."""
    optimize = os.environ.get("PYTHONOPTIMIZE") or "1"
    return None if optimize == "0" else optimize


def application_env(home: Home) -> dict[str, str]:
    """Environment of the application's own processes (the task that imports and builds
    it, and its replicas), set in its runtime_env by `derived_config`.

    Python's optimized mode (PYTHONOPTIMIZE=1, like `python -O`): Feast decorates its
    classes with typeguard's `@typechecked`, which re-reads and recompiles their
    modules when they are imported unless Python runs optimized; that is about 3 s
    of CPU in each of these processes before it can serve. What is lost there:
    typeguard's checks of Feast's own arguments (the objects are read from the
    registry setup built, with the checks on) and `assert` statements. Their bytecode
    is cached in `<home>/pycache` (written even when PYTHONDONTWRITEBYTECODE is set:
    never into the source tree). PYTHONOPTIMIZE=0 in `rankgate serve`'s environment
    turns it off.
    """
    optimize = optimize_level()
    if optimize is None:
        return {}
    return {
        "PYTHONOPTIMIZE": optimize,
        "PYTHONPYCACHEPREFIX": str(home.root / "pycache"),
        "PYTHONDONTWRITEBYTECODE": "",
    }


def derived_config(
    home: Home,
    base: Path = SERVE_CONFIG,
    port: int | None = None,
    user_config: dict[str, Any] | None = None,
    runtime_env: dict[str, str] | None = None,
    name: str = "serve_config",
    host: str | None = None,
    log_format: str = "text",
    ingress_replicas: int | None = None,
) -> Path:
    """A copy of `base` in the home with the port, host, ingress user_config, ingress
    replica count or env replaced, `application_env` in the application's runtime_env (every deploy of the
    home's server writes the same, so a routing change reconfigures in place), and
    Ray Serve's logs in JSON with `log_format="json"` (`json_serve_logs`)."""
    serve_config = ServeConfig.read(base).as_plain()
    config = serve_config.document
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    if host is not None:
        config.setdefault("http_options", {})["host"] = host
    if log_format == "json":
        json_serve_logs(config)
    if user_config is not None:
        serve_config.ingress["user_config"] = user_config
    if ingress_replicas is not None:
        serve_config.ingress["num_replicas"] = ingress_replicas
    env_vars = {**application_env(home), **(runtime_env or {})}
    if env_vars:
        app = serve_config.application
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
    target = home.root / "ray" / f"{name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(config))
    return target


def json_serve_logs(config: dict[str, Any]) -> None:
    """Ray Serve's own logs (controller, proxies) and every application's and
    deployment's in JSON: `logging_config.encoding` at each level that has one."""
    for holder in [config, *config.get("applications", [])]:
        holder.setdefault("logging_config", {})["encoding"] = "JSON"
        for deployment in holder.get("deployments", []):
            if "logging_config" in deployment:
                deployment["logging_config"]["encoding"] = "JSON"


def stop_on_signals() -> None:
    """SIGINT and SIGTERM end this process (exit status 128 + the signal) while it
    sets up, however it was started: a background job inherits SIGINT ignored, and a
    container's PID 1 never hears a signal it does not handle. (Once the server
    runs, the supervisor handles both.)"""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)


def serve_binary() -> str:
    return str(Path(sys.executable).with_name("serve"))


def ray_client_env(env: dict[str, str]) -> dict[str, str]:
    """Environment for a Ray CLI client (`serve deploy`, `serve status`).

    A local Ray instance turns token authentication on by itself when a token
    exists (~/.ray/auth_token), but the dashboard clients only send it when
    RAY_AUTH_MODE says so.
    """
    env = dict(env)
    has_token = (
        "RAY_AUTH_TOKEN" in env
        or "RAY_AUTH_TOKEN_PATH" in env
        or (Path.home() / ".ray" / "auth_token").exists()
    )
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"
    return env


def serve_deploy_command(config: Path, dashboard: str) -> list[str]:
    return [serve_binary(), "deploy", str(config), "--address", dashboard]


def serve_run_command(config: Path) -> list[str]:
    """`serve run` of a config: on RAY_ADDRESS's cluster when set, else a new local
    instance (never a stale `ray start` cluster that happens to be recorded in /tmp/ray)."""
    command = [serve_binary(), "run", str(config)]
    if not os.environ.get("RAY_ADDRESS"):
        command += ["--address", "local"]
    return command


def start_server(
    command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a server process in its own session, logging to `log_path`, in `cwd`
    (default: the source checkout; installed, the caller's folder, as `rankgate serve`).

    SIGINT is restored to its default first: a process started from a
    background job inherits "ignore SIGINT", and `serve run` shuts its Ray
    instance down cleanly only on SIGINT.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:  # an ignored signal stays ignored across exec; a handled one does not
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                command,
                env=env,
                cwd=cwd or SOURCE_CHECKOUT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGINT (clean shutdown of `serve run` and its Ray instance), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _http_option(config: Path, name: str, default: Any) -> Any:
    return (load(config).get("http_options") or {}).get(name, default)


def server_port(config: Path) -> int:
    return int(_http_option(config, "port", 8000))


def server_host(config: Path) -> str:
    return str(_http_option(config, "host", "127.0.0.1"))


def exec_serve(
    home: Home,
    base_config: Path,
    config: Path,
    env: dict[str, str],
    host: str = "127.0.0.1",
    log_format: str = "text",
) -> NoReturn:
    """Replace this process (same id, same terminal and process group) with the small
    supervisor of `serve run` (serving/ops/supervisor.py), which runs with `env`: what
    setup imported is not kept for the server's whole life."""
    command = supervisor_command_line(
        ServerInfo.path(home),
        base_config,
        server_port(config),
        serve_run_command(config),
        host=host,
        log_format=log_format,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
