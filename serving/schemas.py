"""The public API's request and response bodies (one schema, used by the ingress,
the tests, the load tests and the benchmark)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from serving.config import LimitsConfig

USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
CONTEXT_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _limits(info: ValidationInfo) -> LimitsConfig:
    context = info.context or {}
    return context.get("limits") or LimitsConfig()


def check_user_id(value: str, limits: LimitsConfig) -> str:
    if len(value) > limits.max_user_id_chars:
        raise ValueError(f"at most {limits.max_user_id_chars} characters")
    if not USER_ID_PATTERN.match(value):
        raise ValueError("letters, digits and . _ : @ - only, starting with a letter or digit")
    return value


class RankRequest(BaseModel):
    """`POST /v1/rank`. Bounds marked "config" come from `limits` / `budget`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str = Field(min_length=1, json_schema_extra={"pattern": USER_ID_PATTERN.pattern})
    purpose: str = Field(min_length=1, max_length=64)
    region: str = Field(min_length=1, max_length=16)
    candidates: list[int] | None = None
    """Item ids to rank (config: at most limits.max_candidates); omitted: the whole catalogue."""
    k: int = 10
    """How many items to return, 1..limits.max_k (config)."""
    context: dict[str, str] = {}
    explain: bool = False
    budget_ms: float | int | None = None
    """Deadline in ms, budget.min_ms..budget.max_ms (config); omitted: budget.default_ms."""

    @field_validator("user_id")
    @classmethod
    def _user_id(cls, value: str, info: ValidationInfo) -> str:
        return check_user_id(value, _limits(info))

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if value is None:
            return None
        limit = _limits(info).max_candidates
        if not 1 <= len(value) <= limit:
            raise ValueError(f"between 1 and {limit} item ids")
        if any(item < 0 for item in value):
            raise ValueError("item ids are non-negative integers")
        if len(set(value)) != len(value):
            raise ValueError("item ids must be distinct")
        return value

    @field_validator("k")
    @classmethod
    def _k(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_k
        if not 1 <= value <= limit:
            raise ValueError(f"between 1 and {limit}")
        return value

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        limits = _limits(info)
        if len(value) > limits.max_context_entries:
            raise ValueError(f"at most {limits.max_context_entries} entries")
        for key, item in value.items():
            if not CONTEXT_KEY_PATTERN.match(key):
                raise ValueError(f"key {key[:40]!r}: lower-case letters, digits and _ (max 32)")
            if len(item) > limits.max_context_value_chars:
                raise ValueError(
                    f"value of {key!r}: at most {limits.max_context_value_chars} characters"
                )
        return value

    @field_validator("budget_ms")
    @classmethod
    def _budget(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        budget = (info.context or {}).get("budget")
        low, high = (budget.min_ms, budget.max_ms) if budget else (1.0, 1000.0)
        if not low <= value <= high:
            raise ValueError(f"between {low:g} and {high:g} ms")
        return float(value)


class ConsentRequest(BaseModel):
    """`PUT /v1/consent/{user_id}`: decisions per purpose from a consent platform."""

    model_config = ConfigDict(extra="forbid", strict=True)

    purposes: dict[str, bool] = Field(min_length=1)
    source: str = Field(min_length=1, max_length=64)


class Reason(BaseModel):
    feature: str
    group: str
    contribution: float
    text: str


class RankedItem(BaseModel):
    item_id: int
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


class Explanation(BaseModel):
    status: Literal["explained", "omitted"]
    reason: str | None = None


class RankResponse(BaseModel):
    request_id: str
    items: list[RankedItem]
    model: ModelRef | None
    fallback: Fallback | None
    policy: PolicyBlock
    explanation: Explanation | None = None
    timings_ms: dict[str, float]


class ErrorProblem(BaseModel):
    field: str
    problem: str


class ErrorBody(BaseModel):
    error: str
    problems: list[ErrorProblem] = []
    detail: str | None = None

    def with_status(self, status: int) -> tuple[int, dict[str, Any]]:
        return status, self.model_dump(exclude_none=True)
