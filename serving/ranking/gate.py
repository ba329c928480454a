"""Policy/consent gate: may this person be personalized for this purpose, here?

The gate runs first and constrains everything after it: which feature views a
model may read, which items may be shown at all. It never reads features, and a
person it does not clear is never looked up in the feature store.

Rules (policies/policy.yaml):
- a purpose with `explicit_consent` needs a recorded "granted" consent;
- otherwise an opt-in region needs "granted", an opt-out region needs "no
  objection" (no record, or "granted");
- a consent store that cannot be read fails closed: no personalization;
- the request's consent signals (a GPC signal, a TC string: rankgate/governance/signals.py)
  only restrict: a signal the region's policy counts for the purpose can turn a
  stored "allowed" into "not personalized", never the reverse.

The check `consent_source` names what decided: the stored record (`stored`, or
`linked-id` when the caller read a linked id's record), or the signal (`gpc`, `tcf`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from weakref import WeakKeyDictionary

from rankgate.core.project import ItemId
from rankgate.governance.consent import ConsentState
from rankgate.governance.policy import Policy
from rankgate.governance.signals import (
    NOT_COUNTED,
    ConsentSignals,
    ConsentSource,
    SignalEffect,
    TcfVerdict,
    effect_of,
)
from rankgate.governance.tcf import TCString
from serving.contract.reasons import FallbackReason
from serving.contract.schemas import PolicyBlock, PolicyCheck


@dataclass(frozen=True)
class GateDecision:
    personalize: bool
    reason: FallbackReason | None
    """Why not personalizing (no_consent, consent_unavailable, budget_exhausted)."""
    allowed_views: frozenset[str]
    excluded_items: frozenset[ItemId]
    checks: list[PolicyCheck] = field(default_factory=list)
    policy_version: str = ""
    source: ConsentSource = ConsentSource.STORED
    """What decided the consent check."""
    signals: SignalEffect | None = None
    """What the request's consent signals meant here (None: it carried none)."""

    @cached_property
    def block(self) -> PolicyBlock:
        """The answer's policy block (one per decision: answers share it, nobody edits it)."""
        return PolicyBlock(
            decision="personalize" if self.personalize else "non_personalized",
            version=self.policy_version,
            checks=self.checks,
        )


