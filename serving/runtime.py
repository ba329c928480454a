"""What a serving replica opens at start: settings, Redis, Feast, policy, fallback.

Heavy and shared by every request; built once in a deployment's `__init__`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from feast import FeatureStore

from features.store import feature_store, serving_files
from model_store.artifacts import ArtifactStore, StoreError
from model_store.reference import DriftReference
from model_store.store import ModelStore
from rankgate.core.errors import ConfigError, ModelStoreError, RankgateError
from rankgate.core.home import Home
from rankgate.core.project import Project, load_project
from rankgate.core.project_files import materialize
from rankgate.core.redis_server import (
    SERVING_CONNECT_TIMEOUT_S,
    SERVING_SOCKET_TIMEOUT_S,
    resolve_redis_url,
)
from rankgate.core.settings import Settings, get_project, get_settings
from rankgate.governance.consent import AsyncConsentStore
from rankgate.governance.policy import Policy, PolicySet, load_policy_set
from serving.contract.config import AuditConfig, PolicyConfig, ServingConfig
from serving.observe.audit import AuditWriter
from serving.observe.drift import DriftMonitor, VersionInputs
from serving.observe.metrics import ServingMetrics
from serving.observe.outcomes import project_outcomes
from serving.observe.routing_log import ExperimentLog
from serving.observe.sampling import ExplanationObserver, ExplanationWorker
from serving.ranking.explainer import Explainer, ReasonTemplates, load_reason_templates
from serving.ranking.fallback import RuleFallback
from serving.ranking.feature_fetch import FeatureFetcher
from serving.ranking.gate import ConsentGate
from serving.ranking.pipeline import RankPipeline
from serving.ranking.ranker import ModelSet
from serving.ranking.routing import Router
from serving.ranking.stages import ScoreFn, Services

logger = logging.getLogger("ray.serve")


@dataclass
class ServingSources:
    """Where a replica reads what it serves.

    One machine: the home and the project folder. A cluster (RANKGATE_STORE set): the
    node's cache of the artifact store, filled from it (model_store/artifacts.py), and
    the project files carried in the application's args (rankgate/core/project_files.py); the
    Feast registry is read from the store by Feast itself.
    """

    settings: Settings
    home: Home
    project: Project
    redis_url: str
    feast: FeatureStore
    """As replicas use it (serving Redis options, no offline store)."""
    files: dict[str, Path]
    """The tables the serving path reads, by role (features.store.serving_files)."""
    store: ArtifactStore | None

    @classmethod
    def open(cls, carried: Mapping[str, str] | None = None) -> ServingSources:
        settings = get_settings()
        store = ArtifactStore(settings.store) if settings.store else None
        if store is None:
            home = Home.from_settings(settings)
            if not (home.feast_dir / "registry.db").exists():
                raise RankgateError(f"{home.root} is not set up: run `rankgate setup` first", 503)
        else:
            home = store.cache_home(settings.cache)
            store.fetch_home(home)
            if not store.has_registry():
                raise StoreError(f"{store.uri}: no Feast registry; run `rankgate publish`")
        project = (
            load_project(materialize(carried, home.root / "project", "args.project"))
            if carried
            else get_project(settings)
        )
        url = resolve_redis_url(settings)
        feast = feature_store(settings, url, serving=True, project=project, home=home)
        files = (
            store.fetch_files(home)
            if store is not None
            else serving_files(project, feast.list_feature_views(), home.data_dir)
        )
        return cls(settings, home, project, url, feast, files, store)


@dataclass
class Runtime:
    settings: Settings
    home: Home
    project: Project
    redis_url: str
    redis: aioredis.Redis
    fetcher: FeatureFetcher
    policies: PolicySet
    fallback: RuleFallback
    models: ModelStore
    templates: ReasonTemplates
    metrics: ServingMetrics
    drift: DriftMonitor
    """One per replica: its windows outlive reconfigures that keep their version."""
    audit: AuditWriter
    worker: ExplanationWorker = field(default_factory=ExplanationWorker)
    """Computes sampled explanations; one per replica, whatever the config."""
    explanation_observers: list[ExplanationObserver] = field(default_factory=list)
    """Handed to every pipeline built here: registered once, they survive reconfigures."""
    sources: ServingSources | None = None
    """Where it read what it serves (the home, or the artifact store's cache)."""

    @classmethod
    def open(cls, carried: Mapping[str, str] | None = None) -> Runtime:
        """`carried`: the project's files carried in the application's args (a cluster)."""
        sources = ServingSources.open(carried)
        settings, home, project, url = (
            sources.settings,
            sources.home,
            sources.project,
            sources.redis_url,
        )
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=SERVING_SOCKET_TIMEOUT_S,
            socket_connect_timeout=SERVING_CONNECT_TIMEOUT_S,
        )
        fetcher = FeatureFetcher(sources.feast, project, home.data_dir, sources.files["catalogue"])
        policies = load_policy_set(project.policies, fetcher.catalogue, project.item_type)
        metrics = ServingMetrics()
        return cls(
            settings=settings,
            home=home,
            project=project,
            redis_url=url,
            redis=client,
            fetcher=fetcher,
            policies=policies,
            fallback=RuleFallback(policies.fallback, project, sources.files.get("interactions")),
            models=ModelStore(home),
            templates=load_reason_templates(project.policies / "reasons.yaml"),
            metrics=metrics,
            drift=DriftMonitor(metrics),
            audit=AuditWriter(client, home.namespace, AuditConfig().max_records),
            sources=sources,
        )

    def fetch_versions(self, models: ModelStore, versions: Iterable[str]) -> None:
        """On a cluster: `versions` into this node's cache (`models`), each file checked
        against its manifest (a version the store lacks stays unknown)."""
        if self.sources is not None and self.sources.store is not None:
            self.sources.store.fetch_versions(models, versions)

    @property
    def policy(self) -> Policy:
        return self.policies.policy

    def load_policies(self, config: PolicyConfig) -> tuple[PolicySet, RuleFallback]:
        """The policy files the config names or carries; ConfigError (file and field) if
        they are bad or differ from the revision that was checked."""
        folder = config.folder or self.project.policies
        if config.files is not None:
            folder = materialize(config.files, self.home.root / "policies", "policy.files")
        policies = load_policy_set(folder, self.fetcher.catalogue, self.project.item_type)
        if config.revision is not None and config.revision != policies.digest:
            raise ConfigError(
                f"{policies.folder}: the policy files changed after they were checked "
                f"(digest {policies.digest}, deployed revision {config.revision}); "
                "run `rankgate policy deploy` again"
            )
        if policies.digest == self.policies.digest:
            return self.policies, self.fallback
        log = self.sources.files.get("interactions") if self.sources else None
        return policies, RuleFallback(policies.fallback, self.project, log)

    def use_policies(self, policies: PolicySet, fallback: RuleFallback) -> None:
        self.policies, self.fallback = policies, fallback

    def load_models(self, config: ServingConfig) -> tuple[ModelSet, dict[str, Explainer]]:
        """ONNX sessions and SHAP explainers of the configured versions.

        A version that fails to load, or whose explainer does, is logged and kept
        out; requests that would use it degrade and say why.
        """
        models = ModelSet(ModelStore(self.home, config.models.name), config.routing.all_versions)
        for version, error in models.errors.items():
            logger.warning("model %s unavailable: %s", version, error)
        explainers = {}
        for version, model in models.loaded.items():
            try:
                explainers[version] = Explainer(
                    self.models.path(version), model.manifest, model.specs, self.templates
                )
            except Exception as exc:  # noqa: BLE001 - explanations degrade, scoring goes on
                logger.warning("explainer for %s unavailable: %s", version, exc)
        return models, explainers

    def watch_drift(self, config: ServingConfig, models: ModelSet) -> None:
        """Drift windows for the loaded versions, with the reference each was registered
        with (a version without one is counted, not compared)."""
        store, versions = ModelStore(self.home, config.models.name), {}
        for version, model in models.loaded.items():
            try:
                reference = DriftReference.load(store.path(version))
            except ModelStoreError as exc:
                logger.warning("drift reference of %s unusable: %s", version, exc)
                reference = None
            versions[version] = VersionInputs(
                [s.name for s in model.specs], [s.group for s in model.specs], reference
            )
        self.drift.use(config.drift, versions)

    def pipeline(
        self,
        config: ServingConfig,
        models: ModelSet,
        explainers: dict[str, Explainer],
        score: ScoreFn,
        rolled_back: set[str] | None = None,
        policies: tuple[PolicySet, RuleFallback] | None = None,
    ) -> RankPipeline:
        """A pipeline for `config`; `policies` (from load_policies) default to the current ones."""
        policy_set, fallback = policies or (self.policies, self.fallback)
        self.audit.max_records = config.audit.max_records
        # Decisions are indexed only for a project whose outcomes can join them.
        self.audit.decision_ttl_s = (
            config.events.decision_ttl_s if project_outcomes(self.project) else None
        )
        services = Services(
            config=config,
            gate=ConsentGate(policy_set.policy),
            consent=AsyncConsentStore(self.redis, self.home.namespace),
            fetcher=self.fetcher,
            models=models,
            router=Router(config.routing, rolled_back or set()),
            score=score,
            explainers=explainers,
            fallback=fallback,
            metrics=self.metrics,
            drift=self.drift,
        )
        return RankPipeline(
            services,
            ExperimentLog(self.redis, self.home.namespace),
            audit=self.audit,
            worker=self.worker,
            explanation_observers=self.explanation_observers,
        )
