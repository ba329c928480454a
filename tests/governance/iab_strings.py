"""Published TC strings: the IAB's own test strings, with where each comes from.

Their decoded values are asserted in test_tcf.py, as the IAB's tests list them;
the gate and HTTP tests use them as real strings that grant or deny.
"""

# InteractiveAdvertisingBureau/iabtcf-java, iabtcf-decoder/src/test/java/com/iabtcf/decoder/
# TCStringV2Test.java, testCanConstructTCModelFromBase64String (made with iabtcf.com's encoder).
CORE_ONLY = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA"
# Same file, testConstructConsentsFromBitFields / testCanParseDisclosedAndAllowedVendors /
# testCanParseAllParts: the core segment, then DisclosedVendors, AllowedVendors, PublisherTC.
BITFIELDS = "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA"
ALL_SEGMENTS = BITFIELDS + ".IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA.cAAAAAAAITg="
# Same file, testCanParseRangeEncodedVendorLegitimateInterests.
RANGE_LI = "COv__-wOv__-wC2AAAENAPCgAAAAAAAAAAAAA_wAQA_gEBABAEAAAA"
# Same file, testRange (two vendor ranges in the consent section, then DisclosedVendors).
TWO_RANGES = (
    "COwBOpCOwBOpCLqAAAENAPCAAAAAAAAAAAAAFfwAYFfAV-BVkAGBVYFWAAA.IFoEUQQgAIQwgIwQABAEAAAAOIAA"
    "CAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAAgAAAAAAAFAAECAAAgAAQARAEQAAAAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw"
)
# InteractiveAdvertisingBureau/iabtcf-es, modules/core/test/ReportedIssues.test.ts, issue 201
# ("unable to decode valid TCF2 String"): publisher restrictions, purpose 1 require consent
# for vendors 7, 20, 71, 122, 140, 183.
RESTRICTIONS = (
    "CO4VGswO4VGswAfZCBDEAzCsAP_AAH_AAAigGUNf_X9fb2vj-_599_t0eY1f9_63t-wzjheMs-8NyZ-X_J4Wv2My"
    "vB34JqQKGRgkunLBAQdtHGncTQgBwIlViTLMY02MjzNKJrJEilsbe2dYGH9vn8XT_ZKZ70-_v__7v3___33_5Ayh"
    "r_6_r7e18f3_Pvv9ujzGr_v_W9v2GccLxln3huTPy_5PC1-xmV4O_BNSBQyMEl05YICDto407iaEAOBEqsSZZjGmx"
    "keZpRNZIkUtjb2zrAw_t8_i6f7JTPen39___d-___--__ICgKAOAAcAA4AFAAjgB6AEYALcGACAW0AtoJAHAAOAAc"
    "ACgARwA9ACMAFuFABALaAW0GgDgAHAAOABQAI4AegBGAC3DgAgFtALaEQBwADgAHAAoAEcAPQAjABbiQAQC2gFtC"
    "oA4ABwADgAUACOAHoARgAtxYAIBbQC2hkAcAA4ABwAKABHAD0AIwAW40AEAtoBbQ6AOAAcAA4AFAAjgB6AEYALceA"
    "CAW0AtohAHAAOAAcACgARwA9ACMAFuRABALaAW0SgDgAHAAOABQAI4AegBGAC3JgAgFtALaKQBwADgAHAAoAEcAPQ"
    "AjABblQAQC2gFtA"
)
# iabtcf-es, the same test file (commented-out case "TCString.decode finds all vendors as
# disclosed"): a CMP's TCF v2.3 string (policy version 5) with an empty DisclosedVendors
# segment and a PublisherTC segment.
V2_3 = (
    "CQd924AQd924AASACCENCNFsAP_gAEIAACiQL6QBAAGAAOANmAcAF9IAIADgAA.IL6"
    + "A" * 255
    + ".YIAAAAAAAAAA"
)
# iabtcf-es, ReportedIssues.test.ts, issue 156: a TCF v1.1 consent string.
V1 = "BOhwdphOxFC7tAHABBFRC--AAAAuhr_7__7-_9_-_f__9uj3Or_v_f__32ccL59v_h_7v-_7fi_20nV4u_1vft9yfk1-5ctDztp507iakivXmqdeb9v_nz3_5pxP78k89r7337Ew_v8_v-b7BCON_YxEiA"
