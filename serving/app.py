"""Builds the Ray Serve application. Nothing else lives here.

    serve run serve_config.yaml        (import_path: serving.app:build_app)

`RankIngress` is the HTTP entry (FastAPI). By default it runs every stage
in-process (no hop between deployments; the ranker batches concurrent requests
of the replica with `@serve.batch`). With the application argument
`ranker_placement: deployment`, scoring goes to a separate `Ranker` deployment
that batches across all ingress replicas.
"""

import asyncio
import gc
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import ray
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from model_store.artifacts import ArtifactStore, StoreError
from model_store.store import ModelStore
from rankgate.core.config_files import validation_message
from rankgate.core.errors import ConfigError, RankgateError
from rankgate.core.home import Home
from rankgate.core.pseudonym import user_key as pseudonymise
from rankgate.core.settings import get_settings
from rankgate.governance.api_keys import ApiKey
from rankgate.governance.consent import AsyncConsentStore
from serving.contract.config import BatchingConfig, ModelsConfig, ServingConfig
from serving.contract.parsing import BadRequest, parse_consent
from serving.contract.schemas import (
    ConsentRecorded,
    ErrorBody,
    ErrorProblem,
    RankResponse,
    RequestRules,
)
from serving.events.consumer import EventConsumer
from serving.events.intake import EventLog, EventRules, EventsAccepted, StoredEvent, parse_events
from serving.http import edge
from serving.http.auth import KeyCache
from serving.http.openapi import openapi_document
from serving.ranking.pipeline import RankPipeline
from serving.ranking.ranker import ModelSet, Ranker
from serving.ranking.stages import STAGES
from serving.runtime import Runtime

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="rankgate",
    version="1",
    description="Ranked, policy-compliant items for one person and one purpose, within a latency budget.",
    # Served by the ingress from its loaded config and policy (serving/http/openapi.py).
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


async def serve_rank(request: Request) -> Response:
    """POST /v1/rank as a plain Starlette route, ahead of FastAPI's: the same handler
    (`RankIngress.answer_rank`) and error answers, without FastAPI's per-request
    dependency solving and endpoint wrapping (about 150 us a request, measured with
    the app's own middleware in both). The key is read as `HTTPBearer` reads it."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    ingress = serve.get_replica_context().servable_object
    return await ingress.answer_rank(  # type: ignore[attr-defined,no-any-return]
        request, token if token and scheme.lower() == "bearer" else None
    )


# Registered before `@serve.ingress(api)` below, which keeps the app as it is then.
api.router.routes.insert(0, Route("/v1/rank", serve_rank, methods=["POST"]))


# Documents the scheme in the OpenAPI document; the ingress checks the key itself
# so that missing and wrong keys get the same JSON 401.
Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="API key")),
]
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API key"},
    403: {"model": ErrorBody, "description": "The key is not scoped to this purpose"},
    413: {"model": ErrorBody, "description": "Body too large"},
    422: {"model": ErrorBody, "description": "Invalid request; the problems name the fields"},
    503: {"model": ErrorBody, "description": "Not ready or a store is unavailable; retry"},
}
CLIENT_CLOSED = 499
"""The status access logs use for a client that went away (nginx's convention)."""
PURPOSE_HEADER = "rankgate-purpose"
"""Optional: the purpose of a rank request, checked against the key before the body is read."""


def parse_config(user_config: dict[str, Any], store: ModelStore | None = None) -> ServingConfig:
    """Validate a serving config; with `store`, every routed version must exist in it."""
    try:
        config = ServingConfig.model_validate(user_config)
    except ValidationError as exc:
        raise ConfigError(validation_message("serve_config.yaml user_config", exc)) from exc
    for field, names in (
        ("stages", config.pipeline.stages),
        ("fallback", [config.pipeline.fallback]),
    ):
        for index, name in enumerate(names):
            if name not in STAGES:
                where = f"pipeline.{field}.{index}" if field == "stages" else "pipeline.fallback"
                raise ConfigError(
                    f"serve_config.yaml user_config: field {where!r}: unknown stage {name!r} "
                    f"(known: {', '.join(sorted(STAGES))})"
                )
    if store is not None:
        check_versions(config, store)
    return config


def check_versions(config: ServingConfig, store: ModelStore) -> None:
    """ConfigError naming the field when a routed version is not in `store`."""
    for index, route in enumerate(config.routing.versions):
        if not store.exists(route.version):
            known = ", ".join(store.versions()) or "none"
            raise ConfigError(
                f"serve_config.yaml user_config: field 'routing.versions.{index}.version': "
                f"unknown model version {route.version!r} (known: {known})"
            )


class RequestTimeout(RankgateError):
    """The body did not arrive within `connections.body_timeout_s`."""

    status_code = 408
    error = rejection = "request_timeout"


class ClientGone(RankgateError):
    """The client went away before its request was read: nobody to answer."""

    status_code = CLIENT_CLOSED
    rejection = "client_closed"


class EventsNotDeclared(RankgateError):
    """The project declares no event types (rankgate.yaml `events`)."""

    status_code = 404
    error = "events_not_declared"
    rejection = "events_not_declared"


class NotConfigured(RankgateError):
    """The replica has not applied a serving config yet."""

    status_code = 503
    error = "not_configured"


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, read within `timeout_s`: a slow client gets a 408 and frees its slot."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > max_bytes
    ):
        raise BadRequest(
            [ErrorProblem(field="body", problem=f"larger than {max_bytes} bytes")], 413
        )
    body = b""
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise BadRequest(
                        [ErrorProblem(field="body", problem=f"larger than {max_bytes} bytes")],
                        413,
                    )
    except TimeoutError as exc:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from exc
    except ClientDisconnect as exc:
        raise ClientGone("the client disconnected before its body was read") from exc
    return body


