"""`rankgate model report`: the page's sections from plain figures (what each says without
data, the manifest's sections rendered whatever fields they gain), and the real report
of the example's versions after real traffic, drawn by headless Chromium (Debian's
`chromium`; .ci/run installs it): its plots are SVG elements in the DOM and its
screenshot is not blank."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from model_store.approvals import Approval
from rankgate.cli.main import main
from rankgate.core.settings import get_project
from rankgate.ops.environment import Environment
from rankgate.ops.report.page import render
from rankgate.ops.report.sections import (
    DriftSection,
    OffPolicySection,
    OutcomeSection,
    Provenance,
    ReportData,
    ReportRequest,
    approval_row,
)
from serving.observe.drift_figures import read_history
from serving.observe.outcomes import project_outcomes, read_outcomes
from tests.conftest import Server

CHROMIUM_TIMEOUT_S = 60
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?!#)""", re.IGNORECASE)
"""An attribute that would load something: only in-page references (#id) are allowed."""


def provenance(
    lineage: dict[str, Any] | None, approvals: list[dict[str, Any]] | None
) -> Provenance:
    return Provenance(
        "/models/v9/manifest.json", "2026-12-01T00:00:00Z", lineage, approvals, None, None
    )


def empty_report(**provenance_of: Provenance) -> ReportData:
    return ReportData(
        request=ReportRequest("v9"),
        project="shop",
        namespace="rg_test",
        generated_at=0.0,
        offpolicy=OffPolicySection(None, "logs.parquet: field 'propensity' is missing"),
        outcomes=OutcomeSection([], 0.95),
        drift=DriftSection({"v9": []}, {"v9": None}),
        provenance=provenance_of or {"v9": provenance(None, None)},
    )


def test_sections_without_data_say_so_instead_of_drawing() -> None:
    page = render(empty_report())
    assert "<svg" not in page
    assert "No off-policy estimate: logs.parquet: field &#x27;propensity&#x27; is missing" in page
    assert "No impressions joined to answers of v9 yet" in page
    assert "No drift history for v9" in page
    assert "No lineage recorded for v9." in page
    assert "No approvals recorded for v9." in page
    assert not EXTERNAL.search(page) and "<script" not in page


def test_the_manifest_sections_are_rendered_whatever_fields_they_have() -> None:
    lineage = {
        "made_by": "rankgate model register",
        "data_regions": ["EU", "US"],
        "rows": 120000,
        "digest": "sha256:ab12",
        "trained_on": {"start": "2026-11-01T00:00:00Z", "end": "2026-11-30T00:00:00Z"},
    }
    approvals = [
        approval_row(
            Approval(
                version="v9",
                purpose="email_marketing",
                by="dana",
                at=datetime(2026, 12, 2, 10, tzinfo=UTC),
                policy_version="2026-12-01.1",
                evidence={
                    "estimator": "snips",
                    "value": 0.0041,
                    "baseline": "v2",
                    "baseline_value": 0.0038,
                    "low": -0.0002,
                    "high": 0.0009,
                    "confidence": 0.95,
                    "verdict": "cannot tell",
                },
                drift={"unavailable": "no drift window recorded for v9"},
            )
        )
    ]
    page = render(empty_report(v9=provenance(lineage, approvals)))
    for shown in ("data_regions", "EU, US", "120000", "sha256:ab12", "trained_on.start"):
        assert shown in page
    assert "1 approval(s)" in page
    for shown in (
        "<th>by</th>",
        "<td>dana</td>",
        "email_marketing",
        "snips 0.0041 vs v2 0.0038; difference [-0.0002, 0.0009] at 95%, cannot tell",
        "unavailable: no drift window recorded for v9",
    ):
        assert shown in page
    assert "No approvals recorded" not in page


def test_a_long_drift_history_is_drawn_thinned_without_losing_a_peak() -> None:
    from rankgate.ops.report.figures import MAX_POINTS, feature_psi_over_time, thin
    from serving.observe.drift_figures import DriftFigures

    history = [
        DriftFigures("v9", 1e9 + 120 * i, 3600.0, 500, True, {"price": 0.01}, 0.02)
        for i in range(10_000)
    ]
    history[4321].feature_psi = {"price": 0.9}
    points = thin(history)
    assert len(points) <= MAX_POINTS
    assert max(p.feature_psi["price"] for p in points) == 0.9
    assert points[-1].at == history[-1].at
    svg = feature_psi_over_time("v9", history)
    assert svg.startswith("<svg") and len(svg) < 100_000


