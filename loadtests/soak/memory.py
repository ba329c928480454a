"""Resident memory of every process of the stack over the soak.

Every `EVERY_S` the sampler measures the stack as the benchmark does
(loadtests/bench/memory.py): the process tree of the server's `serve run` (Ray's
GCS, raylet, dashboard and agents, the Serve controller, HAProxy, every replica)
and the embedded Redis. A process is named by what it runs
(`ray::ServeReplica:rankgate:RankIngress`, `raylet`, `valkey-server`...), with its
pid, since a fault may replace it.

Growth per hour is the slope of a least-squares line through a process's samples
after the warm-up (the run's, and for a process started later, such as a replica a
fault replaced, its own first `warmup_s`), as a share of its resident memory when
the warm-up ended; a process that lived less than `MIN_LIFE_S` after it has no
figure.

Whether a process grows is judged (`judge`) on its means per minute (`minutes`, kept
in soak.json; a report without them, on its windows): the slope over the second half
of its life after warm-up (a leak grows in both halves, a cache or pool filling up to
its bound in the first only) with a 95 % interval, widened for the autocorrelation of
the residuals (Quenouille's effective sample size for AR(1)). `under` when the
interval lies below 5 % per hour, `grows` when above, `cannot tell` when it spans
it; a process that lived less than `JUDGED_LIFE_S` after warm-up is `too short`, since
a few MB of jitter over minutes outweighs any slope.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import numpy as np
from scipy import stats

from loadtests.bench import memory

EVERY_S = 10.0
MIN_LIFE_S = 600.0
JUDGED_LIFE_S = 1800.0
"""Life after warm-up a process needs before its growth is judged: half an hour, so
that the second half spans 15 minutes."""
LIMIT_PERCENT_PER_HOUR = 5.0
MINUTE_S = 60.0
Verdict = Literal["under", "grows", "cannot tell", "too short"]


@dataclass
class MemorySampler:
    roots: list[int]
    """The server's process (`serve run`): its tree is the stack (loadtests/bench/memory.py)."""
    extra: Callable[[], list[int]] = list
    """Processes outside that tree, asked at each sample (the embedded Redis, restarted
    by faults under a new pid)."""
    started: float = field(default_factory=time.monotonic)
    samples: dict[tuple[str, int], list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        now = time.monotonic() - self.started
        for process in memory.stack(self.roots, self.extra()):
            if process.pid != os.getpid():
                self.samples[(process.name, process.pid)].append((now, process.rss_bytes))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(EVERY_S)

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self.run, name="memory", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()

    def windows(self, window_s: float) -> dict[str, list[float | None]]:
        """MB per process and window (the mean of its samples in the window)."""
        end = max((t for series in self.samples.values() for t, _ in series), default=0.0)
        count = int(end // window_s) + 1
        out: dict[str, list[float | None]] = {}
        for (name, pid), series in sorted(self.samples.items()):
            row: list[float | None] = []
            for w in range(count):
                inside = [r for t, r in series if w * window_s <= t < (w + 1) * window_s]
                row.append(round(sum(inside) / len(inside) / 2**20, 1) if inside else None)
            out[f"{name} ({pid})"] = row
        return out

    def growth(self, warmup_s: float) -> dict[str, dict[str, Any]]:
        """Per process: MB after warm-up, MB at the end, growth per hour (MB and %)."""
        out: dict[str, dict[str, Any]] = {}
        for (name, pid), series in sorted(self.samples.items()):
            since = warmed_up_at(series[0][0], warmup_s)
            after = [(t, r) for t, r in series if t >= since]
            label = f"{name} ({pid})"
            if len(after) < 3 or after[-1][0] - after[0][0] < MIN_LIFE_S:
                out[label] = {"lived_s": round(after[-1][0] - after[0][0]) if after else 0}
                continue
            t = np.array([a[0] for a in after]) / 3600.0
            mb = np.array([a[1] for a in after]) / 2**20
            slope = float(np.polyfit(t, mb, 1)[0])
            out[label] = {
                "lived_s": round(after[-1][0] - after[0][0]),
                "mb_after_warmup": round(float(mb[0]), 1),
                "mb_at_end": round(float(mb[-1]), 1),
                "growth_mb_per_hour": round(slope, 2),
                "growth_percent_per_hour": round(100.0 * slope / float(mb[0]), 2),
            }
        return out


def warmed_up_at(start_s: float, warmup_s: float) -> float:
    """When a process that first appeared at `start_s` of the run is past warm-up: the
    run's, and for one started later (a replica a fault replaced, which loads its
    models and fills its caches first, as at the start) its own."""
    return max(warmup_s, start_s + warmup_s if start_s > 0 else 0.0)


def judge(row: Sequence[float | None], step_s: float, warmup_s: float) -> dict[str, Any]:
    """Whether one process's memory grows, from its means (MB, one per `step_s` of the
    run, None where it was not alive): the slope over the second half of its life
    after warm-up, per hour and as a share of its mean MB there, with a 95 % interval."""
    points = [((i + 0.5) * step_s, mb) for i, mb in enumerate(row) if mb is not None]
    if not points:
        return {"verdict": "too short", "lived_s": 0}
    since = warmed_up_at(points[0][0] - step_s / 2, warmup_s)
    after = [(t, mb) for t, mb in points if t - step_s / 2 >= since]
    lived = after[-1][0] - after[0][0] + step_s if after else 0.0
    if lived < JUDGED_LIFE_S:
        return {"verdict": "too short", "lived_s": round(lived)}
    t = np.array([a[0] for a in after]) / 3600.0
    mb = np.array([a[1] for a in after])
    late = t >= (t[0] + t[-1]) / 2
    t, mb = t[late], mb[late]
    slope, half = 0.0, 0.0  # a process whose memory never moved
    if np.ptp(mb) > 0:
        fit = stats.linregress(t, mb)
        residuals = mb - (fit.intercept + fit.slope * t)
        # Lag-1 autocorrelation of the residuals: correlated neighbours carry less
        # information than independent ones (n_eff = n (1 - r) / (1 + r)).
        r = 0.0
        if np.ptp(residuals) > 1e-9 and len(t) > 2:
            r = float(np.clip(np.corrcoef(residuals[:-1], residuals[1:])[0, 1], 0.0, 0.9))
        n_eff = len(t) * (1 - r) / (1 + r)
        slope = float(fit.slope)
        half = float(
            stats.t.ppf(0.975, max(1.0, n_eff - 2)) * fit.stderr * np.sqrt((1 + r) / (1 - r))
        )
    share = 100.0 / float(np.mean(mb))
    low, high = (slope - half) * share, (slope + half) * share
    verdict: Verdict = (
        "under"
        if high < LIMIT_PERCENT_PER_HOUR
        else "grows"
        if low > LIMIT_PERCENT_PER_HOUR
        else "cannot tell"
    )
    return {
        "verdict": verdict,
        "lived_s": round(lived),
        "percent_per_hour": round(slope * share, 2),
        "low": round(float(low), 2),
        "high": round(float(high), 2),
        "mb_per_hour": round(slope, 2),
        "points": len(t),
    }


def judgments(report_memory: dict[str, Any], window_s: float, warmup_s: float) -> dict[str, Any]:
    """`judge` for every process of a report's memory section: on its minutes where
    the report has them, else on its windows."""
    minutes = report_memory.get("minutes")
    rows, step = (minutes, MINUTE_S) if minutes else (report_memory["windows"], window_s)
    return {label: judge(row, step, warmup_s) for label, row in rows.items()}


def is_data_store(label: str) -> bool:
    """Redis's (or Valkey's) server: what it holds grows with what the soak writes,
    up to the retention that bounds it (its own section of the report)."""
    return label.startswith(("valkey-server", "redis-server"))
