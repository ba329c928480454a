"""Embedded Redis lifecycle, REDIS_URL errors and pseudonymous keys."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rankgate.core.errors import ConfigError, RedisUnavailable
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import (
    ClusterAddress,
    EmbeddedRedis,
    connect,
    describe,
    feast_connection_string,
    feast_redis_type,
    resolve_redis_url,
)
from rankgate.core.settings import get_settings
from tests.serving_support import example_user_ids


def test_embedded_server_is_started_once_and_reused(other_home: Home) -> None:
    server = EmbeddedRedis(other_home)
    assert server.running_url() is None
    first = resolve_redis_url()
    second = resolve_redis_url()
    assert first == second
    assert (other_home.redis_dir / "valkey.pid").exists()
    client = connect(first)
    client.set("probe", "1")
    assert client.get("probe") == b"1"
    assert server.stop() is True
    assert server.running_url() is None
    # Restarted on demand, with the data saved at shutdown.
    assert connect(resolve_redis_url()).get("probe") == b"1"


def test_a_killed_embedded_server_loses_at_most_a_second_of_writes(other_home: Home) -> None:
    import os
    import signal
    import time

    server = EmbeddedRedis(other_home)
    client = connect(resolve_redis_url())
    client.set("before-aof", "1")
    server.stop()  # saved to RDB; the next start switches the append-only file on
    client = connect(resolve_redis_url())
    assert client.get("before-aof") == b"1"
    assert server.aof_exists
    client.hset("consent-like", mapping={"p": "granted"})
    time.sleep(1.5)  # appendfsync everysec
    pid = int(server.pid_path.read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while server.running_url() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    client = connect(resolve_redis_url())
    assert client.get("before-aof") == b"1"
    assert client.hgetall("consent-like") == {b"p": b"granted"}


def test_a_server_that_lives_but_does_not_answer_is_waited_for_not_started_twice(
    other_home: Home,
) -> None:
    import threading
    import time

    import psutil

    server = EmbeddedRedis(other_home)
    url = resolve_redis_url()
    pid = int(server.pid_path.read_text())
    # Busy for 3 s, as while it loads its data after a restart: longer than the 1-s
    # ping of `running_url`, so a process that needs it now finds it silent, and waits
    # for this server instead of starting one beside it on the same files.
    sleeper = threading.Thread(target=lambda: connect(url).execute_command("DEBUG", "SLEEP", "3"))
    sleeper.start()
    time.sleep(0.2)
    assert server.ensure_running() == url
    sleeper.join()
    assert int(server.pid_path.read_text()) == pid
    in_this_home = [
        p
        for p in psutil.process_iter(["name", "cwd"])
        if "valkey" in (p.info["name"] or "") and p.info["cwd"] == str(other_home.redis_dir)
    ]
    assert [p.pid for p in in_this_home] == [pid]


def test_unreachable_redis_url_names_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        with pytest.raises(RedisUnavailable, match="127.0.0.1:1"):
            connect(resolve_redis_url())
    finally:
        monkeypatch.delenv("REDIS_URL")
        get_settings.cache_clear()


def test_cli_with_unreachable_redis_fails_cleanly_and_writes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "h"
    result = subprocess.run(
        [sys.executable, "-m", "rankgate.cli", "setup"],
        env={
            "PATH": "/usr/bin:/bin",
            "RANKGATE_HOME": str(home),
            "REDIS_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "Redis unreachable at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "data").exists() and not (home / "models").exists()


def test_feast_connection_string_from_url() -> None:
    assert feast_connection_string("redis://127.0.0.1:6380/2") == "127.0.0.1:6380,db=2"
    assert (
        feast_connection_string("rediss://:s3cret@cache.internal:6379")
        == "cache.internal:6379,db=0,password=s3cret,ssl=true"
    )


def test_a_cluster_url_names_its_seed_nodes_for_rankgate_and_feast() -> None:
    url = "rediss+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7001/0"
    assert ClusterAddress.parse(url) == ClusterAddress(
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)), "app", "s3cret", True
    )
    assert feast_redis_type(url) == "redis_cluster"
    assert feast_redis_type("redis://127.0.0.1:6379/0") == "redis"
    assert (
        feast_connection_string(url)
        == "10.0.0.1:7000,10.0.0.2:7001,password=s3cret,username=app,ssl=true"
    )
    assert describe(url) == "10.0.0.1:7000,10.0.0.2:7001 (cluster)"  # no credentials
    assert ClusterAddress.parse("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://10.0.0.1:7000/3", "only database 0"),
        ("redis+cluster://10.0.0.1", "'10.0.0.1' is not host:port"),
        ("redis+cluster://10.0.0.1:7000,:7001", "':7001' is not host:port"),
    ],
)
def test_a_bad_cluster_url_is_refused_naming_the_field(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"REDIS_URL: .*{says}"):
        ClusterAddress.parse(url)


def test_an_unreachable_cluster_names_its_nodes() -> None:
    with pytest.raises(RedisUnavailable, match=r"127.0.0.1:1 \(cluster\)"):
        connect("redis+cluster://127.0.0.1:1", socket_connect_timeout=0.5)


def test_user_key_is_a_stable_keyed_hash() -> None:
    assert user_key("u-1", "a") == user_key("u-1", "a")
    assert user_key("u-1", "a") != user_key("u-1", "b")
    assert user_key("u-1", "a") != user_key("u-2", "a")
    assert "u-1" not in user_key("u-1", "a") and len(user_key("u-1", "a")) == 32


def test_no_raw_user_id_anywhere_in_redis(env) -> None:  # type: ignore[no-untyped-def]
    ids = example_user_ids()
    keys = list(env.redis.scan_iter(count=1000))
    assert len(keys) > len(ids)  # features and consent of every example user are there
    blob = b"\n".join(keys)
    for key in keys:
        kind = env.redis.type(key)
        if kind == b"hash":
            blob += b"".join(k + v for k, v in env.redis.hgetall(key).items())
        elif kind == b"string":
            blob += env.redis.get(key) or b""
    leaked = [uid for uid in ids if uid.encode() in blob]
    assert leaked == []
    assert user_key(ids[0]).encode() in blob
