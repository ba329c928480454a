"""Promotion by config: edit the routing section of the serve config and apply it.

`rankgate model promote V --canary PCT | --stable | --shadow | --alternate`,
`rankgate model retire V` and `rankgate model rollback` each make one `Move` (a
version takes a role, or leaves the routing). `plan` computes the new routing from
it in one place, and who answers each purpose before and after by the router's
own rule (`Router.answer` over `Router.split`). A purpose counts as served when
every one of its users gets a permitted model: a purpose only the canary may serve
is served for the canary's share of users and left without a model for the rest.
With residency rules in the policy, coverage is counted per (purpose, region): a
version serves a region only if the region's rule accepts its training data's
lineage (rankgate/governance/residency.py). A change that leaves more users of a
purpose (in a region) without a permitted model than before is refused, naming
the pair, unless forced. Rolling a canary back gives it the role it had before
(`previous_role`), so an alternate promoted to canary is an alternate again.

A new canary (another version than the one before, or one that was rolled back)
starts its click-rate experiment from zero: its `canary` outcome counters are
reset and stable's counters at that moment are kept as the baseline the
click-rate rule measures stable from (`reset_canary_outcomes`).

The routing is written back with comments and layout kept. When a server of this
home is running, the file is applied with `serve deploy`: only `user_config`
changes, so Ray Serve calls `reconfigure` on the running replicas, without a restart.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import LiteralScalarString

from rankgate.core import redis_keys
from rankgate.core.config_files import validation_message
from rankgate.core.errors import ConfigError, RankgateError
from rankgate.core.home import Home
from rankgate.core.project_files import policy_files
from rankgate.core.redis_server import RedisClient
from rankgate.core.settings import SOURCE_CHECKOUT, get_project
from rankgate.governance.approval import ApprovalRules
from rankgate.governance.policy import load_policy
from rankgate.governance.residency import Residency
from serving.contract.config import (
    DriftConfig,
    PolicyConfig,
    PromotionConfig,
    ReturnRole,
    Role,
    RoutingConfig,
    VersionRoute,
)
from serving.observe.drift_figures import DriftFigures
from serving.observe.outcomes import (
    BASELINE_CLICKS,
    BASELINE_IMPRESSIONS,
    BASELINE_VERSION,
    read_outcomes,
)
from serving.observe.routing_log import record_routing_change
from serving.ops.approvals import approval_guard
from serving.ops.coverage import (
    PromotionRefused,
    Purposes,
    Regions,
    RoutingChange,
    Served,
    ViewsOf,
    coverage,
    permitted_views,
    residency_regions,
)
from serving.ops.launch import (
    SERVE_CONFIG,
    derived_config,
    project_serve_config,
    ray_client_env,
    serve_deploy_command,
)
from serving.ops.serve_config import ServeConfig, plain
from serving.ops.supervisor import ServerInfo

if TYPE_CHECKING:
    from model_store.store import ModelStore
    from serving.ops.evidence import Evidence

Say = Callable[[str], None]


def read_routing(config_path: Path) -> tuple[ServeConfig, Any]:
    """The serve config (round-trip) and its routing node."""
    config = ServeConfig.read(config_path)
    routing = config.user_config.get("routing")
    if routing is None:
        raise ConfigError(f"{config_path}: RankIngress user_config has no routing section")
    return config, routing


@dataclass(frozen=True)
class Move:
    """One role change: `version` takes `role`, or leaves the routing (role None)."""

    version: str
    role: Role | None
    weight: float | None = None
    """A canary's percent of users."""


