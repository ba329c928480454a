"""The public API's request and response bodies (one schema, used by the ingress,
the tests, the load tests and the benchmark)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from rankgate.core.project import ContextFeature, ItemId
from rankgate.governance.demo_consent import DEMO_SOURCE
from rankgate.governance.signals import ConsentSignals
from rankgate.governance.tcf import TCStringError, decode
from serving.contract.config import BudgetConfig, LimitsConfig

# Identifier patterns are matched whole (`fullmatch`): `re.match` with `$` also
# accepts a final newline, which made "u-1\n" a second identity. ASCII classes
# only, so Unicode lookalikes (Cyrillic letters, fullwidth digits) never pass.
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
CONTEXT_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")


def json_pattern(pattern: re.Pattern[str]) -> str:
    """The pattern as JSON Schema writes a whole-string match (ECMA-262: `$` is the end)."""
    return f"^{pattern.pattern}$"


@dataclass(frozen=True)
class RequestRules:
    """What a request may say, as this replica knows it: the serving config's limits
    and budget, the loaded policy's purposes and regions, the catalogue's item ids.

    Validation (the models below) and the OpenAPI document (serving/http/openapi.py)
    both read these values, so they cannot disagree."""

    limits: LimitsConfig
    budget: BudgetConfig
    purposes: tuple[str, ...]
    regions: tuple[str, ...]
    items: frozenset[ItemId]
    item_type: Literal["int", "string"] = "int"
    context: Mapping[str, ContextFeature] = dataclass_field(default_factory=dict)
    """Context features models may read: their values are checked too."""

    @classmethod
    def of(
        cls,
        limits: LimitsConfig,
        budget: BudgetConfig,
        purposes: Collection[str],
        regions: Collection[str],
        items: Collection[ItemId],
        item_type: Literal["int", "string"] = "int",
        context: Mapping[str, ContextFeature] | None = None,
    ) -> RequestRules:
        return cls(
            limits,
            budget,
            tuple(sorted(purposes)),
            tuple(sorted(regions)),
            frozenset(items),
            item_type,
            dict(context or {}),
        )


def _rules(info: ValidationInfo) -> RequestRules:
    rules = (info.context or {}).get("rules")
    if not isinstance(rules, RequestRules):
        # Not a client error: every parse goes through serving.contract.parsing with the rules.
        raise TypeError("validate API requests with context={'rules': RequestRules}")
    return rules


def check_user_id(value: str, limits: LimitsConfig) -> str:
    if len(value) > limits.max_user_id_chars:
        raise ValueError(f"at most {limits.max_user_id_chars} characters")
    if not USER_ID_PATTERN.fullmatch(value):
        raise ValueError("letters, digits and . _ : @ - only, starting with a letter or digit")
    return value


def _user_id(value: str, info: ValidationInfo) -> str:
    return check_user_id(value, _rules(info).limits)


def _integral(value: object) -> object:
    """49.0 is the integer 49, as JSON Schema counts it; 49.5, strings and booleans
    are left for the strict integer check to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def context_problem(feature: ContextFeature, value: str) -> str | None:
    """What is wrong with a value of a declared context feature (None: nothing)."""
    if feature.values is not None and value not in feature.values:
        return "one of " + ", ".join(feature.values)
    if feature.type == "number":
        try:
            float(value)
        except ValueError:
            return "a number"
    return None


def _known_purpose(value: str, info: ValidationInfo) -> str:
    known = _rules(info).purposes
    if value not in known:
        raise ValueError(f"unknown purpose (known: {', '.join(known)})")
    return value


UserId = Annotated[str, Field(min_length=1), AfterValidator(_user_id)]
Integer = Annotated[int, BeforeValidator(_integral)]


def _item_id(value: object, info: ValidationInfo) -> ItemId:
    """An item id of the loaded catalogue's declared type (rankgate.yaml item.id_type),
    so 17 and "17" are never the same item; 49.0 is the integer 49."""
    if _rules(info).item_type == "string":
        if not isinstance(value, str):
            raise ValueError("Input should be a valid string")
        return value
    value = _integral(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("Input should be a valid integer")  # noqa: TRY004 - pydantic wants ValueError
    return value


ItemIdValue = Annotated[
    ItemId,
    PlainValidator(_item_id),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]}),
]
KnownPurpose = Annotated[str, AfterValidator(_known_purpose)]


GPC_HEADER = "Sec-GPC"
TCF_HEADER = "Rankgate-TCF"


def _tc_string(value: str) -> str:
    """A TC string that decodes (kept as text: the gate reads its cached decoding)."""
    try:
        decode(value)
    except TCStringError as exc:
        raise ValueError(f"not a TCF v2 TC string: {exc.message}") from None
    return value


