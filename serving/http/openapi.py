"""The OpenAPI document, as strict as the server that serves it.

FastAPI writes the paths from the routes; the request bodies and the consent
path's id are written here from the replica's `RequestRules`: the loaded
policy's purposes and regions, the serving config's bounds, the catalogue's item
ids and the identifier patterns. The validators read the same values, so a
client generated from the document, or a fuzzer, sends what the server accepts.

The rules change when a reconfigure swaps the pipeline (new config or policy),
so the ingress builds the document per rules instead of letting FastAPI cache
the first one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from rankgate.core.project import ItemId
from rankgate.governance.tcf import MAX_TC_STRING_CHARS
from serving.contract.config import LimitsConfig
from serving.contract.schemas import (
    CONTEXT_KEY_PATTERN,
    GPC_HEADER,
    MAX_IDS_PER_LINK,
    TCF_HEADER,
    USER_ID_PATTERN,
    ConsentRequest,
    ConsentWrite,
    IdentifyRequest,
    RankRequest,
    RequestRules,
    UnlinkRequest,
    json_pattern,
)

JsonSchema = dict[str, Any]
# A catalogue with gaps is listed id by id, up to this many: beyond it, the
# document gives the range only and the server still refuses ids it lacks.
MAX_LISTED_ITEM_IDS = 10_000
# Kept from pydantic's schema of a field when its constraints are rewritten.
ANNOTATIONS = ("title", "description", "default")


def user_id_schema(limits: LimitsConfig) -> JsonSchema:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": limits.max_user_id_chars,
        "pattern": json_pattern(USER_ID_PATTERN),
    }


def item_id_schema(items: Collection[ItemId], item_type: str = "int") -> JsonSchema:
    """Ids of the loaded catalogue, of its declared type: for integers a range when it
    has no gaps, else the ids themselves while the list stays short."""
    if item_type == "string":
        names = sorted(str(i) for i in items)
        schema_s: JsonSchema = {"type": "string", "minLength": 1}
        if len(names) <= MAX_LISTED_ITEM_IDS:
            schema_s["enum"] = names
        return schema_s
    ids = sorted(int(i) for i in items)
    if not ids:
        return {"type": "integer", "not": {}}  # nothing can be a candidate
    schema: JsonSchema = {"type": "integer", "minimum": ids[0], "maximum": ids[-1]}
    if ids[-1] - ids[0] + 1 != len(ids) and len(ids) <= MAX_LISTED_ITEM_IDS:
        schema["enum"] = ids
    return schema


def _rewrite(props: dict[str, JsonSchema], name: str, /, **constraints: Any) -> None:
    """Replace a property's constraints, keeping its title, description and default."""
    kept = {k: v for k, v in props[name].items() if k in ANNOTATIONS}
    props[name] = {**kept, **constraints}


TC_STRING_FORMAT = "iab-tcf-tc-string"
"""A TC string the server decodes (no pattern can say which strings do: a client or a
fuzzer supplies real ones for this format; tests/api/schemathesis_hooks.py)."""
TC_STRING_SCHEMA: JsonSchema = {
    "type": "string",
    "format": TC_STRING_FORMAT,
    # No length bounds or pattern: a string of a boundary length or of random base64url
    # is no TC string, and a generator would take them for valid ones.
    "description": (
        "An IAB TCF v2 TC string: base64url segments joined by '.', at most "
        f"{MAX_TC_STRING_CHARS} characters; one that does not decode is a 422."
    ),
}
SIGNAL_HEADERS: list[JsonSchema] = [
    {
        "name": GPC_HEADER,
        "in": "header",
        "required": False,
        "description": "Global Privacy Control: `1` is the signal (any other value: none).",
        "schema": {"type": "string"},
    },
    {
        "name": TCF_HEADER,
        "in": "header",
        "required": False,
        "description": "An IAB TCF v2 TC string, read when the body has no `consent.tcf`.",
        "schema": TC_STRING_SCHEMA,
    },
]


