"""The TC string decoder against the IAB's own published strings and their expected values."""

from __future__ import annotations

import base64
import time

import pytest

from rankgate.governance.tcf import RestrictionType, TCStringError, decode
from tests.governance.iab_strings import (
    ALL_SEGMENTS,
    BITFIELDS,
    CORE_ONLY,
    RANGE_LI,
    RESTRICTIONS,
    TWO_RANGES,
    V1,
    V2_3,
)


def test_core_fields_as_the_iab_test_lists_them() -> None:
    tc = decode(CORE_ONLY)
    assert tc.version == 2
    assert tc.created_ds == 15800580600  # 2020-01-26T17:01:00Z
    assert tc.last_updated_ds == 16122852600  # 2021-02-02T17:01:00Z
    assert (tc.cmp_id, tc.cmp_version, tc.consent_screen) == (675, 2, 1)
    assert (tc.vendor_list_version, tc.tcf_policy_version) == (15, 2)
    assert (tc.consent_language, tc.publisher_cc) == ("EN", "AA")
    assert not tc.is_service_specific and tc.purpose_one_treatment
    assert not tc.use_non_standard_texts
    assert tc.special_feature_opt_ins == {1}
    assert tc.purposes_consent == {2, 10}
    assert tc.purposes_li_transparency == {2, 9}
    assert len(tc.vendor_consents) == 0 and tc.disclosed_vendors is None


def test_bitfield_vendors_and_every_segment_type() -> None:
    tc = decode(ALL_SEGMENTS)
    assert tc.purposes_consent == {3, 4, 5, 6, 7, 8, 9}
    assert set(tc.vendor_consents) == {23, 37, 47, 48, 53, 65, 98}
    assert set(tc.vendor_legitimate_interests) == {37, 47, 48, 53, 65, 98, 129}
    assert set(tc.disclosed_vendors) == {23, 37, 47, 48, 53, 65, 98, 129}
    assert set(tc.allowed_vendors) == {12, 23, 37, 47, 48, 53}
    assert len(tc.publisher_purposes_consent) == 1
    assert decode(BITFIELDS).disclosed_vendors is None


def test_range_encoded_vendor_sections() -> None:
    assert set(decode(RANGE_LI).vendor_legitimate_interests) == {128}
    assert set(decode(TWO_RANGES).vendor_consents) == {702, 703}


def test_publisher_restrictions() -> None:
    tc = decode(RESTRICTIONS)
    first = tc.publisher_restrictions[0]
    assert (first.purpose, first.restriction) == (1, RestrictionType.REQUIRE_CONSENT)
    assert sorted(first.vendors) == [7, 20, 71, 122, 140, 183]
    assert tc.restricted(7, 1) is RestrictionType.REQUIRE_CONSENT
    assert tc.restricted(8, 1) is None


def test_a_v2_3_string_with_its_disclosed_vendors_segment() -> None:
    tc = decode(V2_3)
    assert (tc.version, tc.tcf_policy_version, tc.vendor_list_version) == (2, 5, 141)
    assert tc.purposes_consent == set(range(1, 12))
    assert set(tc.vendor_consents) == {12, 14, 435, 448}
    assert (
        tc.disclosed_vendors is not None and len(tc.disclosed_vendors) == 0
    )  # present, and empty as encoded
    assert tc.publisher_purposes_consent == {6}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("COtybn4P!!zT4Kj", "not base64url"),
        ("COtyb n4PA", "not base64url"),
        (CORE_ONLY[:20], "truncated"),
        (CORE_ONLY + ".", "segment 2 is empty"),
        (V1, "version 1"),
        (CORE_ONLY + ".gAAA", "unknown segment type 4"),
        ("C" * 9000, "longer than"),
    ],
)
def test_malformed_strings_are_refused_with_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(TCStringError, match=says) as refused:
        decode(text)
    assert refused.value.status_code == 422


def bits_to_base64url(bits: str) -> str:
    """A segment from its bits, as the IAB's Java tests build one (base64FromBitString)."""
    bits += "0" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_ranges_over_every_vendor_cost_what_the_string_costs() -> None:
    # A core segment whose consent section repeats the range 1-65535 as often as the
    # length limit allows: expanded into sets it took seconds; kept as spans, microseconds.
    head = f"{2:06b}" + "0" * 207  # version 2, then zeros up to the vendor consent section
    entries = 1450
    consents = f"{65535:016b}1{entries:012b}" + ("1" + f"{1:016b}" + f"{65535:016b}") * entries
    empty_li = f"{0:016b}0"
    text = bits_to_base64url(head + consents + empty_li + f"{0:012b}")
    assert len(text) < 8192
    started = time.perf_counter()
    tc = decode.__wrapped__(text)
    assert time.perf_counter() - started < 0.5
    assert tc.vendor_consents.spans == ((1, 65535),) and 65535 in tc.vendor_consents
    assert 0 not in tc.vendor_consents and len(tc.vendor_consents) == 65535
