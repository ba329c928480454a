"""What the promotion report shows, gathered from what rankgate keeps (no recomputing).

Every source is an aggregate whose size does not grow with traffic: the off-policy
evaluation is `rankgate model evaluate`'s own (rankgate/ops/evaluation.py, on the
project's log or the audit log, as that command reads them), the outcome counters are
one hash per version and variant (serving/observe/outcomes.py), the drift history is a
capped stream per version (serving/observe/drift_figures.py), the lineage from the
manifest as written (so fields added to it later appear without a change here), and
the approvals from the version's approvals file (model_store/approvals.py). A source that has nothing, or fails, leaves its section with
the reason instead of figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from model_store.approvals import Approval
from model_store.manifest import MANIFEST_FILE
from rankgate.core.errors import RankgateError
from rankgate.ops.environment import Environment
from rankgate.ops.evaluation import EvaluationRequest, OffPolicyReport, evaluate
from serving.observe.drift_figures import DriftFigures, read_drift, read_history
from serving.observe.outcomes import OutcomeTotals, outcome_keys, read_outcomes


@dataclass(frozen=True)
class ReportRequest:
    """What `rankgate model report` was asked."""

    version: str
    against: str | None = None
    """The version compared with (None: the logging policy, as `model evaluate`)."""
    audit: bool = False
    """Evaluate off-policy on rankgate's audit log joined with outcomes, not the project's log."""
    since: str = "7d"
    """With `audit`: how far back."""
    confidence: float = 0.95
    slots: int | None = None
    """Evaluate on this many logged slots drawn at random; None: all."""
    seed: int = 0


@dataclass(frozen=True)
class OffPolicySection:
    report: OffPolicyReport | None
    missing: str | None = None
    """Why there is no evaluation (None: there is one)."""


@dataclass(frozen=True)
class OutcomeSection:
    totals: list[OutcomeTotals]
    """Each counter hash of the versions reported on (version, variant)."""
    confidence: float

    @property
    def impressions(self) -> int:
        return sum(t.impressions for t in self.totals)

    @property
    def clicks(self) -> int:
        return sum(t.clicks for t in self.totals)


@dataclass(frozen=True)
class DriftSection:
    history: dict[str, list[DriftFigures]]
    """Version -> its drift history, oldest first."""
    latest: dict[str, DriftFigures | None]
    """Version -> the figures a replica wrote last (None: none within the window)."""

    @property
    def points(self) -> int:
        return sum(len(h) for h in self.history.values())


@dataclass(frozen=True)
class Provenance:
    """The manifest's own sections, as written (JSON values)."""

    manifest_path: str
    created_at: str
    lineage: dict[str, Any] | None
    approvals: list[dict[str, Any]] | None
    training_data: dict[str, Any] | None
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class ReportData:
    request: ReportRequest
    project: str
    namespace: str
    generated_at: float
    offpolicy: OffPolicySection
    outcomes: OutcomeSection
    drift: DriftSection
    provenance: dict[str, Provenance] = field(default_factory=dict)

    @property
    def versions(self) -> list[str]:
        against = self.request.against
        return [self.request.version] + ([against] if against else [])


def gather(request: ReportRequest) -> ReportData:
    """Everything the page shows; RankgateError (404) for an unknown version."""
    env = Environment.open()
    versions = [request.version] + ([request.against] if request.against else [])
    for name in versions:
        if not env.models.exists(name):
            raise RankgateError(f"no model version {name!r} in this home", 404)
    namespace = env.home.namespace
    return ReportData(
        request=request,
        project=env.project.spec.name,
        namespace=namespace,
        generated_at=time.time(),
        offpolicy=offpolicy_section(request),
        outcomes=OutcomeSection(
            [
                read_outcomes(env.redis, namespace, version, variant)
                for version, variant in outcome_keys(env.redis, namespace)
                if version in versions
            ],
            request.confidence,
        ),
        drift=DriftSection(
            {v: read_history(env.redis, namespace, v) for v in versions},
            {v: read_drift(env.redis, namespace, v) for v in versions},
        ),
        provenance={v: provenance(env, v) for v in versions},
    )


def offpolicy_section(request: ReportRequest) -> OffPolicySection:
    """`rankgate model evaluate VERSION --against V` as that command computes it; the
    reason it could not, when it could not (a log without propensities, no outcomes)."""
    try:
        report = evaluate(
            EvaluationRequest(
                version=request.version,
                against=request.against,
                logs_path=None,
                audit=request.audit,
                since=request.since,
                confidence=request.confidence,
                seed=request.seed,
                slots=request.slots,
            )
        )
    except RankgateError as exc:
        return OffPolicySection(None, exc.message)
    if report.result.n == 0:
        return OffPolicySection(None, f"{report.source}: no logged slot to evaluate on")
    return OffPolicySection(report)


def approval_row(approval: Approval) -> dict[str, Any]:
    """One approval (model_store/approvals.py) as the report's table shows it: who,
    when, for what, and the evidence and drift flags they saw, in brief."""
    evidence, drift = approval.evidence, approval.drift
    if "unavailable" in evidence:
        seen = f"unavailable: {evidence['unavailable']}"
    else:
        seen = (
            f"{evidence.get('estimator', '?')} {evidence.get('value', float('nan')):.4f} vs "
            f"{evidence.get('baseline', '?')} {evidence.get('baseline_value', float('nan')):.4f}; "
            f"difference [{evidence.get('low', float('nan')):.4f}, "
            f"{evidence.get('high', float('nan')):.4f}] at {evidence.get('confidence', 0):.0%}, "
            f"{evidence.get('verdict', '?')}"
        )
    flags = (
        f"unavailable: {drift['unavailable']}"
        if "unavailable" in drift
        else ", ".join(drift.get("flags", [])) or "none"
    )
    return {
        "purpose": approval.purpose,
        "by": approval.by,
        "at": approval.at.isoformat(timespec="seconds"),
        "policy": approval.policy_version,
        "off-policy estimate seen": seen,
        "drift flags seen": flags,
        "note": approval.note,
    }


def provenance(env: Environment, version: str) -> Provenance:
    """The manifest's sections read as JSON, not through the Manifest model, so that a
    field added to the lineage is shown as it is; the approvals from the version's
    approvals file."""
    path = env.models.path(version) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RankgateError(f"{path}: cannot be read ({exc})") from exc

    def section(name: str) -> Any:
        value = raw.get(name)
        return value if isinstance(value, dict) else None

    return Provenance(
        manifest_path=str(path),
        created_at=str(raw.get("created_at", "")),
        lineage=section("lineage"),
        approvals=[approval_row(a) for a in env.models.approvals(version).read()],
        training_data=section("training_data"),
        metrics=section("metrics"),
    )
