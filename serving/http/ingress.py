"""The HTTP ingress: `RankIngress`, the Ray Serve deployment the application's routes live on.

It authenticates, reads and parses; the request path itself (serving/ranking/pipeline.py)
knows nothing of HTTP. What the replica holds is its runtime (serving/runtime.py);
errors become answers in one handler (serving/http/errors.py).
"""

import logging
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import ray
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.routing import Route

from model_store.artifacts import StoreError
from rankgate.core.errors import ConfigError, RankgateError
from rankgate.governance.api_keys import ApiKey
from rankgate.governance.identity import IdentityStore, IdKind, NamedId, id_key, request_key
from serving.contract.parsing import (
    BadRequest,
    parse_consent,
    parse_identify,
    parse_rank,
    parse_unlink,
)
from serving.contract.schemas import (
    GPC_HEADER,
    TCF_HEADER,
    ConsentRecorded,
    ErrorBody,
    ErrorProblem,
    IdentifyResult,
    RankResponse,
    RequestRules,
    UnlinkResult,
)
from serving.events.intake import EventLog, EventRules, EventsAccepted, StoredEvent, parse_events
from serving.http.auth import KeyCache
from serving.http.body import body_of, queued_ms
from serving.http.errors import EventsNotDeclared, NotConfigured, error_response
from serving.http.openapi import openapi_document
from serving.ranking.ranker import Ranker
from serving.runtime import BatchedScoring, ReplicaRuntime, Serving

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
LINK_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    409: {"model": ErrorBody, "description": "The policy's identity rules refuse the link"},
}
PURPOSE_HEADER = "rankgate-purpose"
"""Optional: the purpose of a rank request, checked against the key before the body is read."""


@api.exception_handler(RankgateError)
async def domain_error(request: Request, exc: RankgateError) -> Response:
    """The one place where domain errors become answers, and refusals are counted."""
    ingress = serve.get_replica_context().servable_object
    return error_response(exc, ingress.runtime.metrics.rejected)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EventIntake:
    """`POST /v1/events` of one serving config: the stream and what a batch may say."""

    log: EventLog
    rules: EventRules | None
    """None: the project declares no events."""