async def body_of(request: Request, config: ServingConfig) -> bytes:
    return await read_body(request, config.limits.max_body_bytes, config.connections.body_timeout_s)


def queued_ms(request: Request) -> float:
    """How long the request waited before this replica took it up: from the arrival
    stamp the edge (HAProxy) set, or 0 where no edge stamps (HAProxy mode off).

    Never negative (clocks of two nodes may differ a little); a client that sets
    the header itself can only shorten its own budget."""
    raw = request.headers.get(edge.RECEIVED_HEADER)
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return 0.0
    return max(time.time() * 1000.0 - int(raw) / 1000.0, 0.0)


# A client that sent too much or too slowly is not kept: its connection is closed.
ERROR_HEADERS = {
    "unauthorized": {"WWW-Authenticate": "Bearer"},
    "request_timeout": {"Connection": "close"},
    "body_too_large": {"Connection": "close"},
    "unavailable": {"Retry-After": "1"},
    "consent_store_unavailable": {"Retry-After": "1"},
}


@api.exception_handler(RankgateError)
async def domain_error(request: Request, exc: RankgateError) -> Response:
    """The one place where domain errors become answers, and refusals are counted."""
    if exc.rejection is not None:
        ingress = serve.get_replica_context().servable_object
        ingress.runtime.metrics.rejected(exc.rejection)  # type: ignore[attr-defined]
    if exc.status_code == CLIENT_CLOSED:
        # Logged as 499 (client closed), never as a server error; nobody reads the body.
        return Response(status_code=CLIENT_CLOSED)
    if exc.problems:
        body = ErrorBody(error=exc.error, problems=list(exc.problems))
    else:
        body = ErrorBody(error=exc.error, detail=exc.message)
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=exc.status_code,
        headers=ERROR_HEADERS.get(exc.error),
    )


@dataclass(frozen=True)
class ServingState:
    """What one serving config built. `reconfigure` swaps it whole, in one
    assignment: a request sees the old state or the new one, never a mix."""

    pipeline: RankPipeline
    ranker: Ranker
    events: EventLog
    event_rules: EventRules | None
    """None: the project declares no events."""

    @property
    def config(self) -> ServingConfig:
        return self.pipeline.config

    @property
    def consent(self) -> AsyncConsentStore:
        return self.pipeline.services.consent


# Until `reconfigure` applies the deployed config's `batching`.
DEFAULT_BATCHING = BatchingConfig()


