"""Resident memory of every process of the stack over the soak.

Every `EVERY_S` the sampler reads /proc/<pid>/statm of each process whose
environment names the home (Ray's GCS, raylet, dashboard and agents, the Serve
controller, HAProxy, every replica, the embedded Redis). A process is named by what
it runs (`ServeReplica:rankgate:RankIngress`, `raylet`, `valkey-server`...), with
its pid, since a fault may replace it.

Growth per hour is the slope of a least-squares line through a process's samples
after the warm-up (the run's, and for a process started later, such as a replica a
fault replaced, its own first `warmup_s`), as a share of its resident memory when
the warm-up ended; a process that lived less than `MIN_LIFE_S` after it has no
figure.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from loadtests.ray_metrics import own_processes

EVERY_S = 10.0
MIN_LIFE_S = 600.0
PAGE = os.sysconf("SC_PAGE_SIZE")
NAMES = (
    b"ServeReplica:",
    b"ServeController",
    b"HAProxyManager",
    b"ProxyActor",
    b"gcs_server",
    b"raylet",
    b"dashboard",
    b"runtime_env",
    b"log_monitor",
    b"monitor.py",
    b"valkey-server",
    b"haproxy",
    b"serving.ops.supervisor",
    b"serve run",
)


def process_name(command: bytes) -> str:
    parts = command.split(b"\0")
    joined = b" ".join(parts)
    for name in NAMES:
        if name in joined:
            at = joined.index(name)
            word = joined[at:].split(b" ")[0].decode(errors="replace")
            # Ray titles an actor by the method it runs (`ServeController.apply_config`).
            return word.split(".")[0] if word.startswith("Serve") else word
    return Path(parts[0].decode(errors="replace")).name


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class MemorySampler:
    home: Path
    redis_pid_file: Path | None = None
    started: float = field(default_factory=time.monotonic)
    samples: dict[tuple[str, int], list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        now = time.monotonic() - self.started
        found = own_processes(self.home, b"")
        # The embedded Redis writes its process title over its environment: found by
        # its pid file instead.
        with contextlib.suppress(OSError, ValueError):
            redis_pid = int(self.redis_pid_file.read_text().strip()) if self.redis_pid_file else 0
            if redis_pid and redis_pid not in {pid for pid, _ in found}:
                found.append((redis_pid, b"valkey-server"))
        for pid, command in found:
            if pid == os.getpid():
                continue
            rss = rss_bytes(pid)
            if rss is not None:
                self.samples[(process_name(command), pid)].append((now, rss))

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
            # After the run's warm-up and the process's own (a replica a fault replaced
            # loads its models and fills its caches first, as at the start).
            since = max(warmup_s, series[0][0] + warmup_s if series[0][0] > 0 else 0.0)
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
