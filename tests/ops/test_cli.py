"""The CLI package: `rankgate --help` lists each command with its own short help,
without importing the command modules (rankgate/cli/main.py registers it)."""

from __future__ import annotations

import click
from click.testing import CliRunner

from rankgate.cli.main import LAZY_SUBCOMMANDS, main


def test_registered_help_is_each_commands_own() -> None:
    ctx = click.Context(main)
    for name, lazy in LAZY_SUBCOMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is not None and command.help is not None
        first_paragraph = " ".join(command.help.split("\n\n")[0].split())
        assert lazy.help == first_paragraph, name


def test_root_help_is_clicks_listing_of_the_loaded_commands() -> None:
    loaded = click.Group(
        "main",
        commands=[main.get_command(click.Context(main), name) for name in LAZY_SUBCOMMANDS],
        params=main.params,
        help=main.help,
    )
    listed = CliRunner().invoke(main, ["--help"], prog_name="rankgate").output
    expected = CliRunner().invoke(loaded, ["--help"], prog_name="rankgate").output
    assert listed == expected
