"""Consent records in Redis, per person and purpose, under the pseudonymous key
(`rankgate.core.redis_keys.consent`): a hash of purpose -> {"granted": bool, "source": str,
"updated_at": iso}.

No field for a purpose means no recorded decision ("unknown").

Bulk writes (`rankgate consent import`, the demo records of `rankgate setup
--demo-consent`, rankgate/governance/demo_consent.py) go through
`ConsentStore.record_newer`: a record replaces the stored one of its purpose only
when its `updated_at` is later (on equal times, a denial replaces a grant), checked
and written by a server-side script, so replaying a file, or an old export arriving
after a newer decision, changes nothing, whatever order records arrive in. Times
are UTC ISO 8601 (`+00:00`), which order as text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from rankgate.core import redis_calls, redis_keys
from rankgate.core.durable import NotDurable, on_disk, on_disk_async
from rankgate.core.errors import RETRY_SOON, RankgateError
from rankgate.core.redis_calls import VARY, Packed
from rankgate.core.redis_server import AsyncRedisClient, RedisClient, register_async_script

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger("ray.serve")


class ConsentState(StrEnum):
    GRANTED = "granted"
    DENIED = "denied"
    UNKNOWN = "unknown"


DECISIONS = {ConsentState.GRANTED.value: True, ConsentState.DENIED.value: False}
"""The decisions a record can hold ("unknown" is the absence of a record)."""

# Records of KEYS[1..n] (consent hashes): ARGV holds, per key, how many records it
# has, then a (purpose, rank, record JSON) triplet each, where rank is the record's
# `updated_at` followed by "0" (granted) or "1" (denied). A record replaces the stored
# one of its purpose only when its rank is higher (as text): a later time, or the
# same time and denied over granted. So the outcome does not depend on the order
# records arrive in, and a replay writes nothing. Returns how many were written.
RECORD_IF_NEWER = """
local written, at = 0, 1
for k = 1, #KEYS do
  local key, count = KEYS[k], tonumber(ARGV[at])
  at = at + 1
  for _ = 1, count do
    local stored = redis.call('HGET', key, ARGV[at])
    local rank = ''
    if stored then
      local record = cjson.decode(stored)
      rank = (record['updated_at'] or '') .. (record['granted'] and '0' or '1')
    end
    if rank < ARGV[at + 1] then
      redis.call('HSET', key, ARGV[at], ARGV[at + 2])
      written = written + 1
    end
    at = at + 3
  end
end
return written
"""
KEYS_PER_CALL = 50
"""People per script call on a single server (one on a Redis Cluster, where a call's
keys must share a slot)."""


def record_json(
    granted: pa.ChunkedArray, sources: pa.ChunkedArray, updated_at: pa.ChunkedArray
) -> pa.ChunkedArray:
    """Stored records, as `consent_fields` writes them, of columns of decisions (Arrow:
    bulk writers build a million in a fraction of a second)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    coded = pc.dictionary_encode(sources).combine_chunks()
    quoted = pa.array([json.dumps(s) for s in coded.dictionary.to_pylist()]).take(coded.indices)
    opening = pc.if_else(granted, '{"granted": true, "source": ', '{"granted": false, "source": ')
    return pc.binary_join_element_wise(opening, quoted, ', "updated_at": "', updated_at, '"}', "")


def consent_fields(purposes: Mapping[str, bool], source: str) -> dict[str, str]:
    """Hash fields of a consent record: one per purpose decided."""
    now = datetime.now(UTC).isoformat()
    return {
        purpose: json.dumps({"granted": bool(granted), "source": source, "updated_at": now})
        for purpose, granted in purposes.items()
    }


def parse_state(raw: bytes | str | None) -> ConsentState:
    if raw is None:
        return ConsentState.UNKNOWN
    record = json.loads(raw)
    return ConsentState.GRANTED if record.get("granted") else ConsentState.DENIED


LINKED_VIA = "linked-id"
"""`via` of a record a linked id's record decided (rankgate.governance.identity)."""

