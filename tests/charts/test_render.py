"""Static chart checks: lint, render (defaults and every skaffold profile), strict schema validation
with kubeconform, labels, hardening, and the wiring between the charts and the operator's Secrets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import (
    ALL_CHARTS,
    APP_CHARTS,
    CHARTS,
    INLINE_JWKS_ARGS,
    NAMESPACE,
    SERVICES,
    WEB,
    crd_schemas,
    helm_args_for,
    parse,
    run,
    skaffold_profiles,
)

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)
# The keys the operator writes (docs/contracts.md).
OPERATOR_SECRET_KEYS = {
    "PostgresDatabase": {"uri", "DATABASE_URL", "host", "port", "dbname", "username", "password"},
    "RabbitTopology": {"uri", "AMQP_URL", "host", "port", "vhost", "username", "password"},
}
OPERATOR_SECRET_SUFFIX = {"PostgresDatabase": "-db", "RabbitTopology": "-amqp"}


def pod_specs(objects: list[dict]):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("chart", ALL_CHARTS)
def test_helm_lint_strict(helm: str, charts_dir: Path, chart: str) -> None:
    out = run([helm, "lint", "--strict", str(charts_dir / chart)]).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("chart", ALL_CHARTS)
def test_chart_has_schema_and_notes(chart: str) -> None:
    schema = json.loads((CHARTS / chart / "values.schema.json").read_text())
    assert schema["type"] == "object"
    assert (CHARTS / chart / "templates" / "NOTES.txt").is_file()


@pytest.mark.parametrize("chart", APP_CHARTS)
def test_values_schema_rejects_unknown_keys(helm: str, charts_dir: Path, chart: str) -> None:
    """A mistyped --set key fails instead of being ignored silently (the Online Boutique lesson)."""
    result = subprocess.run(
        [helm, "template", "x", str(charts_dir / chart), "--set", "replicaCountt=3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "replicaCountt" in result.stderr


def render_cases() -> list[tuple[str, str, list[str]]]:
    """(case id, chart, helm args): every chart with its defaults, and each skaffold profile's releases."""
    cases = [(f"{chart}-defaults", chart, []) for chart in APP_CHARTS]
    cases.append(("emporium-inline-jwks", "emporium", list(INLINE_JWKS_ARGS)))
    cases.append(
        ("emporium-customer-order-status", "emporium", ["--set", "auth.orderStatusRequiresAdmin=false"])
    )
    # The local platform's values (make up), as emporium_testbed.platform passes them.
    local = [
        "-f",
        str(CHARTS.parent / "k8s" / "values" / "local.yaml"),
        "--set",
        "notifications.env.SMTP_HOST=127.0.0.1",
    ]
    cases.append(("emporium-local", "emporium", local))
    for profile, releases in skaffold_profiles().items():
        for release in releases:
            chart = Path(release["chartPath"]).name
            cases.append((f"skaffold-{profile}-{release['name']}", chart, helm_args_for(release)))
    return cases


RENDER_CASES = render_cases()


@pytest.mark.parametrize(("chart", "args"), [c[1:] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES])
def test_render_validates_strictly(render, kubeconform: str, schema_locations, tmp_path, chart, args) -> None:
    manifest = render(chart, *args, "--include-crds", raw=True)
    hooks = render(chart, *args, raw=True)  # helm template includes hook objects (the migration Jobs)
    assert parse(hooks)
    path = tmp_path / "rendered.yaml"
    path.write_text(manifest)
    cmd = [kubeconform, "-strict", "-summary", "-output", "json"]
    for location in schema_locations:
        cmd += ["-schema-location", location]
    result = subprocess.run([*cmd, str(path)], capture_output=True, text=True)
    report = json.loads(result.stdout or "{}")
    assert result.returncode == 0, json.dumps(report.get("resources", report), indent=1)[:4000]
    summary = report["summary"]
    assert summary["invalid"] == 0 and summary["errors"] == 0 and summary["skipped"] == 0
    assert summary["valid"] == len(parse(manifest))


LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


@pytest.mark.parametrize(("chart", "args"), [c[1:] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES])
def test_label_values_are_valid(render, chart, args) -> None:
    """Label values the API server accepts (e.g. not an image tag with a digest)."""
    for obj in render(chart, *args):
        templates = [obj["spec"]["template"]["metadata"]] if obj["kind"] in ("Deployment", "Job") else []
        for meta in [obj["metadata"], *templates]:
            for key, value in (meta.get("labels") or {}).items():
                assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), f"{obj['kind']} {key}={value!r}"


def test_mesh_switch(render) -> None:
    """With the mesh: Istio annotations and the merged-metrics port; without: no sidecar at all."""
    for args, inject in (((), None), (("--set", "global.mesh.enabled=false"), "false")):
        for obj in render("emporium", *args):
            if obj["kind"] == "Deployment":
                annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
                assert annotations.get("sidecar.istio.io/inject") == inject
            if obj["kind"] == "ServiceMonitor":
                port = obj["spec"]["endpoints"][0]["port"]
                assert port == ("http" if inject else "http-metrics")


def test_umbrella_builds_from_a_fresh_checkout(helm: str, tmp_path: Path) -> None:
    """`helm dependency build charts/emporium` alone suffices: the service charts' own charts/ folders
    (gitignored) are never built in a fresh clone, so the umbrella must bring the library itself."""
    fresh = tmp_path / "charts"
    shutil.copytree(CHARTS, fresh, ignore=shutil.ignore_patterns("charts"))
    for chart in fresh.iterdir():
        assert not (chart / "charts").exists()
    run([helm, "dependency", "build", str(fresh / "emporium")])
    objects = parse(run([helm, "template", "emporium", str(fresh / "emporium"), "-n", NAMESPACE]).stdout)
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"} == {*SERVICES, *WEB}


def test_skaffold_profiles_cover_operator_and_platform() -> None:
    profiles = skaffold_profiles()
    assert {"default", "no-mesh", "ha"} <= set(profiles)
    for releases in profiles.values():
        # operator first (its CRDs), then the platform
        assert [Path(r["chartPath"]).name for r in releases] == ["emporium-operator", "emporium"]


@pytest.mark.parametrize("chart", APP_CHARTS)
def test_standard_labels(render, chart: str) -> None:
    for obj in render(chart):
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/part-of"] == "emporium"
        if obj["kind"] in ("Deployment", "Job"):
            pod_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert {"app.kubernetes.io/name", "app.kubernetes.io/instance"} <= set(pod_labels)


