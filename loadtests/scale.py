"""`rankgate bench --scale`: rankgate at a size, from `rankgate init` to served decisions.

For each size (people, items, impressions) it writes a scale project into a scratch
folder with `rankgate init --sample-size` (the template's generated shop at that
size) and adds what the measurement needs and the template leaves out: event types,
a streaming view (each person's decayed click count, `per: total`), a model v3 that
reads it, and the log's propensity (the sample shows items uniformly at random,
1/items). Then, in a fresh home:

- `rankgate setup --demo-consent` in a process of its own, timed by phase from its own output
  (prepare, feature repository apply, materialize, each model's training, demo
  consent), with that process's peak memory;
- the Redis-compatible server's memory: `INFO memory` and `MEMORY USAGE` of sampled
  keys, per person (feature rows and consent records) and per item;
- one server started as `rankgate serve` starts it (`serve run` of the project's
  serve config, on a free port) with v3 as its stable version: seconds until
  /healthz answers 200, then the memory (RSS, PSS) of its Serve replicas;
- rank latency (closed loop, one client) with 10, 100 and 500 candidates and with
  none (the whole catalogue), at the default budget and the largest;
- throughput: decisions/s with 8 clients (closed loop, 100 candidates) and the CPU
  each decision cost in the server's processes and in Redis (`INFO cpu`);
- event ingest: events/s accepted by `POST /v1/events` (batches of 50, a few
  clients);
- event-to-decision latency at 0 and 100 events/s: loadtests/freshness.py's probe
  (ranking 100 candidates) and background events, on the same server;
- `rankgate model evaluate v2 --logs FILE --slots N` on the whole log (each slot a
  decision over the whole catalogue): the evaluation timed in this process, and the
  imports the command adds timed in a fresh one.

The report (`<output>/scale.json`, `.md`) puts the sizes side by side with the
ratio of the largest to the smallest for each figure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.drive import stamped, write_results
from loadtests.scale_home import home_selected, redis_memory
from loadtests.scale_project import Size, write_scale_project
from loadtests.scale_report import growth, render
from loadtests.scale_served import served
from rankgate.core.errors import RankgateError
from rankgate.core.settings import SOURCE_CHECKOUT, put_checkout_on_path

Say = Callable[[str], None]


# -- setup, timed by phase -----------------------------------------------------------


def child_env(project: Path, home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "RANKGATE_REDIS_URL"} and not k.startswith("RAY_SERVE_")
    }
    env.update(RANKGATE_HOME=str(home), RANKGATE_PROJECT=str(project), PYTHONUNBUFFERED="1")
    put_checkout_on_path(env)
    return env


def phase_name(line: str) -> str | None:
    """The phase a line of setup's output starts ("• model v1: training ..." -> model
    v1), or None for a line within a phase."""
    if line.startswith("• data:"):
        return "prepare"
    if line.startswith("• feature repository"):
        return "apply"
    if line.startswith("• online store"):
        return "materialize"
    if line.startswith("• demo consent"):
        return "consent"
    if line.startswith("• model "):
        return "train " + line[len("• model ") :].split(":")[0]
    if line.startswith(("setup complete", "nothing to do")):
        return "end"
    return None


def timed_setup(project: Path, home: Path, say: Say, timeout_s: float) -> dict[str, Any]:
    """`rankgate setup --demo-consent` in a process of its own (the sample shop's people get
    made-up consent to be ranked with): seconds per phase, total, peak RSS."""
    command = [sys.executable, "-m", "rankgate.cli", "setup", "--demo-consent"]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=child_env(project, home),
        cwd=SOURCE_CHECKOUT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    marks: list[tuple[str, float]] = [("start (imports, Redis)", 0.0)]
    output: list[str] = []
    timer = threading.Timer(timeout_s, lambda: os.killpg(process.pid, 9))
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip())
            name = phase_name(line)
            if name is not None:
                marks.append((name, time.perf_counter() - started))
                say(f"    {time.perf_counter() - started:7.1f} s  {line.rstrip()}")
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - started
    if process.returncode != 0:
        raise RankgateError(
            f"rankgate setup failed ({process.returncode}) in {total:.0f} s:\n"
            + "\n".join(output[-30:])
        )
    phases = {name: round(marks[i + 1][1] - at, 2) for i, (name, at) in enumerate(marks[:-1])}
    return {
        "total_s": round(total, 1),
        "phases_s": phases,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


def evaluate_time(env: Any, size: Size, rows: int, folder: Path, say: Say) -> dict[str, Any]:
    """`rankgate model evaluate v2 --logs FILE --slots ROWS`: the whole log (with the
    sample's propensity, 1/items: its items were drawn uniformly), `rows` slots drawn
    from it; the evaluation timed in this process, the import of what the command
    loads timed in a fresh one (the command's time is their sum)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rankgate.ops.evaluation import EvaluationRequest, evaluate

    spec = env.project.spec.interactions
    source = pq.ParquetFile(env.project.path(spec.path, env.data_dir))
    logs = folder / "evaluate-logs.parquet"
    writer: pq.ParquetWriter | None = None
    for batch in source.iter_batches(batch_size=1_000_000):
        table = pa.Table.from_batches([batch])
        table = table.append_column(
            "propensity", pa.array([1.0 / size.items] * table.num_rows, pa.float64())
        )
        writer = writer or pq.ParquetWriter(logs, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    log_rows = source.metadata.num_rows
    slots = min(rows, log_rows)
    started = time.perf_counter()
    evaluate(
        EvaluationRequest(
            version="v2",
            against=None,
            logs_path=logs,
            audit=False,
            since="7d",
            confidence=0.95,
            seed=0,
            slots=slots,
        )
    )
    elapsed = time.perf_counter() - started
    imports = (
        "import rankgate.ops.evaluation, model_store.evaluation, model_store.train, "
        "serving.ops.evidence, features.store"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", imports], check=True, env=os.environ.copy())
    imported = time.perf_counter() - started
    say(
        f"    model evaluate v2 --slots {slots} on a log of {log_rows} rows x {size.items} "
        f"items: {elapsed:.1f} s (+ {imported:.1f} s of imports in the command)"
    )
    return {
        "log_rows": log_rows,
        "rows": slots,
        "items": size.items,
        "seconds": round(elapsed, 2),
        "command_imports_s": round(imported, 2),
        "rows_per_s": round(slots / elapsed, 1),
        "scored_pairs_per_s": round(slots * size.items / elapsed),
    }


# -- one size, then all of them ------------------------------------------------------


def measure_size(
    size: Size,
    scratch: Path,
    duration: float,
    evaluate_rows: int,
    setup_timeout_s: float,
    say: Say,
) -> dict[str, Any]:
    from rankgate.core.home import Home
    from rankgate.core.redis_server import EmbeddedRedis
    from rankgate.ops.environment import Environment

    folder = scratch / f"scale-{size.people}-{size.items}-{size.impressions}"
    if folder.exists():
        shutil.rmtree(folder)
    project, home = folder / "project", folder / "home"
    say(
        f"• size {size.label}: {size.people:,} people, {size.items:,} items, "
        f"{size.impressions:,} impressions ({folder})"
    )
    write_scale_project(project, size)
    figures: dict[str, Any] = {"size": size.__dict__, "folder": str(folder)}
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        figures["setup"] = timed_setup(project, home, say, setup_timeout_s)
        with home_selected(project, home):
            env = Environment.open()
            figures["redis"] = redis_memory(env, size)
            say(
                f"    redis {figures['redis']['used_memory_mib']} MiB: "
                f"{figures['redis']['per_person_bytes']} B/person, "
                f"{figures['redis']['per_item_bytes']} B/item"
            )
            work = folder / "bench"
            work.mkdir(exist_ok=True)
            figures["served"] = served(env, duration, work, say)
            figures["evaluate"] = evaluate_time(env, size, evaluate_rows, work, say)
    finally:
        EmbeddedRedis(Home(home)).stop()
    figures["load_1min"] = [load_at_start, round(os.getloadavg()[0], 2)]
    return figures


def run_scale(
    sizes: list[Size],
    output: Path,
    say: Say,
    scratch: Path | None = None,
    duration: float = 5.0,
    evaluate_rows: int = 1000,
    setup_timeout_s: float = 3600,
    name: str = "scale",
) -> dict[str, Any]:
    """Measure each size in turn; write `<output>/<name>.json` and `.md`."""
    import tempfile

    scratch = scratch or Path(tempfile.gettempdir()) / "rankgate-bench-scale"
    results = {
        size.label: measure_size(size, scratch, duration, evaluate_rows, setup_timeout_s, say)
        for size in sizes
    }
    report = stamped(
        duration_s=duration,
        evaluate_rows=evaluate_rows,
        sizes=[size.label for size in sizes],
        results=results,
        growth=growth(results),
    )
    write_results(output, name, report, render)
    return report
