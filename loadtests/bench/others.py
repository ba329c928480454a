"""The report's "Other systems" section: what `--with` adds beside rankgate and the
floor (the naive Ray Serve graph, rankgate without its audit log, rankgate with two
ingress replicas), each set against rankgate's own rows of the same rounds."""

from __future__ import annotations

from typing import Any

from loadtests.bench.figures import FLOOR, OURS, PEAK_P99_MS, at_level, peak


def other_systems_markdown(report: dict[str, Any]) -> list[str]:
    lines = []
    results = report["results"]
    if "naive_graph" in results and results.get(OURS):
        ours_peak = peak(results[OURS])["rps"]
        naive_peak = peak(results["naive_graph"])["rps"]
        c1_ours, c1_naive = at_level(results[OURS], 1), at_level(results["naive_graph"], 1)
        peak_text = (
            f"peak {ours_peak / naive_peak:.2f}×"
            if naive_peak
            else f"peak: the graph had no level with p99 ≤ {PEAK_P99_MS:g} ms"
        )
        p50_text = (
            f", p50 at concurrency 1 {c1_ours['p50_ms'] / c1_naive['p50_ms']:.2f}×"
            if c1_ours and c1_naive and c1_naive["p50_ms"]
            else ""
        )
        lines.append(f"- Against the naive Ray Serve graph: {peak_text}{p50_text}.")
    if "rankgate_no_audit" in results and results.get(OURS):
        figures = "; ".join(
            f"c={on['concurrency']}: p50 {on['p50_ms'] - off['p50_ms']:+.2f} ms, "
            f"throughput ×{on['throughput_rps'] / off['throughput_rps']:.3f}"
            for on, off in zip(results[OURS], results["rankgate_no_audit"], strict=True)
            if off["throughput_rps"]
        )
        lines.append(
            f"- Decision audit log: {figures} (rankgate with the log vs the same server without it)."
        )
    if "rankgate_two_replicas" in results and results.get(OURS):
        lines.append(two_replicas_line(results))
    return ["", "## Other systems", "", *lines] if lines else []


def two_replicas_line(results: dict[str, list[dict[str, Any]]]) -> str:
    """Two ingress replicas against one and against the floor: peaks (p99 within the
    bound) of the median rows, and each level's throughput."""
    one, two = peak(results[OURS]), peak(results["rankgate_two_replicas"])
    floor = peak(results[FLOOR]) if results.get(FLOOR) else None
    if not two["rps"]:
        return f"- Two ingress replicas: no level with p99 ≤ {PEAK_P99_MS:g} ms."
    against = [
        f"{two['rps'] / one['rps']:.2f}× one replica's ({one['rps']:g})" if one["rps"] else ""
    ]
    if floor and floor["rps"]:
        against.append(f"{two['rps'] / floor['rps']:.2f}× the floor's ({floor['rps']:g})")
    levels = "; ".join(
        f"c={a['concurrency']}: {b['throughput_rps'] / a['throughput_rps']:.2f}×"
        for a, b in zip(results[OURS], results["rankgate_two_replicas"], strict=True)
        if a["throughput_rps"]
    )
    return (
        f"- Two ingress replicas: peak {two['rps']:g} req/s at c={two['concurrency']}, "
        f"{', '.join(a for a in against if a)}; throughput against one replica per level: "
        f"{levels}."
    )
