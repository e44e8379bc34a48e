"""The Kubernetes example: only the guard is reachable, and both containers run locked down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.settings import load_settings

MANIFEST = Path(__file__).parents[2] / "sidecar" / "deploy" / "kubernetes.yaml"
SIDECAR_PORT = 8080


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    """The manifest's objects by kind."""
    with MANIFEST.open(encoding="utf-8") as file:
        loaded = [doc for doc in yaml.safe_load_all(file) if doc]
    by_kind = {doc["kind"]: doc for doc in loaded}
    assert len(by_kind) == len(loaded), "one object of each kind expected"
    return by_kind


@pytest.fixture(scope="module")
def pod(documents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's pod spec."""
    spec: dict[str, Any] = documents["Deployment"]["spec"]["template"]["spec"]
    return spec


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {container["name"]: container for container in pod["containers"]}


def test_pod_runs_the_server_and_the_sidecar(pod: dict[str, Any]) -> None:
    """One pod holds exactly the MCP server and the mcpguard sidecar."""
    assert sorted(containers(pod)) == ["mcp-server", "mcpguard"]
    assert containers(pod)["mcpguard"]["image"] == "mcpguard:latest"


def test_service_targets_only_the_sidecar_port(documents: dict[str, dict[str, Any]], pod: dict[str, Any]) -> None:
    """The Service forwards to port 8080 alone, which only the sidecar listens on."""
    service = documents["Service"]["spec"]
    assert [port["targetPort"] for port in service["ports"]] == [SIDECAR_PORT]
    labels = documents["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    owners = [name for name, c in containers(pod).items() for p in c.get("ports", []) if p["containerPort"] == 8080]
    assert owners == ["mcpguard"]


def test_upstream_exposes_no_port(pod: dict[str, Any]) -> None:
    """The MCP server declares no container port, so nothing outside the pod is pointed at it."""
    assert "ports" not in containers(pod)["mcp-server"]


def test_sidecar_forwards_to_loopback(pod: dict[str, Any]) -> None:
    """The sidecar's upstream is the server on the pod's loopback, and it serves on 8080."""
    command = containers(pod)["mcpguard"]["command"]
    assert command[:2] == ["mcpguard", "sidecar"]
    upstream = command[command.index("--upstream") + 1]
    assert upstream.startswith("http://127.0.0.1:")
    assert command[command.index("--listen") + 1] == f"0.0.0.0:{SIDECAR_PORT}"


def test_sidecar_environment(pod: dict[str, Any]) -> None:
    """The public URL is set (required for an all-address listener) and state lives on the mounted volume."""
    sidecar = containers(pod)["mcpguard"]
    env = {item["name"]: item["value"] for item in sidecar["env"]}
    assert env["MCPGUARD_PUBLIC_URL"].startswith("https://")
    mounts = [mount["mountPath"] for mount in sidecar["volumeMounts"]]
    assert any(env["MCPGUARD_STATE"].startswith(path + "/") for path in mounts)


def test_sidecar_settings_load(pod: dict[str, Any]) -> None:
    """The sidecar's flags and environment in the manifest make valid settings."""
    sidecar = containers(pod)["mcpguard"]
    command = sidecar["command"]
    flags = {"upstream": command[command.index("--upstream") + 1], "listen": command[command.index("--listen") + 1]}
    env = {item["name"]: item["value"] for item in sidecar["env"]}
    settings = load_settings(config_file=None, env=env, overrides=flags)
    assert settings.public_origin == env["MCPGUARD_PUBLIC_URL"]
    assert settings.state_url == "sqlite:///" + env["MCPGUARD_STATE"]


def test_sidecar_probes(pod: dict[str, Any]) -> None:
    """Readiness asks /readyz and liveness /healthz, both on the sidecar port."""
    sidecar = containers(pod)["mcpguard"]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": SIDECAR_PORT}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": SIDECAR_PORT}


@pytest.mark.parametrize("name", ["mcp-server", "mcpguard"])
def test_containers_are_locked_down(pod: dict[str, Any], name: str) -> None:
    """Each container runs non-root on a read-only root, cannot escalate, holds no capabilities and has limits."""
    container = containers(pod)[name]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert context.get("runAsNonRoot", pod["securityContext"]["runAsNonRoot"]) is True
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]


def test_no_service_account_token(pod: dict[str, Any]) -> None:
    """Neither container needs the Kubernetes API, so no token is mounted."""
    assert pod["automountServiceAccountToken"] is False


def test_grace_period_outlasts_the_drain(pod: dict[str, Any]) -> None:
    """Kubernetes waits longer than the sidecar's 30 s drain, and the server outlives the drain too."""
    assert pod["terminationGracePeriodSeconds"] > 30
    server_stays = containers(pod)["mcp-server"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 30 < server_stays < pod["terminationGracePeriodSeconds"]


def test_sqlite_state_is_never_shared(documents: dict[str, dict[str, Any]]) -> None:
    """One replica, Recreate rollouts and a ReadWriteOnce claim keep two pods off one SQLite file."""
    deployment = documents["Deployment"]["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"]["type"] == "Recreate"
    assert documents["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
