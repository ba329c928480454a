"""Load tests (Locust) and the benchmark (`rankgate bench`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rankgate.core.errors import RankgateError
from rankgate.core.settings import SOURCE_CHECKOUT, get_settings

LOADTEST_EXTRA = "pip install 'rankgate[loadtest]'"


def results_folder() -> Path:
    """Where results are written by default: loadtests/results/ of a source checkout
    (the measured figures are kept in the repository), else `results/` in the home."""
    if SOURCE_CHECKOUT is not None:
        return SOURCE_CHECKOUT / "loadtests" / "results"
    return get_settings().home_folder / "results"


def require_locust() -> None:
    """Locust is an extra (`rankgate[loadtest]`), not a dependency of the server."""
    if importlib.util.find_spec("locust") is None:
        raise RankgateError(
            f"`rankgate loadtest` runs Locust, which is not installed: {LOADTEST_EXTRA}"
        )


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a server's log, for an error message: the log itself
    may be gone by the time anyone reads it (a test's temporary home)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(log unreadable: {error})"
