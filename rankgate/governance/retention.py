"""Retention by time: how long each kind of record rankgate keeps lives (policy.yaml).

    retention:
      decision_audit: 365      # days; fractions allowed (0.5: twelve hours)
      events: 90
      ...

The rules are data owned by privacy, like the rest of the policy; the serving
application enforces them (serving/observe/retention.py: a periodic job on one
replica at a time) and `rankgate privacy retention` reports each kind's oldest
record against its limit. A kind not stated is kept as long as the count caps of
the serving config allow (`audit.max_records`, `events.max_stream_len`) or its
own expiry says (`events.decision_ttl_s`, `drift.window_s`): stating a kind only
ever shortens how long its records live, and the caps stay as a safety net.

Where each kind lives, and what its age is measured by, is `KIND_DOCS` (the
report and docs/privacy.md print it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator

from rankgate.core.config_files import Strict

RecordKind = Literal[
    "decision_audit",
    "events",
    "outcomes",
    "decision_index",
    "consent_history",
    "sampled_explanations",
    "drift_windows",
]
KINDS: tuple[RecordKind, ...] = get_args(RecordKind)
DAY_S = 86_400.0

Days = Annotated[float, Field(gt=0, le=36_500, allow_inf_nan=False)]
"""A positive number of days (at most a century); 0 or less is refused at load."""

KIND_DOCS: dict[RecordKind, str] = {
    "decision_audit": "the audit stream `<ns>:audit`, by the time each record was written",
    "events": "the event stream `<ns>:events` (outcome events and id links included), "
    "by the time each event was accepted",
    "outcomes": "the outcome counters `<ns>:outcomes:<version>:<variant>`, by the time "
    "their latest outcome was counted",
    "decision_index": "the decision hashes `<ns>:decision:<request_id>` (with the "
    "outcomes joined to them), by the decision's time",
    "consent_history": "the records of consent imports `<ns>:consent_import:<digest>`, by "
    "the time the import finished (a person's current consent decisions are never "
    "removed by age)",
    "sampled_explanations": "audit records carrying a sampled explanation, by the time "
    "they were written (the record goes with its explanation)",
    "drift_windows": "the drift figures `<ns>:drift:<version>`, by the time they were computed, "
    "and the entries of the drift history `<ns>:drift_history:<version>`",
}


class RetentionRules(Strict):
    """How long each kind of record lives, in days (absent: see the module)."""

    decision_audit: Days | None = None
    """Decision audit records (what was answered, to whom, by which model, why)."""
    events: Days | None = None
    """Accepted events. The consumer applies an event within seconds: a limit far below
    the time streaming features count back (their half-lives) changes nothing for
    serving, but training on the stream sees only what is left."""
    outcomes: Days | None = None
    """A version and variant's outcome counters, once no outcome has been counted for
    them for this long (a version retired long ago)."""
    decision_index: Days | None = None
    """Decisions waiting for their outcomes; they also expire after
    `events.decision_ttl_s` of the serving config, whichever comes first."""
    consent_history: Days | None = None
    """Finished consent imports' records (importing the same file after they are gone
    writes it again, which later-wins makes harmless)."""
    sampled_explanations: Days | None = None
    """Sampled explanations (SHAP contributions of a uniform sample of decisions). An
    explanation is part of its decision's audit record, which cannot be changed in
    place: the record goes with it. Longer than `decision_audit` changes nothing."""
    drift_windows: Days | None = None
    """Drift figures of a version; while a version serves they are rewritten every
    `drift.refresh_s` and expire after `drift.window_s`, so this removes those of
    versions that stopped serving."""

    @field_validator(*KINDS, mode="before")
    @classmethod
    def _stated_with_days(cls, days: Any) -> Any:
        """`events:` with no value is a mistake, not "keep forever" (leave it out)."""
        if days is None:
            raise ValueError("no number of days (leave the kind out to keep its records)")
        return days

    def limit_s(self, kind: RecordKind) -> float | None:
        """The kind's limit in seconds; None: not stated (kept, capped by count)."""
        days: float | None = getattr(self, kind)
        return None if days is None else days * DAY_S

    def stated(self) -> dict[RecordKind, float]:
        """Kind -> limit in seconds, for the kinds the policy states."""
        return {kind: s for kind in KINDS if (s := self.limit_s(kind)) is not None}
