"""The replica runtime: what one serving replica holds, opened once and configured
per deployed serving config.

    runtime = ReplicaRuntime.open(carried)       heavy, once: where the replica reads
                                                 (the home, or the node's cache of the
                                                 artifact store), the project, Feast, Redis
    await runtime.configure(user_config, score)  validate, load (policies, models,
                                                 explainers), warm up, swap
    await runtime.close()                        write what is queued, stop background work

What a configure builds is one `Serving`, swapped in one assignment: a request sees
the old one or the new one, never a mix; a bad config raises `ConfigError` (file
and field) and changes nothing. The ingress (serving/http/ingress.py) runs all three;
the ranker deployment (serving/app.py) opens it for the model store; the event
consumer (serving/events/consumer.py) for the project, Feast and Redis. What only
the ingress needs (the feature fetcher and its item table, policy, fallback, metrics,
drift windows, the decision recorder, the notifier) is opened on first use.

`BatchedScoring` is the `@serve.batch` around the ranker that the ingress and the
ranker deployment share.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from feast import FeatureStore
from pydantic import ValidationError
from ray import serve

from features.applied import of_feast
from features.store import feature_store
from features.tables import serving_files
from features.vector import ItemTable
from model_store.artifacts import ArtifactStore, StoreError
from model_store.embeddings import ItemEmbeddings
from model_store.reference import DriftReference
from model_store.store import ModelStore
from rankgate.core import redis_calls
from rankgate.core.config_files import validation_message
from rankgate.core.errors import ConfigError, ModelStoreError, RankgateError
from rankgate.core.home import Home
from rankgate.core.project import Project, load_project
from rankgate.core.project_files import materialize
from rankgate.core.redis_server import (
    SERVING_CONNECT_TIMEOUT_S,
    SERVING_SOCKET_TIMEOUT_S,
    connect_async,
    resolve_redis_url,
)
from rankgate.core.settings import Settings, get_project, get_settings
from rankgate.governance.consent import AsyncConsentStore
from rankgate.governance.policy import Policy, PolicySet, load_policy_set
from rankgate.governance.residency import permitted_versions
from serving.contract.config import (
    AuditConfig,
    BatchingConfig,
    PolicyConfig,
    RetentionJobConfig,
    ServingConfig,
)
from serving.observe.audit import AuditWriter
from serving.observe.canary import CanaryWatch
from serving.observe.decisions import DecisionRecorder
from serving.observe.drift import DriftMonitor, VersionInputs
from serving.observe.metrics import ServingMetrics
from serving.observe.notifier import Notifier, resolve_webhooks
from serving.observe.outcomes import project_outcomes
from serving.observe.retention import RetentionJob
from serving.observe.routing_log import RoutingLog
from serving.ranking.explainer import Explainer, ReasonTemplates, load_reason_templates
from serving.ranking.fallback import RuleFallback
from serving.ranking.feature_fetch import FeatureFetcher
from serving.ranking.gate import ConsentGate
from serving.ranking.pipeline import RankPipeline
from serving.ranking.ranker import ModelSet, Ranker
from serving.ranking.retrieval import ItemIndex
from serving.ranking.routing import Router
from serving.ranking.shadows import ShadowScorer
from serving.ranking.stages import STAGES, ScoreFn, Services

logger = logging.getLogger("ray.serve")
RETENTION_SOCKET_TIMEOUT_S = 10.0
"""The retention job's calls are short (bounded batches); a stalled server fails them."""


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


def residency_of(policy: Policy, models: ModelSet) -> dict[str, frozenset[str]]:
    """Per serving region with a residency rule, the routed versions it accepts. A
    version that did not load is let through: it never scores (its requests degrade as
    model_unavailable, saying why), so nothing it learned reaches an answer."""
    unloaded = frozenset(models.errors)
    return {
        region: accepted | unloaded
        for region, accepted in permitted_versions(policy.residency, models.origins).items()
    }


@dataclass(frozen=True)
class Serving:
    """What one serving config built; `configure` swaps it whole."""

    pipeline: RankPipeline
    ranker: Ranker

    @property
    def config(self) -> ServingConfig:
        return self.pipeline.services.config