@pytest.mark.parametrize("chart", ["emporium", "emporium-operator", "loadgenerator"])
def test_pods_are_hardened(render, chart: str) -> None:
    objects = render(chart)
    assert list(pod_specs(objects))
    for obj, spec in pod_specs(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            assert container["imagePullPolicy"] == "IfNotPresent", where


def test_service_workloads(render) -> None:
    """Each service: probes on /healthz and /readyz, HPA, PDB, NetworkPolicy, ServiceMonitor, its
    PostgresDatabase, its RabbitTopology when it uses the broker, and the migration Job."""
    objects = render("emporium")
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    for svc in SERVICES:
        deployment = by_kind["Deployment"][svc]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"emporium_{svc}", "serve"]
        assert container["ports"][0]["containerPort"] == 8000
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        for kind in ("Service", "ServiceAccount", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
            assert svc in by_kind[kind], (kind, svc)
        for kind in ("NetworkPolicy", "ServiceMonitor", "PostgresDatabase"):
            assert svc in by_kind[kind], (kind, svc)
        assert by_kind["PostgresDatabase"][svc]["spec"]["secretName"] == f"{svc}-db"
        job = by_kind["Job"][f"{svc}-migrate"]
        hook = job["metadata"]["annotations"]["helm.sh/hook"]
        # rendered for an install (no cluster to look up): post-install. On an upgrade it is pre-upgrade when
        # the service already runs, post-upgrade when the upgrade enables it (tests/e2e/test_kind_cluster.py).
        assert hook == "post-install,post-upgrade"
        job_spec = job["spec"]
        selector = by_kind["Service"][svc]["spec"]["selector"]
        pod_labels = job_spec["template"]["metadata"]["labels"]
        assert not selector.items() <= pod_labels.items(), "the Service would send traffic to the Job"
        assert job_spec["parallelism"] == 1 and job_spec["completions"] == 1
        assert job_spec["podReplacementPolicy"] == "Failed"
        assert job_spec["template"]["spec"]["containers"][0]["command"] == [
            "python",
            "-m",
            f"emporium_{svc}",
            "migrate",
        ]
    # products neither publishes nor consumes; users and orders publish, notifications consumes
    assert set(by_kind["RabbitTopology"]) == {"users", "orders", "notifications"}
    assert set(by_kind["RabbitVhost"]) == {"emporium"}
    for name, topology in by_kind["RabbitTopology"].items():
        spec = topology["spec"]
        assert spec["secretName"] == f"{name}-amqp"
        assert spec["serverRef"] == {"name": "rabbit"} and spec["vhost"] == "emporium"
        source = yaml.safe_load((CHARTS / name / "files" / "rabbit-topology.yaml").read_text())
        for key in ("user", "exchanges", "queues", "bindings"):
            assert spec.get(key) == source.get(key), (name, key)


def secret_sources(objects: list[dict]) -> dict[str, set[str]]:
    """Secret name -> keys, for Secrets the charts render and those the operator will write."""
    sources: dict[str, set[str]] = {}
    for obj in objects:
        if obj["kind"] == "Secret":
            keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
            sources[obj["metadata"]["name"]] = keys
        if obj["kind"] in OPERATOR_SECRET_KEYS:
            name = (
                obj["spec"].get("secretName") or obj["metadata"]["name"] + OPERATOR_SECRET_SUFFIX[obj["kind"]]
            )
            sources[name] = OPERATOR_SECRET_KEYS[obj["kind"]]
    return sources


def secret_refs(objects: list[dict]):
    """(workload, Secret name, key or None for a whole-Secret volume) for every reference."""
    for obj, spec in pod_specs(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield where, ref["name"], ref["key"]
        for volume in spec.get("volumes", []):
            if "secret" in volume and not volume["secret"].get("optional"):
                yield where, volume["secret"]["secretName"], None


def test_every_referenced_secret_has_a_source(render) -> None:
    """Every Secret a workload reads is rendered by a chart or written by the operator, with the key."""
    objects = render("emporium")
    sources = secret_sources(objects)
    refs = list(secret_refs(objects))
    assert {name for _, name, _ in refs} >= {f"{svc}-db" for svc in SERVICES}
    assert {name for _, name, _ in refs} >= {"users-amqp", "orders-amqp", "notifications-amqp"}
    for where, name, key in refs:
        assert name in sources, f"{where} reads Secret {name}, which nothing creates"
        if key:
            assert key in sources[name], f"{where} reads key {key} of {name}; it has {sorted(sources[name])}"


def test_users_oidc_providers_from_values_and_a_secret(render) -> None:
    google = {
        "name": "google",
        "displayName": "Google",
        "issuer": "https://accounts.google.com",
        "clientId": "123.apps.googleusercontent.com",
        "autoLinkVerifiedEmail": True,
    }
    objects = render(
        "emporium",
        "--set-json",
        f"users.oidc.providers=[{json.dumps(google)}]",
        "--set",
        "users.oidc.clientSecrets.google=GOCSPX-test,users.oidc.redirectBaseUrl=https://shop.example.com",
    )
    users = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "users")
    spec = users["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert json.loads(env["OIDC_PROVIDERS"]) == [google]  # no secret in the environment
    assert env["OIDC_REDIRECT_BASE_URL"] == "https://shop.example.com"
    assert env["OIDC_CLIENT_SECRETS_DIR"] == "/var/run/secrets/emporium/oidc"
    assert "GOCSPX" not in json.dumps(users)
    volume = next(v for v in spec["volumes"] if v["name"] == "oidc-client-secrets")
    assert volume["secret"]["secretName"] == "users-oidc"
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "users-oidc")
    assert secret["stringData"] == {"google": "GOCSPX-test"}
    # Without client secrets in values there is no Secret (bring your own; the volume is optional).
    assert not any(o["metadata"]["name"] == "users-oidc" for o in render("emporium") if o["kind"] == "Secret")


def test_service_environment_matches_contract(render) -> None:
    objects = render("emporium", "-f", str(CHARTS.parent / "k8s" / "values" / "kind.yaml"))
    envs = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            container = obj["spec"]["template"]["spec"]["containers"][0]
            envs[obj["metadata"]["name"]] = {e["name"]: e for e in container["env"]}
    common = {"ENVIRONMENT", "LOG_LEVEL", "DATABASE_URL", "JWT_ISSUER", "JWT_AUDIENCE", "JWKS_URL"}
    for svc in SERVICES:
        assert common <= set(envs[svc]), svc
    for svc in ("users", "orders", "notifications"):
        assert envs[svc]["AMQP_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{svc}-amqp",
            "key": "AMQP_URL",
        }
    assert "AMQP_URL" not in envs["products"]
    assert envs["orders"]["PRODUCTS_URL"]["value"] == "http://products.emporium.svc.cluster.local:8000"
    assert envs["users"]["JWT_KEYS_DIR"]["value"] == "/var/run/secrets/emporium/jwt-keys"
    assert {"ADMIN_EMAIL", "ADMIN_PASSWORD"} <= set(envs["users"])
    assert envs["users"]["TRUSTED_PROXY_HOPS"]["value"] == "1"  # behind the Istio ingress gateway
    assert {"SMTP_HOST", "SMTP_PORT", "SMTP_FROM"} <= set(envs["notifications"])
    assert envs["products"]["INTERNAL_TOKEN"]["valueFrom"] == envs["orders"]["INTERNAL_TOKEN"]["valueFrom"]
    assert (
        envs["users"]["JWKS_URL"]["value"]
        == "http://users.emporium.svc.cluster.local:8000/.well-known/jwks.json"
    )


def test_operator_chart(render) -> None:
    objects = render("emporium-operator", "--include-crds")
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    crds = {crd["spec"]["names"]["kind"] for crd in by_kind["CustomResourceDefinition"]}
    assert {"PostgresServer", "PostgresDatabase", "RabbitServer", "RabbitVhost", "RabbitTopology"} <= crds
    (deployment,) = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] == 2  # one active (the Lease), one standby
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "kopf",
        "run",
        "-m",
        "emporium_operator.main",
        "--standalone",
        "--namespace=emporium-system",
        "--namespace=emporium",
        "--liveness=http://0.0.0.0:8080/healthz",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EMPORIUM_LEASE_NAMESPACE"] == "emporium-system"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "healthz": 8080,
        "http-metrics": 9090,
    }
    (monitor,) = by_kind["PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http-metrics"
    # exactly the rules operator/README.md lists: a Role per served namespace, the Lease, namespace labels
    readme = (CHARTS.parent / "operator" / "README.md").read_text()
    block = yaml.safe_load(readme.split("## RBAC", 1)[1].split("```yaml", 1)[1].split("```", 1)[0])

    def normalised(rules):
        return sorted(
            (tuple(sorted(r["apiGroups"])), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])))
            for r in rules
        )

    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind["Role"]}
    for ns in ("emporium-system", "emporium"):
        assert normalised(roles[(ns, "emporium-operator")]["rules"]) == normalised(block["rules"])
    assert normalised(roles[("emporium-system", "emporium-operator-leader")]["rules"]) == normalised(
        block["leaseRules"]
    )
    (cluster_role,) = by_kind["ClusterRole"]
    assert normalised(cluster_role["rules"]) == normalised(block["clusterRules"])
    # Nothing cluster-wide touches Secrets.
    assert not [r for r in cluster_role["rules"] if "secrets" in r["resources"]]
    bindings = by_kind["RoleBinding"] + by_kind["ClusterRoleBinding"]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"emporium-system"}


