"""`rankgate privacy retention`: each kind of record's oldest against the policy's limit.

Read from Redis directly, with the job's own measuring (serving/observe/retention.py),
so it answers with the server down. Streams are measured by their first entry;
keyed kinds by a SCAN of their keys (seconds per million keys); sampled
explanations by the first audit record after the job's cursor that carries one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rankgate.core.redis_server import connect_async, failing_as_unavailable
from rankgate.governance.policy import load_policy_set
from rankgate.governance.retention import DAY_S, KIND_DOCS, KINDS, RecordKind, RetentionRules
from rankgate.ops.environment import Environment
from serving.observe.retention import Trimmer


@dataclass(frozen=True)
class KindStatus:
    """One kind: its limit, its oldest record and whether that is past the limit."""

    kind: RecordKind
    limit_days: float | None
    """None: not stated (kept as long as the count caps allow)."""
    oldest_at: float | None
    """Unix time of the oldest record (None: there is none)."""
    age_days: float | None
    over_limit: bool
    """The oldest record is older than the limit: the job has not run since it aged
    past it (it runs every `retention.interval_s`), or it is failing."""
    where: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def retention_status(folder: Path | None = None, now: float | None = None) -> list[KindStatus]:
    """Each kind's oldest record against the limit of FOLDER's policy (default: the
    project's policies)."""
    env = Environment.open()
    rules = load_policy_set(folder or env.project.policies).policy.retention
    assert env.redis_url is not None
    with failing_as_unavailable(env.redis, "nothing was measured"):
        oldest = asyncio.run(measure_all(env.redis_url, env.home.namespace))
    return statuses(rules, oldest, time.time() if now is None else now)


async def measure_all(url: str, namespace: str) -> dict[RecordKind, float | None]:
    client = connect_async(url, socket_timeout=30)
    try:
        trimmer = Trimmer(client, namespace)
        return {kind: await trimmer.measure(kind) for kind in KINDS}
    finally:
        await client.aclose()


def statuses(
    rules: RetentionRules, oldest: dict[RecordKind, float | None], now: float
) -> list[KindStatus]:
    found = []
    for kind in KINDS:
        limit = rules.limit_s(kind)
        at = oldest[kind]
        age = None if at is None else max(now - at, 0.0)
        found.append(
            KindStatus(
                kind=kind,
                limit_days=None if limit is None else limit / DAY_S,
                oldest_at=at,
                age_days=None if age is None else age / DAY_S,
                over_limit=age is not None and limit is not None and age > limit,
                where=KIND_DOCS[kind],
            )
        )
    return found
