"""The off-policy estimators against simulations whose true click rate is known."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from model_store.offpolicy import (
    ESTIMATORS,
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


@pytest.mark.parametrize("policy", [deterministic, softmax_target])
def test_intervals_cover_the_true_click_rate_at_about_the_stated_rate(policy) -> None:  # type: ignore[no-untyped-def]
    world = World.make()
    target = policy(world)
    truth = world.true_value(target)
    rng = np.random.default_rng(1)
    repeats, covered = 200, dict.fromkeys(ESTIMATORS, 0)
    widths: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for repeat in range(repeats):
        slots = world.log(1500, target, rng)
        for name, found in estimate(slots, draws=300, seed=repeat).items():
            covered[name] += found.low <= truth <= found.high
            widths[name].append(found.high - found.low)
    rates = {name: covered[name] / repeats for name in ESTIMATORS}
    print(
        f"\n{policy.__name__}: true click rate {truth:.4f}; 95 % interval coverage over "
        f"{repeats} draws of 1,500 logged slots: "
        + ", ".join(
            f"{name} {rates[name]:.3f} (median width {np.median(widths[name]):.4f})"
            for name in ESTIMATORS
        )
    )
    for name in ESTIMATORS:
        assert 0.88 <= rates[name] <= 0.99, (name, rates[name])
    # The reward model is good: doubly robust is tighter than plain IPS.
    assert np.median(widths["dr"]) < np.median(widths["ips"])


def test_compare_tells_a_better_policy_from_a_worse_one() -> None:
    world = World.make()
    good = deterministic(world)
    bad = np.zeros_like(good)
    bad[np.arange(N_CONTEXTS), world.qhat.argmin(axis=1)] = 1.0
    contexts_rng = np.random.default_rng(5)
    logged = world.log(4000, good, contexts_rng)
    # The same logged slots, evaluated for the bad policy.
    rng = np.random.default_rng(5)
    again = world.log(4000, bad, rng)
    assert np.array_equal(logged.reward, again.reward)
    result = compare(logged, again, "snips", draws=300)
    assert result.verdict == "better" and result.low > 0
    assert compare(again, logged, "dr", draws=300).verdict == "worse"
    assert compare(logged, logged, "ips", draws=300).verdict == "cannot tell"


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
    assert compare(slots, zero, "ips", draws=200).verdict == "cannot tell"


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
    found = estimate(slots, draws=200)
    assert found["ips"].value == pytest.approx(2.0 / 3)
    assert found["snips"].value == pytest.approx(0.5)
    assert found["dr"].value == pytest.approx(2.0 / 3)
    assert on_policy_value(slots) == pytest.approx(2.0 / 3)


def test_bad_slots_are_refused() -> None:
    with pytest.raises(ValueError, match="propensity"):
        LoggedSlots(np.ones(2), np.array([0.5, 0.0]), np.ones(2), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="target"):
        LoggedSlots(np.ones(2), np.ones(2), np.ones(3), np.ones(2), np.ones(2))


def test_no_clicks_where_the_target_has_weight_cannot_tell() -> None:
    """A deterministic ranking on uniform logs of 80 items keeps about 125 of 10,000
    slots; when none of the 38 clicks falls there, every resample is click-free and
    the interval collapses to [0, 0]: that is no evidence of being worse."""
    rng = np.random.default_rng(0)
    reward = np.zeros(10_000)
    reward[rng.choice(10_000, 38, replace=False)] = 1.0
    target = np.zeros(10_000)
    target[np.flatnonzero(reward == 0)[:125]] = 1.0
    slots = LoggedSlots(reward, np.full(10_000, 0.0125), target, np.zeros(10_000), np.zeros(10_000))
    assert estimate(slots, draws=200)["ips"].high == 0.0
    result = compare(slots, logging_policy(slots), "ips", draws=200)
    assert result.weighted_clicks == 0 and result.verdict == "cannot tell"
