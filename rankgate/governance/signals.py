"""Consent signals a request carries, and what the policy makes of them.

A request may carry a Global Privacy Control signal (`Sec-GPC: 1`) and an IAB TCF
v2 TC string. The policy says, per region, how each counts (`Region.gpc`,
`Region.tcf` in rankgate/governance/policy.py). A signal can only make a decision
more restrictive than the stored consent: the gate (serving/ranking/gate.py)
personalizes only when the stored record allows it and no counted signal objects.

`SignalEffect` is what the signals mean for one purpose in one region, reduced to
the facts that decide (never the raw string): the gate caches its decisions by it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from rankgate.governance.policy import Policy
from rankgate.governance.tcf import RestrictionType, TCString


class ConsentSource(StrEnum):
    """What decided a consent check (`policy.checks`, check `consent_source`)."""

    STORED = "stored"
    """The person's stored consent record (or its absence)."""
    LINKED_ID = "linked-id"
    """The stored record of an id linked to the person's."""
    GPC = "gpc"
    """A Global Privacy Control signal the region's policy counts as an objection."""
    TCF = "tcf"
    """A TC string that does not grant what the region's policy maps the purpose to."""


@dataclass(frozen=True)
class ConsentSignals:
    """What a request said about consent, besides the person's stored record."""

    gpc: bool = False
    """`Sec-GPC: 1` (or `consent.gpc: true` in the body)."""
    tcf: TCString | None = None
    tcf_field: str = "consent.tcf"
    """Where the TC string came from: the body's field or the header."""

    def __bool__(self) -> bool:
        return self.gpc or self.tcf is not None


@dataclass(frozen=True)
class TcfVerdict:
    """What a TC string grants for one purpose of one region's policy."""

    vendor_id: int
    required: tuple[int, ...]
    """The TCF purposes the policy maps the purpose to."""
    missing: tuple[int, ...]
    """Required TCF purposes the string does not grant consent for."""
    vendor_consent: bool
    """The string records consent for the operator's vendor id."""
    restricted: tuple[int, ...]
    """Required purposes the publisher does not allow the vendor on consent (not
    allowed, or legitimate interest only)."""
    vendor_list_version: int
    vendor_list_known: bool
    """False: the policy's `vendor_list_versions` do not include the string's."""
    tcf_policy_version: int
    cmp_id: int
    field: str
    """Where the string came from (consent.tcf, or the Rankgate-TCF header)."""

    @property
    def grants(self) -> bool:
        return not self.missing and self.vendor_consent and not self.restricted

    def describe(self) -> str:
        """What the string lacks (or that it grants), for the answer's checks."""
        needs = f"purposes {','.join(map(str, self.required))} and vendor {self.vendor_id}"
        if self.grants:
            return f"{needs}: granted"
        lacks = []
        if self.missing:
            lacks.append(f"no consent to purposes {','.join(map(str, self.missing))}")
        if not self.vendor_consent:
            lacks.append(f"no consent for vendor {self.vendor_id}")
        if self.restricted:
            lacks.append(f"publisher restricts purposes {','.join(map(str, self.restricted))}")
        return f"{needs}: {'; '.join(lacks)}"


NOT_COUNTED = "not_counted"


@dataclass(frozen=True)
class SignalEffect:
    """What a request's signals mean for one purpose in one region (hashable)."""

    gpc: str | None = None
    """None: no GPC signal; "objection": counted as one; "not_counted"."""
    tcf: TcfVerdict | str | None = None
    """None: no TC string; the verdict; or "not_counted" (the region's policy does not
    map the purpose to TCF purposes)."""

    @property
    def gpc_objects(self) -> bool:
        return self.gpc == "objection"

    @property
    def tcf_denies(self) -> bool:
        return isinstance(self.tcf, TcfVerdict) and not self.tcf.grants


def effect_of(
    policy: Policy, purpose: str, region: str, signals: ConsentSignals | None
) -> SignalEffect | None:
    """The signals' effect here (None: the request carries none)."""
    if signals is None or not signals:
        return None
    rules = policy.regions[region]
    gpc: str | None = None
    if signals.gpc:
        counted = rules.gpc is not None and purpose in rules.gpc.objects_to
        gpc = "objection" if counted else NOT_COUNTED
    tcf: TcfVerdict | str | None = None
    if signals.tcf is not None:
        mapped = rules.tcf.purposes.get(purpose) if rules.tcf is not None else None
        if rules.tcf is None or mapped is None:
            tcf = NOT_COUNTED
        else:
            tcf = verdict(signals.tcf, rules.tcf.vendor_id, mapped, signals.tcf_field)
            versions = rules.tcf.vendor_list_versions
            if versions is not None and not versions.known(tcf.vendor_list_version):
                tcf = replace(tcf, vendor_list_known=False)
    return SignalEffect(gpc, tcf)


def verdict(string: TCString, vendor_id: int, required: list[int], field: str) -> TcfVerdict:
    """What `string` grants the vendor for the required TCF purposes."""
    restricted = tuple(
        p
        for p in required
        if string.restricted(vendor_id, p)
        in (RestrictionType.NOT_ALLOWED, RestrictionType.REQUIRE_LEGITIMATE_INTEREST)
    )
    return TcfVerdict(
        vendor_id=vendor_id,
        required=tuple(required),
        missing=tuple(p for p in required if p not in string.purposes_consent),
        vendor_consent=vendor_id in string.vendor_consents,
        restricted=restricted,
        vendor_list_version=string.vendor_list_version,
        vendor_list_known=True,
        tcf_policy_version=string.tcf_policy_version,
        cmp_id=string.cmp_id,
        field=field,
    )
