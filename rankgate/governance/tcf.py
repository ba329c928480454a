"""IAB TCF v2 TC strings, decoded from the published format.

The format is the IAB Tech Lab's "Consent string and vendor list formats v2"
(TCF v2.0 to v2.3: the core segment's layout has not changed since v2.0; v2.2 and
v2.3 differ in `tcf_policy_version`, 4 and 5, and v2.3 makes the DisclosedVendors
segment mandatory). A TC string is one or more segments joined by ".", each
base64url without padding; the first is the core segment, each other one starts
with its 3-bit type: 1 DisclosedVendors, 2 AllowedVendors (dropped in v2.2, still
read), 3 PublisherTC.

No maintained library on PyPI decodes v2.2/v2.3 strings: `iab-tcf` (last released
2022-10, before v2.2) decodes a truncated core segment without an error (reading
zeros past its end) and a v1 string as if it were v2, so this module reads the
bits itself and refuses what it cannot read. Only what the gate needs is kept: purposes, vendor consents and
legitimate interests, publisher restrictions, the disclosed vendors, and the
string's provenance (CMP, vendor list version, policy version).
"""

from __future__ import annotations

import base64
import binascii
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from itertools import chain, compress

from rankgate.core.errors import RankgateError

MAX_TC_STRING_CHARS = 8192
"""Longer strings are refused unread (a full bitfield of every vendor is ~2,000 chars)."""
DECODED_CACHE_SIZE = 512
"""Distinct strings whose decoding is kept (a visitor's string comes with each of their
requests); at most ~50 KB each, so the cache stays under ~25 MB whatever is sent."""


class TCStringError(RankgateError):
    """A TC string that cannot be decoded; the message says where it went wrong."""

    status_code = 422


class SegmentType(IntEnum):
    CORE = 0
    DISCLOSED_VENDORS = 1
    ALLOWED_VENDORS = 2
    PUBLISHER_TC = 3


class RestrictionType(IntEnum):
    """A publisher restriction of a purpose for some vendors."""

    NOT_ALLOWED = 0
    REQUIRE_CONSENT = 1
    REQUIRE_LEGITIMATE_INTEREST = 2