class BatchedScoring:
    """Mixin: `@serve.batch` around Ranker.score_batch, tunable from config."""

    @serve.batch(
        max_batch_size=DEFAULT_BATCHING.max_batch_size,
        batch_wait_timeout_s=DEFAULT_BATCHING.batch_wait_timeout_s,
    )
    async def score_many(self, requests: list[tuple[str, np.ndarray]]) -> list[Any]:
        self.observe_batch([version for version, _ in requests])
        ranker = self.scoring_ranker()
        if len(requests) == 1:
            # A lone request (the batcher found nobody waiting): scored right here,
            # no hop to a thread.
            return ranker.score_batch(requests)
        # Several waited: onnxruntime releases the GIL, so in a worker thread the
        # batch is scored while the event loop reads and answers other requests.
        return await asyncio.to_thread(ranker.score_batch, requests)

    def scoring_ranker(self) -> Ranker:
        raise NotImplementedError

    def observe_batch(self, versions: list[str]) -> None:
        """Hook for batch-size metrics; the ingress records them."""

    async def score(self, version: str, matrix: np.ndarray) -> np.ndarray:
        result = await self.score_many((version, matrix))
        if isinstance(result, Exception):
            raise result
        return result

    def tune_batching(self, batching: BatchingConfig) -> None:
        self.score_many.set_max_batch_size(batching.max_batch_size)  # type: ignore[attr-defined]
        self.score_many.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]


class RankerConfig(BaseModel):
    """user_config of RankerDeployment: which versions to load, and batching."""

    model_config = ConfigDict(extra="forbid")

    models: ModelsConfig = ModelsConfig()
    versions: list[str]
    batching: BatchingConfig = BatchingConfig()


# Deployment options (replicas, CPUs, queue limits) are set in serve_config.yaml only.
@serve.deployment
class RankerDeployment(BatchedScoring):
    """Scores for all ingress replicas (placement `deployment`)."""

    def __init__(self) -> None:
        settings = get_settings()
        # On a cluster: the node's cache of the artifact store (serving/runtime.py).
        self.store = ArtifactStore(settings.store) if settings.store else None
        self.home = (
            self.store.cache_home(settings.cache) if self.store else Home.from_settings(settings)
        )
        self.ranker = Ranker(ModelSet(ModelStore(self.home), []))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        try:
            config = RankerConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ConfigError(validation_message("RankerDeployment user_config", exc)) from exc
        models = ModelStore(self.home, config.models.name)
        if self.store is not None:
            self.store.fetch_versions(models, config.versions)
        self.ranker = Ranker(ModelSet(models, config.versions))
        self.tune_batching(config.batching)

    def scoring_ranker(self) -> Ranker:
        return self.ranker


