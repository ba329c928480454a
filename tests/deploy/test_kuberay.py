"""deploy/kuberay/rayservice.yaml is a RayService whose pods Kubernetes accepts, and
what it serves is a config Ray Serve and rankgate accept.

- Every pod template (head and worker groups) validates strictly (no unknown field)
  against Kubernetes' own OpenAPI schemas, as the API server would check a PodTemplate
  (`kubernetes-validate`, which ships them); a mutated manifest fails, so the check
  bites. KubeRay's RayService CRD itself is published only in KubeRay's repository,
  which neither this repository nor CI may carry (deploy/kuberay/README.md).
- Its `serveConfigV2` parses as Ray's own `ServeDeploySchema`, its RankIngress
  `user_config` as rankgate's `ServingConfig`, it keeps every setting serve_config.yaml
  has there, and it is exactly what `rankgate cluster config` renders.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving.ops.launch import SERVE_CONFIG
from tests import REPO

MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
KUBERNETES = "1.33.0"
"""The Kubernetes version whose schemas the pods are checked against (KubeRay v1.7.0
supports 1.27 and later)."""


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())  # type: ignore[no-any-return]


def groups(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def pod_errors(manifest: dict[str, Any]) -> list[str]:
    """What Kubernetes' schema refuses in the manifest's pod templates."""
    found = []
    for group in groups(manifest):
        document = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": group.get("groupName", "head")},
            "template": group["template"],
        }
        try:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{document['metadata']['name']}: {exc.message}")
    return found


def serve_config(manifest: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])  # type: ignore[no-any-return]


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)  # type: ignore[no-any-return]


def test_the_pods_validate_against_kubernetes_schemas(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert len(groups(manifest)) >= 2
    assert pod_errors(manifest) == []


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("template", "spec", "containers", 0, "resources", "limits"), "3Gi"),
        (("template", "spec", "containers", 0, "ports", 0, "containerPort"), "serve"),
        (("template", "spec", "containers", 0, "env", 0, "valueFrom", "secretKeyRef"), "url"),
        (("template", "spec", "containers", 0, "imagePullPolice"), "Always"),  # unknown field
    ],
)
def test_a_wrong_pod_field_fails(
    manifest: dict[str, Any], where: tuple[Any, ...], value: Any
) -> None:
    mutated = copy.deepcopy(manifest)
    holder = groups(mutated)[-1]
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = value
    assert pod_errors(mutated), where


def test_a_missing_required_field_fails(manifest: dict[str, Any]) -> None:
    mutated = copy.deepcopy(manifest)
    del groups(mutated)[-1]["template"]["spec"]["containers"][0]["name"]
    assert pod_errors(mutated)


def test_serve_config_is_ray_serve_s_and_rankgate_s(manifest: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.contract.config import ServingConfig

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
    from rankgate.core.settings import get_project
    from serving.ops.cluster import cluster_config
    from serving.ops.launch import project_serve_config

    embedded = serve_config(manifest)
    store = embedded["applications"][0]["runtime_env"]["env_vars"]["RANKGATE_STORE"]
    project = get_project()
    rendered = cluster_config(
        project, store, project_serve_config(project), replicas=2, max_per_node=1
    )
    assert embedded == rendered
