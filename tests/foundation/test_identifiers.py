"""Identifiers taken outside the HTTP API are matched whole, too: a trailing
newline, a NUL or a lookalike character is refused, not taken as another name.

(The HTTP side: tests/api/test_http.py::test_identifiers_are_matched_whole.)
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loadtests.loadtest import run_time_seconds
from model_store.store import check_version_name
from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.core.errors import RankgateError
from rankgate.governance.api_keys import ApiKeyError, ApiKeyStore, check_app, is_key_shaped
from rankgate.ops.environment import Environment
from rankgate.ops.erasure import checked_user_id
from tests.serving_support import NEAR_MISSES, near_miss


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_privacy_forget_refuses_a_near_miss_user_id(kind: str) -> None:
    user_id = near_miss("u-5c111b923688", kind)
    with pytest.raises(RankgateError, match="user id: letters, digits"):
        checked_user_id(user_id)
    result = CliRunner().invoke(main, ["privacy", "forget", user_id])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: user id: letters, digits")
    assert user_id not in result.output


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_keys_create_refuses_a_near_miss_application_name(env: Environment, kind: str) -> None:
    app = near_miss("shop", kind)
    with pytest.raises(ApiKeyError, match="application name"):
        check_app(app)
    before = env.redis.hlen(redis_keys.api_keys(env.home.namespace))
    result = CliRunner().invoke(
        main, ["keys", "create", app, "--purpose", "onsite_personalization"]
    )
    assert result.exit_code == 1, result.output
    assert "application name" in result.output
    assert env.redis.hlen(redis_keys.api_keys(env.home.namespace)) == before


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_only_a_whole_key_is_key_shaped(env: Environment, kind: str) -> None:
    key = ApiKeyStore(env.redis, env.home.namespace).create(
        "shape-test", ["onsite_personalization"], ["onsite_personalization"]
    )
    assert is_key_shaped(key)
    assert not is_key_shaped(near_miss(key, kind))
    assert not is_key_shaped(near_miss(key[:-1], kind))  # same length as a key


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_version_names_are_matched_whole(kind: str) -> None:
    with pytest.raises(RankgateError, match="version"):
        check_version_name(near_miss("v3", kind))


def test_run_time_takes_ascii_digits_only() -> None:
    assert run_time_seconds("45") == 45 and run_time_seconds("1h30m") == 5400
    # `\d` and str.isdigit take other scripts' digits; "²" even passed isdigit and
    # then broke int().
    for text in ("３０", "３０s", "²", "30s\n1"):
        with pytest.raises(RankgateError, match="--run-time"):
            run_time_seconds(text)
