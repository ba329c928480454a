"""Explanations on a sample of traffic, for the audit trail, off the response path.

A share of model-ranked decisions (`explainer.sample_rate`) gets its SHAP
explanation after the answer is sent: the record of such a decision is held
(serving/observe/audit.py `hold`), the rows go to one worker thread, and when their
contributions come back the record gets its `explanation` and is queued. A
sample that cannot be explained (queue full, no explainer, an error) still
writes its record, saying why: an audit record is never lost to sampling.

Why a thread and not a task on the event loop: SHAP is CPU-bound, and a task
would stall every request of the replica for the whole computation. LightGBM's
TreeSHAP runs in C++ behind ctypes, which releases the GIL, so the thread costs
the event loop only the short Python parts of a call; it computes with one
thread (model_store.native.contributions), leaving the other core to serving.
At most `explainer.sample_queue` samples are outstanding: a burst skips samples
(counted) rather than building a backlog.

Which decisions: chosen by a hash of the request id, so the sample is uniform
and independent of the person and the answer, and whether a record should have
been sampled can be checked from its id alone. A chosen decision whose answer
already carries its explanation (`explain: true`) is not computed again.
Fallback answers are never chosen: no model ranked them, there is nothing to
explain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.contract.schemas import Reason

logger = logging.getLogger("ray.serve")
THREADS = 1
"""Threads one sampled explanation computes with: the other core stays for serving."""

ExplanationObserver = Callable[[str, np.ndarray], None]
"""Called with (model version, contributions: rows x model inputs) of each
explanation in the sample; on the event loop, so it must be quick."""


def chosen(request_id: str, rate: float) -> bool:
    """Whether the decision `request_id` is in the sample of `rate` (0..1)."""
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


class Explains(Protocol):
    """What the worker needs of an explainer (serving/ranking/explainer.py)."""

    def contributions(self, rows: np.ndarray, threads: int | None = None) -> np.ndarray: ...

    def reasons(self, values: np.ndarray) -> list[list[Reason]]: ...


@dataclass(frozen=True)
class SampledExplanation:
    """A sampled explanation as computed: contributions and reasons, or the error."""

    contributions: np.ndarray | None
    reasons: list[list[Reason]] | None
    error: str | None
    """The exception's type name when the explainer failed."""
    seconds: float


@dataclass(frozen=True)
class Job:
    explainer: Explains
    rows: np.ndarray
    loop: asyncio.AbstractEventLoop
    done: Callable[[SampledExplanation], None]


class ExplanationWorker:
    """One background thread that computes sampled explanations.

    `submit` is called on the event loop; `done` is called back on that loop
    (so it may touch the audit writer and metrics, which are not thread-safe).
    The thread starts with the first job and lives as long as the process."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.outstanding = 0
        """Jobs submitted and not yet called back (touched on the event loop only)."""
        self.thread: threading.Thread | None = None

    def submit(
        self,
        explainer: Explains,
        rows: np.ndarray,
        limit: int,
        done: Callable[[SampledExplanation], None],
    ) -> bool:
        """Queue a job unless `limit` are outstanding; False: skipped, `done` is never called."""
        if self.outstanding >= limit:
            return False
        self.outstanding += 1

        def deliver(explanation: SampledExplanation) -> None:
            self.outstanding -= 1
            done(explanation)

        self.jobs.put(Job(explainer, rows, asyncio.get_running_loop(), deliver))
        if self.thread is None:
            self.thread = threading.Thread(
                target=self._work, name="rankgate-sampled-explanations", daemon=True
            )
            self.thread.start()
        return True

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            explanation = compute(job.explainer, job.rows)
            # A closed loop: the replica is stopping, its unwritten records go with it.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(job.done, explanation)


def compute(explainer: Explains, rows: np.ndarray) -> SampledExplanation:
    started = time.perf_counter()
    try:
        values = explainer.contributions(rows, threads=THREADS)
        reasons = explainer.reasons(values)
    except Exception as exc:  # noqa: BLE001 - the record is written all the same, saying so
        logger.warning("sampled explanation failed: %s", type(exc).__name__)
        return SampledExplanation(None, None, type(exc).__name__, time.perf_counter() - started)
    return SampledExplanation(values, reasons, None, time.perf_counter() - started)
