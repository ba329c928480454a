"""The off-policy estimators against simulations whose true click rate is known."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from loadtests.coverage import Cell, run_cell
from model_store.offpolicy import (
    ESTIMATORS,
    METHOD,
    LoggedSlots,
    compare,
    estimate,
    logging_policy,
    on_policy_value,
)

N_CONTEXTS, N_ITEMS = 60, 8


@dataclass
class World:
    """Finite contexts drawn uniformly, a known click model, a softmax logging policy."""

    click: np.ndarray  # (contexts, items) click probability
    logging: np.ndarray  # (contexts, items) logging probability
    qhat: np.ndarray  # a reward model: the click model with noise

    @classmethod
    def make(cls, seed: int = 0) -> World:
        rng = np.random.default_rng(seed)
        affinity = rng.normal(size=(N_CONTEXTS, N_ITEMS))
        click = 1 / (1 + np.exp(-(1.5 * affinity - 2.0)))
        preference = 0.8 * affinity + rng.normal(size=affinity.shape)
        logging = np.exp(preference) / np.exp(preference).sum(axis=1, keepdims=True)
        qhat = np.clip(click + rng.normal(0, 0.05, click.shape), 0.001, 0.999)
        return cls(click, logging, qhat)

    def true_value(self, target: np.ndarray) -> float:
        """Exact click rate of a target policy (contexts, items) of probabilities."""
        return float((target * self.click).sum(axis=1).mean())

    def log(self, rows: int, target: np.ndarray, rng: np.random.Generator) -> LoggedSlots:
        contexts = rng.integers(0, N_CONTEXTS, rows)
        cumulative = self.logging[contexts].cumsum(axis=1)
        actions = (rng.random((rows, 1)) > cumulative).sum(axis=1)
        rewards = (rng.random(rows) < self.click[contexts, actions]).astype(float)
        return LoggedSlots(
            reward=rewards,
            propensity=self.logging[contexts, actions],
            target=target[contexts, actions],
            target_q=(target[contexts] * self.qhat[contexts]).sum(axis=1),
            logged_q=self.qhat[contexts, actions],
        )


def deterministic(world: World) -> np.ndarray:
    """The best item by the reward model, with probability 1."""
    target = np.zeros_like(world.click)
    target[np.arange(N_CONTEXTS), world.qhat.argmax(axis=1)] = 1.0
    return target


def softmax_target(world: World) -> np.ndarray:
    scores = 3.0 * world.qhat
    return np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    "cell",
    [
        Cell(0.003, 1_000, "uniform", "far"),
        Cell(0.003, 1_000, "softmax", "near"),
        Cell(0.05, 1_000, "softmax", "far"),
        Cell(0.01, 3_000, "uniform", "near"),
    ],
    ids=str,
)
def test_intervals_hold_their_coverage_where_clicks_are_rare(cell: Cell) -> None:
    """A reduced grid of `rankgate bench --coverage` (loadtests/results/coverage.md has
    the whole one): 300 fresh logs per cell, the nominal 95 % interval of every
    estimator holds the known click rate in at least 93 % of them."""
    result = run_cell(cell, replications=300, draws=0)
    print(
        f"\n{cell}: truth {result.truth:.4f}, max weight {result.max_weight:.0f}, "
        + ", ".join(
            f"{n} {result.coverage[n]:.3f} (mean width {result.width[n]:.4f})" for n in ESTIMATORS
        )
    )
    for name in ESTIMATORS:
        assert result.coverage[name] >= 0.93, (name, result.coverage[name])
        assert result.zero_width[name] == 0.0, name


def test_the_bootstrap_it_replaced_collapses_where_the_betting_interval_holds() -> None:
    """The cell of a campaign's first days: 0.3 % clicks, 1,000 logged slots, uniform
    logs, a deterministic target. The percentile bootstrap's interval is mostly [0, 0]."""
    result = run_cell(
        Cell(0.003, 1_000, "uniform", "far"),
        replications=100,
    )
    assert result.coverage["ips bootstrap"] < 0.5
    assert result.zero_width["ips bootstrap"] > 0.5
    assert result.coverage["ips"] >= 0.93 and result.zero_width["ips"] == 0.0


def test_the_logging_policy_on_its_own_slots_holds_its_click_rate() -> None:
    world = World.make()
    rng = np.random.default_rng(3)
    covered = 0
    for repeat in range(100):
        slots = logging_policy(world.log(1500, world.logging, rng))
        found = estimate(slots, seed=repeat)
        truth = world.true_value(world.logging)
        covered += all(e.low <= truth <= e.high for e in found.values())
        assert found["ips"].value == pytest.approx(on_policy_value(slots))
    assert covered >= 93


