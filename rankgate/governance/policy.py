"""Typed form of the policy files in policies/ (the files are data, owned by privacy)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from rankgate.core.config_files import Strict, load_yaml_model, parse_yaml_model, read_config_bytes
from rankgate.core.errors import ConfigError
from rankgate.core.project import ItemId
from rankgate.core.settings import get_project
from rankgate.governance.approval import ApprovalRules
from rankgate.governance.residency import Residency, unknown_regions
from rankgate.governance.retention import RetentionRules


def policy_dir() -> Path:
    """The policies folder of the project being served."""
    return get_project().policies


TcfPurposeId = Annotated[int, Field(ge=1, le=24)]
"""A TCF purpose (v2.2 defines 1..11; the string has room for 24)."""


class GpcRule(Strict):
    """How a `Sec-GPC: 1` signal counts in a region: as an objection to these purposes."""

    objects_to: list[str] = Field(min_length=1)
    """Purposes of this policy a GPC signal objects to: not personalized for them,
    whatever the stored consent says."""


class VendorListVersions(Strict):
    """The Global Vendor List versions the operator has reviewed its declarations in."""

    min: int = Field(ge=1)
    max: int | None = Field(None, ge=1)
    """None: any later version."""

    def known(self, version: int) -> bool:
        return version >= self.min and (self.max is None or version <= self.max)


class TcfRule(Strict):
    """How an IAB TCF v2 TC string counts in a region (decoded: rankgate/governance/tcf.py)."""

    vendor_id: int = Field(ge=1, le=65535)
    """The operator's vendor id in the IAB Global Vendor List: the string must record
    consent for it."""
    purposes: dict[str, Annotated[list[TcfPurposeId], Field(min_length=1)]] = Field(min_length=1)
    """Purpose of this policy -> the TCF purposes the string must grant consent for
    (content personalization: 1, 5, 6; ads: 1, 3, 4). A purpose not listed is not
    decided by the string."""
    vendor_list_versions: VendorListVersions | None = None
    """A string of another vendor list version is still applied, and the answer's
    policy checks say that its version is unknown (None: every version is known)."""


class Region(Strict):
    regime: Literal["opt_in", "opt_out"]
    """opt_in: personalize only with granted consent; opt_out: unless the person objected."""
    description: str = ""
    gpc: GpcRule | None = None
    """How a Global Privacy Control signal counts here (None: not at all)."""
    tcf: TcfRule | None = None
    """How a TCF TC string counts here (None: not at all)."""


class EpsilonGreedy(Strict):
    """With probability `epsilon` an answer is k of the allowed items drawn uniformly
    at random, in random order; otherwise the model's top k."""

    method: Literal["epsilon_greedy"]
    epsilon: float = Field(gt=0, le=1)


class PlackettLuce(Strict):
    """Items are drawn one position at a time, each with probability proportional to
    exp(z / temperature), where z is the item's score standardized over the allowed
    items; no item moves more than `max_shift` places from its model rank."""

    method: Literal["plackett_luce"]
    temperature: float = Field(gt=0)
    """In standard deviations of the scores: small keeps the model's order, large
    shuffles within the cap."""
    max_shift: int = Field(2, ge=1, le=4)
    """How far an item may move up or down from its model rank. The cap also keeps
    the exact propensity computation small (it grows as C(2 x max_shift, max_shift))."""


Exploration = Annotated[EpsilonGreedy | PlackettLuce, Field(discriminator="method")]


class Purpose(Strict):
    description: str = ""
    explicit_consent: bool
    """True: a recorded "granted" consent is needed in every region."""
    feature_views: list[str] = Field(min_length=1)
    """Feast views a model may read for this purpose."""
    exploration: Exploration | None = None
    """How answers for this purpose may depart from the model's order to learn what
    it ranks low, with the propensity of each shown item logged (off when absent).
    Only people the gate clears are ever explored on."""


class ItemRule(Strict):
    name: str
    description: str = ""
    items: list[ItemId] = Field(min_length=1)
    """Catalogue item ids (of the project's id type)."""
    purposes: list[str] | None = None
    """Purposes the rule applies to (None: all)."""
    regions: list[str] | None = None
    """Regions the rule applies to (None: all)."""


class IdentityRules(Strict):
    """How ids of one person are linked (`POST /v1/identify`; docs/privacy.md)."""

    max_ids: int = Field(1000, ge=2, le=100_000)
    """Ids one person may have, their own included: a link past it is refused."""
    link_known_ids: bool = False
    """Whether a link may join two people who have each signed in (two user ids):
    refused unless this is true (a shared device is not one person)."""
    consent_on_link: Literal["most_restrictive", "latest"] = "most_restrictive"
    """When linked ids hold different decisions for a purpose: `most_restrictive`,
    a denial wins over a grant whatever their times; `latest`, the later decision
    wins. Either way a decision recorded after the link is the person's newest."""


