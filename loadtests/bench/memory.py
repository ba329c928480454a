"""What the whole serving stack holds in memory, per process.

The stack is every process a server started (the process tree of `serve run`:
Ray's GCS, raylet, dashboard and agents, the replicas, HAProxy) plus the
Redis-compatible server of the home. Per process: RSS, and PSS from
`/proc/PID/smaps_rollup` (shared pages divided among the processes sharing
them, so PSS adds up to what the stack really takes; RSS counts each shared
page once per process).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    name: str
    rss_bytes: int
    pss_bytes: int | None
    """None when smaps_rollup could not be read (another user's process, gone)."""


def process_label(name: str, cmdline: list[str]) -> str:
    """A short readable name: Ray's process titles (`ray::ServeReplica:...`), the
    script or module a Python process runs, or the executable's name."""
    if not cmdline:
        return name
    first = cmdline[0]
    if first.startswith(("ray::", "ray-dashboard-")):
        # Ray titles an actor by the method it runs now (`ray::ServeController.apply_config`).
        return first.split(" ")[0].split(".")[0]
    program = os.path.basename(first.split(" ")[0])
    if not program.startswith("python"):
        return program or name
    arguments = cmdline[1:]
    for flag in ("-m", "-c"):
        if flag in arguments and arguments.index(flag) + 1 < len(arguments):
            value = arguments[arguments.index(flag) + 1]
            # `-c` code: its first statement is enough to tell what it is.
            return f"python {flag} {value.split(';')[0].strip()[:60]}"
    scripts = [a for a in arguments if not a.startswith("-")]
    if not scripts:
        return program
    script = os.path.basename(scripts[0])
    if script == "serve" and len(scripts) > 1:
        return f"serve {scripts[1]}"
    return f"python {script}"


def pss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Pss of the process from smaps_rollup (kB there), or None if unreadable."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def measure(pid: int) -> ProcessMemory | None:
    import psutil

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            name, cmdline, rss = process.name(), process.cmdline(), process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return ProcessMemory(pid, process_label(name, cmdline), rss, pss_bytes(pid))


def tree(root: int) -> list[int]:
    """`root` and every process below it."""
    import psutil

    try:
        process = psutil.Process(root)
        return [root, *(child.pid for child in process.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def stack(roots: list[int], extra: list[int]) -> list[ProcessMemory]:
    """Every process of the trees of `roots`, then the `extra` processes (each once)."""
    seen: dict[int, ProcessMemory] = {}
    for pid in [p for root in roots for p in tree(root)] + extra:
        if pid not in seen and (found := measure(pid)) is not None:
            seen[pid] = found
    return list(seen.values())


def aggregate(processes: list[ProcessMemory]) -> dict[str, Any]:
    """The table (largest RSS first, MiB) and the totals of RSS and PSS."""
    rows = sorted(processes, key=lambda p: p.rss_bytes, reverse=True)
    pss_known = [p.pss_bytes for p in rows if p.pss_bytes is not None]
    return {
        "processes": [
            {
                **asdict(p),
                "rss_mib": round(p.rss_bytes / MIB, 1),
                "pss_mib": None if p.pss_bytes is None else round(p.pss_bytes / MIB, 1),
            }
            for p in rows
        ],
        "count": len(rows),
        "rss_total_mib": round(sum(p.rss_bytes for p in rows) / MIB, 1),
        "pss_total_mib": round(sum(pss_known) / MIB, 1),
        "pss_missing": len(rows) - len(pss_known),
    }