# -- the real report in headless Chromium -------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail(
            "Debian's chromium is not installed (the report test draws the page with it): "
            "apt-get install -y chromium (.ci/run does this when it runs as root)"
        )
    return found


def headless(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on `page` with its own profile folder, never hanging the suite."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
        page.as_uri(),
    ]
    # Its own process group: on a timeout the browser's helper processes go with it.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {' '.join(command)}")
    assert process.returncode == 0, stderr[-2000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def send_traffic(server: Server, users: list[str], answers: int = 40) -> None:
    """Answers of the stable version with their impressions, and a click on every 4th
    answer's first item (the served project's outcome types)."""
    outcomes = project_outcomes(get_project())
    assert outcomes is not None and outcomes.impression and outcomes.click
    events: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=10) as client:
        for n in range(answers):
            user = users[n % len(users)]
            body = {"user_id": user, "purpose": "onsite_personalization", "region": "US", "k": 5}
            answer = client.post("/v1/rank", json={**body, "budget_ms": 500}).json()
            if answer["model"] is None:
                continue
            kinds = [outcomes.impression] + ([outcomes.click] if n % 4 == 0 else [])
            for position, item in enumerate(answer["items"]):
                for kind in kinds if position == 0 else kinds[:1]:
                    events.append(
                        {
                            "event_id": uuid.uuid4().hex,
                            "type": kind,
                            "user_id": user,
                            "item_id": item["item_id"],
                            "timestamp": time.time(),
                            "request_id": answer["request_id"],
                        }
                    )
        assert events, "no answer came from a model"
        for start in range(0, len(events), 200):  # the most one batch may carry
            posted = client.post("/v1/events", json={"events": events[start : start + 200]})
            assert posted.status_code == 202, posted.text


def wait_for(what: str, found: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not found():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s"
        time.sleep(0.5)


def test_the_report_of_the_example_draws_its_plots_in_headless_chromium(
    server: Server, personalizable: list[str], tmp_path: Path
) -> None:
    env = Environment.open()
    namespace = env.home.namespace
    send_traffic(server, personalizable)
    wait_for(
        "joined impressions of v2",
        lambda: read_outcomes(env.redis, namespace, "v2", "stable").impressions > 0,
    )
    # Replicas fold and write their drift figures every drift.refresh_s (5 s here).
    wait_for(
        "drift history of v2",
        lambda: any(f.feature_psi for f in read_history(env.redis, namespace, "v2")),
    )

    out = tmp_path / "report.html"
    started = time.perf_counter()
    result = CliRunner().invoke(
        main, ["model", "report", "v2", "--against", "v1", "--out", str(out)]
    )
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert "off-policy: 10000 logged slots, 38 clicks" in result.output, result.output
    page = out.read_text()
    # Real numbers from the example's log, and nothing the page would fetch.
    assert "10000 logged slots with 38 clicks" in page
    assert not EXTERNAL.search(page) and "<script" not in page and "<link" not in page
    assert elapsed < 60, f"the report took {elapsed:.1f} s"

    for refused, message in (
        (["v9"], "no model version 'v9'"),
        (["v2", "--against", "v2"], "--against v2: names VERSION itself"),
    ):
        elsewhere = tmp_path / "refused.html"
        result = CliRunner().invoke(main, ["model", "report", *refused, "--out", str(elsewhere)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not elsewhere.exists()

    dom = headless(out, tmp_path / "profile-dom", "--dump-dom").stdout
    svgs = re.findall(r"<svg\b", dom)
    # Off-policy estimates and differences, click rate per variant and per position,
    # score PSI over time, v2's input PSI over time and now.
    assert len(svgs) >= 7, f"{len(svgs)} SVG elements in the rendered page"
    drawn = re.findall(r"<(?:path|line|use)\b", dom)
    assert len(drawn) > 100, f"only {len(drawn)} drawn elements"
    for heading in ("Off-policy evidence", "Click rate online", "Drift", "Lineage", "Approvals"):
        assert heading in dom

    shot = tmp_path / "report.png"
    headless(out, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,2000")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    inked = float((pixels < 200).mean())
    assert pixels.std() > 10 and inked > 0.01, (pixels.std(), inked)
