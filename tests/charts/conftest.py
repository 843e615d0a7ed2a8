"""Fixtures of the chart tests: the toolchain (helm, kubeconform), a copy of charts/ with its local
dependencies built, rendering helpers and the kubeconform schema folders."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml
from emporium_testbed.toolchain import BUILD_SCRIPT, REPO_ROOT, bin_dir, tool

CHARTS = REPO_ROOT / "charts"
SERVICES = ("users", "products", "orders", "notifications")  # the services with a database
WEB = ("storefront",)  # no database, no broker
APP_CHARTS = (*SERVICES, *WEB, "emporium-operator", "emporium", "loadgenerator")
ALL_CHARTS = ("emporium-lib", *APP_CHARTS)
NAMESPACE = "emporium"
OPERATOR_NAMESPACE = "emporium-system"
JWKS_FIXTURE = Path(__file__).parent / "fixtures" / "jwks.json"
INLINE_JWKS_ARGS = ("--set", "auth.jwks.mode=inline", "--set-file", f"auth.jwks.inline={JWKS_FIXTURE}")


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crd_schemas = _load_module("crd_schemas", REPO_ROOT / "tools" / "toolchain" / "schemas" / "crd_schemas.py")


def run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def kubeconform() -> str:
    path = bin_dir() / "kubeconform"
    if not path.exists():  # not in `make test`'s default tool set: build it on first use (seconds)
        out = run(["bash", str(BUILD_SCRIPT), "kubeconform"]).stdout.strip().splitlines()[-1]
        path = Path(out) / "kubeconform"
    return str(path)


@pytest.fixture(scope="session")
def charts_dir(tmp_path_factory: pytest.TempPathFactory, helm: str) -> Path:
    """A copy of charts/ with every local dependency built (the library into each service chart, then
    the service charts into the umbrella), so the repository's tree is never written to."""
    target = tmp_path_factory.mktemp("charts") / "charts"
    shutil.copytree(CHARTS, target, ignore=shutil.ignore_patterns("*.tgz"))
    for chart in (*SERVICES, *WEB, "emporium"):
        run([helm, "dependency", "build", str(target / chart)])
    return target


def parse(manifest: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


@pytest.fixture(scope="session")
def render(helm: str, charts_dir: Path) -> Callable[..., list[dict]]:
    """render(chart, *helm_args, namespace=...) -> the rendered objects (helm template)."""
    cache: dict[tuple, str] = {}

    def _render(chart: str, *args: str, namespace: str | None = None, raw: bool = False):
        ns = namespace or (OPERATOR_NAMESPACE if chart == "emporium-operator" else NAMESPACE)
        release = "emporium" if chart != "emporium-operator" else "emporium-operator"
        key = (chart, ns, *args)
        if key not in cache:
            cache[key] = run(
                [helm, "template", release, str(charts_dir / chart), "--namespace", ns, *args]
            ).stdout
        return cache[key] if raw else parse(cache[key])

    return _render


@pytest.fixture(scope="session")
def schema_locations(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """kubeconform -schema-location values: Kubernetes 1.34 (strict), our CRDs, Istio's and
    prometheus-operator's CRDs."""
    ours = tmp_path_factory.mktemp("crd-schemas")
    assert crd_schemas.convert(sorted((CHARTS / "emporium-operator" / "crds").glob("*.yaml")), ours)
    kube = crd_schemas.kubernetes("v1.34.0")
    third = crd_schemas.third_party()
    return [
        f"{kube}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        f"{ours}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
        f"{third}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
    ]


def skaffold_profiles() -> dict[str, list[dict]]:
    """Profile name ("default" for the base config) -> skaffold's helm releases for it."""
    config = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
    profiles = {"default": config["deploy"]["helm"]["releases"]}
    for profile in config.get("profiles", []):
        releases = (profile.get("deploy") or {}).get("helm", {}).get("releases")
        releases = copy.deepcopy(releases or profiles["default"])
        # the profile's JSON patches of the releases ("add": a key, or "-" appends to a list)
        for patch in profile.get("patches", []):
            if not patch["path"].startswith("/deploy/helm/releases/"):
                continue
            assert patch.get("op", "replace") == "add", patch
            *parents, last = patch["path"].removeprefix("/deploy/helm/releases/").split("/")
            target = releases
            for key in parents:
                target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
            if last == "-":
                target.append(patch["value"])
            else:
                target[last] = patch["value"]
        profiles[profile["name"]] = releases
    return profiles


def helm_args_for(release: dict) -> list[str]:
    """helm template arguments for a skaffold release (values files, set values; image templates are
    replaced by a fixed image so the output renders as skaffold's would)."""
    args: list[str] = []
    for values_file in release.get("valuesFiles", []):
        args += ["-f", str(REPO_ROOT / values_file)]
    for key, value in (release.get("setValues") or {}).items():
        args += ["--set-string", f"{key}={value}"]
    for key in release.get("setValueTemplates") or {}:
        fake = {"repository": "registry.local/emporium", "digest": "sha256:" + "0" * 64}.get(
            key.rsplit(".", 1)[-1], "v1"
        )
        args += ["--set-string", f"{key}={fake}"]
    return args
