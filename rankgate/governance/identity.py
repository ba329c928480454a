"""One person across ids: anonymous visits and signed-in ones, linked.

An application knows a person by a user id once they sign in, and by an anonymous
id (a cookie, a device) before. `POST /v1/identify` links ids of one person; from
then on a request, an event or a consent write under any of them is the person's.
Every id is stored only as its pseudonymous key (rankgate.core.pseudonym): a user
id's key as everywhere, an anonymous id's key of the id in its own namespace, so
an anonymous id and a user id that are the same text are two ids.

Storage (rankgate.core.redis_keys):

    identity_link(ns, id)        string: the person key of a linked id
    identity_ids(ns, person)     hash: every id key of the person -> {"kind", "linked_at"}

The person key is the key of the first user id linked (the key Feast rows of
batch views are under), or, for a person only ever anonymous, of their first id.
Links are flat: an id points at its person, never at another id, so no chain or
cycle can form; joining a person who already has ids moves all their ids.

What linking does to the person's data (rule `IdentityRules` of the policy):
- consent: the records of the joining ids are merged into the person's by
  `consent_on_link` (`most_restrictive`: a denial wins over a grant whatever
  their times, so a denial on any id is never lost by a link; `latest`: the later
  decision wins). A record that came from a joining id is marked `"via":
  "linked-id"`, and the gate's checks say so. A later write under any id is the
  person's newest decision;
- streaming features: a link entry in the event stream tells the event consumer
  to add the joining ids' decayed counts into the person's and push the person's
  row (serving/events/consumer.py), after every event accepted before the link;
- decisions, events and audit records stay where they are, under the key they
  were made with; erasure finds them through the person's ids.

Unlinking (`POST /v1/unlink`) detaches one id: it keeps a copy of the person's
consent as it stood (so a denial still holds for it) and starts with no
streaming counts; what was merged stays with the person.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from rankgate.core import redis_keys
from rankgate.core.durable import NotDurable, on_disk_async
from rankgate.core.errors import RETRY_SOON, RankgateError
from rankgate.core.pseudonym import user_key
from rankgate.core.redis_server import AsyncRedisClient, is_cluster
from rankgate.governance.policy import IdentityRules

ANONYMOUS_NAMESPACE = "anonymous/"
"""Prefix of an anonymous id before it is keyed: user ids cannot contain `/`, so
no user id has the key of an anonymous id."""
VIA_LINK = "linked-id"
"""The `via` of a consent record merged from a linked id, and the gate's source."""
LINK_FIELD = b"l"
"""The field of a link entry in the event stream (events are under `e`)."""
WATCH_RETRIES = 5


class IdKind(StrEnum):
    USER = "user"
    ANONYMOUS = "anonymous"


def id_key(kind: IdKind, raw: str, secret: str | None = None) -> str:
    """The pseudonymous key of an id of either kind."""
    if kind is IdKind.ANONYMOUS:
        return user_key(ANONYMOUS_NAMESPACE + raw, secret)
    return user_key(raw, secret)


def request_key(user_id: str | None, anonymous_id: str | None) -> str:
    """The key a request or event is made under: the user id when it has one (a
    signed-in visitor), else the anonymous id."""
    if user_id is not None:
        return user_key(user_id)
    assert anonymous_id is not None, "the schema asks for one of the two"
    return id_key(IdKind.ANONYMOUS, anonymous_id)


@dataclass(frozen=True)
class NamedId:
    """An id of a link request and the body field that named it."""

    field: str
    kind: IdKind
    key: str


def merge_consent(kept: Mapping[Any, Any], joining: Mapping[Any, Any], rule: str) -> dict[str, str]:
    """The records (purpose -> stored JSON) the person's consent hash takes when
    `joining`'s records are merged into `kept`'s by `rule` (most_restrictive or
    latest). A record taken from `joining` is marked via a linked id."""
    written: dict[str, str] = {}
    ours = {_text(k): json.loads(v) for k, v in kept.items()}
    for name, raw in joining.items():
        purpose, theirs = _text(name), json.loads(raw)
        mine = ours.get(purpose)
        if mine is None or _wins(theirs, mine, rule):
            theirs["via"] = VIA_LINK
            ours[purpose] = theirs
            written[purpose] = json.dumps(theirs)
    return written


def _wins(theirs: Mapping[str, Any], mine: Mapping[str, Any], rule: str) -> bool:
    """Whether the joining id's record replaces the person's (ties keep the person's)."""
    their_time, my_time = str(theirs.get("updated_at", "")), str(mine.get("updated_at", ""))
    denied, granted = not theirs.get("granted"), bool(mine.get("granted"))
    if rule == "most_restrictive":
        if denied != (not granted):
            return denied  # one denies, one grants: the denial
        return their_time > my_time
    if their_time != my_time:
        return their_time > my_time
    return denied and granted  # the same time: a denial over a grant


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class LinkRefused(RankgateError):
    """A link the rules do not allow: nothing was written."""

    status_code = 409
    error = "link_refused"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", 409)
        self.problems = [{"field": field, "problem": problem}]


