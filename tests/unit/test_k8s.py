"""The kustomize targets in ``k8s/`` render, validate, and hold together.

Each target is rendered with ``kubectl kustomize`` (kustomize built into kubectl). Core resources are
validated with ``kubernetes-validate`` in strict mode (unknown fields fail) against the schemas of
``K8S_VERSION``; the prometheus-operator CRDs (ServiceMonitor, PrometheusRule), which those schemas do not
know, against the schemas vendored in ``k8s/schemas/``. The other tests check properties rather than
literal values: every family's Service, PDB and HPA reach that family's pods and no other's, probes and
Service ports name ports the containers declare, the Ingress routes each served model and task route to the
family that serves it, the HPA's custom metric is one prometheus-adapter serves from a series Kiln exports,
the GPU overlay's engine build runs a real format and fails with its reason where there is no GPU, and
the Dockerfile's build context, user, ports and paths match the manifests.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
SERVING_TARGETS = ("base", "overlays/cpu", "overlays/gpu")
TARGETS = (*SERVING_TARGETS, "monitoring")
FAMILIES = sorted(p.name for p in (K8S_DIR / "families").iterdir() if (p / "kustomization.yaml").is_file())
# Kubernetes release whose API schemas the core resources are validated against; matches the kubectl/kustomize
# used to render, and is one that kubernetes-validate ships schemas for.
K8S_VERSION = "1.32.0"
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor_v1.json", "PrometheusRule": "prometheusrule_v1.json"}
GPU_RESOURCE = "nvidia.com/gpu"
FAMILY_LABEL = "kiln.dev/family"
SECRET_KEYS = {"KILN_ADMIN_TOKEN", "KILN_WRITE_TOKEN", "KILN_READ_TOKEN", "KILN_LLM_API_KEY"}


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
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((K8S_DIR / "schemas" / CRD_SCHEMAS[kind]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _all(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in _all(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _containers(deployment: dict, init: bool = True) -> list[dict]:
    pod = _pod(deployment)
    return pod["containers"] + (pod.get("initContainers", []) if init else [])


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Service selector (a plain map) or a ``matchLabels``-only selector selects ``labels``."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        assert set(selector) == {"matchLabels"}, (
            f"only matchLabels selectors are checked here, got {selector}"
        )
        selector = selector["matchLabels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _config(docs, deployment: dict) -> dict:
    (ref,) = [s["configMapRef"]["name"] for s in _pod(deployment)["containers"][0]["envFrom"]]
    return _one(docs, "ConfigMap", ref)["data"]


def _family_deployments(docs) -> dict[str, dict]:
    return {_pod_labels(d)[FAMILY_LABEL]: d for d in _all(docs, "Deployment")}


# --- rendering and schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_every_family_renders_its_own_stack(target: str) -> None:
    docs = _render(target)
    assert FAMILIES and set(FAMILIES) >= {"vision", "generation"}
    assert sorted(_family_deployments(docs)) == FAMILIES
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"):
        assert len(_all(docs, kind)) == len(FAMILIES), kind
    assert len(_all(docs, "Ingress")) == 1 and len(_all(docs, "ServiceMonitor")) == 1
    assert not _all(docs, "Secret"), "Secrets are created by the operator, never rendered from the repository"


@pytest.mark.parametrize("target", TARGETS)
def test_resources_match_schemas(target: str) -> None:
    for doc in _render(target):
        if doc["kind"] in CRD_SCHEMAS:
            _crd_validator(doc["kind"]).validate(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    """Every validator fails on a misspelt field, so the green runs above mean something."""
    deployment = json.loads(json.dumps(_all(_render("base"), "Deployment")[0]))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor = json.loads(json.dumps(_one(_render("base"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator("ServiceMonitor").validate(monitor)
    rule = json.loads(json.dumps(_one(_render("monitoring"), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5m"  # `for` on a recording rule
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator("PrometheusRule").validate(rule)


# --- selectors, ports, probes ---------------------------------------------------------------------


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_each_family_selects_its_own_pods_and_no_others(target: str) -> None:
    docs = _render(target)
    deployments = _family_deployments(docs)
    for family, deployment in deployments.items():
        assert _selects(deployment["spec"]["selector"], _pod_labels(deployment)), family
        name = deployment["metadata"]["name"]
        for kind in ("Service", "PodDisruptionBudget"):
            selector = _one(docs, kind, name)["spec"]["selector"]
            for other, other_deployment in deployments.items():
                assert _selects(selector, _pod_labels(other_deployment)) == (other == family), (
                    kind,
                    name,
                    other,
                )
        spread = _pod(deployment).get("topologySpreadConstraints", [])
        for constraint in spread:
            for other, other_deployment in deployments.items():
                assert _selects(constraint["labelSelector"], _pod_labels(other_deployment)) == (
                    other == family
                )


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_probes_and_service_ports_reference_declared_container_ports(target: str) -> None:
    docs = _render(target)
    for deployment in _all(docs, "Deployment"):
        (server,) = _containers(deployment, init=False)
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = server[probe]["httpGet"]["port"]
            assert port in ports or port in ports.values(), (probe, port)
            assert server[probe]["httpGet"]["path"].startswith("/v2/health/"), probe
        # readiness and startup wait for the models; liveness only for the process
        assert server["readinessProbe"]["httpGet"]["path"] == server["startupProbe"]["httpGet"]["path"]
        assert server["livenessProbe"]["httpGet"]["path"] != server["readinessProbe"]["httpGet"]["path"]
        service = _one(docs, "Service", deployment["metadata"]["name"])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports or port["targetPort"] in ports.values(), port
        grpc = [p for p in service["spec"]["ports"] if p.get("appProtocol") == "grpc"]
        assert grpc and all(ports.get(p["targetPort"], p["targetPort"]) != ports["http"] for p in grpc)
        # the command listens where the ports say
        command = server["command"]
        for flag, name in (("--http-port", "http"), ("--grpc-port", "grpc")):
            assert int(command[command.index(flag) + 1]) == ports[name], flag


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_servicemonitor_scrapes_every_family_on_a_service_port(target: str) -> None:
    docs = _render(target)
    monitor = _one(docs, "ServiceMonitor")
    for service in _all(docs, "Service"):
        assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"]), service["metadata"][
            "name"
        ]
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names and endpoint["path"] == "/metrics"


# --- scaling ------------------------------------------------------------------------------------------


def _adapter_metrics() -> dict[str, dict]:
    values = yaml.safe_load((K8S_DIR / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    return {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}


def _kiln_series() -> set[str]:
    from monitoring_series import kiln_series

    return kiln_series()


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_each_hpa_scales_its_family_on_a_metric_the_adapter_serves(target: str) -> None:
    docs = _render(target)
    adapter = _adapter_metrics()
    series = _kiln_series()
    for hpa in _all(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        deployment = _one(docs, ref["kind"], ref["name"])
        assert ref["apiVersion"] == deployment["apiVersion"] and hpa["metadata"]["name"] == ref["name"]
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods, "scales on a custom metric, not only CPU"
        for metric in pods:
            rule = adapter[metric["metric"]["name"]]  # KeyError: prometheus-adapter does not serve it
            queried = set(re.findall(r"\b(kiln_[a-z_]+)\b", rule["seriesQuery"] + rule["metricsQuery"]))
            assert queried and queried <= series, queried - series
            assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])


# --- configuration, secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_each_family_serves_trainable_models_with_a_valid_configuration(target: str, monkeypatch) -> None:
    from serving.config import ServeConfig
    from training.recipes import RECIPES

    docs = _render(target)
    served = []
    for family, deployment in _family_deployments(docs).items():
        data = _config(docs, deployment)
        for key, value in data.items():
            monkeypatch.setenv(key, value)
        config = ServeConfig.from_env()  # raises ConfigError on a bad value (e.g. an unknown backend)
        read = {f"KILN_{f.upper()}" for f in ServeConfig.__dataclass_fields__} | _settings_in_code()
        assert set(data) <= read, f"ConfigMap keys Kiln never reads: {sorted(set(data) - read)}"
        assert config.models and set(config.models) <= set(RECIPES), (family, config.models)
        if "KILN_LLM_BASE_URL" not in data:  # the agent family serves copies of the models it offers as tools
            served += config.models
        for container in _containers(deployment):
            refs = [s["configMapRef"]["name"] for s in container.get("envFrom", [])]
            assert refs == [_one(docs, "ConfigMap", refs[0])["metadata"]["name"]], container["name"]
    assert len(served) == len(set(served)), "each model is owned by one family"


@functools.cache
def _settings_in_code() -> set[str]:
    """``KILN_*`` names Kiln's packages read (a family's own settings, e.g. KILN_MILVUS_URI, KILN_HOME)."""
    names = set()
    for package in ("kiln", "serving", "export", "training", "model_zoo"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"\b(KILN_[A-Z0-9_]+[A-Z0-9])\b", path.read_text()))
    return names


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_tokens_and_keys_come_from_secrets_not_configmaps(target: str) -> None:
    docs = _render(target)
    for configmap in _all(docs, "ConfigMap"):
        leaked = [k for k in configmap["data"] if re.search(r"TOKEN|KEY|PASSWORD|SECRET", k)]
        assert not leaked, f"{configmap['metadata']['name']} holds secrets: {leaked}"
    for deployment in _all(docs, "Deployment"):
        (server,) = _containers(deployment, init=False)
        from_secrets = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in server.get("env", []) if "valueFrom" in e
        }
        assert set(from_secrets) >= SECRET_KEYS
        for name, ref in from_secrets.items():
            assert ref["key"] == name and ref["name"] == "kiln-secrets"


# --- the one entry ----------------------------------------------------------------------------------


def _task_routes() -> dict[str, set[str]]:
    from serving.repository import ModelRepository
    from serving.tasks import TASKS

    return {task: {r.path for r in make(ModelRepository()).routes} for task, (_, make) in TASKS.items()}


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_the_ingress_routes_every_model_and_task_route_to_the_family_serving_it(target: str) -> None:
    from serving.tasks import TASKS
    from training.recipes import RECIPES

    docs = _render(target)
    ingress = _one(docs, "Ingress")
    services = {s["metadata"]["name"]: s for s in _all(docs, "Service")}
    routes = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = services[backend["name"]]  # KeyError: routes to a Service that does not exist
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
            assert path["path"] not in routes, f"{path['path']} is routed twice"
            routes[path["path"]] = (backend["name"], path["pathType"])
    default = ingress["spec"]["defaultBackend"]["service"]
    assert default["name"] in services
    task_routes = _task_routes()
    served_by: dict[str, set[str]] = {}  # model -> Deployments serving it
    for deployment in _all(docs, "Deployment"):
        for model in _config(docs, deployment)["KILN_MODELS"].split(","):
            served_by.setdefault(model, set()).add(deployment["metadata"]["name"])
    for model, names in served_by.items():
        assert _routed(routes, f"/v2/models/{model}") in names, f"/v2/models/{model} does not reach {names}"
        for route in task_routes[RECIPES[model].task]:
            assert _routed(routes, route) in names, f"{route} ({RECIPES[model].task}) does not reach {names}"
    # Routes of tasks without artifacts (the agent) reach a family configured for them (its LLM).
    llm_hosts = {
        d["metadata"]["name"] for d in _all(docs, "Deployment") if "KILN_LLM_BASE_URL" in _config(docs, d)
    }
    for task, paths in task_routes.items():
        if TASKS[task][0] is None:
            for route in paths | {"/mcp"}:
                assert _routed(routes, route) in llm_hosts, f"{route} does not reach an LLM-configured family"


def _routed(routes: dict[str, tuple[str, str]], route: str) -> str | None:
    """The Service an HTTP path reaches: an Exact path equal to it, else the longest Prefix path containing it
    element-wise (Kubernetes' Prefix semantics; a templated segment such as ``{name}`` is any value)."""
    exact = routes.get(route)
    if exact and exact[1] == "Exact":
        return exact[0]
    best = None
    for path, (service, kind) in routes.items():
        contains = route == path or route.startswith(path.rstrip("/") + "/")
        if kind == "Prefix" and contains and (best is None or len(path) > len(best[0])):
            best = (path, service)
    return best[1] if best else None


# --- pods: resources, security ------------------------------------------------------------------------


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_every_container_has_requests_and_limits(target: str) -> None:
    for deployment in _all(_render(target), "Deployment"):
        for container in _containers(deployment):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), (
                    container["name"],
                    kind,
                )


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_runs_as_non_root_on_a_read_only_root_with_writable_scratch(target: str) -> None:
    for deployment in _all(_render(target), "Deployment"):
        pod = _pod(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in _containers(deployment):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert all(name in volumes for name in mounts.values())
            assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("target", ["base", "overlays/cpu"])
def test_cpu_targets_request_no_gpu(target: str) -> None:
    docs = _render(target)
    for deployment in _all(docs, "Deployment"):
        pod = _pod(deployment)
        for container in _containers(deployment):
            for kind in ("requests", "limits"):
                assert GPU_RESOURCE not in container["resources"].get(kind, {})
        assert "nodeSelector" not in pod and "tolerations" not in pod and "initContainers" not in pod
        assert not _config(docs, deployment)["KILN_BACKEND"].startswith("tensorrt")


# --- the GPU overlay builds its engines ---------------------------------------------------------------


def _engine_build(deployment: dict) -> dict:
    (init,) = _pod(deployment)["initContainers"]
    return init


def test_gpu_pods_build_tensorrt_engines_for_their_own_gpu_and_serve_them() -> None:
    from export.quantize import get_quantizer

    docs = _render("overlays/gpu")
    for deployment in _all(docs, "Deployment"):
        pod = _pod(deployment)
        assert pod["nodeSelector"] and any(t["key"] == GPU_RESOURCE for t in pod["tolerations"])
        for container in _containers(deployment):
            assert str(container["resources"]["limits"][GPU_RESOURCE]) == "1", container["name"]
        config = _config(docs, deployment)
        init = _engine_build(deployment)
        script = init["command"][-1]
        formats = re.findall(r"kiln export \S+ --format (\S+)", script)
        assert formats, "the init container runs `kiln export --format <engine>`"
        for fmt in formats:
            quantizer = get_quantizer(fmt)  # ValueError: not a real export format
            assert quantizer.output_suffix.endswith(".plan")
            assert config["KILN_BACKEND"] == f"tensorrt-{quantizer.precision}", "serves the engine it builds"
        # the engines land in the store the server reads: the same volume, mounted at KILN_HOME in both
        (server,) = _containers(deployment, init=False)
        home = config["KILN_HOME"]
        for container in (init, server):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert home in mounts and mounts[home] == "engines", container["name"]
        assert init["image"] == server["image"]


def test_the_engine_build_step_runs_and_fails_with_its_reason_without_a_gpu(tmp_path) -> None:
    """The init container's script, run here with the repository's `kiln`: on a machine without CUDA and
    TensorRT it must stop with the reason (never serve without the engines it promised)."""
    from kiln.accelerators import tensorrt_status

    ok, reason = tensorrt_status()
    if ok:
        pytest.skip("this machine can build TensorRT engines; the GPU test suite covers the build")
    deployment = _all(_render("overlays/gpu"), "Deployment")[0]
    script = _engine_build(deployment)["command"][-1].replace(
        "/var/lib/kiln/.", str(tmp_path / "image") + "/."
    )
    env = {
        **os.environ,
        "KILN_HOME": str(tmp_path / "engines"),
        "KILN_MODELS": "vit-soft",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "cannot build TensorRT engines" in proc.stderr and reason in proc.stderr


# --- the image ----------------------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_build_context_and_runtime_match_the_manifests() -> None:
    lines = _dockerfile()
    ignored = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
            assert not any(source == p or source.startswith(p + "/") for p in ignored), f"{source} is ignored"
    stages = [line.split()[-1] for line in lines if line.startswith("FROM ") and " AS " in line]
    assert {"cpu", "gpu"} <= set(stages)
    extras = importlib.metadata.metadata("kiln").get_all("Provides-Extra")  # pyproject's optional groups
    for extra in re.findall(r"\.\[(\w+)\]", " ".join(lines)):
        assert extra in extras, extra

    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    env = dict(re.findall(r"(\w+)=(\S+)", next(line for line in lines if line.startswith("ENV "))))
    exposed = {int(p) for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    cmd = json.loads(next(line for line in lines if line.startswith("CMD ")).removeprefix("CMD "))
    for target in SERVING_TARGETS:
        docs = _render(target)
        for deployment in _all(docs, "Deployment"):
            (server,) = _containers(deployment, init=False)
            assert users[-1] == str(_pod(deployment)["securityContext"]["runAsUser"])
            assert {p["containerPort"] for p in server["ports"]} <= exposed
            assert server["command"][: len(cmd)] == cmd[: len(server["command"])]
            if target != "overlays/gpu":
                assert _config(docs, deployment)["KILN_HOME"] == env["KILN_HOME"]
            else:  # the init container copies the image's store from the image's KILN_HOME
                assert f"cp -a {env['KILN_HOME']}/." in _engine_build(deployment)["command"][-1]
            assert server["image"].split(":")[0] == "kiln"


# --- monitoring -----------------------------------------------------------------------------------------


def test_monitoring_renders_the_rules_and_the_dashboard_for_grafana() -> None:
    docs = _render("monitoring")
    rule = _one(docs, "PrometheusRule")
    assert (
        rule["spec"] == yaml.safe_load((K8S_DIR / "monitoring" / "prometheus-rule.yaml").read_text())["spec"]
    )
    dashboards = [
        c for c in _all(docs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    (dashboard,) = dashboards
    files = sorted((K8S_DIR / "monitoring" / "dashboards").glob("*.json"))
    assert sorted(dashboard["data"]) == [f.name for f in files]  # every dashboard file reaches Grafana
    for f in files:
        assert json.loads(dashboard["data"][f.name]) == json.loads(f.read_text())


# --- hardening: network, TLS, Milvus authentication, the image's models --------------------------------


def _ports(rule: dict) -> set:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_each_family_has_a_network_policy_for_its_own_pods(target: str) -> None:
    from urllib.parse import urlparse

    docs = _render(target)
    deployments = _family_deployments(docs)
    policies = _all(docs, "NetworkPolicy")
    assert len(policies) == len(FAMILIES)
    for family, deployment in deployments.items():
        (policy,) = [p for p in policies if _selects(p["spec"]["podSelector"], _pod_labels(deployment))]
        assert all(  # its pods and no other family's
            _selects(policy["spec"]["podSelector"], _pod_labels(d)) == (f == family)
            for f, d in deployments.items()
        )
        spec = policy["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}  # default deny both ways, then these
        (server,) = _containers(deployment, init=False)
        declared = {p["name"] for p in server["ports"]}
        for rule in spec["ingress"]:
            assert rule["from"] and _ports(rule) and _ports(rule) <= declared, rule  # no open-to-all rule
        for rule in spec["ingress"] + spec["egress"]:
            for peer in rule.get("from", []) + rule.get("to", []):
                assert "podSelector" not in peer, "pod peers would get the family label added by kustomize"
        assert any(53 in _ports(r) for r in spec["egress"])  # DNS
        config = _config(docs, deployment)
        needed = []
        if "KILN_MILVUS_URI" in config:
            needed.append(urlparse(config["KILN_MILVUS_URI"]).port)
        if "KILN_LLM_BASE_URL" in config:
            needed.append(urlparse(config["KILN_LLM_BASE_URL"]).port or 443)
        for port in needed:
            assert any(port in _ports(r) for r in spec["egress"]), (family, port)
        assert (family == "retrieval") == bool("KILN_MILVUS_URI" in config)


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_the_ingress_carries_bearer_tokens_over_tls_only(target: str) -> None:
    ingress = _one(_render(target), "Ingress")
    tls = ingress["spec"]["tls"]
    assert tls and all(entry["secretName"] for entry in tls)
    covered = {host for entry in tls for host in entry["hosts"]}
    for rule in ingress["spec"]["rules"]:
        assert rule.get("host") in covered, "every routed host has a certificate"
    annotations = ingress["metadata"].get("annotations", {})
    assert annotations.get("nginx.ingress.kubernetes.io/force-ssl-redirect") == "true"


def test_milvus_authenticates_with_credentials_from_secrets() -> None:
    values = yaml.safe_load((K8S_DIR / "milvus" / "values.yaml").read_text())
    user = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["authorizationEnabled"] is True
    env = {e["name"]: e for e in values["standalone"]["extraEnv"]}
    root = env["COMMON_SECURITY_DEFAULTROOTPASSWORD"]
    assert set(root) == {"name", "valueFrom"} and root["valueFrom"]["secretKeyRef"]["name"]
    for target in SERVING_TARGETS:
        deployment = _family_deployments(_render(target))["retrieval"]
        (server,) = _containers(deployment, init=False)
        token = next(e for e in server["env"] if e["name"] == "KILN_MILVUS_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {
            "name": "kiln-secrets", "key": "KILN_MILVUS_TOKEN", "optional": True
        }  # fmt: skip


def _dockerfile_models() -> set[str]:
    """The models the image's RUN steps build: `kiln train NAME` each, `kiln prepare [NAMES]` (no names:
    the default list, as the command does)."""
    from kiln.settings import DEFAULT_MODELS

    built: set[str] = set()
    for line in _dockerfile():
        if not line.startswith("RUN "):
            continue
        for step in re.split(r"&&|;", line.removeprefix("RUN ")):
            words = step.split()
            if words[:2] == ["kiln", "train"]:
                built.add(words[2])
            elif words[:2] == ["kiln", "prepare"]:
                names = [w for w in words[2:] if not w.startswith("-")]
                assert not any(w.startswith("--epochs") or w == "--no-export" for w in words), step
                built.update(names or DEFAULT_MODELS)
    return built


def test_the_image_builds_every_default_model_of_the_families_it_serves() -> None:
    from kiln.settings import DEFAULT_MODELS

    built = _dockerfile_models()
    assert built >= set(DEFAULT_MODELS), f"missing from the image: {sorted(set(DEFAULT_MODELS) - built)}"
    for target in SERVING_TARGETS:
        for family, deployment in _family_deployments(_render(target)).items():
            served = {
                m.partition(":")[0] for m in _config(_render(target), deployment)["KILN_MODELS"].split(",")
            }
            assert served <= built, (family, sorted(served - built))
