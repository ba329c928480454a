"""Off-policy estimators of a ranking policy's click rate, with betting intervals.

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

Intervals are betting confidence intervals (Waudby-Smith & Ramdas, "Estimating
means of bounded random variables by betting", JRSS-B 2024), not bootstrap ones:
a percentile bootstrap collapses to [0, 0] when no click falls where the target
has weight and under-covers when few do, which is the common case at marketing
click rates. Each estimator is a linear test of a candidate value m: per
decision, y(m) = a - m b, whose mean is zero exactly at the true value because a
slot's weights average 1 under the logging policy (IPS: a = sum w r, b = slots;
SNIPS: a = sum w r, b = sum w; DR: a = sum of DR terms, b = slots). Two gamblers
bet that the mean of y(m) is above zero and below it, each with a predictable
fraction of its wealth (the predictable plug-in empirical-Bernstein bet, truncated
so that no decision can take more than `TRUNCATION` of it); m is rejected when
either one's wealth ever reaches 2 / alpha, and by Ville's inequality the values
never rejected form a (1 - alpha) interval for any sample size. The largest
possible |y| comes from the log itself: the weights of every decision are known
whether or not it was clicked, so the range a decision's y(m) can take is its
value with no reward and with every reward. Decisions are taken in a seeded random
order (the interval is valid for any order fixed in advance).

The effective sample size (sum w)^2 / sum w^2 says how many logged slots the
estimate really rests on: a deterministic ranking evaluated on uniformly random
logs of 80 items keeps about one slot in 80. `compare` tests the paired
difference of two target policies on the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Estimator = Literal["ips", "snips", "dr"]
ESTIMATORS: tuple[Estimator, ...] = ("ips", "snips", "dr")
Verdict = Literal["better", "worse", "cannot tell"]
METHOD = "betting"
"""How the intervals are made (see the module's docstring); reports name it."""
MIN_CLICKS = 5
"""Fewer clicks on the slots an estimate weighs is weak evidence however the
interval is made: the promotion gate's default floor (`min_clicks`)."""
TRUNCATION = 0.75
"""The largest share of a gambler's wealth one decision can put at risk."""
CHUNK = 1 << 20
"""Decisions a wealth process is computed over at once (bounds memory at 10^7)."""
SEARCH_STEPS = 12
"""Bisection steps for each end of an interval, on the log of its distance from the
estimate (over six decades: each end is within 0.4 % of its exact place, outward)."""


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
    """The decision of each slot: the decisions are the independent units (None: each
    slot is its own decision)."""

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
        """Rewarded slots the target policy gives weight."""
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
    method: str = METHOD


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


@dataclass(frozen=True)
class _Test:
    """Per decision: y(m) = a - m b, and the least and greatest a its slots could give
    whatever their rewards (a is linear in them: `const + coef x reward`)."""

    a: np.ndarray
    b: np.ndarray
    a_low: np.ndarray
    a_high: np.ndarray
    clicks: np.ndarray
    slots: np.ndarray

    @classmethod
    def of(
        cls,
        coef: np.ndarray,
        const: np.ndarray,
        b: np.ndarray,
        reward: np.ndarray,
        group: np.ndarray | None,
        seed: int,
    ) -> _Test:
        per_slot = {
            "a": const + coef * reward,
            "b": b,
            "a_low": const + np.minimum(coef, 0.0),
            "a_high": const + np.maximum(coef, 0.0),
            "clicks": reward,
            "slots": np.ones_like(reward),
        }
        if group is not None:
            _, index = np.unique(group, return_inverse=True)
            units = int(index.max()) + 1 if len(index) else 0
            per_slot = {
                k: np.bincount(index, weights=v, minlength=units) for k, v in per_slot.items()
            }
        order = np.random.default_rng(seed).permutation(len(per_slot["a"]))
        return cls(**{k: np.asarray(v, dtype=np.float64)[order] for k, v in per_slot.items()})

    @property
    def point(self) -> float:
        total = float(self.b.sum())
        return float(self.a.sum()) / total if total > 0 else math.nan

    def rejects(self, m: float, threshold: float) -> bool:
        """Whether either gambler's wealth against value m ever reaches e^threshold.

        The bet is the predictable plug-in sqrt(2 threshold / (n variance)), with the
        variance of y(m) estimated from the decisions before. Until the first click
        every y(m) of a value test looks alike and that estimate is near zero, which
        would bet everything on the clicks never coming; so the variance is never
        taken below what clicks at rate p would give decisions of the ranges seen so
        far, p(1 - p) mean(range^2), with p the larger of |m| and the click rate
        so far."""
        n = len(self.a)
        lowest = float(np.min(self.a_low - m * self.b))
        highest = float(np.max(self.a_high - m * self.b))
        if lowest >= 0.0 and highest <= 0.0:
            return False  # y(m) is 0 whatever happens: the data cannot speak to m
        cap_up = TRUNCATION / max(-lowest, 1e-12)
        cap_down = TRUNCATION / max(highest, 1e-12)
        first = (highest - lowest) ** 2
        # Running sums before each decision: y, y^2, range^2, clicks, slots.
        sums = np.zeros(5)
        wealth = np.zeros(2)  # log wealth of the gambler betting up and down
        for start in range(0, n, CHUNK):
            part = slice(start, start + CHUNK)
            y = self.a[part] - m * self.b[part]
            spans = (self.a_high[part] - self.a_low[part]) ** 2
            seen = np.arange(start, start + len(y), dtype=np.float64)
            before = [
                total + np.concatenate(([0.0], np.cumsum(v[:-1])))
                for total, v in zip(
                    sums, (y, y * y, spans, self.clicks[part], self.slots[part]), strict=True
                )
            ]
            s1, s2, s_span, s_clicks, s_slots = before
            count = np.maximum(seen, 1.0)
            empirical = np.maximum(s2 - s1 * s1 / count, 0.0) / count
            rate = np.minimum(np.maximum(abs(m), s_clicks / np.maximum(s_slots, 1.0)), 0.5)
            span = (first + s_span) / (seen + 1.0)
            variance = np.maximum(np.maximum(empirical, rate * (1.0 - rate) * span), 1e-18)
            bet = np.sqrt(2.0 * threshold / (n * variance))
            up = wealth[0] + np.cumsum(np.log1p(np.minimum(bet, cap_up) * y))
            down = wealth[1] + np.cumsum(np.log1p(-np.minimum(bet, cap_down) * y))
            if up.max() >= threshold or down.max() >= threshold:
                return True
            sums += [
                y.sum(),
                (y * y).sum(),
                spans.sum(),
                self.clicks[part].sum(),
                self.slots[part].sum(),
            ]
            wealth[:] = (up[-1], down[-1])
        return False

    def interval(self, confidence: float, lo: float, hi: float) -> tuple[float, float]:
        """The values in [lo, hi] neither gambler rejects, ends rounded outward."""
        threshold = math.log(2.0 / (1.0 - confidence))
        point = self.point
        if len(self.a) == 0 or math.isnan(point):
            return lo, hi
        point = min(max(point, lo), hi)
        if self.rejects(point, threshold):
            # Rejected at some earlier decision (the wealth is watched all along): start
            # from the value nearest the estimate that is not, looking outward.
            near = [
                m
                for m in sorted(self._around(point, lo, hi), key=lambda m: abs(m - point))
                if not self.rejects(m, threshold)
            ][:1]
            if not near:
                return lo, hi
            point = near[0]
        low, high = self._end(point, lo, threshold), self._end(point, hi, threshold)
        return max(lo, low), min(hi, high)

    @staticmethod
    def _around(point: float, lo: float, hi: float) -> list[float]:
        """Candidates around `point`: distances from 10^-6 to 1 of the range on a log
        scale on both sides, and an even grid over [lo, hi]."""
        span = hi - lo
        steps = span * np.logspace(-6, 0, 49)
        found = np.concatenate([point - steps, point + steps, np.linspace(lo, hi, 65)])
        return [float(m) for m in found if lo <= m <= hi]

    def _end(self, inside: float, limit: float, threshold: float) -> float:
        """The boundary between `inside` (not rejected) and `limit`: bisection on the log
        of the distance from `inside`; returns the rejected side (wider, never narrower)."""
        span = abs(limit - inside)
        if span == 0.0 or not self.rejects(limit, threshold):
            return limit
        sign = 1.0 if limit > inside else -1.0
        near, far = math.log(span * 1e-6), math.log(span)  # near: not rejected
        if self.rejects(inside + sign * math.exp(near), threshold):
            return inside + sign * math.exp(near)
        for _ in range(SEARCH_STEPS):
            middle = (near + far) / 2.0
            if self.rejects(inside + sign * math.exp(middle), threshold):
                far = middle
            else:
                near = middle
        return inside + sign * math.exp(far)


def _parts(slots: LoggedSlots, estimator: Estimator) -> tuple[np.ndarray, ...]:
    """(coef, const, b) per slot: the estimator's a = const + coef x reward."""
    w = slots.weights
    if estimator == "ips":
        return w, np.zeros_like(w), np.ones_like(w)
    if estimator == "snips":
        return w, np.zeros_like(w), w
    q = np.clip(np.asarray(slots.logged_q, dtype=np.float64), 0.0, 1.0)
    tq = np.clip(np.asarray(slots.target_q, dtype=np.float64), 0.0, 1.0)
    return w, tq - w * q, np.ones_like(w)


def _estimate(
    slots: LoggedSlots, estimator: Estimator, confidence: float, seed: int, ess: float
) -> Estimate:
    coef, const, b = _parts(slots, estimator)
    reward = np.asarray(slots.reward, dtype=np.float64)
    test = _Test.of(coef, const, b, reward, slots.group, seed)
    low, high = test.interval(confidence, 0.0, 1.0)
    value = test.point
    return Estimate(
        estimator,
        0.0 if math.isnan(value) else value,
        low,
        high,
        confidence,
        ess,
        len(slots.reward),
    )


def estimate(
    slots: LoggedSlots,
    estimators: tuple[Estimator, ...] = ESTIMATORS,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[Estimator, Estimate]:
    """Each estimator's value with its betting interval."""
    if len(slots.reward) == 0:
        raise ValueError("no logged slots to evaluate")
    ess = slots.effective_sample_size
    return {name: _estimate(slots, name, confidence, seed, ess) for name in estimators}


def on_policy_value(slots: LoggedSlots) -> float:
    """The logging policy's own click rate: the mean reward of the logs."""
    return float(np.mean(slots.reward)) if len(slots.reward) else 0.0


def compare(
    a: LoggedSlots,
    b: LoggedSlots,
    estimator: Estimator = "snips",
    confidence: float = 0.95,
    seed: int = 0,
    min_effective_sample_size: float = 10.0,
    min_clicks: int = MIN_CLICKS,
) -> Comparison:
    """Target policy a against b on the same logged slots (same rows, same order): the
    difference a - b with a paired betting interval, and a verdict. The test of a
    difference d is y(d) = (a's terms - b's terms) - d x b', where b' is the number of
    slots (IPS, DR) or the mean of the two policies' weights (SNIPS). With fewer
    effective samples than `min_effective_sample_size`, or fewer clicks than
    `min_clicks` on the slots it weighs, on either side, the verdict is always
    "cannot tell"."""
    if len(a.reward) != len(b.reward) or not np.array_equal(a.reward, b.reward):
        raise ValueError("compare needs both policies evaluated on the same logged slots")
    coef_a, const_a, b_a = _parts(a, estimator)
    coef_b, const_b, b_b = _parts(b, estimator)
    reward = np.asarray(a.reward, dtype=np.float64)
    test = _Test.of(coef_a - coef_b, const_a - const_b, (b_a + b_b) / 2.0, reward, a.group, seed)
    low, high = test.interval(confidence, -1.0, 1.0)
    ea = estimate(a, (estimator,), confidence, seed)[estimator]
    eb = estimate(b, (estimator,), confidence, seed)[estimator]
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
