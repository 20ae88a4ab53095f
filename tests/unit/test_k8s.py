"""The kustomize base and overlays in ``k8s/`` render, validate, and reference each other consistently.

Each target is rendered with ``kubectl kustomize`` (kustomize built into kubectl). Core resources are
validated with ``kubernetes-validate`` in strict mode (unknown fields fail) against the schemas of
``K8S_VERSION``; the ServiceMonitor, a prometheus-operator CRD that those schemas do not know, is validated
against the schema vendored in ``k8s/schemas/``. The cross-reference checks catch what schemas cannot:
a Service selecting no pods, a probe on an undeclared port, a ServiceMonitor scraping a missing port.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"
TARGETS = ("base", "overlays/cpu", "overlays/gpu")
# Kubernetes release whose API schemas the core resources are validated against; matches the kubectl/kustomize
# used to render, and is one that kubernetes-validate ships schemas for.
K8S_VERSION = "1.32.0"
EXPECTED_KINDS = {
    "ConfigMap",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "ServiceMonitor",
}
GPU_RESOURCE = "nvidia.com/gpu"


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl not found on PATH: install kubectl (tested with 1.32, built-in kustomize v5.5) to "
            "render k8s/ (see k8s/README.md); these tests render the manifests and are never skipped."
        )
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR / target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


@functools.cache
def _servicemonitor_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S_DIR / "schemas" / "servicemonitor_v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _one(docs: tuple[dict, ...], kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a ``matchLabels``-only label selector selects ``labels``."""
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here, got {selector}"
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


@pytest.mark.parametrize("target", TARGETS)
def test_renders_expected_kinds(target: str) -> None:
    docs = _render(target)
    assert sorted(doc["kind"] for doc in docs) == sorted(EXPECTED_KINDS)


@pytest.mark.parametrize("target", TARGETS)
def test_resources_match_schemas(target: str) -> None:
    for doc in _render(target):
        if doc["kind"] == "ServiceMonitor":
            _servicemonitor_validator().validate(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    """Both validators fail on a misspelt field, so the green runs above mean something."""
    deployment = json.loads(json.dumps(_one(_render("base"), "Deployment")))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    monitor = json.loads(json.dumps(_one(_render("base"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _servicemonitor_validator().validate(monitor)


@pytest.mark.parametrize("target", TARGETS)
def test_service_and_pdb_select_the_deployment_pods(target: str) -> None:
    docs = _render(target)
    deployment = _one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"], pod_labels)
    service_selector = _one(docs, "Service")["spec"]["selector"]
    assert service_selector and all(pod_labels.get(k) == v for k, v in service_selector.items())
    assert _selects(_one(docs, "PodDisruptionBudget")["spec"]["selector"], pod_labels)


@pytest.mark.parametrize("target", TARGETS)
def test_ports_and_probes_reference_declared_container_ports(target: str) -> None:
    docs = _render(target)
    (container,) = _containers(_one(docs, "Deployment"))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 3000, "grpc": 8001}
    expected_paths = {
        "livenessProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
        "startupProbe": "/v2/health/ready",
    }
    for probe, path in expected_paths.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert http_get["port"] == "http", probe

    service_ports = {port["name"]: port for port in _one(docs, "Service")["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc", "metrics"}
    for port in service_ports.values():
        assert port["targetPort"] in ports, f"Service port {port['name']} targets an undeclared port"
    assert service_ports["grpc"]["appProtocol"] == "grpc"
    assert (service_ports["metrics"]["port"], service_ports["metrics"]["targetPort"]) == (9090, "http")


@pytest.mark.parametrize("target", TARGETS)
def test_servicemonitor_scrapes_a_service_port(target: str) -> None:
    docs = _render(target)
    service = _one(docs, "Service")
    monitor = _one(docs, "ServiceMonitor")
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    service_port_names = {port["name"] for port in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_port_names
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_scales_the_deployment(target: str) -> None:
    docs = _render(target)
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    deployment = _one(docs, "Deployment")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kiln"}
    assert deployment["metadata"]["name"] == hpa["scaleTargetRef"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"] <= 10
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"


@pytest.mark.parametrize("target", TARGETS)
def test_env_comes_from_the_rendered_configmap(target: str) -> None:
    docs = _render(target)
    configmap = _one(docs, "ConfigMap")
    (container,) = _containers(_one(docs, "Deployment"))
    config_refs = [source["configMapRef"]["name"] for source in container["envFrom"]]
    assert config_refs == [configmap["metadata"]["name"]]
    assert configmap["metadata"]["name"].startswith("kiln-config")
    expected = {
        "KILN_HOME": "/var/lib/kiln",
        "KILN_MODELS": "vit-soft,vit-softmax,diffusion-digits,forecaster-goog-daily,forecaster-eurusd-hourly,"
        "embed-old,embed-new-oca,xbt-old,xbt-new-text",
        "KILN_BATCH_MAX_SIZE": "32",
        "KILN_BATCH_WINDOW_MS": "2",
        "KILN_MAX_REQUEST_BYTES": "8388608",
        "KILN_LOG_LEVEL": "INFO",
    }
    assert {key: configmap["data"][key] for key in expected} == expected


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_is_a_valid_server_configuration(target: str, monkeypatch) -> None:
    """Every key is a setting Kiln reads, and the server would start with these values."""
    from serving.config import ServeConfig

    data = _one(_render(target), "ConfigMap")["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    config = ServeConfig.from_env()  # raises ConfigError on a bad value (e.g. an unknown backend)
    read = {f"KILN_{field.upper()}" for field in ServeConfig.__dataclass_fields__} | {"KILN_HOME"}
    assert set(data) <= read, f"ConfigMap keys Kiln never reads: {sorted(set(data) - read)}"
    assert config.backend == data["KILN_BACKEND"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target: str) -> None:
    pod = _one(_render(target), "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), (container["name"], kind)


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_non_root_on_a_read_only_root(target: str) -> None:
    pod = _one(_render(target), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize(
    ("target", "image", "backend"),
    [("base", "kiln:0.1.0", "onnxruntime"), ("overlays/cpu", "kiln:0.1.0", "onnxruntime")],
)
def test_cpu_targets_request_no_gpu(target: str, image: str, backend: str) -> None:
    docs = _render(target)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"]:
        assert container["image"] == image
        for kind in ("requests", "limits"):
            assert GPU_RESOURCE not in container["resources"].get(kind, {})
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert _one(docs, "ConfigMap")["data"]["KILN_BACKEND"] == backend


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes() -> None:
    docs = _render("overlays/gpu")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "kiln:0.1.0-gpu"
    assert str(container["resources"]["limits"][GPU_RESOURCE]) == "1"
    assert pod["nodeSelector"]
    assert any(toleration["key"] == GPU_RESOURCE for toleration in pod["tolerations"])
    assert _one(docs, "ConfigMap")["data"]["KILN_BACKEND"] == "tensorrt-fp16"
