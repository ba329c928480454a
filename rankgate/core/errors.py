"""Domain errors. Each carries the HTTP status it maps to; only the ingress maps
them to responses, and the CLI prints their message and exits non-zero."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

RETRY_SOON: Mapping[str, str] = MappingProxyType({"Retry-After": "1"})
"""The headers of an answer that a retry may soon get past (a store is unavailable)."""


class RankgateError(Exception):
    """Base class: a message for people and the status an API would answer with."""

    status_code: int = 500
    error: str = "error"
    """The `error` of the API's answer: a stable name a client can branch on."""
    rejection: str | None = None
    """How the serving metrics count a request refused with this error (None: not counted)."""
    problems: Sequence[Any] = ()
    """What is wrong with an input, each naming its field (the answer lists them
    instead of the message)."""
    headers: Mapping[str, str] | None = None
    """Headers the answer carries (a retry hint, a closed connection, an auth scheme)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(RankgateError):
    """A configuration or policy file is invalid; names the file and the field."""

    status_code = 500


class RedisUnavailable(RankgateError):
    """The Redis-compatible server cannot be reached; names the address."""

    status_code = 503
    error = "unavailable"
    headers = RETRY_SOON


class ModelStoreError(RankgateError):
    """A model version is missing, corrupted or inconsistent with its manifest."""

    status_code = 409


class VersionExists(ModelStoreError):
    """Refusing to overwrite a registered model version."""


class UnknownVersion(ModelStoreError):
    status_code = 404


class FeatureRepoError(RankgateError):
    """The feature repository does not define what a model or request needs."""

    status_code = 409
