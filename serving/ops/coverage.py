"""Who answers each purpose (in each region) under a routing, and what a change of it takes away.

`coverage` runs the router's own rule (`Router.answer` over `Router.split`) for every
purpose of the policy: a purpose counts as served when every one of its users gets a
permitted model (one whose feature views the purpose permits). With residency rules
in the policy it is counted per (purpose, serving region): a version serves a region
only if the region's rule accepts its training data's lineage
(rankgate/governance/residency.py). `RoutingChange` compares two routings' coverage:
a change that leaves more users of a pair without a permitted model is refused,
naming the pair, unless forced (serving/ops/promotion.py makes the changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rankgate.core.errors import RankgateError
from rankgate.governance.policy import Policy
from rankgate.governance.residency import DataOrigin, Residency, permitted_versions
from serving.contract.config import Role, RoutingConfig
from serving.ranking.routing import Router

Say = Callable[[str], None]
Purposes = Mapping[str, frozenset[str]]
"""Each purpose of the policy and the feature views it permits."""
ViewsOf = dict[str, frozenset[str] | None]
"""Each version and the feature views it reads (None: unknown), as the router takes them."""
Regions = Mapping[str, frozenset[str] | None]
"""Each serving region of the policy and the versions its residency rule accepts (None:
no rule, every version), as the router takes them."""
TOLERANCE = 1e-9  # shares are sums of float percents


class PromotionRefused(RankgateError):
    """A role change that would take personalization away, or break the routing."""

    status_code = 409


@dataclass(frozen=True)
class Served:
    """Who answers a purpose (in a region) for a share of its users (version None: no
    permitted model)."""

    purpose: str
    version: str | None
    variant: Role | None
    share: float
    """Percent of the purpose's users (in the region)."""
    region: str | None = None
    """The serving region, when the policy has residency rules (None: every region)."""
    residency: bool = False
    """No version answers because the region's residency rule accepts none that the
    purpose permits (the fallback's reason `residency`)."""

    @property
    def pair(self) -> str:
        """The purpose, or "purpose in REGION" when counted per region."""
        return self.purpose if self.region is None else f"{self.purpose} in {self.region}"


def permitted_views(policy: Policy) -> dict[str, frozenset[str]]:
    """Each purpose and the views a model may read for it, as the consent gate passes them."""
    return {name: frozenset(purpose.feature_views) for name, purpose in policy.purposes.items()}


def coverage(
    routing: RoutingConfig, purposes: Purposes, views_of: ViewsOf, regions: Regions | None = None
) -> list[Served]:
    """Who answers each purpose and for what share of its users, by the router's rule;
    per serving region when any region has a residency rule."""
    router = Router(routing)
    ruled = regions is not None and any(v is not None for v in regions.values())
    where: dict[str | None, frozenset[str] | None] = (
        dict(regions.items()) if regions is not None and ruled else {None: None}
    )
    shares: dict[tuple[str, str | None, str | None, Role | None, bool], float] = {}
    for purpose, allowed in purposes.items():
        for region, accepted in where.items():
            for assigned, share in router.split():
                chosen = router.answer(assigned, allowed, views_of, accepted)
                refused = chosen is None and router.answer(assigned, allowed, views_of) is not None
                key = (
                    purpose,
                    region,
                    chosen.version if chosen else None,
                    chosen.variant if chosen else None,
                    refused,
                )
                shares[key] = shares.get(key, 0.0) + share
    return [
        Served(purpose, version, variant, share, region, refused)
        for (purpose, region, version, variant, refused), share in shares.items()
    ]


Pair = tuple[str, str | None]
"""A purpose and a serving region (None: counted per purpose only)."""


def unserved_pairs(served: list[Served]) -> dict[Pair, float]:
    """Percent of each (purpose, region)'s users that no permitted model answers."""
    missing = dict.fromkeys(((entry.purpose, entry.region) for entry in served), 0.0)
    for entry in served:
        if entry.version is None:
            missing[entry.purpose, entry.region] += entry.share
    return missing


def labelled(pairs: Mapping[Pair, float]) -> dict[str, float]:
    """Figures by purpose where all its regions agree (or it is counted per purpose),
    else by "purpose in REGION": a region is named only where it makes a difference."""
    by_purpose: dict[str, dict[str | None, float]] = {}
    for (purpose, region), value in pairs.items():
        by_purpose.setdefault(purpose, {})[region] = value
    shown: dict[str, float] = {}
    for purpose, regions in by_purpose.items():
        values = list(regions.values())
        if all(abs(v - values[0]) <= TOLERANCE for v in values):
            shown[purpose] = values[0]
        else:
            shown.update({f"{purpose} in {region}": v for region, v in regions.items()})
    return shown


def unserved(served: list[Served]) -> dict[str, float]:
    """Percent of each purpose's users that no permitted model answers (per region
    where the regions differ)."""
    return labelled(unserved_pairs(served))


def residency_regions(
    policy_regions: Iterable[str], residency: Residency, origins: Mapping[str, DataOrigin | None]
) -> Regions | None:
    """Each region and the versions (of `origins`) its residency rule accepts; None when
    the policy has no residency rules (coverage is then counted per purpose only)."""
    if not residency:
        return None
    accepted = permitted_versions(residency, origins)
    return {region: accepted.get(region) for region in policy_regions}