def reassign(routing: RoutingConfig, move: Move) -> RoutingConfig:
    """The routing after `move`. The stable version and the canary come first; a version
    keeps its place when only its role changes. A canary that a new canary or stable
    takes over goes back to its `previous_role` (or leaves); a replaced stable leaves."""
    current = next((r for r in routing.versions if r.version == move.version), None)
    if current is None and move.role is None:
        raise PromotionRefused(f"{move.version} is not in the routing")
    if current is not None and current.role == "stable" and move.role != "stable":
        raise PromotionRefused(
            f"{move.version} is the stable version: promote another version --stable first"
        )
    if move.role == "canary" and move.weight is None:
        raise PromotionRefused(f"a canary needs a weight (percent of users) for {move.version}")
    takes_over = move.role in ("stable", "canary")
    routes: list[VersionRoute] = []
    for route in routing.versions:
        if route.version == move.version:
            if move.role in ("shadow", "alternate"):
                routes.append(VersionRoute(version=move.version, role=move.role))
            continue
        if route.role == "canary" and takes_over:
            if route.previous_role is not None:
                routes.append(VersionRoute(version=route.version, role=route.previous_role))
            continue
        if route.role == "stable" and move.role == "stable":
            continue  # the old stable leaves the routing
        routes.append(route)
    if move.role == "stable":
        routes.insert(0, VersionRoute(version=move.version, role="stable", weight=100))
    elif move.role == "canary":
        previous: ReturnRole | None = None
        if current is not None and current.role == "canary":
            previous = current.previous_role  # a new weight keeps the role it had before
        elif current is not None and (current.role == "shadow" or current.role == "alternate"):
            previous = current.role
        after_stable = next(i for i, r in enumerate(routes) if r.role == "stable") + 1
        routes.insert(
            after_stable,
            VersionRoute(
                version=move.version, role="canary", weight=move.weight, previous_role=previous
            ),
        )
    elif move.role is not None and current is None:
        routes.append(VersionRoute(version=move.version, role=move.role))
    canary_weight = sum(r.weight or 0.0 for r in routes if r.role == "canary")
    routes = [
        r.model_copy(update={"weight": 100 - canary_weight}) if r.role == "stable" else r
        for r in routes
    ]
    try:
        return RoutingConfig.model_validate(
            {**routing.model_dump(), "versions": [r.model_dump() for r in routes]}
        )
    except ValidationError as exc:
        raise PromotionRefused(validation_message("the new routing", exc)) from exc


def rollback_move(routing: RoutingConfig) -> Move | None:
    """Taking the canary out: it goes back to the role it had before (or leaves)."""
    canary = routing.canary
    return None if canary is None else Move(canary.version, canary.previous_role)


def plan(
    routing: RoutingConfig,
    move: Move,
    purposes: Purposes,
    views_of: ViewsOf,
    regions: Regions | None = None,
) -> RoutingChange:
    """The routing after `move`, and who answers each purpose (in each region, with
    residency rules) before and after it."""
    after = reassign(routing, move)
    return RoutingChange(
        routing,
        after,
        coverage(routing, purposes, views_of, regions),
        coverage(after, purposes, views_of, regions),
    )


def routing_applied(routing: RoutingConfig) -> Callable[[dict[str, Any]], bool]:
    """Whether a server's /healthz shows exactly this routing."""
    expected = [route.model_dump() for route in routing.versions]
    return lambda health: [dict(v) for v in health["routing"]["versions"]] == expected


def validate_routing(routing: dict[str, Any], source: Path) -> RoutingConfig:
    try:
        return RoutingConfig.model_validate(routing)
    except ValidationError as exc:
        raise ConfigError(validation_message(f"{source} routing", exc)) from exc


