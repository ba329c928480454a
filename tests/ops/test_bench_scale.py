"""`rankgate bench --scale` at a tiny size, end to end: init, setup, a real server,
requests, events and an off-policy evaluation, and a report with every figure.
Its pure parts (sizes, setup's phases, the growth ratios) are checked first."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from loadtests.scale import phase_name
from loadtests.scale_project import Size, parse_size, short
from loadtests.scale_report import figure_rows, growth


def test_sizes_are_read_and_named() -> None:
    assert parse_size("1e5,1e4,1e6") == Size(100_000, 10_000, 1_000_000)
    assert parse_size(" 2000, 600 ,5000") == Size(2000, 600, 5000)
    assert Size(10**6, 10**5, 10**7).label == "1e6/1e5/1e7"
    assert short(2500) == "2500"
    for bad, why in (
        ("1e5,1e4", "three numbers"),
        ("1,x,3", "'x' is not a number"),
        ("1,0,3", "'0' is not a whole number"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_size(bad)


def test_setup_phases_are_named_from_its_output() -> None:
    assert phase_name("• data: running prepare.py ...") == "prepare"
    assert phase_name("• feature repository: applying ...") == "apply"
    assert phase_name("• online store: materializing feature views into Redis ...") == (
        "materialize"
    )
    assert phase_name("• model v3: training ...") == "train v3"
    assert phase_name("• demo consent records: writing 5 users × 2 purposes ...") == "consent"
    assert phase_name("setup complete.") == "end"
    assert phase_name("    views: a, b") is None
    assert phase_name("✓ catalogue: 40 items; policies 0.1 check out") is None


def test_the_bench_refuses_a_bad_size_before_starting_anything(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rankgate.cli.main import main

    result = CliRunner().invoke(
        main, ["bench", "--scale", "1e5,1e4", "--scratch", str(tmp_path / "s")]
    )
    assert result.exit_code == 1
    assert "error: --scale: '1e5,1e4': three numbers" in result.output
    assert not (tmp_path / "s").exists()


def scaled(value: Any, factor: float) -> Any:
    """A report's figures (numbers anywhere inside), each times `factor`."""
    if isinstance(value, dict):
        return {k: scaled(v, factor) for k, v in value.items()}
    if isinstance(value, list):
        return [scaled(v, factor) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


@pytest.mark.slow
def test_scale_bench_at_a_tiny_size_reports_every_figure(tmp_path: Path) -> None:
    """One size, in this process (its server, setup and Redis in their own): about 90 s."""
    from loadtests.scale import run_scale
    from loadtests.scale_report import render

    lines: list[str] = []
    output = tmp_path / "out"
    report = run_scale(
        [Size(2000, 600, 5000)],
        output,
        lines.append,
        scratch=tmp_path / "scratch",
        duration=0.5,
        evaluate_rows=100,
    )
    assert report["sizes"] == ["2e3/6e2/5e3"]
    assert json.loads((output / "scale.json").read_text())["sizes"] == report["sizes"]
    result = report["results"]["2e3/6e2/5e3"]
    figures = figure_rows(result)
    expected = {
        "setup: total s",
        "setup: prepare s",
        "setup: apply s",
        "setup: materialize s",
        "setup: consent s",
        "setup: peak RSS MiB",
        "redis: used MiB",
        "redis: bytes per person",
        "redis: bytes per item",
        "serve: start s (until /healthz 200)",
        "serve: replica RSS MiB (at start)",
        "serve: replica PSS MiB (at start)",
        "events: accepted per s",
        "events: s until an event after the burst is decided on",
        "event-to-decision at 0 events/s: client p50 ms",
        "event-to-decision at 100 events/s: server p50 ms",
        "model evaluate: s",
        "throughput: server CPU ms per decision",
        "throughput: Redis CPU ms per decision",
        "throughput (100 candidates, concurrency 8): decisions per s",
        *(f"setup: train {v} s" for v in ("v1", "v2", "v3")),
        *(
            f"rank {label}, {budget} budget: {q} ms"
            for label in ("10 candidates", "100 candidates", "500 candidates", "whole catalogue")
            for budget in ("default", "max")
            for q in ("p50", "p99")
        ),
    }
    assert expected <= set(figures), expected - set(figures)
    for name in expected:
        # Measured, not placeholders: every figure a positive number.
        assert math.isfinite(figures[name]) and figures[name] > 0, (name, figures[name])
    served = result["served"]
    assert served["memory"]["replicas"]["count"] >= 1
    assert all(row["errors"] == 0 and row["requests"] > 0 for row in served["rank"].values())
    assert served["ingest"]["refused"] == 0
    assert all(row["probes"] > 0 for row in served["freshness"].values())
    assert result["redis"]["keys"] > 2000 + 600  # feature rows, consent records, items
    # 600 items are ranked whole (below retrieval.above_items): the served answers are
    # the exhaustive ranking, so the recall measurement must find exactly that.
    assert figures["retrieval: recall@10 vs whole catalogue (mean)"] == 1.0
    assert figures["retrieval: decisions compared"] > 0
    assert figures["item index: faiss bytes per item"] > 0
    text = (output / "scale.md").read_text()
    assert "| figure | 2e3/6e2/5e3 |" in text
    assert "| rank whole catalogue, max budget: p99 ms |" in text
    # Each figure's growth from the smallest size to the largest.
    two = {"small": result, "large": scaled(result, 2.0)}
    ratios = growth(two)
    assert {ratios[name] for name in expected} == {2.0}
    assert figures["model evaluate: slots drawn (each over the whole catalogue)"] == 100
    assert figures["model evaluate: log rows read"] == 5000
    table = render({**report, "results": two, "growth": ratios})
    assert "| figure | small | large | largest / smallest |" in table
    assert "| events: accepted per s |" in table and "| 2× |" in table
