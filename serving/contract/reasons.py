"""Why an answer is the rule-based fallback: one vocabulary for the whole project.

The values are the public strings of `fallback.reason`. Each reason is either a
decision (the policy, a person the feature store does not know, a routing that
has no model for the purpose, or none whose training data the region accepts) or says that the answer is *degraded*: a
dependency failed or was too slow (the consent store, the feature store or its
freshness, the model, the budget). Metrics, the load test's fallback-rate SLO,
the canary's rollback rules and the tests count degraded answers by
`FallbackReason.degraded`; the canary's error rate counts `model_fault`.
"""

from __future__ import annotations

from enum import StrEnum


class FallbackReason(StrEnum):
    # Decisions: the answer is what the policy, the person or the routing calls for.
    NO_CONSENT = "no_consent"
    """The policy does not allow personalizing this person for this purpose here."""
    GPC_OBJECTION = "gpc_objection"
    """The request's Global Privacy Control signal, which the region's policy counts
    as an objection to this purpose."""
    TCF_NO_CONSENT = "tcf_no_consent"
    """The request's TC string does not grant the TCF purposes the region's policy
    maps this purpose to, or consent for the operator's vendor id."""
    NO_PERMITTED_MODEL = "no_permitted_model"
    """No routed model reads only feature views the purpose permits."""
    RESIDENCY = "residency"
    """Routed models the purpose permits exist, but the request's region accepts none
    of their training data's lineage (policy.yaml `residency`)."""
    FEATURES_MISSING = "features_missing"
    """The person is unknown to the feature store (a new user)."""

    # Degraded: a dependency failed or was too slow.
    CONSENT_UNAVAILABLE = "consent_unavailable"
    """The consent store could not be read in time: fail closed."""
    FEATURES_STALE = "features_stale"
    """A feature row is older than its view's TTL."""
    FEATURE_TIMEOUT = "feature_timeout"
    """The online store was too slow for the budget."""
    FEATURE_ERROR = "feature_error"
    """The online store failed."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The budget ran out (in the queues, or before the ranker answered)."""
    MODEL_UNAVAILABLE = "model_unavailable"
    """The chosen version could not be loaded."""
    MODEL_ERROR = "model_error"
    """onnxruntime failed on the request."""
    RETRIEVAL_UNAVAILABLE = "retrieval_unavailable"
    """A request without candidates over a large catalogue, and the version has no
    item index to retrieve from (or its search failed)."""

    @property
    def degraded(self) -> bool:
        """A dependency failed or was too slow; False for a decision."""
        return self not in DECISIONS

    @property
    def model_fault(self) -> bool:
        """The routed model version failed: an error in the canary's window."""
        return self in MODEL_FAULTS


DECISIONS = frozenset(
    {
        FallbackReason.NO_CONSENT,
        FallbackReason.GPC_OBJECTION,
        FallbackReason.TCF_NO_CONSENT,
        FallbackReason.NO_PERMITTED_MODEL,
        FallbackReason.RESIDENCY,
        FallbackReason.FEATURES_MISSING,
    }
)
MODEL_FAULTS = frozenset({FallbackReason.MODEL_UNAVAILABLE, FallbackReason.MODEL_ERROR})
DEGRADED = frozenset(reason for reason in FallbackReason if reason.degraded)
"""The reasons of degraded answers, for callers that hold the reason as a string."""