class Policy(Strict):
    version: str = Field(min_length=1)
    regions: dict[str, Region] = Field(min_length=1)
    residency: Residency = Field(default_factory=dict)
    """Per serving region, the data regions a model that answers it may have learned
    from (rankgate/governance/residency.py); a region without a rule accepts any version."""
    purposes: dict[str, Purpose] = Field(min_length=1)
    item_rules: list[ItemRule] = Field(default_factory=list)
    identity: IdentityRules = Field(default_factory=IdentityRules)
    approvals: ApprovalRules = Field(default_factory=ApprovalRules)
    """Purposes whose versions need an approval before `model promote` gives them traffic."""
    retention: RetentionRules = Field(default_factory=RetentionRules)
    """How long each kind of record lives, in days (rankgate/governance/retention.py);
    a kind not stated is kept as long as the serving config's count caps allow."""

    @model_validator(mode="after")
    def _signals_name_known_purposes(self) -> Policy:
        for name, region in self.regions.items():
            for purpose in region.gpc.objects_to if region.gpc else []:
                if purpose not in self.purposes:
                    raise ValueError(f"regions.{name}.gpc.objects_to: unknown purpose {purpose!r}")
            for purpose in region.tcf.purposes if region.tcf else {}:
                if purpose not in self.purposes:
                    raise ValueError(f"regions.{name}.tcf.purposes: unknown purpose {purpose!r}")
        return self

    @model_validator(mode="after")
    def _rules_name_known_things(self) -> Policy:
        for index, rule in enumerate(self.item_rules):
            for purpose in rule.purposes or []:
                if purpose not in self.purposes:
                    raise ValueError(f"item_rules.{index}.purposes: unknown purpose {purpose!r}")
            for region in rule.regions or []:
                if region not in self.regions:
                    raise ValueError(f"item_rules.{index}.regions: unknown region {region!r}")
        for purpose in self.approvals.purposes:
            if purpose not in self.purposes:
                raise ValueError(f"approvals.purposes: unknown purpose {purpose!r}")
        problems = unknown_regions(self.residency, self.regions)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def excluded_items(self, purpose: str, region: str) -> frozenset[ItemId]:
        excluded: set[ItemId] = set()
        for rule in self.item_rules:
            if rule.purposes is not None and purpose not in rule.purposes:
                continue
            if rule.regions is not None and region not in rule.regions:
                continue
            excluded.update(rule.items)
        return frozenset(excluded)


class Boost(Strict):
    name: str
    items: list[ItemId] = Field(min_length=1)
    """Catalogue item ids whose fallback score is multiplied by `factor`."""
    factor: float = Field(gt=0)


class FallbackRules(Strict):
    version: str = Field(min_length=1)
    strategy: Literal["popularity", "static"] = "popularity"
    """popularity: smoothed outcome rate per item over the project's interaction log;
    static: the order of `ranking`, then the rest of the catalogue by item id."""
    prior_clicks: float = Field(1.0, ge=0)
    prior_impressions: float = Field(250.0, gt=0)
    ranking: list[ItemId] = Field(default_factory=list)
    """The static ranking, best first (strategy static)."""
    boosts: list[Boost] = Field(default_factory=list)

    @model_validator(mode="after")
    def _static_has_ranking(self) -> FallbackRules:
        if self.strategy == "static" and not self.ranking:
            raise ValueError("ranking: strategy static needs the ranking (item ids, best first)")
        return self


def load_policy(path: Path | None = None) -> Policy:
    return load_yaml_model(path or policy_dir() / "policy.yaml", Policy)


def check_items(
    named: list[tuple[Path, str, list[ItemId]]],
    catalogue: Collection[ItemId],
    item_type: type[int | str],
) -> None:
    """ConfigError (file and field) for the first rule that names an item of the wrong
    type or one the catalogue lacks."""
    known = catalogue if isinstance(catalogue, (set, frozenset)) else set(catalogue)
    for path, field, items in named:
        wrong = [i for i in items if type(i) is not item_type]
        if wrong:
            kind = "integers" if item_type is int else "strings"
            raise ConfigError(
                f"{path}: field {field!r}: item ids of this catalogue are {kind}; "
                f"{wrong[0]!r} is not"
            )
        unknown = [i for i in items if i not in known]
        if unknown:
            raise ConfigError(
                f"{path}: field {field!r}: not in the catalogue: "
                + ", ".join(repr(i) for i in unknown[:5])
            )


@dataclass(frozen=True)
class PolicySet:
    """The policy files of one folder, validated together, and their digest."""

    folder: Path
    policy: Policy
    fallback: FallbackRules
    digest: str
    """sha256 over the files' bytes: `rankgate policy deploy` stamps it into the
    serving config, so replicas serve exactly the files that were checked."""


def load_policy_set(
    folder: Path | None = None,
    catalogue: Collection[ItemId] | None = None,
    item_type: type[int | str] | None = None,
) -> PolicySet:
    """Read and validate policy.yaml and fallback.yaml; ConfigError names file and field.
    With the catalogue, item rules and boosts must name its items, of its type."""
    folder = (folder or policy_dir()).resolve()
    # Each file is read once: the digest is of exactly the bytes that were validated.
    policy_bytes = read_config_bytes(folder / "policy.yaml")
    fallback_bytes = read_config_bytes(folder / "fallback.yaml")
    policy = parse_yaml_model(policy_bytes, folder / "policy.yaml", Policy)
    fallback = parse_yaml_model(fallback_bytes, folder / "fallback.yaml", FallbackRules)
    digest = hashlib.sha256(policy_bytes + b"\0" + fallback_bytes).hexdigest()[:16]
    if catalogue is not None:
        named = [
            (folder / "policy.yaml", f"item_rules.{n}.items", rule.items)
            for n, rule in enumerate(policy.item_rules)
        ] + [
            (folder / "fallback.yaml", f"boosts.{n}.items", boost.items)
            for n, boost in enumerate(fallback.boosts)
        ]
        named.append((folder / "fallback.yaml", "ranking", fallback.ranking))
        check_items(named, catalogue, item_type or int)
    return PolicySet(folder, policy, fallback, digest)
