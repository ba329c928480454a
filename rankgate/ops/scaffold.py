"""`rankgate init FOLDER`: a new project skeleton whose comments teach what each part is.

The skeleton is the folder project_template/ shipped in this package (rankgate.yaml,
a Feast repository, commented policies, model declarations, a prepare step that
generates a small sample shop, a README) plus the serve config shipped with
rankgate, so the project owns its routing (`rankgate model promote` edits it). It
works as written: `rankgate project check` passes on it and `rankgate --project
FOLDER setup` trains its models, so a new user replaces one working part at a time.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from rankgate.core.errors import ConfigError
from rankgate.core.project import NAME, PROJECT_FILE
from rankgate.core.resources import SERVE_CONFIG_NAME, default_serve_config, shipped

TEMPLATE = shipped("rankgate", "project_template")
# Written wherever the project's name belongs (rankgate.yaml, feature_store.yaml, README).
NAME_TOKEN = "__PROJECT_NAME__"


def project_name(folder: Path, name: str | None) -> str:
    """`name` if it is a valid project name, else one derived from the folder's name."""
    if name is not None:
        if not NAME.fullmatch(name):
            raise ConfigError(
                f"--name {name!r}: lower-case letters, digits and _, starting with a letter"
            )
        return name
    derived = re.sub(r"[^a-z0-9_]+", "_", folder.name.lower()).strip("_")
    if not derived[:1].isalpha():
        derived = f"project_{derived}".rstrip("_")
    return derived[:63]


def skeleton_files() -> dict[str, Path]:
    """Each file of the skeleton, by its path in the new project."""
    files = {
        str(path.relative_to(TEMPLATE)): path
        for path in sorted(TEMPLATE.rglob("*"))
        # Not what a hand run of Feast or Python leaves in the template folder.
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".db", ".pyc"}
    }
    files[SERVE_CONFIG_NAME] = default_serve_config()
    return files


def write_skeleton(folder: Path, name: str | None = None) -> list[str]:
    """Write a new project into `folder` (new or empty) and say what was written.

    Refuses a folder that holds anything, and writes nothing then. The files are
    written into a sibling staging folder first and renamed into place, so a
    failure never leaves half a project."""
    target = folder.expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder; nothing was written")
    if target.is_dir() and any(target.iterdir()):
        raise ConfigError(
            f"{folder}: the folder is not empty; `rankgate init` writes a new project into a "
            "new or empty folder (nothing was written)"
        )
    project = project_name(target, name)
    files = skeleton_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is private (0700); this one honours the umask.
    staging = target.with_name(f".{target.name}.init-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        for relative, source in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source.read_text().replace(NAME_TOKEN, project))
        # rename(2) replaces an empty folder; a folder someone filled meanwhile is refused.
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{folder}: could not write the project: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [
        f"wrote project {project!r} into {folder}:",
        *(f"  {relative}" for relative in files),
        "next:",
        f"  rankgate project check {folder}      # validates it; starts nothing",
        f"  rankgate --project {folder} setup    # sample data, Feast, models v1 and v2",
        f"  then edit {folder}/{PROJECT_FILE} and the files it names (see {folder}/README.md)",
    ]
