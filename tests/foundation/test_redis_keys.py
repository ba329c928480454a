"""Every Redis key is named in rankgate.core.redis_keys: writers, erasure and
docs/reference.md agree."""

from __future__ import annotations

import re

from rankgate.core import redis_keys
from rankgate.ops.erasure import ERASED
from tests import REPO

PACKAGES = ("rankgate", "features", "model_store", "serving", "loadtests")
# A key name built by hand: an f-string that puts the namespace before a colon.
HAND_MADE_KEY = re.compile(r"\{[^{}]*namespace[^{}]*\}:")


def test_no_module_builds_a_key_name_itself() -> None:
    home = REPO / "rankgate" / "core" / "redis_keys.py"
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if path != home
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if HAND_MADE_KEY.search(line)
    ]
    assert not found, "name Redis keys in rankgate/core/redis_keys.py:\n" + "\n".join(found)


def test_erasure_covers_every_kind_of_key_that_names_people() -> None:
    assert set(ERASED) == {key for key in redis_keys.KEYS if key.personal}


def test_the_reference_lists_the_keys_of_the_module() -> None:
    reference = (REPO / "docs" / "reference.md").read_text()
    assert redis_keys.markdown_table() in reference, (
        "docs/reference.md's Redis key table differs from rankgate.core.redis_keys.markdown_table()"
    )


def test_key_names_start_with_the_namespace() -> None:
    names = [
        redis_keys.consent("ns", "k"),
        redis_keys.api_keys("ns"),
        redis_keys.audit("ns"),
        redis_keys.rollbacks("ns"),
        redis_keys.routing_events("ns"),
        redis_keys.shadow("ns", "v1"),
        redis_keys.setup_marker("ns", "step"),
    ]
    assert all(name.startswith("ns:") for name in names)
    assert len(set(names)) == len(names)
