"""`global.monitoring.enabled=false` turns every monitoring object off: the umbrella chart installs into an
API server that has our CRDs and Istio's but not prometheus-operator's (a cluster where kube-prometheus-stack
cannot be installed), and nothing of monitoring.coreos.com nor a Grafana dashboard ConfigMap is rendered.
With monitoring on, the same install is refused: the API server really lacks those CRDs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from emporium_testbed.controlplane import ControlPlane
from emporium_testbed.toolchain import tool

from .conftest import CHARTS, crd_schemas, parse, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A control plane of its own (the shared one gets prometheus-operator's CRDs from other tests)."""
    plane = ControlPlane(tmp_path_factory.mktemp("no-monitoring") / "kube").start()
    try:
        kubeconfig = str(plane.kubeconfig)
        crds = sorted((CHARTS / "emporium-operator" / "crds").glob("*.yaml"))
        crds += [p for p in crd_schemas.third_party_crd_files() if "monitoring.coreos.com" not in Path(p).read_text()]
        for crd in crds:
            run([tool("kubectl"), "--kubeconfig", kubeconfig, "apply", "--server-side", "-f", str(crd)])
        run([tool("kubectl"), "--kubeconfig", kubeconfig, "wait", "--for=condition=Established", "crd", "--all"])
        groups = run([tool("kubectl"), "--kubeconfig", kubeconfig, "api-resources", "-o", "name"]).stdout
        assert "servicemonitors" not in groups and "virtualservices" in groups
        for ns in ("emporium", "istio-system"):
            run([tool("kubectl"), "--kubeconfig", kubeconfig, "create", "namespace", ns])
        yield plane.kubeconfig
    finally:
        plane.stop()


def test_monitoring_off_renders_no_monitoring_object(render) -> None:
    objects = render("emporium", "--set", "global.monitoring.enabled=false")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [o for o in objects if "grafana_dashboard" in (o["metadata"].get("labels") or {})]
    on = {o["kind"] for o in render("emporium")}
    assert {"ServiceMonitor", "PrometheusRule"} <= on  # the default still ships them


def test_umbrella_installs_without_prometheus_operator_crds(bare_cluster: Path, helm: str, charts_dir) -> None:
    base = [helm, "--kubeconfig", str(bare_cluster)]
    refused = subprocess.run(
        [*base, "install", "emporium-on", str(charts_dir / "emporium"), "-n", "emporium", "--no-hooks"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "monitoring.coreos.com" in refused.stderr, refused.stderr
    run(
        [
            *base,
            "install",
            "emporium",
            str(charts_dir / "emporium"),
            "-n",
            "emporium",
            "--no-hooks",
            "--set",
            "global.monitoring.enabled=false",
        ]
    )
    manifest = parse(run([*base, "get", "manifest", "emporium", "-n", "emporium"]).stdout)
    assert manifest and not [o for o in manifest if o["apiVersion"].startswith("monitoring.coreos.com")]
    assert yaml.safe_dump(manifest).count("grafana_dashboard") == 0
