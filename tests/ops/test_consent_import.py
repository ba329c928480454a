"""`rankgate consent import`: a consent export written to the real embedded Redis under
pseudonymous keys, checked whole before anything is written, idempotent, later-wins,
and resumable; and setup's demo records through the same bulk writer.

Each test names its people with a fresh prefix, so the session's Redis (shared with
other tests) holds nobody else's records under them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key, user_keys
from rankgate.governance.consent import (
    ConsentState,
    ConsentStore,
    consent_fields,
    record_json,
)
from rankgate.governance.demo_consent import demo_consent
from rankgate.governance.policy import load_policy
from rankgate.ops import consent_import
from rankgate.ops.consent_import import import_consent
from rankgate.ops.environment import Environment
from rankgate.ops.setup import write_demo_consent
from tests.redis_contents import places_holding

EMAIL, ONSITE = "email_marketing", "onsite_personalization"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def env(session_home: Home) -> Environment:
    return Environment.open()


@pytest.fixture
def people() -> list[str]:
    prefix = f"ci-{uuid.uuid4().hex[:10]}"
    return [f"{prefix}-{n}" for n in range(4)]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(row[c] for c in header) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def row(uid: str, purpose: str, decision: str, at: datetime, source: str = "cmp") -> dict[str, str]:
    return {
        "user_id": uid,
        "purpose": purpose,
        "decision": decision,
        "source": source,
        "updated_at": iso(at),
    }


def stored(env: Environment, uid: str, purpose: str) -> dict[str, object] | None:
    raw = env.redis.hget(redis_keys.consent(env.home.namespace, user_key(uid)), purpose)
    return None if raw is None else json.loads(raw)  # type: ignore[arg-type]


def snapshot(env: Environment, ids: list[str]) -> dict[str, dict[bytes, bytes]]:
    return {
        uid: env.redis.hgetall(redis_keys.consent(env.home.namespace, user_key(uid)))  # type: ignore[misc]
        for uid in ids
    }


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["consent", "import", *args])
    return result.exit_code, result.output


def test_a_csv_export_is_stored_under_pseudonymous_keys(
    env: Environment, people: list[str], tmp_path: Path
) -> None:
    a, b, c, _ = people
    path = write_csv(
        tmp_path / "consent.csv",
        [
            row(a, EMAIL, "granted", T0),
            row(a, ONSITE, "denied", T0 + timedelta(seconds=1)),
            row(b, ONSITE, "granted", T0, source='say "yes"'),
            row(c, EMAIL, "denied", T0),
        ],
    )
    code, output = run(str(path))
    assert code == 0, output
    assert "4 records check out" in output and "4 records written, 0 unchanged" in output

    assert env.consent.state(user_key(a), EMAIL) == ConsentState.GRANTED
    assert env.consent.state(user_key(a), ONSITE) == ConsentState.DENIED
    assert env.consent.state(user_key(b), ONSITE) == ConsentState.GRANTED
    assert env.consent.state(user_key(b), EMAIL) == ConsentState.UNKNOWN
    assert env.consent.state(user_key(c), EMAIL) == ConsentState.DENIED
    assert stored(env, b, ONSITE) == {
        "granted": True,
        "source": 'say "yes"',
        "updated_at": "2026-03-01T12:00:00.000000+00:00",
    }
    assert_no_raw_ids(env.redis, people)


def test_a_parquet_export_with_its_own_column_names(
    env: Environment, people: list[str], tmp_path: Path
) -> None:
    a, b, _, _ = people
    berlin = datetime(2026, 3, 1, 13, 0, 0, 250_000, tzinfo=UTC)
    table = pa.table(
        {
            "customer": [a, a, b],
            "purpose": [EMAIL, ONSITE, EMAIL],
            "opted_in": [True, False, True],
            "decided": pa.array([berlin, berlin, berlin], pa.timestamp("ns", tz="Europe/Berlin")),
        }
    )
    path = tmp_path / "consent.parquet"
    pq.write_table(table, path)
    code, output = run(
        str(path),
        "--column",
        "user_id=customer",
        "--column",
        "decision=opted_in",
        "--column",
        "updated_at=decided",
        "--source",
        "warehouse",
    )
    assert code == 0, output
    assert stored(env, a, EMAIL) == {
        "granted": True,
        "source": "warehouse",
        "updated_at": "2026-03-01T13:00:00.250000+00:00",
    }
    assert env.consent.state(user_key(a), ONSITE) == ConsentState.DENIED
    assert env.consent.state(user_key(b), EMAIL) == ConsentState.GRANTED
    assert_no_raw_ids(env.redis, people)


def test_importing_a_file_again_changes_nothing(
    env: Environment, people: list[str], tmp_path: Path
) -> None:
    rows = [row(uid, p, "granted", T0) for uid in people for p in (EMAIL, ONSITE)]
    path = write_csv(tmp_path / "consent.csv", rows)
    assert run(str(path))[0] == 0
    before = snapshot(env, people)

    code, output = run(str(path))
    assert code == 0 and "already imported (8 records, 8 written" in output, output
    assert snapshot(env, people) == before

    # Without the progress marker the records themselves say nothing is newer.
    for key in env.redis.scan_iter(redis_keys.consent_import(env.home.namespace, "*")):
        env.redis.delete(key)
    code, output = run(str(path))
    assert code == 0 and "0 records written, 8 unchanged" in output, output
    assert snapshot(env, people) == before


def test_an_older_record_never_replaces_a_later_decision(
    env: Environment, people: list[str], tmp_path: Path
) -> None:
    a, b, c, _ = people
    write_csv(tmp_path / "now.csv", [row(a, EMAIL, "granted", T0), row(b, EMAIL, "granted", T0)])
    assert run(str(tmp_path / "now.csv"))[0] == 0

    older = [row(a, EMAIL, "denied", T0 - timedelta(days=3)), row(c, EMAIL, "denied", T0)]
    code, output = run(str(write_csv(tmp_path / "older.csv", older)))
    assert code == 0 and "1 records written, 1 unchanged" in output, output
    assert env.consent.state(user_key(a), EMAIL) == ConsentState.GRANTED
    assert env.consent.state(user_key(c), EMAIL) == ConsentState.DENIED

    # Later wins; at the same time a denial wins over a grant, in either order.
    newer = [row(a, EMAIL, "denied", T0 + timedelta(microseconds=1)), row(b, EMAIL, "denied", T0)]
    assert run(str(write_csv(tmp_path / "newer.csv", newer)))[0] == 0
    assert env.consent.state(user_key(a), EMAIL) == ConsentState.DENIED
    assert env.consent.state(user_key(b), EMAIL) == ConsentState.DENIED
    same_time_grant = [row(b, EMAIL, "granted", T0, source="other")]
    assert run(str(write_csv(tmp_path / "grant.csv", same_time_grant)))[0] == 0
    assert env.consent.state(user_key(b), EMAIL) == ConsentState.DENIED

    # An API write (dated now) is later than any export of the past.
    env.consent.record(user_key(c), {EMAIL: True}, source="api")
    assert run(str(write_csv(tmp_path / "late.csv", [row(c, EMAIL, "denied", T0)])))[0] == 0
    assert env.consent.state(user_key(c), EMAIL) == ConsentState.GRANTED


def future() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda r: r.update(purpose="telepathy"),
            "row 3, column 'purpose': unknown purpose 'telepathy'",
        ),
        (
            lambda r: r.update(decision="yes"),
            "row 3, column 'decision': 'yes': expected granted or denied",
        ),
        (
            lambda r: r.update(decision=""),
            "row 3, column 'decision': '': expected granted or denied",
        ),
        (
            lambda r: r.update(updated_at="01/03/2026"),
            "row 3, column 'updated_at': '01/03/2026': not an ISO 8601",
        ),
        (
            lambda r: r.update(updated_at="2026-03-01T12:00:00"),
            "row 3, column 'updated_at': '2026-03-01T12:00:00': not an ISO 8601",
        ),
        (
            lambda r: r.update(updated_at=iso(future())),
            "row 3, column 'updated_at': later than now",
        ),
        (lambda r: r.update(user_id="bad id"), "row 3, column 'user_id': letters, digits"),
        (lambda r: r.update(user_id=""), "row 3, column 'user_id': missing"),
        (lambda r: r.update(source="x" * 65), "row 3, column 'source': at most 64 characters"),
    ],
)
def test_a_bad_row_is_named_and_nothing_is_written(
    env: Environment,
    people: list[str],
    tmp_path: Path,
    change: Callable[[dict[str, str]], None],
    expected: str,
) -> None:
    rows = [row(uid, EMAIL, "granted", T0) for uid in people]
    change(rows[2])
    markers = set(env.redis.scan_iter(redis_keys.consent_import(env.home.namespace, "*")))
    code, output = run(str(write_csv(tmp_path / "consent.csv", rows)))
    assert code == 1
    assert expected in output and "nothing was imported" in output, output
    assert people[0] not in output  # an error never repeats a user id
    assert all(not h for h in snapshot(env, people).values())
    assert set(env.redis.scan_iter(redis_keys.consent_import(env.home.namespace, "*"))) == markers


def test_a_bad_row_in_a_late_chunk_stops_the_whole_file(
    env: Environment, people: list[str], tmp_path: Path
) -> None:
    rows = [row(f"{people[0]}-{n}", EMAIL, "granted", T0) for n in range(50)]
    rows[47]["purpose"] = "telepathy"
    path = write_csv(tmp_path / "consent.csv", rows)
    with pytest.raises(consent_import.ConsentFileError, match="row 48, column 'purpose'"):
        import_consent(path, chunk_rows=10)
    assert all(not h for h in snapshot(env, [r["user_id"] for r in rows]).values())


def test_a_missing_column_is_named(tmp_path: Path, session_home: Home) -> None:
    path = write_csv(
        tmp_path / "c.csv", [{"user_id": "u-1", "purpose": EMAIL, "decision": "granted"}]
    )
    code, output = run(str(path))
    assert code == 1
    assert "missing columns 'source', 'updated_at'" in output and "--column" in output, output
    code, output = run(str(path), "--column", "when=updated_at")
    assert code == 1 and "'when' is not one of user_id, purpose" in output, output


def test_an_interrupted_import_goes_on_where_it_stopped(
    env: Environment, people: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"{people[0]}-{n}" for n in range(20)]
    decisions = [n % 3 > 0 for n in range(20)]
    path = tmp_path / "consent.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [uid for uid in ids for _ in (EMAIL, ONSITE)],
                "purpose": [EMAIL, ONSITE] * 20,
                "decision": [d for d in decisions for _ in (EMAIL, ONSITE)],
                "source": ["cmp"] * 40,
                "updated_at": pa.array([T0] * 40, pa.timestamp("us", tz="UTC")),
            }
        ),
        path,
    )
    # Chunks of 10 rows, written 8 at a time: rows 1-8, 9-10, 11-18, ...
    monkeypatch.setattr(consent_import, "WRITE_ROWS", 8)
    monkeypatch.setattr(consent_import, "WRITERS", 1)
    real = ConsentStore.record_newer
    calls: list[int] = []

    def stopped_at_the_third(self: ConsentStore, *args: list[str]) -> int:
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped
        calls.append(len(args[0]))
        return real(self, *args)

    monkeypatch.setattr(ConsentStore, "record_newer", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        import_consent(path, chunk_rows=10)
    assert sum(bool(h) for h in snapshot(env, ids).values()) == 5  # rows 1-10: 5 people

    monkeypatch.setattr(ConsentStore, "record_newer", real)
    lines: list[str] = []
    result = import_consent(path, chunk_rows=10, say=lines.append)
    assert "• resuming: rows 1-10 were written by an earlier run" in lines
    assert (result.rows, result.resumed_at, result.written) == (40, 10, 30)
    for uid, granted in zip(ids, decisions, strict=True):
        expected = ConsentState.GRANTED if granted else ConsentState.DENIED
        assert env.consent.states([user_key(uid)], EMAIL) == [expected]
        assert env.consent.states([user_key(uid)], ONSITE) == [expected]
    assert import_consent(path, chunk_rows=10).finished_before is not None


def test_setups_demo_records_are_demo_consent_through_the_bulk_writer(
    env: Environment, people: list[str]
) -> None:
    ids = [f"{people[0]}-{n}" for n in range(300)]
    purposes = list(load_policy().purposes)
    write_demo_consent(env.consent, ids, purposes)
    for purpose in purposes:
        states = env.consent.states(user_keys(ids), purpose)
        expected = [
            ConsentState(
                {True: "granted", False: "denied", None: "unknown"}[
                    demo_consent(uid, purposes).get(purpose)
                ]
            )
            for uid in ids
        ]
        assert states == expected
    assert_no_raw_ids(env.redis, ids)


def test_bulk_records_read_as_the_api_writes_them() -> None:
    sources = ["cmp", 'quote " and \\ and é', "ü"]
    at = "2026-03-01T12:00:00.000000+00:00"
    built = record_json(
        pa.chunked_array([[True, False, True]]),
        pa.chunked_array([sources]),
        pa.chunked_array([[at] * 3]),
    ).to_pylist()
    for value, granted, source in zip(built, [True, False, True], sources, strict=True):
        fields = consent_fields({"p": granted}, source)
        api = json.loads(fields["p"])
        assert json.loads(value) == {**api, "updated_at": at}
    assert user_keys(["a", "b"]) == [user_key("a"), user_key("b")]


def assert_no_raw_ids(client: redis.Redis, ids: list[str]) -> None:
    """No key name, value, field, member or stream entry of the server holds a raw id."""
    assert places_holding(client, [uid.encode() for uid in ids]) == []


def test_a_file_of_no_rows_imports_nothing_once(session_home: Home, tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("user_id,purpose,decision,source,updated_at\n")
    first = import_consent(path)
    assert (first.rows, first.written, first.finished_before) == (0, 0, None)
    again = import_consent(path)
    assert (again.rows, again.written) == (0, 0) and again.finished_before is not None


def test_a_malformed_csv_is_refused_without_quoting_its_row(
    session_home: Home, tmp_path: Path
) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "user_id,purpose,decision,source,updated_at\n"
        f"u-1,{EMAIL},granted,cmp,2026-03-01T12:00:00Z\n"
        f"u-secret-7,{EMAIL}\n"
    )
    code, output = run(str(path))
    assert code == 1 and "not a readable csv file" in output, output
    assert "Expected 5 columns, got 2" in output and "u-secret-7" not in output, output


def test_the_documented_warehouse_prepare_step_writes_a_row_group_per_page(
    session_home: Home, tmp_path: Path
) -> None:
    """docs/projects.md's example, run against SQLite's DB-API driver as the warehouse."""
    import sqlite3

    from tests import REPO

    page = (REPO / "docs" / "projects.md").read_text()
    start = page.index("```python\n", page.index("### Prepare steps that export from a warehouse"))
    code = page[start + len("```python\n") : page.index("```\n", start + 1)]
    database = tmp_path / "shop.db"
    # The warehouse hands out datetimes for this column. (Not through SQLite's own
    # "timestamp" converter: Feast's SQLite store replaces it for the whole process.)
    sqlite3.register_converter("warehouse_time", lambda raw: datetime.fromisoformat(raw.decode()))
    with sqlite3.connect(database) as db:
        db.execute(
            "CREATE TABLE profiles (customer_id TEXT, updated_at WAREHOUSE_TIME, segment TEXT, "
            "visits_30d INTEGER)"
        )
        db.executemany(
            "INSERT INTO profiles VALUES (?, ?, ?, ?)",
            [(f"c-{n}", "2026-01-01 00:00:00", "loyal", n) for n in range(25)],
        )
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/projects.md", "exec"), namespace)  # noqa: S102  # the docs' own code
    namespace["PAGE"] = 10
    namespace["connect"] = lambda: sqlite3.connect(database, detect_types=sqlite3.PARSE_DECLTYPES)
    counts = namespace["prepare"](tmp_path / "data")  # type: ignore[operator]
    assert counts == {"shopper_profile": 25}
    written = pq.ParquetFile(tmp_path / "data" / "shopper_profile.parquet")
    assert written.metadata.num_row_groups == 3
    table = written.read()
    assert table["shopper_key"].to_pylist() == user_keys([f"c-{n}" for n in range(25)])
    assert table["updated_at"][0].as_py() == datetime(2026, 1, 1, tzinfo=UTC)


def test_integer_ids_and_a_gzipped_csv(env: Environment, tmp_path: Path) -> None:
    import gzip

    base = uuid.uuid4().int % 10**15 * 1000
    path = tmp_path / "consent.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([base + 1, base + 2], pa.int64()),
                "purpose": [EMAIL, EMAIL],
                "decision": ["granted", "denied"],
                "source": ["crm", "crm"],
                "updated_at": [iso(T0), iso(T0)],
            }
        ),
        path,
    )
    assert run(str(path))[0] == 0
    assert env.consent.state(user_key(str(base + 1)), EMAIL) == ConsentState.GRANTED
    assert env.consent.state(user_key(str(base + 2)), EMAIL) == ConsentState.DENIED

    later = [row(str(base + 1), EMAIL, "denied", T0 + timedelta(hours=1))]
    plain = write_csv(tmp_path / "later.csv", later).read_bytes()
    (tmp_path / "later.csv.gz").write_bytes(gzip.compress(plain))
    code, output = run(str(tmp_path / "later.csv.gz"))
    assert code == 0 and "1 records written" in output, output
    assert env.consent.state(user_key(str(base + 1)), EMAIL) == ConsentState.DENIED
