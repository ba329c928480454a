"""Typed serving configuration: the `user_config` of the ingress in serve_config.yaml.

Validated at once by `reconfigure`; a bad value is refused with the field named,
and the running configuration stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from rankgate.core.config_files import Strict
from rankgate.core.settings import get_project
from rankgate.governance.notifications import NotificationKind

# -- routing: which versions serve whom (serving/ranking/routing.py) -----------

Role = Literal["stable", "canary", "shadow", "alternate"]
# Roles a version can return to when its canary ends (stable and canary are taken over).
ReturnRole = Literal["shadow", "alternate"]


class VersionRoute(Strict):
    version: str = Field(min_length=1)
    role: Role
    weight: float | None = Field(None, ge=0, le=100)
    """Percent of users; stable and canary weights add up to 100."""
    previous_role: ReturnRole | None = None
    """A canary's role before it was promoted; rolling the canary back restores it."""


class RollbackRules(Strict):
    window_s: float = Field(30.0, gt=0)
    """Outcomes older than this are forgotten."""
    min_requests: int = Field(30, ge=1)
    """Both variants need this many requests in the window before a rule may fire."""
    max_error_rate_delta: float = Field(0.05, ge=0, le=1)
    """Canary error rate may exceed stable's by at most this much."""
    max_degraded_rate_delta: float = Field(0.10, ge=0, le=1)
    """Canary share of degraded answers (fallbacks after the model was chosen) vs stable."""
    max_p99_ratio: float = Field(2.0, gt=1)
    """Canary p99 latency may be at most this multiple of stable's..."""
    min_p99_delta_ms: float = Field(5.0, ge=0)
    """...and this much above it, so that noise on fast answers does not fire."""
    min_impressions: int = Field(1000, ge=1)
    """The click-rate rule waits for this many joined impressions of each variant."""
    ctr_p_value: float | None = Field(0.05, gt=0, lt=1)
    """The canary is rolled back when a one-sided test (Fisher exact) finds its click
    rate below stable's at this significance; null turns the click-rate rule off."""


class RoutingConfig(Strict):
    salt: str = Field(min_length=1, max_length=64)
    """Changing the salt reshuffles who is in the canary."""
    versions: list[VersionRoute] = Field(min_length=1)
    rollback: RollbackRules = RollbackRules()

    @model_validator(mode="after")
    def _consistent(self) -> RoutingConfig:
        names = [v.version for v in self.versions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"version {duplicates[0]!r} is listed twice")
        stables = [v for v in self.versions if v.role == "stable"]
        canaries = [v for v in self.versions if v.role == "canary"]
        if len(stables) != 1:
            problem = (
                "a canary without a stable"
                if canaries and not stables
                else f"{len(stables)} stables"
            )
            raise ValueError(f"need exactly one stable version, got {problem}")
        if len(canaries) > 1:
            raise ValueError(f"at most one canary, got {len(canaries)}")
        for route in self.versions:
            if route.role in ("shadow", "alternate") and route.weight not in (None, 0):
                raise ValueError(f"{route.version}: a {route.role} version takes no weight")
            if route.previous_role is not None and route.role != "canary":
                raise ValueError(f"{route.version}: only a canary has a previous_role")
        stable_weight = stables[0].weight if stables[0].weight is not None else 100.0
        canary_weight = (canaries[0].weight or 0.0) if canaries else 0.0
        if abs(stable_weight + canary_weight - 100.0) > 1e-9:
            raise ValueError(
                f"stable and canary weights must add up to 100, got {stable_weight:g} + {canary_weight:g}"
            )
        return self

    def of_role(self, role: Role) -> list[VersionRoute]:
        return [v for v in self.versions if v.role == role]

    @property
    def stable(self) -> str:
        return self.of_role("stable")[0].version

    @property
    def canary(self) -> VersionRoute | None:
        found = self.of_role("canary")
        return found[0] if found else None

    @property
    def all_versions(self) -> list[str]:
        return [v.version for v in self.versions]


class BudgetConfig(Strict):
    default_ms: float = Field(50.0, gt=0)
    """Deadline of a request that does not name `budget_ms`."""
    min_ms: float = Field(1.0, gt=0)
    max_ms: float = Field(1000.0, gt=0)
    """Cap: a request may not ask for more (422)."""

    @model_validator(mode="after")
    def _ordered(self) -> BudgetConfig:
        if not self.min_ms <= self.default_ms <= self.max_ms:
            raise ValueError("need min_ms <= default_ms <= max_ms")
        return self


