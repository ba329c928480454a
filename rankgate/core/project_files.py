"""Project and policy files carried inside a deployment's config.

On a cluster no replica may assume it sees the operator's project folder, so the
few text files the serving path reads from it travel in the serve config itself
(`rankgate cluster config` renders them): `rankgate.yaml`, the Feast repository's
`feature_store.yaml` and the policy files, as relative path -> text. A replica
writes them into a folder of its node's cache named by their digest and reads
that folder like any project.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from rankgate.core.errors import ConfigError
from rankgate.core.project import PROJECT_FILE, Project

POLICY_FILES = ("policy.yaml", "fallback.yaml", "reasons.yaml")


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def policy_files(folder: Path) -> dict[str, str]:
    """The policy files of a folder, by name (those that exist; policy.yaml and
    fallback.yaml are required when they are loaded)."""
    return {name: _text(folder / name) for name in POLICY_FILES if (folder / name).is_file()}


def project_files(project: Project) -> dict[str, str]:
    """What a replica needs of the project folder: its declaration, the Feast
    repository's settings and its policies (paths relative to the project)."""

    def relative(path: Path) -> str:
        try:
            return path.resolve().relative_to(project.root).as_posix()
        except ValueError as exc:
            raise ConfigError(
                f"{project.file}: {path} is outside the project folder; a cluster's replicas "
                "receive only files inside it"
            ) from exc

    files = {PROJECT_FILE: _text(project.file)}
    settings = project.feast_repo / "feature_store.yaml"
    files[relative(settings)] = _text(settings)
    policies = relative(project.policies)
    for name, text in policy_files(project.policies).items():
        files[f"{policies}/{name}"] = text
    return files


def digest(files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(files), sort_keys=True).encode()).hexdigest()[:16]


def materialize(files: Mapping[str, str], parent: Path, where: str) -> Path:
    """The files written into `parent/<digest>/` (once; the same files, the same
    folder); `where` names the config field in errors."""
    for name in files:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise ConfigError(f"{where}: {name!r} is not a relative path inside the folder")
    folder = parent / digest(files)
    if folder.is_dir():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".carried-", dir=parent))
    for name, text in files.items():
        target = staging.joinpath(*PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    try:
        os.rename(staging, folder)
    except OSError:  # another replica of this node wrote the same folder first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return folder
