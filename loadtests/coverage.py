"""Coverage of the off-policy intervals on simulations whose true click rate is known.

A world has a finite set of contexts (people's situations, drawn with known
frequencies), a catalogue of items and a click probability for each pair, scaled
so that the target policy's click rate is exactly the cell's rate. A log of n
decisions is drawn from the logging policy (uniformly random, or a softmax of
scores: some items far likelier than others); the target policy is near the logger
(mostly the logger's own choices, a fifth of its mass on the logger's favourite) or
far from it (a deterministic ranking by other scores). The reward model the DR
estimator uses is the click model with noise. Each replication draws a fresh log
and asks whether the nominal interval holds the truth; the betting intervals
(model_store.offpolicy) are set against the percentile bootstrap over decisions
that rankgate used before (300 draws, as measured when it was replaced).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model_store.offpolicy import ESTIMATORS, Estimator, LoggedSlots, estimate

CONTEXTS, ITEMS = 50, 34
Say = Callable[[str], None]


@dataclass(frozen=True)
class Cell:
    rate: float
    slots: int
    logging: str
    """"uniform" or "softmax"."""
    target: str
    """"near" or "far"."""


@dataclass(frozen=True)
class Result:
    cell: Cell
    truth: float
    replications: int
    bootstrap_replications: int
    coverage: dict[str, float]
    """estimator (and "<estimator> bootstrap") -> share of intervals holding the truth."""
    width: dict[str, float]
    """Mean width, as coverage."""
    zero_width: dict[str, float]
    """Share of intervals of zero width, as coverage."""
    max_weight: float
    seconds: float


@dataclass(frozen=True)
class World:
    frequency: np.ndarray  # (contexts,)
    click: np.ndarray  # (contexts, items)
    logging: np.ndarray  # (contexts, items)
    target: np.ndarray  # (contexts, items)
    qhat: np.ndarray  # (contexts, items)

    @classmethod
    def make(cls, cell: Cell, seed: int = 0) -> World:
        rng = np.random.default_rng(seed)
        frequency = rng.dirichlet(np.full(CONTEXTS, 2.0))
        affinity = rng.normal(size=(CONTEXTS, ITEMS))
        base = 1.0 / (1.0 + np.exp(-(affinity - 1.0)))
        if cell.logging == "uniform":
            logging = np.full((CONTEXTS, ITEMS), 1.0 / ITEMS)
        else:
            scores = 1.2 * (0.6 * affinity + 0.8 * rng.normal(size=affinity.shape))
            logging = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
        rows = np.arange(CONTEXTS)
        if cell.target == "near":
            favourite = np.zeros_like(logging)
            favourite[rows, logging.argmax(axis=1)] = 1.0
            target = 0.8 * logging + 0.2 * favourite
        else:
            other = 0.5 * affinity + rng.normal(size=affinity.shape)
            target = np.zeros_like(logging)
            target[rows, other.argmax(axis=1)] = 1.0
        value = float(frequency @ (target * base).sum(axis=1))
        click = np.clip(base * cell.rate / value, 0.0, 1.0)
        qhat = np.clip(click * np.exp(rng.normal(0.0, 0.3, click.shape)), 0.0, 1.0)
        return cls(frequency, click, logging, target, qhat)

    @property
    def truth(self) -> float:
        return float(self.frequency @ (self.target * self.click).sum(axis=1))

    def log(self, n: int, rng: np.random.Generator) -> LoggedSlots:
        contexts = rng.choice(CONTEXTS, size=n, p=self.frequency)
        cumulative = np.cumsum(self.logging, axis=1)[contexts]
        actions = np.minimum((rng.random((n, 1)) > cumulative).sum(axis=1), ITEMS - 1)
        reward = (rng.random(n) < self.click[contexts, actions]).astype(np.float64)
        return LoggedSlots(
            reward=reward,
            propensity=self.logging[contexts, actions],
            target=self.target[contexts, actions],
            target_q=(self.target[contexts] * self.qhat[contexts]).sum(axis=1),
            logged_q=self.qhat[contexts, actions],
        )


def bootstrap(
    slots: LoggedSlots, confidence: float, draws: int, seed: int
) -> dict[Estimator, tuple[float, float]]:
    """The percentile bootstrap intervals rankgate reported before (one slot per
    decision here): resample the slots `draws` times, take the tails."""
    w = slots.weights
    r = slots.reward
    q = np.clip(slots.logged_q, 0.0, 1.0)
    tq = np.clip(slots.target_q, 0.0, 1.0)
    terms = np.stack([w * r, w, tq + w * (r - q)])
    n = len(r)
    rng = np.random.default_rng(seed)
    sums = np.stack(
        [terms @ np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)]
    )  # (draws, 3): each draw's sums over n slots drawn with replacement
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {
            "ips": sums[:, 0] / n,
            "snips": np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], 0.0),
            "dr": sums[:, 2] / n,
        }
    tail = (1.0 - confidence) / 2.0 * 100.0
    out: dict[Estimator, tuple[float, float]] = {}
    for name in ESTIMATORS:
        low, high = np.percentile(values[name], [tail, 100.0 - tail])
        out[name] = (float(low), float(high))
    return out


BOOTSTRAP_WORK = 10**7
"""Slots resampled per cell's bootstrap replication budget: the bootstrap (300 draws
of every slot) runs on min(replications, BOOTSTRAP_WORK / slots) of the logs."""


def run_cell(
    cell: Cell, replications: int, confidence: float = 0.95, seed: int = 0, draws: int = 300
) -> Result:
    """`replications` fresh logs of the cell's world, each interval checked against the
    truth; the bootstrap (`draws` > 0) on the first of them (see BOOTSTRAP_WORK)."""
    started = time.perf_counter()
    world = World.make(cell, seed)
    truth = world.truth
    rng = np.random.default_rng(seed + 1)
    booted = min(replications, BOOTSTRAP_WORK // cell.slots) if draws else 0
    runs = {name: replications for name in ESTIMATORS} | {
        f"{name} bootstrap": booted for name in ESTIMATORS if booted
    }
    covered = dict.fromkeys(runs, 0)
    widths: dict[str, list[float]] = {n: [] for n in runs}
    max_weight = 0.0
    for repeat in range(replications):
        slots = world.log(cell.slots, rng)
        max_weight = max(max_weight, float(slots.weights.max()))
        intervals: dict[str, tuple[float, float]] = {
            name: (found.low, found.high)
            for name, found in estimate(slots, confidence=confidence, seed=repeat).items()
        }
        if repeat < booted:
            booted_intervals = bootstrap(slots, confidence, draws, repeat)
            intervals |= {f"{n} bootstrap": b for n, b in booted_intervals.items()}
        for name, (low, high) in intervals.items():
            covered[name] += low <= truth <= high
            widths[name].append(high - low)
    return Result(
        cell=cell,
        truth=truth,
        replications=replications,
        bootstrap_replications=booted,
        coverage={n: covered[n] / runs[n] for n in runs},
        width={n: float(np.mean(widths[n])) for n in runs},
        zero_width={n: float(np.mean(np.asarray(widths[n]) <= 0.0)) for n in runs},
        max_weight=max_weight,
        seconds=time.perf_counter() - started,
    )


def grid(
    rates: Sequence[float] = (0.003, 0.01, 0.05),
    sizes: Sequence[int] = (1_000, 10_000, 100_000),
    loggers: Sequence[str] = ("uniform", "softmax"),
    targets: Sequence[str] = ("near", "far"),
) -> Iterator[Cell]:
    for size in sizes:
        for rate in rates:
            for logging in loggers:
                for target in targets:
                    yield Cell(rate, size, logging, target)


def table(results: Sequence[Result]) -> str:
    """Markdown: coverage (betting / bootstrap) and mean width per estimator."""
    head = (
        "| click rate | slots | logging | target | max weight | "
        + " | ".join(f"{n} coverage (bootstrap)" for n in ESTIMATORS)
        + " | "
        + " | ".join(f"{n} mean width (bootstrap)" for n in ESTIMATORS)
        + " |"
    )
    lines = [head, "|" + "---:|" * (5 + 2 * len(ESTIMATORS))]
    for r in results:
        c = r.cell
        boot = f"{ESTIMATORS[0]} bootstrap" in r.coverage
        cover = [
            f"{r.coverage[n]:.3f}" + (f" ({r.coverage[n + ' bootstrap']:.3f})" if boot else "")
            for n in ESTIMATORS
        ]
        width = [
            f"{r.width[n]:.4f}" + (f" ({r.width[n + ' bootstrap']:.4f})" if boot else "")
            for n in ESTIMATORS
        ]
        lines.append(
            f"| {c.rate:.1%} | {c.slots:,} | {c.logging} | {c.target} | {r.max_weight:.0f} | "
            + " | ".join(cover + width)
            + " |"
        )
    return "\n".join(lines)


def coverage_benchmark(
    output: Path, replications: int, say: Say, processes: int = 2
) -> tuple[Path, Path]:
    """The full grid (rates 0.3 %, 1 %, 5 %; 10^3, 10^4, 10^5 slots; uniform and softmax
    logging; near and far targets), written as coverage.md and coverage.json."""
    cells = list(grid())
    results: list[Result] = []
    with ProcessPoolExecutor(processes) as pool:
        for result in pool.map(run_cell, cells, [replications] * len(cells)):
            say(
                f"{result.cell}: "
                + ", ".join(f"{n} {v:.3f}" for n, v in result.coverage.items())
                + f" ({result.seconds:.0f} s)"
            )
            results.append(result)
    output.mkdir(parents=True, exist_ok=True)
    report, figures = output / "coverage.md", output / "coverage.json"
    worst = min(r.coverage[n] for r in results for n in ESTIMATORS)
    report.write_text(
        "# Off-policy interval coverage (nominal 95 %)\n\n"
        f"`rankgate bench --coverage`: {replications} replications per cell, each a fresh "
        "log; betting intervals, and in brackets the percentile bootstrap over the same "
        "logs (300 draws; on the first 10^7 / slots logs of a cell, at most all). "
        f"Lowest betting coverage in any cell: {worst:.3f}.\n\n" + table(results) + "\n"
    )
    figures.write_text(
        json.dumps(
            [asdict(r) | {"cell": asdict(r.cell)} for r in results], indent=2, sort_keys=True
        )
        + "\n"
    )
    return report, figures