class LimitsConfig(Strict):
    max_body_bytes: int = Field(64 * 1024, ge=256)
    max_candidates: int = Field(500, ge=1)
    max_k: int = Field(100, ge=1)
    max_user_id_chars: int = Field(128, ge=1)
    max_context_entries: int = Field(16, ge=0)
    max_context_value_chars: int = Field(64, ge=1)


class ConnectionsConfig(Strict):
    """Guards that hold for every client, with or without a key (serving/http/edge.py).

    The HAProxy ingress takes them when `rankgate serve` starts it; the replica
    applies `body_timeout_s` itself too, for bodies HAProxy forwards unbuffered
    (larger than its buffer) and when HAProxy mode is off."""

    header_timeout_s: float = Field(5.0, gt=0, le=60)
    """A client that has not sent its request headers by then gets a 408, and the
    connection is closed."""
    body_timeout_s: float = Field(5.0, gt=0, le=60)
    """A request body that has not arrived by then gets a 408, and its slot is freed."""
    idle_timeout_s: float = Field(30.0, gt=0, le=3600)
    """A client connection with no activity for this long is closed."""
    max_per_source: int = Field(512, ge=1)
    """Connections one client address may hold open at once; more are refused."""


class ModelsConfig(Strict):
    name: str = "ranker"
    """Model name in the model store (versions live in `<home>/models/<name>/`)."""


class BatchingConfig(Strict):
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=0.1)
    """How long the first request of a batch waits for company. 0: a batch is
    scored as soon as the ranker is free, with whoever queued while it was busy
    (a lone request never waits; under load batches form by themselves)."""


class FeaturesConfig(Strict):
    item_refresh_s: float = Field(300.0, gt=0)
    """How often the in-memory item table is re-read from the online store."""


class RetrievalSource(Strict):
    source: Literal["ann", "recent", "popular"]
    """ann: nearest items to the person's vector in the version's item embeddings;
    recent: the items of the person's per-item features (their recent items), best
    first; popular: the most clicked items of the person's segments, then overall."""
    quota: int = Field(ge=1, le=10_000)
    """At most this many items from this source (before merging duplicates); `ann`
    gives at least the request's k, so that an answer is never short of items."""


class RetrievalConfig(Strict):
    """The retrieval stage (serving/ranking/retrieval.py): what narrows a request
    without candidates over a large catalogue before the ranker scores it."""

    above_items: int = Field(2000, ge=0)
    """Retrieve when a request names no candidates and the policy allows more items
    than this; below it, the ranker scores every allowed item."""
    sources: list[RetrievalSource] = Field(
        default_factory=lambda: [
            RetrievalSource(source="ann", quota=300),
            RetrievalSource(source="recent", quota=50),
            RetrievalSource(source="popular", quota=50),
        ],
        min_length=1,
    )
    """The sources, in order of precedence; their items merged without duplicates."""


class ExplainerConfig(Strict):
    max_items: int = Field(10, ge=1)
    """At most this many returned items are explained (SHAP cost grows per row)."""
    ms_per_row_estimate: float = Field(1.0, gt=0)
    """Expected SHAP cost per row; the explainer is skipped when the rest of the
    budget cannot cover it."""
    sample_rate: float = Field(0.01, ge=0, le=1)
    """Share of model-ranked decisions explained after the answer is sent, into
    their audit records (serving/observe/sampling.py); 0: none. Chosen by a hash of the
    request id: uniform, whoever the person and whatever the answer."""
    sample_queue: int = Field(64, ge=1, le=10_000)
    """Sampled explanations waiting or being computed at most; a sample beyond it
    is skipped (its record says `queue_full`): a burst never builds a backlog."""


class AuditConfig(Strict):
    enabled: bool = True
    """Off only to measure what the audit log costs (`rankgate bench`)."""
    max_records: int = Field(100_000, ge=100)
    """Retention: the audit stream is trimmed to about this many decisions."""
    before_answer: bool = False
    """Send an answer only once its record (and a sampled explanation) is written:
    no answered decision is missing from the stream when a node vanishes, for one
    Redis round trip per request. Off: records are written just after the answer
    (a replica killed in those milliseconds takes them with it)."""


class AuthConfig(Strict):
    refresh_s: float = Field(1.0, gt=0, le=60)
    """How often a replica re-reads the API key table: a revoked key stops
    working within this interval, without a restart."""


