"""The state folder ("home") and what lives in it.

Layout (all created on demand):

    <home>/home.json        namespace of this home in Redis and Feast
    <home>/data/            what the project's prepare step writes (Feast sources, logs)
    <home>/setup.json       sha256 of each project source setup prepared from
    <home>/feast/           Feast registry
    <home>/models/<name>/<version>/   model versions (see model_store)
    <home>/redis/           embedded Redis-compatible server: config, data, log, pid
    <home>/pycache/         bytecode of the server's application processes (serving/ops/launch.py)
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from rankgate.core.settings import Settings, get_settings


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Home:
        home = cls((settings or get_settings()).home_folder)
        home.root.mkdir(parents=True, exist_ok=True)
        return home

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def feast_dir(self) -> Path:
        return self.root / "feast"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def namespace(self) -> str:
        """Prefix of every Redis key and the Feast project of this home.

        Generated once per home, so two homes sharing one REDIS_URL still never
        read or overwrite each other's keys.
        """
        meta_path = self.root / "home.json"
        if meta_path.exists():
            return str(json.loads(meta_path.read_text())["namespace"])
        namespace = f"rg_{secrets.token_hex(4)}"
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"namespace": namespace}) + "\n")
        try:
            # First writer wins when two processes initialise a home at once.
            tmp.rename(meta_path) if not meta_path.exists() else tmp.unlink()
        except OSError:
            tmp.unlink(missing_ok=True)
        return str(json.loads(meta_path.read_text())["namespace"])
