"""rankgate as a library: every import declared, and a wheel that serves a project
anywhere.

The wheel test builds rankgate's wheel, installs it (not editable) into a new
virtualenv outside the repository and serves a new project with it, as a user
would after `pip install rankgate-*.whl`. To stay fast, the new virtualenv reuses
the third-party libraries already installed here (a .pth line naming this
interpreter's site-packages, which is not processed for .pth files of its own, so
the editable install of the repository stays invisible) and recreates Ray's
`serve` command; rankgate itself, its package data and its commands come from the
wheel only. Nothing runs with the repository on its path or as its folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.ops.launch import free_port
from tests import REPO
from tests.conftest import wait_until_healthy

# What a user's shell might carry that would select something else than the wheel.
CLEARED = ("PYTHONPATH", "RANKGATE_PROJECT", "RANKGATE_HOME", "REDIS_URL", "RANKGATE_REDIS_URL")
PACKAGES = ("rankgate", "features", "model_store", "serving", "loadtests")
BUILD_LEFTOVERS = shutil.ignore_patterns("__pycache__", "*.pyc", "results")


def test_every_imported_library_is_declared() -> None:
    """deptry: what the packages (and the projects' Python) import is declared in
    pyproject.toml, directly, and what is declared is used."""
    result = subprocess.run(
        [sys.executable, "-m", "deptry", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass(frozen=True)
class Installed:
    """A virtualenv with rankgate installed from its wheel."""

    venv: Path
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def rankgate(
        self, *args: str, cwd: Path, timeout_s: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin("rankgate"), *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def console_script(venv: Path, distribution: str, name: str) -> None:
    """Write the command `name` of an already installed distribution into `venv`,
    as pip would have (`rankgate serve` runs Ray's `serve` beside its Python)."""
    (entry,) = [
        e
        for e in importlib.metadata.distribution(distribution).entry_points
        if e.group == "console_scripts" and e.name == name
    ]
    module, _, attribute = entry.value.partition(":")
    script = venv / "bin" / name
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {attribute}\n"
        f"sys.exit({attribute}())\n"
    )
    script.chmod(0o755)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    # Built from a copy of what the wheel is made of: the build leaves nothing in the
    # repository, and anything else the wheel would need is missing.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=BUILD_LEFTOVERS)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(root), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = root.glob("rankgate-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    (site / "reused_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    console_script(venv, "ray", "serve")
    # --ignore-installed: the repository's editable install, visible through the .pth
    # line, is neither taken for this one nor touched.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        + ["install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return Installed(venv, env)


def test_the_wheel_is_what_the_new_virtualenv_imports(installed: Installed, tmp_path: Path) -> None:
    code = (
        "import json, sys, rankgate, serving, loadtests.locustfile as _;"
        "from rankgate.core.settings import SOURCE_CHECKOUT;"
        "from serving.ops.launch import SERVE_CONFIG;"
        "print(json.dumps([rankgate.__file__, serving.__file__, str(SERVE_CONFIG),"
        " SOURCE_CHECKOUT, sys.path]))"
    )
    result = subprocess.run(
        [installed.bin("python"), "-c", code],
        cwd=tmp_path,
        env=installed.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rankgate_file, serving_file, serve_config, checkout, path = json.loads(result.stdout)
    for file in (rankgate_file, serving_file, serve_config):
        assert Path(file).is_relative_to(installed.venv), file
    assert checkout is None
    assert not any(Path(entry).resolve() == REPO for entry in path if entry), path
    for package in PACKAGES:
        assert (Path(rankgate_file).parent.parent / package / "py.typed").is_file(), package


def test_without_a_project_commands_say_how_to_select_one(
    installed: Installed, tmp_path: Path
) -> None:
    result = installed.rankgate("setup", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no rankgate project selected: run in a project folder")
    assert "rankgate init FOLDER" in result.stderr


@pytest.fixture
def served(installed: Installed, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`rankgate init` + `rankgate setup --demo-consent` + `rankgate serve` with the wheel, in a new
    project folder (its default home, `.rankgate/` in it), on a free port."""
    shop = tmp_path / "shop"
    created = installed.rankgate("init", str(shop), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert (shop / "serve_config.yaml").is_file() and (shop / "policies" / "policy.yaml").is_file()
    server = None
    try:
        # In the project folder, nothing selects it but its rankgate.yaml.
        # The template's demo users get made-up consent, as its README says to try it.
        setup = installed.rankgate("setup", "--demo-consent", cwd=shop)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert f"project: shop ({shop})" in setup.stdout
        assert (shop / ".rankgate" / "models" / "ranker" / "v2" / "model.onnx").is_file()
        port = free_port()
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [installed.bin("rankgate"), "serve", "--port", str(port)],
                cwd=shop,
                env=installed.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base_url = f"http://127.0.0.1:{port}"
        health = wait_until_healthy(base_url, server, 240, log_path)
        assert set(health["models"]["loaded"]) == {"v1", "v2"}, health
        yield base_url, shop
    finally:
        if server is not None and server.poll() is None:
            # `rankgate serve` is a supervisor that forwards SIGTERM to `serve run`.
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        stopped = installed.rankgate("redis", "stop", cwd=shop)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.mark.slow
def test_a_wheel_install_serves_a_new_project_outside_the_repository(
    installed: Installed, served: tuple[str, Path]
) -> None:
    base_url, shop = served
    created = installed.rankgate(
        "keys", "create", "shop", "--purpose", "onsite_personalization", cwd=shop
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    response = httpx.post(
        f"{base_url}/v1/rank",
        headers={"Authorization": f"Bearer {key}"},
        json={
            # Granted consent in the template's demo data (its README).
            "user_id": "user-0001",
            "purpose": "onsite_personalization",
            "region": "EU",
            "k": 3,
            "budget_ms": 1000,
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["fallback"] is None, answer
    assert answer["model"]["version"] == "v2", answer
    assert len(answer["items"]) == 3
