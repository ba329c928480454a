"""Light CLI commands start without the heavy libraries.

Key, user, model-registry, policy and Redis commands should answer in well under a
second, and revoking a key is only "within a second" once the CLI has started.
Nearly all of a slow start is importing Ray, Feast, pandas, onnxruntime, SHAP and
friends (numpy alone costs about 0.1 s). What a command imports is deterministic, unlike its time on a shared
machine, so this runs the light commands in a fresh interpreter and checks
`sys.modules` after each instead of timing them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rankgate.core.home import Home
from rankgate.core.redis_server import resolve_redis_url
from tests import REPO
from tests.serving_support import SERVE_CONFIG

HEAVY_MODULES = (
    "ray",
    "feast",
    "pandas",
    "onnxruntime",
    "shap",
    "lightgbm",
    "sklearn",
    "locust",
    "schemathesis",
    "pyarrow",
    "numpy",
)

# In order: a key is created, listed and revoked again.
LIGHT_COMMANDS = [
    ["--help"],
    ["keys", "create", "startup-check", "--purpose", "onsite_personalization"],
    ["keys", "list"],
    ["keys", "revoke", "startup-check"],
    ["users", "--limit", "3"],
    ["model", "list"],
    ["model", "status"],
    ["redis", "status"],
    ["audit", "tail", "--count", "1"],
    ["privacy", "demo-consent", "list"],
    # Commands that do need Ray or Feast import them when they run, not for --help.
    *(
        [*command, "--help"]
        for command in (
            ["setup"],
            ["serve"],
            ["bench"],
            ["loadtest"],
            ["features"],
            ["features", "materialize"],
            ["model"],
            ["model", "train"],
            ["model", "register"],
            ["init"],
            ["project", "check"],
            ["model", "promote"],
            ["model", "rollback"],
            ["audit"],
            ["audit", "replay"],
            ["policy", "check"],  # reads the catalogue (pandas) to check item ids
            ["policy", "deploy"],
            ["keys"],
            ["privacy"],
            ["privacy", "forget"],
            ["privacy", "demo-consent", "remove"],
            ["redis"],
        )
    ),
]

# Exits 1 while the session has recorded no decision; it has done its imports by then.
MAY_FIND_NOTHING = {"audit tail --count 1"}

# Runs in the child: after importing the CLI and after each command, which heavy
# modules are loaded now (so the first command that pulls one in is named).
CHILD = """
import json, sys

heavy, commands, report_path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

def loaded():
    return sorted(m for m in heavy if m in sys.modules)

from rankgate.cli.main import main

