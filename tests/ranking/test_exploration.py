"""Exploration and propensities: the logged probability of each shown item is the
frequency with which the draw shows it there."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from rankgate.core.errors import ConfigError
from rankgate.governance.policy import EpsilonGreedy, PlackettLuce, load_policy
from serving.ranking.exploration import explore, greedy

ITEMS = list(range(30))
SCORES = list(np.random.default_rng(7).random(30))
MODEL_ORDER = [p.item_id for p in greedy(ITEMS, SCORES, 30).picks]


def frequencies(exploration, k: int, draws: int) -> tuple[Counter, dict]:  # type: ignore[no-untyped-def]
    seen: Counter = Counter()
    logged: dict = {}
    for seed in range(draws):
        selection = explore(exploration, ITEMS, SCORES, k, seed)
        for position, (pick, p) in enumerate(
            zip(selection.picks, selection.propensities, strict=True)
        ):
            seen[position, pick.item_id] += 1
            logged[position, pick.item_id] = p
    return seen, logged


@pytest.mark.parametrize(
    "exploration",
    [
        EpsilonGreedy(method="epsilon_greedy", epsilon=0.3),
        PlackettLuce(method="plackett_luce", temperature=0.5, max_shift=2),
        PlackettLuce(method="plackett_luce", temperature=3.0, max_shift=3),
    ],
)
def test_logged_propensities_are_the_frequencies_of_the_draws(exploration) -> None:  # type: ignore[no-untyped-def]
    draws = 6000
    seen, logged = frequencies(exploration, k=4, draws=draws)
    for key, p in logged.items():
        # Binomial noise: 4.5 standard deviations (a few dozen keys are checked).
        assert abs(seen[key] / draws - p) <= 4.5 * np.sqrt(p * (1 - p) / draws) + 1e-9, key


def test_propensities_at_each_position_sum_to_one_over_the_items_it_can_show() -> None:
    exploration = PlackettLuce(method="plackett_luce", temperature=1.0, max_shift=2)
    _, logged = frequencies(exploration, k=5, draws=3000)
    for position in range(5):
        shown = [p for (j, _), p in logged.items() if j == position]
        assert sum(shown) <= 1.0 + 1e-9
        assert len(shown) <= 2 * 2 + 1  # only ranks within the cap


def test_plackett_luce_never_moves_an_item_further_than_its_cap() -> None:
    exploration = PlackettLuce(method="plackett_luce", temperature=50.0, max_shift=2)
    for seed in range(500):
        shown = explore(exploration, ITEMS, SCORES, 10, seed).picks
        for position, pick in enumerate(shown):
            assert abs(MODEL_ORDER.index(pick.item_id) - position) <= 2


def test_a_draw_is_a_function_of_its_seed() -> None:
    exploration = PlackettLuce(method="plackett_luce", temperature=2.0, max_shift=3)
    first = explore(exploration, ITEMS, SCORES, 8, 12345)
    assert explore(exploration, ITEMS, SCORES, 8, 12345) == first
    assert any(explore(exploration, ITEMS, SCORES, 8, s) != first for s in range(5))


def test_greedy_is_the_top_k_with_probability_one() -> None:
    selection = greedy(ITEMS, SCORES, 5)
    assert [p.item_id for p in selection.picks] == MODEL_ORDER[:5]
    assert selection.propensities == [1.0] * 5 and not selection.explored


def test_epsilon_greedy_explores_about_epsilon_of_answers() -> None:
    exploration = EpsilonGreedy(method="epsilon_greedy", epsilon=0.2)
    explored = sum(explore(exploration, ITEMS, SCORES, 3, s).explored for s in range(4000))
    assert 0.17 < explored / 4000 < 0.23


def test_fewer_candidates_than_k_shows_them_all() -> None:
    exploration = PlackettLuce(method="plackett_luce", temperature=1.0, max_shift=2)
    selection = explore(exploration, [3, 1], [0.2, 0.9], 10, 1)
    assert sorted(p.item_id for p in selection.picks) == [1, 3]


def test_a_bad_exploration_in_the_policy_file_names_the_field(tmp_path: Path) -> None:
    from rankgate.governance.policy import policy_dir

    policy = yaml.safe_load((policy_dir() / "policy.yaml").read_text())
    purpose = next(iter(policy["purposes"]))
    policy["purposes"][purpose]["exploration"] = {"method": "plackett_luce", "temperature": 0}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    with pytest.raises(ConfigError, match=rf"purposes\.{purpose}\.exploration.*temperature"):
        load_policy(tmp_path / "policy.yaml")
    policy["purposes"][purpose]["exploration"] = {"method": "thompson"}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    with pytest.raises(ConfigError, match=r"exploration"):
        load_policy(tmp_path / "policy.yaml")
