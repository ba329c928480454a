"""A model version's ranking policy evaluated on logged decisions.

A `LoggedDecision` is what a decision looked like to a model (the feature values
it read, the request context, the candidates it could rank) and what happened at
each shown position whose outcome is known (`Shown`: item, the logging policy's
propensity, reward). Two sources make them: the project's interaction log
(`decisions_from_logs`: each row is one shown position, its candidates the whole
catalogue) and rankgate's own audit log joined with outcomes
(serving/ops/audit_evidence.py).

`slots_for` scores each decision's candidates with a version (through the one
feature builder, `features.vector.build_matrix`, and onnxruntime, many decisions
per call), takes the version's deterministic ranking (`topk.top_k`: best first,
ties by item id) and fills the estimators' slots (model_store/offpolicy.py):
target = 1 where the version puts the logged item at the logged position, the
reward model is the version's own scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from features.spec import FeatureSpec
from features.vector import ItemTable, build_matrix
from model_store.manifest import ONNX_FILE
from model_store.offpolicy import (
    ESTIMATORS,
    Comparison,
    Estimate,
    Estimator,
    LoggedSlots,
    compare,
    estimate,
    logging_policy,
    on_policy_value,
)
from model_store.onnx_scoring import OnnxScorer
from model_store.store import ModelStore
from model_store.train import LoggedRows
from rankgate.core.errors import ModelStoreError
from rankgate.core.project import ItemId, Project
from rankgate.core.topk import top_k

if TYPE_CHECKING:
    from feast import FeatureView

ROWS_PER_CALL = 20_000
"""Model rows scored per onnxruntime call."""


@dataclass(frozen=True)
class Shown:
    position: int
    """1-based."""
    item_id: ItemId
    propensity: float
    reward: float


@dataclass
class LoggedDecision:
    user: Mapping[str, Any]
    """Feast field name -> the value the decision saw."""
    context: Mapping[str, Any]
    candidates: Sequence[ItemId]
    """What the target policy may rank (the project's logs: the whole catalogue)."""
    shown: list[Shown]
    group: int | str
    """The decision's id: its positions are resampled together."""


def decisions_from_logs(
    project: Project,
    views: Sequence[FeatureView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
    catalogue: Sequence[ItemId],
    path: Path | None = None,
) -> list[LoggedDecision]:
    """Each row of the project's interaction log (or of `path`, with the same columns)
    as a decision of one shown position over the whole catalogue; the features are
    what `specs` read at the row's time, as training computes them."""
    spec = project.spec.interactions
    logged = LoggedRows.read(
        project, views, data_dir, specs, path, ("propensity_column",), every_item=catalogue
    )
    assert spec is not None and spec.propensity_column is not None
    logs = logged.logs
    propensity = logs[spec.propensity_column].to_numpy(dtype=np.float64)
    bad = ~(propensity > 0)
    if bad.any():
        raise ModelStoreError(
            f"{project.file}: field 'interactions.propensity_column': column "
            f"{spec.propensity_column!r} has {int(bad.sum())} rows without a probability "
            "above 0 (off-policy evaluation divides by it)",
            422,
        )
    positions = (
        logs[spec.position_column].to_numpy(dtype=np.int64)
        if spec.position_column
        else np.ones(len(logs), dtype=np.int64)
    )
    if spec.position_column and (positions < 1).any():
        raise ModelStoreError(
            f"{project.file}: field 'interactions.position_column': positions start at 1", 422
        )
    rewards = logs[spec.outcome_column].to_numpy(dtype=np.float64)
    keys = logs[logged.user_column].to_numpy()
    return [
        LoggedDecision(
            user=logged.user(row, keys[row]),
            context=logged.context(row),
            candidates=catalogue,
            shown=[
                Shown(
                    int(positions[row]),
                    logged.item_ids[row],
                    float(propensity[row]),
                    float(rewards[row]),
                )
            ],
            group=row,
        )
        for row in range(len(logs))
    ]


def slots_for(
    decisions: Sequence[LoggedDecision],
    specs: Sequence[FeatureSpec],
    items: ItemTable,
    scorer: OnnxScorer,
) -> LoggedSlots:
    """The estimators' slots of the version (its `specs` and `scorer`) on `decisions`."""
    rows: dict[str, list[float]] = {k: [] for k in ("r", "p", "t", "tq", "lq", "g")}
    for chunk in _chunks(decisions):
        matrices = [build_matrix(specs, d.user, items, d.candidates, d.context) for d in chunk]
        scores = scorer.score(np.concatenate(matrices)) if matrices else np.zeros(0)
        start = 0
        for decision in chunk:
            mine = scores[start : start + len(decision.candidates)]
            start += len(decision.candidates)
            depth = max(s.position for s in decision.shown)
            ranked = top_k(decision.candidates, mine, depth)
            score_of = {c: float(v) for c, v in zip(decision.candidates, mine, strict=True)}
            for shown in decision.shown:
                pick = ranked[shown.position - 1] if shown.position <= len(ranked) else None
                rows["r"].append(shown.reward)
                rows["p"].append(shown.propensity)
                rows["t"].append(float(pick is not None and pick.item_id == shown.item_id))
                rows["tq"].append(pick.score if pick is not None else 0.0)
                rows["lq"].append(score_of.get(shown.item_id, 0.0))
                rows["g"].append(hash(decision.group))
    return LoggedSlots(
        reward=np.asarray(rows["r"]),
        propensity=np.asarray(rows["p"]),
        target=np.asarray(rows["t"]),
        target_q=np.asarray(rows["tq"]),
        logged_q=np.asarray(rows["lq"]),
        group=np.asarray(rows["g"], dtype=np.int64),
    )


def _chunks(decisions: Sequence[LoggedDecision]) -> list[Sequence[LoggedDecision]]:
    chunks, start, rows = [], 0, 0
    for end, decision in enumerate(decisions, 1):
        rows += len(decision.candidates)
        if rows >= ROWS_PER_CALL:
            chunks.append(decisions[start:end])
            start, rows = end, 0
    if start < len(decisions):
        chunks.append(decisions[start:])
    return chunks


@dataclass
class Evaluation:
    """Versions evaluated on the same logged decisions."""

    slots: dict[str, LoggedSlots]
    estimates: dict[str, dict[Estimator, Estimate]]
    logged_value: float
    """The logging policy's own click rate on these slots."""
    clicks: int
    confidence: float
    draws: int
    seed: int
    min_effective_sample_size: float
    comparisons: dict[tuple[str, str, Estimator], Comparison] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(next(iter(self.slots.values())).reward)

    def compare(self, a: str, b: str | None, estimator: Estimator) -> Comparison:
        """`a` against version `b`, or against the logging policy (b None)."""
        key = (a, b or "", estimator)
        if key not in self.comparisons:
            self.comparisons[key] = compare(
                self.slots[a],
                self.slots[b] if b is not None else logging_policy(self.slots[a]),
                estimator,
                self.confidence,
                self.draws,
                self.seed,
                self.min_effective_sample_size,
            )
        return self.comparisons[key]


def evaluate_versions(
    models: ModelStore,
    items: ItemTable,
    decisions: Sequence[LoggedDecision],
    versions: Sequence[str],
    confidence: float = 0.95,
    draws: int = 1000,
    seed: int = 0,
    min_effective_sample_size: float = 10.0,
) -> Evaluation:
    """Each version's slots and estimates (IPS, SNIPS, DR) on the same decisions."""
    if not decisions:
        raise ModelStoreError("no logged decisions with known outcomes to evaluate on", 422)
    slots = {}
    for version in dict.fromkeys(versions):
        manifest = models.manifest(version)
        scorer = OnnxScorer(models.path(version) / ONNX_FILE, manifest.onnx.output_name)
        slots[version] = slots_for(decisions, manifest.specs, items, scorer)
    first = next(iter(slots.values()))
    return Evaluation(
        slots=slots,
        estimates={v: estimate(s, ESTIMATORS, confidence, draws, seed) for v, s in slots.items()},
        logged_value=on_policy_value(first),
        clicks=int(first.reward.sum()),
        confidence=confidence,
        draws=draws,
        seed=seed,
        min_effective_sample_size=min_effective_sample_size,
    )


def union_specs(models: ModelStore, versions: Sequence[str]) -> list[FeatureSpec]:
    """Every input the versions read: a log's decisions carry all of them."""
    specs: dict[tuple[str | None, str], FeatureSpec] = {}
    for version in versions:
        for spec in models.manifest(version).specs:
            specs.setdefault((spec.view, spec.field), spec)
    return list(specs.values())
