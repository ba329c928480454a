"""rankgate's own logs as evidence: audit records joined with their outcomes.

Off-policy evaluation (`rankgate model evaluate --audit`, the promotion gate, the
shadow figures of `rankgate model status`) reads each recorded decision as a
`LoggedDecision`: the feature values the model read, the request context, the
candidates the policy allowed, and per shown position the item, the propensity the
serving policy logged and the reward (clicked or not). A position counts only once
its outcome is known: the application reported an impression or a click for it
(`events.outcomes` in rankgate.yaml); a click is counted where it was shown.

Outcomes are read from the decision index (serving/events/outcome_join.py marks each joined
event in the decision's hash), which expires after `events.decision_ttl_s`: older
decisions have no known outcomes and are skipped, as are fallback answers (no
features were read), records written before propensities were logged, and
decisions without reported outcomes. `AuditEvidence.skipped` counts each reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from model_store.evaluation import LoggedDecision, Shown
from rankgate.core import redis_keys
from rankgate.core.project import Outcomes
from rankgate.core.redis_server import RedisClient
from rankgate.core.streams import stream_pages
from serving.events.outcome_join import MARKER_PREFIX
from serving.events.replay import since_stream_id
from serving.observe.audit import AuditRecord

CHUNK = 500


@dataclass
class AuditEvidence:
    decisions: list[LoggedDecision] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    """Records not used, by reason."""
    records: int = 0
    """Audit records read."""


def read_audit_evidence(
    client: RedisClient, namespace: str, outcomes: Outcomes, since: str = "0"
) -> AuditEvidence:
    """Every model decision recorded since `since` (a duration, ISO time, stream id or
    0) whose outcomes are known, as logged decisions."""
    logs = AuditEvidence()
    for chunk in _chunks(client, redis_keys.audit(namespace), since_stream_id(since)):
        logs.records += len(chunk)
        usable = []
        for record in chunk:
            reason = _unusable(record)
            if reason:
                logs.skipped[reason] += 1
            else:
                usable.append(record)
        with client.pipeline(transaction=False) as pipe:
            for record in usable:
                pipe.hgetall(redis_keys.decision(namespace, record.request_id))
            hashes = pipe.execute()
        for record, fields in zip(usable, hashes, strict=True):
            decision = _logged(record, fields, outcomes)
            if decision is None:
                logs.skipped["no outcomes reported" if fields else "outcomes expired"] += 1
            else:
                logs.decisions.append(decision)
    return logs


def _chunks(client: RedisClient, key: str, start: str) -> Iterator[list[AuditRecord]]:
    for page in stream_pages(client, key, CHUNK, start):
        yield [AuditRecord.read(fields[b"record"], stream_id) for stream_id, fields in page]


def _unusable(record: AuditRecord) -> str | None:
    if record.fallback is not None or record.model is None or record.features is None:
        return "fallback answer"
    if record.propensities is None:
        return "recorded before propensities"
    return None


def _logged(
    record: AuditRecord, fields: dict[bytes, bytes], outcomes: Outcomes
) -> LoggedDecision | None:
    """The decision with its positions whose outcome is known; None without any."""
    seen: set[int] = set()
    clicked: set[int] = set()
    for name, value in fields.items():
        if not name.startswith(MARKER_PREFIX.encode()):
            continue
        joined = json.loads(value)
        if joined["type"] == outcomes.impression:
            seen.add(joined["position"])
        if joined["type"] == outcomes.click:
            seen.add(joined["position"])
            clicked.add(joined["position"])
    if not seen:
        return None
    assert record.features is not None and record.propensities is not None
    shown = [
        Shown(position, item, record.propensities[position - 1], float(position in clicked))
        for position, (item, _) in enumerate(record.items, 1)
        if position in seen
    ]
    return LoggedDecision(
        user=record.features.values,
        context=record.features.context,
        candidates=record.candidates,
        shown=shown,
        group=record.request_id,
        at=record.at,
    )
