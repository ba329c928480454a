"""Baseline (b): the Ray Serve graph people build first.

One deployment per stage (ingress -> feature fetcher -> ranker), calls through
deployment handles, Ray Serve's default settings (proxy actor, default
`max_ongoing_requests`, no batching). The only change from the defaults is
`num_cpus: 0.5`, without which the third replica stays pending on 2 cores.

    serve run loadtests.baselines.naive_graph:app
"""

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from loadtests.baselines.common import key_of, open_parts, top_k

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Fetcher:
    def __init__(self) -> None:
        self.fetcher, self.model, self.fields = open_parts()

    async def __call__(self, key: str) -> dict[str, Any]:
        return (await self.fetcher.fetch_user(key, self.fields)).values


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Scorer:
    def __init__(self) -> None:
        self.fetcher, self.model, self.fields = open_parts()

    def __call__(self, values: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        return top_k(self.model, self.fetcher, values, body)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Ingress:
    def __init__(self, fetcher: DeploymentHandle, scorer: DeploymentHandle) -> None:
        self.fetcher = fetcher
        self.scorer = scorer

    @api.post("/v1/rank")
    async def rank(self, body: dict[str, Any]) -> dict[str, Any]:
        values = await self.fetcher.remote(key_of(body))
        return await self.scorer.remote(values, body)


app = Ingress.bind(Fetcher.bind(), Scorer.bind())  # type: ignore[attr-defined]
