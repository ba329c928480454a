"""In-sample detection from lineage: a version's training window (declared with `model
register --trained-on`, recorded by `model train`) against the times of the slots
`model evaluate` and the promotion gate evaluate on; `--holdout-after` keeps the later
slots only. On the example's logs (10,000 slots over 2019-11-24..30)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from model_store.evaluation import LoggedDecision, decision_times, decisions_after
from model_store.lineage import parse_window, to_nanoseconds
from model_store.manifest import MANIFEST_FILE, ONNX_FILE
from rankgate.cli.main import main
from rankgate.core.errors import ModelStoreError
from rankgate.core.home import Home
from rankgate.ops.environment import Environment

DECLARED = "declared"
"""Registered with a training window over the whole example log."""
WHOLE_LOG = "2019-11-24..2019-12-01"


def log_times(env: Environment) -> np.ndarray:
    """The example log's times (int64 ns, UTC, sorted), read here from the file itself."""
    spec = env.project.spec.interactions
    assert spec is not None and spec.time_column is not None
    logs = pd.read_parquet(env.project.path(spec.path, env.data_dir))
    stamps = pd.to_datetime(logs[spec.time_column], utc=True)
    return np.sort(stamps.to_numpy("datetime64[ns]").astype(np.int64))


def register(version: str, *extra: str) -> str:
    env = Environment.open(redis=False)
    v1 = env.models.path("v1")
    features = env.models.manifest("v1").lineage.features_source
    assert features is not None
    command = ["model", "register", version, "--onnx", str(v1 / ONNX_FILE)]
    result = CliRunner().invoke(main, [*command, "--features", features, *extra])
    return result.output


@pytest.fixture(scope="module")
def declared(ready_home: Home) -> Iterator[str]:
    output = register(DECLARED, "--trained-on", WHOLE_LOG)
    assert f"{DECLARED}: trained on 2019-11-24T00:00:00Z..2019-12-01T00:00:00Z" in output, output
    yield DECLARED
    shutil.rmtree(Environment.open(redis=False).models.path(DECLARED), ignore_errors=True)


@pytest.fixture
def unwindowed(env: Environment) -> Iterator[str]:
    """v1 as `model register` wrote it before training windows existed."""
    name = "unwindowed"
    shutil.copytree(env.models.path("v1"), env.models.path(name))
    path = env.models.path(name) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["lineage"].pop("trained_on", None)
    manifest["lineage"]["made_by"] = "rankgate model register"
    path.write_text(json.dumps(manifest))
    yield name
    shutil.rmtree(env.models.path(name), ignore_errors=True)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2019-11-30..2019-11-24", "must be before TO"),
        ("2019-11-24T00:00..2019-11-24T00:00", "must be before TO"),
        ("last week..2019-11-30", "'last week' is not an ISO 8601 time"),
        ("2019-11-24", "give FROM..TO"),
        ("2019-11-24..", "give FROM..TO"),
    ],
)
def test_a_bad_window_is_refused_naming_the_option(value: str, problem: str) -> None:
    with pytest.raises(ModelStoreError, match="--trained-on") as refused:
        parse_window(value)
    assert problem in refused.value.message


def test_a_window_is_utc_unless_it_says_otherwise() -> None:
    window = parse_window("2019-11-24T01:00..2019-11-24T12:00:00+02:00")
    assert window.start == datetime(2019, 11, 24, 1, tzinfo=UTC)
    assert window.end == datetime(2019, 11, 24, 10, tzinfo=UTC)


def test_register_refuses_a_bad_window_and_registers_nothing(env: Environment) -> None:
    output = register("bad-window", "--trained-on", "2019-12-01..2019-11-24")
    assert "--trained-on '2019-12-01..2019-11-24': FROM" in output
    assert not env.models.exists("bad-window")


def test_register_keeps_the_declared_window(env: Environment, declared: str) -> None:
    window = env.models.manifest(declared).lineage.trained_on
    assert window is not None and window == parse_window(WHOLE_LOG)