@serve.deployment
@serve.ingress(api)
class RankIngress(BatchedScoring):
    """HTTP entry: authenticates, parses, runs the pipeline (`domain_error` answers for errors).

    Lifecycle: `__init__` opens Redis, Feast, policy and fallback (heavy, once);
    `reconfigure(user_config)` validates the serving config and swaps models,
    explainers and limits; requests then run `RankPipeline.rank`.
    """

    def __init__(
        self,
        ranker: DeploymentHandle | None = None,
        consumer: DeploymentHandle | None = None,
        carried: dict[str, str] | None = None,
    ) -> None:
        self.runtime = Runtime.open(carried)
        self.remote_ranker = ranker
        # Bound so that the application deploys the event consumer with the ingress.
        self.consumer = consumer
        self.state: ServingState | None = None
        self.keys = KeyCache(self.runtime.redis, self.runtime.home.namespace)
        self.config_error: str | None = None
        # Changes on restart only: shows that a routing change reconfigured in place.
        self.replica_started = uuid.uuid4().hex
        # Which Ray node this replica runs on (operators of a cluster ask /healthz).
        self.node_id = ray.get_runtime_context().get_node_id()
        self.openapi_cache: tuple[RequestRules | None, dict[str, Any]] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Validate, load and swap. A bad config at start-up stops the replica with
        the field named; a bad config deployed later is refused and logged, and the
        running one keeps serving (so a typo never takes the service down)."""
        try:
            config = parse_config(user_config)
            versions = ModelStore(self.runtime.home, config.models.name)
            # On a cluster the routed versions come from the artifact store first.
            self.runtime.fetch_versions(versions, config.routing.all_versions)
            check_versions(config, versions)
            policies = self.runtime.load_policies(config.policy)
        except (ConfigError, StoreError) as exc:
            if self.state is None:
                raise
            self.refuse(exc.message)
            return
        if self.keys.table is None:
            await self.keys.load()
        models, explainers = self.runtime.load_models(config)
        broken = self.newly_broken(models)
        if broken:
            # A version that does not load (corrupt, missing files) is never promoted
            # into a running service: the running config keeps serving.
            self.refuse(
                f"serve_config.yaml user_config: field 'routing.versions': model version "
                f"{broken[0]!r} does not load ({models.errors[broken[0]]})"
            )
            return
        self.config_error = None
        score = self.score if self.remote_ranker is None else self.score_remote
        pipeline = self.runtime.pipeline(config, models, explainers, score, policies=policies)
        await pipeline.warm_up()
        # Swap only when everything above succeeded: a bad config changes nothing.
        self.runtime.use_policies(*policies)
        self.tune_batching(config.batching)
        declared = self.runtime.project.spec.events
        self.state = ServingState(
            pipeline,
            Ranker(models),
            EventLog(self.runtime.redis, self.runtime.home.namespace, config.events),
            EventRules(pipeline.rules, declared, config.events) if declared else None,
        )
        self.keys.keep_fresh(config.auth.refresh_s)
        self.runtime.watch_drift(config, models)
        self.runtime.drift.keep_fresh(self.runtime.redis, self.runtime.home.namespace)
        pipeline.publish_canary_weight()
        # What the replica holds now (Ray, Feast, models, the item table) lives until
        # the next reconfigure: out of the collector's sight, a full collection scans
        # only what requests allocate (no multi-millisecond pauses in the tail). What
        # the previous config held is collected first, never frozen for good.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def refuse(self, message: str) -> None:
        """Keep the running config; say why in the log and in /healthz."""
        logger.error("refused serving config, keeping the running one: %s", message)
        self.config_error = message

    def newly_broken(self, models: ModelSet) -> list[str]:
        """Versions that fail to load now but did not in the running config.

        At start-up there is nothing to keep serving, so such versions are only
        marked unavailable (their requests degrade and say so)."""
        if self.state is None:
            return []
        running = self.state.pipeline.models
        return sorted(v for v in models.errors if v not in running.errors)

    def observe_batch(self, versions: list[str]) -> None:
        for version in set(versions):
            metrics = self.runtime.metrics
            metrics.child(metrics.batch_size, version).observe(versions.count(version))

    async def score_remote(self, version: str, matrix: np.ndarray) -> np.ndarray:
        assert self.remote_ranker is not None
        return await self.remote_ranker.score.remote(version, matrix)

    def serving(self) -> ServingState:
        if self.state is None:
            raise NotConfigured(
                "RankIngress has no serving config: deploy it with the user_config of "
                "serve_config.yaml"
            )
        return self.state

    def scoring_ranker(self) -> Ranker:
        return self.serving().ranker

    async def caller(self, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
        """The caller's key; the same 401 whether it is missing or wrong."""
        return await self.keys.authenticate(credentials.credentials if credentials else None)

    @api.post("/v1/rank", response_model=RankResponse, responses=ERROR_RESPONSES)
    async def rank(self, request: Request, credentials: Bearer) -> Response:
        """Rank items for one person and purpose. With a `Rankgate-Purpose` header the
        key's scope is checked before the body is read (the body's purpose must match)."""
        # Documents the endpoint; requests are served by `serve_rank` (module level),
        # which calls the same `answer_rank`.
        return await self.answer_rank(request, credentials.credentials if credentials else None)

    async def answer_rank(self, request: Request, token: str | None) -> Response:
        waited_ms = queued_ms(request)
        pipeline = self.serving().pipeline
        caller = await self.keys.authenticate(token)
        declared = request.headers.get(PURPOSE_HEADER)
        if declared is not None:
            KeyCache.authorize(caller, [declared])
        parsed = pipeline.parse(await body_of(request, pipeline.config))
        if declared is not None and parsed.purpose != declared:
            problem = ErrorProblem(
                field="purpose", problem="differs from the Rankgate-Purpose header"
            )
            raise BadRequest([problem])
        KeyCache.authorize(caller, [parsed.purpose])
        pipeline.fetcher.refresh_items_if_due(pipeline.config.features.item_refresh_s)
        response = await pipeline.rank(parsed, app=caller.app, queued_ms=waited_ms)
        return Response(response.model_dump_json(exclude_unset=True), media_type="application/json")

    @api.post(
        "/v1/events",
        status_code=202,
        response_model=EventsAccepted,
        responses={**ERROR_RESPONSES, 404: {"model": ErrorBody, "description": "No event types"}},
    )
    async def post_events(self, request: Request, credentials: Bearer) -> Response:
        """Record a batch of events (impressions, clicks, the project's own types). 202
        once every event of it is durable in the event stream; a repeated `event_id`
        is counted as a duplicate and changes nothing. The key needs the `events` scope."""
        state = self.serving()
        caller = await self.caller(credentials)
        KeyCache.authorize_scope(caller, "events")
        if state.event_rules is None:
            raise EventsNotDeclared("this project declares no event types (rankgate.yaml events)")
        events = parse_events(await body_of(request, state.config), state.event_rules)
        accepted = await state.events.append([StoredEvent.of(event) for event in events])
        metrics = self.runtime.metrics
        metrics.events.labels("accepted").inc(accepted.accepted)
        metrics.events.labels("duplicate").inc(accepted.duplicates)
        return JSONResponse(accepted.model_dump(), status_code=202)

    @api.post("/v1/consent", response_model=ConsentRecorded, responses=ERROR_RESPONSES)
    async def post_consent(self, request: Request, credentials: Bearer) -> Response:
        """Record consent decisions; the user id travels in the body."""
        return await self.write_consent(request, credentials)

    @api.put(
        "/v1/consent/{user_id}",
        response_model=ConsentRecorded,
        responses=ERROR_RESPONSES,
        deprecated=True,
    )
    async def put_consent(self, user_id: str, request: Request, credentials: Bearer) -> Response:
        """As `POST /v1/consent`, with the user id in the path: proxies and access
        logs keep URLs, so the raw id ends up in them. Kept for existing callers."""
        return await self.write_consent(request, credentials, user_id)

    async def write_consent(
        self, request: Request, credentials: Bearer, path_user_id: str | None = None
    ) -> Response:
        state = self.serving()
        caller = await self.caller(credentials)
        body = await body_of(request, state.config)
        consent = parse_consent(body, state.pipeline.rules, path_user_id)
        # The key must be scoped to every purpose the write records.
        KeyCache.authorize(caller, list(consent.purposes))
        await state.consent.record(pseudonymise(consent.user_id), consent.purposes, consent.source)
        recorded = ConsentRecorded(recorded=consent.purposes, source=consent.source)
        return JSONResponse(recorded.model_dump())

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self) -> Response:
        return JSONResponse(self.openapi_document())

    @api.get("/docs", include_in_schema=False)
    async def swagger_docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} - docs")

    def openapi_document(self) -> dict[str, Any]:
        """The document of the running pipeline's rules, rebuilt when a reconfigure
        swaps them (new config or policy)."""
        rules = self.state.pipeline.rules if self.state is not None else None
        if self.openapi_cache is None or self.openapi_cache[0] is not rules:
            self.openapi_cache = (rules, openapi_document(api, rules))
        return self.openapi_cache[1]

    @api.get("/healthz")
    async def healthz(self) -> Response:
        pipeline = self.serving().pipeline
        models, router = pipeline.models, pipeline.router
        return JSONResponse(
            {
                "status": "ok",
                "policy_version": self.runtime.policy.version,
                "policy_digest": self.runtime.policies.digest,
                "config_error": self.config_error,
                "replica_started": self.replica_started,
                "node_id": self.node_id,
                "models": {"loaded": sorted(models.loaded), "unavailable": models.errors},
                "sampled_explanations": {
                    "sample_rate": pipeline.config.explainer.sample_rate,
                    "outstanding": pipeline.worker.outstanding,
                },
                "drift": pipeline.config.drift.model_dump(),
                "routing": {
                    "salt": router.config.salt,
                    "versions": [r.model_dump() for r in router.config.versions],
                    "canary_weight": router.canary_weight,
                    "rolled_back": sorted(router.rolled_back),
                    "windows": {v: w.figures() for v, w in router.windows.items()},
                },
            }
        )


class AppArgs(BaseModel):
    """Application arguments (`args:` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    ranker_placement: Literal["in_process", "deployment"] = "in_process"
    project: dict[str, str] | None = None
    """The project's files (relative path -> text), carried for a cluster whose nodes
    do not see the project folder (`rankgate cluster config` writes them)."""


def build_app(args: dict[str, Any]) -> serve.Application:
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(validation_message("serve_config.yaml args", exc)) from exc
    ranker = RankerDeployment.bind() if parsed.ranker_placement == "deployment" else None  # type: ignore[attr-defined]
    consumer = EventConsumer.bind(parsed.project)  # type: ignore[attr-defined]
    return RankIngress.bind(ranker, consumer, parsed.project)  # type: ignore[attr-defined]