class PolicyConfig(Strict):
    dir: str | None = None
    """Folder with policy.yaml and fallback.yaml; default: the project's policies/."""
    revision: str | None = None
    """Digest of the files as checked by `rankgate policy deploy`; replicas refuse
    files that differ from it. Changing it is what makes Ray Serve re-read them."""
    files: dict[str, str] | None = None
    """The policy files themselves (name -> text: policy.yaml, fallback.yaml,
    reasons.yaml), carried in the config for a cluster whose replicas do not see
    the project folder (`rankgate cluster config`); they win over `dir`."""

    @property
    def folder(self) -> Path | None:
        """`dir` as a path; a relative one is relative to the project, as written by
        `rankgate policy deploy`."""
        if not self.dir:
            return None
        folder = Path(self.dir)
        return folder if folder.is_absolute() else get_project().root / folder


class EventLimits(Strict):
    """What `POST /v1/events` accepts, and how long the stream keeps what it needs."""

    max_batch: int = Field(200, ge=1, le=10_000)
    """Events per request."""
    max_future_s: float = Field(300.0, ge=0)
    """An event's timestamp may be at most this far ahead of the server's clock."""
    max_age_s: float = Field(7 * 24 * 3600.0, gt=0)
    """...and at most this old; also how long an event id is remembered (a repeat
    within it changes nothing)."""
    max_stream_len: int = Field(1_000_000, ge=1000)
    """Retention: the stream is trimmed to about this many events."""
    decision_ttl_s: float = Field(24 * 3600.0, gt=0)
    """How long a decision waits for its outcomes (impressions, clicks) to join it."""


class EvaluationRequirement(Strict):
    """Off-policy evidence a version needs before `rankgate model promote --canary` or
    `--stable` gives it traffic: its estimated click rate against stable's, from
    logged decisions with propensities (model_store/offpolicy.py)."""

    min_lift: float = Field(0.0, ge=-1)
    """The lower confidence bound of (version - stable) must be at least this share of
    stable's estimate: 0 asks for evidence that it is no worse, 0.05 for 5 % better,
    -0.05 accepts up to 5 % worse."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Two-sided level of the (betting) confidence interval of the difference."""
    min_effective_sample_size: float = Field(100.0, ge=1)
    """Fewer effective samples (of the version's importance weights) is too little
    evidence: refused."""
    min_clicks: int = Field(5, ge=0)
    """Fewer clicks on the slots the version's estimate gives weight is too little
    evidence, however wide its interval: refused. The same floor as the estimators' own verdicts (model_store.offpolicy.MIN_CLICKS; not
    imported here, so that reading a config never loads numpy)."""
    estimator: Literal["ips", "snips", "dr"] = "snips"
    source: Literal["logs", "audit"] = "logs"
    """logs: the project's logged interactions (rankgate.yaml `interactions`, with
    position and propensity columns); audit: rankgate's own decisions joined with
    their outcomes, since `since`."""
    since: str = "7d"
    """How far back the audit source reads (a duration, an ISO time, a stream id)."""


class PromotionConfig(Strict):
    require_evaluation: EvaluationRequirement | None = None
    """Off (null): promotion needs no off-policy evidence."""


class DriftConfig(Strict):
    """Drift of each loaded version against the reference kept with it at registration
    (serving/observe/drift.py): PSI per input and of the scores, and the shift of its
    explanations, over a sliding window of the rows it scored."""

    window_s: float = Field(3600.0, ge=10, le=7 * 24 * 3600)
    """Length of the sliding window of live rows compared with the reference."""
    min_rows: int = Field(500, ge=1)
    """Scored rows (candidate items) the window needs before a figure may raise a flag."""
    feature_psi: float = Field(0.25, gt=0)
    """Flag `feature` when an input's population stability index exceeds this
    (0.1: a moderate shift, 0.25: a large one)."""
    score_psi: float = Field(0.25, gt=0)
    """Flag `score` when the PSI of the scores exceeds this."""
    explanation_shift: float = Field(0.3, gt=0, le=2)
    """Flag `explanation` when the L1 distance between the shares of mean |SHAP| per
    feature group (live explanations vs the reference) exceeds this (0..2)."""
    min_explained_rows: int = Field(100, ge=1)
    """Explained rows the window needs before explanation drift may raise a flag
    (explanations are a sample of traffic: fewer rows than scored ones)."""
    block_promotion: bool = False
    """`rankgate model promote` refuses a version with a flag (unless --force)."""
    refresh_s: float = Field(5.0, gt=0, le=600)
    """How often a replica folds the rows it scored into the window, updates the
    metrics and writes the figures to Redis (for `rankgate model status`)."""


ENV_NAME = r"^[A-Z_][A-Z0-9_]*$"