def test_dashboards_are_sidecar_configmaps(render) -> None:
    maps = [o for o in render("emporium") if o["kind"] == "ConfigMap"]
    assert len(maps) == len(list((CHARTS / "emporium" / "dashboards").glob("*.json")))
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((_name, body),) = cm["data"].items()
        dashboard = json.loads(body)
        assert dashboard["uid"].startswith("emporium-") and dashboard["panels"]
        assert len(body) < 256 * 1024  # client-side apply's annotation limit


def test_prometheus_rule_is_the_promtool_file(render) -> None:
    (rule,) = [o for o in render("emporium") if o["kind"] == "PrometheusRule"]
    source = yaml.safe_load((CHARTS / "emporium" / "rules" / "emporium-alerts.yaml").read_text())
    assert rule["spec"] == source


def test_add_on_manifests_validate(kubeconform: str, schema_locations, tmp_path) -> None:
    """k8s/ manifests applied by tools/kind/deploy.sh (namespaces, Postgres, RabbitMQ, mail catcher, the servers)."""
    k8s = CHARTS.parent / "k8s"
    files = [k8s / "namespaces.yaml", *sorted((k8s / "dev").glob("*.yaml"))]
    cmd = [kubeconform, "-strict", "-summary"]
    for location in schema_locations:
        cmd += ["-schema-location", location]
    out = run([*cmd, *map(str, files)]).stdout
    assert "Invalid: 0, Errors: 0, Skipped: 0" in out
    servers = parse((k8s / "dev" / "servers.yaml").read_text())
    assert {(o["kind"], o["metadata"]["name"]) for o in servers} >= {
        ("PostgresServer", "postgres"),
        ("RabbitServer", "rabbit"),
    }


