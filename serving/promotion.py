"""Promotion by config: edit the routing section of the serve config and apply it.

`rankgate model promote V --canary PCT | --stable | --shadow` and `rankgate
model rollback` rewrite the `routing` section of the RankIngress user_config in
the serve config (comments and layout kept), after checking that the version
validates and that the new routing is valid. When a server of this home is
running, the file is applied with `serve deploy`: only `user_config` changes,
so Ray Serve calls `reconfigure` on the running replicas, without a restart.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from rankgate.config_files import validation_message
from rankgate.errors import ConfigError, RankgateError
from rankgate.home import Home
from rankgate.settings import PROJECT_ROOT
from serving.launch import SERVE_CONFIG, derived_config, ray_client_env, serve_deploy_command
from serving.routing import RoutingConfig

Say = Callable[[str], None]


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)  # the layout of serve_config.yaml
    return yaml


@dataclass
class ServerInfo:
    """What a running `rankgate serve` (or the test server) left in `<home>/ray/server.json`."""

    base_config: Path
    port: int
    dashboard: str

    @classmethod
    def path(cls, home: Home) -> Path:
        return home.root / "ray" / "server.json"

    @classmethod
    def read(cls, home: Home) -> ServerInfo | None:
        try:
            raw = json.loads(cls.path(home).read_text())
            return cls(Path(raw["base_config"]), int(raw["port"]), str(raw["dashboard"]))
        except (OSError, ValueError, KeyError):
            return None

    def write(self, home: Home) -> None:
        self.path(home).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "base_config": str(self.base_config),
            "port": self.port,
            "dashboard": self.dashboard,
        }
        self.path(home).write_text(json.dumps(payload) + "\n")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"{self.base_url}/healthz", timeout=2)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None


def ingress_deployment(document: Any) -> Any:
    for app in document.get("applications", []):
        for deployment in app.get("deployments", []):
            if deployment.get("name") == "RankIngress":
                return deployment
    raise ConfigError("no RankIngress deployment in the serve config")


def read_routing(config_path: Path) -> tuple[Any, Any]:
    """The parsed document (round-trip) and its routing node."""
    try:
        document = _yaml().load(config_path.read_text())
    except OSError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    routing = ingress_deployment(document).get("user_config", {}).get("routing")
    if routing is None:
        raise ConfigError(f"{config_path}: RankIngress user_config has no routing section")
    return document, routing


def plain(node: Any) -> Any:
    return json.loads(json.dumps(node))


def promoted(
    routing: dict[str, Any], version: str, role: str, weight: float | None
) -> list[dict[str, Any]]:
    """The routing versions after promoting `version` to `role`."""
    versions = [dict(v) for v in routing["versions"] if v["version"] != version]
    stable = next((v for v in versions if v["role"] == "stable"), None)
    if role == "stable":
        versions = [v for v in versions if v["role"] not in ("stable", "canary")]
        versions.insert(0, {"version": version, "role": "stable", "weight": 100})
        return versions
    if role == "canary":
        assert weight is not None
        versions = [v for v in versions if v["role"] != "canary"]
        if stable is not None:
            stable["weight"] = 100 - weight
        versions.insert(1, {"version": version, "role": "canary", "weight": weight})
        return versions
    # shadow
    versions.append({"version": version, "role": "shadow"})
    if stable is not None and not any(v["role"] == "canary" for v in versions):
        stable["weight"] = 100
    return versions


def rolled_back(routing: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The routing versions without the canary, and the canary removed (if any)."""
    canary = next((v["version"] for v in routing["versions"] if v["role"] == "canary"), None)
    versions = [dict(v) for v in routing["versions"] if v["role"] != "canary"]
    for v in versions:
        if v["role"] == "stable":
            v["weight"] = 100
    return versions, canary


def validate_routing(routing: dict[str, Any], source: Path) -> RoutingConfig:
    try:
        return RoutingConfig.model_validate(routing)
    except ValidationError as exc:
        raise ConfigError(validation_message(f"{source} routing", exc)) from exc


def write_routing(
    config_path: Path, document: Any, routing_node: Any, versions: list[dict[str, Any]]
) -> None:
    entries = routing_node["versions"]
    entries.clear()
    for version in versions:
        entry = CommentedMap(version)
        entry.fa.set_flow_style()  # one line per version, as written by hand
        entries.append(entry)
    tmp = config_path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        _yaml().dump(document, handle)
    tmp.replace(config_path)


def write_policy(config_path: Path, folder: Path, revision: str) -> None:
    """Point the RankIngress user_config at a checked policy folder (`rankgate policy deploy`)."""
    try:
        document = _yaml().load(config_path.read_text())
    except OSError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    user_config = ingress_deployment(document).setdefault("user_config", CommentedMap())
    # Inside the project the folder is written relative to it, so the file stays portable.
    shown = folder.relative_to(PROJECT_ROOT) if folder.is_relative_to(PROJECT_ROOT) else folder
    section = CommentedMap({"dir": str(shown), "revision": revision})
    section.fa.set_flow_style()
    user_config["policy"] = section
    tmp = config_path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        _yaml().dump(document, handle)
    tmp.replace(config_path)


def apply_running(
    home: Home,
    config_path: Path,
    env: dict[str, str],
    expect: Callable[[dict[str, Any]], bool],
    say: Say,
    timeout_s: float = 60,
) -> bool:
    """`serve deploy` the edited config to this home's running server, if any; wait until it serves it."""
    info = ServerInfo.read(home)
    if info is None or info.health() is None or info.base_config.resolve() != config_path.resolve():
        say("no running server uses this config: the change applies at the next `rankgate serve`")
        return False
    deployed = derived_config(home, base=config_path, port=info.port)
    result = subprocess.run(
        serve_deploy_command(deployed, info.dashboard),
        env=ray_client_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RankgateError(
            f"serve deploy failed: {(result.stderr or result.stdout).strip()[-800:]}"
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = info.health()
        if health is not None and health.get("config_error"):
            raise RankgateError(f"the server refused the config: {health['config_error']}")
        if health is not None and expect(health):
            say(f"applied to the running server at {info.base_url} (reconfigured in place)")
            return True
        time.sleep(0.25)
    raise RankgateError(
        f"the server at {info.base_url} did not take the new config within {timeout_s:.0f}s"
    )


def default_config(home: Home) -> Path:
    info = ServerInfo.read(home)
    return info.base_config if info is not None else SERVE_CONFIG
