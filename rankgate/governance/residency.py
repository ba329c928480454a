"""Residency: which model versions may answer a request, by where their training data came from.

A version's lineage (model_store/manifest.py, `lineage.data`) names the data regions
of the people it learned from, and of those the regions whose data was cleared for
transfer. The policy's `residency` section says, per serving region (a request's
`region`), which data regions a model that answers it may have learned from:

    residency:
      EU:
        data_regions: [EU]            # EU people's data may train a model that serves EU
        cleared_for_transfer: [US]    # US people's data too, where the version's lineage
                                      # says it was cleared for transfer

A version is accepted in a serving region when every data region of its lineage is
accepted there: listed in `data_regions`, or listed in `cleared_for_transfer` and
cleared in the version's lineage. A region without a rule accepts every version. A
version without recorded data regions, or whose training rows include people of no
known region, is accepted only where no rule exists: a rule asks for a fact the
version cannot show (the most conservative reading).

The check runs on the request path, so it is a lookup: `permitted_versions` computes
once per serving config, for each region that has a rule, the frozenset of versions
it accepts; the router asks `version in accepted` (serving/ranking/routing.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pydantic import Field

from rankgate.core.config_files import Strict


class ResidencyRule(Strict):
    """Which data regions may train a model that answers requests of one serving region."""

    data_regions: list[str] = Field(min_length=1)
    """Regions whose people's data a model serving this region may have learned from
    (regions of this policy)."""
    cleared_for_transfer: list[str] = Field(default_factory=list)
    """Regions whose people's data is accepted too when the version's lineage says that
    data was cleared for transfer (`cleared_for_transfer` in its lineage)."""


Residency = dict[str, ResidencyRule]
"""Serving region -> its rule (a region without one accepts every version)."""


def unknown_regions(residency: Mapping[str, ResidencyRule], known: Collection[str]) -> list[str]:
    """Where a rule names a region the policy does not define: `residency.<field>: unknown
    region 'X'` for each (empty: none)."""
    problems = []
    for serving, rule in residency.items():
        if serving not in known:
            problems.append(f"residency.{serving}: unknown region {serving!r}")
        for field in ("data_regions", "cleared_for_transfer"):
            for region in getattr(rule, field):
                if region not in known:
                    problems.append(f"residency.{serving}.{field}: unknown region {region!r}")
    return problems


@dataclass(frozen=True)
class DataOrigin:
    """What residency reads of a version's lineage."""

    regions: frozenset[str]
    """The data regions of the people it learned from."""
    cleared: frozenset[str] = frozenset()
    """Of those, the ones whose data was cleared for transfer."""
    complete: bool = True
    """False: some of its rows are of people of no known region."""


def accepts(rule: ResidencyRule, origin: DataOrigin | None) -> bool:
    """Whether a model that learned from `origin` may answer under `rule` (None: no
    lineage recorded, never accepted under a rule)."""
    if origin is None or not origin.complete or not origin.regions:
        return False
    return all(
        region in rule.data_regions
        or (region in rule.cleared_for_transfer and region in origin.cleared)
        for region in origin.regions
    )


def permitted_versions(
    residency: Mapping[str, ResidencyRule], origins: Mapping[str, DataOrigin | None]
) -> dict[str, frozenset[str]]:
    """For each serving region with a rule, the versions (of `origins`) it accepts. A
    region absent from the result accepts every version."""
    return {
        region: frozenset(version for version, origin in origins.items() if accepts(rule, origin))
        for region, rule in residency.items()
    }


def refusal(
    region: str, rule: ResidencyRule | None, version: str, origin: DataOrigin | None
) -> str:
    """Why `region` does not accept `version`, in a line (for answers and `promote`)."""
    if rule is None:
        return f"{version}: accepted in {region} (no residency rule)"
    if origin is None or not origin.regions:
        return f"{version}: no lineage recorded (residency.{region} needs its data regions)"
    if not origin.complete:
        return f"{version}: learned from people of no known region"
    refused = [
        r
        for r in sorted(origin.regions)
        if r not in rule.data_regions
        and not (r in rule.cleared_for_transfer and r in origin.cleared)
    ]
    return f"{version}: trained on {','.join(refused)} data, not accepted by residency.{region}"
