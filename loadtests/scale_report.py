"""The report of `rankgate bench --scale`: every figure of a size by name, each
figure's growth across sizes, and the Markdown table (loadtests/scale.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loadtests.scale_served import (
    EVENT_BATCH,
    EVENT_CLIENTS,
    FRESHNESS_CANDIDATES,
    THROUGHPUT_CANDIDATES,
    THROUGHPUT_CONCURRENCY,
)

Say = Callable[[str], None]


def figure_rows(result: dict[str, Any]) -> dict[str, float]:
    """Every figure of one size, by its name in the report."""
    rows: dict[str, float] = {}
    setup = result["setup"]
    rows["setup: total s"] = setup["total_s"]
    for phase, seconds in setup["phases_s"].items():
        rows[f"setup: {phase} s"] = seconds
    rows["setup: peak RSS MiB"] = setup["peak_rss_mib"]
    redis = result["redis"]
    rows["redis: used MiB"] = redis["used_memory_mib"]
    rows["redis: bytes per person"] = redis["per_person_bytes"]
    rows["redis: bytes per item"] = redis["per_item_bytes"]
    served = result["served"]
    rows["serve: start s (until /healthz 200)"] = served["start_s"]
    replicas = served["memory"]["replicas"]
    rows["serve: replicas"] = replicas["count"]
    rows["serve: replica RSS MiB (at start)"] = replicas["rss_total_mib"]
    rows["serve: replica PSS MiB (at start)"] = replicas["pss_total_mib"]
    after = served["memory_after"]
    rows["serve: replica RSS MiB (after load)"] = after["replicas"]["rss_total_mib"]
    rows["serve: stack RSS MiB (after load)"] = after["stack"]["rss_total_mib"]
    rows["serve: stack PSS MiB (after load)"] = after["stack"]["pss_total_mib"]
    for key, row in served["rank"].items():
        count, budget = key.split("@")
        label = "whole catalogue" if count == "all" else f"{count} candidates"
        rows[f"rank {label}, {budget} budget: p50 ms"] = row["p50_ms"]
        rows[f"rank {label}, {budget} budget: p99 ms"] = row["p99_ms"]
        rows[f"rank {label}, {budget} budget: budget exhausted share"] = row[
            "budget_exhausted_share"
        ]
    if "retrieval" in served:
        rows.update(retrieval_rows(served["retrieval"]))
    load = served["throughput"]
    where = f"{THROUGHPUT_CANDIDATES} candidates, concurrency {THROUGHPUT_CONCURRENCY}"
    rows[f"throughput ({where}): decisions per s"] = load["decisions_per_s"]
    rows[f"throughput ({where}): p99 ms"] = load["p99_ms"]
    rows[f"throughput ({where}): budget exhausted share"] = load["budget_exhausted_share"]
    rows["throughput: server CPU ms per decision"] = load["server_cpu_ms_per_decision"]
    rows["throughput: Redis CPU ms per decision"] = load["redis_cpu_ms_per_decision"]
    rows["events: accepted per s"] = served["ingest"]["events_per_s"]
    rows["events: s until an event after the burst is decided on"] = served["ingest"]["caught_up_s"]
    for rate, row in served["freshness"].items():
        rows[f"event-to-decision at {rate} events/s: probes"] = row["probes"]
        rows[f"event-to-decision at {rate} events/s: client p50 ms"] = row["client_p50_ms"]
        rows[f"event-to-decision at {rate} events/s: client p99 ms"] = row["client_p99_ms"]
        rows[f"event-to-decision at {rate} events/s: server p50 ms"] = row["server_p50_ms"]
    evaluation = result["evaluate"]
    rows["model evaluate: log rows read"] = evaluation["log_rows"]
    rows["model evaluate: slots drawn (each over the whole catalogue)"] = evaluation["rows"]
    rows["model evaluate: s"] = evaluation["seconds"]
    rows["model evaluate: the command's imports s"] = evaluation["command_imports_s"]
    rows["model evaluate: scored pairs per s"] = evaluation["scored_pairs_per_s"]
    return rows


def retrieval_rows(retrieval: dict[str, Any]) -> dict[str, float]:
    """Requests without candidates: latency by stage, recall, the item index."""
    rows: dict[str, float] = {}
    latency, recall, index = retrieval["latency"], retrieval["recall"], retrieval["index"]
    rows["no candidates (retrieval), one client: client p50 ms"] = latency["client_p50_ms"]
    rows["no candidates (retrieval), one client: client p99 ms"] = latency["client_p99_ms"]
    for stage in ("policy", "features", "retrieve", "rank", "total"):
        for q in ("p50", "p99"):
            rows[f"no candidates: server {stage} {q} ms"] = latency[f"{stage}_{q}_ms"]
    answered = sum(latency["answers"].values()) or 1
    rows["no candidates: personalized share"] = round(
        latency["answers"].get("personalized", 0) / answered, 3
    )
    if recall.get("decisions"):
        rows["retrieval: recall@10 vs whole catalogue (mean)"] = recall["recall_at_10_mean"]
        rows["retrieval: recall@10 (p10 of decisions)"] = recall["recall_at_10_p10"]
        rows["retrieval: decisions compared"] = recall["decisions"]
        rows["retrieval: items the ranker scored per decision"] = recall["retrieved_per_decision"]
    if index:
        rows["item index: dimensions"] = index["dims"]
        rows["item index: build s (replica start)"] = index["build_s"]
        rows["item index: faiss bytes per item"] = index["faiss_bytes_per_item"]
        rows["item index: artifact bytes per item"] = index["artifact_bytes_per_item"]
    return rows


def growth(results: dict[str, Any]) -> dict[str, float | None]:
    """Each figure at the largest size over the same at the smallest."""
    if len(results) < 2:
        return {}
    tables = [figure_rows(r) for r in results.values()]
    first, last = tables[0], tables[-1]
    return {
        name: (round(last[name] / first[name], 2) if first.get(name) else None)
        for name in last
        if name in first
    }


def render(report: dict[str, Any]) -> str:
    labels = list(report["results"])
    tables = {label: figure_rows(report["results"][label]) for label in labels}
    names: list[str] = []
    for table in tables.values():
        names += [n for n in table if n not in names]
    ratio = len(labels) >= 2
    header = "| figure | " + " | ".join(labels) + (" | largest / smallest |" if ratio else " |")
    lines = [
        "# rankgate at scale",
        "",
        (
            f"Measured {report['measured_at']} on {report['cores']} cores: `rankgate bench "
            f"--scale` at {', '.join(labels)} (people/items/impressions). Each size: the "
            "template's sample shop generated at that size (`rankgate init --sample-size`) "
            "with a streaming view of each person's recent clicks and model v3 reading it, "
            "set up in a fresh home, then served (one `serve run` of the project's serve "
            "config, v3 stable). Latency: one client, closed loop, "
            f"{report['duration_s']:g} s per row; events: "
            f"{EVENT_CLIENTS} clients posting batches of {EVENT_BATCH}; event-to-decision: "
            "loadtests/freshness.py's probe (an event, then rank requests of "
            f"{FRESHNESS_CANDIDATES} candidates until one includes it); throughput: "
            f"{THROUGHPUT_CONCURRENCY} clients, closed loop, {THROUGHPUT_CANDIDATES} "
            "candidates, with the CPU the server's processes and Redis spent per decision; "
            f"`model evaluate --slots {report['evaluate_rows']}` on the whole log, each slot a "
            "decision over the whole catalogue."
        ),
        "",
        header,
        "|---" * (len(labels) + 1 + int(ratio)) + "|",
    ]
    for name in names:
        cells = [fmt(tables[label].get(name)) for label in labels]
        row = f"| {name} | " + " | ".join(cells)
        if ratio:
            grew = report["growth"].get(name)
            row += f" | {fmt(grew)}×" if grew is not None else " | —"
        lines.append(row + " |")
    lines += [
        "",
        (
            "Setup phases are timed from `rankgate setup`'s own output lines (*start*: its "
            "imports and the embedded Redis; *prepare*: the generator and the project's "
            "checks). Redis bytes per person: the person's feature row and consent record "
            "(`MEMORY USAGE` of sampled keys, scaled to the key count). Replica memory: the "
            "`ray::ServeReplica` processes; stack: every process the server started. "
            "`model evaluate` is timed in-process; the command adds its imports."
        ),
    ]
    loads = {label: r.get("load_1min") for label, r in report["results"].items()}
    if all(loads.values()):
        lines += [
            "",
            "Load average (1 min) of the machine at each size's start and end: "
            + "; ".join(f"{label} {a}–{b}" for label, (a, b) in loads.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:g}"
