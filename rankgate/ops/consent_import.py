"""`rankgate consent import FILE`: consent decisions from a consent platform's or a
warehouse's export (CSV or Parquet), in bulk.

One row per decision, columns (renamed with `--column NAME=THEIRS`):

  user_id     the application's id of the person, by the API's rules (an integer
              column is read as its decimal text); only its pseudonymous key is stored
  purpose     a purpose of the project's policies/policy.yaml
  decision    `granted` or `denied` (a boolean column: true is granted)
  source      where the decision came from, 1-64 characters (`--source` stands in for
              a file without the column); not `rankgate-demo`, which marks the made-up
              records of `rankgate setup --demo-consent` (governance/demo_consent.py)
  updated_at  when it was decided: ISO 8601 text with a zone (`Z`, `+02:00`), or a
              Parquet timestamp with a time zone; at most microseconds, not in the future

The file is read twice, a chunk at a time (memory stays bounded whatever its
size): every row is checked first, and a file with a problem is refused with its
rows, columns and problems, nothing written. Then the records are written with
`ConsentStore.record_newer`, which keeps the later of a stored and an imported
decision (at the same time, a denial over a grant), so importing a file again, or an older export after a newer decision,
changes nothing. Progress is kept in Redis (`redis_keys.consent_import`, by the
file's digest): an interrupted import, run again, checks the file again and goes
on after the last rows written; a finished one says so and writes nothing.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import redis

from rankgate.core import redis_keys
from rankgate.core.errors import RankgateError
from rankgate.core.pseudonym import user_keys
from rankgate.governance.consent import DECISIONS, ConsentStore, record_json
from rankgate.governance.demo_consent import DEMO_SOURCE
from rankgate.governance.policy import load_policy
from rankgate.ops.environment import Environment
from serving.contract.config import LimitsConfig
from serving.contract.schemas import USER_ID_PATTERN

COLUMNS = ("user_id", "purpose", "decision", "source", "updated_at")
MAX_SOURCE_CHARS = 64  # as POST /v1/consent
FUTURE_SLACK = timedelta(minutes=5)
"""Clock skew allowed between the exporting system and this one."""
CHUNK_ROWS = 200_000
WRITE_ROWS = 50_000
"""Records per progress mark: a rerun after an interruption redoes at most these."""
SHOWN = 5
WRITERS = 2
EARLIEST = pa.scalar(0, pa.timestamp("us", tz="UTC"))
RECORDS = pa.schema(
    [
        ("user_id", pa.string()),
        ("purpose", pa.string()),
        ("granted", pa.bool_()),
        ("source", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""Checked records, what the writer takes."""

Say = Callable[[str], None]


class ConsentFileError(RankgateError):
    """A file rankgate refuses to import; nothing of it was written."""

    status_code = 422


@dataclass
class ImportResult:
    rows: int = 0
    written: int = 0
    """Records stored (new, or later than the stored one)."""
    resumed_at: int = 0
    """Rows an earlier, interrupted run had written (not written again)."""
    check_s: float = 0.0
    write_s: float = 0.0
    finished_before: str | None = None
    """When an earlier run finished this file (then nothing was done)."""

    @property
    def unchanged(self) -> int:
        return self.rows - self.resumed_at - self.written


def parse_columns(pairs: Sequence[str]) -> dict[str, str]:
    """`--column NAME=THEIRS` options: rankgate's column name -> the file's."""
    mapping = {name: name for name in COLUMNS}
    for pair in pairs:
        name, sep, theirs = pair.partition("=")
        if not sep or not theirs:
            raise RankgateError(f"--column {pair!r}: expected NAME=COLUMN_IN_FILE", 422)
        if name not in COLUMNS:
            raise RankgateError(
                f"--column {pair!r}: {name!r} is not one of {', '.join(COLUMNS)}", 422
            )
        mapping[name] = theirs
    return mapping


