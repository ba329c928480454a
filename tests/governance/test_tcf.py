"""The TC string decoder against the IAB's own published strings and their expected values."""

from __future__ import annotations

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
    assert tc.vendor_consents == frozenset() and tc.disclosed_vendors is None


def test_bitfield_vendors_and_every_segment_type() -> None:
    tc = decode(ALL_SEGMENTS)
    assert tc.purposes_consent == {3, 4, 5, 6, 7, 8, 9}
    assert tc.vendor_consents == {23, 37, 47, 48, 53, 65, 98}
    assert tc.vendor_legitimate_interests == {37, 47, 48, 53, 65, 98, 129}
    assert tc.disclosed_vendors == {23, 37, 47, 48, 53, 65, 98, 129}
    assert tc.allowed_vendors == {12, 23, 37, 47, 48, 53}
    assert len(tc.publisher_purposes_consent) == 1
    assert decode(BITFIELDS).disclosed_vendors is None


def test_range_encoded_vendor_sections() -> None:
    assert decode(RANGE_LI).vendor_legitimate_interests == {128}
    assert decode(TWO_RANGES).vendor_consents == {702, 703}


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
    assert tc.vendor_consents == {12, 14, 435, 448}
    assert tc.disclosed_vendors == frozenset()  # present, and empty as encoded
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