TcStringText = Annotated[str, AfterValidator(_tc_string)]


class RequestConsent(BaseModel):
    """Consent signals the application passes on: they can only make the answer more
    restrictive than the person's stored consent (the policy says how each counts)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    tcf: TcStringText | None = None
    """An IAB TCF v2 TC string (the `Rankgate-TCF` header is read when this is absent)."""
    gpc: bool = False
    """The browser sent `Sec-GPC: 1` (a `Sec-GPC: 1` header on this request counts too)."""
    _tcf_field: str = PrivateAttr("consent.tcf")

    @classmethod
    def merged(
        cls, body: RequestConsent | None, gpc_header: bool, tcf_header: str | None
    ) -> RequestConsent:
        """The body's signals with the headers': GPC from either, the body's TC string
        before the header's. Both parts are valid already."""
        tcf = body.tcf if body is not None else None
        merged = cls.model_construct(
            tcf=tcf or tcf_header, gpc=gpc_header or (body is not None and body.gpc)
        )
        if tcf is None and tcf_header is not None:
            merged._tcf_field = TCF_HEADER
        return merged

    def signals(self) -> ConsentSignals:
        tcf = decode(self.tcf) if self.tcf is not None else None  # cached: decoded when parsed
        return ConsentSignals(gpc=self.gpc, tcf=tcf, tcf_field=self._tcf_field)


