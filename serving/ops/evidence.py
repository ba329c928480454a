"""Off-policy evidence for routing decisions: the promotion gate and shadow figures.

`rankgate model promote V --canary N | --stable` consults the gate when the serve
config asks for it (`promotion.require_evaluation`, serving/contract/config.py): V's click
rate is estimated off-policy against stable's on the same logged decisions, from
the project's logs (rankgate.yaml `interactions` with position and propensity
columns) or from rankgate's own audit log joined with outcomes
(serving/ops/audit_evidence.py). V passes when

- its importance weights' effective sample size is at least
  `min_effective_sample_size`, and
- the lower bound of the (betting) confidence interval of (V - stable) is at least
  `min_lift` x stable's estimate.

Otherwise the promotion is refused with the figures; `--force` overrides it, and
the audit of routing changes keeps what was overridden and the figures.

`rankgate model status` evaluates each shadow the same way on the audit log, so a
shadow shows its estimated click rate against stable, not only top-k agreement.
When stable ranks deterministically (no exploration) only the positions where the
shadow would have shown the same item carry weight: the estimate is then biased
towards stable's and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankgate.core.errors import RankgateError
from serving.contract.config import EvaluationRequirement

if TYPE_CHECKING:
    from model_store.evaluation import LogDecisions, LoggedDecision
    from model_store.offpolicy import Estimator
    from rankgate.ops.environment import Environment


@dataclass(frozen=True)
class Evidence:
    """One version against another on the same logged decisions."""

    version: str
    baseline: str
    source: str
    estimator: str
    value: float
    baseline_value: float
    low: float
    """Bounds of the interval of (version - baseline) at `confidence`."""
    high: float
    confidence: float
    effective_sample_size: float
    slots: int
    clicks: int
    weighted_clicks: int
    """Clicks on the slots the estimate weighs (the fewer of the two versions')."""
    verdict: str
    """better | worse | cannot tell"""
    deterministic_logs: bool
    """Every logged propensity is 1 (no exploration)."""
    logged_value: float = float("nan")
    """The logging policy's observed click rate on these slots."""
    logging_value: float = float("nan")
    """The estimator applied to the logging policy itself, and its interval: the
    sanity line (it should hold `logged_value`)."""
    logging_low: float = float("nan")
    logging_high: float = float("nan")
    in_sample: list[str] = field(default_factory=list)
    """Which of the two may have learned from these slots (model_store/lineage.py): a
    warning, not a refusal."""

    def lines(self) -> list[str]:
        lines = [
            (
                f"off-policy evidence ({self.source}, {self.estimator}, {self.slots} logged "
                f"slots with {self.clicks} clicks): {self.version} {self.value:.4f} vs "
                f"{self.baseline} {self.baseline_value:.4f}"
            ),
            (
                f"difference {self.value - self.baseline_value:+.4f}, "
                f"{self.confidence:.0%} betting interval [{self.low:+.4f}, {self.high:+.4f}], "
                f"effective sample size {self.effective_sample_size:.0f}, "
                f"{self.weighted_clicks} clicks weighed: {self.verdict}"
            ),
        ]
        if self.logging_low <= self.logged_value <= self.logging_high:
            check = "inside its interval"
        else:
            check = "OUTSIDE its interval: check the logged propensities"
        lines.append(
            f"the logging policy: observed click rate {self.logged_value:.4f}, {self.estimator} "
            f"{self.logging_value:.4f} [{self.logging_low:.4f}, {self.logging_high:.4f}] "
            f"on its own slots ({check})"
        )
        lines.extend(self.in_sample)
        if self.deterministic_logs:
            lines.append(
                f"the logged policy was deterministic: only positions where {self.version} "
                "shows what was shown carry weight, so the estimate leans toward "
                f"{self.baseline}'s (enable exploration for an unbiased one)"
            )
        return lines

    def failures(self, requirement: EvaluationRequirement) -> list[str]:
        """Why the version does not pass the gate (empty: it passes)."""
        failed = []
        setting = "promotion.require_evaluation"
        if self.effective_sample_size < requirement.min_effective_sample_size:
            failed.append(
                f"effective sample size {self.effective_sample_size:.0f} is below "
                f"{setting}.min_effective_sample_size {requirement.min_effective_sample_size:g}"
            )
        if self.weighted_clicks < requirement.min_clicks:
            failed.append(
                f"only {self.weighted_clicks} clicks fall where the estimate has weight, "
                f"below {setting}.min_clicks {requirement.min_clicks}"
            )
        floor = requirement.min_lift * self.baseline_value
        if self.low < floor:
            failed.append(
                f"the interval's lower bound {self.low:+.4f} is below {setting}.min_lift "
                f"{requirement.min_lift:+.1%} of {self.baseline} ({floor:+.4f})"
            )
        return failed

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def logged_decisions(
    env: Environment,
    versions: list[str],
    source: str,
    since: str = "7d",
    logs: Path | None = None,
) -> tuple[list[LoggedDecision] | LogDecisions, str]:
    """The logged decisions of `source` (logs or audit) with the inputs `versions`
    read, and a description of the source."""
    if source == "logs":
        from features.tables import load_catalogue
        from model_store.evaluation import decisions_from_logs, union_specs

        views = env.views()
        decisions = decisions_from_logs(
            env.project,
            views,
            env.data_dir,
            union_specs(env.models, versions),
            load_catalogue(env.project, views, env.data_dir),
            logs,
        )
        return decisions, f"logs {logs}" if logs else "the project's logs"
    from serving.observe.outcomes import project_outcomes
    from serving.ops.audit_evidence import read_audit_evidence

    outcomes = project_outcomes(env.project)
    if outcomes is None:
        raise RankgateError(
            f"{env.project.file}: field 'events.outcomes': the audit source needs outcome "
            "event types (impression, click) joined to decisions",
            422,
        )
    audit = read_audit_evidence(env.redis, env.home.namespace, outcomes, since)
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(audit.skipped.items()))
    described = f"audit since {since}: {audit.records} records" + (
        f" (not used: {skipped})" if skipped else ""
    )
    return audit.decisions, described