def _yaml_value(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass
class RoutingFile:
    """The routing section of a serve config, the purposes of the policy it serves,
    and the round-trip document it is written back into."""

    config: ServeConfig
    node: Any
    routing: RoutingConfig
    purposes: dict[str, frozenset[str]]
    promotion: PromotionConfig
    drift: DriftConfig = field(default_factory=DriftConfig)
    approval_rules: ApprovalRules = field(default_factory=ApprovalRules)
    overrode: list[str] = field(default_factory=list)
    """What the last change was forced past."""
    regions: list[str] = field(default_factory=list)
    """The policy's serving regions."""
    residency: Residency = field(default_factory=dict)
    """The policy's residency rules (empty: none)."""

    @classmethod
    def open(cls, path: Path) -> RoutingFile:
        config, node = read_routing(path)
        folder = config.section(PolicyConfig, "policy").folder
        policy = load_policy(folder / "policy.yaml" if folder is not None else None)
        routing = validate_routing(plain(node), path)
        promotion = config.section(PromotionConfig, "promotion")
        drift = config.section(DriftConfig, "drift")
        return cls(
            config,
            node,
            routing,
            permitted_views(policy),
            promotion,
            drift,
            approval_rules=policy.approvals,
            regions=list(policy.regions),
            residency=policy.residency,
        )

    def regions_of(self, models: ModelStore, versions: Iterable[str]) -> Regions | None:
        """Per serving region, which of `versions` its residency rule accepts (None: the
        policy has no rules); a version whose manifest does not read has no lineage."""
        if not self.residency:
            return None
        origins = models.origins(versions)
        return residency_regions(self.regions, self.residency, origins)

    @property
    def path(self) -> Path:
        return self.config.path

    def guard_drift(
        self, version: str, role: Role, figures: DriftFigures | None, force: bool, say: Say
    ) -> None:
        """With `drift.block_promotion`, refuse to give a flagged version users (a shadow
        serves nobody: allowed), unless forced; a forced promotion says what it overrode."""
        if not self.drift.block_promotion or role == "shadow":
            return
        if figures is None or not figures.flags:
            return
        described = f"{version} has drift flags ({figures.describe()})"
        if not force:
            raise PromotionRefused(
                f"refused: {described}; drift.block_promotion is on in {self.path}. "
                "Pass --force to promote it anyway"
            )
        say(f"WARNING (--force): {described}")
        self.overrode.append(described)

    def guard_evidence(
        self, version: str, evidence: Evidence | None, force: bool, say: Say
    ) -> None:
        """With `promotion.require_evaluation`, refuse a version whose off-policy
        evidence (serving/ops/evidence.py) fails it, unless forced; a forced promotion says
        what it overrode. `evidence` is None when the gate does not apply."""
        requirement = self.promotion.require_evaluation
        if requirement is None or evidence is None:
            return
        for line in evidence.lines():
            say(line)
        failures = evidence.failures(requirement)
        if not failures:
            say(f"{version} passes promotion.require_evaluation")
            return
        described = "; ".join(failures)
        if not force:
            raise PromotionRefused(
                f"refused by promotion.require_evaluation: {described}. Gather more evidence "
                "(a shadow, exploration) or pass --force (recorded in the audit of routing changes)"
            )
        say(f"WARNING (--force): promoted without the required evidence: {described}")
        self.overrode.append(f"promotion.require_evaluation: {described}")

    def guard_approval(
        self, planned: RoutingChange, version: str, models: ModelStore, force: bool, say: Say
    ) -> None:
        """Refuse to let `version` start answering a purpose whose policy requires an
        approval it lacks, unless forced (serving/ops/approvals.py). A purpose it answers
        already (a new canary weight, a canary made stable) took its traffic before."""

        def answers(served: list[Served]) -> set[str]:
            return {s.purpose for s in served if s.version == version and s.share > 0}

        new = answers(planned.served_after) - answers(planned.served_before)
        self.overrode += approval_guard(
            self.approval_rules, new, version, models.approvals(version), force, say
        )

    def change(
        self, move: Move, models: ModelStore, force: bool, say: Say, approval: bool = False
    ) -> RoutingConfig:
        """Plan `move`, show who serves what before and after, refuse or write it
        (`approval`: check the moved version's approvals first, as promote does)."""
        versions = [*self.routing.all_versions, move.version]
        views_of = models.views_of(versions)
        regions = self.regions_of(models, versions)
        planned = plan(self.routing, move, self.purposes, views_of, regions)
        per = " in each region" if regions is not None else ""
        say(f"who answers each purpose{per} (share of its users, when not all):")
        for line in planned.table():
            say(line)
        if approval:
            self.guard_approval(planned, move.version, models, force, say)
        self.overrode += planned.guard(force, say)
        self.write(planned.after)
        return planned.after

    def write(self, routing: RoutingConfig) -> None:
        entries = self.node["versions"]
        entries.clear()
        for route in routing.versions:
            fields = {k: _yaml_value(v) for k, v in route.model_dump(exclude_none=True).items()}
            entry = CommentedMap(fields)
            entry.fa.set_flow_style()  # one line per version, as written by hand
            entries.append(entry)
        self.config.write()
        self.routing = routing


def record_change(
    client: RedisClient,
    namespace: str,
    command: str,
    version: str,
    routing: RoutingFile,
    evidence: list[str] | None = None,
) -> None:
    """Append the change just written to the audit of routing changes: the version's
    role after it, what was forced past, and the evidence shown."""
    route = next((r for r in routing.routing.versions if r.version == version), None)
    record_routing_change(
        client,
        namespace,
        {
            "command": command,
            "at": time.time(),
            "version": version,
            "role": route.role if route else None,
            "weight": route.weight if route else None,
            "config": str(routing.path),
            "forced": bool(routing.overrode),
            "overrode": routing.overrode,
            "evidence_lines": evidence or [],
        },
    )


def starts_experiment(before: RoutingConfig, version: str, rolled_back: set[str]) -> bool:
    """Whether making `version` the canary starts a new experiment (rather than changing
    the weight of the one running)."""
    canary = before.canary
    return canary is None or canary.version != version or version in rolled_back


def reset_canary_outcomes(client: RedisClient, namespace: str, version: str, stable: str) -> None:
    """Start `version`'s canary outcome counters from zero, with stable's impressions
    and clicks now as the baseline: an earlier experiment of the same version does
    not decide this one, and stable is compared over the same time."""
    now = read_outcomes(client, namespace, stable, "stable")
    key = redis_keys.outcomes(namespace, version, "canary")
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                BASELINE_VERSION: stable,
                BASELINE_IMPRESSIONS: now.impressions,
                BASELINE_CLICKS: now.clicks,
            },
        )
        pipe.execute()


