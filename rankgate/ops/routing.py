"""Who serves: promote, retire and roll back versions, deploy policy files, and read
the routing's state and history back.

Each change edits the routing (or policy) section of the serve config through
serving/ops/promotion.py and applies it to a running server of this home; each is
recorded in the audit of routing changes (`rankgate model history`). Off-policy
evidence (serving/ops/evidence.py, numpy) is imported only when a change or a
shadow asks for it, so reading the status stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.manifest import REFERENCE_FILE
from rankgate.core.errors import RankgateError
from rankgate.governance.policy import PolicySet, load_policy_set
from rankgate.ops.environment import Environment
from serving.contract.config import EvaluationRequirement, Role
from serving.observe.drift_figures import read_drift
from serving.observe.outcomes import outcome_keys, project_outcomes, read_outcomes, read_unjoined
from serving.observe.routing_log import (
    clear_rollback,
    read_rollbacks,
    read_routing_events,
    read_shadow,
)
from serving.ops.coverage import (
    Regions,
    coverage,
    permitted_views,
    residency_regions,
    unserved,
)
from serving.ops.launch import serve_env
from serving.ops.promotion import (
    Move,
    RoutingFile,
    apply_running,
    default_config,
    plain,
    read_routing,
    record_change,
    reset_canary_outcomes,
    rollback_move,
    routing_applied,
    starts_experiment,
    validate_routing,
    write_policy,
)
from serving.ops.supervisor import ServerInfo

if TYPE_CHECKING:
    from serving.ops.evidence import Evidence

Say = Callable[[str], None]


@dataclass(frozen=True)
class RoutingContext:
    """The environment and the serve config a routing change edits."""

    env: Environment
    path: Path

    @classmethod
    def open(cls, config_path: Path | None) -> RoutingContext:
        env = Environment.open()
        return cls(env, config_path or default_config(env.home))

    def apply(self, expect: Callable[[dict[str, Any]], bool], say: Say) -> None:
        """Apply the edited config to a running server of this home, if there is one."""
        env = self.env
        assert env.redis_url is not None
        apply_running(env.home, self.path, serve_env(env.home, env.redis_url), expect, say)


def chosen_role(canary: float | None, stable: bool, shadow: bool, alternate: bool) -> Role:
    """The one role the promote options ask for."""
    roles: dict[Role, bool] = {
        "canary": canary is not None,
        "stable": stable,
        "shadow": shadow,
        "alternate": alternate,
    }
    chosen = [role for role, on in roles.items() if on]
    if len(chosen) != 1:
        raise RankgateError("choose exactly one of --canary PCT, --stable, --shadow, --alternate")
    return chosen[0]


def promote(
    version: str, role: Role, canary: float | None, force: bool, config_path: Path | None, say: Say
) -> None:
    """Give VERSION `role` in the routing and apply it; refused when its files or
    inputs do not validate, drifted (with drift.block_promotion), lacks the evidence the config asks
    for, or leaves users of a purpose without a permitted model, unless `force`."""
    context = RoutingContext.open(config_path)
    env, path = context.env, context.path
    # Parity is not rechecked: the hashes show these are the files registration
    # checked, and loading the models would cost more than the rest of the command.
    # `rankgate model validate` rechecks it (after upgrading onnxruntime, say).
    report = env.models.validate(version, env.view_infos(), parity=False)
    if not report.ok:
        raise RankgateError(
            f"refused: model version {version!r} does not validate: " + "; ".join(report.failures())
        )
    routing = RoutingFile.open(path)
    drift = read_drift(env.redis, env.home.namespace, version)
    routing.guard_drift(version, role, drift, force, say)
    before = routing.routing
    requirement = routing.promotion.require_evaluation
    evidence = (
        evidence_against(env, version, before.stable, requirement)
        if requirement is not None and role in ("canary", "stable") and version != before.stable
        else None
    )
    routing.guard_evidence(version, evidence, force, say)
    new = routing.change(Move(version, role, canary), env.models, force, say, approval=True)
    if role == "canary":
        namespace = env.home.namespace
        if starts_experiment(before, version, set(read_rollbacks(env.redis, namespace))):
            reset_canary_outcomes(env.redis, namespace, version, new.stable)
            say(f"{version}: canary outcome counters start from zero")
        clear_rollback(env.redis, namespace, version)
    say(f"{path}: {version} is now {role}" + (f" at {canary:g} %" if canary is not None else ""))
    lines = evidence.lines() if evidence is not None else None
    record_change(env.redis, env.home.namespace, "promote", version, routing, lines)
    context.apply(routing_applied(new), say)


def evidence_against(
    env: Environment, version: str, stable: str, requirement: EvaluationRequirement
) -> Evidence:
    """Off-policy evidence of `version` against stable, as the gate asks for it."""
    from serving.ops.evidence import gather, logged_decisions

    decisions, source = logged_decisions(
        env, [version, stable], requirement.source, requirement.since
    )
    return gather(
        env,
        version,
        stable,
        decisions,
        source,
        requirement.estimator,
        requirement.confidence,
        min_effective_sample_size=requirement.min_effective_sample_size,
        project_log=requirement.source == "logs",
    )


def retire(version: str, force: bool, config_path: Path | None, say: Say) -> None:
    """Take VERSION out of the routing (it stays in the model store) and apply it."""
    context = RoutingContext.open(config_path)
    routing = RoutingFile.open(context.path)
    new = routing.change(Move(version, None), context.env.models, force, say)
    say(f"{context.path}: {version} left the routing")
    record_change(context.env.redis, context.env.home.namespace, "retire", version, routing)
    context.apply(routing_applied(new), say)


def rollback(force: bool, config_path: Path | None, say: Say) -> None:
    """Take the canary out, back to the role it had before, and apply it."""
    context = RoutingContext.open(config_path)
    path, env = context.path, context.env
    routing = RoutingFile.open(path)
    move = rollback_move(routing.routing)
    if move is None:
        say(f"{path}: no canary to roll back")
        return
    new = routing.change(move, env.models, force, say)
    back = f"back to {move.role}" if move.role else "out of the routing"
    say(f"{path}: canary {move.version} {back}; {new.stable} is stable for all users")
    record_change(env.redis, env.home.namespace, "rollback", move.version, routing)
    context.apply(routing_applied(new), say)


def check_policy(folder: Path | None) -> PolicySet:
    """FOLDER's policy files (default: the project's), checked against the catalogue."""
    env = Environment.open(redis=False)
    return load_policy_set(folder, env.catalogue(), env.project.item_type)


def deploy_policy(folder: Path | None, config_path: Path | None, say: Say) -> None:
    """Check FOLDER's policy files, name them and their digest in the serve config, and
    have a running server re-read them in place."""
    checked = check_policy(folder)
    context = RoutingContext.open(config_path)
    warn_unserved(context, checked, say)
    write_policy(context.path, checked.folder, checked.digest)
    say(f"{context.path}: policy {checked.policy.version} from {checked.folder} ({checked.digest})")
    context.apply(lambda h: h.get("policy_digest") == checked.digest, say)


def warn_unserved(context: RoutingContext, checked: PolicySet, say: Say) -> None:
    """Say which purposes (in a region) the routing leaves without a permitted model
    under the new policy: the policy takes effect (it is the privacy office's to set),
    and their requests get the fallback, with the reason this names."""
    _, node = read_routing(context.path)
    routing = validate_routing(plain(node), context.path)
    policy = checked.policy
    regions = residency_regions(
        policy.regions, policy.residency, context.env.models.origins(routing.all_versions)
    )
    served = coverage(
        routing, permitted_views(policy), context.env.models.views_of(routing.all_versions), regions
    )
    reasons = {
        s.pair: "residency" if s.residency else "no_permitted_model"
        for s in served
        if s.version is None
    }
    for pair, share in unserved(served).items():
        if share > 0:
            reason = reasons.get(pair) or "residency"  # a purpose named whole: every region
            say(
                f"warning: under this policy {pair} has no permitted model for {share:g} % of its "
                f"users: they get the non-personalized fallback ({reason})"
            )


def history(count: int) -> list[str]:
    """The audit of routing changes, newest last, forced changes with their evidence."""
    env = Environment.open()
    entries = read_routing_events(env.redis, env.home.namespace, count)
    if not entries:
        return ["no routing changes recorded"]
    lines = []
    for entry in entries:
        when = _when(entry["at"])
        if entry["event"] == "rollback" and "rule" in entry:  # a replica's, not `model rollback`
            lines.append(
                f"{when}  automatic rollback of {entry['version']}: rule {entry['rule']}: "
                f"{entry['detail']}"
            )
            continue
        if entry["event"] == "approve":
            lines.append(
                f"{when}  approve {entry['version']} for {entry['purpose']} by {entry['by']}"
            )
            continue
        role = entry.get("role") or "out of the routing"
        weight = f" at {entry['weight']:g} %" if entry.get("weight") is not None else ""
        forced = "  FORCED past: " + "; ".join(entry["overrode"]) if entry.get("overrode") else ""
        lines.append(f"{when}  {entry['event']} {entry['version']} -> {role}{weight}{forced}")
        lines.extend(f"    {line}" for line in entry.get("evidence_lines", []))
    return lines


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def status(config_path: Path | None, since: str) -> list[str]:
    """Routing, drift per version, automatic rollbacks, shadow agreement and off-policy
    estimates since `since`, and the outcomes joined to each version's decisions."""
    context = RoutingContext.open(config_path)
    env, path = context.env, context.path
    _, routing = read_routing(path)
    info = ServerInfo.read(env.home)
    health = info.health() if info else None
    lines = [f"config: {path}  (salt {routing['salt']})"]
    live = health["routing"] if health else None
    lines.append(
        "server: "
        + (
            f"{info.base_url}, canary weight now {live['canary_weight']:g} %"
            if info and live
            else "not running"
        )
    )
    accepted = _residency(env, path)
    for route in plain(routing)["versions"]:
        lines.extend(_route_lines(env, route, live, routing, since))
        lines.append(f"      lineage: {_lineage_line(env, route['version'], accepted)}")
    lines.extend(_rollback_lines(env))
    lines.extend(_outcome_lines(env))
    return lines


def _route_lines(
    env: Environment, route: dict[str, Any], live: dict[str, Any] | None, routing: Any, since: str
) -> list[str]:
    """One version of the routing: its role, live window, shadow agreement and drift."""
    weight = f"{route['weight']:g} %" if route.get("weight") is not None else ""
    line = f"  {route['version']:<12} {route['role']:<9} {weight}"
    if live and route["version"] in live["windows"]:
        w = live["windows"][route["version"]]
        line += (
            f"   window: {int(w['requests'])} req, errors {w['error_rate']:.1%}, "
            f"degraded {w['degraded_rate']:.1%}, p99 {w['p99_ms']:.1f} ms"
        )
    if route["role"] == "shadow":
        agreement = read_shadow(env.redis, env.home.namespace, route["version"])
        line += (
            f"   shadowed {int(agreement['requests'])} req, errors {int(agreement['errors'])}, "
            f"top-k overlap {agreement['mean_topk_overlap']:.2f}, "
            f"mean |score diff| {agreement['mean_abs_score_diff']:.4f}"
        )
    lines = [line, f"      drift: {_drift_line(env, route['version'])}"]
    if route["role"] == "shadow":
        lines.extend(
            f"      {evidence}"
            for evidence in _shadow_evidence(env, route["version"], routing, since)
        )
    return lines


def _residency(env: Environment, path: Path) -> Regions | None:
    """Per serving region, the registered versions its residency rule accepts (None:
    the served policy has no rules)."""
    routing = RoutingFile.open(path)
    return routing.regions_of(env.models, env.models.versions())


def _lineage_line(env: Environment, version: str, accepted: Regions | None) -> str:
    """A version's training data lineage, and the regions whose residency rule accepts it."""
    try:
        lineage = env.models.manifest(version).lineage
    except RankgateError as exc:
        return f"unreadable ({exc.message})"
    if accepted is None:
        return lineage.shown()
    where = [
        region for region, versions in accepted.items() if versions is None or version in versions
    ]
    refused = [region for region in accepted if region not in where]
    return f"{lineage.shown()}; residency: answers {', '.join(where) or 'no region'}" + (
        f", not {', '.join(refused)}" if refused else ""
    )


def _rollback_lines(env: Environment) -> list[str]:
    """Automatic rollbacks: which rule fired, with the figures of both sides."""
    rollbacks = read_rollbacks(env.redis, env.home.namespace)
    if not rollbacks:
        return ["automatic rollbacks: none"]
    lines = []
    for version, event in rollbacks.items():
        lines.append(
            f"automatic rollback of {version} at {_when(event['at'])}: rule {event['rule']} "
            f"fired: {event['detail']}"
        )
        for side in ("canary", "stable"):
            f = event[side]
            clicks = (
                f", {int(f['clicks'])} clicks / {int(f['impressions'])} impressions "
                f"(CTR {f['ctr']:.2%})"
                if "impressions" in f
                else ""
            )
            lines.append(
                f"    {side}: {int(f['requests'])} req, errors {f['error_rate']:.1%}, "
                f"degraded {f['degraded_rate']:.1%}, p99 {f['p99_ms']:.1f} ms{clicks}"
            )
    return lines


def _shadow_evidence(env: Environment, shadow: str, routing: Any, since: str) -> list[str]:
    """A shadow's click rate estimated off-policy against stable's on the decisions
    of the audit log since `since` that have outcomes (serving/ops/evidence.py)."""
    from serving.ops.evidence import gather, logged_decisions

    if project_outcomes(env.project) is None:
        return ["off-policy: the project declares no outcome events"]
    stable = next(r["version"] for r in routing["versions"] if r["role"] == "stable")
    try:
        decisions, source = logged_decisions(env, [shadow, stable], "audit", since)
        if not decisions:
            return [f"off-policy: no decisions with outcomes in the {source}"]
        found = gather(env, shadow, stable, decisions, source, "snips", 0.95)
    except RankgateError as exc:
        return [f"off-policy: not evaluated: {exc.message}"]
    return found.lines()


def _drift_line(env: Environment, version: str) -> str:
    """A version's drift as the replicas last wrote it, or why there is none."""
    figures = read_drift(env.redis, env.home.namespace, version)
    if figures is not None:
        return figures.describe()
    try:
        has_reference = REFERENCE_FILE in env.models.manifest(version).artifacts
    except RankgateError:
        has_reference = False
    if not has_reference:
        return f"no reference (`rankgate model reference {version}` adds one)"
    return "no figures (no server has scored with it within the drift window)"


def _outcome_lines(env: Environment) -> list[str]:
    """Joined outcomes per version and variant: CTR with its 95 % Wilson interval,
    CTR per position, conversions, decisions with outcomes; unjoined outcomes."""
    client, namespace = env.redis, env.home.namespace
    found = outcome_keys(client, namespace)
    lines = [
        "outcomes joined to decisions (CTR with 95 % Wilson interval):"
        if found
        else "outcomes: none joined (events.outcomes in rankgate.yaml, POST /v1/events)"
    ]
    for version, variant in found:
        totals = read_outcomes(client, namespace, version, variant)
        interval = totals.ctr_interval()
        ctr = (
            f"CTR {totals.clicks / totals.impressions:.2%} [{interval[0]:.2%}, {interval[1]:.2%}]"
            if interval is not None
            else "CTR n/a"
        )
        lines.append(
            f"  {version or '-':<12} {variant:<9} impressions {totals.impressions}, "
            f"clicks {totals.clicks}, {ctr}, conversions {totals.conversions}, "
            f"decisions with outcomes {totals.decisions}"
        )
        positions = [
            f"{position}: {counts.get('clicks', 0) / counts['impressions']:.1%} "
            f"({counts.get('clicks', 0)}/{counts['impressions']})"
            for position, counts in totals.by_position.items()
            if counts.get("impressions")
        ]
        if positions:
            lines.append("      CTR by position  " + "  ".join(positions))
    unjoined = read_unjoined(client, namespace)
    if unjoined:
        lines.append(
            "unjoined outcomes: "
            + ", ".join(f"{name} {count}" for name, count in sorted(unjoined.items()))
        )
    return lines
