"""Builds the Ray Serve application: the graph of deployments, nothing else.

    serve run serve_config.yaml        (import_path: serving.app:build_app)

`RankIngress` (serving/http/ingress.py) is the HTTP entry. By default it runs every
stage in-process (no hop between deployments; the ranker batches concurrent
requests of the replica with `@serve.batch`). With the application argument
`ranker_placement: deployment`, scoring goes to a separate `RankerDeployment` that
batches across all ingress replicas. The `EventConsumer` (serving/events/consumer.py)
is deployed with the ingress. Every replica holds a `ReplicaRuntime`
(serving/runtime.py).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from model_store.store import ModelStore
from rankgate.core.config_files import validation_message
from rankgate.core.errors import ConfigError
from serving.contract.config import BatchingConfig, ModelsConfig
from serving.events.consumer import EventConsumer
from serving.http.ingress import RankIngress
from serving.ranking.ranker import ModelSet, Ranker
from serving.runtime import BatchedScoring, ReplicaRuntime

__all__ = ["AppArgs", "RankIngress", "RankerDeployment", "build_app"]


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

    def __init__(self, carried: dict[str, str] | None = None) -> None:
        # On a cluster: the node's cache of the artifact store.
        self.runtime = ReplicaRuntime.open(carried)
        self.ranker = Ranker(ModelSet(ModelStore(self.runtime.home), []))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        try:
            config = RankerConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ConfigError(validation_message("RankerDeployment user_config", exc)) from exc
        models = ModelStore(self.runtime.home, config.models.name)
        self.runtime.fetch_versions(models, config.versions)
        self.ranker = Ranker(ModelSet(models, config.versions))
        self.tune_batching(config.batching)

    def scoring_ranker(self) -> Ranker:
        return self.ranker


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
    placed_apart = parsed.ranker_placement == "deployment"
    ranker = RankerDeployment.bind(parsed.project) if placed_apart else None  # type: ignore[attr-defined]
    consumer = EventConsumer.bind(parsed.project)  # type: ignore[attr-defined]
    return RankIngress.bind(ranker, consumer, parsed.project)  # type: ignore[attr-defined]