def gather(
    env: Environment,
    version: str,
    baseline: str,
    decisions: list[LoggedDecision] | LogDecisions,
    source: str,
    estimator: Estimator,
    confidence: float,
    *,
    min_effective_sample_size: float = 10.0,
    seed: int = 0,
    project_log: bool = False,
) -> Evidence:
    """`version` against `baseline` on `decisions` with one estimator; `project_log`:
    the decisions are the project's own interaction log (what `model train` learns
    from)."""
    from model_store.evaluation import decision_times, evaluate_versions
    from model_store.lineage import in_sample, time_span
    from model_store.logged import load_item_table

    result = evaluate_versions(
        env.models,
        load_item_table(env.project, env.views()),
        decisions,
        [version, baseline],
        confidence,
        seed,
        min_effective_sample_size,
    )
    comparison = result.compare(version, baseline, estimator)
    learned = in_sample(
        {v: env.models.manifest(v) for v in (version, baseline)},
        time_span(decision_times(decisions)),
        project_log,
    )
    return Evidence(
        version=version,
        baseline=baseline,
        source=source,
        estimator=estimator,
        value=comparison.a.value,
        baseline_value=comparison.b.value,
        low=comparison.low,
        high=comparison.high,
        confidence=confidence,
        effective_sample_size=comparison.a.effective_sample_size,
        slots=result.n,
        clicks=result.clicks,
        weighted_clicks=comparison.weighted_clicks,
        verdict=comparison.verdict,
        deterministic_logs=deterministic(decisions),
        logged_value=result.logged_value,
        logging_value=result.logging[estimator].value,
        logging_low=result.logging[estimator].low,
        logging_high=result.logging[estimator].high,
        in_sample=[line.strip() for line in learned.lines(advice=False)],
    )


def deterministic(decisions: list[LoggedDecision] | LogDecisions) -> bool:
    """Whether every logged propensity is 1 (a logging policy that never explored)."""
    from model_store.evaluation import LogDecisions

    if isinstance(decisions, LogDecisions):
        return bool((decisions.propensity[decisions.rows] == 1.0).all())
    return all(s.propensity == 1.0 for d in decisions for s in d.shown)