class ConsentFile:
    """The file's chunks, with rankgate's column names."""

    def __init__(
        self,
        path: Path,
        columns: Mapping[str, str],
        default_source: str | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.path = path
        self.columns = dict(columns)
        self.default_source = default_source
        self.chunk_rows = chunk_rows
        if not path.is_file():
            raise RankgateError(f"{path}: no such file", 422)
        name = path.name.lower()
        if name.endswith((".parquet", ".pq")):
            self.kind = "parquet"
        elif name.endswith((".csv", ".csv.gz", ".csv.bz2")):
            self.kind = "csv"
        else:
            raise RankgateError(f"{path}: expected a .csv or .parquet file", 422)
        present = self._file_columns()
        wanted = [c for c in COLUMNS if not (c == "source" and default_source is not None)]
        missing = [c for c in wanted if self.columns[c] not in present]
        if default_source is not None and self.columns["source"] in present:
            wanted.append("source")
        if missing:
            shown = ", ".join(
                repr(self.columns[c]) + ("" if self.columns[c] == c else f" ({c})") for c in missing
            )
            raise ConsentFileError(
                f"{path}: missing column{'s' if len(missing) > 1 else ''} {shown} "
                f"(the file has: {', '.join(present[:20])}); name yours with --column NAME=YOURS"
                + ("" if "source" not in missing else ", or give --source")
            )
        self.read = wanted

    def _file_columns(self) -> list[str]:
        try:
            if self.kind == "parquet":
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            with pacsv.open_csv(self.path) as reader:
                return list(reader.schema.names)
        except (pa.ArrowException, OSError) as exc:
            raise self.unreadable(exc) from exc

    def unreadable(self, exc: Exception) -> ConsentFileError:
        """The reader's complaint, without the row it quotes (which may hold an id)."""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        text = re.sub(r"(Expected \d+ columns, got \d+).*", r"\1", text)[:200]
        return ConsentFileError(f"{self.path}: not a readable {self.kind} file ({text})")

    def digest(self) -> str:
        """sha256 of the file's bytes and of how it is read."""
        h = hashlib.sha256()
        with self.path.open("rb") as stream:
            while block := stream.read(1 << 22):
                h.update(block)
        h.update(repr((sorted(self.columns.items()), self.default_source)).encode())
        return h.hexdigest()

    def chunks(self) -> Iterator[pa.Table]:
        theirs = [self.columns[c] for c in self.read]
        try:
            if self.kind == "parquet":
                batches: Any = pq.ParquetFile(self.path).iter_batches(
                    batch_size=self.chunk_rows, columns=theirs
                )
            else:
                # Every column as text: the checks below parse it, naming rows.
                batches = pacsv.open_csv(
                    self.path,
                    read_options=pacsv.ReadOptions(block_size=self.chunk_rows * 64),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=theirs,
                        column_types=dict.fromkeys(theirs, pa.string()),
                        strings_can_be_null=False,
                    ),
                )
            for batch in batches:
                table = pa.Table.from_batches([batch]).select(theirs).rename_columns(self.read)
                if "source" not in self.read:
                    table = table.append_column(
                        "source", pa.repeat(pa.scalar(self.default_source), len(table))
                    )
                yield table
        except (pa.ArrowException, OSError) as exc:
            raise self.unreadable(exc) from exc


