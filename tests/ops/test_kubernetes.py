"""The Kubernetes manifests (docker/kubernetes/) agree with the server and the image they run.

Schema validation and the security scan run in docker/kubernetes/lint.sh (CI). What those
tools cannot know is checked here: every LOSSD_* variable is a setting `lossd serve` has and
accepts with that value, the ports and probes are the server's, the pods run the image's own
ENTRYPOINT as its user, and the termination grace covers the drain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lossd.client import RemoteLoss
from tests.support.dockerfile import parse_stages
from tests.support.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "kubernetes"
BASE = K8S / "base"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())


def _objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _base() -> dict[str, dict]:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    objects = [obj for name in listed for obj in _objects(BASE / name)]
    return {obj["kind"]: obj for obj in objects}


def _kustomize() -> list[str] | None:
    for candidate in (ROOT / ".venv-k8s" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            return [str(candidate), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _render(overlay: str) -> dict[str, dict]:
    tool = _kustomize()
    if tool is None:
        pytest.skip("no kustomize (kubectl): docker/kubernetes/lint.sh installs one")
    out = subprocess.run(
        [*tool, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return {obj["kind"]: obj for obj in yaml.safe_load_all(out.stdout) if obj}


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _serve_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "lossd.server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    return set(re.findall(r"--([a-z][a-z0-9-]+)", help_text)) - {"help"}


def _env_names(objects: dict[str, dict]) -> dict[str, str | None]:
    """Every LOSSD_* variable the pods get, with its value (None when it comes from a Secret)."""
    names: dict[str, str | None] = dict(objects["ConfigMap"]["data"])
    for var in _container(objects["Deployment"]).get("env", []):
        names[var["name"]] = var.get("value")
    return names


def test_every_variable_is_a_lossd_setting():
    flags = _serve_flags()
    assert {"port", "metrics-port", "grace-seconds", "audit-db"} <= flags, "parsed the flags"
    probe_source = (ROOT / "server" / "probe.py").read_text()
    for overlay in OVERLAYS:
        for name in _env_names(_render(overlay)):
            assert name.startswith("LOSSD_"), name
            flag = name.removeprefix("LOSSD_").lower().replace("_", "-")
            # LOSSD_HEALTH_* configure `lossd health`, the exec probe of the tls component.
            assert flag in flags or f'"{name}"' in probe_source, (
                f"overlays/{overlay}: {name} is neither a `lossd serve` setting nor read by "
                "`lossd health`"
            )


def test_the_config_map_starts_a_server_that_answers_health():
    """The ConfigMap's values, as the pods get them, are settings the server accepts."""
    env = {k: v for k, v in _base()["ConfigMap"]["data"].items()}
    # Only what a pod's surroundings provide differs: a free port, no PostgreSQL, no tokens.
    env.update(LOSSD_PORT="0", LOSSD_METRICS_PORT="0", LOSSD_AUDIT="none")
    env["LOSSD_METRICS_HOST"] = "127.0.0.1"
    # ServerProcess passes --port 0 --device cpu itself; the rest comes from the environment.
    with ServerProcess(env=env) as server:
        health = subprocess.run(
            [sys.executable, "-m", "lossd.server.cli", "health", "--endpoint", server.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout + health.stderr


def test_ports_and_probes_are_the_servers():
    objects = _base()
    config = objects["ConfigMap"]["data"]
    grpc_port, metrics_port = int(config["LOSSD_PORT"]), int(config["LOSSD_METRICS_PORT"])
    container = _container(objects["Deployment"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The kubelet's native gRPC probe, on the standard health service of the gRPC port.
        assert container[probe]["grpc"] == {"port": grpc_port}, probe
    services = {
        obj["metadata"]["name"]: obj
        for name in ("service-headless.yaml", "service-metrics.yaml")
        for obj in _objects(BASE / name)
    }
    headless = services["lossd-headless"]
    assert headless["spec"]["clusterIP"] == "None", "headless: clients balance across pods"
    assert headless["spec"]["ports"][0]["port"] == grpc_port
    assert headless["spec"]["ports"][0]["targetPort"] == "grpc"
    assert services["lossd-metrics"]["spec"]["ports"][0]["targetPort"] == "metrics"
    policy_ports = {
        p["port"] for rule in objects["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]
    }
    assert policy_ports == {grpc_port, metrics_port}
    selector = objects["Deployment"]["spec"]["selector"]["matchLabels"]
    for obj in (headless, services["lossd-metrics"]):
        assert obj["spec"]["selector"] == selector
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        spec = objects[kind]["spec"]
        assert (spec.get("selector") or spec["podSelector"])["matchLabels"] == selector


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_pods_run_the_images_entrypoint_as_its_user(overlay: str):
    dockerfile = ROOT / "docker" / ("Dockerfile" if overlay == "cpu" else "Dockerfile.cuda")
    image = parse_stages(dockerfile)[-1]
    objects = _render(overlay)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects["Deployment"])
    assert container["image"] == f"lossd:{'cpu' if overlay == 'cpu' else 'cuda'}"
    assert "command" not in container and "args" not in container, (
        "the image's ENTRYPOINT runs unchanged"
    )
    assert image.entrypoint == ["lossd", "serve", "--host", "0.0.0.0"]
    uid, gid = (int(part) for part in image.user.split(":"))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert {str(p["containerPort"]) for p in container["ports"]} == set(image.expose)
    config = objects["ConfigMap"]["data"]
    assert config["LOSSD_PORT"] == image.env["LOSSD_PORT"]
    assert config["LOSSD_METRICS_PORT"] == image.env["LOSSD_METRICS_PORT"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    # A read-only root: the image's data directory and /tmp are the only writable places.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {image.env["LOSSD_DATA_DIR"], "/tmp"} <= mounts
    env = _env_names(objects)
    assert Path(env["LOSSD_AUTH_TOKENS"]).parent.as_posix() in mounts, "tokens come from a Secret"
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert config["LOSSD_DEVICE"] == "cuda"


def test_termination_grace_covers_the_drain():
    objects = _base()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    pre_stop = _container(objects["Deployment"])["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(objects["ConfigMap"]["data"]["LOSSD_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 1


def test_the_tls_component_probes_with_lossd_health():
    objects = _render("cpu-tls-monitored")
    container = _container(objects["Deployment"])
    env = _env_names(objects)
    assert {"LOSSD_TLS_CERT", "LOSSD_TLS_KEY"} <= set(env)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe].get("grpc") is None, "the kubelet's gRPC probe has no TLS"
        assert container[probe]["exec"]["command"] == ["lossd", "health"]
    assert objects["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"


def test_lint_script_is_wired_into_ci():
    lint = K8S / "lint.sh"
    assert os.access(lint, os.X_OK)
    assert "docker/kubernetes/lint.sh" in (ROOT / ".ci" / "run").read_text()


def test_a_dns_endpoint_like_the_headless_services_reaches_the_server():
    """Clients name the headless Service as dns:///NAME:PORT; gRPC's resolver takes it as is."""
    with ServerProcess("--audit", "none") as server:
        crit = RemoteLoss("mse", endpoint=f"dns:///localhost:{server.port}")
        pred = torch.randn(4, 3, requires_grad=True)
        target = torch.randn(4, 3)
        loss = crit(pred, target)
        loss.backward()
        expected = torch.nn.functional.mse_loss(pred, target)
        assert torch.equal(loss.detach(), expected.detach())