def write_policy(config_path: Path, folder: Path, revision: str) -> None:
    """Point the RankIngress user_config at a checked policy folder (`rankgate policy deploy`),
    or put the files themselves into a config that carries them (a cluster's)."""
    config = ServeConfig.read(config_path)
    user_config = config.ingress.setdefault("user_config", CommentedMap())
    if config.carries_project():
        # A cluster's config carries the project (`rankgate cluster config`): the checked
        # files go into it, since its replicas cannot read the folder.
        files = {name: LiteralScalarString(text) for name, text in policy_files(folder).items()}
        user_config["policy"] = CommentedMap({"revision": revision, "files": CommentedMap(files)})
        config.write()
        return
    # Inside the project the folder is written relative to it, so the file stays portable.
    project = get_project().root
    shown = folder.relative_to(project) if folder.is_relative_to(project) else folder
    section = CommentedMap({"dir": str(shown), "revision": revision})
    section.fa.set_flow_style()
    user_config["policy"] = section
    config.write()


def apply_running(
    home: Home,
    config_path: Path,
    env: dict[str, str],
    expect: Callable[[dict[str, Any]], bool],
    say: Say,
    timeout_s: float = 60,
) -> bool:
    """`serve deploy` the edited config to this home's running server, if any; wait until it serves it."""
    info = ServerInfo.read(home)
    if info is None or info.health() is None or info.base_config.resolve() != config_path.resolve():
        say("no running server uses this config: the change applies at the next `rankgate serve`")
        return False
    deployed = derived_config(
        home, base=config_path, port=info.port, host=info.host, log_format=info.log_format
    )
    # A refusal of an earlier config stays in /healthz until the next one is taken:
    # only an error that comes with a reconfigure after this deploy refuses this one.
    earlier = (info.health() or {}).get("reconfigured")
    result = subprocess.run(
        serve_deploy_command(deployed, info.dashboard),
        env=ray_client_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RankgateError(
            f"serve deploy failed: {(result.stderr or result.stdout).strip()[-800:]}"
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = info.health()
        fresh = health is not None and (earlier is None or health.get("reconfigured") != earlier)
        if health is not None and health.get("config_error") and fresh:
            raise RankgateError(f"the server refused the config: {health['config_error']}")
        if health is not None and expect(health):
            say(f"applied to the running server at {info.base_url} (reconfigured in place)")
            return True
        time.sleep(0.25)
    raise RankgateError(
        f"the server at {info.base_url} did not take the new config within {timeout_s:.0f}s"
    )


def default_config(home: Home) -> Path:
    """The running server's config, else the project's; never the copy inside an
    installed rankgate (an upgrade would overwrite the change)."""
    info = ServerInfo.read(home)
    config = info.base_config if info is not None else project_serve_config()
    if SOURCE_CHECKOUT is None and config.resolve() == SERVE_CONFIG.resolve():
        project = get_project().root
        raise ConfigError(
            f"the project {project} has no serve_config.yaml of its own, and the one "
            f"installed with rankgate is not edited: `cp {SERVE_CONFIG} {project}/` (or pass "
            "--config FILE)"
        )
    return config
