"""`rankgate model approve VERSION --by NAME --purpose P`: a person's approval of a
version for a purpose, with the evidence they saw, kept beside the version.

The approver must be one the served policy names for the purpose (its `approvals`
section). What they saw is computed here, at this moment, and stored with the
approval (model_store/approvals.py): the off-policy estimate of the version against
stable, as `promotion.require_evaluation` asks for it (its defaults when the serve
config sets none), and the version's drift figures. Either may be unavailable (no
logged decisions with propensities yet, no drift window): the approval says why,
and the approver has seen that too. The approval is also appended to the audit of
routing changes (`rankgate model history`), which sends it to the webhooks that take
approvals (serving/observe/routing_log.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store.approvals import Approval, now
from rankgate.core.errors import RankgateError
from rankgate.governance.policy import load_policy
from rankgate.ops.routing import RoutingContext, evidence_against
from serving.contract.config import EvaluationRequirement, PolicyConfig
from serving.observe.drift_figures import read_drift
from serving.observe.routing_log import record_routing_change
from serving.ops.promotion import RoutingFile

Say = Callable[[str], None]


@dataclass(frozen=True)
class Approved:
    approvals: list[Approval]

    def lines(self) -> list[str]:
        return [
            f"{a.version} approved for {a.purpose} by {a.by} at {a.at:%Y-%m-%d %H:%M:%S} UTC "
            f"(policy {a.policy_version})"
            for a in self.approvals
        ]


def approve(
    version: str,
    by: str,
    purposes: list[str],
    note: str,
    config_path: Path | None,
    say: Say,
) -> Approved:
    """Record `by`'s approval of VERSION for each of `purposes`, with the evidence
    shown to them; refused (nothing written) when a name or purpose is not the policy's."""
    context = RoutingContext.open(config_path)
    env = context.env
    routing = RoutingFile.open(context.path)
    folder = routing.config.section(PolicyConfig, "policy").folder
    policy = load_policy(folder / "policy.yaml" if folder is not None else None)
    rules = policy.approvals
    log = env.models.approvals(version)  # UnknownVersion names the known ones
    for purpose in purposes:
        if purpose not in policy.purposes:
            raise RankgateError(
                f"--purpose {purpose!r}: not a purpose of the policy "
                f"(known: {', '.join(policy.purposes)})"
            )
        allowed = rules.approvers_of(purpose)
        if by not in allowed:
            raise RankgateError(
                f"--by {by!r}: not an approver for {purpose} in policy {policy.version} "
                f"(approvals: {', '.join(allowed) or 'nobody is named'})"
            )
        if not rules.required(purpose):
            say(f"note: the policy does not require approval for {purpose}; recorded all the same")
    evidence = _evidence(env, routing, version, say)
    drift = _drift(env, version, say)
    at = now()
    approvals = [
        Approval(
            version=version,
            purpose=purpose,
            by=by,
            at=at,
            policy_version=policy.version,
            note=note,
            evidence=evidence,
            drift=drift,
        )
        for purpose in purposes
    ]
    for approval in approvals:
        log.append(approval)
    for approval in approvals:
        record_routing_change(
            env.redis,
            env.home.namespace,
            {
                "command": "approve",
                "at": time.time(),
                "version": version,
                "role": None,
                "weight": None,
                "purpose": approval.purpose,
                "by": by,
                "policy_version": policy.version,
                "evidence": evidence,
                "drift_flags": drift.get("flags", []),
                "config": str(context.path),
                "forced": False,
                "overrode": [],
                "evidence_lines": [],
            },
        )
    return Approved(approvals)


def _evidence(env: Any, routing: RoutingFile, version: str, say: Say) -> dict[str, Any]:
    """The off-policy estimate of `version` against stable, shown and returned."""
    stable = routing.routing.stable
    if version == stable:
        say(f"{version} is the stable version: no off-policy comparison against itself")
        return {"unavailable": f"{version} is the stable version"}
    requirement = routing.promotion.require_evaluation or EvaluationRequirement()
    try:
        evidence = evidence_against(env, version, stable, requirement)
    except RankgateError as exc:
        say(f"off-policy estimate unavailable: {exc.message}")
        return {"unavailable": exc.message}
    for line in evidence.lines():
        say(line)
    return {k: v for k, v in evidence.figures().items()}


def _drift(env: Any, version: str, say: Say) -> dict[str, Any]:
    figures = read_drift(env.redis, env.home.namespace, version)
    if figures is None:
        say(f"drift: no window recorded for {version}")
        return {"unavailable": f"no drift window recorded for {version}"}
    say(f"drift: {figures.describe()}")
    return {
        "at": figures.at,
        "rows": figures.rows,
        "window_s": figures.window_s,
        "has_reference": figures.has_reference,
        "feature_psi": figures.feature_psi,
        "score_psi": figures.score_psi,
        "explanation_drift": figures.explanation_drift,
        "flags": list(figures.flags),
    }
