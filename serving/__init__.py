"""The scoring graph: stages as plain classes, wrapped as Ray Serve deployments in app.py."""

import os
import sys

# Importing Feast sets PROMETHEUS_MULTIPROC_DIR to a temporary folder of its own
# (for its pre-fork feature server), and prometheus_client imported after that,
# or in a process that inherited it, keeps every metric value in mmap'd files: a
# lock, a getpid() and a file write per increment on the request path. A serving
# process keeps its metrics in memory (serving/observe/metrics.py): unless prometheus_client
# has already chosen, a folder Feast chose is dropped and the choice is made now,
# before any import of Feast (`rankgate serve` also keeps it out of the server's
# environment: serving/ops/launch.py).
FEAST_METRICS_ENV = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")


def without_feast_metrics_dir(env: dict[str, str]) -> dict[str, str]:
    """`env` without the multiprocess metrics folder a Feast import set."""
    return {
        name: value
        for name, value in env.items()
        if not (name in FEAST_METRICS_ENV and os.path.basename(value).startswith("feast_metrics_"))
    }


if "prometheus_client.values" not in sys.modules:
    for _name in FEAST_METRICS_ENV:
        if os.path.basename(os.environ.get(_name, "")).startswith("feast_metrics_"):
            del os.environ[_name]

try:
    import prometheus_client.values  # noqa: F401 - before any import of Feast
except ImportError:  # `rankgate serve`'s supervisor runs without site-packages (nor Feast)
    pass