def rank_request_schema(rules: RequestRules | None) -> JsonSchema:
    schema = RankRequest.model_json_schema()
    # The consent signals' model is written in place: a `$ref` to the body's own
    # `$defs` would not resolve inside the OpenAPI document.
    consent = schema.pop("$defs")["RequestConsent"]
    _rewrite(consent["properties"], "tcf", anyOf=[TC_STRING_SCHEMA, {"type": "null"}])
    _rewrite(schema["properties"], "consent", anyOf=[consent, {"type": "null"}])
    if rules is None:
        return schema
    limits, budget, props = rules.limits, rules.budget, schema["properties"]
    _optional_ids(props, limits, "user_id", "anonymous_id")
    _rewrite(props, "purpose", type="string", enum=list(rules.purposes))
    _rewrite(props, "region", type="string", enum=list(rules.regions))
    candidates = {
        "type": "array",
        "items": item_id_schema(rules.items, rules.item_type),
        "minItems": 1,
        "maxItems": limits.max_candidates,
        "uniqueItems": True,
    }
    _rewrite(props, "candidates", anyOf=[candidates, {"type": "null"}])
    _rewrite(props, "k", type="integer", minimum=1, maximum=limits.max_k)
    _rewrite(
        props,
        "context",
        type="object",
        maxProperties=limits.max_context_entries,
        propertyNames={"pattern": json_pattern(CONTEXT_KEY_PATTERN)},
        properties={
            name: {
                "type": "string",
                "maxLength": limits.max_context_value_chars,
                **({"enum": feature.values} if feature.values is not None else {}),
                "description": feature.description or f"context feature ({feature.type})",
            }
            for name, feature in rules.context.items()
        },
        additionalProperties={"type": "string", "maxLength": limits.max_context_value_chars},
    )
    bounded = {"type": "number", "minimum": budget.min_ms, "maximum": budget.max_ms}
    _rewrite(props, "budget_ms", anyOf=[bounded, {"type": "null"}])
    return one_of_the_ids(schema)


def _consent_schema(model: type[BaseModel], rules: RequestRules | None) -> JsonSchema:
    schema = model.model_json_schema()
    if rules is None:
        return schema
    props = schema["properties"]
    _rewrite(
        props,
        "purposes",
        type="object",
        properties={purpose: {"type": "boolean"} for purpose in rules.purposes},
        additionalProperties=False,
        minProperties=1,
    )
    if "user_id" in props:
        _optional_ids(props, rules.limits, "user_id", "anonymous_id")
        one_of_the_ids(schema)
    return schema


def _optional_ids(props: dict[str, JsonSchema], limits: LimitsConfig, *names: str) -> None:
    for name in names:
        _rewrite(props, name, anyOf=[user_id_schema(limits), {"type": "null"}])


def one_of_the_ids(schema: JsonSchema, *, exactly: bool = False) -> JsonSchema:
    """A body that needs `user_id` or `anonymous_id` (as a string): the schema says so."""
    either = [
        {"required": [name], "properties": {name: {"type": "string"}}}
        for name in ("user_id", "anonymous_id")
    ]
    schema["oneOf" if exactly else "anyOf"] = either
    return schema


def identify_schema(rules: RequestRules | None) -> JsonSchema:
    schema = IdentifyRequest.model_json_schema()
    if rules is None:
        return schema
    props = schema["properties"]
    _rewrite(props, "user_id", **user_id_schema(rules.limits))
    for name in ("anonymous_ids", "user_ids"):
        ids = {"type": "array", "items": user_id_schema(rules.limits)}
        _rewrite(props, name, **ids, maxItems=MAX_IDS_PER_LINK, default=[])
    region = {"type": "string", "enum": list(rules.regions)}
    _rewrite(props, "region", anyOf=[region, {"type": "null"}])
    return schema


def unlink_schema(rules: RequestRules | None) -> JsonSchema:
    schema = UnlinkRequest.model_json_schema()
    if rules is not None:
        _optional_ids(schema["properties"], rules.limits, "user_id", "anonymous_id")
        one_of_the_ids(schema, exactly=True)
    return schema


def consent_write_schema(rules: RequestRules | None) -> JsonSchema:
    return _consent_schema(ConsentWrite, rules)


def consent_path_body_schema(rules: RequestRules | None) -> JsonSchema:
    return _consent_schema(ConsentRequest, rules)


# The endpoints read their bodies themselves (size limit first, then one parse
# that reports every problem), so FastAPI cannot see these bodies: they are set here.
REQUEST_BODIES: dict[tuple[str, str], Callable[[RequestRules | None], JsonSchema]] = {
    ("/v1/rank", "post"): rank_request_schema,
    ("/v1/consent", "post"): consent_write_schema,
    ("/v1/consent/{user_id}", "put"): consent_path_body_schema,
    ("/v1/identify", "post"): identify_schema,
    ("/v1/unlink", "post"): unlink_schema,
}


def openapi_document(app: FastAPI, rules: RequestRules | None) -> JsonSchema:
    """The document of `app`'s routes with the bodies `rules` accept (none yet: types only)."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    paths = document["paths"]
    rank = paths["/v1/rank"]["post"]
    rank["parameters"] = [*rank.get("parameters", []), *SIGNAL_HEADERS]
    for (path, method), schema_of in REQUEST_BODIES.items():
        paths[path][method]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of(rules)}},
        }
    if rules is not None:
        for parameter in paths["/v1/consent/{user_id}"]["put"]["parameters"]:
            if parameter["name"] == "user_id":
                title = parameter["schema"].get("title", "User Id")
                parameter["schema"] = {"title": title, **user_id_schema(rules.limits)}
    return document
