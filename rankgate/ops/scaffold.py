"""`rankgate init FOLDER`: a new project skeleton whose comments teach what each part is.

The skeleton is the folder project_template/ shipped in this package (rankgate.yaml,
a Feast repository, commented policies, model declarations, a prepare step that
generates a small sample shop, a README) plus the serve config shipped with
rankgate, so the project owns its routing (`rankgate model promote` edits it). It
works as written: `rankgate project check` passes on it and `rankgate --project
FOLDER setup` trains its models, so a new user replaces one working part at a time.
`--sample-size people=N,items=M,impressions=L` writes the sample's size into the
new project's prepare.py (a source of the project: setup redoes the data when it
changes).
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
# `--sample-size` names and the constants of the template's prepare.py they set.
SAMPLE_SIZES = {"people": "N_SHOPPERS", "items": "N_PRODUCTS", "impressions": "N_IMPRESSIONS"}
# Past this, a size is a typing error rather than a sample (10^9 log rows, 10^8 people).
SAMPLE_LIMITS = {"people": 10**8, "items": 10**7, "impressions": 10**9}


def parse_sample_size(text: str) -> dict[str, int]:
    """`people=1000000,items=1e5,impressions=10000000` -> sizes by name; a name left
    out keeps the template's size. ConfigError names the part and the problem."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SAMPLE_SIZES:
            raise ConfigError(
                f"--sample-size: {part!r}: expected NAME=COUNT with NAME one of "
                f"{', '.join(SAMPLE_SIZES)}"
            )
        number = whole_number(value.strip())
        if number is None or not 1 <= number <= SAMPLE_LIMITS[name]:
            raise ConfigError(
                f"--sample-size: {name}={value.strip()!r}: a whole number from 1 to "
                f"{SAMPLE_LIMITS[name]:,}"
            )
        if name in sizes:
            raise ConfigError(f"--sample-size: {name} given twice")
        sizes[name] = number
    return sizes


def whole_number(text: str) -> int | None:
    """`1000000`, `1_000_000` or `1e6` as an int; None if it is not a whole number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def sized_prepare(text: str, sizes: dict[str, int]) -> str:
    """The template's prepare.py with its size constants set to `sizes`."""
    for name, count in sizes.items():
        constant = SAMPLE_SIZES[name]
        text, found = re.subn(
            rf"^{constant} = [0-9_]+$", f"{constant} = {count:_}", text, flags=re.MULTILINE
        )
        if found != 1:
            raise ConfigError(f"the template's prepare.py has no line {constant} = <count>")
    return text


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


def write_skeleton(
    folder: Path, name: str | None = None, sample_size: dict[str, int] | None = None
) -> list[str]:
    """Write a new project into `folder` (new or empty) and say what was written;
    `sample_size` (see parse_sample_size) sizes its generated sample shop.

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
            text = source.read_text().replace(NAME_TOKEN, project)
            if relative == "prepare.py" and sample_size:
                text = sized_prepare(text, sample_size)
            path.write_text(text)
        # rename(2) replaces an empty folder; a folder someone filled meanwhile is refused.
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{folder}: could not write the project: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sized = (
        ["sample size: " + ", ".join(f"{n}={c:,}" for n, c in sample_size.items())]
        if sample_size
        else []
    )
    return [
        f"wrote project {project!r} into {folder}:",
        *(f"  {relative}" for relative in files),
        *sized,
        "next:",
        f"  rankgate project check {folder}      # validates it; starts nothing",
        f"  rankgate --project {folder} setup    # sample data, Feast, models v1 and v2",
        f"  then edit {folder}/{PROJECT_FILE} and the files it names (see {folder}/README.md)",
    ]