def test_train_records_the_times_of_the_rows_it_fitted_on(env: Environment) -> None:
    """Setup trains v2 on the first 80 % of the log by time: its window ends there."""
    times = log_times(env)
    fitted = times[: int(len(times) * 0.8)]
    window = env.models.manifest("v2").lineage.trained_on
    assert window is not None
    assert to_nanoseconds(window.start) <= fitted[0] < to_nanoseconds(window.start) + 1000
    assert to_nanoseconds(window.end) - 1000 < fitted[-1] <= to_nanoseconds(window.end)
    assert to_nanoseconds(window.end) < times[len(fitted)]


def test_evaluate_warns_only_for_the_versions_whose_window_overlaps_the_slots(
    env: Environment, declared: str
) -> None:
    """After v2's window: v2 has not seen the slots, `declared` (the whole log) has."""
    v2 = env.models.manifest("v2").lineage.trained_on
    assert v2 is not None
    after = v2.end.isoformat()
    args = ["model", "evaluate", declared, "--against", "v2"]
    result = CliRunner().invoke(main, [*args, "--holdout-after", after, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    # The slots after T, counted from the log file itself.
    assert figures["slots"] == int((log_times(env) > to_nanoseconds(v2.end)).sum()) == 2000
    assert figures["in_sample"]["overlapping"] == {
        declared: "2019-11-24T00:00:00Z..2019-12-01T00:00:00Z"
    }
    assert figures["in_sample"]["unknown"] == []
    assert figures["in_sample"]["slot_times"][0] > after.replace("+00:00", "Z")
    text = CliRunner().invoke(main, [*args, "--holdout-after", after, "--slots", "300"])
    assert text.exit_code == 0, text.output
    assert f"{declared}'s training window 2019-11-24T00:00:00Z..2019-12-01T00:00:00Z" in text.output
    assert "--holdout-after 2019-12-01T00:00:00Z" in text.output
    assert "v2's training window" not in text.output and "v2 has no" not in text.output


def test_a_version_without_a_window_is_said_to_be_unknown(unwindowed: str) -> None:
    args = ["model", "evaluate", unwindowed, "--slots", "300"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (
        f"{unwindowed} has no training window (register --trained-on FROM..TO): cannot check "
        "it did not learn from these slots"
    ) in result.output
    figures = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert figures["in_sample"]["unknown"] == [unwindowed]


def test_a_bad_or_too_late_holdout_time_is_an_error_naming_the_option(
    ready_home: Home,
) -> None:
    bad = CliRunner().invoke(main, ["model", "evaluate", "v2", "--holdout-after", "soon"])
    assert bad.exit_code == 1 and "--holdout-after 'soon': not an ISO 8601 time" in bad.output
    late = CliRunner().invoke(main, ["model", "evaluate", "v2", "--holdout-after", "2019-12-01"])
    assert late.exit_code == 1
    assert "--holdout-after 2019-12-01T00:00:00Z: no logged slot is after it" in late.output


def test_the_gates_evidence_carries_the_warning(env: Environment, declared: str) -> None:
    from features.tables import load_catalogue
    from model_store.evaluation import decisions_from_logs, union_specs
    from serving.ops.evidence import gather

    views = env.views()
    decisions = decisions_from_logs(
        env.project,
        views,
        env.data_dir,
        union_specs(env.models, [declared, "v2"]),
        load_catalogue(env.project, views, env.data_dir),
    )[-300:]
    evidence = gather(env, declared, "v2", decisions, "logs", "snips", 0.95, project_log=True)
    assert [line.split(" overlaps")[0] for line in evidence.in_sample] == [
        f"{declared}'s training window 2019-11-24T00:00:00Z..2019-12-01T00:00:00Z"
    ]
    assert evidence.in_sample[0] in evidence.lines()


def test_audit_decisions_are_kept_by_their_time() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    decisions = [
        LoggedDecision({}, {}, [1], [], group=n, at=(start + timedelta(hours=n)).timestamp())
        for n in range(5)
    ]
    kept = decisions_after(decisions, to_nanoseconds(start + timedelta(hours=2)))
    assert [d.group for d in kept] == [3, 4]
    times = decision_times(kept)
    assert times is not None and list(times) == [
        to_nanoseconds(start + timedelta(hours=n)) for n in (3, 4)
    ]
