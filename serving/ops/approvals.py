"""Model approval: `rankgate model approve` records it, `rankgate model promote` checks it.

The policy's `approvals` section (rankgate/governance/approval.py) names the
purposes that need a person's approval before a version answers them, and who may
give it. `approve` stores, with the approval, the evidence the approver saw at that
moment: the version's off-policy estimate against stable (serving/ops/evidence.py) and
its drift figures, each or "unavailable" with the reason. `approval_guard` is the
check `promote` runs over the purposes the version would answer after the move.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from model_store.approvals import ApprovalLog
from rankgate.core.errors import RankgateError
from rankgate.governance.approval import ApprovalRules

Say = Callable[[str], None]


class NotApproved(RankgateError):
    """A promotion that would let a version answer a purpose without its approval."""

    status_code = 409


def approval_guard(
    rules: ApprovalRules,
    answers: Collection[str],
    version: str,
    log: ApprovalLog,
    force: bool,
    say: Say,
) -> list[str]:
    """Refuse (NotApproved) when `version` would answer a purpose of `answers` that
    requires an approval it lacks, unless forced; a forced promotion says what it
    overrode and returns it for the audit of routing changes. A shadow answers
    nobody, so it needs none."""
    required = sorted(purpose for purpose in answers if rules.required(purpose))
    if not required:
        return []
    missing = []
    for purpose in required:
        approval = log.latest(purpose)
        if approval is None:
            missing.append(purpose)
            continue
        say(
            f"{version} approved for {purpose} by {approval.by} at "
            f"{approval.at:%Y-%m-%d %H:%M:%S} UTC"
        )
    if not missing:
        return []
    described = f"{version} has no approval for {', '.join(missing)}, which the policy requires"
    if not force:
        approvers = ", ".join(rules.approvers_of(missing[0]))
        raise NotApproved(
            f"refused: {described}. One of {approvers} approves it with `rankgate model "
            f"approve {version} --by NAME --purpose {missing[0]}`, or pass --force "
            "(recorded in the audit of routing changes)"
        )
    say(f"WARNING (--force): promoted without approval: {described}")
    return [f"approval: {described}"]
