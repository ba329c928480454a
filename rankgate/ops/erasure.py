"""Right to be forgotten: erase what a home keeps about one person.

A person is stored only under their pseudonymous key (rankgate.core.pseudonym), so
that key finds everything. In Redis, every kind of key that rankgate.core.redis_keys
marks as naming people (`ERASED`; the other kinds hold no user keys):

    Feast online rows   hashes named by Feast, one per entity key, with a
                        `_ts:<view>` field per feature view
    consent record      the person's consent hash
    audit records       entries of the audit stream whose record names the user key
    events              entries of the event stream whose stored event's `user` is the key
    streaming states    the consumer's per-view state hashes of the person (any view,
                        declared or not); their Feast rows of streaming views are
                        online rows like the others
    decisions           decision hashes (outcomes joined to a ranking) whose `u` is the key

and outside it:

    offline rows        rows with the user join key column (rankgate.yaml `user.join_key`)
                        in every Parquet table of the home's data folder (what the
                        project's prepare step wrote) and in the project's own
                        Parquet sources of user views and its interaction log: the
                        sources `rankgate features materialize` and training read

The offline rows go first, so a materialize running meanwhile
cannot bring back rows erased from Redis afterwards. Erasing twice erases
nothing the second time, and says so.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from feast.infra.key_encoding_utils import deserialize_entity_key

from features.store import ENTITY_KEY_SERIALIZATION_VERSION
from rankgate.core import redis_keys
from rankgate.core.durable import on_disk
from rankgate.core.errors import RankgateError
from rankgate.core.home import Home
from rankgate.core.project import Project
from rankgate.core.redis_keys import glob_escape
from rankgate.core.redis_server import RedisClient, failing_as_unavailable
from rankgate.core.streams import stream_pages
from rankgate.governance.identity import LINK_FIELD, IdKind, LinkEntry, id_key
from serving.contract.config import LimitsConfig
from serving.contract.schemas import check_user_id
from serving.events.intake import StoredEvent
from serving.observe.audit import AuditRecord

SCAN_COUNT = 1000
AUDIT_PAGE = 1000
DECISION_USER_FIELD = "u"
"""The field of a decision hash (redis_keys.decision) that holds its user key."""
SHOWN_KEY_CHARS = 8  # enough to tell people apart in output, too little to look anyone up
SCAN_EACH_UP_TO = 4
"""A person with more ids has their Feast rows found in one pass over the keyspace."""
LINKS = "<links>"
"""Where `_erase_stream_entries` counts link entries (not one id's)."""
ERASED = (
    redis_keys.FEAST_ROWS,
    redis_keys.CONSENT,
    redis_keys.AUDIT,
    redis_keys.EVENTS,
    redis_keys.STREAMING_STATE,
    redis_keys.DECISIONS,
    redis_keys.IDENTITY_LINK,
    redis_keys.IDENTITY_IDS,
)
"""The kinds of Redis key `forget` erases the person from: every kind that names people."""


def checked_user_id(user_id: str, limits: LimitsConfig | None = None) -> str:
    """A user id by the API's rules (serving.contract.schemas); the error never repeats the id."""
    if not user_id:
        raise RankgateError("user id: empty", 422)
    try:
        return check_user_id(user_id, limits or LimitsConfig())
    except ValueError as exc:
        raise RankgateError(f"user id: {exc}", 422) from exc


def event_owner(fields: dict[bytes, bytes]) -> str | set[str]:
    """The id key of an event entry, or every person key a link entry names."""
    if LINK_FIELD in fields:
        link = LinkEntry.read(b"0-0", fields)
        return {link.person, *link.joined}
    return StoredEvent.read(b"0-0", fields).user_key


def shown_key(key: str) -> str:
    return key[:SHOWN_KEY_CHARS] + "…"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@dataclass(frozen=True)
class ErasureReport:
    """What one `forget` erased, per kind."""

    user_key: str
    feature_rows: dict[str, int]
    """Feast online rows per feature view."""
    consent_records: int
    audit_records: int
    offline_rows: dict[str, int]
    """Rows per prepared table (file name without `.parquet`)."""
    events: int = 0
    """Entries of the event stream."""
    streaming_states: int = 0
    """The event consumer's state hashes (one per streaming view)."""
    decisions: int = 0
    """Decision hashes (a ranking and the outcomes joined to it)."""
    kind: str = "user"
    """The kind of id the key is of (user, anonymous)."""

    @property
    def erased_anything(self) -> bool:
        return bool(
            sum(self.feature_rows.values())
            or self.consent_records
            or self.audit_records
            or sum(self.offline_rows.values())
            or self.events
            or self.streaming_states
            or self.decisions
        )

    def summary(self) -> str:
        """One line for people: counts and a short prefix of the key, never the raw id."""
        who = f"{'anonymous id' if self.kind == 'anonymous' else 'user'} key {shown_key(self.user_key)}"
        if not self.erased_anything:
            return (
                f"nothing to erase for {who}: no feature rows, consent record, audit records, "
                "events, streaming states, decisions or offline rows (already forgotten, "
                "or never known)"
            )
        parts = [_plural(n, f"{view} row") for view, n in self.feature_rows.items()]
        parts.append(_plural(self.consent_records, "consent record"))
        parts.append(_plural(self.audit_records, "audit record"))
        parts.append(_plural(self.events, "event"))
        parts.append(_plural(self.streaming_states, "streaming state"))
        parts.append(_plural(self.decisions, "decision"))
        offline = _plural(sum(self.offline_rows.values()), "offline row")
        tables = ", ".join(f"{table} {n}" for table, n in self.offline_rows.items() if n)
        parts.append(f"{offline} ({tables})" if tables else offline)
        return f"erased for {who}: " + ", ".join(parts)


def feast_user_key(redis_key: bytes, project: str, join_key: str) -> str | None:
    """The user key a Feast online row of `project` is keyed by; None for any other key."""
    suffix = project.encode()
    if not redis_key.endswith(suffix):
        return None
    try:
        entity = deserialize_entity_key(
            redis_key[: -len(suffix)],
            entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
        )
    except (ValueError, struct.error):
        return None  # not an entity key: some other key that merely contains the bytes
    for name, value in zip(entity.join_keys, entity.entity_values, strict=False):
        if name == join_key and value.WhichOneof("val") == "string_val":
            return str(value.string_val)
    return None


def erase_offline_rows(tables: list[Path], column: str, key: str) -> dict[str, int]:
    """Drop the person's rows from every table with the user column; rows erased per table."""
    erased: dict[str, int] = {}
    for path in tables:
        if not path.exists() or column not in pq.read_schema(path).names:
            continue
        table = pq.read_table(path)
        mine = pc.fill_null(pc.equal(table[column], key), False)
        count = int(pc.sum(mine).as_py() or 0)
        erased[path.stem] = count
        if count:
            # Written aside and renamed over: a reader sees the old table or the new one.
            tmp = path.with_suffix(".erasing")
            pq.write_table(table.filter(pc.invert(mine)), tmp)
            os.replace(tmp, path)
    return erased


def offline_tables(home: Home, project: Project) -> list[Path]:
    """The Parquet tables a person's rows may be in: the home's data folder (what the
    prepare step wrote) and the project's file sources of user views and its log."""
    tables = set(home.data_dir.rglob("*.parquet")) if home.data_dir.exists() else set()
    if project.spec.interactions is not None:
        tables.add(project.path(project.spec.interactions.path, home.data_dir))
    if (home.feast_dir / "registry.db").exists():
        from feast import FeatureStore

        from features.applied import describe
        from features.store import repo_config
        from features.tables import source_path

        # Only the registry is read: no Redis connection is made.
        store = FeatureStore(config=repo_config(home, "redis://127.0.0.1:6379/0", project=project))
        for view in store.list_feature_views():
            if project.spec.user.entity in view.entities:
                try:
                    tables.add(source_path(describe(view), project))
                except RankgateError:
                    continue  # not a file source: nothing rankgate can rewrite
    return sorted(p for p in tables if p.suffix == ".parquet")


@dataclass(frozen=True)
class PersonErasure:
    """What one `forget` erased: a report per id of the person, and their links."""

    reports: list[ErasureReport]
    links: int = 0
    """Link records (the ids' links, the person's id list, link entries of the stream)."""

    def summary(self) -> str:
        lines = [report.summary() for report in self.reports]
        if len(self.reports) > 1 or self.links:
            lines.append(f"and {_plural(self.links, 'link record')} of {len(self.reports)} ids")
        return "\n".join(lines)


class Eraser:
    """Erases one person from a home: offline tables first, then Redis.

    A person is every id linked to them (rankgate.governance.identity): forgetting
    any of their ids erases what is kept under each, then the links themselves.

    Lifecycle: `Eraser(client, home)`, then `forget(user_id)` per request. Redis is
    checked before anything is touched; a Redis that fails half-way is reported
    as such, and running `forget` again finishes the job (the links go last, so
    it finds every id again).
    """

    def __init__(self, client: RedisClient, home: Home, project: Project) -> None:
        self.client = client
        self.namespace = home.namespace
        self.feast_project = home.namespace  # the Feast project of a home is its namespace
        self.join_key = project.spec.user.join_key
        self.tables = offline_tables(home, project)

    def forget(self, raw_id: str, kind: IdKind = IdKind.USER) -> PersonErasure:
        key = id_key(kind, checked_user_id(raw_id))
        with failing_as_unavailable(self.client, "nothing was erased"):
            self.client.ping()
            person, ids = self.person_ids(key, kind)
        offline = {k: erase_offline_rows(self.tables, self.join_key, k) for k in ids}
        with failing_as_unavailable(self.client, "run the command again to finish erasing"):
            audit = self.erase_audit_records(set(ids))
            events = self.erase_events(set(ids))
            decisions = self.erase_decisions(set(ids))
            # Up to a few ids, a SCAN each, matched by the server; past that, one pass.
            found = self.feature_row_names(set(ids)) if len(ids) > SCAN_EACH_UP_TO else None
            reports = []
            for k, k_kind in ids.items():
                feature_rows = self.erase_feature_rows(k, found)
                consent = int(self.client.delete(redis_keys.consent(self.namespace, k)))  # type: ignore[arg-type]
                states = self.erase_streaming_states(k)
                reports.append(
                    ErasureReport(
                        k,
                        feature_rows,
                        consent,
                        audit[k],
                        offline[k],
                        events[k],
                        states,
                        decisions[k],
                        k_kind,
                    )
                )
            links = events[LINKS] + self.erase_links(person, ids)
            # Reported as erased only once the deletions are on disk (rankgate/core/durable.py).
            on_disk(self.client, self.namespace, "the erasure")
        return PersonErasure(reports, links)

    def person_ids(self, key: str, kind: IdKind) -> tuple[str, dict[str, str]]:
        """The person of id `key` and every id key of theirs -> kind (the id itself first)."""
        linked = self.client.get(redis_keys.identity_link(self.namespace, key))
        person = linked.decode() if isinstance(linked, bytes) else key
        raw = self.client.hgetall(redis_keys.identity_ids(self.namespace, person))
        ids = {key: kind.value}
        for name, value in raw.items():  # type: ignore[union-attr]
            ids.setdefault(name.decode(), json.loads(value)["kind"])
        ids.setdefault(person, IdKind.USER.value)
        return person, ids

    def erase_links(self, person: str, ids: dict[str, str]) -> int:
        names = [redis_keys.identity_link(self.namespace, k) for k in ids]
        names.append(redis_keys.identity_ids(self.namespace, person))
        return sum(int(self.client.delete(name)) for name in names)  # type: ignore[arg-type,misc]

    def feature_row_names(self, keys: set[str]) -> dict[str, list[bytes]]:
        """The Feast online rows of many ids in one pass over the keyspace (a SCAN for
        each would read it once per id): the names of the home's Feast project whose
        entity value ends where a user key of that length would, confirmed by decoding."""
        suffix = self.feast_project.encode()
        width = len(next(iter(keys)))
        found: dict[str, list[bytes]] = {}
        pattern = "*" + glob_escape(self.feast_project)
        for name in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
            candidate = name[-len(suffix) - width : -len(suffix)].decode(errors="replace")
            owner = (
                feast_user_key(name, suffix.decode(), self.join_key) if candidate in keys else None
            )
            if owner == candidate:
                found.setdefault(candidate, []).append(name)
        return found

    def erase_feature_rows(
        self, key: str, found: dict[str, list[bytes]] | None = None
    ) -> dict[str, int]:
        """Delete every Feast online row keyed by the person; rows per feature view.

        A SCAN for key names containing the user key, each confirmed by decoding its
        entity key, finds rows under any entity key that includes the person, and
        rows of views no longer in the registry (`found`: the rows of many ids,
        from `feature_row_names`).
        """
        rows: Counter[str] = Counter()
        if found is not None:
            names = found.get(key, [])
        else:
            names = [
                name
                for name in self.client.scan_iter(match=f"*{key}*", count=SCAN_COUNT)
                if feast_user_key(name, self.feast_project, self.join_key) == key
            ]
        if not names:
            return dict(rows)
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hkeys(name)  # type: ignore[arg-type]
            fields = pipe.execute()
        for hash_fields in fields:
            rows.update(f[4:].decode() for f in hash_fields if f.startswith(b"_ts:"))
        self.client.delete(*names)
        return dict(sorted(rows.items()))

    def erase_audit_records(self, keys: set[str]) -> Counter[str]:
        """XDEL every decision of the person, paging through the stream oldest first."""
        return self._erase_stream_entries(
            redis_keys.audit(self.namespace),
            keys,
            lambda fields: AuditRecord.read(fields.get(b"record", b"")).user_key,
        )

    def erase_events(self, keys: set[str]) -> Counter[str]:
        """XDEL every event of the person's ids from the event stream, and the link
        entries naming them (counted under `LINKS`)."""
        return self._erase_stream_entries(redis_keys.events(self.namespace), keys, event_owner)

    def _erase_stream_entries(
        self, stream: str, keys: set[str], owner: Callable[[dict[bytes, bytes]], str | set[str]]
    ) -> Counter[str]:
        """XDEL the entries of `stream` whose `owner` is one of the keys (or, for a
        set, names one); entries erased per key."""
        needles = [key.encode() for key in keys]
        mine: list[bytes] = []
        erased: Counter[str] = Counter()
        for page in stream_pages(self.client, stream, AUDIT_PAGE):
            for stream_id, fields in page:
                # The substring test is cheap; parsing confirms it is the entry's user key.
                if not any(n in value for value in fields.values() for n in needles):
                    continue
                found = owner(fields)
                if isinstance(found, set):
                    if found & keys:
                        mine.append(stream_id)
                        erased[LINKS] += 1
                elif found in keys:
                    mine.append(stream_id)
                    erased[found] += 1
        for start in range(0, len(mine), AUDIT_PAGE):
            self.client.xdel(stream, *mine[start : start + AUDIT_PAGE])
        return erased

    def erase_streaming_states(self, key: str) -> int:
        """Delete the consumer's state hashes of the person, whatever the view. On a
        cluster they share the person's slot (redis_keys.person_tag): one node is read."""
        pattern = redis_keys.streaming_state(glob_escape(self.namespace), "*", glob_escape(key))
        if isinstance(self.client, redis.RedisCluster):
            node = self.client.get_node_from_key(redis_keys.consent(self.namespace, key))
            found = self.client.scan_iter(match=pattern, count=SCAN_COUNT, target_nodes=node)
        else:
            found = self.client.scan_iter(match=pattern, count=SCAN_COUNT)
        names = list(found)
        return int(self.client.delete(*names)) if names else 0  # type: ignore[arg-type]

    def erase_decisions(self, keys: set[str]) -> Counter[str]:
        """Delete the decision hashes whose user (`u`) is one of the person's ids;
        decisions per id."""
        pattern = redis_keys.decision(glob_escape(self.namespace), "*")
        names = list(self.client.scan_iter(match=pattern, count=SCAN_COUNT, _type="hash"))
        wanted = {key.encode(): key for key in keys}
        mine = []
        erased: Counter[str] = Counter()
        for start in range(0, len(names), SCAN_COUNT):
            batch = names[start : start + SCAN_COUNT]
            with self.client.pipeline(transaction=False) as pipe:
                for name in batch:
                    pipe.hget(name, DECISION_USER_FIELD)
                owners = pipe.execute()
            for name, owner in zip(batch, owners, strict=True):
                if owner in wanted:
                    mine.append(name)
                    erased[wanted[owner]] += 1
        for start in range(0, len(mine), SCAN_COUNT):
            self.client.delete(*mine[start : start + SCAN_COUNT])
        return erased