# The person of an id and their consent for a purpose, in one round trip when the
# id is nobody else's. KEYS: the id's link, the id's consent hash (one slot: both
# carry the id's tag); ARGV: the purpose. Returns {1, person key} for a linked id,
# {0, record or nil} for one that is its own person.
READ_PERSON = """
local person = redis.call('GET', KEYS[1])
if person then return {1, person} end
return {0, redis.call('HGET', KEYS[2], ARGV[1])}
"""
READ_PERSON_SHA = hashlib.sha1(READ_PERSON.encode()).hexdigest()
READ_PERSON_CALL = Packed("EVALSHA", READ_PERSON_SHA, 2, VARY, VARY, VARY)
"""EVALSHA of READ_PERSON: the two keys and the purpose vary."""


# A consent write under an id: recorded in the id's hash when it is its own person
# (atomically with the check, so a link running meanwhile sees it and merges it);
# for a linked id, returns its person's key for the caller to write there.
RECORD_UNLESS_LINKED = """
local person = redis.call('GET', KEYS[1])
if person then return person end
redis.call('HSET', KEYS[2], unpack(ARGV))
return false
"""


@dataclass(frozen=True)
class PersonConsent:
    """Who a request is about and what they decided for its purpose."""

    person: str
    """The person's key: the id's own, or, for a linked id, its person's."""
    state: ConsentState
    via: str | None = None
    """How the deciding record got there: "linked-id" when the request's id is linked
    to its person, or the person's record came from a linked id; None: stored for it."""


def read_record(person: str, raw: bytes | str | None, linked: bool) -> PersonConsent:
    if raw is None:
        return PersonConsent(person, ConsentState.UNKNOWN, LINKED_VIA if linked else None)
    record = json.loads(raw)
    state = ConsentState.GRANTED if record.get("granted") else ConsentState.DENIED
    via = LINKED_VIA if linked or record.get("via") == LINKED_VIA else None
    return PersonConsent(person, state, via)


