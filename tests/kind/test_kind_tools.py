"""The kind path's own tools, without Docker: the cluster configs, the docker shim, the cached and timed
build steps of tools/kind/lib.sh, and kind-up's refusal to start when the ingress port is taken."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KIND = ROOT / "tools" / "kind"
PINS = dict(
    line.split("=", 1)
    for line in (ROOT / "tools" / "toolchain" / "versions.env").read_text().splitlines()
    if line and not line.startswith("#")
)


def sh(script: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        **kwargs,
    )


@pytest.mark.parametrize("name", ["kind-config.yaml", "kind-config-ha.yaml"])
def test_kind_configs(name: str) -> None:
    config = yaml.safe_load((ROOT / name).read_text())
    assert config["name"] == "emporium"
    (patch,) = config["containerdConfigPatches"]
    assert "restrict_oom_score_adj = true" in patch
    assert {n["image"] for n in config["nodes"]} == {f"kindest/node:{PINS['KUBERNETES_VERSION']}"}
    (control_plane,) = [n for n in config["nodes"] if n["role"] == "control-plane"]
    ports = {
        (m["listenAddress"], m["hostPort"], m["containerPort"]) for m in control_plane["extraPortMappings"]
    }
    assert ports == {("127.0.0.1", 8080, 30080), ("127.0.0.1", 8443, 30443)}
    workers = [n for n in config["nodes"] if n["role"] == "worker"]
    assert len(workers) == (2 if name == "kind-config-ha.yaml" else 0)
    assert all("extraPortMappings" not in w for w in workers)


@pytest.fixture
def fake_docker(tmp_path: Path) -> Path:
    """A `docker` that prints its arguments one per line, on PATH after the shim."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    return bin_dir