@dataclass(frozen=True)
class VendorIds:
    """Vendor ids as the string encodes them: a bitfield (its "0"/"1" text, vendor n
    at n - 1) or merged ranges. Never expanded: a 8 KB string of ranges over 1-65535
    would otherwise cost seconds and megabytes; this stays the string's size."""

    flags: str = ""
    spans: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of_spans(cls, spans: list[tuple[int, int]]) -> VendorIds:
        merged: list[tuple[int, int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return cls(spans=tuple(merged))

    def __contains__(self, vendor_id: object) -> bool:
        if not isinstance(vendor_id, int) or vendor_id < 1:
            return False
        if self.flags:
            return vendor_id <= len(self.flags) and self.flags[vendor_id - 1] == "1"
        at = bisect_right(self.spans, (vendor_id, MAX_VENDOR_ID)) - 1
        return at >= 0 and self.spans[at][1] >= vendor_id

    def __iter__(self) -> Iterator[int]:
        if self.flags:
            flags = self.flags.encode("ascii").translate(BIT_FLAGS)
            return compress(range(1, len(flags) + 1), flags)
        return chain.from_iterable(range(start, end + 1) for start, end in self.spans)

    def __len__(self) -> int:
        if self.flags:
            return self.flags.count("1")
        return sum(end - start + 1 for start, end in self.spans)


MAX_VENDOR_ID = 65535


@dataclass(frozen=True)
class PublisherRestriction:
    purpose: int
    restriction: RestrictionType
    vendors: VendorIds


@dataclass(frozen=True, eq=False)
class TCString:
    """The decoded facts of one TC string (immutable: decodings are shared, and
    compared and hashed by identity, which `decode`'s cache makes one per string)."""

    version: int
    created_ds: int
    """Deciseconds since the Unix epoch."""
    last_updated_ds: int
    cmp_id: int
    cmp_version: int
    consent_screen: int
    consent_language: str
    vendor_list_version: int
    tcf_policy_version: int
    is_service_specific: bool
    use_non_standard_texts: bool
    special_feature_opt_ins: frozenset[int]
    purposes_consent: frozenset[int]
    purposes_li_transparency: frozenset[int]
    purpose_one_treatment: bool
    publisher_cc: str
    vendor_consents: VendorIds
    vendor_legitimate_interests: VendorIds
    publisher_restrictions: tuple[PublisherRestriction, ...]
    disclosed_vendors: VendorIds | None = None
    """None: the string has no DisclosedVendors segment."""
    allowed_vendors: VendorIds | None = None
    publisher_purposes_consent: frozenset[int] = frozenset()
    publisher_purposes_li_transparency: frozenset[int] = frozenset()
    custom_purposes_consent: frozenset[int] = frozenset()
    custom_purposes_li_transparency: frozenset[int] = frozenset()

    def restricted(self, vendor_id: int, purpose: int) -> RestrictionType | None:
        """The publisher's restriction of `purpose` for this vendor, if any."""
        for restriction in self.publisher_restrictions:
            if restriction.purpose == purpose and vendor_id in restriction.vendors:
                return restriction.restriction
        return None


class BitReader:
    """Reads big-endian unsigned fields from a segment's bits."""

    def __init__(self, data: bytes, segment: str) -> None:
        self.bits = format(int.from_bytes(data, "big"), f"0{len(data) * 8}b") if data else ""
        self.length = len(self.bits)
        self.position = 0
        self.segment = segment

    def number(self, bits: int, field: str) -> int:
        end = self.position + bits
        if end > self.length:
            raise TCStringError(
                f"{self.segment} ends at bit {self.length}, before its field "
                f"{field} (bits {self.position}-{end - 1}): the string is truncated"
            )
        value = int(self.bits[self.position : end], 2) if bits else 0
        self.position = end
        return value

    def flag(self, field: str) -> bool:
        return self.number(1, field) == 1

    def bitfield(self, bits: int, field: str) -> frozenset[int]:
        """Ids 1..bits whose bit is set (bit 1 first)."""
        start = self.position
        self.number(bits, field)  # checks the length
        flags = self.bits[start : start + bits].encode("ascii").translate(BIT_FLAGS)
        return frozenset(compress(range(1, bits + 1), flags))

    def letters(self, field: str) -> str:
        return "".join(chr(ord("A") + self.number(6, field)) for _ in range(2))

    def ranges(self, field: str) -> VendorIds:
        """NumEntries (12 bits), then per entry IsARange, a start id and maybe an end id."""
        spans = []
        for _ in range(self.number(12, f"{field}.NumEntries")):
            is_range = self.flag(f"{field}.IsARange")
            start = self.number(16, f"{field}.StartOrOnlyVendorId")
            end = self.number(16, f"{field}.EndVendorId") if is_range else start
            if start < 1 or end < start:
                raise TCStringError(f"{self.segment}: {field} has the range {start}-{end}")
            spans.append((start, end))
        return VendorIds.of_spans(spans)

    def vendors(self, field: str) -> VendorIds:
        """A vendor section: MaxVendorId, IsRangeEncoding, then a bitfield or ranges."""
        max_vendor_id = self.number(16, f"{field}.MaxVendorId")
        if self.flag(f"{field}.IsRangeEncoding"):
            ids = self.ranges(field)
            if ids.spans and ids.spans[-1][1] > max_vendor_id:
                raise TCStringError(
                    f"{self.segment}: {field} names vendor {ids.spans[-1][1]} above its "
                    f"MaxVendorId {max_vendor_id}"
                )
            return ids
        start = self.position
        self.number(max_vendor_id, f"{field}.BitField")  # checks the length
        return VendorIds(flags=self.bits[start : start + max_vendor_id])


def segment_bytes(text: str, index: int) -> bytes:
    """A segment's bytes from base64url (padding, which the format omits, is tolerated)."""
    stripped = text.rstrip("=")
    if not stripped:
        raise TCStringError(f"segment {index + 1} is empty")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TCStringError(f"segment {index + 1} is not base64url: {exc}") from None


BASE64URL = re.compile(r"[A-Za-z0-9_=-]*")
BIT_FLAGS = bytes.maketrans(b"01", b"\x00\x01")
"""'0'/'1' characters to false/true bytes: set bits are then picked in C (`compress`)."""


def is_base64url(text: str) -> bool:
    return BASE64URL.fullmatch(text) is not None


@lru_cache(maxsize=DECODED_CACHE_SIZE)
def decode(text: str) -> TCString:
    """The decoded TC string; TCStringError says what is wrong with one that is not."""
    if not text:
        raise TCStringError("empty")
    if len(text) > MAX_TC_STRING_CHARS:
        raise TCStringError(f"longer than {MAX_TC_STRING_CHARS} characters")
    parts = text.split(".")
    for index, part in enumerate(parts):
        if not is_base64url(part):
            raise TCStringError(
                f"segment {index + 1} is not base64url (letters, digits, - and _ only)"
            )
    core = BitReader(segment_bytes(parts[0], 0), "core segment")
    version = core.number(6, "Version")
    if version != 2:
        raise TCStringError(f"version {version}: only TCF v2 strings (version 2) are read")
    fields = read_core(core)
    for index, part in enumerate(parts[1:], start=1):
        reader = BitReader(segment_bytes(part, index), f"segment {index + 1}")
        kind = reader.number(3, "SegmentType")
        if kind == SegmentType.DISCLOSED_VENDORS:
            fields["disclosed_vendors"] = reader.vendors("DisclosedVendors")
        elif kind == SegmentType.ALLOWED_VENDORS:
            fields["allowed_vendors"] = reader.vendors("AllowedVendors")
        elif kind == SegmentType.PUBLISHER_TC:
            fields.update(read_publisher_tc(reader))
        else:
            raise TCStringError(f"segment {index + 1} has the unknown segment type {kind}")
    return TCString(version=version, **fields)  # type: ignore[arg-type]


def read_core(core: BitReader) -> dict[str, object]:
    """The core segment after its version, field by field in the spec's order."""
    fields: dict[str, object] = {
        "created_ds": core.number(36, "Created"),
        "last_updated_ds": core.number(36, "LastUpdated"),
        "cmp_id": core.number(12, "CmpId"),
        "cmp_version": core.number(12, "CmpVersion"),
        "consent_screen": core.number(6, "ConsentScreen"),
        "consent_language": core.letters("ConsentLanguage"),
        "vendor_list_version": core.number(12, "VendorListVersion"),
        "tcf_policy_version": core.number(6, "TcfPolicyVersion"),
        "is_service_specific": core.flag("IsServiceSpecific"),
        "use_non_standard_texts": core.flag("UseNonStandardTexts"),
        "special_feature_opt_ins": core.bitfield(12, "SpecialFeatureOptIns"),
        "purposes_consent": core.bitfield(24, "PurposesConsent"),
        "purposes_li_transparency": core.bitfield(24, "PurposesLITransparency"),
        "purpose_one_treatment": core.flag("PurposeOneTreatment"),
        "publisher_cc": core.letters("PublisherCC"),
        "vendor_consents": core.vendors("VendorConsents"),
        "vendor_legitimate_interests": core.vendors("VendorLegitimateInterests"),
    }
    restrictions = []
    for _ in range(core.number(12, "NumPubRestrictions")):
        purpose = core.number(6, "PubRestrictions.PurposeId")
        kind = core.number(2, "PubRestrictions.RestrictionType")
        if kind > RestrictionType.REQUIRE_LEGITIMATE_INTEREST:
            raise TCStringError(f"core segment: publisher restriction type {kind} is undefined")
        vendors = core.ranges("PubRestrictions")
        restrictions.append(PublisherRestriction(purpose, RestrictionType(kind), vendors))
    fields["publisher_restrictions"] = tuple(restrictions)
    return fields


def read_publisher_tc(reader: BitReader) -> dict[str, frozenset[int]]:
    fields = {
        "publisher_purposes_consent": reader.bitfield(24, "PubPurposesConsent"),
        "publisher_purposes_li_transparency": reader.bitfield(24, "PubPurposesLITransparency"),
    }
    custom = reader.number(6, "NumCustomPurposes")
    fields["custom_purposes_consent"] = reader.bitfield(custom, "CustomPurposesConsent")
    fields["custom_purposes_li_transparency"] = reader.bitfield(
        custom, "CustomPurposesLITransparency"
    )
    return fields