def test_compare_tells_a_better_policy_from_a_worse_one() -> None:
    world = World.make()
    good = deterministic(world)
    bad = np.zeros_like(good)
    bad[np.arange(N_CONTEXTS), world.qhat.argmin(axis=1)] = 1.0
    contexts_rng = np.random.default_rng(5)
    logged = world.log(10_000, good, contexts_rng)
    # The same logged slots, evaluated for the bad policy.
    rng = np.random.default_rng(5)
    again = world.log(10_000, bad, rng)
    assert np.array_equal(logged.reward, again.reward)
    result = compare(logged, again, "snips")
    assert result.verdict == "better" and result.low > 0
    assert compare(again, logged, "dr").verdict == "worse"
    assert compare(logged, logged, "ips").verdict == "cannot tell"


def test_too_few_effective_samples_cannot_tell() -> None:
    slots = LoggedSlots(
        reward=np.array([1.0, 0.0, 0.0, 0.0]),
        propensity=np.full(4, 0.01),
        target=np.array([1.0, 0.0, 0.0, 0.0]),
        target_q=np.full(4, 0.5),
        logged_q=np.full(4, 0.5),
    )
    zero = LoggedSlots(slots.reward, slots.propensity, np.zeros(4), np.zeros(4), np.zeros(4))
    assert slots.effective_sample_size == pytest.approx(1.0)
    assert compare(slots, zero, "ips").verdict == "cannot tell"


def test_weights_and_effective_sample_size() -> None:
    slots = LoggedSlots(
        reward=np.array([1.0, 0.0, 1.0]),
        propensity=np.array([0.5, 0.5, 0.25]),
        target=np.array([1.0, 1.0, 0.0]),
        target_q=np.zeros(3),
        logged_q=np.zeros(3),
        group=np.array([7, 7, 9]),
    )
    assert slots.weights.tolist() == [2.0, 2.0, 0.0]
    assert slots.effective_sample_size == pytest.approx(2.0)
    found = estimate(slots)
    assert found["ips"].value == pytest.approx(2.0 / 3)
    assert found["snips"].value == pytest.approx(0.5)
    assert found["dr"].value == pytest.approx(2.0 / 3)
    assert on_policy_value(slots) == pytest.approx(2.0 / 3)


def test_bad_slots_are_refused() -> None:
    with pytest.raises(ValueError, match="propensity"):
        LoggedSlots(np.ones(2), np.array([0.5, 0.0]), np.ones(2), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="target"):
        LoggedSlots(np.ones(2), np.ones(2), np.ones(3), np.ones(2), np.ones(2))


def test_no_clicks_where_the_target_has_weight_is_a_bounded_interval() -> None:
    """A deterministic ranking on uniform logs of 80 items keeps about 125 of 10,000
    slots; none of the 38 clicks falls there. Zero weighted clicks does not rule out a
    click rate of a few per cent: the interval starts at 0 and is wider than zero, and
    the verdict against the logging policy is "cannot tell"."""
    rng = np.random.default_rng(0)
    reward = np.zeros(10_000)
    reward[rng.choice(10_000, 38, replace=False)] = 1.0
    target = np.zeros(10_000)
    target[np.flatnonzero(reward == 0)[:125]] = 1.0
    slots = LoggedSlots(reward, np.full(10_000, 0.0125), target, np.zeros(10_000), np.zeros(10_000))
    found = estimate(slots)
    for name in ESTIMATORS:
        assert found[name].value == 0.0 and found[name].low == 0.0, name
        # 125 weighted slots without a click: the exact binomial bound is 2.9 %.
        assert 0.029 <= found[name].high <= 0.1, (name, found[name].high)
        assert found[name].method == METHOD == "betting"
    result = compare(slots, logging_policy(slots), "ips")
    assert result.weighted_clicks == 0 and result.verdict == "cannot tell"
    assert result.low < 0 < result.high


def test_an_empty_or_weightless_log_says_nothing() -> None:
    """No weight anywhere: every value is consistent with the data."""
    slots = LoggedSlots(np.ones(50), np.full(50, 0.5), np.zeros(50), np.zeros(50), np.zeros(50))
    found = estimate(slots)
    assert (found["snips"].low, found["snips"].high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="no logged slots"):
        estimate(LoggedSlots(*(np.zeros(0),) * 5))


def test_decisions_are_the_units_and_the_order_is_seeded() -> None:
    world = World.make()
    rng = np.random.default_rng(9)
    slots = world.log(3000, deterministic(world), rng)
    grouped = LoggedSlots(
        slots.reward,
        slots.propensity,
        slots.target,
        slots.target_q,
        slots.logged_q,
        group=np.arange(3000) // 3,
    )
    assert estimate(grouped, seed=4) == estimate(grouped, seed=4)
    one, other = estimate(grouped)["ips"], estimate(slots)["ips"]
    assert one.value == pytest.approx(other.value)
    assert one.low <= one.value <= one.high
