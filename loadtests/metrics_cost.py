"""What recording one request's metrics costs a replica: through Ray's metrics, and
through a prometheus_client registry of the process (what replicas used before).

    python -m loadtests.metrics_cost [--rounds 9] [--number 2000]

Starts a small Ray instance of its own (one CPU, no dashboard; HTTP on a free
port) and one Ray Serve deployment, so that Ray's metrics carry the tags Serve
adds in a replica (deployment, replica, application). Its replica times the
recording calls of one personalized answer (`ServingMetrics.observe` with six
stage timings, two feature ages, one batch size: 12 records) with `timeit`, in
rounds that interleave the ways of recording (their order alternates): into
prometheus_client (as replicas did before), through Ray at each call, and
through Ray buffered as replicas do now (the request path, then the flush that
hands a round's records to Ray, per request). It prints per way the median over
rounds of microseconds per request, and the lowest and highest round. The machine's other work moves every way alike
within a round; the medians are what to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import timeit
from collections.abc import Callable
from typing import Any

from serving.contract.schemas import ModelRef, PolicyBlock, RankedItem, RankRequest, RankResponse
from serving.observe.metrics import ServingMetrics

REQUEST = RankRequest.model_construct(user_id="u-1", purpose="onsite_personalization", region="EU")
RESPONSE = RankResponse(
    request_id="r",
    items=[RankedItem(item_id=3, rank=1, score=0.5)],
    model=ModelRef(name="ranker", version="v2", variant="stable"),
    fallback=None,
    policy=PolicyBlock(decision="personalize", version="1", checks=[]),
    timings_ms={
        "queued": 0.4,
        "policy": 0.3,
        "features": 0.6,
        "rank": 0.5,
        "explain": 0.0,
        "total": 1.9,
    },
)
VIEWS = ("visitor_profile", "user_item_affinity")
FLUSH = "Ray, buffered: flush thread"
TOTAL = "Ray, buffered: both"
RECORDS = 2 + len(RESPONSE.timings_ms) + 1 + len(VIEWS) + 1
"""requests, decisions, stage timings, scored, feature ages, batch size."""


def record_request(metrics: ServingMetrics) -> None:
    """What a replica records for one personalized answer (stages.py, app.py, metrics.py)."""
    for view in VIEWS:
        metrics.child(metrics.feature_age, view).observe(120.0)
    metrics.child(metrics.batch_size, "v2").observe(1)
    metrics.observe(REQUEST, RESPONSE)


def record_request_tags_per_call(metrics: ServingMetrics) -> None:
    """The same records through Ray's metrics with a tag dictionary built per call
    (Ray's documented usage), instead of each series keeping its own."""
    for view in VIEWS:
        metrics.feature_age.metric.observe(120.0, {"view": view})
    metrics.batch_size.metric.observe(1.0, {"model_version": "v2"})
    labels = {"purpose": REQUEST.purpose, "model_version": "v2", "variant": "stable"}
    metrics.requests.metric.inc(1, {"outcome": "personalized", **labels})
    metrics.decisions.metric.inc(1, {"purpose": REQUEST.purpose, "decision": "personalize"})
    for stage, ms in RESPONSE.timings_ms.items():
        metrics.stage_seconds.metric.observe(
            ms / 1000.0, {"stage": stage, "model_version": "v2", "variant": "stable"}
        )
    metrics.scored.metric.inc(1, {"model_version": "v2"})


def measure(rounds: int, number: int) -> dict[str, list[float]]:
    """Microseconds per request of each way, one figure per round (run in a replica)."""
    local = ServingMetrics(to_ray=False)
    direct = ServingMetrics(to_ray=True, flush_s=None)
    buffered = ServingMetrics(to_ray=True, flush_s=None)  # flushed here, timed apart

    def buffered_flush() -> None:
        buffered.flush()

    ways: dict[str, Callable[[], None]] = {
        "prometheus_client": lambda: record_request(local),
        "Ray, recorded per call": lambda: record_request_tags_per_call(direct),
        "Ray, buffered: request path": lambda: record_request(buffered),
    }
    figures: dict[str, list[float]] = {name: [] for name in [*ways, FLUSH, TOTAL]}
    for n in range(rounds):
        order = list(ways) if n % 2 == 0 else list(reversed(ways))
        for name in order:
            figures[name].append(timeit.timeit(ways[name], number=number) / number * 1e6)
            if ways[name] is ways["Ray, buffered: request path"]:
                figures[FLUSH].append(timeit.timeit(buffered_flush, number=1) / number * 1e6)
        figures[TOTAL].append(figures["Ray, buffered: request path"][-1] + figures[FLUSH][-1])
    return figures


def run_in_replica(rounds: int, number: int) -> dict[str, list[float]]:
    import ray
    from ray import serve

    from rankgate.core.settings import put_checkout_on_path
    from serving.ops.launch import free_port

    put_checkout_on_path(os.environ)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})

        @serve.deployment(ray_actor_options={"num_cpus": 0.5})
        class MetricsCost:
            def measure(self, rounds: int, number: int) -> dict[str, list[float]]:
                return measure(rounds, number)

        app = MetricsCost.bind()  # type: ignore[attr-defined]
        handle = serve.run(app, name="metrics-cost", route_prefix=None)
        result: dict[str, list[float]] = handle.measure.remote(rounds, number).result(
            timeout_s=1800
        )
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def report(figures: dict[str, list[float]], rounds: int, number: int) -> str:
    lines = [
        f"per request ({RECORDS} records), {rounds} interleaved rounds of {number} requests:",
        f"{'way':34} {'median us':>10} {'lowest':>8} {'highest':>8} {'per record':>11}",
    ]
    for name, values in figures.items():
        median = statistics.median(values)
        lines.append(
            f"{name:34} {median:10.1f} {min(values):8.1f} {max(values):8.1f} "
            f"{median / RECORDS:11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--number", type=int, default=2000)
    args: Any = parser.parse_args(argv)
    print(report(run_in_replica(args.rounds, args.number), args.rounds, args.number))


if __name__ == "__main__":
    main()