report = [{"command": "import rankgate.cli.main", "exit": 0, "heavy": loaded()}]
for command in commands:
    try:
        code = main(command, standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    report.append({"command": " ".join(command), "exit": code or 0, "heavy": loaded()})
with open(report_path, "w") as handle:
    json.dump(report, handle)
"""


def run_commands(commands: list[list[str]], tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    """Run `commands` one after another in a fresh interpreter: what each loaded, and
    the child's stderr."""
    resolve_redis_url()  # the session's embedded Redis, started here rather than in the child
    report_path = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(HEAVY_MODULES), json.dumps(commands)]
        + [str(report_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report: list[dict[str, Any]] = json.loads(report_path.read_text())
    # A command that failed early would not have reached the imports it needs.
    failed = {
        step["command"]: step["exit"]
        for step in report
        if step["exit"] != 0 and step["command"] not in MAY_FIND_NOTHING
    }
    assert not failed, f"{failed}\n{completed.stderr[-3000:]}"
    return report, completed.stderr


def first_loaded_by(report: list[dict[str, Any]]) -> dict[str, str]:
    first: dict[str, str] = {}
    for step in report:
        for module in step["heavy"]:
            first.setdefault(module, step["command"])
    return first


def test_light_commands_import_no_heavy_library(session_home: Home, tmp_path: Path) -> None:
    report, stderr = run_commands(LIGHT_COMMANDS, tmp_path)
    loaded = first_loaded_by(report)
    assert not loaded, f"heavy modules loaded by light commands: {loaded}"
    assert "Deprecat" not in stderr and "FutureWarning" not in stderr, stderr[-3000:]


def test_promote_and_rollback_load_neither_feast_nor_the_models(
    ready_home: Home, tmp_path: Path
) -> None:
    """They check the version's files (hashes), the ONNX file's input width and the
    inputs (the applied registry's views, recorded beside it), not its parity, which
    registration checked and `model validate` rechecks: no Feast, no tree library, no
    scoring."""
    config = tmp_path / "serve_config.yaml"
    config.write_text(SERVE_CONFIG.read_text())
    routing = ["--config", str(config)]
    report, stderr = run_commands(
        [
            ["model", "promote", "v3", "--canary", "10", *routing],
            ["model", "rollback", *routing],
            ["model", "status", *routing],
        ],
        tmp_path,
    )
    loaded = first_loaded_by(report)
    # Promote opens the ONNX file (onnxruntime and numpy, about 0.15 s) to check it
    # takes the inputs the manifest lists; nothing else heavy.
    opened = {"onnxruntime", "numpy"}
    assert set(loaded) <= opened, f"heavy modules loaded by routing commands: {loaded}"
    assert all(loaded[m].startswith("model promote") for m in loaded), loaded
    assert "Deprecat" not in stderr and "FutureWarning" not in stderr, stderr[-3000:]
    assert config.read_text() == SERVE_CONFIG.read_text()  # rolled back, comments kept


def test_register_reads_the_log_through_the_recorded_views_without_feast(
    ready_home: Home, tmp_path: Path
) -> None:
    """Registering builds the drift reference and the item embeddings from the
    interaction log: the views' offline files are named by the record, not by Feast."""
    import shutil

    from rankgate.ops.environment import Environment

    env = Environment.open(redis=False)
    env.views()  # the record is current (setup wrote it; this rewrites a stale one)
    source = env.models.path("v2")
    features = env.project.path("models/v2.yaml")
    try:
        report, stderr = run_commands(
            [
                ["model", "register", "startup-check", "--onnx", str(source / "model.onnx")]
                + ["--booster", str(source / "booster.txt"), "--features", str(features)]
            ],
            tmp_path,
        )
        registered = env.models.manifest("startup-check")
    finally:
        shutil.rmtree(env.models.path("startup-check"), ignore_errors=True)
    loaded = first_loaded_by(report)
    assert "feast" not in loaded and "ray" not in loaded, loaded
    assert "Deprecat" not in stderr and "FutureWarning" not in stderr, stderr[-3000:]
    assert {"drift_reference.json", "retrieval.npz"} <= set(registered.artifacts)


def test_the_recorded_views_are_feasts_and_a_changed_registry_is_read_again(
    ready_home: Home,
) -> None:
    from features.applied import RECORD_FILE, infos, of_feast, read_record, write_record
    from rankgate.ops.environment import Environment

    env = Environment.open()
    env.materialize()  # Feast writes the materialized intervals into the registry
    recorded = read_record(env.registry)  # written when setup applied it, and since
    from_feast = of_feast(env.feast_views())
    assert recorded is not None
    # Everything the log readers take of a view (its file, time column, TTL) is Feast's.
    assert {v.name: v for v in recorded} == {v.name: v for v in from_feast}
    assert all(v.source_path is not None for v in recorded)
    assert {v.name: v.ttl_s for v in recorded}["recent_clicks"] == 2 * 86400
    assert env.views() == recorded
    assert env.view_infos() == infos(from_feast, env.project)

    record = env.registry.with_name(RECORD_FILE)
    kept = record.read_text()
    try:
        # A record of another registry (say `feast apply` changed it since) is ignored.
        write_record(env.registry, "0" * 64, recorded[:1])
        assert read_record(env.registry) is None
        assert {v.name: v for v in env.views()} == {v.name: v for v in from_feast}
        assert read_record(env.registry) == env.views()  # and recorded again
        # So is one an older rankgate wrote (no file sources in it).
        older = json.loads(kept)
        for view in older["views"]:
            del view["source_path"]
        record.write_text(json.dumps(older))
        assert read_record(env.registry) is None
        assert {v.name: v for v in env.views()} == {v.name: v for v in from_feast}
    finally:
        record.write_text(kept)
