"""`rankgate bench`: which measurement to run, with its options checked first.

The measurements live in loadtests/ (bench, overload, freshness, explain
sampling, scale); each writes `<output>/<name>.md` and `.json`. Options are checked
before setup runs or a server starts, the committed run of `--compare` included
(read before the run, which may replace it). The run's comparison is in its report;
`check_regressions` turns a regression into the command's error. loadtests/ is imported when a benchmark runs
(its drivers take half a second to import), so `rankgate --help` does not pay for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankgate.core.errors import RankgateError
from rankgate.ops.setup import run_setup

if TYPE_CHECKING:
    from loadtests.scale_project import Size

Say = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    concurrency: str | None
    duration: float | None
    repeats: int
    warmup: float
    extras: str
    skip: str
    driver: str
    allow_install: bool
    output: Path | None
    overload: bool
    freshness: bool
    explain_sampling: bool
    scale: tuple[str, ...] = ()
    """`--scale` values: "default" (the two sizes of loadtests/scale.py) or
    people,items,impressions; empty: not a scale run."""
    scratch: Path | None = None
    """Where --scale writes its projects and homes (None: a temporary folder)."""
    coverage: int = 0
    """`--coverage` replications per cell (0: not a coverage run)."""
    compare: Path | None = None
    """`--compare`: a committed bench.json this run's ratios are compared with."""
    tolerance: str = "15"
    """`--tolerance`: percent, for every figure or per figure (figure=percent,...)."""
    against_build: Path | None = None
    """`--against-build`: a checkout of an earlier build, measured in the same run."""
    soak: str | None = None
    """`--soak DURATION` ("2m", "1h"): the chaos soak instead (loadtests/soak/)."""
    soak_share: float = 50.0
    """`--soak-share`: percent of the measured peak the soak sends."""
    soak_faults: str = ""
    """`--soak-faults`: the faults of the soak's schedule (empty: all of them)."""
    soak_nodes: int = 0
    """`--soak-nodes N`: the multi-node variant, a cluster of a head and N worker nodes."""

    def soak_plan(self) -> tuple[float, tuple[str, ...]] | None:
        """The soak's seconds and faults, checked (None: not a soak run)."""
        if self.soak is None:
            return None
        from loadtests.loadtest import run_time_seconds
        from loadtests.soak.faults import ALL, CLUSTER, FAULTS

        seconds = run_time_seconds(self.soak, "--soak")
        if seconds < 60:
            raise RankgateError(
                f"--soak: {self.soak!r} is too short for a fault schedule (60 s at least)"
            )
        if not 0 <= self.soak_nodes <= 8:
            raise RankgateError(f"--soak-nodes: {self.soak_nodes} is not a count in 0..8")
        known = CLUSTER if self.soak_nodes else ALL
        names = tuple(f.strip() for f in self.soak_faults.split(",") if f.strip()) or known
        if unknown := [f for f in names if f not in FAULTS]:
            raise RankgateError(
                f"--soak-faults: unknown {', '.join(unknown)} (known: {', '.join(FAULTS)})"
            )
        if wrong := [f for f in names if f not in known]:
            raise RankgateError(
                f"--soak-faults: {', '.join(wrong)} "
                + (
                    "does not apply to the multi-node variant (its head runs Ray Serve's proxy)"
                    if self.soak_nodes
                    else "needs the multi-node variant (--soak-nodes)"
                )
            )
        if not 0 < self.soak_share <= 100:
            raise RankgateError(f"--soak-share: {self.soak_share} is not a percent in (0, 100]")
        return float(seconds), names

    def _main_benchmark_only(self, option: str, what: str) -> None:
        """`option` belongs to the main benchmark: an error when another is asked for."""
        instead = [
            flag
            for flag, chosen in (
                ("--overload", self.overload),
                ("--freshness", self.freshness),
                ("--explain-sampling", self.explain_sampling),
                ("--scale", bool(self.scale)),
                ("--coverage", bool(self.coverage)),
                ("--soak", self.soak is not None),
            )
            if chosen
        ]
        if instead:
            raise RankgateError(f"{option}: {what} the main benchmark, not {instead[0]}")

    def committed(self) -> tuple[Path, dict[str, Any]] | None:
        """The run `--compare` names, read and checked (None: no comparison)."""
        if self.compare is None:
            return None
        self._main_benchmark_only("--compare", "compares")
        try:
            report = json.loads(self.compare.read_text())
        except OSError as exc:
            raise RankgateError(f"--compare: cannot read {self.compare}: {exc.strerror}") from exc
        except ValueError as exc:
            raise RankgateError(f"--compare: {self.compare} is not JSON ({exc})") from exc
        if not isinstance(report, dict) or "results" not in report or "ratios" not in report:
            raise RankgateError(
                f"--compare: {self.compare} is not a report of `rankgate bench` (bench.json)"
            )
        return self.compare, report

    def earlier_build(self) -> Path | None:
        """The checkout `--against-build` names, checked (None: no earlier build)."""
        if self.against_build is None:
            return None
        self._main_benchmark_only("--against-build", "measures beside")
        from loadtests.bench.against import check_build

        try:
            return check_build(self.against_build)
        except ValueError as exc:
            raise RankgateError(f"--against-build: {exc}") from exc

    def tolerances(self) -> dict[str, float]:
        from loadtests.bench.compare import parse_tolerances

        try:
            return parse_tolerances(self.tolerance)
        except ValueError as exc:
            raise RankgateError(f"--tolerance: {exc}") from exc

    def sizes(self) -> list[Size]:
        """The sizes `--scale` asks for, smallest first, each checked."""
        from loadtests.scale_project import DEFAULT_SIZES, parse_size

        sizes: list[Size] = []
        for text in self.scale:
            if text == "default":
                sizes += DEFAULT_SIZES
                continue
            try:
                sizes.append(parse_size(text))
            except ValueError as exc:
                raise RankgateError(f"--scale: {exc}") from exc
        unique = {(s.people, s.items, s.impressions): s for s in sizes}
        return [unique[k] for k in sorted(unique, key=lambda k: (k[2], k[0], k[1]))]

    def levels(self) -> list[int]:
        from loadtests.bench.run import DEFAULT_LEVELS
        from loadtests.overload import LEVELS

        default = (
            LEVELS if self.overload else [1, 8, 32] if self.explain_sampling else DEFAULT_LEVELS
        )
        text = self.concurrency or ",".join(map(str, default))
        try:
            levels = sorted({int(c) for c in text.split(",") if c.strip()})
        except ValueError as exc:
            raise RankgateError(f"--concurrency: {text!r} is not a list of integers") from exc
        if not levels or min(levels) < 1 or (1 not in levels and not self.overload):
            raise RankgateError("--concurrency: positive integers, including 1")
        return levels

    def chosen(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The --with extras and the --skip parts, each checked against what exists."""
        from loadtests.bench.run import EXTRAS, PARTS

        extras = tuple(e.strip() for e in self.extras.split(",") if e.strip())
        skip = tuple(p.strip() for p in self.skip.split(",") if p.strip())
        if unknown := [e for e in extras if e not in EXTRAS]:
            raise RankgateError(
                f"--with: unknown {', '.join(unknown)} (known: {', '.join(EXTRAS)})"
            )
        if unknown := [p for p in skip if p not in PARTS]:
            raise RankgateError(f"--skip: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
        return extras, skip


def benchmark(options: BenchOptions, say: Say) -> tuple[Path, Path]:
    """Run the measurement the options ask for; the Markdown and JSON reports written."""
    from loadtests import results_folder
    from loadtests.bench.run import DEFAULT_DURATION_S, run_bench
    from loadtests.explain_sampling import run_explain_sampling
    from loadtests.freshness import RATES, run_freshness
    from loadtests.overload import run_overload

    against_build = options.earlier_build()
    output = options.output or results_folder()
    if (soak := options.soak_plan()) is not None:
        from loadtests.bench.run import command_line
        from loadtests.soak.run import run_soak, soak_report_stem

        run_setup(lambda _line: None, demo_consent=True)
        seconds, faults = soak
        run_soak(
            seconds,
            output,
            say,
            share=options.soak_share / 100.0,
            faults=faults,
            window_s=300.0 if seconds >= 1200 else max(20.0, seconds / 6),
            nodes=options.soak_nodes,
            command=command_line(),
        )
        stem = soak_report_stem(options.soak_nodes)
        return output / f"{stem}.md", output / f"{stem}.json"
    if options.coverage:
        from loadtests.coverage import coverage_benchmark

        # Simulations only: no server, no home.
        return coverage_benchmark(output, options.coverage, say)
    if options.scale:
        from loadtests.scale import run_scale

        # Its own projects and homes, one per size: the selected home is not touched.
        run_scale(
            options.sizes(), output, say, scratch=options.scratch, duration=options.duration or 5.0
        )
        return output / "scale.md", output / "scale.json"
    levels = options.levels()
    extras, skip = options.chosen()
    committed, tolerances = options.committed(), options.tolerances()
    # The benchmark asks for the project's demo users with their (made-up) consent.
    run_setup(lambda _line: None, demo_consent=True)
    duration, repeats = options.duration, options.repeats
    if options.freshness:
        run_freshness(list(RATES), duration or 8.0, repeats, output, say)
        name = "freshness"
    elif options.explain_sampling:
        run_explain_sampling(levels, duration or 8.0, repeats, output, say)
        name = "explain_sampling"
    elif options.overload:
        run_overload(levels, duration or 8.0, repeats, output, say)
        name = "overload"
    else:
        run_bench(
            levels,
            duration or DEFAULT_DURATION_S,
            repeats,
            output,
            say,
            warmup=options.warmup,
            extras=extras,
            skip=skip,
            driver=options.driver,
            allow_install=options.allow_install,
            committed=committed,
            tolerances=tolerances,
            against_build=against_build,
        )
        name = "bench"
    return output / f"{name}.md", output / f"{name}.json"


def check_regressions(figures: Path) -> None:
    """The command's error when the run, compared with `--compare`'s, regressed (or
    could be compared on nothing)."""
    from loadtests.bench.compare import failure

    report = json.loads(figures.read_text())
    if failed := [name for name, ok in report.get("verdicts", {}).items() if not ok]:
        raise RankgateError(f"soak: {'; '.join(failed)} failed (the report: {figures})")
    if why := failure(report.get("comparison")):
        raise RankgateError(f"--compare: {why}\n(this run's report: {figures})")
