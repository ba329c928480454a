"""Process settings, read from the environment once and validated.

Everything the project writes at run time lives under one state folder, the
*home*: the prepared project data, the Feast registry and offline files, model
versions and the embedded Redis server's data. Two homes never share state.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from rankgate.project import Project

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Development default for the pseudonymisation key. It is public, so user keys
# derived with it are only pseudonymous against people who don't read this file:
# production deployments must set RANKGATE_USER_KEY_SECRET.
DEV_USER_KEY_SECRET = "rankgate-dev-secret-do-not-use-in-production"

STORE_SCHEMES = ("s3", "gs", "file")
"""Artifact store URIs: object stores Feast's registry and fsspec both read, or a path."""


class Settings(BaseSettings):
    """Environment of one rankgate process (CLI, server or test session)."""

    model_config = SettingsConfigDict(env_prefix="RANKGATE_", extra="ignore")

    home: Path = Field(default=PROJECT_ROOT / ".rankgate")
    """State folder (RANKGATE_HOME). Default: `.rankgate/` in the project (git-ignored)."""

    project: Path = Field(default=PROJECT_ROOT / "examples" / "default")
    """The rankgate project served (RANKGATE_PROJECT, or `--project`): a folder with a
    rankgate.yaml. Default: the project `examples/default` links to."""

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

    cache: Path = Field(default=Path(tempfile.gettempdir()) / "rankgate-cache")
    """Node-local folder (RANKGATE_CACHE) where a replica keeps what it fetched from
    the store, each file checked against its sha256."""

    @field_validator("home", "project", "cache")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


@lru_cache(maxsize=4)
def _project_at(folder: Path) -> Project:
    from rankgate.project import load_project

    return load_project(folder)


def get_project(settings: Settings | None = None) -> Project:
    """The project these settings select, loaded once per process."""
    return _project_at((settings or get_settings()).project)
