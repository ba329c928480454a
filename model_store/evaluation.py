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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.offline import LogMatrix
from features.spec import FeatureSpec
from features.vector import ItemTable, build_matrix
from model_store.logged import LoggedRows
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
from rankgate.core.errors import ModelStoreError
from rankgate.core.project import ItemId, Project
from rankgate.core.topk import top_k

if TYPE_CHECKING:
    from features.applied import AppliedView

ROWS_PER_CALL = 20_000
"""Model rows scored per onnxruntime call."""
BLOCK_PAIRS = 2_000_000
"""(log row, item) pairs built at once: a streaming input is rebuilt from the log once
per block, and a block's matrix is BLOCK_PAIRS x inputs float32s."""


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
    at: float | None = None
    """When the decision was made (Unix time; None: unknown)."""


@dataclass
class LogDecisions:
    """Rows of an interaction log, each a decision of one shown position over the whole
    catalogue, scored a block of rows at a time through the log's builder
    (features/offline.py): what `decisions_from_logs` reads."""

    logged: LoggedRows
    catalogue: np.ndarray
    """What the target policy may rank: the whole catalogue, as the project's type."""
    rows: np.ndarray
    """The log rows evaluated on (all of them, or a sample)."""
    positions: np.ndarray
    propensity: np.ndarray
    reward: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, which: slice) -> LogDecisions:
        return replace(self, rows=self.rows[which])

    @property
    def times(self) -> np.ndarray | None:
        """The rows' times (int64 ns, UTC); None: the log has no time column."""
        times = self.logged.times
        return None if times is None else times[self.rows]

    def after(self, moment_ns: int) -> LogDecisions:
        """The rows whose time is after `moment_ns` (int64 ns, UTC)."""
        times = self.times
        if times is None:
            raise ModelStoreError(
                f"--holdout-after: {self.logged.project.file}: field "
                "'interactions.time_column': the log has no time column to compare with",
                422,
            )
        return replace(self, rows=self.rows[times > moment_ns])

    def sample(self, n: int, seed: int) -> LogDecisions:
        """`n` rows drawn at random without replacement (in log order)."""
        if n >= len(self.rows):
            return self
        picked = np.random.default_rng(seed).choice(len(self.rows), n, replace=False)
        return replace(self, rows=self.rows[np.sort(picked)])

    def matrix(
        self, specs: Sequence[FeatureSpec], items: ItemTable, rows: np.ndarray
    ) -> np.ndarray:
        """Model rows of every (log row, catalogue item) pair, row-major."""
        logged, n_items = self.logged, len(self.catalogue)
        query_rows = np.repeat(rows, n_items)
        query_items = np.tile(self.catalogue, len(rows))
        times = logged.times
        return LogMatrix(specs, logged.users, items).rows(
            logged.logs[logged.user_column].to_numpy()[query_rows],
            query_items,
            None if times is None else times[query_rows],
            {c: logged.logs[c].to_numpy()[query_rows] for c in logged.contexts},
            {
                col: logged.streamed(spec, query_rows, query_items)
                for col, spec in enumerate(specs)
                if spec.view in logged.streaming
            },
        )

    def decision(self, n: int, specs: Sequence[FeatureSpec], items: ItemTable) -> LoggedDecision:
        """Decision `n` as a LoggedDecision whose user values are the rows `matrix`
        reads (the reference form: `build_matrix` of it gives the same rows)."""
        row = int(self.rows[n])
        logged = self.logged
        user: dict[str, Any] = {}
        times = logged.times
        key = logged.logs[logged.user_column].to_numpy()[row : row + 1]
        for rows in logged.users.values():
            at = rows.positions(key, None if times is None else times[row : row + 1])[0]
            if at >= 0:
                user.update(rows.frame.iloc[int(at)].to_dict())
        for spec in specs:
            if spec.view in logged.streaming:
                every = np.full(len(self.catalogue), row)
                values = logged.streamed(spec, every, self.catalogue)
                if spec.per_item:
                    fields = [spec.field_for(i) for i in self.catalogue]
                    user.update(zip(fields, values.tolist(), strict=True))
                else:
                    user[spec.field] = float(values[0])
        context = {c: logged.logs[c].iloc[row] for c in logged.contexts}
        return LoggedDecision(
            user=user,
            context=context,
            candidates=self.catalogue.tolist(),
            shown=[
                Shown(
                    int(self.positions[row]),
                    logged.item_ids[row].item()
                    if hasattr(logged.item_ids[row], "item")
                    else logged.item_ids[row],
                    float(self.propensity[row]),
                    float(self.reward[row]),
                )
            ],
            group=row,
        )

    def slots(
        self, specs: Sequence[FeatureSpec], items: ItemTable, scorer: OnnxScorer
    ) -> LoggedSlots:
        """The estimators' slots of a version (its `specs` and `scorer`): its ranking of
        the catalogue for each row is `top_k`'s (best first, ties by item id)."""
        n_items = len(self.catalogue)
        ids = self.catalogue
        tie = ids if ids.dtype.kind in "iu" else pd.Index(ids).argsort().argsort()
        column = pd.Index(ids).get_indexer(self.logged.item_ids[self.rows])
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("t", "tq", "lq")}
        per_block = max(1, BLOCK_PAIRS // max(n_items, 1))
        for start in range(0, len(self.rows), per_block):
            block = self.rows[start : start + per_block]
            matrix = self.matrix(specs, items, block)
            scores = np.concatenate(
                [
                    scorer.score(matrix[at : at + ROWS_PER_CALL])
                    for at in range(0, len(matrix), ROWS_PER_CALL)
                ]
            ).astype(np.float64)
            scores = scores.reshape(len(block), n_items)
            order = np.lexsort((np.broadcast_to(tie, scores.shape), -scores), axis=-1)
            position = self.positions[block] - 1
            inside = position < n_items
            pick = order[np.arange(len(block)), np.minimum(position, n_items - 1)]
            mine = column[start : start + per_block]
            parts["t"].append((inside & (pick == mine)).astype(np.float64))
            parts["tq"].append(np.where(inside, scores[np.arange(len(block)), pick], 0.0))
            parts["lq"].append(
                np.where(mine >= 0, scores[np.arange(len(block)), np.maximum(mine, 0)], 0.0)
            )
        joined = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
        return LoggedSlots(
            reward=self.reward[self.rows],
            propensity=self.propensity[self.rows],
            target=joined["t"],
            target_q=joined["tq"],
            logged_q=joined["lq"],
            group=self.rows.astype(np.int64),
        )


def decisions_from_logs(
    project: Project,
    views: Sequence[AppliedView],
    data_dir: Path,
    specs: Sequence[FeatureSpec],
    catalogue: Sequence[ItemId],
    path: Path | None = None,
) -> LogDecisions:
    """Each row of the project's interaction log (or of `path`, with the same columns)
    as a decision of one shown position over the whole catalogue; the features are
    what `specs` read at the row's time, as training computes them."""
    spec = project.spec.interactions
    logged = LoggedRows.read(project, views, data_dir, specs, path, ("propensity_column",))
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
    ids = np.asarray(catalogue, dtype=np.int64 if project.spec.item.id_type == "int" else object)
    return LogDecisions(
        logged,
        ids,
        np.arange(len(logs)),
        positions,
        propensity,
        logs[spec.outcome_column].to_numpy(dtype=np.float64),
    )


def decision_times(decisions: Sequence[LoggedDecision] | LogDecisions) -> np.ndarray | None:
    """When each decision was made (int64 ns, UTC); None: not known for every one."""
    if isinstance(decisions, LogDecisions):
        return decisions.times
    if any(d.at is None for d in decisions):
        return None
    return np.rint(np.asarray([d.at for d in decisions], dtype=np.float64) * 1e9).astype(np.int64)


def decisions_after(
    decisions: list[LoggedDecision] | LogDecisions, moment_ns: int
) -> list[LoggedDecision] | LogDecisions:
    """The decisions made after `moment_ns` (int64 ns, UTC)."""
    if isinstance(decisions, LogDecisions):
        return decisions.after(moment_ns)
    return [d for d in decisions if d.at is not None and d.at * 1e9 > moment_ns]


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
    seed: int
    min_effective_sample_size: float
    logging: dict[Estimator, Estimate] = field(default_factory=dict)
    """The estimators applied to the logging policy itself (every weight 1): the
    sanity line of a report, whose intervals should hold `logged_value`."""
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
                self.seed,
                self.min_effective_sample_size,
            )
        return self.comparisons[key]


def evaluate_versions(
    models: ModelStore,
    items: ItemTable,
    decisions: Sequence[LoggedDecision] | LogDecisions,
    versions: Sequence[str],
    confidence: float = 0.95,
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
        slots[version] = (
            decisions.slots(manifest.specs, items, scorer)
            if isinstance(decisions, LogDecisions)
            else slots_for(decisions, manifest.specs, items, scorer)
        )
    first = next(iter(slots.values()))
    return Evaluation(
        slots=slots,
        estimates={v: estimate(s, ESTIMATORS, confidence, seed) for v, s in slots.items()},
        logged_value=on_policy_value(first),
        clicks=int(first.reward.sum()),
        confidence=confidence,
        seed=seed,
        min_effective_sample_size=min_effective_sample_size,
        logging=estimate(logging_policy(first), ESTIMATORS, confidence, seed),
    )


def union_specs(models: ModelStore, versions: Sequence[str]) -> list[FeatureSpec]:
    """Every input the versions read: a log's decisions carry all of them."""
    specs: dict[tuple[str | None, str], FeatureSpec] = {}
    for version in versions:
        for spec in models.manifest(version).specs:
            specs.setdefault((spec.view, spec.field), spec)
    return list(specs.values())
