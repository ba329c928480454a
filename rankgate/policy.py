"""Typed form of the policy files in policies/ (the files are data, owned by privacy)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rankgate.config_files import Strict, load_yaml_model, parse_yaml_model, read_config_bytes
from rankgate.settings import PROJECT_ROOT

POLICY_DIR = PROJECT_ROOT / "policies"


class Region(Strict):
    regime: Literal["opt_in", "opt_out"]
    """opt_in: personalize only with granted consent; opt_out: unless the person objected."""
    description: str = ""


class Purpose(Strict):
    description: str = ""
    explicit_consent: bool
    """True: a recorded "granted" consent is needed in every region."""
    feature_views: list[str] = Field(min_length=1)
    """Feast views a model may read for this purpose."""


class ItemRule(Strict):
    name: str
    description: str = ""
    items: list[int] = Field(min_length=1)
    purposes: list[str] | None = None
    """Purposes the rule applies to (None: all)."""
    regions: list[str] | None = None
    """Regions the rule applies to (None: all)."""


class Policy(Strict):
    version: str = Field(min_length=1)
    regions: dict[str, Region] = Field(min_length=1)
    purposes: dict[str, Purpose] = Field(min_length=1)
    item_rules: list[ItemRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules_name_known_things(self) -> Policy:
        for index, rule in enumerate(self.item_rules):
            for purpose in rule.purposes or []:
                if purpose not in self.purposes:
                    raise ValueError(f"item_rules.{index}.purposes: unknown purpose {purpose!r}")
            for region in rule.regions or []:
                if region not in self.regions:
                    raise ValueError(f"item_rules.{index}.regions: unknown region {region!r}")
        return self

    def excluded_items(self, purpose: str, region: str) -> frozenset[int]:
        excluded: set[int] = set()
        for rule in self.item_rules:
            if rule.purposes is not None and purpose not in rule.purposes:
                continue
            if rule.regions is not None and region not in rule.regions:
                continue
            excluded.update(rule.items)
        return frozenset(excluded)


class Boost(Strict):
    name: str
    items: list[int] = Field(min_length=1)
    factor: float = Field(gt=0)


class FallbackRules(Strict):
    version: str = Field(min_length=1)
    strategy: Literal["popularity"] = "popularity"
    prior_clicks: float = Field(1.0, ge=0)
    prior_impressions: float = Field(250.0, gt=0)
    boosts: list[Boost] = Field(default_factory=list)


def load_policy(path: Path | None = None) -> Policy:
    return load_yaml_model(path or POLICY_DIR / "policy.yaml", Policy)


def load_fallback_rules(path: Path | None = None) -> FallbackRules:
    return load_yaml_model(path or POLICY_DIR / "fallback.yaml", FallbackRules)


@dataclass(frozen=True)
class PolicySet:
    """The policy files of one folder, validated together, and their digest."""

    folder: Path
    policy: Policy
    fallback: FallbackRules
    digest: str
    """sha256 over the files' bytes: `rankgate policy deploy` stamps it into the
    serving config, so replicas serve exactly the files that were checked."""


def load_policy_set(folder: Path | None = None) -> PolicySet:
    """Read and validate policy.yaml and fallback.yaml; ConfigError names file and field."""
    folder = (folder or POLICY_DIR).resolve()
    # Each file is read once: the digest is of exactly the bytes that were validated.
    policy_bytes = read_config_bytes(folder / "policy.yaml")
    fallback_bytes = read_config_bytes(folder / "fallback.yaml")
    policy = parse_yaml_model(policy_bytes, folder / "policy.yaml", Policy)
    fallback = parse_yaml_model(fallback_bytes, folder / "fallback.yaml", FallbackRules)
    digest = hashlib.sha256(policy_bytes + b"\0" + fallback_bytes).hexdigest()[:16]
    return PolicySet(folder, policy, fallback, digest)