class ConsentGate:
    """Plain decision logic; the consent state is read by the caller (async Redis)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # A decision is a function of its arguments and the policy: made once each
        # (signals by their effect, never the raw string: the keys stay few).
        self.decisions: dict[DecisionKey, GateDecision] = {}
        # The signals' effect per purpose and region, per decoded string while it is
        # alive (decodings are shared and cached, bounded: rankgate/governance/tcf.py).
        self.effects: dict[EffectKey, SignalEffect | None] = {}
        self.tcf_effects: WeakKeyDictionary[TCString, dict[EffectKey, SignalEffect | None]] = (
            WeakKeyDictionary()
        )

    def unread(self, purpose: str, region: str, why: str) -> GateDecision:
        """Consent was not read (the request's budget was spent before the gate ran):
        not personalized, the item rules still apply."""
        return self.decide(purpose, region, None, unread_because=why)

    def decide(
        self,
        purpose: str,
        region: str,
        consent: ConsentState | None,
        unread_because: str | None = None,
        signals: ConsentSignals | None = None,
        stored_source: str = "stored",
    ) -> GateDecision:
        """`consent` None means the consent store could not be read (or, with
        `unread_because`, was not read). `stored_source` names where the stored
        record came from (`stored`, or `linked-id` for a linked id's record)."""
        effect = self.effect(purpose, region, signals) if signals else None
        key = (purpose, region, consent, unread_because, effect, stored_source)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = self._decide(*key)
        return decision

    def effect(self, purpose: str, region: str, signals: ConsentSignals) -> SignalEffect | None:
        key = (purpose, region, signals.gpc, signals.tcf_field)
        known = self.effects
        if signals.tcf is not None:
            known = self.tcf_effects.get(signals.tcf) or self.tcf_effects.setdefault(
                signals.tcf, {}
            )
        if key not in known:
            known[key] = effect_of(self.policy, purpose, region, signals)
        return known[key]

    def _decide(
        self,
        purpose: str,
        region: str,
        consent: ConsentState | None,
        unread_because: str | None,
        effect: SignalEffect | None,
        stored_source: str,
    ) -> GateDecision:
        rules = self.policy.purposes[purpose]
        regime = self.policy.regions[region].regime
        excluded = self.policy.excluded_items(purpose, region)
        needs_grant = rules.explicit_consent or regime == "opt_in"
        requirement = "explicit consent" if rules.explicit_consent else f"{regime} region"
        checks = [
            PolicyCheck(check="purpose", result=purpose),
            PolicyCheck(check="region", result=f"{region}:{regime}"),
        ]
        reason: FallbackReason | None
        if unread_because is not None:
            allowed, reason = False, FallbackReason.BUDGET_EXHAUSTED
            checks.append(PolicyCheck(check="consent", result="not_read", detail=unread_because))
        elif consent is None:
            allowed, reason = False, FallbackReason.CONSENT_UNAVAILABLE
            checks.append(PolicyCheck(check="consent", result="unavailable", detail="fails closed"))
        else:
            allowed = consent == ConsentState.GRANTED or (
                not needs_grant and consent == ConsentState.UNKNOWN
            )
            reason = None if allowed else FallbackReason.NO_CONSENT
            checks.append(
                PolicyCheck(
                    check="consent",
                    result=consent.value,
                    detail=f"{requirement}: {'satisfied' if allowed else 'not satisfied'}",
                )
            )
        source = ConsentSource(stored_source)
        if effect is not None:
            checks += signal_checks(effect, purpose, region)
            if allowed and effect.gpc_objects:
                allowed, reason, source = False, FallbackReason.GPC_OBJECTION, ConsentSource.GPC
            elif allowed and effect.tcf_denies:
                allowed, reason, source = False, FallbackReason.TCF_NO_CONSENT, ConsentSource.TCF
        checks.append(PolicyCheck(check="consent_source", result=source.value))
        if excluded:
            checks.append(
                PolicyCheck(
                    check="item_rules",
                    result=f"{len(excluded)} items excluded",
                    detail=",".join(str(i) for i in sorted(excluded)),
                )
            )
        return GateDecision(
            personalize=allowed,
            reason=reason,
            allowed_views=frozenset(rules.feature_views) if allowed else frozenset(),
            excluded_items=excluded,
            checks=checks,
            policy_version=self.policy.version,
            source=source,
            signals=effect,
        )


EffectKey = tuple[str, str, bool, str]
DecisionKey = tuple[str, str, ConsentState | None, str | None, SignalEffect | None, str]


def signal_checks(effect: SignalEffect, purpose: str, region: str) -> list[PolicyCheck]:
    """The answer's checks of the request's signals."""
    checks = []
    if effect.gpc is not None:
        detail = (
            f"regions.{region}.gpc objects to {purpose}"
            if effect.gpc_objects
            else f"the policy does not count GPC for {purpose} in {region}"
        )
        checks.append(PolicyCheck(check="gpc", result=effect.gpc, detail=detail))
    tcf = effect.tcf
    if tcf == NOT_COUNTED:
        detail = f"the policy maps no TCF purposes to {purpose} in {region}"
        checks.append(PolicyCheck(check="tcf", result=NOT_COUNTED, detail=detail))
    elif isinstance(tcf, TcfVerdict):
        result = "granted" if tcf.grants else "not_granted"
        checks.append(PolicyCheck(check="tcf", result=result, detail=tcf.describe()))
        if not tcf.vendor_list_known:
            detail = (
                f"{tcf.vendor_list_version} is not among regions.{region}.tcf.vendor_list_versions"
            )
            checks.append(PolicyCheck(check="tcf_vendor_list", result="unknown", detail=detail))
    return checks