class ReplicaRuntime:
    """What one replica holds (see the module for its lifecycle)."""

    def __init__(
        self,
        settings: Settings,
        home: Home,
        project: Project,
        redis_url: str,
        feast: FeatureStore,
        files: dict[str, Path],
        store: ArtifactStore | None,
    ) -> None:
        self.settings = settings
        self.home = home
        """The home, or on a cluster the node's cache of the artifact store."""
        self.project = project
        self.redis_url = redis_url
        self.feast = feast
        """As replicas use it (serving Redis options, no offline store)."""
        self.files = files
        """The tables the serving path reads, by role (features.tables.serving_files)."""
        self.store = store
        self.redis = connect_async(
            redis_url,
            socket_timeout=SERVING_SOCKET_TIMEOUT_S,
            socket_connect_timeout=SERVING_CONNECT_TIMEOUT_S,
        )
        self.serving: Serving | None = None
        """The current serving config's pipeline and ranker (None until configured)."""
        self._policies: tuple[PolicySet, RuleFallback] | None = None
        self._indexes: dict[tuple[str, str], ItemIndex] = {}
        """Item indexes by (version, retrieval config): a reconfigure keeps them."""

    @classmethod
    def open(cls, carried: Mapping[str, str] | None = None) -> ReplicaRuntime:
        """`carried`: the project's files carried in the application's args (a cluster)."""
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
            else serving_files(project, of_feast(feast.list_feature_views()), home.data_dir)
        )
        return cls(settings, home, project, url, feast, files, store)

    # -- opened on first use (the ingress) -----------------------------------------

    @cached_property
    def fetcher(self) -> FeatureFetcher:
        return FeatureFetcher(self.feast, self.project, self.home.data_dir, self.files["catalogue"])

    @cached_property
    def metrics(self) -> ServingMetrics:
        return ServingMetrics()

    @cached_property
    def drift(self) -> DriftMonitor:
        """One per replica: its windows outlive reconfigures that keep their version."""
        return DriftMonitor(self.metrics)

    @cached_property
    def notifier(self) -> Notifier:
        """One per replica: delivers the outbox to the config's webhooks while this
        replica holds the notifier's lease (serving/observe/notifier.py)."""
        return Notifier(self.redis, self.home.namespace, self.metrics)

    @cached_property
    def recorder(self) -> DecisionRecorder:
        """One per replica, whatever the config: its worker computes sampled explanations."""
        audit = AuditWriter(self.redis, self.home.namespace, AuditConfig().max_records)
        return DecisionRecorder(audit, self.metrics)

    @cached_property
    def retention(self) -> RetentionJob:
        """One per replica; the one holding the lease runs each round. Its own client:
        serving's calls never wait for a connection the job holds."""
        client = connect_async(
            self.redis_url,
            socket_timeout=RETENTION_SOCKET_TIMEOUT_S,
            socket_connect_timeout=SERVING_CONNECT_TIMEOUT_S,
        )
        return RetentionJob(client, self.home.namespace, self.metrics)

    def retention_config(self) -> RetentionJobConfig:
        return self.serving.config.retention if self.serving is not None else RetentionJobConfig()

    @cached_property
    def templates(self) -> ReasonTemplates:
        return load_reason_templates(self.project.policies / "reasons.yaml")

    @property
    def policies(self) -> PolicySet:
        return self._current_policies()[0]

    @property
    def policy(self) -> Policy:
        return self.policies.policy

    def _current_policies(self) -> tuple[PolicySet, RuleFallback]:
        if self._policies is None:
            policies = load_policy_set(
                self.project.policies, self.fetcher.catalogue, self.project.item_type
            )
            fallback = RuleFallback(policies.fallback, self.project, self.files.get("interactions"))
            self._policies = (policies, fallback)
        return self._policies

    # -- configure ------------------------------------------------------------------

    async def configure(self, user_config: dict[str, Any], score: ScoreFn) -> Serving:
        """Validate, load, warm up and swap; ConfigError (or StoreError) and nothing
        changed when the config is bad or a routed version does not load now while it
        did in the running config."""
        config = parse_config(user_config)
        versions = self.model_store(config)
        # On a cluster the routed versions come from the artifact store first.
        self.fetch_versions(versions, config.routing.all_versions)
        check_versions(config, versions)
        policies = self.load_policies(config.policy)
        webhooks = resolve_webhooks(config.notifications)
        models, explainers = self.load_models(config)
        broken = self.newly_broken(models)
        if broken:
            # A version that does not load (corrupt, missing files) is never promoted
            # into a running service: the running config keeps serving.
            raise ConfigError(
                f"serve_config.yaml user_config: field 'routing.versions': model version "
                f"{broken[0]!r} does not load ({models.errors[broken[0]]})"
            )
        pipeline = self.build_pipeline(config, models, explainers, score, policies=policies)
        await pipeline.warm_up()
        # Swap only when everything above succeeded: a bad config changes nothing.
        self._policies = policies
        self.serving = Serving(pipeline, Ranker(models))
        self.watch_drift(config, models)
        self.drift.keep_fresh(self.redis, self.home.namespace)
        await self.notifier.use(config.notifications, webhooks)
        # Each round reads the policy and config current then (a redeploy applies to
        # the next round; a refused one leaves the running policy's rules in force).
        self.retention.keep_running(lambda: self.policy.retention, self.retention_config)
        pipeline.canary.publish_weight()
        # What the replica holds now (Ray, Feast, models, the item table) lives until
        # the next reconfigure: out of the collector's sight, a full collection scans
        # only what requests allocate (no multi-millisecond pauses in the tail). What
        # the previous config held is collected first, never frozen for good.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return self.serving

    def model_store(self, config: ServingConfig) -> ModelStore:
        return ModelStore(self.home, config.models.name)

    def fetch_versions(self, models: ModelStore, versions: Iterable[str]) -> None:
        """On a cluster: `versions` into this node's cache (`models`), each file checked
        against its manifest (a version the store lacks stays unknown)."""
        if self.store is not None:
            self.store.fetch_versions(models, versions)

    def newly_broken(self, models: ModelSet) -> list[str]:
        """Versions that fail to load now but did not in the running config.

        At start-up there is nothing to keep serving, so such versions are only
        marked unavailable (their requests degrade and say so)."""
        if self.serving is None:
            return []
        running = self.serving.pipeline.services.models
        return sorted(v for v in models.errors if v not in running.errors)

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
        current = self._current_policies()
        if policies.digest == current[0].digest:
            return current
        return policies, RuleFallback(
            policies.fallback, self.project, self.files.get("interactions")
        )

    def load_models(self, config: ServingConfig) -> tuple[ModelSet, dict[str, Explainer]]:
        """ONNX sessions and SHAP explainers of the configured versions.

        A version that fails to load, or whose explainer does, is logged and kept
        out; requests that would use it degrade and say why.
        """
        store = self.model_store(config)
        models = ModelSet(store, config.routing.all_versions)
        for version, error in models.errors.items():
            logger.warning("model %s unavailable: %s", version, error)
        explainers = {}
        for version, model in models.loaded.items():
            try:
                explainers[version] = Explainer(
                    store.path(version), model.manifest, model.specs, self.templates
                )
            except Exception as exc:  # noqa: BLE001 - explanations degrade, scoring goes on
                logger.warning("explainer for %s unavailable: %s", version, exc)
        return models, explainers

    def watch_drift(self, config: ServingConfig, models: ModelSet) -> None:
        """Drift windows for the loaded versions, with the reference each was registered
        with (a version without one is counted, not compared)."""
        store, versions = self.model_store(config), {}
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

    def build_pipeline(
        self,
        config: ServingConfig,
        models: ModelSet,
        explainers: dict[str, Explainer],
        score: ScoreFn,
        rolled_back: set[str] | None = None,
        policies: tuple[PolicySet, RuleFallback] | None = None,
    ) -> RankPipeline:
        """A pipeline for `config`; `policies` (from load_policies) default to the current ones."""
        policy_set, fallback = policies or self._current_policies()
        audit = self.recorder.audit
        audit.max_records = config.audit.max_records
        # Decisions are indexed only for a project whose outcomes can join them.
        audit.decision_ttl_s = (
            config.events.decision_ttl_s if project_outcomes(self.project) else None
        )
        router = Router(
            config.routing, rolled_back or set(), residency_of(policy_set.policy, models)
        )
        indexes = self.item_indexes(config, models)
        log = RoutingLog(self.redis, self.home.namespace)
        services = Services(
            config=config,
            gate=ConsentGate(policy_set.policy),
            consent=AsyncConsentStore(self.redis, self.home.namespace),
            fetcher=self.fetcher,
            models=models,
            router=router,
            score=score,
            explainers=explainers,
            fallback=fallback,
            metrics=self.metrics,
            drift=self.drift,
            retrieval=indexes,
        )
        return RankPipeline(
            services,
            CanaryWatch(router, log, self.metrics),
            ShadowScorer(models, self.fetcher, log, self.metrics, self.drift),
            self.recorder,
        )

    def item_indexes(self, config: ServingConfig, models: ModelSet) -> dict[str, ItemIndex]:
        """The item index of each loaded version with a retrieval artifact, holding the
        current item table (built once per version and retrieval config). A version
        without one, or whose index fails, is logged: its requests without candidates
        over a large catalogue degrade and say so."""
        settings = config.retrieval.model_dump_json()
        store, fetcher = self.model_store(config), self.fetcher
        indexes: dict[str, ItemIndex] = {}
        for version, model in models.loaded.items():
            key = (version, settings)
            index = self._indexes.get(key)
            if index is None:
                try:
                    embeddings = ItemEmbeddings.load(store.path(version))
                    if embeddings is None:
                        continue
                    index = ItemIndex(embeddings, model.specs, model.scorer.score)
                    index.follow(fetcher.items)
                except Exception as exc:  # noqa: BLE001 - retrieval degrades, named
                    logger.warning("item index of %s unavailable: %s", version, exc)
                    continue
                self._indexes[key] = index
            indexes[version] = index
        # Indexes of versions (or retrieval settings) no longer configured go with the
        # config that had them.
        self._indexes = {
            key: index
            for key, index in self._indexes.items()
            if key[1] == settings and key[0] in models.loaded
        }
        if self._follow_items not in fetcher.item_listeners:
            fetcher.item_listeners.append(self._follow_items)
        return indexes

    async def _follow_items(self, items: ItemTable) -> Callable[[], None]:
        """A re-read item table: each index's changes computed off the event loop; the
        returned `apply` adds and removes them and lets requests name the new
        catalogue's items (run with the table's swap)."""
        changes = [
            (version, index, await asyncio.to_thread(index.changes, items))
            for (version, _), index in list(self._indexes.items())
        ]

        def apply() -> None:
            for version, index, change in changes:
                added, removed = index.apply(*change)
                if added or removed:
                    logger.info("item index of %s: %d added, %d removed", version, added, removed)
            if self.serving is not None:
                self.serving.pipeline.follow_catalogue()

        return apply

    # -- close ------------------------------------------------------------------------

    async def close(self) -> None:
        """Write the queued records, stop the drift refresher, the notifier and the
        retention job, close Redis."""
        if "recorder" in self.__dict__:
            await self.recorder.audit.close()
        if "notifier" in self.__dict__:
            await self.notifier.close()
        if "drift" in self.__dict__ and self.drift.refresher is not None:
            self.drift.refresher.cancel()
        if "retention" in self.__dict__:
            await self.retention.close()
            with contextlib.suppress(Exception):
                await self.retention.client.aclose()
        if self.serving is not None:
            for task in list(self.serving.pipeline.canary.background):
                task.cancel()
        with contextlib.suppress(Exception):
            await redis_calls.close(self.redis)
            await self.redis.aclose()


# Until the deployed config's `batching` is applied.
DEFAULT_BATCHING = BatchingConfig()


class BatchedScoring:
    """Mixin of a Serve deployment: `@serve.batch` around Ranker.score_batch, tunable
    from config."""

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
