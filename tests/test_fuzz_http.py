"""Schemathesis against the running server's own OpenAPI document, over HTTP.

Every operation gets generated requests, both valid and invalid by the schema
(`--mode all`); no answer may be a 5xx, use a status the document does not
list, or break the schema it declares for that status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Server

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)


def test_no_5xx_and_no_answer_outside_the_schema(server: Server, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        CHECKS,
        "--mode",
        "all",
        "--max-examples",
        "60",
        "--seed",
        "20261122",
        "--header",
        f"Authorization: Bearer {server.api_key}",
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(  # in tmp_path: schemathesis keeps a cache in its working folder
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "POST /v1/rank" in output and "PUT /v1/consent/{user_id}" in output
    print(next(line for line in output.splitlines() if "generated," in line))
