"""Schemathesis against the running server's own OpenAPI document, over HTTP.

Two runs of the same document:

- `--mode all`: every operation gets generated requests, valid and invalid by the
  schema; no answer may be a 5xx, use a status the document does not list, or
  break the schema it declares for that status.
- `--mode positive`: only requests the document calls valid. The document is as
  strict as the server (enums of the loaded policy, bounds of the loaded config,
  the catalogue's item ids), so most must be accepted (ranked, recorded): a
  fuzzer that only ever meets the validator tests nothing behind it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import Server

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)
SEED = "20261122"
# Measured on the example home (seed above): every request of the positive run was
# answered 2xx (rank 88 of 88, consent 71 of 71 in each form); before the document
# carried the policy's enums and the config's bounds, 0 of 82 rank requests were.
# The floor leaves room for what the document does not pin down: a catalogue with
# gaps of more than MAX_LISTED_ITEM_IDS ids (the document then gives the range
# only), and answers a busy shared machine may turn into 503s.
MIN_ACCEPTED_SHARE = 0.75


def run_schemathesis(
    server: Server, tmp_path: Path, mode: str, max_examples: int
) -> tuple[str, list[dict]]:
    """Run schemathesis; its output and the HAR entries of every request it sent."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        CHECKS,
        "--mode",
        mode,
        "--max-examples",
        str(max_examples),
        "--seed",
        SEED,
        "--header",
        f"Authorization: Bearer {server.api_key}",
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "--report",
        "junit,har",
        "--report-dir",
        str(tmp_path),
        "--report-har-path",
        str(tmp_path / "requests.har"),
    ]
    # The hooks give the document's custom formats (TC strings) real values.
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks", "PYTHONPATH": path}
    result = subprocess.run(  # in tmp_path: schemathesis keeps a cache in its working folder
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output, json.loads((tmp_path / "requests.har").read_text())["log"]["entries"]


# Operation -> method and the request paths it serves (matched whole).
OPERATIONS = {
    "POST /v1/rank": ("POST", re.compile(r"/v1/rank")),
    "POST /v1/consent": ("POST", re.compile(r"/v1/consent")),
    "PUT /v1/consent/{user_id}": ("PUT", re.compile(r"/v1/consent/[^/]+")),
}


def statuses(entries: list[dict], operation: str) -> Counter[int]:
    """Answers to one operation's requests, by status."""
    method, path = OPERATIONS[operation]
    return Counter(
        entry["response"]["status"]
        for entry in entries
        if entry["request"]["method"] == method
        and path.fullmatch(urlsplit(entry["request"]["url"]).path)
    )


def accepted_share(counts: Counter[int]) -> float:
    accepted = sum(n for status, n in counts.items() if 200 <= status < 300)
    return accepted / max(sum(counts.values()), 1)


def test_no_5xx_and_no_answer_outside_the_schema(server: Server, tmp_path: Path) -> None:
    output, entries = run_schemathesis(server, tmp_path, "all", 60)
    print(next(line for line in output.splitlines() if "generated," in line))
    for operation in OPERATIONS:
        counts = statuses(entries, operation)
        print(f"{operation} in all mode: {dict(counts)}")
        # Both kinds reach the server: refused (invalid by the schema) and accepted.
        assert counts[422] > 0 and accepted_share(counts) > 0, (operation, counts)


def test_valid_requests_by_the_document_are_accepted(server: Server, tmp_path: Path) -> None:
    output, entries = run_schemathesis(server, tmp_path, "positive", 60)
    print(next(line for line in output.splitlines() if "generated," in line))
    for operation in OPERATIONS:
        counts = statuses(entries, operation)
        print(
            f"{operation} in positive mode: {dict(counts)}, accepted {accepted_share(counts):.0%}"
        )
        assert sum(counts.values()) >= 30, (operation, counts)
        assert accepted_share(counts) >= MIN_ACCEPTED_SHARE, (operation, counts)
