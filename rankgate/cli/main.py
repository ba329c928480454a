"""The root `rankgate` group, its global options, and where each command lives.

A command group's module is imported only when that group is invoked, following
click's "lazily loading subcommands" pattern (`LazyGroup`), so `rankgate keys
list` does not import what `rankgate model evaluate` needs. `rankgate --help`
imports none of them: it lists each command with the short help registered here
(tests/ops/test_cli.py checks that it is the command's own).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click


@dataclass(frozen=True)
class LazyCommand:
    target: str
    """"module:attribute" of the click command or group."""
    help: str
    """The first paragraph of its help, which `rankgate --help` shortens."""


COMMANDS = "rankgate.cli.commands"

LAZY_SUBCOMMANDS = {
    "audit": LazyCommand(
        f"{COMMANDS}.audit:audit",
        "The decision audit log (a Redis Stream, one record per decision).",
    ),
    "bench": LazyCommand(
        f"{COMMANDS}.serve:bench",
        "Benchmark rankgate against the floor (plain FastAPI), in interleaved rounds.",
    ),
    "cluster": LazyCommand(
        f"{COMMANDS}.cluster:cluster",
        "Serving on a Ray cluster whose nodes share no filesystem (docs/cluster.md).",
    ),
    "consent": LazyCommand(
        f"{COMMANDS}.consent:consent",
        "Consent records in bulk: import a consent platform's or a warehouse's export.",
    ),
    "events": LazyCommand(
        f"{COMMANDS}.events:events",
        "The event stream (POST /v1/events) and the streaming features it feeds.",
    ),
    "features": LazyCommand(
        f"{COMMANDS}.features:features",
        "The project's Feast repository (applied to this home) and its Redis online store.",
    ),
    "init": LazyCommand(
        f"{COMMANDS}.project:init",
        "Write a new project skeleton into FOLDER: rankgate.yaml, a Feast repository, "
        "policies and a model declaration, each commented with what to fill in.",
    ),
    "keys": LazyCommand(
        f"{COMMANDS}.keys:keys", "API keys: per application, scoped to purposes, stored hashed."
    ),
    "loadtest": LazyCommand(
        f"{COMMANDS}.serve:loadtest",
        "Load a running server with Locust's realistic mix and check the SLOs (exit 1 if missed).",
    ),
    "model": LazyCommand(f"{COMMANDS}.model:model", "Versioned ranker models."),
    "policy": LazyCommand(
        f"{COMMANDS}.policy:policy",
        "Consent and purpose policy files (policies/): check them, deploy them live.",
    ),
    "privacy": LazyCommand(
        f"{COMMANDS}.audit:privacy",
        "Requests of data subjects, answered from their pseudonymous key.",
    ),
    "project": LazyCommand(
        f"{COMMANDS}.project:project",
        "The rankgate project served: check it, or point Feast's own CLI at it.",
    ),
    "publish": LazyCommand(
        f"{COMMANDS}.cluster:publish",
        "Copy what a cluster's replicas serve from the home to the artifact store: the "
        "namespace, the Feast registry, the serving tables and every model version "
        "(registered versions are immutable there too).",
    ),
    "redis": LazyCommand(
        f"{COMMANDS}.project:redis_group",
        "The Redis-compatible server (REDIS_URL, or the embedded one).",
    ),
    "serve": LazyCommand(
        f"{COMMANDS}.serve:serve",
        "Set up if needed, then serve POST /v1/rank on Ray Serve (blocks; Ctrl-C or SIGTERM "
        "stops).",
    ),
    "setup": LazyCommand(
        f"{COMMANDS}.project:setup",
        "Prepare everything the server needs from the project's sources; safe to run again "
        "(redoes what changed since the last run, and says what).",
    ),
    "users": LazyCommand(
        f"{COMMANDS}.project:users",
        "List the project's demo user ids and their consent state, to know whom to ask about.",
    ),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from their module on first use."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, LazyCommand], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_subcommands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            return self.load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def load(self, cmd_name: str) -> click.Command:
        module_name, attribute = self.lazy_subcommands[cmd_name].target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}.{attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with each lazy command's registered help: no module is
        imported to show it."""
        listed = [(name, self._listed(ctx, name)) for name in self.list_commands(ctx)]
        commands = [(name, command) for name, command in listed if command and not command.hidden]
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        with formatter.section("Commands"):
            formatter.write_dl(
                [(name, command.get_short_help_str(limit)) for name, command in commands]
            )

    def _listed(self, ctx: click.Context, name: str) -> click.Command | None:
        lazy = self.lazy_subcommands.get(name)
        return click.Command(name, help=lazy.help) if lazy else super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy_subcommands=LAZY_SUBCOMMANDS)
@click.version_option(package_name="rankgate")
@click.option(
    "--project",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The rankgate project (a folder with rankgate.yaml); default: RANKGATE_PROJECT, "
    "else the current folder if it holds a rankgate.yaml, else (in a source checkout) the "
    "Open Bandit example.",
)
def main(project: Path | None) -> None:
    """rankgate: ranked, policy-compliant answers for one person and one purpose.

    State lives in RANKGATE_HOME (default: .rankgate/ in the project). Redis is
    REDIS_URL, or an embedded server the project starts itself. What is served is
    a project: `rankgate init DIR` starts one, `--project DIR` selects it.
    """
    if project is not None:
        # Imported here, not above, so that `rankgate --help` stays instant.
        from rankgate.core.settings import get_settings

        # Every command, and the server processes `serve` starts, read it from here.
        os.environ["RANKGATE_PROJECT"] = str(project.expanduser().resolve())
        get_settings.cache_clear()


if __name__ == "__main__":
    main()
