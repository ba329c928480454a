"""Consent signals on the real server (`serve run`, real Redis, Feast, ONNX), over HTTP.

The example policy counts GPC in its US region as an objection to
onsite_personalization, and maps TCF purposes 1, 5, 6 to it in its EU region (vendor 1).
"""

from __future__ import annotations

from typing import Any

import httpx
from click.testing import CliRunner

from rankgate.cli.main import main
from rankgate.core import redis_keys
from rankgate.governance.consent import ConsentState
from rankgate.ops.environment import Environment
from tests.conftest import Server
from tests.governance.iab_strings import CORE_ONLY, RESTRICTIONS
from tests.observe.test_audit_http import wait_for
from tests.serving_support import PATIENT_BUDGET_MS, user_with

ONSITE = "onsite_personalization"


def rank(server: Server, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/rank",
        json={"purpose": ONSITE, "k": 5, "budget_ms": PATIENT_BUDGET_MS, **body},
        headers={**server.headers, **(headers or {})},
        timeout=10,
    )


def source_of(answer: dict[str, Any]) -> str:
    return next(c["result"] for c in answer["policy"]["checks"] if c["check"] == "consent_source")


def test_signals_restrict_the_answer_and_the_audit_names_them(
    server: Server, env: Environment
) -> None:
    uid = user_with(env.consent, ONSITE, ConsentState.GRANTED)

    # Without signals: personalized, as before; the stored record decided.
    plain = rank(server, user_id=uid, region="US")
    assert plain.status_code == 200, plain.text
    assert plain.json()["fallback"] is None and source_of(plain.json()) == "stored"

    # GPC from the opt-out region, for the purpose its policy lists: the fallback, naming GPC.
    gpc = rank(server, {"Sec-GPC": "1"}, user_id=uid, region="US").json()
    assert gpc["model"] is None
    assert gpc["fallback"] == {"reason": "gpc_objection", "strategy": "popularity"}
    assert gpc["policy"]["decision"] == "non_personalized" and source_of(gpc) == "gpc"
    assert len(gpc["items"]) == 5

    # A TC string that does not grant purposes 1, 5, 6 and vendor 1 (header), one that does (body).
    denied = rank(server, {"Rankgate-TCF": CORE_ONLY}, user_id=uid, region="EU").json()
    assert denied["fallback"]["reason"] == "tcf_no_consent" and source_of(denied) == "tcf"
    tcf_check = next(c for c in denied["policy"]["checks"] if c["check"] == "tcf")
    assert tcf_check["result"] == "not_granted"
    granted = rank(server, user_id=uid, region="EU", consent={"tcf": RESTRICTIONS}).json()
    assert granted["fallback"] is None and source_of(granted) == "stored"

    kept = wait_for(env, [gpc["request_id"], denied["request_id"], granted["request_id"]])
    assert kept[gpc["request_id"]].consent is not None
    assert kept[gpc["request_id"]].consent.source == "gpc"
    note = kept[denied["request_id"]].consent
    assert note is not None and note.source == "tcf" and not isinstance(note.tcf, str)
    assert note.tcf is not None
    assert (note.tcf.field, note.tcf.missing, note.tcf.vendor_consent) == (
        "Rankgate-TCF",
        [1, 5, 6],
        False,
    )
    assert note.tcf.vendor_list_version == 15
    # `rankgate audit replay` reads these records as it reads any other.
    reproduced = CliRunner().invoke(main, ["audit", "replay", granted["request_id"]])
    assert reproduced.exit_code == 0 and "reproduced: v2" in reproduced.output, reproduced.output
    not_scored = CliRunner().invoke(main, ["audit", "replay", gpc["request_id"]])
    assert "not a model ranking (gpc_objection)" in not_scored.output, not_scored.output
    stream = env.redis.xrevrange(redis_keys.audit(env.home.namespace), count=2000)
    assert not any(CORE_ONLY.encode() in fields[b"record"] for _, fields in stream)


def test_a_malformed_tc_string_is_a_422_naming_its_field(server: Server, env: Environment) -> None:
    uid = user_with(env.consent, ONSITE, ConsentState.GRANTED)
    body = rank(server, user_id=uid, region="EU", consent={"tcf": CORE_ONLY[:20]})
    assert body.status_code == 422
    assert [p["field"] for p in body.json()["problems"]] == ["consent.tcf"]
    header = rank(server, {"Rankgate-TCF": "C!"}, user_id=uid, region="EU")
    assert header.status_code == 422
    assert [p["field"] for p in header.json()["problems"]] == ["Rankgate-TCF"]
