"""What Redis did over the soak, from its own `INFO`: its dataset, and the forks of
its background saves and rewrites.

Every `EVERY_S` the watcher reads `INFO` (memory, persistence, stats). Per window:
the dataset's size (`used_memory`), the forks begun (`total_forks`, a restart
counted from zero again), the longest fork (`latest_fork_usec`) and the share of
the window a background save (RDB) or rewrite (AOF) was running. A fork copies the
page tables of the whole dataset and the child then competes for the cores: as the
dataset grows, so does what each costs the requests that Redis serves meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

from rankgate.core.redis_server import connect

EVERY_S = 2.0


@dataclass
class Sample:
    at: float
    used_mb: float
    forks: int
    fork_ms: float
    saving: bool
    rewriting: bool


@dataclass
class RedisWatch:
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        with contextlib.suppress(Exception):  # Redis down (a fault): no sample
            info: Any = connect().info()
            self.samples.append(
                Sample(
                    time.monotonic() - self.started,
                    info["used_memory"] / 2**20,
                    int(info["total_forks"]),
                    info["latest_fork_usec"] / 1000.0,
                    bool(info["rdb_bgsave_in_progress"]),
                    bool(info["aof_rewrite_in_progress"]),
                )
            )

    def run(self) -> None:
        while not self.stop.wait(EVERY_S):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self.thread = threading.Thread(target=self.run, name="redis-watch", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def windows(self, window_s: float) -> list[dict[str, Any]]:
        rows: dict[int, list[Sample]] = {}
        for s in self.samples:
            rows.setdefault(int(s.at // window_s), []).append(s)
        out = []
        previous: Sample | None = None
        for w in sorted(rows):
            inside = rows[w]
            forks = 0
            longest = 0.0
            for s in inside:
                if previous is not None:
                    begun = s.forks - previous.forks if s.forks >= previous.forks else s.forks
                    forks += begun
                    if begun:
                        longest = max(longest, s.fork_ms)
                previous = s
            out.append(
                {
                    "from_s": round(w * window_s),
                    "used_mb": round(inside[-1].used_mb, 1),
                    "forks": forks,
                    "longest_fork_ms": round(longest, 1),
                    "saving_share": round(sum(s.saving for s in inside) / len(inside), 3),
                    "rewriting_share": round(sum(s.rewriting for s in inside) / len(inside), 3),
                }
            )
        return out
