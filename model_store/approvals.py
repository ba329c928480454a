"""Approvals of a model version, kept beside it in the model store.

    <home>/models/ranker/v3/approvals.jsonl    one approval per line, oldest first

A version's files are immutable once registered (its manifest hashes them); its
approvals are not part of what it is, so they live in a file of their own that only
grows: each approval is one JSON line appended with O_APPEND and fsynced before
`rankgate model approve` answers, so two approvers at once never lose a line and an
acknowledged approval survives a crash. A line that does not parse (a disk filled
mid-write) is reported, never taken as an approval.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from rankgate.core.config_files import Strict
from rankgate.core.errors import ModelStoreError

APPROVALS_FILE = "approvals.jsonl"


class Approval(Strict):
    """Who approved a version for a purpose, when, and what they saw."""

    version: str
    purpose: str
    by: str
    at: datetime
    policy_version: str
    """The policy (its `version`) that named `by` an approver."""
    note: str = ""
    evidence: dict[str, Any] = Field(default_factory=dict)
    """The off-policy estimate against stable at that moment (serving/ops/evidence.py
    `Evidence.figures()`), or {"unavailable": why}."""
    drift: dict[str, Any] = Field(default_factory=dict)
    """The version's drift figures at that moment, or {"unavailable": why}."""


class ApprovalLog:
    """The approvals file of one version folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / APPROVALS_FILE

    def append(self, approval: Approval) -> None:
        line = approval.model_dump_json().encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[Approval]:
        """Every approval, oldest first; a damaged line is an error naming it."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return []
        approvals = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                approvals.append(Approval.model_validate_json(line))
            except ValidationError as exc:
                raise ModelStoreError(f"{self.path}:{number}: not an approval ({exc})") from exc
        return approvals

    def latest(self, purpose: str) -> Approval | None:
        """The newest approval for `purpose`, if any."""
        found = [a for a in self.read() if a.purpose == purpose]
        return found[-1] if found else None


def now() -> datetime:
    return datetime.now(UTC)
