"""The Dockerfile, checked without a Docker engine (none here or in CI: `docker
build` cannot run). Its instructions are parsed and what matters is asserted. Its
install path is the tested one: the image builds rankgate's wheel and installs it
(not editable), as the packaging test does when it installs the built wheel into a
fresh virtualenv outside the repository and serves a project from it.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from serving.ops.launch import SERVE_CONFIG

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository


DOCKERFILE = PROJECT_ROOT / "Dockerfile"


@dataclass
class Instruction:
    name: str
    value: str

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form's words, or None for the shell form."""
        try:
            words = json.loads(self.value)
        except ValueError:
            return None
        return words if isinstance(words, list) else None


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined, comments and blank lines left out."""
    found: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        name, _, value = whole.partition(" ")
        found.append(Instruction(name.upper(), value.strip()))
    return found


def stages(parsed: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in parsed:
        if instruction.name == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def build_args(parsed: list[Instruction]) -> dict[str, str]:
    return dict(i.value.split("=", 1) for i in parsed if i.name == "ARG" and "=" in i.value)


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.name == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(instruction.value))
    return env


@pytest.fixture(scope="module")
def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def pinned_ray() -> str:
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    found = re.search(r'"ray\[serve\]==([0-9.]+)"', pyproject)
    assert found, "pyproject.toml pins no ray[serve] version"
    return found.group(1)


def test_every_stage_is_ray_s_image_of_the_pinned_version(parsed: list[Instruction]) -> None:
    args = build_args(parsed)
    images = []
    for stage in stages(parsed):
        image = stage[0].value.split()[0]
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    assert len(images) == 2, images  # build, run
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert set(images) == {f"rayproject/ray:{pinned_ray()}-{python}-cpu"}, images


def test_the_wheel_is_built_then_installed_not_editable(parsed: list[Instruction]) -> None:
    build, run = stages(parsed)
    build_runs = [i.value for i in build if i.name == "RUN"]
    assert any("pip wheel --no-deps" in command for command in build_runs), build_runs
    installs = [i.value for i in run if i.name == "RUN" and "pip install" in i.value]
    assert len(installs) == 1, installs
    assert ".whl" in installs[0] and " -e " not in installs[0] and "--editable" not in installs[0]
    copied = [i.value for i in run if i.name == "COPY" and "--from=build" in i.value]
    assert copied, "the run stage takes the wheel from the build stage"


def test_it_runs_as_a_user_not_root(parsed: list[Instruction]) -> None:
    run = stages(parsed)[-1]
    users = [i.value for i in run if i.name == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    first_user = next(n for n, i in enumerate(run) if i.name == "USER")
    assert first_user < next(n for n, i in enumerate(run) if i.name == "RUN")


def test_it_serves_the_example_on_0_0_0_0_at_the_exposed_port(parsed: list[Instruction]) -> None:
    run = stages(parsed)[-1]
    last = {i.name: i for i in run}
    entrypoint, command = last["ENTRYPOINT"].exec_form, last["CMD"].exec_form
    # Exec form: the command is PID 1 itself, so `docker stop`'s SIGTERM reaches it
    # (a shell form would run it under /bin/sh -c, which does not pass it on).
    assert entrypoint is not None and command is not None, (last["ENTRYPOINT"], last["CMD"])
    argv = entrypoint + command
    assert argv[:2] == ["rankgate", "serve"], argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = argv[argv.index("--port") + 1]
    assert last["EXPOSE"].value.split() == [port]
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert port == str(serve_config["http_options"]["port"])
    assert last["STOPSIGNAL"].value == "SIGTERM"
    assert f"127.0.0.1:{port}/healthz" in last["HEALTHCHECK"].value
    env = env_of(run)
    project = [i.value.split()[-2:] for i in run if i.name == "COPY" and "--from" not in i.value]
    assert ["examples/open_bandit", env["RANKGATE_PROJECT"]] in project, project
    assert (PROJECT_ROOT / "examples/open_bandit/rankgate.yaml").is_file()


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".rankgate"} <= ignored, ignored
    assert not {"examples", "README.md", "pyproject.toml"} & ignored
