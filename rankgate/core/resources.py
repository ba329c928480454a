"""Files rankgate ships inside its packages (package data), found wherever it is installed.

The serve config's default, the project template (with its policies) and the load
test's locustfile and SLOs are read from the installed packages through
`importlib.resources`, never from a repository: a wheel install serves projects
anywhere. Packages are installed as folders (never zipped), so each file has a path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rankgate.core.errors import ConfigError


def shipped(package: str, name: str) -> Path:
    """The path of `name` (may contain `/`) shipped in `package`."""
    path = Path(str(files(package).joinpath(name)))
    if not path.exists():
        raise ConfigError(
            f"{path}: missing from the installed {package!r} package; reinstall rankgate"
        )
    return path


# The name of a project's own serve config, beside its rankgate.yaml.
SERVE_CONFIG_NAME = "serve_config.yaml"


def default_serve_config() -> Path:
    """The serve config shipped with rankgate: what `rankgate init` copies into a new
    project, and what serves a project that has none of its own."""
    return shipped("serving", SERVE_CONFIG_NAME)
