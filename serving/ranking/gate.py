"""Policy/consent gate: may this person be personalized for this purpose, here?

The gate runs first and constrains everything after it: which feature views a
model may read, which items may be shown at all. It never reads features, and a
person it does not clear is never looked up in the feature store.

Rules (policies/policy.yaml):
- a purpose with `explicit_consent` needs a recorded "granted" consent;
- otherwise an opt-in region needs "granted", an opt-out region needs "no
  objection" (no record, or "granted");
- a consent store that cannot be read fails closed: no personalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from rankgate.core.project import ItemId
from rankgate.governance.consent import ConsentState
from rankgate.governance.policy import Policy
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
        # A decision is a function of its arguments and the policy: made once each.
        self.decisions: dict[tuple[str, str, ConsentState | None, str | None], GateDecision] = {}

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
    ) -> GateDecision:
        """`consent` None means the consent store could not be read (or, with
        `unread_because`, was not read)."""
        key = (purpose, region, consent, unread_because)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = self._decide(*key)
        return decision

    def _decide(
        self, purpose: str, region: str, consent: ConsentState | None, unread_because: str | None
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
        )