class Checker:
    """Checks chunks: `RECORDS` tables of them, or their problems."""

    def __init__(self, file: ConsentFile, purposes: Sequence[str], limits: LimitsConfig) -> None:
        self.file = file
        self.purposes = sorted(purposes)
        self.limits = limits
        self.now = datetime.now(UTC)

    def where(self, column: str) -> str:
        theirs = self.file.columns[column]
        if column == "source" and "source" not in self.file.read:
            return "--source"
        return f"column {theirs!r}" + ("" if theirs == column else f" ({column})")

    def check(self, table: pa.Table, first_row: int) -> pa.Table:
        """The chunk's records (`RECORDS`); `ConsentFileError` naming rows (counted from 1,
        after a CSV's header line), columns and problems when any row is wrong."""
        problems: list[tuple[int, str, str]] = []
        bad_rows = [0]

        def flag(column: str, bad: Any, problem: Callable[[int], str]) -> None:
            rows = pc.indices_nonzero(pc.fill_null(bad, True)).to_pylist()
            problems.extend((first_row + r + 1, column, problem(r)) for r in rows[:SHOWN])
            bad_rows[0] += len(rows)

        ids = self._text(table, "user_id", allow_integers=True)
        limit = self.limits.max_user_id_chars
        pattern = "^" + USER_ID_PATTERN.pattern + "$"
        flag("user_id", pc.equal(ids, ""), lambda r: "missing")
        flag(
            "user_id",
            pc.and_(
                pc.not_equal(ids, ""),
                pc.invert(pc.match_substring_regex(ids, pattern=pattern)),
            ),
            lambda r: "letters, digits and . _ : @ - only, starting with a letter or digit",
        )
        flag(
            "user_id",
            pc.greater(pc.utf8_length(ids), limit),
            lambda r: f"at most {limit} characters",
        )

        purposes = self._text(table, "purpose")
        known = pa.array(self.purposes, pa.string())
        flag(
            "purpose",
            pc.invert(pc.is_in(purposes, value_set=known)),
            lambda r: f"unknown purpose {shorten(purposes[r])} (known: {', '.join(self.purposes)})",
        )

        decisions = table["decision"]
        if pa.types.is_boolean(decisions.type):
            granted = decisions
            flag("decision", pc.is_null(decisions), lambda r: "missing")
        else:
            decisions = self._text(table, "decision")
            allowed = pa.array(sorted(DECISIONS), pa.string())
            flag(
                "decision",
                pc.invert(pc.is_in(decisions, value_set=allowed)),
                lambda r: f"{shorten(decisions[r])}: expected granted or denied",
            )
            granted = pc.equal(decisions, "granted")

        sources = self._text(table, "source")
        flag("source", pc.equal(sources, ""), lambda r: "missing")
        flag(
            "source",
            pc.greater(pc.utf8_length(sources), MAX_SOURCE_CHARS),
            lambda r: f"at most {MAX_SOURCE_CHARS} characters",
        )
        flag(
            "source",
            pc.equal(sources, DEMO_SOURCE),
            lambda r: f"{DEMO_SOURCE!r} marks made-up demo records; name the real source",
        )

        times = self._times(table, flag)
        if times is not None:
            latest = pa.scalar(self.now + FUTURE_SLACK, pa.timestamp("us", tz="UTC"))
            flag("updated_at", pc.greater(times, latest), lambda r: "later than now")
            flag("updated_at", pc.less(times, EARLIEST), lambda r: "earlier than 1970")

        if problems:
            problems.sort()
            lines = [f"  row {row}, {self.where(col)}: {text}" for row, col, text in problems]
            last = first_row + len(table)
            raise ConsentFileError(
                f"{self.file.path}: {bad_rows[0]} problem{'s' if bad_rows[0] > 1 else ''} "
                f"in rows {first_row + 1}-{last}; nothing was imported. The first:\n"
                + "\n".join(lines[:SHOWN])
            )
        assert times is not None
        return pa.table([ids, purposes, granted, sources, times], schema=RECORDS)

    def _text(self, table: pa.Table, column: str, allow_integers: bool = False) -> pa.ChunkedArray:
        values = table[column]
        kind = values.type
        textual = (
            pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)
            or (pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type))
        )
        if textual or (allow_integers and pa.types.is_integer(kind)):
            values = pc.cast(values, pa.string())
        elif not pa.types.is_string(kind):
            raise ConsentFileError(
                f"{self.file.path}: {self.where(column)}: text expected, not {kind}"
            )
        return pc.fill_null(values, "")

    def _times(
        self, table: pa.Table, flag: Callable[[str, Any, Callable[[int], str]], None]
    ) -> pa.ChunkedArray | None:
        values = table["updated_at"]
        kind = values.type
        utc = pa.timestamp("us", tz="UTC")
        if pa.types.is_timestamp(kind):
            if kind.tz is None:
                raise ConsentFileError(
                    f"{self.file.path}: {self.where('updated_at')}: timestamps without a time "
                    "zone; write them with one (UTC: pa.timestamp('us', tz='UTC'))"
                )
            times = pc.cast(values, utc, safe=False)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            text = pc.cast(values, pa.string())
            try:
                times = pc.cast(text, utc)
            except pa.ArrowInvalid:
                # Which rows: parsed one by one (only for a chunk that has a bad one).
                bad = [not parses(v) for v in text.to_pylist()]
                flag(
                    "updated_at",
                    pa.array(bad),
                    lambda r: (
                        f"{shorten(text[r])}: not an ISO 8601 time with a zone "
                        "(e.g. 2026-03-01T12:00:00Z)"
                    ),
                )
                return None
        else:
            raise ConsentFileError(
                f"{self.file.path}: {self.where('updated_at')}: ISO 8601 text or a timestamp "
                f"expected, not {kind}"
            )
        flag("updated_at", pc.is_null(times), lambda r: "missing")
        return times


def parses(value: str | None) -> bool:
    if value is None:
        return True  # reported as missing
    try:
        pa.array([value]).cast(pa.timestamp("us", tz="UTC"))
    except pa.ArrowInvalid:
        return False
    return True


def shorten(value: Any) -> str:
    text = value.as_py() if isinstance(value, pa.Scalar) else value
    text = "" if text is None else str(text)
    return repr(text if len(text) <= 40 else text[:40] + "…")


