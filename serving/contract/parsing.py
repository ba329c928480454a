"""Request bodies in, validated requests out: every problem of a body at once.

Schema and policy are checked in one pass (the models of serving/contract/schemas.py read
the replica's `RequestRules`), so a 422 names every field that is wrong, not
only the first kind of problem found.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from rankgate.core.errors import RankgateError
from rankgate.governance.tcf import TCStringError, decode
from serving.contract.schemas import (
    TCF_HEADER,
    ConsentRequest,
    ConsentWrite,
    ErrorProblem,
    IdentifyRequest,
    RankRequest,
    RequestConsent,
    RequestRules,
    UnlinkRequest,
    check_user_id,
)

Parsed = TypeVar("Parsed", bound=BaseModel)


class BadRequest(RankgateError):
    """Input the API refuses; carries the problems, each naming its field."""

    status_code = 422
    rejection = "bad_request"

    def __init__(self, problems: list[ErrorProblem], status_code: int = 422) -> None:
        super().__init__("; ".join(f"{p.field}: {p.problem}" for p in problems), status_code)
        self.problems: list[ErrorProblem] = problems
        self.error = "body_too_large" if status_code == 413 else "invalid_request"
        # A client that sent too much is not kept: its connection is closed.
        self.headers = {"Connection": "close"} if status_code == 413 else None


def problems_of(exc: ValidationError) -> list[ErrorProblem]:
    problems = []
    for error in exc.errors():
        # A dict key's error is located at ("purposes", "telepathy", "[key]"): the
        # key names the field well enough.
        loc = [str(p) for p in error["loc"] if p != "[key]"]
        where = ".".join(loc) or "body"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "json_invalid":
            where, message = (
                "body",
                f"not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})",
            )
        problems.append(ErrorProblem(field=where, problem=message))
    return problems


NO_ID = ErrorProblem(
    field="user_id",
    problem="field required (or anonymous_id, for a visitor who has not signed in)",
)


def parse_rank(
    body: bytes, rules: RequestRules, gpc_header: str | None = None, tcf_header: str | None = None
) -> RankRequest:
    """A rank request, with the consent signals of its headers (`Sec-GPC`, `Rankgate-TCF`)
    merged into `consent`; a malformed TC string in either place is a problem named
    by its field."""
    problems: list[ErrorProblem] = []
    parsed = None
    try:
        parsed = RankRequest.model_validate_json(body, context={"rules": rules})
    except ValidationError as exc:
        problems = problems_of(exc)
        parsed_json = all(p.field != "body" for p in problems)
        if parsed_json and b'"user_id"' not in body and b'"anonymous_id"' not in body:
            problems.insert(0, NO_ID)
    if tcf_header is not None:
        try:
            decode(tcf_header)
        except TCStringError as exc:
            problem = f"not a TCF v2 TC string: {exc.message}"
            problems.append(ErrorProblem(field=TCF_HEADER, problem=problem))
    if problems or parsed is None:
        raise BadRequest(problems)
    if parsed.user_id is None and parsed.anonymous_id is None:
        raise BadRequest([NO_ID])
    # Sec-GPC: 1 is the whole signal; any other value means none (the GPC spec).
    gpc = gpc_header is not None and gpc_header.strip() == "1"
    if gpc or tcf_header is not None:
        parsed.consent = RequestConsent.merged(parsed.consent, gpc, tcf_header)
    return parsed


def parse_model(model: type[Parsed], body: bytes, rules: RequestRules) -> Parsed:
    """A body of `model` validated with the replica's rules (every problem at once)."""
    try:
        return model.model_validate_json(body, context={"rules": rules})
    except ValidationError as exc:
        raise BadRequest(problems_of(exc)) from exc


def parse_identify(body: bytes, rules: RequestRules) -> IdentifyRequest:
    """A link request; an id named twice, or the person's own id among the others (a
    link of an id to itself), is refused naming the field."""
    parsed = parse_model(IdentifyRequest, body, rules)
    seen = {("user", parsed.user_id): "user_id"}
    problems = []
    for kind, ids in (("user", parsed.user_ids), ("anonymous", parsed.anonymous_ids)):
        for n, raw in enumerate(ids):
            where = f"{kind}_ids.{n}"
            first = seen.setdefault((kind, raw), where)
            if first != where:
                what = (
                    "the person's own id: a link to itself"
                    if first == "user_id"
                    else f"named twice (also {first})"
                )
                problems.append(ErrorProblem(field=where, problem=what))
    if not parsed.user_ids and not parsed.anonymous_ids:
        problems.append(
            ErrorProblem(field="anonymous_ids", problem="no id to link (anonymous_ids or user_ids)")
        )
    if problems:
        raise BadRequest(problems)
    return parsed


def parse_unlink(body: bytes, rules: RequestRules) -> UnlinkRequest:
    parsed = parse_model(UnlinkRequest, body, rules)
    if (parsed.user_id is None) == (parsed.anonymous_id is None):
        raise BadRequest(
            [ErrorProblem(field="user_id", problem="exactly one of user_id and anonymous_id")]
        )
    return parsed


def parse_consent(
    body: bytes, rules: RequestRules, path_user_id: str | None = None
) -> ConsentWrite:
    """A consent write: the id in the body (`POST /v1/consent`), or, for the path form
    (`PUT /v1/consent/{user_id}`), in the path and the rest in the body."""
    context = {"rules": rules}
    if path_user_id is None:
        try:
            written = ConsentWrite.model_validate_json(body, context=context)
        except ValidationError as exc:
            raise BadRequest(problems_of(exc)) from exc
        if written.user_id is None and written.anonymous_id is None:
            raise BadRequest([NO_ID])
        return written
    problems = []
    try:
        check_user_id(path_user_id, rules.limits)
    except ValueError as exc:
        problems.append(ErrorProblem(field="user_id", problem=str(exc)))
    try:
        decisions = ConsentRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        problems += problems_of(exc)
    if problems:
        raise BadRequest(problems)
    # Both parts are valid: nothing left to check.
    return ConsentWrite.model_construct(user_id=path_user_id, **dict(decisions))
