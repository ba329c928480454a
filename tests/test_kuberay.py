"""deploy/kuberay/rayservice.yaml is a RayService KubeRay accepts, and what it serves is
a config Ray Serve and rankgate accept.

- The manifest validates against the `openAPIV3Schema` of KubeRay v1.7.0's RayService
  CRD (the version it serves, v1), as the API server would check it on `kubectl
  apply`; a mutated manifest fails, so the check bites.
- Its `serveConfigV2` parses as Ray's own `ServeDeploySchema`, its RankIngress
  `user_config` as rankgate's `ServingConfig`, and it keeps every setting
  serve_config.yaml has there.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serving.launch import SERVE_CONFIG

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository


MANIFEST = PROJECT_ROOT / "deploy" / "kuberay" / "rayservice.yaml"
CRD_NAME = "ray.io_rayservices.yaml"
# tests/data/kuberay/README.md says where the CRD comes from.
CRD_PLACES = tuple(
    Path(place)
    for place in (
        os.environ.get("RANKGATE_KUBERAY_CRD", ""),
        Path(__file__).parent / "data" / "kuberay" / CRD_NAME,
        PROJECT_ROOT.parent / "shared" / "kuberay" / CRD_NAME,
    )
    if place
)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    found = [place for place in CRD_PLACES if place.is_file()]
    if not found:  # fetched data may not be committed (tests/data/kuberay/README.md)
        pytest.skip(f"KubeRay's RayService CRD is in none of {[str(p) for p in CRD_PLACES]}")
    crd = yaml.safe_load(found[0].read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return served["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())  # type: ignore[no-any-return]


def errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])  # type: ignore[no-any-return]


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)  # type: ignore[no-any-return]


def test_the_manifest_validates_against_the_crd(
    schema: dict[str, Any], manifest: dict[str, Any]
) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert errors(schema, manifest) == []


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "two"),
        (("spec", "serveConfigV2"), {"applications": []}),
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"), 0),
        (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers"), None),
    ],
)
def test_a_wrong_field_type_fails(
    schema: dict[str, Any], manifest: dict[str, Any], where: tuple[Any, ...], value: Any
) -> None:
    mutated = copy.deepcopy(manifest)
    holder = mutated
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = value
    assert errors(schema, mutated), where


def test_a_missing_required_field_fails(schema: dict[str, Any], manifest: dict[str, Any]) -> None:
    mutated = copy.deepcopy(manifest)
    del mutated["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]["name"]
    assert errors(schema, mutated)


def test_serve_config_is_ray_serve_s_and_rankgate_s(manifest: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.config import ServingConfig

    config = serve_config(manifest)
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.proxy_location.value == "EveryNode"
    assert (parsed.http_options.host, parsed.http_options.port) == ("0.0.0.0", 8000)
    ingress = deployment(config, "RankIngress")
    assert ingress["num_replicas"] == 2
    cpus = [
        d["ray_actor_options"]["num_cpus"]
        for d in config["applications"][0]["deployments"]
        if "ray_actor_options" in d
    ]
    assert cpus and all(0 < c < 1 for c in cpus), cpus
    ServingConfig.model_validate(ingress["user_config"])


def test_serve_config_keeps_serve_config_yaml_s_settings(manifest: dict[str, Any]) -> None:
    """Whatever serve_config.yaml sets for RankIngress's user_config and the other
    deployments is the same in the cluster (the cluster's config may add to it)."""
    ours = yaml.safe_load(SERVE_CONFIG.read_text())
    cluster = serve_config(manifest)
    for name in ("RankIngress", "EventConsumer"):
        mine, theirs = deployment(ours, name), deployment(cluster, name)
        for key, value in mine.get("user_config", {}).items():
            assert theirs["user_config"].get(key) == value, (name, key)
    assert cluster["applications"][0]["import_path"] == ours["applications"][0]["import_path"]


def test_secrets_and_the_store_come_from_the_environment(manifest: dict[str, Any]) -> None:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for secret in ("REDIS_URL", "RANKGATE_USER_KEY_SECRET"):
            assert "secretKeyRef" in env[secret]["valueFrom"], secret
        assert env["RANKGATE_STORE"]["value"].startswith(("s3://", "gs://"))
        assert {"RANKGATE_CACHE", "RANKGATE_PROJECT"} <= env.keys()
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["metrics"] == 8080
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert requests["memory"] and limits["memory"]


def test_serve_config_is_what_rankgate_cluster_config_renders(manifest: dict[str, Any]) -> None:
    """No hand-edited copy: serveConfigV2 is the rendered, self-contained config of the
    example (project and policy files inside it, the store's URI in its environment)."""
    from rankgate.settings import get_project
    from serving.cluster import cluster_config
    from serving.launch import project_serve_config

    embedded = serve_config(manifest)
    store = embedded["applications"][0]["runtime_env"]["env_vars"]["RANKGATE_STORE"]
    project = get_project()
    rendered = cluster_config(
        project, store, project_serve_config(project), replicas=2, max_per_node=1
    )
    assert embedded == rendered
