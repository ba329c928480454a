"""`rankgate consent`: consent decisions in bulk, from a file."""

from __future__ import annotations

from pathlib import Path

import click

from rankgate.cli.render import fails_cleanly, say


@click.group()
def consent() -> None:
    """Consent records in bulk: import a consent platform's or a warehouse's export."""


@consent.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="NAME=THEIRS",
    help="The file's name for a column: user_id, purpose, decision, source or updated_at "
    "(repeatable), e.g. --column user_id=customer_id.",
)
@click.option(
    "--source",
    "default_source",
    help="The source of every record, for a file without a source column.",
)
@fails_cleanly
def consent_import(file: Path, columns: tuple[str, ...], default_source: str | None) -> None:
    """Import consent decisions from FILE (CSV or Parquet; one row per user_id, purpose,
    decision (granted/denied), source, updated_at). The whole file is checked first and a
    file with a bad row writes nothing; a stored decision later than a row's is kept, so
    importing again changes nothing; an interrupted import, run again, goes on where it
    stopped. Only pseudonymous keys of the user ids are stored (docs/privacy.md)."""
    from rankgate.ops.consent_import import import_consent, parse_columns

    result = import_consent(file, parse_columns(columns), default_source, say)
    if result.finished_before is not None:
        say(
            f"✓ {file.name}: already imported ({result.rows} records, {result.written} "
            f"written, finished {result.finished_before}): nothing to do"
        )
        return
    rate = (result.rows - result.resumed_at) / result.write_s if result.write_s else 0.0
    say(
        f"✓ {file.name}: {result.written} records written, {result.unchanged} unchanged (a "
        f"stored decision as recent or later) in {result.write_s:.1f} s ({rate:,.0f} records/s)"
    )