def shim(args: list[str], fake_bin: Path) -> list[str]:
    out = subprocess.run(
        [str(KIND / "docker-shim" / "docker"), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{KIND / 'docker-shim'}:{fake_bin}:/usr/bin:/bin"},
    )
    return out.stdout.splitlines()


def test_docker_shim_replaces_privileged_on_run(fake_docker: Path) -> None:
    got = shim(["run", "--name", "a b", "--privileged", "-d", "img"], fake_docker)
    assert "--privileged" not in got
    assert got[:3] == ["run", "--name", "a b"]
    assert got[-2:] == ["-d", "img"]
    assert {"--cap-add=ALL", "--cap-drop=SYS_RESOURCE", "/dev/kmsg"} <= set(got)
    assert got[got.index("--device-cgroup-rule=a *:* rwm")] == "--device-cgroup-rule=a *:* rwm"


def test_docker_shim_drops_privileged_on_exec_and_passes_the_rest(fake_docker: Path) -> None:
    assert shim(["exec", "--privileged", "node", "sh", "-c", "echo 'x y'"], fake_docker) == [
        "exec",
        "node",
        "sh",
        "-c",
        "echo 'x y'",
    ]
    assert shim(["ps", "-a"], fake_docker) == ["ps", "-a"]


def run_step(cache: Path, key: str, command: str) -> subprocess.CompletedProcess:
    return sh(
        f"source {KIND}/lib.sh; set -euo pipefail; work() {{ {command}; }}; "
        f'step demo-image/compile {key} "[ -f {cache}/out ]" -- work; echo after',
        env={"EMPORIUM_CACHE": str(cache)},
    )


def test_step_runs_once_per_key_and_times_every_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    command = f"echo built >> {tmp_path}/runs; touch {cache}/out"
    assert run_step(cache, "k1", command).returncode == 0
    assert run_step(cache, "k1", command).returncode == 0
    assert (tmp_path / "runs").read_text() == "built\n"
    assert run_step(cache, "k2", command).returncode == 0  # a new recipe key rebuilds
    (cache / "out").unlink()
    assert run_step(cache, "k2", command).returncode == 0  # so does a missing output
    assert (tmp_path / "runs").read_text() == "built\n" * 3
    rows = [line.split("\t") for line in (cache / "timings.tsv").read_text().splitlines()]
    assert [(r[1], r[2], r[4]) for r in rows] == [
        ("demo-image/compile", "cold", "k1"),
        ("demo-image/compile", "cached", "k1"),
        ("demo-image/compile", "cold", "k2"),
        ("demo-image/compile", "cold", "k2"),
    ]


def test_failed_step_names_image_step_and_log(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # set -e holds inside the step: the command after the failing one does not run
    result = run_step(cache, "k1", f"echo compiling; false; touch {tmp_path}/kept-going")
    assert result.returncode == 1
    assert "after" not in result.stdout
    log = cache / "kind" / "logs" / "demo-image--compile.log"
    assert re.search(
        rf"build of demo-image failed at step compile after \d+ s; full log: {log}$", result.stderr, re.M
    )
    assert "compiling" in log.read_text()
    assert not (tmp_path / "kept-going").exists()
    assert not (cache / "kind" / "stamps" / "demo-image--compile").exists()


def test_kind_up_stops_when_the_ingress_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "kind-config.yaml"
        config.write_text(
            (ROOT / "kind-config.yaml").read_text().replace("hostPort: 8080", f"hostPort: {port}")
        )
        result = sh(
            f"bash {KIND}/cluster.sh up --no-deploy",
            env={
                "KIND_CONFIG": str(config),
                "EMPORIUM_CACHE": str(tmp_path / "cache"),
                "KIND_CLUSTER": "no-such",
            },
        )
    assert result.returncode == 1
    assert f"port 127.0.0.1:{port} is already taken by" in result.stderr
    assert "make down" in result.stderr
    assert "Nothing was started" in result.stderr
    assert list((tmp_path / "cache" / "kind" / "stamps").glob("*")) == []  # nothing was built


def _manifest_images(path: Path) -> set[str]:
    images = set()
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] == "Deployment":
            images |= {c["image"] for c in doc["spec"]["template"]["spec"]["containers"]}
        elif doc and doc["kind"] == "Prometheus":
            images.add(doc["spec"]["image"])
            assert doc["spec"]["image"].endswith(":" + doc["spec"]["version"])
    return images


def test_monitoring_and_tracing_manifests_run_the_images_build_sh_makes() -> None:
    """k8s/monitoring/prometheus.yaml and k8s/observability/tracing.yaml name the images tools/images/build.sh
    makes (and deploy.sh loads), at the pinned versions."""
    listed = sh(f"bash {ROOT}/tools/images/build.sh --list prometheus otelcol jaeger")
    assert listed.returncode == 0, listed.stderr
    prometheus, otelcol, jaeger = listed.stdout.split()
    assert _manifest_images(ROOT / "k8s" / "monitoring" / "prometheus.yaml") == {prometheus}
    assert _manifest_images(ROOT / "k8s" / "observability" / "tracing.yaml") == {otelcol, jaeger}
    assert otelcol.endswith(":" + PINS["OTELCOL_VERSION"]) and jaeger.endswith(":" + PINS["JAEGER_VERSION"])
    # the operator's images under the names the module's own Deployment gives them
    operator = sh(f"bash {ROOT}/tools/images/build.sh --list prometheus-operator prometheus-config-reloader")
    images = dict(zip(("operator", "reloader"), operator.stdout.split(), strict=True))
    module = (KIND / "modules" / "prometheus-operator" / "go.mod").read_text()
    version = images["operator"].rsplit(":", 1)[1]
    assert f"github.com/prometheus-operator/prometheus-operator {version}" in module
    assert images["reloader"] == f"quay.io/prometheus-operator/prometheus-config-reloader:{version}"


@pytest.mark.parametrize(
    ("profile", "monitoring", "tracing"),
    [("", "true", "true"), ("no-mesh", "true", "true"), ("ha", "true", "false")],
)
def test_deploy_installs_monitoring_and_tracing_as_the_profiles_values_say(
    profile: str, monitoring: str, tracing: str
) -> None:
    deploy = (KIND / "deploy.sh").read_text()
    value = deploy[deploy.index("value() {") : deploy.index("\n}\n", deploy.index("value() {")) + 3]
    script = f"root={ROOT}; profile={profile}\n{value}\n"
    result = sh(script + 'echo "$(value global.monitoring.enabled) $(value tracing.enabled)"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [monitoring, tracing]


@pytest.mark.parametrize(
    ("flags", "observability"),
    [
        ("", ["prometheus", "prometheus-operator", "prometheus-config-reloader", "otelcol", "jaeger"]),
        ("--ha", ["prometheus", "prometheus-operator", "prometheus-config-reloader"]),
    ],
)
def test_deploy_lists_the_add_on_images_to_preload(flags: str, observability: list[str]) -> None:
    """deploy.sh --list-images: the add-on images the profile runs (what preload-image.sh puts into the node
    image, the union over the profiles), needing no cluster and no tools beyond python3."""
    result = sh(f"bash {KIND}/deploy.sh --list-images {flags}")
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert names == ["istio-pilot", "istio-proxy", "postgres", "rabbitmq", "mailpit", *observability]
    listed = sh(f"bash {ROOT}/tools/images/build.sh --list {' '.join(names)}")
    assert listed.returncode == 0 and len(listed.stdout.split()) == len(names), listed.stderr
