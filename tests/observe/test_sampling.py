"""Explanations on a sample of traffic: the choice, the worker and its bound (plain classes)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from serving.observe.sampling import ExplanationWorker, SampledExplanation, chosen


def binomial_bounds(n: int, rate: float, sigmas: float = 4.5) -> tuple[float, float]:
    """Counts a fair sample of `rate` lies within (a false alarm about once in 10^5 runs)."""
    spread = sigmas * (n * rate * (1 - rate)) ** 0.5
    return n * rate - spread, n * rate + spread


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.25, 0.5])
def test_the_sample_is_the_configured_share_of_request_ids(rate: float) -> None:
    ids = [uuid.uuid4().hex for _ in range(20_000)]
    low, high = binomial_bounds(len(ids), rate)
    assert low <= sum(chosen(i, rate) for i in ids) <= high


def test_the_choice_is_a_function_of_the_request_id_alone() -> None:
    ids = [uuid.uuid4().hex for _ in range(2000)]
    assert [chosen(i, 0.3) for i in ids] == [chosen(i, 0.3) for i in ids]
    assert not any(chosen(i, 0.0) for i in ids) and all(chosen(i, 1.0) for i in ids)
    # A larger rate keeps every decision a smaller one chose (the sample grows, it is not redrawn).
    assert all(chosen(i, 0.5) for i in ids if chosen(i, 0.1))


class Explainer:
    """Contributions: the rows doubled, after `gate` opens; or raises `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.gate = threading.Event()
        self.gate.set()
        self.threads: list[int | None] = []
        self.thread_names: list[str] = []

    def contributions(self, rows: np.ndarray, threads: int | None = None) -> np.ndarray:
        self.gate.wait(5)
        self.threads.append(threads)
        self.thread_names.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        return rows * 2.0

    def reasons(self, values: np.ndarray) -> list[list]:
        return [[f"x {row[0]:g}"] for row in values]


async def collect(worker: ExplanationWorker, explainer: Explainer, jobs: int, limit: int):  # type: ignore[no-untyped-def]
    outcomes: list[tuple[SampledExplanation, str]] = []

    def done(outcome: SampledExplanation) -> None:
        outcomes.append((outcome, threading.current_thread().name))

    accepted = [
        worker.submit(explainer, np.full((2, 3), float(n)), limit, done) for n in range(jobs)
    ]
    while len(outcomes) < sum(accepted):
        await asyncio.sleep(0.005)
    return accepted, outcomes


def test_the_worker_explains_off_the_loop_and_answers_on_it() -> None:
    worker, explainer = ExplanationWorker(), Explainer()
    accepted, outcomes = asyncio.run(collect(worker, explainer, 3, limit=10))
    assert accepted == [True, True, True] and worker.outstanding == 0
    assert [o.reasons for o, _ in outcomes] == [[["x 0"]] * 2, [["x 2"]] * 2, [["x 4"]] * 2]
    assert all(o.contributions is not None and o.contributions.shape == (2, 3) for o, _ in outcomes)
    # Computed on the worker thread with one thread; called back on the event loop's thread.
    assert set(explainer.thread_names) == {"rankgate-sampled-explanations"}
    assert set(explainer.threads) == {1}
    assert {name for _, name in outcomes} == {threading.current_thread().name}


def test_a_full_queue_skips_samples_instead_of_building_a_backlog() -> None:
    worker, explainer = ExplanationWorker(), Explainer()
    explainer.gate.clear()  # the first job blocks the thread: the rest wait

    async def burst() -> tuple[list[bool], list[tuple[SampledExplanation, str]]]:
        asyncio.get_running_loop().call_later(0.2, explainer.gate.set)
        return await collect(worker, explainer, 6, limit=2)

    accepted, outcomes = asyncio.run(burst())
    assert accepted == [True, True, False, False, False, False]
    assert len(outcomes) == 2 and worker.outstanding == 0


def test_an_explainer_error_is_an_outcome_not_a_dead_worker() -> None:
    worker = ExplanationWorker()
    _, failed = asyncio.run(collect(worker, Explainer(ValueError("shap")), 1, limit=4))
    assert failed[0][0].error == "ValueError" and failed[0][0].reasons is None
    _, fine = asyncio.run(collect(worker, Explainer(), 1, limit=4))
    assert fine[0][0].error is None and fine[0][0].reasons == [["x 0"], ["x 0"]]


def test_one_thread_gives_the_values_tree_explainer_gives(tmp_path: Path) -> None:
    import lightgbm as lgb

    from model_store.native import contributions, load_native, tree_explainer

    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6))
    y = (x[:, 0] + rng.normal(size=400) > 0.5).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 7}
    lgb.train(params, lgb.Dataset(x, y), 20).save_model(tmp_path / "booster.txt")
    explainer = tree_explainer(load_native(tmp_path / "booster.txt", "lightgbm"))
    rows = rng.normal(size=(10, 6))
    shared = contributions(explainer, rows)
    assert shared.shape == (10, 6)
    assert np.array_equal(contributions(explainer, rows, threads=1), shared)
