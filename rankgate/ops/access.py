"""Who may ask, and forgetting who asked: API keys per application, and a data
subject's erasure (rankgate/ops/erasure.py, which reads Parquet and Feast's keys,
so it is imported only when someone is forgotten)."""

from __future__ import annotations

from rankgate.core.errors import RankgateError
from rankgate.governance.api_keys import ApiKey, check_app
from rankgate.governance.policy import load_policy
from rankgate.ops.environment import Environment


def create_key(app: str, purposes: tuple[str, ...], scopes: tuple[str, ...]) -> str:
    """A new key for APP, allowed `purposes` of the policy and `scopes`; shown only now."""
    check_app(app)  # a bad name is refused before Redis is even opened
    return Environment.open().api_keys.create(app, purposes, load_policy().purposes, scopes)


def list_keys() -> list[ApiKey]:
    """Every application's keys (hashed; each with a hint)."""
    return Environment.open().api_keys.all()


def revoke_keys(app: str) -> int:
    """Revoke every key of APP; how many there were (none is an error)."""
    count = Environment.open().api_keys.revoke(app)
    if not count:
        raise RankgateError(f"no API keys for application {app!r} (see `rankgate keys list`)")
    return count


def forget(user_id: str, anonymous: bool = False) -> str:
    """Erase the person of USER_ID (an anonymous id with `anonymous`), under every id
    linked to them: feature rows, consent, audit records, events, streaming states,
    decisions, offline rows and the links; a summary of what was erased per id."""
    from rankgate.governance.identity import IdKind
    from rankgate.ops.erasure import Eraser, checked_user_id

    checked_user_id(user_id)  # a bad id is refused before Redis is even opened
    env = Environment.open()
    kind = IdKind.ANONYMOUS if anonymous else IdKind.USER
    return Eraser(env.redis, env.home, env.project).forget(user_id, kind).summary()
