"""A serve config (serve_config.yaml, a project's own, the copies made of it): read it,
find its application and the RankIngress deployment, write it back or render a new one.

One YAML library, ruamel.yaml, in round-trip mode: a file an operator wrote and that
rankgate edits (the routing of `rankgate model promote`, the policy of `rankgate
policy deploy`) is written back with its comments, quotes and layout. A config
rankgate renders for Ray (a home's derived copy, a cluster's) is written from plain
data (`plain`), multi-line strings as literal blocks people can read. Both read and
write by YAML 1.1's rules, as Ray's own reader (PyYAML) does: `on` or `yes` is a
boolean, and a string "yes" is written quoted. Every error names the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scalarbool import ScalarBoolean

from rankgate.core.config_files import validation_message
from rankgate.core.errors import ConfigError

INGRESS = "RankIngress"
"""The deployment whose user_config is the serving config (serving/contract/config.py)."""

Section = TypeVar("Section", bound=BaseModel)


class _AsRayReads(VersionedResolver):
    """YAML 1.1's implicit types (ruamel.yaml's default is 1.2), without a %YAML directive."""

    @property
    def processing_version(self) -> Any:
        return (1, 1)


def _round_trip() -> YAML:
    yaml = YAML()
    yaml.Resolver = _AsRayReads
    yaml.preserve_quotes = True
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)  # the layout of serve_config.yaml
    return yaml


def load(path: Path) -> Any:
    """The round-trip document of the YAML file at `path`."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return _round_trip().load(text)
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


@dataclass
class ServeConfig:
    """The round-trip document of a serve config file, its application and RankIngress."""

    path: Path
    document: Any
    application: Any
    """The application that holds RankIngress."""
    ingress: Any
    """The RankIngress deployment: its options and `user_config`."""

    @classmethod
    def read(cls, path: Path) -> ServeConfig:
        return cls.of(load(path), path)

    @classmethod
    def of(cls, document: Any, path: Path) -> ServeConfig:
        """`document` (read from `path`) with its RankIngress found."""
        applications = document.get("applications") if isinstance(document, dict) else None
        for application in applications or []:
            for deployment in application.get("deployments") or []:
                if deployment.get("name") == INGRESS:
                    return cls(path, document, application, deployment)
        raise ConfigError(f"{path}: no {INGRESS} deployment")

    def as_plain(self) -> ServeConfig:
        """A copy in plain dicts and lists, to render a new config from."""
        return ServeConfig.of(plain(self.document), self.path)

    @property
    def user_config(self) -> Any:
        """RankIngress's user_config (empty when the file has none)."""
        return self.ingress.get("user_config") or {}

    def section(self, model: type[Section], name: str | None = None) -> Section:
        """The user_config section `name` (None: all of it) as `model`; errors name the
        file and the field."""
        user_config = plain(self.user_config)
        source = f"{self.path} {name}" if name else f"{self.path} {INGRESS} user_config"
        try:
            return model.model_validate((user_config.get(name) if name else user_config) or {})
        except ValidationError as exc:
            raise ConfigError(validation_message(source, exc)) from exc

    def carries_project(self) -> bool:
        """Whether the config carries the project in its args (a cluster's)."""
        return "project" in (self.application.get("args") or {})

    def write(self) -> None:
        """Write the document back to its file (atomically), comments and layout kept."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            _round_trip().dump(self.document, handle)
        tmp.replace(self.path)


def plain(node: Any) -> Any:
    """A round-trip node as plain dicts, lists and scalars."""
    if isinstance(node, dict):
        return {key: plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [plain(value) for value in node]
    if isinstance(node, bool | ScalarBoolean):
        return bool(node)
    for kind in (str, int, float):
        if isinstance(node, kind):
            return kind(node)
    return node


class _Rendering(RoundTripRepresenter):
    """Plain data as Ray's own configs write it: None as `null` (round trip writes
    nothing), multi-line strings as literal blocks people can read, unless they hold
    what only an escape writes in ASCII (a tab, a carriage return, a non-ASCII letter)."""

    def represent_str(self, data: str) -> Any:
        block = "\n" in data and all(c == "\n" or " " <= c <= "~" for c in data)
        style = "|" if block else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    def represent_none(self, data: None) -> Any:
        return self.represent_scalar("tag:yaml.org,2002:null", "null")


_Rendering.add_representer(str, _Rendering.represent_str)
_Rendering.add_representer(type(None), _Rendering.represent_none)


def render(document: dict[str, Any]) -> str:
    """YAML of a config rankgate renders from plain data, multi-line strings (the files a
    cluster's config carries) as literal blocks."""
    yaml = YAML()
    yaml.Resolver = _AsRayReads
    yaml.Representer = _Rendering
    yaml.width = 100
    yaml.allow_unicode = False  # escaped, as PyYAML writes it: the file stays ASCII
    text = io.StringIO()
    yaml.dump(document, text)
    return text.getvalue()
