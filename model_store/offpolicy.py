"""Off-policy estimators of a ranking policy's click rate, on numpy and scipy.

The data is a set of logged slots: one per (decision, position) whose outcome is
known, with the item the logging policy showed there, the probability with which
it chose that item for that position (its propensity), and the reward (clicked).
A target policy (a model version's ranking) is evaluated position by position:
for each slot, the probability `target` that it would have put the logged item
at that position, and the reward model's predictions `target_q` (the expected
reward of what the target would show there) and `logged_q` (of the logged item).

With weights w = target / propensity:
- IPS (inverse propensity scoring): mean(w r). Unbiased when every item the
  target shows had a positive logging propensity; high variance.
- SNIPS (self-normalized): sum(w r) / sum(w). A little bias, much less variance.
- DR (doubly robust): mean(target_q + w (r - logged_q)). Unbiased if either the
  propensities or the reward model are right; the reward model here is the
  version's own scores.

Intervals are percentile bootstrap intervals that resample decisions (a
decision's slots go together). The effective sample size (sum w)^2 / sum w^2 says
how many logged slots the estimate really rests on: a deterministic ranking
evaluated on uniformly random logs of 80 items keeps about one slot in 80.
`compare` resamples the same decisions for two target policies, so the interval
of their difference is paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Estimator = Literal["ips", "snips", "dr"]
ESTIMATORS: tuple[Estimator, ...] = ("ips", "snips", "dr")
Verdict = Literal["better", "worse", "cannot tell"]
MIN_CLICKS = 5
"""Fewer clicks on the slots an estimate weighs is no evidence: its resamples are
mostly click-free and its interval collapses toward [0, 0]."""
CHUNK = 64
"""Bootstrap draws computed at once (bounds the resampling matrix's memory)."""


@dataclass(frozen=True)
class LoggedSlots:
    """One row per logged (decision, position) whose outcome is known."""

    reward: np.ndarray
    propensity: np.ndarray
    """The logging policy's probability of the logged item at that position (> 0)."""
    target: np.ndarray
    """The target policy's probability of the logged item at that position."""
    target_q: np.ndarray
    """sum over items a of target(a) x qhat(a): the direct-method term."""
    logged_q: np.ndarray
    """qhat of the logged item."""
    group: np.ndarray | None = None
    """The decision of each slot: the bootstrap resamples decisions (None: each slot
    is its own decision)."""

    def __post_init__(self) -> None:
        n = len(self.reward)
        for name in ("propensity", "target", "target_q", "logged_q"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: {len(getattr(self, name))} values for {n} slots")
        if n and float(np.min(self.propensity)) <= 0:
            raise ValueError("propensity: every logged propensity must be above 0")

    @property
    def weights(self) -> np.ndarray:
        return np.asarray(self.target / self.propensity, dtype=np.float64)

    @property
    def weighted_clicks(self) -> int:
        """Rewarded slots the target policy gives weight: with none, every resample is
        click-free and its interval collapses to [0, 0], which is no evidence."""
        return int(((self.weights > 0) & (np.asarray(self.reward) > 0)).sum())

    @property
    def effective_sample_size(self) -> float:
        w = self.weights
        total = float((w * w).sum())
        return float(w.sum()) ** 2 / total if total > 0 else 0.0


@dataclass(frozen=True)
class Estimate:
    estimator: Estimator
    value: float
    low: float
    high: float
    confidence: float
    effective_sample_size: float
    n: int
    """Logged slots used."""


@dataclass(frozen=True)
class Comparison:
    estimator: Estimator
    a: Estimate
    b: Estimate
    difference: float
    """a - b."""
    low: float
    high: float
    verdict: Verdict
    weighted_clicks: int
    """The fewer of a's and b's clicks on slots they give weight (see `min_clicks`)."""


def _terms(slots: LoggedSlots) -> dict[str, np.ndarray]:
    """Per-slot terms whose sums (over a resample) give every estimator."""
    w = slots.weights
    r = np.asarray(slots.reward, dtype=np.float64)
    q = np.clip(np.asarray(slots.logged_q, dtype=np.float64), 0.0, 1.0)
    tq = np.clip(np.asarray(slots.target_q, dtype=np.float64), 0.0, 1.0)
    return {"wr": w * r, "w": w, "dr": tq + w * (r - q), "n": np.ones_like(w)}


def _values(sums: dict[str, np.ndarray], estimator: Estimator) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        if estimator == "ips":
            value = sums["wr"] / sums["n"]
        elif estimator == "snips":
            value = np.where(sums["w"] > 0, sums["wr"] / sums["w"], 0.0)
        else:
            value = sums["dr"] / sums["n"]
    return np.asarray(value, dtype=np.float64)


def _grouped(slots: LoggedSlots) -> tuple[dict[str, np.ndarray], int]:
    """The terms summed per decision, and the number of decisions."""
    terms = _terms(slots)
    if slots.group is None:
        return terms, len(slots.reward)
    _, index = np.unique(slots.group, return_inverse=True)
    groups = int(index.max()) + 1 if len(index) else 0
    return {k: np.bincount(index, weights=v, minlength=groups) for k, v in terms.items()}, groups


def _resampled(
    grouped: list[dict[str, np.ndarray]], groups: int, draws: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """For each slot set, its term sums over `draws` bootstrap resamples of the decisions
    (the same resamples for every set)."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, list[np.ndarray]]] = [{k: [] for k in g} for g in grouped]
    done = 0
    while done < draws:
        size = min(CHUNK, draws - done)
        counts = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=size).astype(
            np.float64
        )
        for sums, into in zip(grouped, out, strict=True):
            for key, values in sums.items():
                into[key].append(counts @ values)
        done += size
    return [{k: np.concatenate(v) for k, v in into.items()} for into in out]


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def estimate(
    slots: LoggedSlots,
    estimators: tuple[Estimator, ...] = ESTIMATORS,
    confidence: float = 0.95,
    draws: int = 1000,
    seed: int = 0,
) -> dict[Estimator, Estimate]:
    """Each estimator's value with its bootstrap interval."""
    if len(slots.reward) == 0:
        raise ValueError("no logged slots to evaluate")
    grouped, groups = _grouped(slots)
    (boot,) = _resampled([grouped], groups, draws, seed)
    full = {k: np.asarray([v.sum()]) for k, v in grouped.items()}
    ess = slots.effective_sample_size
    return {
        name: Estimate(
            name,
            float(_values(full, name)[0]),
            *_interval(_values(boot, name), confidence),
            confidence,
            ess,
            len(slots.reward),
        )
        for name in estimators
    }


def on_policy_value(slots: LoggedSlots) -> float:
    """The logging policy's own click rate: the mean reward of the logs."""
    return float(np.mean(slots.reward)) if len(slots.reward) else 0.0


def compare(
    a: LoggedSlots,
    b: LoggedSlots,
    estimator: Estimator = "snips",
    confidence: float = 0.95,
    draws: int = 1000,
    seed: int = 0,
    min_effective_sample_size: float = 10.0,
    min_clicks: int = MIN_CLICKS,
) -> Comparison:
    """Target policy a against b on the same logged slots (same rows, same order):
    the difference a - b with a paired bootstrap interval, and a verdict. With fewer
    effective samples than `min_effective_sample_size`, or fewer clicks than
    `min_clicks` on the slots it weighs, on either side, the verdict is always
    "cannot tell"."""
    if len(a.reward) != len(b.reward) or not np.array_equal(a.reward, b.reward):
        raise ValueError("compare needs both policies evaluated on the same logged slots")
    (ga, groups), (gb, _) = _grouped(a), _grouped(b)
    boot_a, boot_b = _resampled([ga, gb], groups, draws, seed)
    diffs = _values(boot_a, estimator) - _values(boot_b, estimator)
    low, high = _interval(diffs, confidence)
    ea = estimate(a, (estimator,), confidence, draws, seed)[estimator]
    eb = estimate(b, (estimator,), confidence, draws, seed)[estimator]
    clicks = min(a.weighted_clicks, b.weighted_clicks)
    enough = (
        min(ea.effective_sample_size, eb.effective_sample_size) >= min_effective_sample_size
        and clicks >= min_clicks
    )
    verdict: Verdict = (
        "better" if enough and low > 0 else "worse" if enough and high < 0 else "cannot tell"
    )
    return Comparison(estimator, ea, eb, ea.value - eb.value, low, high, verdict, clicks)


def logging_policy(slots: LoggedSlots) -> LoggedSlots:
    """The logging policy itself as a target on its own slots (every weight 1): what a
    version is compared with when no other version is named."""
    return LoggedSlots(
        reward=slots.reward,
        propensity=slots.propensity,
        target=slots.propensity,
        target_q=slots.logged_q,
        logged_q=slots.logged_q,
        group=slots.group,
    )