class RankRequest(BaseModel):
    """`POST /v1/rank`: which items should this person see, for this purpose, now?"""

    # Attribute docstrings become the fields' descriptions in the OpenAPI document.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    user_id: UserId | None = None
    """The application's id of the person (signed in); only a pseudonymous key of it
    is stored. One of `user_id` and `anonymous_id` is needed; with both, the user id."""
    anonymous_id: UserId | None = None
    """The application's id of a visitor who has not signed in (a cookie or device
    id), by the same rules; linked to a user id by `POST /v1/identify`."""
    purpose: KnownPurpose
    """A purpose of the loaded policy."""
    region: str
    """A region of the loaded policy."""
    candidates: list[ItemIdValue] | None = None
    """Distinct catalogue item ids to rank (at most limits.max_candidates); omitted: the
    whole catalogue (above retrieval.above_items allowed items, what the retrieval
    stage finds in it: docs/retrieval.md)."""
    k: Integer = 10
    """How many items to return (1..limits.max_k)."""
    context: dict[str, str] = {}
    """Request context (at most limits.max_context_entries): recorded with the decision;
    the project's declared context features (rankgate.yaml `context`) are model inputs."""
    explain: bool = False
    """Add reasons (SHAP) to the returned items when the budget allows."""
    budget_ms: float | int | None = None
    """Deadline in ms (budget.min_ms..budget.max_ms); omitted: budget.default_ms."""
    consent: RequestConsent | None = None
    """Consent signals from the person's browser or consent platform (docs/privacy.md,
    Consent signals); they only restrict."""

    @field_validator("region")
    @classmethod
    def _region(cls, value: str, info: ValidationInfo) -> str:
        known = _rules(info).regions
        if value not in known:
            raise ValueError(f"unknown region (known: {', '.join(known)})")
        return value

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: list[ItemId] | None, info: ValidationInfo) -> list[ItemId] | None:
        if value is None:
            return None
        rules = _rules(info)
        limit = rules.limits.max_candidates
        if not 1 <= len(value) <= limit:
            raise ValueError(f"between 1 and {limit} item ids")
        if len(set(value)) != len(value):
            raise ValueError("item ids must be distinct")
        unknown = [item for item in value if item not in rules.items]
        if unknown:
            raise ValueError(f"unknown item ids: {', '.join(str(i) for i in unknown[:5])}")
        return value

    @field_validator("k")
    @classmethod
    def _k(cls, value: int, info: ValidationInfo) -> int:
        limit = _rules(info).limits.max_k
        if not 1 <= value <= limit:
            raise ValueError(f"between 1 and {limit}")
        return value

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        rules = _rules(info)
        limits = rules.limits
        if len(value) > limits.max_context_entries:
            raise ValueError(f"at most {limits.max_context_entries} entries")
        problems = []
        for key, item in value.items():
            if not CONTEXT_KEY_PATTERN.fullmatch(key):
                problems.append(f"key {key[:40]!r}: lower-case letters, digits and _ (max 32)")
            elif len(item) > limits.max_context_value_chars:
                problems.append(
                    f"value of {key!r}: at most {limits.max_context_value_chars} characters"
                )
            elif key in rules.context:
                problem = context_problem(rules.context[key], item)
                if problem:
                    problems.append(f"value of {key!r}: {problem}")
        if problems:
            raise ValueError("; ".join(problems[:5]))
        return value

    @field_validator("budget_ms")
    @classmethod
    def _budget(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        budget = _rules(info).budget
        if not budget.min_ms <= value <= budget.max_ms:
            raise ValueError(f"between {budget.min_ms:g} and {budget.max_ms:g} ms")
        return float(value)


class ConsentRequest(BaseModel):
    """Decisions per purpose from a consent platform: the body of
    `PUT /v1/consent/{user_id}` (the id in the path)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    purposes: dict[KnownPurpose, bool] = Field(min_length=1)
    """Purposes of the loaded policy -> granted."""
    source: str = Field(min_length=1, max_length=64)
    """Where the decision came from (the consent platform), kept with it."""

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value == DEMO_SOURCE:
            raise ValueError(f"{DEMO_SOURCE!r} marks made-up demo records; name the real source")
        return value


class ConsentWrite(ConsentRequest):
    """`POST /v1/consent`: the same decisions with the id in the body, where proxies
    and access logs do not keep it."""

    user_id: UserId | None = None
    """The application's id of the person; only a pseudonymous key of it is stored.
    One of `user_id` and `anonymous_id` is needed."""
    anonymous_id: UserId | None = None
    """A visitor's anonymous id: the decision is the person's it is linked to."""


MAX_IDS_PER_LINK = 100


class IdentifyRequest(BaseModel):
    """`POST /v1/identify`: ids of one person, linked to the person of `user_id`."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    user_id: UserId
    """The id the person signed in with."""
    anonymous_ids: list[UserId] = Field([], max_length=MAX_IDS_PER_LINK)
    """Anonymous ids (cookies, devices) of the same person."""
    user_ids: list[UserId] = Field([], max_length=MAX_IDS_PER_LINK)
    """Further user ids of the same person (a CRM id, a second account): refused
    when one is another signed-in person, unless the policy's
    `identity.link_known_ids` allows it."""
    region: str | None = None
    """Where the person is: how the gate counts their consent when the anonymous
    ids' streaming counts join the person's (without it, only a recorded grant)."""

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = _rules(info).regions
        if value is not None and value not in known:
            raise ValueError(f"unknown region (known: {', '.join(known)})")
        return value


class IdentifyResult(BaseModel):
    """What a link did."""

    linked: list[str]
    """Fields of the request whose ids joined the person now (`anonymous_ids.0`, ...)."""
    already_linked: list[str]
    """Fields whose ids were the person's before."""
    ids: int
    """How many ids the person has now."""
    consent_merged: int
    """Consent records the person took from the joined ids (by the policy's rule)."""


class UnlinkRequest(BaseModel):
    """`POST /v1/unlink`: detach one id from the person it is linked to."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    user_id: UserId | None = None
    """A linked user id (not the person's own while others are linked to it)."""
    anonymous_id: UserId | None = None
    """A linked anonymous id. One of the two."""


class UnlinkResult(BaseModel):
    unlinked: bool
    """False: the id was linked to nobody (nothing changed)."""


class ConsentRecorded(BaseModel):
    """What a consent write recorded."""

    recorded: dict[str, bool]
    source: str


class Reason(BaseModel):
    feature: str
    group: str
    contribution: float
    text: str


class RankedItem(BaseModel):
    item_id: ItemId
    rank: int
    score: float
    reasons: list[Reason] | None = None


class ModelRef(BaseModel):
    name: str
    version: str
    variant: str


class Fallback(BaseModel):
    reason: str
    strategy: str
    detail: str | None = None


class PolicyCheck(BaseModel):
    check: str
    result: str
    detail: str | None = None


class PolicyBlock(BaseModel):
    decision: Literal["personalize", "non_personalized"]
    version: str
    checks: list[PolicyCheck]


ExplanationStatus = Literal["explained", "omitted"]


class Explanation(BaseModel):
    status: ExplanationStatus
    reason: str | None = None


class Freshness(BaseModel):
    """How fresh the streaming features behind a personalized answer were."""

    events_through: float
    """Acceptance time (Unix seconds, ms precision) of the newest event they include:
    an event whose 202 named a stream id at or before it is in this answer."""
    event_age_ms: float
    """How long before this answer that event was accepted."""


class RankResponse(BaseModel):
    request_id: str
    items: list[RankedItem]
    model: ModelRef | None
    fallback: Fallback | None
    policy: PolicyBlock
    explanation: Explanation | None = None
    freshness: Freshness | None = None
    """Present when the model read a streaming view holding events of this person."""
    timings_ms: dict[str, float]


class ErrorProblem(BaseModel):
    field: str
    problem: str


class ErrorBody(BaseModel):
    error: str
    problems: list[ErrorProblem] = []
    detail: str | None = None