def test_kind_config_maps_gateway_nodeport_to_8080() -> None:
    root = CHARTS.parent
    kind = yaml.safe_load((root / "kind-config.yaml").read_text())
    mappings = {
        m["containerPort"]: m["hostPort"] for node in kind["nodes"] for m in node.get("extraPortMappings", [])
    }
    gateway = yaml.safe_load((root / "k8s" / "istio" / "gateway-values.yaml").read_text())
    node_ports = {p["name"]: p.get("nodePort") for p in gateway["service"]["ports"]}
    assert gateway["service"]["type"] == "NodePort"
    assert mappings[node_ports["http2"]] == 8080
    assert all(node_ports.values()), node_ports  # none random: it could take one of the fixed ones
    assert gateway["labels"] == {"istio": "ingressgateway"}


def test_istio_add_ons_render_with_our_values(helm, kubeconform, schema_locations, tmp_path) -> None:
    """k8s/istio/*-values.yaml against Istio's own charts (same module version as the CRDs): the gateway
    pods carry the label our policies select and a NodePort kind maps to :8080; istiod gets the path
    normalisation and the JWKS fetch mode."""
    charts = crd_schemas.istio_charts()
    values = CHARTS.parent / "k8s" / "istio"
    gateway = parse(
        run(
            [
                helm,
                "template",
                "istio-ingressgateway",
                str(charts / "gateway"),
                "-n",
                "istio-system",
                "-f",
                str(values / "gateway-values.yaml"),
            ]
        ).stdout
    )
    istiod = parse(
        run(
            [
                helm,
                "template",
                "istiod",
                str(charts / "istio-control" / "istio-discovery"),
                "-n",
                "istio-system",
                "-f",
                str(values / "istiod-values.yaml"),
            ]
        ).stdout
    )
    (deployment,) = [o for o in gateway if o["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["istio"] == "ingressgateway"
    (service,) = [o for o in gateway if o["kind"] == "Service"]
    assert service["spec"]["type"] == "NodePort"
    assert {p["nodePort"] for p in service["spec"]["ports"] if p["name"] == "http2"} == {30080}
    mesh = yaml.safe_load(
        next(o for o in istiod if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "istio")["data"][
            "mesh"
        ]
    )
    assert mesh["pathNormalization"]["normalization"] == "DECODE_AND_MERGE_SLASHES"
    (pilot,) = [o for o in istiod if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in pilot["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PILOT_JWT_ENABLE_REMOTE_JWKS"] == "envoy"
    path = tmp_path / "istio.yaml"
    path.write_text(yaml.safe_dump_all(gateway + istiod))
    cmd = [kubeconform, "-strict", "-summary"]
    for location in schema_locations:
        cmd += ["-schema-location", location]
    assert "Invalid: 0, Errors: 0" in run([*cmd, str(path)]).stdout


def test_ingress_bounds_request_bodies(render) -> None:
    objects = render("emporium")
    (limit,) = [o for o in objects if o["kind"] == "EnvoyFilter"]
    assert limit["metadata"]["namespace"] == "istio-system"
    assert limit["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}
    insert, exempt, *more = limit["spec"]["configPatches"]
    # the storefront's websocket (/live) is exempt too
    assert [p["match"]["routeConfiguration"]["vhost"]["route"]["name"] for p in more] == ["storefront-live"]
    buffer = insert["patch"]["value"]
    assert buffer["name"] == "envoy.filters.http.buffer"
    assert buffer["typed_config"]["max_request_bytes"] == 1048576
    # The websocket route is exempt (an upgraded stream never ends); it must be the VirtualService's.
    (virtual_service,) = [o for o in objects if o["kind"] == "VirtualService"]
    websocket_route = exempt["match"]["routeConfiguration"]["vhost"]["route"]["name"]
    route = next(r for r in virtual_service["spec"]["http"] if r["name"] == websocket_route)
    assert route["match"][0]["uri"] == {"exact": "/ws/notifications"}
    per_route = exempt["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.buffer"]
    assert per_route["disabled"] is True
    assert not [
        o for o in render("emporium", "--set", "ingress.maxRequestBodyBytes=0") if o["kind"] == "EnvoyFilter"
    ]


def test_no_request_meets_a_closing_connection(render) -> None:
    """A rollout or an idle connection never costs a request: a stopping pod keeps serving until it is out of
    the endpoints (preStop), Envoy drops idle connections before the services do, and the edge retries only
    what never reached a service (safe for a POST)."""
    from emporium_common.config import Settings

    objects = render("emporium")
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    for svc in [*SERVICES, "storefront"]:
        pod = deployments[svc]["spec"]["template"]["spec"]
        delay = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 0 < delay < pod["terminationGracePeriodSeconds"], svc
    rules = {o["spec"]["host"].split(".")[0]: o for o in objects if o["kind"] == "DestinationRule"}
    assert set(rules) == {*SERVICES, "storefront"}
    for svc, rule in rules.items():
        assert "tls" not in rule["spec"]["trafficPolicy"], "automatic mTLS must stay on"
        idle = rule["spec"]["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"]
        assert idle.endswith("s") and int(idle[:-1]) < Settings.model_fields["keep_alive_seconds"].default, (
            svc
        )
    (virtual_service,) = [o for o in objects if o["kind"] == "VirtualService"]
    for route in virtual_service["spec"]["http"]:
        if "timeout" not in route:  # the websockets
            continue
        retry_on = set(route["retries"]["retryOn"].split(","))
        assert retry_on <= {
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "reset-before-request",
        }
        assert "reset-before-request" in retry_on and route["retries"]["attempts"] >= 1, route["name"]
    assert not [
        o
        for o in render("emporium", "--set", "orders.shutdownDelaySeconds=0")
        if o["kind"] == "Deployment"
        and o["metadata"]["name"] == "orders"
        and "lifecycle" in o["spec"]["template"]["spec"]["containers"][0]
    ]


def test_storefront_wiring(render) -> None:
    """The storefront: the four services by their cluster names, its session key from its own kept Secret,
    no database or broker, no migration Job, the library's hardening."""
    objects = render("emporium", "-f", str(CHARTS.parent / "k8s" / "values" / "kind.yaml"))
    (deployment,) = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "storefront"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert container["command"] == ["python", "-m", "emporium_storefront", "serve"]
    for svc in SERVICES:
        assert env[f"{svc.upper()}_URL"]["value"] == f"http://{svc}.emporium.svc.cluster.local:8000"
    assert env["SESSION_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "storefront-session-key",
        "key": "SESSION_KEY",
    }
    assert "DATABASE_URL" not in env and "AMQP_URL" not in env
    (secret,) = [
        o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "storefront-session-key"
    ]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    kinds = {o["kind"] for o in objects if o["metadata"]["name"].startswith("storefront")}
    assert not kinds & {"PostgresDatabase", "RabbitTopology", "Job"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_dev_reload_only_in_the_dev_profile(render, helm: str, charts_dir: Path) -> None:
    """skaffold dev's values (k8s/values/dev.yaml): every service runs from a writable copy of its packages that
    skaffold syncs into, with uvicorn reloading; still non-root with a read-only root filesystem. Every other
    profile's values leave reloading off, and production refuses it."""
    profiles = skaffold_profiles()
    for profile, releases in profiles.items():
        (platform,) = [r for r in releases if r["name"] == "emporium"]
        for obj in render("emporium", *helm_args_for(platform)):
            if obj["kind"] not in ("Deployment", "Job"):
                continue
            spec = obj["spec"]["template"]["spec"]
            where = f"{profile}: {obj['kind']}/{obj['metadata']['name']}"
            names = [c["name"] for c in spec.get("initContainers", [])]
            env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
            mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0].get("volumeMounts", [])}
            if profile != "dev" or obj["kind"] == "Job":  # the migration Jobs never reload
                assert "dev-source" not in names and "RELOAD_DIR" not in env and "PYTHONPATH" not in env, where
                continue
            assert names == ["dev-source"], where
            assert env["RELOAD_DIR"] == env["PYTHONPATH"] == "/app/dev", where
            assert mounts["dev-source"] == "/app/dev", where
            (init,) = spec["initContainers"]
            assert init["image"] == spec["containers"][0]["image"], where
            assert {m["mountPath"] for m in init["volumeMounts"]} == {"/app/dev"}, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes["dev-source"], where
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            for container in [init, *spec["containers"]]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
    assert "dev" in profiles
    dev_values = str(CHARTS.parent / "k8s" / "values" / "dev.yaml")
    refused = subprocess.run(
        [helm, "template", "emporium", str(charts_dir / "emporium"), "-f", dev_values]
        + ["--set", "global.environment=production", *INLINE_JWKS_ARGS],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "devReload" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize(
    ("values", "percentage"),
    [(None, 10), ("local.yaml", 100), ("kind.yaml", 100)],
)
def test_trace_sampling_defaults(render, values, percentage) -> None:
    """Production samples 10 % of new traces at the gateway and in the mesh (tracing every request costs the
    services a third more CPU, 10 % about 3 %: services/bench/README.md); make up and kind trace every request, so a
    test can fetch the trace of any request it makes."""
    args = ["-f", str(CHARTS.parent / "k8s" / "values" / values)] if values else []
    objects = render("emporium", *args, "--set", "tracing.enabled=true", "--set", "global.mesh.enabled=true")
    telemetries = [o for o in objects if o["kind"] == "Telemetry"]
    assert {o["metadata"]["name"] for o in telemetries} == {"emporium-gateway-tracing", "emporium-tracing"}
    for telemetry in telemetries:
        (rule,) = telemetry["spec"]["tracing"]
        assert rule["randomSamplingPercentage"] == percentage, telemetry["metadata"]["name"]
