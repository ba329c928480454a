"""Schemathesis hooks of the fuzz runs (tests/api/test_fuzz_http.py: SCHEMATHESIS_HOOKS).

The document's TC strings (`consent.tcf`, the `Rankgate-TCF` header) have the format
`iab-tcf-tc-string` (serving/http/openapi.py): no pattern says which strings decode, so
a generated one that does not is replaced by one of the IAB's published strings (the
fuzzer's own values do not reach the format's strategy for headers).
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

from rankgate.governance.tcf import TCStringError, decode
from serving.contract.schemas import TCF_HEADER
from serving.http.openapi import TC_STRING_FORMAT
from tests.governance.iab_strings import ALL_SEGMENTS, CORE_ONLY, RESTRICTIONS, V2_3

PUBLISHED = [CORE_ONLY, ALL_SEGMENTS, RESTRICTIONS, V2_3]
schemathesis.openapi.format(TC_STRING_FORMAT, st.sampled_from(PUBLISHED))


def decodable(value: str) -> str:
    """`value` when it decodes, else a published string (the same one for the same value)."""
    try:
        decode(value)
    except TCStringError:
        return PUBLISHED[len(value) % len(PUBLISHED)]
    return value


@schemathesis.hook
def map_headers(ctx: schemathesis.HookContext, headers: dict[str, str] | None) -> Any:
    if headers and isinstance(headers.get(TCF_HEADER), str):
        headers[TCF_HEADER] = decodable(headers[TCF_HEADER])
    return headers


@schemathesis.hook
def map_body(ctx: schemathesis.HookContext, body: Any) -> Any:
    consent = body.get("consent") if isinstance(body, dict) else None
    if isinstance(consent, dict) and isinstance(consent.get("tcf"), str):
        consent["tcf"] = decodable(consent["tcf"])
    return body
