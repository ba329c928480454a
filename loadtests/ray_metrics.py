"""A local rankgate server's metrics, read as Prometheus reads them.

Replicas export their metrics through Ray (serving/observe/metrics.py): each node's Ray
metrics agent serves them, and Ray lists the agents in its service-discovery
file, `<session dir>/prom_metrics_service_discovery.json` (what
loadtests/grafana/prometheus.yml gives Prometheus). `scrape` reads every target
of that file; `total` sums a metric over replicas and nodes, as `sum by` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

DISCOVERY_FILE = "prom_metrics_service_discovery.json"
PREFIX = "ray_"
"""Ray's prefix of every exported name: rankgate_rank_requests -> ray_rankgate_rank_requests."""


def own_processes(home: Path, marker: bytes) -> list[tuple[int, bytes]]:
    """(pid, command line) of this home's server processes whose command line has `marker`.

    Other Ray instances may run on the machine (other homes, other work): a process
    is ours when its environment names our home."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in command and f"RANKGATE_HOME={home}".encode() in environ:
            found.append((int(entry.name), command))
    return found


def ray_session_dir(home: Path) -> Path:
    """The Ray session folder of this home's server, from its raylet's command line
    (never `session_latest`, which names whichever instance started last)."""
    for _, command in own_processes(home, b"raylet"):
        for arg in command.split(b"\0"):
            if arg.startswith(b"--session_dir="):
                return Path(arg.split(b"=", 1)[1].decode())
    raise RuntimeError(f"no raylet of the server of {home} found")


def targets(session_dir: Path) -> list[str]:
    """host:port of every metrics agent (and Ray's own exporters) the file lists."""
    groups = json.loads((session_dir / DISCOVERY_FILE).read_text())
    return [target for group in groups for target in group["targets"]]


def scrape(session_dir: Path) -> list[Sample]:
    """Every sample of every target, as one Prometheus scrape round would read them."""
    samples: list[Sample] = []
    for target in targets(session_dir):
        text = httpx.get(f"http://{target}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            samples += family.samples
    return samples


def matches(sample: Sample, name: str, labels: dict[str, str]) -> bool:
    """`sample` is of `name` (without Ray's prefix) and has `labels` ("": no such label
    or an empty one, as Prometheus treats them)."""
    return sample.name == PREFIX + name and all(
        sample.labels.get(key, "") == value for key, value in labels.items()
    )


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name` over every series with `labels`: over replicas and nodes."""
    return sum(s.value for s in samples if matches(s, name, labels))
