"""The Helm chart: Helm's own lint and template engine (helm-python-sdk binds Helm's Go SDK), every
rendered manifest validated against the Kubernetes schemas (kubernetes-validate, offline), and the
custom resources against the schemas in tests/data/ (RayCluster, ServiceMonitor, HTTPRoute).
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "tristage"
DATA = REPO_ROOT / "tests" / "data"
KUBERNETES_VERSION = "1.33.0"  # bundled by kubernetes-validate; the chart asks for >= 1.27
RELEASE, NAMESPACE = "prod", "serving"
FULLNAME = "prod-tristage"
HEAD_ADDRESS = f"{FULLNAME}-head-svc.{NAMESPACE}.svc:6379"

CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray.io-v1.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.schema.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.schema.json",
}

GPU_NODES = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
DISAGGREGATED = {
    "mode": "disaggregated",
    "model": {
        "path": "/models/llama",
        "servedModelName": "llama",
        "dtype": "bfloat16",
        "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
    },
    "ray": {
        "workerGroups": {
            "colocated": {"enabled": False},
            "prefill": {
                "enabled": True,
                "replicas": 2,
                "minReplicas": 1,
                "maxReplicas": 4,
                "workersPerPod": 8,
                "gpusPerPod": 8,
                "nodeSelector": GPU_NODES,
            },
            "decode": {
                "enabled": True,
                "replicas": 3,
                "minReplicas": 3,
                "maxReplicas": 6,
                "workersPerPod": 8,
                "gpusPerPod": 8,
                "nodeSelector": GPU_NODES,
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "decode", "effect": "NoSchedule"}],
            },
            "encode": {
                "enabled": True,
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 1,
                "workersPerPod": 1,
                "gpusPerPod": 1,
            },
        }
    },
}
SCENARIOS = {
    "default": {},
    "disaggregated-gpus": DISAGGREGATED,
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        }
    },
    "httproute": {
        "httpRoute": {
            "enabled": True,
            "hostnames": ["llm.example.com"],
            "requestTimeout": "600s",
            "parentRefs": [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}],
        }
    },
    "hpa": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
    "existing-secret": {"apiKeys": {"existingSecret": "llm-keys", "existingSecretKey": "keys"}},
    "cpu-keys-no-monitoring": {
        "model": {"device": "cpu"},
        "apiKeys": {"keys": ["k1", "k2"]},
        "ray": {
            "workerGroups": {
                "colocated": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2, "gpusPerPod": 0, "tolerations": []}
            }
        },
        "metrics": {"serviceMonitor": {"enabled": False}, "dashboards": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "gateway": {"podDisruptionBudget": {"enabled": False}},
    },
}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} named {name}"
    return matches[0]


def gateway_container(docs: list[dict]) -> dict:
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def validate_manifest(doc: dict) -> None:
    schema_file = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    schema = json.loads((DATA / schema_file).read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
        for template in templates:
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "check"},
                "template": template,
            }
            kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_lints_renders_and_validates(scenario):
    values = SCENARIOS[scenario]
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBERNETES_VERSION)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    docs = render(values)
    assert docs
    for doc in docs:
        validate_manifest(doc)
    assert all(d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE for d in docs)


def test_default_is_one_colocated_gpu_worker_behind_the_gateway():
    docs = render({})
    cluster = find(docs, "RayCluster", FULLNAME)
    [group] = cluster["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "colocated" and group["replicas"] == 1
    assert group["rayStartParams"]["resources"] == "'{\"colocated\":1}'"
    [worker] = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    container = gateway_container(docs)
    args = container["args"]
    assert container["command"] == ["/bin/bash", "-c"] and "exec tristage serve" in args[0]
    assert flag(args, "--ray-address") == "$(RAY_ADDRESS)"
    assert {"name": "RAY_ADDRESS", "value": HEAD_ADDRESS} in container["env"]
    assert (flag(args, "--mode"), flag(args, "--replicas")) == ("colocated", "1")
    assert flag(args, "--host") == "0.0.0.0" and flag(args, "--data-plane-host") == "auto"
    assert flag(args, "--device") == "cuda"
    assert "--model" not in args  # the embedded model baked into the image
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["image"] == "tristage:0.1.0-cuda"
    assert not any(e["name"] == "TRISTAGE_API_KEYS" for e in container["env"])
    assert not [d for d in docs if d["kind"] in ("Ingress", "HTTPRoute", "HorizontalPodAutoscaler")]
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert secrets == [f"{FULLNAME}-cluster-secret", f"{FULLNAME}-ray-auth"]


def test_every_ray_process_authenticates_with_the_release_token():
    """Ray's token authentication: head, every worker group and the gateway get one token (a random one
    made by the chart, or the operator's Secret)."""
    docs = render(DISAGGREGATED)
    secret = find(docs, "Secret", f"{FULLNAME}-ray-auth")
    assert len(base64.b64decode(secret["data"]["token"])) == 48
    cluster = find(docs, "RayCluster")
    containers = [cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0], gateway_container(docs)]
    containers += [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-ray-auth", "key": "token"}
    docs = render({"ray": {"authToken": {"existingSecret": "ray-token", "existingSecretKey": "t"}}})
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [f"{FULLNAME}-cluster-secret"]
    env = {e["name"]: e for e in gateway_container(docs)["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-token", "key": "t"}


def test_the_gateway_gets_the_data_plane_cluster_secret():
    """CURVE on the ZeroMQ data plane: every gateway replica reads one cluster secret (made by the chart and kept
    across upgrades, or the operator's Secret) and hands it to the actors it starts; the Ray pods get no copy."""
    docs = render(DISAGGREGATED)
    secret = find(docs, "Secret", f"{FULLNAME}-cluster-secret")
    assert len(base64.b64decode(secret["data"]["cluster-secret"])) == 64
    container = gateway_container(docs)
    assert flag(container["args"], "--data-plane-auth") == "auto"  # on: --data-plane-host auto is not loopback
    env = {e["name"]: e for e in container["env"]}
    key_ref = {"name": f"{FULLNAME}-cluster-secret", "key": "cluster-secret"}
    assert env["TRISTAGE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"] == key_ref
    cluster = find(docs, "RayCluster")
    ray_containers = [cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    ray_containers += [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    assert not [e for c in ray_containers for e in c["env"] if e["name"] == "TRISTAGE_CLUSTER_SECRET"]

    docs = render({"dataPlane": {"auth": "on", "clusterSecret": {"existingSecret": "mine", "existingSecretKey": "s"}}})
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [f"{FULLNAME}-ray-auth"]
    container = gateway_container(docs)
    assert flag(container["args"], "--data-plane-auth") == "on"
    env = {e["name"]: e for e in container["env"]}
    assert env["TRISTAGE_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "s"}

    docs = render({"dataPlane": {"auth": "off"}})
    assert flag(gateway_container(docs)["args"], "--data-plane-auth") == "off"
    assert not [e for e in gateway_container(docs)["env"] if e["name"] == "TRISTAGE_CLUSTER_SECRET"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [f"{FULLNAME}-ray-auth"]


def test_ray_dashboard_is_not_exposed():
    docs = render(DISAGGREGATED)
    cluster = find(docs, "RayCluster")
    head_params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert (head_params["include-dashboard"], head_params["dashboard-host"]) == ("false", "127.0.0.1")
    overridden = find(
        render({"ray": {"head": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "4"}}}}), "RayCluster"
    )["spec"]["headGroupSpec"]["rayStartParams"]
    assert (overridden["dashboard-host"], overridden["num-cpus"]) == ("127.0.0.1", "4")
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]
    ]
    ports = [p for t in templates for c in t["spec"]["containers"] for p in c.get("ports", [])]
    ports += [p for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]]
    assert ports and not [p for p in ports if p.get("containerPort", p.get("port")) in (8265, 10001, 52365)]
    head_ports = [p["containerPort"] for p in templates[0]["spec"]["containers"][0]["ports"]]
    assert head_ports == [6379, 8080]  # KubeRay builds the head Service from these


def test_disaggregated_pools_with_gpus():
    docs = render(DISAGGREGATED)
    groups = {g["groupName"]: g for g in find(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert sorted(groups) == ["decode", "encode", "prefill"]
    decode = groups["decode"]
    assert (decode["replicas"], decode["minReplicas"], decode["maxReplicas"]) == (3, 3, 6)
    assert json.loads(decode["rayStartParams"]["resources"].strip("'")) == {"decode": 8}
    assert decode["rayStartParams"]["num-gpus"] == "8"
    pod = decode["template"]["spec"]
    assert pod["nodeSelector"] == GPU_NODES
    assert pod["tolerations"] == DISAGGREGATED["ray"]["workerGroups"]["decode"]["tolerations"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    metrics_ports = [p["containerPort"] for p in container["ports"] if p["name"].startswith("wmetrics-")]
    assert metrics_ports == list(range(8001, 8009))  # one per engine actor of the pod
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert decode["template"]["metadata"]["labels"]["tristage.io/role"] == "decode"
    args = gateway_container(docs)["args"]
    assert flag(args, "--mode") == "disaggregated" and "--replicas" not in args
    assert (flag(args, "--encode"), flag(args, "--prefill"), flag(args, "--decode")) == ("1", "16", "24")
    assert (flag(args, "--model"), flag(args, "--served-model-name"), flag(args, "--dtype")) == (
        "/models/llama",
        "llama",
        "bfloat16",
    )
    pdbs = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs == {f"{FULLNAME}-{n}" for n in ("gateway", "prefill", "decode", "encode")}


def test_disaggregated_mode_needs_prefill_and_decode_pools():
    with pytest.raises(helm.HelmError, match=r"needs ray.workerGroups.prefill.enabled"):
        render({"mode": "disaggregated"})


def test_ingress_and_httproute_point_at_the_gateway_service():
    ingress = find(render(SCENARIOS["ingress"]), "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-gateway", "port": {"name": "http"}}
    route = find(render(SCENARIOS["httproute"]), "HTTPRoute")
    [rule] = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": f"{FULLNAME}-gateway", "port": 8000}]
    assert rule["timeouts"] == {"request": "600s"}
    with pytest.raises(helm.HelmError, match=r"needs httpRoute.parentRefs"):
        render({"httpRoute": {"enabled": True}})


def test_hpa_owns_the_replica_count():
    docs = render(SCENARIOS["hpa"])
    assert "replicas" not in find(docs, "Deployment")["spec"]
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-gateway",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)


def test_api_keys_from_chart_secret_or_existing_secret():
    docs = render(SCENARIOS["cpu-keys-no-monitoring"])
    secret = find(docs, "Secret", f"{FULLNAME}-api-keys")
    assert secret["stringData"] == {"api-keys": "k1,k2"}
    env = {e["name"]: e for e in gateway_container(docs)["env"]}
    key_ref = env["TRISTAGE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": secret["metadata"]["name"], "key": "api-keys"}
    docs = render(SCENARIOS["existing-secret"])
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert secrets == [f"{FULLNAME}-cluster-secret", f"{FULLNAME}-ray-auth"]
    env = {e["name"]: e for e in gateway_container(docs)["env"]}
    assert env["TRISTAGE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "llm-keys", "key": "keys"}


def test_cpu_workers_ask_for_one_cpu_per_actor_and_no_gpu():
    docs = render(SCENARIOS["cpu-keys-no-monitoring"])
    [group] = find(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-cpus"] == "1" and group["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert gateway_container(docs)["image"] == "tristage:0.1.0-cpu"
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "NetworkPolicy", "ConfigMap")]


def test_monitoring_objects():
    docs = render({})
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    gateway = monitors[f"{FULLNAME}-gateway"]
    assert gateway["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    service = find(docs, "Service", f"{FULLNAME}-gateway")
    assert gateway["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ray = monitors[f"{FULLNAME}-ray"]
    assert [e["port"] for e in ray["spec"]["endpoints"]] == ["wmetrics-0", "ray-metrics"]
    dashboards = find(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = (REPO_ROOT / "deploy" / "grafana" / "dashboards" / "tristage.json").read_text()
    assert json.loads(dashboards["data"]["tristage.json"]) == json.loads(committed)


def test_network_policy_keeps_the_data_plane_among_release_pods():
    docs = render(DISAGGREGATED)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    release = {"app.kubernetes.io/name": "tristage", "app.kubernetes.io/instance": RELEASE}
    members = policies[f"{FULLNAME}-members"]
    assert members["podSelector"] == {"matchLabels": release}
    assert members["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    # Outside the release, only the API port of the gateway and the metrics ports are reachable.
    api = policies[f"{FULLNAME}-api"]
    assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert api["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    metric_ports = policies[f"{FULLNAME}-metrics"]["ingress"][0]["ports"]
    assert all(p["port"] < 49152 and p.get("endPort", 0) < 49152 for p in metric_ports)
    # Every pod the policies must cover carries the release's labels.
    cluster = find(docs, "RayCluster")
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]
    ]
    templates.append(find(docs, "Deployment")["spec"]["template"])
    assert all(release.items() <= t["metadata"]["labels"].items() for t in templates)


@pytest.mark.parametrize(
    "bad_values, where",
    [
        ({"gatway": {"replicas": 2}}, "gatway"),
        ({"gateway": {"replica": 2}}, "replica"),
        ({"mode": "split"}, "mode"),
        ({"model": {"device": "tpu"}}, "device"),
        ({"ray": {"workerGroups": {"decode": {"workersPerPod": 0}}}}, "workersPerPod"),
        ({"ray": {"workerGroups": {"decode": {"enabled": True, "gpus": 8}}}}, "gpus"),
        ({"apiKeys": {"keys": ["a,b"]}}, "keys"),
    ],
)
def test_schema_rejects_invalid_values(bad_values, where):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(bad_values)
    report = helm.lint(CHART, bad_values, strict=True, namespace=NAMESPACE)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] == 3]


def test_every_default_value_is_described_by_the_schema():
    """The schema rejects unknown keys, so every key of values.yaml must be in it (and nothing silently unused)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)

    def closed_objects(node: dict, path: str):
        if node.get("type") == "object" and node.get("additionalProperties") is False:
            yield path
        for key, child in node.get("properties", {}).items():
            yield from closed_objects(child, f"{path}.{key}")

    closed = set(closed_objects(schema, ""))
    assert {"", ".gateway", ".ray.workerGroups.decode", ".serve", ".metrics.serviceMonitor"} <= closed
    mutated = copy.deepcopy(defaults)
    mutated["ray"]["workerGroups"]["decode"]["extra"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(mutated)
