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

from rankgate.core.home import Home
from rankgate.core.redis_server import resolve_redis_url
from tests import REPO

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


def test_light_commands_import_no_heavy_library(session_home: Home, tmp_path: Path) -> None:
    resolve_redis_url()  # the session's embedded Redis, started here rather than in the child
    report_path = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            json.dumps(HEAVY_MODULES),
            json.dumps(LIGHT_COMMANDS),
            str(report_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # A command that failed early would not have reached the imports it needs.
    failed = {
        step["command"]: step["exit"]
        for step in report
        if step["exit"] != 0 and step["command"] not in MAY_FIND_NOTHING
    }
    assert not failed, f"{failed}\n{completed.stderr[-3000:]}"
    first_loaded_by: dict[str, str] = {}
    for step in report:
        for module in step["heavy"]:
            first_loaded_by.setdefault(module, step["command"])
    assert not first_loaded_by, f"heavy modules loaded by light commands: {first_loaded_by}"