class ConsentStore:
    def __init__(self, client: RedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def record(self, key: str, purposes: Mapping[str, bool], source: str) -> None:
        fields = consent_fields(purposes, source)
        if fields:
            name = redis_keys.consent(self.namespace, key)
            self.client.hset(name, mapping=fields)
            on_disk(self.client, self.namespace, "the consent", name)

    def record_newer(
        self,
        keys: Sequence[str],
        purposes: Sequence[str],
        ranks: Sequence[str],
        values: Sequence[str],
        batch: int = 200,
    ) -> int:
        """Write each record (pseudonymous key, purpose, rank, stored JSON) unless
        the stored one of its purpose ranks as high; how many were written. Records of
        one key that follow each other go together; script calls of `KEYS_PER_CALL`
        people are pipelined `batch` at a time."""
        client = self.client
        sha = client.script_load(RECORD_IF_NEWER)
        per_call = 1 if isinstance(client, redis.RedisCluster) else KEYS_PER_CALL
        namespace = self.namespace
        # A linked id's decisions are its person's (rankgate.governance.identity).
        persons = linked_persons(client, namespace, keys)

        def consent_key(namespace: str, key: str) -> str:
            return redis_keys.consent(namespace, persons.get(key, key))

        written, count, index = 0, len(keys), 0
        while index < count:
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                if index == count:
                    break
                names: list[str] = []
                args: list[str | int] = []
                while index < count and len(names) < per_call:
                    key, first = keys[index], index
                    names.append(consent_key(namespace, key))
                    args.append(0)
                    while index < count and keys[index] == key:
                        args += (purposes[index], ranks[index], values[index])
                        index += 1
                    args[len(args) - 1 - 3 * (index - first)] = index - first
                pipe.execute_command("EVALSHA", sha, len(names), *names, *args)
            written += sum(pipe.execute())
            on_disk(client, namespace, "the consent records")  # each batch acknowledged on disk
        return written

    def state(self, key: str, purpose: str) -> ConsentState:
        raw = self.client.hget(redis_keys.consent(self.namespace, key), purpose)
        return parse_state(raw)  # type: ignore[arg-type]  # sync client

    def states(self, keys: Iterable[str], purpose: str) -> list[ConsentState]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(redis_keys.consent(self.namespace, key), purpose)
        return [parse_state(raw) for raw in pipe.execute()]


def linked_persons(
    client: RedisClient, namespace: str, keys: Sequence[str], chunk: int = 10_000
) -> dict[str, str]:
    """The person key of each key in `keys` that is linked to another person (the
    keys that are their own person are left out: at scale, almost all)."""
    linked: dict[str, str] = {}
    distinct = list(dict.fromkeys(keys))
    for start in range(0, len(distinct), chunk):
        part = distinct[start : start + chunk]
        with client.pipeline(transaction=False) as pipe:
            for key in part:
                pipe.get(redis_keys.identity_link(namespace, key))
            found = pipe.execute()
        linked.update((k, p.decode()) for k, p in zip(part, found, strict=True) if p is not None)
    return linked


class ConsentStoreUnavailable(RankgateError):
    """The consent store did not take a write: nothing was recorded; retry."""

    status_code = 503
    error = "consent_store_unavailable"
    headers = RETRY_SOON


class AsyncConsentStore:
    """The serving replicas' consent store: reads within a request's deadline, and
    the writes of the consent API."""

    def __init__(self, client: AsyncRedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    @property
    def client(self) -> AsyncRedisClient:
        return self._client

    @client.setter
    def client(self, client: AsyncRedisClient) -> None:
        """The client, and the scripts it runs (registered with it)."""
        self._client = client
        self.record_script = register_async_script(client, RECORD_UNLESS_LINKED)

    async def read_person(self, key: str, purpose: str, timeout_s: float) -> PersonConsent | None:
        """The person of id `key` and their consent for the purpose; None when it
        cannot be read in time. One round trip for an id that is its own person, two
        for a linked one."""
        namespace = self.namespace
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                # EVALSHA itself, packed once (rankgate/core/redis_calls.py): redis-py's
                # Script wrapper and its command path cost more per call.
                link, consent = (
                    redis_keys.identity_link(namespace, key),
                    redis_keys.consent(namespace, key),
                )
                try:
                    linked, value = await redis_calls.read(
                        self.client, READ_PERSON_CALL, link, consent, purpose
                    )
                except NoScriptError:
                    await self.client.script_load(READ_PERSON)  # type: ignore[misc]
                    linked, value = await redis_calls.read(
                        self.client, READ_PERSON_CALL, link, consent, purpose
                    )
                if not linked:
                    return read_record(key, value, False)
                person = value.decode()
                raw = await self.client.hget(redis_keys.consent(namespace, person), purpose)  # type: ignore[misc]
        except (TimeoutError, OSError, aioredis.RedisError):
            return None
        return read_record(person, raw, True)

    async def record(self, key: str, purposes: Mapping[str, bool], source: str) -> None:
        """Record under the person of id `key` (its own, or the one it is linked to),
        in one HSET: all purposes of a write are recorded together or not at all.
        Raises `ConsentStoreUnavailable` when the store cannot take it."""
        namespace, fields = self.namespace, consent_fields(purposes, source)
        args = [part for name, value in fields.items() for part in (name, value)]
        try:
            person = await self.record_script(
                keys=[redis_keys.identity_link(namespace, key), redis_keys.consent(namespace, key)],
                args=args,
            )
            target = key if person is None else person.decode()
            if person is not None:  # linked: the person's hash takes it
                await self.client.hset(  # type: ignore[misc]
                    redis_keys.consent(namespace, target), mapping=fields
                )
            # Acknowledged only once on disk (rankgate/core/durable.py).
            await on_disk_async(
                self.client, namespace, "the consent", redis_keys.consent(namespace, target)
            )
        except NotDurable as exc:
            raise ConsentStoreUnavailable(f"{exc.message}: not acknowledged") from exc
        except (OSError, aioredis.RedisError) as exc:
            logger.warning("consent write failed: %s", type(exc).__name__)
            raise ConsentStoreUnavailable("the consent was not recorded; retry") from exc