def write_records(store: ConsentStore, records: pa.Table) -> int:
    """Pseudonymise and write checked records (`RECORDS`; later-wins); how many were stored."""
    people = pc.dictionary_encode(records["user_id"]).combine_chunks()
    keys = pa.array(user_keys(people.dictionary.to_pylist())).take(people.indices)
    # Fixed width ("2026-03-01 12:00:00.000000"): ISO 8601 in UTC, ordered as text.
    text = pc.cast(pc.cast(records["updated_at"], pa.timestamp("us")), pa.string())
    stamps = pc.binary_join_element_wise(
        pc.utf8_slice_codeunits(text, 0, 10),
        "T",
        pc.utf8_slice_codeunits(text, 11, 26),
        "+00:00",
        "",
    )
    values = record_json(records["granted"], records["source"], stamps)
    # The rank RECORD_IF_NEWER compares: the time, then "0" (granted) or "1" (denied).
    ranks = pc.binary_join_element_wise(stamps, pc.if_else(records["granted"], "0", "1"), "")
    columns = (
        keys.to_pylist(),
        records["purpose"].to_pylist(),
        ranks.to_pylist(),
        values.to_pylist(),
    )
    # Two connections: one packs its next batch while the server runs the other's
    # (the outcome does not depend on the order records arrive in).
    share = -(-len(records) // WRITERS) or 1
    with ThreadPoolExecutor(WRITERS) as pool:
        parts = [
            pool.submit(store.record_newer, *(c[start : start + share] for c in columns))
            for start in range(0, len(records), share)
        ]
        return sum(part.result() for part in parts)


def import_consent(
    path: Path,
    columns: Mapping[str, str] | None = None,
    default_source: str | None = None,
    say: Say = lambda _line: None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportResult:
    """Check the whole file, then write it (resuming an interrupted import of it)."""
    file = ConsentFile(path, columns or parse_columns(()), default_source, chunk_rows)
    env = Environment.open()
    checker = Checker(file, list(load_policy().purposes), LimitsConfig())
    # The same file under another pseudonymisation key is another import.
    digest = hashlib.sha256((file.digest() + env.key_fingerprint).encode()).hexdigest()[:32]
    marker = redis_keys.consent_import(env.home.namespace, digest)
    result = ImportResult()
    progress = {k.decode(): v.decode() for k, v in env.redis.hgetall(marker).items()}  # type: ignore[union-attr]
    if "finished_at" in progress:
        result.rows = result.resumed_at = int(progress["rows"])
        result.written = int(progress["written"])
        result.finished_before = progress["finished_at"]
        return result

    started = time.perf_counter()
    for table, first in numbered(file.chunks()):
        checker.check(table, first)
        result.rows = first + len(table)
    result.check_s = time.perf_counter() - started
    say(f"✓ {path.name}: {result.rows} records check out ({result.check_s:.1f} s)")

    done = int(progress.get("rows_done", 0))
    written = int(progress.get("written", 0))
    if done:
        say(f"• resuming: rows 1-{done} were written by an earlier run")
    result.resumed_at = done
    store = env.consent
    started = time.perf_counter()
    progress_at = done
    try:
        for table, first in numbered(file.chunks()):
            if first + len(table) <= done:
                continue
            records = checker.check(table, first).slice(max(done - first, 0))
            offset = max(done, first)
            for start in range(0, len(records), WRITE_ROWS):
                part = records.slice(start, WRITE_ROWS)
                count = write_records(store, part)
                result.written += count
                written += count
                progress_at = offset + start + len(part)
                env.redis.hset(
                    marker,
                    mapping={"rows": result.rows, "rows_done": progress_at, "written": written},
                )
        result.write_s = time.perf_counter() - started
        env.redis.hset(
            marker,
            mapping={
                "rows": result.rows,
                "rows_done": result.rows,
                "written": written,
                "finished_at": now_iso(),
            },
        )
    except (redis.RedisError, OSError) as exc:
        raise RankgateError(
            f"{path}: the import stopped after row {progress_at}: Redis failed "
            f"({type(exc).__name__}: {exc}); run the same command again to go on from there",
            503,
        ) from exc
    return result


def numbered(chunks: Iterator[pa.Table]) -> Iterator[tuple[pa.Table, int]]:
    """Each chunk with the index of its first row in the file."""
    first = 0
    for table in chunks:
        yield table, first
        first += len(table)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
