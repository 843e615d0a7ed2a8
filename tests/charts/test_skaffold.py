"""skaffold.yaml checked by skaffold itself (v2.24.0, built from the Go module proxy through the wrapper
module tools/toolchain/skaffold): `skaffold diagnose` parses and validates every profile, and
`skaffold render` (deploy.helm, with built images given as build artifacts) renders each profile into
manifests that kubeconform accepts, with skaffold's images bound into every workload."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from emporium_testbed.toolchain import BUILD_SCRIPT, bin_dir

from .conftest import REPO_ROOT, parse, run, skaffold_profiles

PROFILES = [p for p in skaffold_profiles() if p != "default"]
IMAGES = ["users", "products", "orders", "notifications", "storefront", "operator"]
DIGEST = "sha256:" + "1" * 64


@pytest.fixture(scope="session")
def skaffold() -> str:
    path = bin_dir() / "skaffold"
    if not path.exists():  # built on request (once per machine): tools/toolchain/build.sh skaffold
        out = run(["bash", str(BUILD_SCRIPT), "skaffold"]).stdout.strip().splitlines()[-1]
        path = Path(out) / "skaffold"
    return str(path)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, charts_dir: Path) -> Path:
    """skaffold.yaml, k8s/ and the built charts/ in a scratch folder (skaffold writes into it)."""
    root = tmp_path_factory.mktemp("skaffold")
    shutil.copy(REPO_ROOT / "skaffold.yaml", root / "skaffold.yaml")
    shutil.copytree(REPO_ROOT / "k8s", root / "k8s")
    shutil.copytree(charts_dir, root / "charts")
    builds = [
        {"imageName": f"emporium-{name}", "tag": f"registry.local/emporium-{name}:t1@{DIGEST}"}
        for name in IMAGES
    ]
    (root / "build.json").write_text(json.dumps({"builds": builds}))
    return root


def skaffold_run(skaffold: str, project: Path, *args: str) -> str:
    env_path = f"{bin_dir()}:{Path(shutil.which('git') or '/usr/bin/git').parent}"
    result = subprocess.run(
        [skaffold, *args, "--update-check=false", "--interactive=false"],
        cwd=project,
        capture_output=True,
        text=True,
        env={"PATH": env_path, "HOME": str(project)},
        timeout=300,
    )
    assert result.returncode == 0, (
        f"skaffold {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.mark.parametrize("profile", ["default", *PROFILES])
def test_skaffold_diagnose(skaffold: str, project: Path, profile: str) -> None:
    args = ["diagnose", "--yaml-only", *(["-p", profile] if profile != "default" else [])]
    config = yaml.safe_load(skaffold_run(skaffold, project, *args))
    assert config["apiVersion"] == "skaffold/v4beta14"
    assert {a["image"] for a in config["build"]["artifacts"]} == {f"emporium-{n}" for n in IMAGES}
    # skaffold dev (the dev profile) syncs each service's .py files and the shared library's into /app/dev
    # (the chart's devReload); no other profile syncs, and the operator always rebuilds
    for artifact in config["build"]["artifacts"]:
        name = artifact["image"].removeprefix("emporium-")
        if profile != "dev" or name == "operator":
            assert "sync" not in artifact, artifact
            continue
        rules = {(r["src"], r["dest"], r["strip"]) for r in artifact["sync"]["manual"]}
        assert rules == {
            (f"services/{name}/src/**/*.py", "/app/dev", f"services/{name}/src/"),
            ("services/common/src/**/*.py", "/app/dev", "services/common/src/"),
        }
    releases = config["deploy"]["helm"]["releases"]
    assert [r["name"] for r in releases] == ["emporium-operator", "emporium"]
    for release in releases:
        assert Path(release["chartPath"]).is_dir()
        for values in release.get("valuesFiles", []):
            assert Path(values).is_file(), values


@pytest.mark.parametrize("profile", ["default", *PROFILES])
def test_skaffold_render(skaffold, project, kubeconform, schema_locations, profile) -> None:
    args = ["render", "--offline=true", "--digest-source=none", "-a", "build.json"]
    out = skaffold_run(skaffold, project, *args, *(["-p", profile] if profile != "default" else []))
    # skaffold prints a notice about --digest-source before the manifests
    lines = out.splitlines(keepends=True)
    while lines and lines[0].startswith("--digest-source"):
        lines.pop(0)
    manifest = "".join(lines)
    objects = parse(manifest)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ClusterRole", "PostgresDatabase", "RabbitTopology"} <= kinds
    # every profile monitors (kind: the Prometheus of tools/kind/deploy.sh); PodMonitors: the operator's and
    # (with the ingress) the gateway's Envoy
    monitoring = {"PrometheusRule", "ServiceMonitor", "PodMonitor"} & kinds
    assert monitoring == {"PrometheusRule", "ServiceMonitor", "PodMonitor"}, monitoring
    pod_monitors = {o["metadata"]["name"] for o in objects if o["kind"] == "PodMonitor"}
    assert "emporium-operator" in pod_monitors, pod_monitors
    # traces from the gateway and the sidecars (Istio Telemetry) where the values enable them and Istio runs
    # (no-mesh: no Envoy to configure, the services still export their spans; ha: tracing off; dev: the default
    # values plus reloading)
    assert ("Telemetry" in kinds) == (profile in ("default", "dev")), kinds
    images = {
        container["image"]
        for obj in objects
        if obj["kind"] in ("Deployment", "Job")
        for container in obj["spec"]["template"]["spec"].get("initContainers", [])
        + obj["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"registry.local/emporium-{name}:t1@{DIGEST}" for name in IMAGES}
    path = project / f"rendered-{profile}.yaml"
    path.write_text(manifest)
    cmd = [kubeconform, "-strict", "-summary"]
    for location in schema_locations:
        cmd += ["-schema-location", location]
    out = run([*cmd, str(path)]).stdout
    assert f"Valid: {len(objects)}, Invalid: 0, Errors: 0, Skipped: 0" in out
