"""`rankgate model evaluate`: a version's click rate estimated off-policy.

From logged decisions with propensities (the project's interaction log, another
log file, or rankgate's own audit log joined with outcomes): IPS, self-normalized
IPS and doubly robust, each with a betting confidence interval (valid however
few the clicks; model_store/offpolicy.py) and the effective sample size, and a verdict against another version or the logging policy. The
estimators, pandas and onnxruntime are imported when an evaluation runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankgate.core.errors import RankgateError
from rankgate.ops.environment import Environment

if TYPE_CHECKING:
    from model_store.evaluation import Evaluation, LogDecisions, LoggedDecision
    from model_store.lineage import InSample


@dataclass(frozen=True)
class OffPolicyReport:
    """An evaluation of `version` against `baseline` (None: the logging policy)."""

    version: str
    baseline: str | None
    source: str
    confidence: float
    result: Evaluation
    in_sample: InSample
    """The versions whose training window overlaps the slots (or is unknown)."""

    @property
    def against(self) -> str:
        return self.baseline or "the logging policy"

    def figures(self) -> dict[str, Any]:
        from model_store.offpolicy import ESTIMATORS, METHOD

        result = self.result
        return {
            "source": self.source,
            "slots": result.n,
            "clicks": result.clicks,
            "logged_click_rate": result.logged_value,
            "in_sample": self.in_sample.figures(),
            "logging_policy": {name: e.__dict__ for name, e in result.logging.items()},
            "confidence": self.confidence,
            "interval_method": METHOD,
            "versions": {
                v: {name: e.__dict__ for name, e in found.items()}
                for v, found in result.estimates.items()
            },
            "against": self.against,
            "comparisons": {
                name: {
                    "difference": c.difference,
                    "low": c.low,
                    "high": c.high,
                    "verdict": c.verdict,
                    "weighted_clicks": c.weighted_clicks,
                }
                for name in ESTIMATORS
                for c in [result.compare(self.version, self.baseline, name)]
            },
        }

    def lines(self) -> list[str]:
        from model_store.offpolicy import ESTIMATORS, METHOD

        result = self.result
        lines = [
            (
                f"{self.source}: {result.n} logged slots, {result.clicks} clicks; the logging "
                f"policy's click rate {result.logged_value:.4f}"
            )
        ]
        if result.clicks < 100:
            lines.append(
                f"  with {result.clicks} clicks the intervals are wide: read them, not the estimates"
            )
        lines.extend(self.in_sample.lines())
        lines.append(
            f"{'version':<12} {'estimator':<9} {'estimate':>9}  {self.confidence:.0%} "
            f"interval ({METHOD})  effective n"
        )
        rows = [*result.estimates.items(), ("logging", result.logging)]
        for v, found in rows:
            for name, e in found.items():
                lines.append(
                    f"{v:<12} {name:<9} {e.value:>9.4f}  [{e.low:.4f}, {e.high:.4f}]{'':<4} "
                    f"{e.effective_sample_size:>9.0f}"
                )
        outside = [
            n for n, e in result.logging.items() if not e.low <= result.logged_value <= e.high
        ]
        lines.append(
            f"  logging: the estimators applied to the logging policy itself; its observed "
            f"click rate {result.logged_value:.4f} "
            + (
                f"falls outside {', '.join(outside)}'s interval: check the propensities"
                if outside
                else "is inside every interval"
            )
        )
        for name in ESTIMATORS:
            c = result.compare(self.version, self.baseline, name)
            verdict = "cannot tell with this much data" if c.verdict == "cannot tell" else c.verdict
            lines.append(
                f"{name}: {self.version} - {self.against} = {c.difference:+.4f} "
                f"[{c.low:+.4f}, {c.high:+.4f}], {c.weighted_clicks} clicks weighed: {verdict}"
            )
        return lines


@dataclass(frozen=True)
class EvaluationRequest:
    """What `rankgate model evaluate` was asked: which version, against what, on which logs."""

    version: str
    against: str | None
    """Compare with this version (None: the logs' own policy)."""
    logs_path: Path | None
    """A log file with the columns rankgate.yaml `interactions` declares (None: the project's)."""
    audit: bool
    """Evaluate on rankgate's audit log joined with outcomes instead."""
    since: str
    """With `audit`: how far back."""
    confidence: float
    seed: int
    """Draws the --slots sample and the order the intervals take the decisions in."""
    slots: int | None = None
    """Evaluate on this many logged slots drawn at random (seeded); None: all."""
    holdout_after: str | None = None
    """Evaluate only on slots decided after this ISO 8601 time; None: all."""


def evaluate(request: EvaluationRequest) -> OffPolicyReport:
    """Estimate the version's click rate off-policy, and against `request.against` (or the
    logs' policy)."""
    from model_store.evaluation import decision_times, evaluate_versions
    from model_store.lineage import in_sample, time_span
    from model_store.logged import load_item_table
    from serving.ops.evidence import logged_decisions

    version, audit, logs_path = request.version, request.audit, request.logs_path
    if audit and logs_path is not None:
        raise RankgateError("choose one of --logs FILE and --audit")
    after = holdout_time(request.holdout_after)
    env = Environment.open()
    baseline = request.against if request.against and request.against != version else None
    versions = [version] + ([baseline] if baseline else [])
    for name in versions:
        if not env.models.exists(name):
            raise RankgateError(f"no model version {name!r} in this home", 404)
    decisions, source = logged_decisions(
        env, versions, "audit" if audit else "logs", request.since, logs_path
    )
    if after is not None:
        decisions, source = holdout(decisions, after, source)
    if request.slots is not None and request.slots < len(decisions):
        decisions = sample_decisions(decisions, request.slots, request.seed)
        source += f", {request.slots} slots drawn at random (seed {request.seed})"
    result = evaluate_versions(
        env.models,
        load_item_table(env.project, env.views()),
        decisions,
        versions,
        request.confidence,
        request.seed,
    )
    learned = in_sample(
        {v: env.models.manifest(v) for v in versions},
        time_span(decision_times(decisions)),
        project_log=not audit and logs_path is None,
    )
    return OffPolicyReport(version, baseline, source, request.confidence, result, learned)


def holdout_time(text: str | None) -> datetime | None:
    """`--holdout-after`'s time, checked before any log is read."""
    from model_store.lineage import parse_instant

    return None if text is None else parse_instant(text, "--holdout-after")


def holdout(
    decisions: list[LoggedDecision] | LogDecisions, after: datetime, source: str
) -> tuple[list[LoggedDecision] | LogDecisions, str]:
    """The decisions made after `after`; RankgateError when none are."""
    from model_store.evaluation import decision_times, decisions_after
    from model_store.lineage import from_nanoseconds, time_span, to_nanoseconds
    from model_store.manifest import shown_time

    kept = decisions_after(decisions, to_nanoseconds(after))
    if decisions and not kept:
        span = time_span(decision_times(decisions))
        last = f" (the last is at {shown_time(from_nanoseconds(span[1]))})" if span else ""
        raise RankgateError(
            f"--holdout-after {shown_time(after)}: no logged slot is after it{last}", 422
        )
    return kept, f"{source} after {shown_time(after)}"


def sample_decisions(
    decisions: list[LoggedDecision] | LogDecisions, n: int, seed: int
) -> list[LoggedDecision] | LogDecisions:
    """`n` of the decisions, drawn at random without replacement, in their order."""
    import numpy as np

    from model_store.evaluation import LogDecisions

    if isinstance(decisions, LogDecisions):
        return decisions.sample(n, seed)
    picked = np.sort(np.random.default_rng(seed).choice(len(decisions), n, replace=False))
    return [decisions[int(i)] for i in picked]
