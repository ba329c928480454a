"""API keys: one or more per application, scoped to purposes, stored hashed.

    redis_keys.api_keys(namespace)   hash: sha256(key) -> {"app", "purposes", "scopes",
                                                         "created_at", "hint"}

Purposes say what a key may rank and record consent for. Scopes add other kinds
of call: `events` lets a key post events (`POST /v1/events`).

A key is `rg_` plus 32 random bytes (URL-safe base64). Only its SHA-256 is
stored: a key this random needs no slow password hash, and a leaked Redis
dump gives no usable key. `hint` (the first characters) lets operators tell
keys apart in `rankgate keys list`.

Serving replicas hold the whole table in memory (`KeyTable`) and re-read it
every `auth.refresh_s`, so checking a key costs one hash and one dict lookup,
a revoked key stops working within that interval, and keys keep working
through a Redis outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from rankgate.core import redis_keys
from rankgate.core.durable import on_disk
from rankgate.core.errors import RankgateError
from rankgate.core.home import Home
from rankgate.core.redis_server import RedisClient, connect
from rankgate.governance.policy import load_policy

KEY_PREFIX = "rg_"
KEY_RANDOM_BYTES = 32
# Matched whole (`fullmatch`): with `re.match`, `$` also matches before a final
# newline, so "shop\n" would have been an application of its own.
KEY_PATTERN = re.compile(KEY_PREFIX + r"[A-Za-z0-9_-]{43}")  # 32 bytes, URL-safe base64
APP_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


SCOPES = ("events", "identify")
"""Kinds of call a key may make beyond ranking and consent for its purposes."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyError(RankgateError):
    """A key request that cannot be honoured (bad app name, unknown purpose)."""

    status_code = 422


@dataclass(frozen=True)
class ApiKey:
    """What is stored of a key: never the key itself."""

    app: str
    purposes: frozenset[str]
    created_at: str
    hint: str
    scopes: frozenset[str] = frozenset()

    def to_json(self) -> str:
        return json.dumps(
            {
                "app": self.app,
                "purposes": sorted(self.purposes),
                "scopes": sorted(self.scopes),
                "created_at": self.created_at,
                "hint": self.hint,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ApiKey:
        data = json.loads(raw)
        return cls(
            app=data["app"],
            purposes=frozenset(data["purposes"]),
            created_at=data["created_at"],
            hint=data["hint"],
            scopes=frozenset(data.get("scopes", ())),
        )


def is_key_shaped(token: str) -> bool:
    """Whether `token` could be a key `ApiKeyStore.create` made."""
    return KEY_PATTERN.fullmatch(token) is not None


class KeyTable:
    """digest -> ApiKey, as one replica knows it."""

    def __init__(self, entries: Mapping[bytes | str, bytes | str]) -> None:
        self.entries: dict[str, ApiKey] = {}
        for digest, raw in entries.items():
            name = digest.decode() if isinstance(digest, bytes) else digest
            try:
                self.entries[name] = ApiKey.from_json(raw)
            except (ValueError, KeyError, TypeError):
                continue  # a damaged entry authorizes nothing

    def lookup(self, token: str) -> ApiKey | None:
        """The stored entry of a presented key, if it is one."""
        if not is_key_shaped(token):
            return None
        return self.entries.get(key_digest(token))


def check_app(app: str) -> str:
    if not APP_PATTERN.fullmatch(app):
        raise ApiKeyError(
            f"application name {app!r}: 1-64 letters, digits and . _ -, "
            "starting with a letter or digit"
        )
    return app


class ApiKeyStore:
    """Create, list and revoke keys (the `rankgate keys` commands)."""

    def __init__(self, client: RedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.key = redis_keys.api_keys(namespace)

    def create(
        self,
        app: str,
        purposes: Iterable[str],
        known_purposes: Iterable[str],
        scopes: Iterable[str] = (),
    ) -> str:
        """A new key for `app`, returned once; only its digest is stored."""
        check_app(app)
        unknown_scopes = sorted(set(scopes) - set(SCOPES))
        if unknown_scopes:
            raise ApiKeyError(f"unknown scope {unknown_scopes[0]!r} (known: {', '.join(SCOPES)})")
        wanted = sorted(set(purposes))
        known = sorted(set(known_purposes))
        if not wanted:
            raise ApiKeyError("a key needs at least one --purpose")
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise ApiKeyError(f"unknown purpose {unknown[0]!r} (known: {', '.join(known)})")
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        entry = ApiKey(
            app=app,
            purposes=frozenset(wanted),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            hint=key[:7],
            scopes=frozenset(scopes),
        )
        self.client.hset(self.key, key_digest(key), entry.to_json())
        on_disk(self.client, self.namespace, "the new key", self.key)  # shown once on disk
        return key

    def table(self) -> KeyTable:
        return KeyTable(self.client.hgetall(self.key))  # type: ignore[arg-type]

    def all(self) -> list[ApiKey]:
        return sorted(self.table().entries.values(), key=lambda k: (k.app, k.created_at))

    def revoke(self, app: str) -> int:
        """Delete every key of `app`; how many there were."""
        check_app(app)
        digests = [d for d, entry in self.table().entries.items() if entry.app == app]
        if digests:
            self.client.hdel(self.key, *digests)
            on_disk(self.client, self.namespace, "the revocation", self.key)
        return len(digests)

    def revoke_key(self, key: str) -> bool:
        """Delete one key (a temporary key of the load test)."""
        revoked = bool(self.client.hdel(self.key, key_digest(key)))
        if revoked:
            on_disk(self.client, self.namespace, "the revocation", self.key)
        return revoked


@contextlib.contextmanager
def temporary_key(app: str) -> Iterator[str]:
    """A key of this home for every purpose and scope, revoked on exit (load tests,
    benchmark)."""
    store = ApiKeyStore(connect(), Home.from_settings().namespace)
    purposes = list(load_policy().purposes)
    key = store.create(app, purposes, purposes, SCOPES)
    try:
        yield key
    finally:
        store.revoke_key(key)
