"""`rankgate setup`: idempotent, per-home, and the example users it lists."""

from __future__ import annotations

from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key
from rankgate.core.settings import get_project
from rankgate.governance.consent import ConsentState
from rankgate.governance.demo_consent import demo_consent
from rankgate.ops.environment import Environment
from rankgate.ops.setup import run_setup
from tests.serving_support import example_user_ids


def test_second_setup_does_nothing_and_says_so(ready_home: Home) -> None:
    lines: list[str] = []
    assert run_setup(lines.append, demo_consent=True) is False
    assert lines[-1] == "nothing to do: everything was already set up."
    assert all(
        line.startswith(("✓", "home:", "project:", "redis:", "note:")) for line in lines[:-1]
    )


def test_a_changed_source_is_named_and_prepared_again(ready_home: Home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Setup follows the sources: it records a hash of each and redoes the data steps
    when one changes, naming it; the models (immutable) are kept, and it says so."""
    import json
    import shutil

    from rankgate.ops.setup import SETUP_FILE, changed_files

    recorded = json.loads((ready_home.root / SETUP_FILE).read_text())
    assert "rankgate.yaml" in recorded["sources"]["files"]
    assert "data/random_all/all.csv.gz" in recorded["sources"]["files"]
    changed = {**recorded["sources"], "files": {**recorded["sources"]["files"]}}
    changed["files"]["policies/fallback.yaml"] = "0" * 64
    assert changed_files(recorded["sources"], changed) == ["policies/fallback.yaml"]
    copy = tmp_path / "project"
    shutil.copytree(get_project().root, copy)
    moved = {**recorded["sources"], "project": str(copy)}
    assert changed_files(recorded["sources"], moved)[0].startswith("project folder (was ")


def test_user_ids_are_derived_from_the_visitor_columns() -> None:
    prepare = get_project().prepare_module
    assert prepare is not None
    frame = prepare.load_impressions()
    ids = example_user_ids()
    assert len(ids) == 561  # distinct visitor profiles in the sample
    # Ids are derived from the file's text (no pandas needed); pandas' reading of
    # the same values gives the same ids, as it did when ids were derived from it,
    # so homes set up earlier keep matching their consent records.
    parsed = frame[prepare.VISITOR_COLUMNS].astype(str).itertuples(index=False)
    assert list(frame["user_id"]) == [prepare.derive_user_id(list(row)) for row in parsed]


def test_demo_consent_is_a_deterministic_mix(env: Environment) -> None:
    ids = example_user_ids()
    states = env.consent.states([user_key(u) for u in ids], "email_marketing")
    counts = {s: states.count(s) for s in ConsentState}
    assert all(count > 50 for count in counts.values()), counts
    expected = demo_consent(ids[0], ["email_marketing"])
    assert states[0] == (
        ConsentState.UNKNOWN
        if "email_marketing" not in expected
        else ConsentState.GRANTED
        if expected["email_marketing"]
        else ConsentState.DENIED
    )


def test_users_command_filters_by_consent(env: Environment) -> None:
    result = CliRunner().invoke(
        main, ["users", "--consent", "denied", "--purpose", "email_marketing", "--limit", "5"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 5
    assert all("email_marketing=denied" in line for line in lines)
    for line in lines:
        assert (
            env.consent.state(user_key(line.split()[0]), "email_marketing") == ConsentState.DENIED
        )


def test_users_command_rejects_unknown_purpose(ready_home: Home) -> None:
    result = CliRunner().invoke(main, ["users", "--purpose", "telepathy"])
    assert result.exit_code == 1
    assert "--purpose: unknown purpose 'telepathy'" in result.output


def test_a_second_home_is_independent(ready_home: Home, other_home: Home) -> None:
    from rankgate.core.redis_server import EmbeddedRedis

    session_url = EmbeddedRedis(ready_home).running_url()
    env = Environment.open()  # opens the other home now
    assert env.home == other_home
    assert run_setup(lambda _line: None) is True
    other_url = EmbeddedRedis(other_home).running_url()
    assert other_url is not None and other_url != session_url
    assert other_home.namespace != ready_home.namespace
    assert env.models.versions() == ["v1", "v2", "v3"]
    assert env.models.path("v1").is_relative_to(other_home.root)
    assert run_setup(lambda _line: None) is False
    # A setup model whose manifest no longer loads (written by an older rankgate) is
    # retrained, and setup says why.
    import json

    manifest = env.models.path("v1") / "manifest.json"
    manifest.write_text(json.dumps({"name": "ranker", "version": "v1"}))
    lines: list[str] = []
    assert run_setup(lines.append) is True
    assert any(line.startswith("• model v1: unusable (") for line in lines), lines
    assert env.models.manifest("v1").lineage.made_by == "rankgate model train"
    # The session home kept its own server and models.
    assert EmbeddedRedis(ready_home).running_url() == session_url
    assert (ready_home.models_dir / "ranker" / "v1" / "manifest.json").exists()


def test_demo_consent_under_old_key_names_is_written_again(env: Environment) -> None:
    """A home whose demo consent predates the hash-tagged key names (the setup marker
    is there, the records are not where they are read now) gets them written again."""
    ids = example_user_ids()
    namespace = env.home.namespace
    keys = [redis_keys.consent(namespace, user_key(uid)) for uid in ids]
    keys = [key for key in keys if env.redis.exists(key)]  # some have no decision at all
    old = {key: key.replace("{", "").replace("}", "") for key in keys}
    for key, old_name in old.items():
        env.redis.rename(key, old_name)
    lines: list[str] = []
    try:
        assert run_setup(lines.append, demo_consent=True)
        assert any("demo consent records: writing" in line for line in lines), lines
        assert all(env.redis.exists(key) for key in keys)
    finally:
        env.redis.delete(*old.values())