def http_url_problem(url: str) -> str | None:
    """What is wrong with a webhook's URL, if anything."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


class WebhookConfig(Strict):
    """One receiver of notifications (a Slack or Teams incoming webhook, a pager, a
    service of your own): JSON POSTed to its URL, signed with the secret the environment
    variable `secret_env` holds on the server (docs/operating.md, "Notifications")."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    """Names the webhook in metrics and in its consumer group of the outbox: renaming it
    starts it afresh from the next notification."""
    url: str | None = Field(None, min_length=1, max_length=2048)
    """http(s) URL the notifications are POSTed to. A URL that is a secret itself
    (Slack's and Teams' incoming webhooks are) goes in the environment: `url_env`."""
    url_env: str | None = Field(None, pattern=ENV_NAME)
    """Instead of `url`: the environment variable of the replicas holding the URL."""
    kinds: list[NotificationKind] = Field(min_length=1)
    """Which notifications it receives: rollback, promotion, approval, drift_flag,
    retention_failure."""
    secret_env: str = Field(pattern=ENV_NAME)
    """The environment variable of the replicas holding the signing secret (the secret
    itself is never written in this file). A replica without it refuses the config."""
    timeout_s: float = Field(5.0, gt=0, le=60)
    """One attempt gives up after this long (a webhook that hangs holds nobody else up)."""

    @field_validator("url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        problem = None if url is None else http_url_problem(url)
        if problem:
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _one_url(self) -> WebhookConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        return self


class NotificationsConfig(Strict):
    """Where notifications go, and how hard delivery tries (serving/observe/notifier.py)."""

    webhooks: list[WebhookConfig] = Field(default_factory=list)
    max_attempts: int = Field(6, ge=1, le=20)
    """Attempts per notification and webhook; after the last, it is recorded as failed
    (the dead-letter stream, rankgate_notifications_failed_total) and the next one goes.
    A 4xx answer other than 408 and 429 is not retried."""
    backoff_s: float = Field(1.0, gt=0, le=60)
    """The wait before the first retry; each further one doubles it (up to
    max_backoff_s), half of it drawn at random so that retries do not come in step."""
    max_backoff_s: float = Field(60.0, gt=0, le=3600)
    max_age_s: float = Field(24 * 3600.0, gt=0)
    """A notification older than this when its turn comes (the server was down, a
    webhook failed for long) is dropped and counted, not sent late."""

    @model_validator(mode="after")
    def _unique(self) -> NotificationsConfig:
        names = [hook.name for hook in self.webhooks]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"webhook name {twice[0]!r} is used twice")
        return self


class RetentionJobConfig(Strict):
    """The job that enforces the policy's `retention` (serving/observe/retention.py):
    one replica at a time runs it, every `interval_s`, in bounded batches."""

    enabled: bool = True
    """Off: nothing is removed by age (the count caps still hold)."""
    interval_s: float = Field(3600.0, ge=1, le=7 * 24 * 3600)
    """How often the job runs; a record lives at most its limit plus this long."""
    batch: int = Field(2000, ge=1000, le=100_000)
    """Most stream entries one Redis call removes (fewer for large entries: a call
    aims at 2 ms), and most keys one SCAN call looks at (up to 1,000). It must exceed
    the server's `stream-node-max-entries` (100 by default): trimming removes whole
    nodes, and a limit below a node's size removes nothing."""
    pause_s: float = Field(0.001, ge=0, le=1)
    """Pause between two batches: serving's Redis calls and the event loop go first."""


class PipelineConfig(Strict):
    stages: list[str] = Field(
        default_factory=lambda: ["gate", "route", "fetch", "retrieve", "score", "explain"],
        min_length=1,
    )
    """The stages of a rank request, in order (serving/ranking/stages.py names them)."""
    fallback: str = "rules"
    """The stage that answers when another degrades."""


class ServingConfig(Strict):
    budget: BudgetConfig = BudgetConfig()
    limits: LimitsConfig = LimitsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()
    models: ModelsConfig = ModelsConfig()
    routing: RoutingConfig
    batching: BatchingConfig = BatchingConfig()
    features: FeaturesConfig = FeaturesConfig()
    explainer: ExplainerConfig = ExplainerConfig()
    audit: AuditConfig = AuditConfig()
    auth: AuthConfig = AuthConfig()
    policy: PolicyConfig = PolicyConfig()
    pipeline: PipelineConfig = PipelineConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    events: EventLimits = EventLimits()
    promotion: PromotionConfig = PromotionConfig()
    drift: DriftConfig = DriftConfig()
    notifications: NotificationsConfig = NotificationsConfig()

    retention: RetentionJobConfig = RetentionJobConfig()
