"""Demo consent: decisions rankgate makes up for a project's demo users, so that an
example can be served with a mix of granted, denied and unknown consent.

Nobody gave them. `rankgate setup` writes them only when asked (`--demo-consent`),
for the ids of the project's `demo_user_ids()`, and every record carries
`DEMO_SOURCE` as its source; the real writers (`POST /v1/consent`, `rankgate
consent import`) refuse that source, so it alone tells a made-up record from a
real one. `rankgate privacy demo-consent list|remove` counts and removes them
(`DemoConsentSweep`), and leaves every other record as it is.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import redis

from rankgate.core import redis_keys
from rankgate.core.redis_server import RedisClient

DEMO_SOURCE = "rankgate-demo"
"""The source of every demo consent record, and of no real one."""


def demo_consent(user_id: str, purposes: Iterable[str]) -> dict[str, bool]:
    """Deterministic demo decisions: per purpose about 50 % granted, 25 % denied, 25 % none.

    Purposes left out of the result have no record (consent unknown).
    """
    decisions: dict[str, bool] = {}
    for purpose in purposes:
        bucket = hashlib.sha256(f"{user_id}/{purpose}".encode()).digest()[0] % 4
        if bucket < 2:
            decisions[purpose] = True
        elif bucket == 2:
            decisions[purpose] = False
    return decisions


def demo_decisions(
    user_ids: Sequence[str], purposes: Iterable[str]
) -> tuple[list[str], list[str], list[bool]]:
    """`demo_consent` of every id, as columns (user id, purpose, granted) for the bulk
    writer: person by person, purposes in order; purposes without a record left out."""
    ids: list[str] = []
    decided: list[str] = []
    granted: list[bool] = []
    sha256 = hashlib.sha256
    suffixes = [(purpose, f"/{purpose}".encode()) for purpose in purposes]
    for uid in user_ids:
        raw = uid.encode()
        for purpose, suffix in suffixes:
            bucket = sha256(raw + suffix).digest()[0] % 4
            if bucket < 3:
                ids.append(uid)
                decided.append(purpose)
                granted.append(bucket < 2)
    return ids, decided, granted


# Consent hashes KEYS[1..n]; ARGV[1] "remove" or "count", ARGV[2] the demo source.
# Each record whose source is the demo source is counted and, when removing, deleted
# (HDEL) in the same script that read it: a real decision written over a demo record
# after it was listed is read here and kept. Returns {people with a demo record,
# people left without any record, {purpose, 1 granted / 0 denied, ...}}.
SWEEP = """
local remove, source = ARGV[1] == 'remove', ARGV[2]
local people, emptied, found = 0, 0, {}
for k = 1, #KEYS do
  local key = KEYS[k]
  local fields = redis.call('HGETALL', key)
  local demo = false
  for i = 1, #fields, 2 do
    local value = fields[i + 1]
    if string.find(value, source, 1, true) then
      local ok, record = pcall(cjson.decode, value)
      if ok and type(record) == 'table' and record['source'] == source then
        demo = true
        found[#found + 1] = fields[i]
        found[#found + 1] = record['granted'] == true and 1 or 0
        if remove then
          redis.call('HDEL', key, fields[i])
        end
      end
    end
  end
  if demo then
    people = people + 1
    if remove and redis.call('EXISTS', key) == 0 then
      emptied = emptied + 1
    end
  end
end
return {people, emptied, found}
"""
SCAN_COUNT = 1000
"""Keys a SCAN step asks for: also the people read before their records are swept."""
KEYS_PER_CALL = 50
"""People per script call on a single server (one on a Redis Cluster, where a call's
keys must share a slot; every person has a slot of their own)."""


@dataclass
class DemoConsentTally:
    """The demo consent records a sweep found (and removed, when it removed)."""

    people_read: int = 0
    """People with a consent record, demo or not, as SCAN returned them: one may be
    returned twice while the keyspace resizes (removal deleting keys resizes it).
    Removing, a second visit finds no demo record left, so what was removed is
    counted once; counting while other writers resize the keyspace may count a
    person's records twice."""
    people: int = 0
    """People with at least one demo record."""
    left_without_record: int = 0
    """People whose every record was a demo one (removing leaves them none)."""
    decisions: Counter[tuple[str, bool]] = field(default_factory=Counter)
    """Demo records per (purpose, granted)."""

    @property
    def records(self) -> int:
        return sum(self.decisions.values())

    def per_purpose(self) -> list[tuple[str, int, int]]:
        """(purpose, granted, denied) of each purpose with a demo record, by name."""
        purposes = sorted({purpose for purpose, _ in self.decisions})
        return [(p, self.decisions[(p, True)], self.decisions[(p, False)]) for p in purposes]


class DemoConsentSweep:
    """Counts or removes the demo consent records of a namespace, person by person:
    SCAN of the consent hashes (`SCAN_COUNT` a step), then pipelined calls of
    `SWEEP`, so memory holds one step of keys whatever the number of people."""

    def __init__(self, client: RedisClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def count(self) -> DemoConsentTally:
        return self._sweep("count")

    def remove(self) -> DemoConsentTally:
        """Delete every record whose source is `DEMO_SOURCE`; what was deleted."""
        return self._sweep("remove")

    def _sweep(self, mode: str) -> DemoConsentTally:
        client = self.client
        sha = client.script_load(SWEEP)
        per_call = 1 if isinstance(client, redis.RedisCluster) else KEYS_PER_CALL
        tally = DemoConsentTally()
        for step in self._consent_keys():
            tally.people_read += len(step)
            pipe = client.pipeline(transaction=False)
            for start in range(0, len(step), per_call):
                keys = step[start : start + per_call]
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, mode, DEMO_SOURCE)
            for people, emptied, found in pipe.execute():
                tally.people += people
                tally.left_without_record += emptied
                for index in range(0, len(found), 2):
                    tally.decisions[(found[index].decode(), found[index + 1] == 1)] += 1
        return tally

    def _consent_keys(self) -> Iterator[list[bytes]]:
        """The consent hashes of the namespace, `SCAN_COUNT` at a time."""
        pattern = redis_keys.consent(redis_keys.glob_escape(self.namespace), "*")
        step: list[bytes] = []
        for name in self.client.scan_iter(match=pattern, count=SCAN_COUNT, _type="hash"):
            step.append(name)
            if len(step) == SCAN_COUNT:
                yield step
                step = []
        if step:
            yield step