@dataclass(frozen=True)
class RoutingChange:
    """A routing before and after one move, and who serves each purpose in each."""

    before: RoutingConfig
    after: RoutingConfig
    served_before: list[Served]
    served_after: list[Served]

    def lost_pairs(self) -> dict[Pair, float]:
        """(purpose, region) pairs that more users would reach without a permitted
        model: percent after."""
        before, after = unserved_pairs(self.served_before), unserved_pairs(self.served_after)
        return {p: s for p, s in after.items() if s > before.get(p, 0.0) + TOLERANCE}

    def losses(self) -> dict[str, float]:
        """Purposes (in a region, where the regions differ) that more users would reach
        without a permitted model: percent after."""
        lost = self.lost_pairs()
        after = unserved_pairs(self.served_after)
        return {
            label: share
            for label, share in labelled(
                {p: s if p in lost else -1.0 for p, s in after.items()}
            ).items()
            if share >= 0
        }

    def still_unserved(self) -> dict[str, float]:
        lost = self.lost_pairs()
        after = unserved_pairs(self.served_after)
        return {
            label: share
            for label, share in labelled(
                {p: s if p not in lost and s > TOLERANCE else -1.0 for p, s in after.items()}
            ).items()
            if share >= 0
        }

    def guard(self, force: bool, say: Say) -> list[str]:
        """Refuse a change that takes personalization away, unless forced; then say so
        loudly. Returns what was forced past (for the audit of routing changes)."""
        lost = self.losses()
        for purpose, share in self.still_unserved().items():
            say(
                f"warning: {purpose} still has no permitted model for {_percent(share)} of its users"
            )
        if not lost:
            return []
        reasons = self.reasons()
        described = "; ".join(
            f"{p} would be left without a permitted model for {_percent(s)} of its users"
            + (" (residency)" if reasons[p] == "residency" else "")
            for p, s in lost.items()
        )
        named = " and ".join(lost)
        if not force:
            residency = (
                ", or one whose training data the region's residency rule accepts (policy.yaml "
                "`residency`)"
                if "residency" in {reasons[p] for p in lost}
                else ""
            )
            raise PromotionRefused(
                f"refused: {described}. They would get the non-personalized fallback "
                f"({', '.join(sorted({reasons[p] for p in lost}))}). First make a version that "
                f"{named} may use an alternate (`rankgate model promote V --alternate`)"
                f"{residency}, or pass --force to accept it"
            )
        for pair, share in lost.items():
            say(
                f"WARNING (--force): {pair} loses personalization for {_percent(share)} of "
                f"its users: they get the non-personalized fallback ({reasons[pair]})"
            )
        return [described]

    def reasons(self) -> dict[str, str]:
        """The fallback's reason for each purpose (or purpose in a region) left without
        a model after the change."""
        reasons: dict[Pair, str] = {
            (s.purpose, s.region): "residency" if s.residency else "no_permitted_model"
            for s in self.served_after
            if s.version is None
        }
        named: dict[str, str] = {}
        for (purpose, region), reason in reasons.items():
            for label in (purpose, f"{purpose} in {region}"):
                known = named.get(label)
                named[label] = reason if known in (None, reason) else "no_permitted_model"
        return named

    def table(self) -> list[str]:
        """Which purposes each version serves, before and after (share of users when not all)."""
        order = [*self.after.all_versions]
        order += [v for v in self.before.all_versions if v not in order]
        rows = [("version", "before", "after")]
        rows += [
            (
                version,
                _cell(self.before, self.served_before, version),
                _cell(self.after, self.served_after, version),
            )
            for version in order
        ]
        if any(s.version is None for s in [*self.served_before, *self.served_after]):
            rows.append(
                (
                    "no model",
                    ", ".join(_serving(self.served_before, None)) or "-",
                    ", ".join(_serving(self.served_after, None)) or "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        return [
            f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip() for row in rows
        ]


def _percent(share: float) -> str:
    return f"{share:g} %"


def _serving(served: list[Served], version: str | None) -> list[str]:
    """The purposes `version` answers (None: that no model answers), with the share of
    their users when it is not all of them (per region where the regions differ)."""
    shares: dict[Pair, float] = dict.fromkeys(((s.purpose, s.region) for s in served), -1.0)
    for entry in served:
        if entry.version == version:
            shares[entry.purpose, entry.region] = max(shares[entry.purpose, entry.region], 0.0)
            shares[entry.purpose, entry.region] += entry.share
    return [
        label + ("" if share >= 100 - TOLERANCE else f" ({_percent(share)})")
        for label, share in labelled(shares).items()
        if share > 0
    ]


def _cell(routing: RoutingConfig, served: list[Served], version: str) -> str:
    route = next((r for r in routing.versions if r.version == version), None)
    if route is None:
        return "not routed"
    label: str = route.role
    if route.role in ("stable", "canary") and routing.canary is not None:
        label += f" {_percent(route.weight if route.weight is not None else 100.0)}"
    return f"{label}: {', '.join(_serving(served, version)) or 'nothing'}"