@serve.deployment
@serve.ingress(api)
class RankIngress(BatchedScoring):
    """HTTP entry: authenticates, reads and parses, runs the pipeline (`domain_error`
    answers for errors).

    Lifecycle: `__init__` opens the replica runtime (heavy, once);
    `reconfigure(user_config)` configures it (validate, load, warm up, swap);
    requests then run `RankPipeline.rank`; the replica's end closes it.
    """

    def __init__(
        self,
        ranker: DeploymentHandle | None = None,
        consumer: DeploymentHandle | None = None,
        carried: dict[str, str] | None = None,
    ) -> None:
        self.runtime = ReplicaRuntime.open(carried)
        self.remote_ranker = ranker
        # Bound so that the application deploys the event consumer with the ingress.
        self.consumer = consumer
        self.keys = KeyCache(self.runtime.redis, self.runtime.home.namespace)
        self.config_error: str | None = None
        # Configs this replica has taken or refused: a deployer tells a refusal of its
        # own config from an earlier one by this count moving (/healthz).
        self.reconfigured = 0
        # Changes on restart only: shows that a routing change reconfigured in place.
        self.replica_started = uuid.uuid4().hex
        # Which Ray node this replica runs on (operators of a cluster ask /healthz).
        self.node_id = ray.get_runtime_context().get_node_id()
        self.openapi_cache: tuple[RequestRules | None, dict[str, Any]] | None = None
        self.intake_cache: tuple[Serving, RequestRules, EventIntake] | None = None
        self.identity_store: IdentityStore | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Validate, load and swap (ReplicaRuntime.configure). A bad config at start-up
        stops the replica with the field named; a bad config deployed later is refused
        and logged, and the running one keeps serving (so a typo never takes the
        service down)."""
        if self.keys.table is None:
            await self.keys.load()
        score = self.score if self.remote_ranker is None else self.score_remote
        try:
            serving = await self.runtime.configure(user_config, score)
        except (ConfigError, StoreError) as exc:
            if self.runtime.serving is None:
                raise
            self.refuse(exc.message)
            self.reconfigured += 1
            return
        self.config_error = None
        self.reconfigured += 1
        self.tune_batching(serving.config.batching)
        self.keys.keep_fresh(serving.config.auth.refresh_s)

    async def __del__(self) -> None:
        await self.runtime.close()

    def refuse(self, message: str) -> None:
        """Keep the running config; say why in the log and in /healthz."""
        logger.error("refused serving config, keeping the running one: %s", message)
        self.config_error = message

    def observe_batch(self, versions: list[str]) -> None:
        for version in set(versions):
            metrics = self.runtime.metrics
            metrics.child(metrics.batch_size, version).observe(versions.count(version))

    async def score_remote(self, version: str, matrix: np.ndarray) -> np.ndarray:
        assert self.remote_ranker is not None
        return await self.remote_ranker.score.remote(version, matrix)

    def serving(self) -> Serving:
        serving = self.runtime.serving
        if serving is None:
            raise NotConfigured(
                "RankIngress has no serving config: deploy it with the user_config of "
                "serve_config.yaml"
            )
        return serving

    def intake(self, serving: Serving) -> EventIntake:
        """The event intake of `serving`'s config, built once per config and catalogue
        (a refresh that adds items gives the pipeline new request rules)."""
        request_rules = serving.pipeline.rules
        cached = self.intake_cache
        if cached is None or cached[0] is not serving or cached[1] is not request_rules:
            config, declared = serving.config, self.runtime.project.spec.events
            rules = EventRules(request_rules, declared, config.events) if declared else None
            log = EventLog(self.runtime.redis, self.runtime.home.namespace, config.events)
            cached = (serving, request_rules, EventIntake(log, rules))
            self.intake_cache = cached
        return cached[2]

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
        config = pipeline.services.config
        headers = request.headers
        parsed = parse_rank(
            await body_of(request, config),
            pipeline.rules,
            headers.get(GPC_HEADER),
            headers.get(TCF_HEADER),
        )
        if declared is not None and parsed.purpose != declared:
            problem = ErrorProblem(
                field="purpose", problem="differs from the Rankgate-Purpose header"
            )
            raise BadRequest([problem])
        KeyCache.authorize(caller, [parsed.purpose])
        pipeline.services.fetcher.refresh_items_if_due(config.features.item_refresh_s)
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
        serving = self.serving()
        intake = self.intake(serving)
        caller = await self.caller(credentials)
        KeyCache.authorize_scope(caller, "events")
        if intake.rules is None:
            raise EventsNotDeclared("this project declares no event types (rankgate.yaml events)")
        events = parse_events(await body_of(request, serving.config), intake.rules)
        accepted = await intake.log.append([StoredEvent.of(event) for event in events])
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
        serving = self.serving()
        caller = await self.caller(credentials)
        body = await body_of(request, serving.config)
        consent = parse_consent(body, serving.pipeline.rules, path_user_id)
        # The key must be scoped to every purpose the write records.
        KeyCache.authorize(caller, list(consent.purposes))
        consents = serving.pipeline.services.consent
        key = request_key(consent.user_id, consent.anonymous_id)
        await consents.record(key, consent.purposes, consent.source)
        recorded = ConsentRecorded(recorded=consent.purposes, source=consent.source)
        return JSONResponse(recorded.model_dump())

    @api.post("/v1/identify", response_model=IdentifyResult, responses=LINK_RESPONSES)
    async def identify(self, request: Request, credentials: Bearer) -> Response:
        """Link ids of one person: anonymous ids (and further user ids) join the person
        of `user_id`, with their consent merged by the policy's rule and their streaming
        counts added to the person's. The key needs the `identify` scope."""
        serving = self.serving()
        caller = await self.caller(credentials)
        KeyCache.authorize_scope(caller, "identify")
        body = parse_identify(await body_of(request, serving.config), serving.pipeline.rules)
        user = NamedId("user_id", IdKind.USER, id_key(IdKind.USER, body.user_id))
        others = [
            NamedId(f"{kind.value}_ids.{n}", kind, id_key(kind, raw))
            for kind, ids in ((IdKind.ANONYMOUS, body.anonymous_ids), (IdKind.USER, body.user_ids))
            for n, raw in enumerate(ids)
        ]
        result = await self.identities(serving).link(
            user,
            others,
            serving.pipeline.services.gate.policy.identity,
            body.region,
            serving.config.events.max_stream_len,
        )
        answer = IdentifyResult(
            linked=result.linked,
            already_linked=result.already,
            ids=result.ids,
            consent_merged=result.consent_merged,
        )
        return JSONResponse(answer.model_dump())

    @api.post("/v1/unlink", response_model=UnlinkResult, responses=LINK_RESPONSES)
    async def unlink(self, request: Request, credentials: Bearer) -> Response:
        """Detach one linked id from its person: it keeps a copy of the person's consent
        and starts with no streaming counts. The key needs the `identify` scope."""
        serving = self.serving()
        caller = await self.caller(credentials)
        KeyCache.authorize_scope(caller, "identify")
        body = parse_unlink(await body_of(request, serving.config), serving.pipeline.rules)
        if body.user_id is not None:
            named = NamedId("user_id", IdKind.USER, id_key(IdKind.USER, body.user_id))
        else:
            assert body.anonymous_id is not None
            named = NamedId(
                "anonymous_id", IdKind.ANONYMOUS, id_key(IdKind.ANONYMOUS, body.anonymous_id)
            )
        unlinked = await self.identities(serving).unlink(named)
        return JSONResponse(UnlinkResult(unlinked=unlinked).model_dump())

    def identities(self, serving: Serving) -> IdentityStore:
        client = serving.pipeline.services.consent.client
        if self.identity_store is None or self.identity_store.client is not client:
            self.identity_store = IdentityStore(client, self.runtime.home.namespace)
        return self.identity_store

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self) -> Response:
        return JSONResponse(self.openapi_document())

    @api.get("/docs", include_in_schema=False)
    async def swagger_docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} - docs")

    def openapi_document(self) -> dict[str, Any]:
        """The document of the running pipeline's rules, rebuilt when a reconfigure
        swaps them (new config or policy)."""
        serving = self.runtime.serving
        rules = serving.pipeline.rules if serving is not None else None
        if self.openapi_cache is None or self.openapi_cache[0] is not rules:
            self.openapi_cache = (rules, openapi_document(api, rules))
        return self.openapi_cache[1]

    @api.get("/healthz")
    async def healthz(self) -> Response:
        pipeline = self.serving().pipeline
        services = pipeline.services
        models, router, config = services.models, services.router, services.config
        return JSONResponse(
            {
                "status": "ok",
                "policy_version": self.runtime.policy.version,
                "policy_digest": self.runtime.policies.digest,
                "config_error": self.config_error,
                "reconfigured": self.reconfigured,
                "replica_started": self.replica_started,
                "node_id": self.node_id,
                "models": {"loaded": sorted(models.loaded), "unavailable": models.errors},
                "sampled_explanations": {
                    "sample_rate": config.explainer.sample_rate,
                    "outstanding": pipeline.recorder.worker.outstanding,
                },
                "drift": config.drift.model_dump(),
                "notifications": self.runtime.notifier.describe(),
                "retrieval": {
                    "above_items": config.retrieval.above_items,
                    "catalogue": len(services.fetcher.catalogue),
                    "indexes": {v: i.describe() for v, i in services.retrieval.items()},
                },
                "routing": {
                    "salt": router.config.salt,
                    "versions": [r.model_dump() for r in router.config.versions],
                    "canary_weight": router.canary_weight,
                    "rolled_back": sorted(router.rolled_back),
                    "windows": {v: w.figures() for v, w in router.windows.items()},
                    # Per region with a residency rule, the routed versions it accepts.
                    "residency": {r: sorted(v) for r, v in router.residency.items()},
                },
            }
        )
