"""The Kubernetes tree (deploy/k8s), validated offline: no cluster and no kubectl run here.

The kustomization is rendered the way kustomize would for what it uses (resources, the namespace, the
ConfigMap generated from haproxy.cfg), every object is checked against Kubernetes' own OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), and the objects are checked against each other and
against the proxy configuration they run (one source: sortformer_triton/proxy.py via deploy/render.py).
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import kubernetes_validate
import pytest
import yaml

from deploy import render
from sortformer_triton import proxy

K8S = render.ROOT / "k8s"
KUBERNETES_VERSION = "1.33.0"  # a release every current managed offering runs


def _render() -> List[Dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects: List[Dict[str, Any]] = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (K8S / f).read_text() for f in generator["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for obj in objects:
        if obj["kind"] != "Namespace":
            obj["metadata"].setdefault("namespace", kustomization["namespace"])
    return objects


@pytest.fixture(scope="module")
def objects() -> List[Dict[str, Any]]:
    return _render()


def _one(objects: List[Dict[str, Any]], kind: str, name: str) -> Dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def test_every_object_validates_against_the_kubernetes_schemas(objects) -> None:
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget",
                     "Service", "Service", "StatefulSet"]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("breakage", ["misspelled field", "wrong type", "missing required"])
def test_the_validator_rejects_broken_manifests(objects, breakage: str) -> None:
    statefulset = copy.deepcopy(_one(objects, "StatefulSet", "triton"))
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    if breakage == "misspelled field":
        container["readinesProbe"] = container.pop("readinessProbe")
    elif breakage == "wrong type":
        statefulset["spec"]["replicas"] = "two"
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSION, strict=True)


def test_services_select_the_pods_and_name_the_ports_the_proxy_discovers(objects) -> None:
    statefulset = _one(objects, "StatefulSet", "triton")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    headless = _one(objects, "Service", render.K8S_SERVICE)
    assert statefulset["spec"]["serviceName"] == render.K8S_SERVICE
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    assert headless["metadata"]["namespace"] == render.K8S_NAMESPACE
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    discovery = proxy.Discovery("x")
    assert {p["name"] for p in headless["spec"]["ports"]} == {discovery.http_port_name, discovery.grpc_port_name, "metrics"}
    container_ports = {p["name"]: p["containerPort"] for p in statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert container_ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    deployment = _one(objects, "Deployment", "proxy")
    front = _one(objects, "Service", "sortformer")
    assert front["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    proxy_ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert proxy_ports == {"http": render.PROXY_HTTP_PORT, "grpc": render.PROXY_GRPC_PORT, "stats": render.PROXY_STATS_PORT}
    assert {p["targetPort"] for p in front["spec"]["ports"]} == {"http", "grpc"}


def test_replicas_probe_readiness_and_run_the_safe_flags(objects) -> None:
    pod = _one(objects, "StatefulSet", "triton")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert container["command"][:4] == ["python3", "/opt/sortformer/sortformer_triton/server_flags.py", "--", "tritonserver"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": proxy.HEALTH_PATH, "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    exit_timeout = int(next(a for a in container["command"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > exit_timeout
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] and mounts["code"]["readOnly"]
    init = pod["spec"]["initContainers"][0]
    assert "docker/export_once.py --out /models" in init["command"][-1]


def test_autoscaler_targets_the_replicas_within_the_proxys_slots(objects) -> None:
    hpa = _one(objects, "HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "triton"}
    assert hpa["spec"]["maxReplicas"] <= render.K8S_MAX_REPLICAS
    assert hpa["spec"]["minReplicas"] >= _one(objects, "PodDisruptionBudget", "triton")["spec"]["maxUnavailable"] + 1
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    assert any(rule["name"]["as"] == metric for rule in rules)
    # slow scale-down: a removed replica ends its live streams
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600


def test_the_proxy_config_is_the_generated_one_and_haproxy_accepts_it(objects, tmp_path: Path) -> None:
    config = _one(objects, "ConfigMap", "haproxy")["data"]["haproxy.cfg"]
    assert config == render.rendered()[render.K8S_CFG], "deploy/k8s/haproxy.cfg is stale: python -m deploy.render"
    service = f"{render.K8S_SERVICE}.{render.K8S_NAMESPACE}.svc.cluster.local"
    templates = re.findall(r"server-template replica (\d+) _(\w+)\._tcp\.(\S+)", config)
    assert {(int(n), port, host) for n, port, host in templates} == {
        (render.K8S_MAX_REPLICAS, "grpc", service), (render.K8S_MAX_REPLICAS, "http", service)}
    assert f"stick on req.hdr({proxy.SEQUENCE_HEADER})" in config
    mount = _one(objects, "Deployment", "proxy")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert mount["mountPath"] == "/usr/local/etc/haproxy"  # where the haproxy image reads haproxy.cfg
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    check = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rendered_files_are_current() -> None:
    assert render.main(["--check"]) == 0
