"""Process settings, read from the environment once and validated.

Everything the project writes at run time lives under one state folder, the
*home*: the prepared project data, the Feast registry and offline files, model
versions and the embedded Redis server's data. Two homes never share state.

Where nothing is set, the project is the current folder when it holds a
rankgate.yaml, else (running from a source checkout) the repository's example;
the home is `.rankgate/` in the project (in the repository for its examples).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rankgate.core.errors import ConfigError
from rankgate.core.project import PROJECT_FILE

if TYPE_CHECKING:
    from rankgate.core.project import Project


def _source_checkout() -> Path | None:
    """The repository rankgate runs from (an editable install, or PYTHONPATH), if any.

    Installed from a wheel, the package's parent is site-packages, which holds no
    pyproject.toml: only a checkout has examples to fall back on."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "examples").is_dir() else None


SOURCE_CHECKOUT = _source_checkout()


def put_checkout_on_path(env: MutableMapping[str, str]) -> None:
    """Put the source checkout first on a child process's PYTHONPATH when rankgate runs
    from one (the child must import these packages, however it is started); installed,
    children import rankgate from site-packages and PYTHONPATH is left as it is."""
    if SOURCE_CHECKOUT is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(SOURCE_CHECKOUT), env.get("PYTHONPATH")])
        )


NO_PROJECT = (
    "no rankgate project selected: run in a project folder (one with rankgate.yaml), "
    "set RANKGATE_PROJECT or pass `rankgate --project FOLDER`; `rankgate init FOLDER` "
    "writes a new project"
)

# Development default for the pseudonymisation key. It is public, so user keys
# derived with it are only pseudonymous against people who don't read this file:
# production deployments must set RANKGATE_USER_KEY_SECRET.
DEV_USER_KEY_SECRET = "rankgate-dev-secret-do-not-use-in-production"

STORE_SCHEMES = ("s3", "gs", "file")
"""Artifact store URIs: object stores Feast's registry and fsspec both read, or a path."""


class Settings(BaseSettings):
    """Environment of one rankgate process (CLI, server or test session)."""

    model_config = SettingsConfigDict(env_prefix="RANKGATE_", extra="ignore")

    home: Path | None = None
    """State folder (RANKGATE_HOME). Default: `.rankgate/` in the project (git-ignored);
    for a project inside a source checkout, `.rankgate/` in the repository."""

    project: Path | None = None
    """The rankgate project served (RANKGATE_PROJECT, or `--project`): a folder with a
    rankgate.yaml. Default: the current folder when it holds one, else, in a source
    checkout, the project `examples/default` links to; else none (an error where a
    command needs one)."""

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "RANKGATE_REDIS_URL")
    )
    """An existing Redis-compatible server (REDIS_URL). Unset: the embedded server."""

    user_key_secret: str = DEV_USER_KEY_SECRET
    """Key of the HMAC that turns user ids into the pseudonymous keys stored in Redis."""

    store: str | None = None
    """Where a cluster's replicas get what they serve (RANKGATE_STORE): a URI of the
    artifact store (`s3://bucket/prefix`, `gs://bucket/prefix` or `file:///path`)
    holding model versions, the Feast registry and the tables the serving path reads
    (model_store/artifacts.py). Unset: everything is read from the home (one machine)."""

    durable_replicas: int = Field(default=0, ge=0)
    """Replicas whose append-only file must hold a write, fsynced, before rankgate
    acknowledges it (RANKGATE_DURABLE_REPLICAS; WAITAOF's numreplicas,
    rankgate/core/durable.py). 0: the master's own disk."""

    cache: Path = Field(default=Path(tempfile.gettempdir()) / "rankgate-cache")
    """Node-local folder (RANKGATE_CACHE) where a replica keeps what it fetched from
    the store, each file checked against its sha256."""

    @field_validator("home", "project", "cache")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.project is None:
            self.project = default_project()
        if self.home is None and self.project is not None:
            self.home = default_home(self.project)
        return self

    @field_validator("redis_url", "store")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in STORE_SCHEMES:
            raise ValueError(
                f"{value!r}: use {', '.join(s + '://' for s in STORE_SCHEMES)} "
                "(Feast reads its registry from these)"
            )
        return value.rstrip("/")

    @property
    def uses_dev_secret(self) -> bool:
        return self.user_key_secret == DEV_USER_KEY_SECRET

    @property
    def project_folder(self) -> Path:
        """The selected project's folder; a clear error when none is selected."""
        if self.project is None:
            raise ConfigError(NO_PROJECT)
        return self.project

    @property
    def home_folder(self) -> Path:
        """The state folder: RANKGATE_HOME, else the selected project's default."""
        if self.home is None:
            raise ConfigError(f"{NO_PROJECT} (or set RANKGATE_HOME)")
        return self.home


def default_project(cwd: Path | None = None) -> Path | None:
    """The project when none is named: `cwd` (default: the current folder) if it
    holds a rankgate.yaml, else a checkout's example, else none."""
    folder = (cwd or Path.cwd()).resolve()
    if (folder / PROJECT_FILE).is_file():
        return folder
    if SOURCE_CHECKOUT is not None:
        return (SOURCE_CHECKOUT / "examples" / "default").resolve()
    return None


def default_home(project: Path) -> Path:
    """`.rankgate/` in the project; in the repository for a project of a checkout
    (its examples), so `./run` keeps the one home it always had."""
    if SOURCE_CHECKOUT is not None and project.is_relative_to(SOURCE_CHECKOUT):
        return SOURCE_CHECKOUT / ".rankgate"
    return project / ".rankgate"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


@lru_cache(maxsize=4)
def _project_at(folder: Path) -> Project:
    from rankgate.core.project import load_project

    return load_project(folder)


def get_project(settings: Settings | None = None) -> Project:
    """The project these settings select, loaded once per process."""
    return _project_at((settings or get_settings()).project_folder)
