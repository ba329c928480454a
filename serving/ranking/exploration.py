"""Which items an answer shows, and the probability with which each was chosen.

Every decision logs, per shown item and position, the probability that the
serving policy put that item there (its propensity): what off-policy
evaluation of the next version reads from rankgate's own audit log.

- The model's top k (`greedy`) and the fallback's ranking are deterministic:
  each shown item had probability 1.
- A purpose may enable exploration in policy.yaml (`purposes.<p>.exploration`),
  only ever applied to people the gate cleared (the fallback answers the others):
  - `epsilon_greedy`: with probability epsilon the answer is k allowed items
    drawn uniformly at random, in random order. The propensity of item a at
    position j is exact: (1 - epsilon) [a is the model's j-th] + epsilon / n.
  - `plackett_luce`: positions are filled in order, each by an item drawn with
    probability proportional to exp(z / temperature) among those not yet shown,
    where z is the score standardized over the allowed items; no item moves more
    than `max_shift` places from its model rank (an item about to fall further is
    placed at once). The propensities are the exact marginal probabilities
    P(item at position), computed by dynamic programming over which items of the
    sliding window of 2 x max_shift ranks are already placed.

A draw is a function of the scores, the parameters and a seed that the audit
record keeps, so `rankgate audit replay` reproduces an explored answer exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rankgate.core.topk import Item, Pick, top_k
from rankgate.governance.policy import EpsilonGreedy, Exploration, PlackettLuce

SEED_BITS = 63


@dataclass(frozen=True)
class Selection:
    """The shown items (best first) and the probability each had at its position."""

    picks: list[Pick]
    propensities: list[float]
    explored: bool
    """The answer differs from the model's top k."""


def greedy(item_ids: Sequence[Item], scores: Sequence[float] | np.ndarray, k: int) -> Selection:
    """The model's top k: deterministic, every propensity 1."""
    picks = top_k(item_ids, scores, k)
    return Selection(picks, [1.0] * len(picks), explored=False)


def new_seed() -> int:
    return random.getrandbits(SEED_BITS)


def explore(
    exploration: Exploration,
    item_ids: Sequence[Item],
    scores: Sequence[float] | np.ndarray,
    k: int,
    seed: int,
) -> Selection:
    """An answer drawn by `exploration` with `seed`, with each shown item's propensity."""
    ranked = top_k(item_ids, scores, len(item_ids))
    k = min(k, len(ranked))
    rng = random.Random(seed)
    if isinstance(exploration, EpsilonGreedy):
        return _epsilon_greedy(exploration, ranked, k, rng)
    return _plackett_luce(exploration, ranked, k, rng)


def _epsilon_greedy(
    config: EpsilonGreedy, ranked: list[Pick], k: int, rng: random.Random
) -> Selection:
    n = len(ranked)
    explored = rng.random() < config.epsilon
    ranks = rng.sample(range(n), k) if explored else list(range(k))
    uniform = config.epsilon / n
    propensities = [
        (1.0 - config.epsilon) * (rank == position) + uniform for position, rank in enumerate(ranks)
    ]
    return Selection([ranked[r] for r in ranks], propensities, ranks != list(range(k)))


def _plackett_luce(
    config: PlackettLuce, ranked: list[Pick], k: int, rng: random.Random
) -> Selection:
    weights = _weights([pick.score for pick in ranked], config.temperature)
    shift = config.max_shift
    ranks: list[int] = []
    placed = 0  # bit r: the item of model rank r is shown already
    for position in range(k):
        options = _options(placed, position, shift, len(ranked))
        if len(options) == 1:
            choice = options[0]
        else:
            choice = rng.choices(options, weights=[weights[r] for r in options])[0]
        ranks.append(choice)
        placed |= 1 << choice
    marginals = _marginals(weights, k, shift)
    propensities = [marginals[position][rank] for position, rank in enumerate(ranks)]
    return Selection([ranked[r] for r in ranks], propensities, ranks != list(range(k)))


def _weights(scores: list[float], temperature: float) -> list[float]:
    """exp(z / temperature) per model rank, z standardized over the allowed items."""
    values = np.asarray(scores, dtype=np.float64)
    spread = float(values.std())
    z = (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)
    logits = z / temperature
    return [math.exp(v) for v in (logits - logits.max())]


def _options(placed: int, position: int, shift: int, n: int) -> list[int]:
    """Model ranks that may fill `position`: the one that would otherwise move more
    than `shift` places down, if it is still waiting; else any waiting rank at most
    `shift` places below the position."""
    overdue = position - shift
    if overdue >= 0 and not placed >> overdue & 1:
        return [overdue]
    return [r for r in range(max(0, overdue), min(n, position + shift + 1)) if not placed >> r & 1]


def _marginals(weights: list[float], k: int, shift: int) -> list[dict[int, float]]:
    """P(model rank r at position j) for j < k: the exact sum over every way to fill
    the positions before j, grouped by which ranks they used (at most C(2s, s) sets)."""
    n = len(weights)
    states: dict[int, float] = {0: 1.0}
    marginals: list[dict[int, float]] = []
    for position in range(k):
        at_position: dict[int, float] = {}
        following: dict[int, float] = {}
        for placed, probability in states.items():
            options = _options(placed, position, shift, n)
            total = sum(weights[r] for r in options)
            for rank in options:
                p = probability * weights[rank] / total
                at_position[rank] = at_position.get(rank, 0.0) + p
                after = placed | 1 << rank
                following[after] = following.get(after, 0.0) + p
        marginals.append(at_position)
        states = following
    return marginals