class IdentityStoreUnavailable(RankgateError):
    """Redis could not take the link: nothing of it was written; retry."""

    status_code = 503
    error = "identity_store_unavailable"
    headers = RETRY_SOON


@dataclass
class LinkResult:
    linked: list[str] = field(default_factory=list)
    """Fields of the request whose ids joined the person now."""
    already: list[str] = field(default_factory=list)
    """Fields whose ids were the person's before."""
    ids: int = 1
    """Ids the person has now."""
    consent_merged: int = 0
    """Consent records the person took from the joining ids."""


@dataclass
class _Joining:
    """A person who joins another: their ids and consent."""

    person: str
    ids: dict[str, str]
    """id key -> kind."""
    consent: dict[bytes, bytes]
    named_by: str


class IdentityStore:
    """Links and unlinks ids in Redis; one per replica (the ingress)."""

    def __init__(self, client: AsyncRedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.events_stream = redis_keys.events(namespace)

    async def link(
        self,
        user: NamedId,
        others: Sequence[NamedId],
        rules: IdentityRules,
        region: str | None = None,
        max_stream_len: int = 1_000_000,
    ) -> LinkResult:
        """Link `others` to the person of `user` (a user id); LinkRefused when the
        rules forbid it, IdentityStoreUnavailable when Redis fails (nothing written)."""
        try:
            for _ in range(WATCH_RETRIES):
                try:
                    result = await self._link(user, others, rules, region, max_stream_len)
                except WatchError:
                    continue  # another link touched these ids meanwhile: read again
                if result.linked:  # acknowledged once on disk (rankgate/core/durable.py)
                    await on_disk_async(self.client, self.namespace, "the link")
                return result
        except NotDurable as exc:
            raise IdentityStoreUnavailable(f"{exc.message}: not acknowledged") from exc
        except (OSError, aioredis.RedisError) as exc:
            raise IdentityStoreUnavailable(
                f"the link was not recorded ({type(exc).__name__}); retry"
            ) from exc
        raise IdentityStoreUnavailable("the ids kept changing while linking; retry")

    async def _link(
        self,
        user: NamedId,
        others: Sequence[NamedId],
        rules: IdentityRules,
        region: str | None,
        max_stream_len: int,
    ) -> LinkResult:
        ns, client = self.namespace, self.client
        cluster = is_cluster(client)
        async with client.pipeline(transaction=not cluster) as pipe:
            named = [user, *others]
            if not cluster:
                await pipe.watch(*[redis_keys.identity_link(ns, n.key) for n in named])
            persons = await self._persons(pipe if not cluster else client, named)
            person = persons[user.key]
            result = LinkResult()
            joining: dict[str, _Joining] = {}
            for other in others:
                theirs = persons[other.key]
                if theirs == person:
                    result.already.append(other.field)
                elif theirs in joining:
                    result.linked.append(other.field)
                else:
                    joining[theirs] = _Joining(theirs, {}, {}, other.field)
                    result.linked.append(other.field)
            watched = [redis_keys.identity_ids(ns, p) for p in [person, *joining]]
            watched += [redis_keys.consent(ns, p) for p in [person, *joining]]
            if not cluster:
                await pipe.watch(*watched)
            reader: Any = pipe if not cluster else client
            mine = await self._ids(reader, person, user)
            # A person linked for the first time: their own id goes into the list too.
            own_listed = await reader.exists(redis_keys.identity_ids(ns, person))
            for join in joining.values():
                lone = next(n for n in others if persons[n.key] == join.person)
                join.ids = await self._ids(reader, join.person, lone)
                join.consent = await reader.hgetall(redis_keys.consent(ns, join.person))
                if not rules.link_known_ids and IdKind.USER in join.ids.values():
                    raise LinkRefused(
                        join.named_by,
                        "belongs to another person who has signed in (a user id): the "
                        "policy's identity.link_known_ids does not allow joining them",
                    )
            total = len(mine) + sum(len(j.ids) for j in joining.values())
            if total > rules.max_ids:
                raise LinkRefused(
                    next(iter(joining.values())).named_by if joining else user.field,
                    f"the person would have {total} ids; the policy allows "
                    f"{rules.max_ids} (identity.max_ids)",
                )
            result.ids = total
            if not joining:
                return result
            consent = await reader.hgetall(redis_keys.consent(ns, person))
            merged: dict[str, str] = {}
            for join in joining.values():
                taken = merge_consent({**consent, **merged}, join.consent, rules.consent_on_link)
                merged.update(taken)
            result.consent_merged = len(merged)
            now = datetime.now(UTC).isoformat()
            if not cluster:
                pipe.multi()
            writer: Any = pipe
            new_ids = {
                key: json.dumps({"kind": kind, "linked_at": now})
                for join in joining.values()
                for key, kind in join.ids.items()
            }
            if not own_listed:
                new_ids[person] = json.dumps({"kind": mine[person], "linked_at": now})
            # In this order: on a Redis Cluster, where no transaction spans the keys, a
            # link that fails part-way leaves nothing lost, and sending it again
            # finishes it (the person takes the consent and ids before any id points
            # at them; the joined ids' own records go last).
            if merged:
                writer.hset(redis_keys.consent(ns, person), mapping=merged)
            writer.hset(redis_keys.identity_ids(ns, person), mapping=new_ids)
            entry = {"to": person, "from": sorted(joining), "region": region}
            writer.xadd(
                self.events_stream,
                {LINK_FIELD: json.dumps(entry)},
                maxlen=max_stream_len,
                approximate=True,
            )
            for join in joining.values():
                for key in join.ids:
                    writer.set(redis_keys.identity_link(ns, key), person)
            for join in joining.values():
                writer.delete(redis_keys.identity_ids(ns, join.person))
                writer.delete(redis_keys.consent(ns, join.person))
            await writer.execute()
            return result

    async def _persons(self, reader: Any, named: Sequence[NamedId]) -> dict[str, str]:
        """The person key of each id (its own key when it is linked to nobody)."""
        found = {}
        for n in named:
            person = await reader.get(redis_keys.identity_link(self.namespace, n.key))
            found[n.key] = _text(person) if person is not None else n.key
        return found

    async def _ids(self, reader: Any, person: str, named: NamedId) -> dict[str, str]:
        """Every id key of `person` -> kind (just the one named, for a lone id)."""
        raw = await reader.hgetall(redis_keys.identity_ids(self.namespace, person))
        if not raw:
            return {person: named.kind.value}
        return {_text(k): json.loads(v)["kind"] for k, v in raw.items()}

    async def unlink(self, named: NamedId) -> bool:
        """Detach one linked id from its person; False when it was linked to nobody.
        LinkRefused for the person's own id while others are linked to it."""
        ns = self.namespace
        try:
            for _ in range(WATCH_RETRIES):
                try:
                    unlinked = await self._unlink(named)
                except WatchError:
                    continue
                if unlinked:
                    await on_disk_async(self.client, ns, "the unlink")
                return unlinked
        except NotDurable as exc:
            raise IdentityStoreUnavailable(f"{exc.message}: not acknowledged") from exc
        except (OSError, aioredis.RedisError) as exc:
            raise IdentityStoreUnavailable(
                f"the unlink was not recorded ({type(exc).__name__}); retry"
            ) from exc
        raise IdentityStoreUnavailable(f"the ids of {ns!r} kept changing while unlinking; retry")

    async def _unlink(self, named: NamedId) -> bool:
        ns, client = self.namespace, self.client
        cluster = is_cluster(client)
        link_key = redis_keys.identity_link(ns, named.key)
        async with client.pipeline(transaction=not cluster) as pipe:
            reader: Any = client if cluster else pipe
            if not cluster:
                await pipe.watch(link_key, redis_keys.identity_ids(ns, named.key))
            person = await reader.get(link_key)
            if person is None:
                if await reader.hlen(redis_keys.identity_ids(ns, named.key)) > 1:
                    raise LinkRefused(
                        named.field,
                        "is the person's own id, with other ids linked to it: unlink those",
                    )
                return False
            person = _text(person)
            ids_key, consent_key = (
                redis_keys.identity_ids(ns, person),
                redis_keys.consent(ns, person),
            )
            if not cluster:
                await pipe.watch(ids_key, consent_key)
            remaining = await reader.hlen(ids_key)
            consent = await reader.hgetall(consent_key)
            if not cluster:
                pipe.multi()
            # The id's own copy of the consent first, its link last: on a Redis Cluster
            # an unlink that fails part-way leaves the id still its person's.
            own = redis_keys.consent(ns, named.key)
            pipe.delete(own)
            if consent:
                pipe.hset(own, mapping=consent)
            if remaining <= 2:  # the person's own id and this one
                pipe.delete(ids_key)
            else:
                pipe.hdel(ids_key, named.key)
            pipe.delete(link_key)
            await pipe.execute()
            return True


async def resolve_persons(
    client: AsyncRedisClient, namespace: str, keys: Sequence[str]
) -> dict[str, str]:
    """The person key of each id key (its own when it is linked to nobody): one
    pipelined read for a batch (the event consumer, the outcome join)."""
    distinct = sorted(set(keys))
    if not distinct:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for key in distinct:
            pipe.get(redis_keys.identity_link(namespace, key))
        found = await pipe.execute()
    return {
        key: _text(person) if person is not None else key
        for key, person in zip(distinct, found, strict=True)
    }


@dataclass(frozen=True)
class LinkEntry:
    """A link as the event stream keeps it: the consumer merges the streaming counts
    of `joined` into `person`'s, after every event accepted before it."""

    person: str
    joined: tuple[str, ...]
    region: str | None
    stream_id: str

    @classmethod
    def read(cls, stream_id: bytes | str, entry: Mapping[bytes, bytes]) -> LinkEntry:
        data = json.loads(entry[LINK_FIELD])
        return cls(
            person=data["to"],
            joined=tuple(data["from"]),
            region=data.get("region"),
            stream_id=_text(stream_id),
        )

    def names(self, key: str) -> bool:
        """Whether the entry names the person key `key` (erasure)."""
        return key == self.person or key in self.joined
