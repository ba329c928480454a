"""The two streams an operator reads back: the decision audit log (tail it, follow
it, replay a decision from its recorded features) and the event stream (rebuild
the streaming features from it). Feast and the event pipeline are imported when a
replay runs; tailing the audit log needs only Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rankgate.core.redis_server import connect_async
from rankgate.ops.environment import Environment
from serving.observe.audit import AuditRecord
from serving.ops import audit_replay

if TYPE_CHECKING:
    from serving.events.replay import ReplayReport

Say = Callable[[str], None]


def audit_records(count: int, follow: bool) -> Iterator[AuditRecord]:
    """The most recent `count` decisions, then (`follow`) each new one as it comes."""
    env = Environment.open()
    records = audit_replay.tail(env.redis, env.home.namespace, count)
    yield from records
    if follow:
        after = (records[-1].stream_id or "$") if records else "$"
        yield from audit_replay.follow(env.redis, env.home.namespace, after)


def replay_decision(request_id: str) -> audit_replay.Replay:
    """Re-score a recorded decision from its features and model version."""
    from serving.ranking.feature_fetch import FeatureFetcher

    env = Environment.open()
    record = audit_replay.find(env.redis, env.home.namespace, request_id)
    items = FeatureFetcher(env.feast, env.project, env.data_dir).items
    return audit_replay.replay(record, env.home, items)


def replay_events(since: str, say: Say) -> ReplayReport:
    """Rebuild the streaming features from the events since `since`."""
    from features.tables import load_catalogue
    from rankgate.governance.policy import load_policy_set
    from serving.events.consumer import ConsumerConfig
    from serving.events.replay import replay_streaming, since_stream_id

    since_stream_id(since)  # a bad --since is refused before anything is touched
    env = Environment.open()
    store = env.feast
    catalogue = load_catalogue(env.project, env.views(), env.data_dir)
    policy = load_policy_set(env.project.policies, catalogue, env.project.item_type).policy
    assert env.redis_url is not None
    url = env.redis_url

    async def run() -> ReplayReport:
        client = connect_async(url)
        try:
            return await replay_streaming(
                client,
                env.home.namespace,
                store,
                env.project,
                policy,
                catalogue,
                since,
                ConsumerConfig().lease_s,
                say,
            )
        finally:
            await client.aclose()

    return asyncio.run(run())
