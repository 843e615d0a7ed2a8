"""What only a real cluster proves (the session's kind cluster, tests/e2e/conftest.py): every app pod has its
sidecar, STRICT mTLS refuses plaintext from outside the mesh, NetworkPolicies are enforced, the pods run as
non-root on read-only root filesystems and pass their probes, the operator runs in-cluster under its chart's
ServiceAccount, and a rollout restart under load loses nothing.

Probe pods run the products image (Python with httpx) with a few lines of Python and report JSON on stdout.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import textwrap
import threading
import time
import uuid

import httpx
import pytest
import yaml
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.kind import REPO_ROOT, KindPlatform
from emporium_testbed.toolchain import tool

GATEWAY = f"http://127.0.0.1:{GATEWAY_PORT}"
SERVICES = ("users", "products", "orders", "notifications")
pytestmark = pytest.mark.timeout(2400)


def app_pods(cluster: KindPlatform) -> list[dict]:
    pods = json.loads(
        cluster.kubectl(
            "get",
            "pods",
            "-n",
            "emporium",
            "-l",
            "app.kubernetes.io/name in (users,products,orders,notifications)",
            "-o",
            "json",
        )
    )["items"]
    return [p for p in pods if p["metadata"].get("ownerReferences", [{}])[0].get("kind") == "ReplicaSet"]


def run_probe(
    cluster: KindPlatform, namespace: str, code: str, *, mesh: bool = False, timeout: int = 120
) -> dict:
    """Runs `code` (Python, prints one JSON line) in a pod of `namespace` and returns what it printed."""
    image = json.loads(cluster.kubectl("get", "deployment", "products", "-n", "emporium", "-o", "json"))[
        "spec"
    ]["template"]["spec"]["containers"][0]["image"]
    name = f"probe-{uuid.uuid4().hex[:8]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "e2e-probe"},
            "annotations": {
                "sidecar.istio.io/inject": "true" if mesh else "false",
                "proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": true}',
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-c", textwrap.dedent(code)],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))["status"]
            probe = next((c for c in status.get("containerStatuses", []) if c["name"] == "probe"), None)
            if probe and probe["state"].get("terminated"):
                break
            time.sleep(2)
        else:
            raise AssertionError(f"probe pod {namespace}/{name} did not finish in {timeout} s: {status}")
        out = cluster.kubectl("logs", name, "-n", namespace, "-c", "probe")
        return json.loads(out.strip().splitlines()[-1])
    finally:
        cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false")


@pytest.fixture(scope="module")
def outsider(kind_cluster: KindPlatform):
    """A namespace outside the mesh that no NetworkPolicy admits."""
    kind_cluster.kubectl("create", "namespace", "e2e-outsider")
    yield "e2e-outsider"
    kind_cluster.kubectl("delete", "namespace", "e2e-outsider", "--wait=false")


HTTP_GET = """
import json, httpx
try:
    r = httpx.get("{url}", timeout=10)
    print(json.dumps({{"status": r.status_code}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "detail": str(e)[:200]}}))
"""

# Tries for `seconds` and stops at the first connection: a new pod's address reaches the CNI's NetworkPolicy
# sets a moment after the pod starts, so a single early try says nothing either way.
TCP_CONNECT = """
import json, socket, time
deadline, errors = time.monotonic() + {seconds}, set()
while time.monotonic() < deadline:
    try:
        socket.create_connection(("{host}", {port}), timeout=5).close()
        print(json.dumps({{"connected": True}}))
        break
    except Exception as e:
        errors.add(type(e).__name__)
        time.sleep(1)
else:
    print(json.dumps({{"connected": False, "errors": sorted(errors)}}))
"""

PRODUCTS = "http://products.emporium.svc.cluster.local:8000"


def test_every_app_pod_has_its_sidecar(kind_cluster):
    pods = app_pods(kind_cluster)
    assert {p["metadata"]["labels"]["app.kubernetes.io/name"] for p in pods} == set(SERVICES)
    for pod in pods:
        spec, status = pod["spec"], pod["status"]
        # native sidecar (an init container that keeps running) or a classic second container
        sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "istio-proxy"]
        sidecars += [c for c in spec["containers"] if c["name"] == "istio-proxy"]
        assert len(sidecars) == 1, pod["metadata"]["name"]
        statuses = status.get("initContainerStatuses", []) + status.get("containerStatuses", [])
        proxy = next(s for s in statuses if s["name"] == "istio-proxy")
        assert proxy["ready"], (pod["metadata"]["name"], proxy)


def test_strict_mtls_refuses_plaintext_from_outside_the_mesh(kind_cluster):
    # The monitoring namespace may reach the app port (NetworkPolicy: Prometheus), but it has no sidecar:
    # its plaintext request must be refused by the products sidecar (STRICT PeerAuthentication).
    outside = run_probe(kind_cluster, "monitoring", HTTP_GET.format(url=f"{PRODUCTS}/health"))
    assert "error" in outside, outside  # reset by the sidecar: no HTTP answer at all
    inside = run_probe(kind_cluster, "emporium", HTTP_GET.format(url=f"{PRODUCTS}/health"), mesh=True)
    assert inside == {"status": 200}, inside  # the same request with a sidecar (mTLS) is answered


def test_network_policies_keep_other_namespaces_out(kind_cluster, outsider):
    internal = run_probe(
        kind_cluster, outsider, HTTP_GET.format(url=f"{PRODUCTS}/internal/stock/reservations")
    )
    assert "error" in internal, internal
    # from the services' namespace the database is reachable (the policy admits it, not a broken network)
    postgres = {"host": "postgres.data.svc.cluster.local", "port": 5432}
    allowed = run_probe(kind_cluster, "emporium", TCP_CONNECT.format(seconds=60, **postgres))
    assert allowed == {"connected": True}, allowed
    # from elsewhere it is not, however long the pod keeps trying (dropped or rejected by the CNI's policy)
    refused = run_probe(kind_cluster, outsider, TCP_CONNECT.format(seconds=20, **postgres))
    assert refused["connected"] is False, refused


def test_pods_run_as_non_root_with_read_only_root_and_pass_probes(kind_cluster):
    for pod in app_pods(kind_cluster):
        name = pod["metadata"]["name"]
        app = next(c for c in pod["spec"]["containers"] if c["name"] != "istio-proxy")
        context = {**pod["spec"].get("securityContext", {}), **app.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert app.get("readinessProbe") and app.get("livenessProbe"), name
        status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == app["name"])
        assert status["ready"] and status["restartCount"] == 0, (name, status)
        # the process really runs as that uid, and the root filesystem refuses writes
        probe = kind_cluster.kubectl(
            "exec",
            name,
            "-n",
            "emporium",
            "-c",
            app["name"],
            "--",
            "python",
            "-c",
            "import os\ntry:\n open('/x','w')\n w='writable'\nexcept OSError as e:\n w=type(e).__name__\n"
            "print(os.getuid(), w)",
        )
        uid, writable = probe.split()
        assert uid == str(context["runAsUser"]) and writable != "writable", (name, probe)


def test_operator_runs_in_cluster_under_its_service_account(kind_cluster):
    pods = json.loads(
        kind_cluster.kubectl(
            "get",
            "pods",
            "-n",
            "emporium-system",
            "-l",
            "app.kubernetes.io/name=emporium-operator",
            "-o",
            "json",
        )
    )["items"]
    # the chart's two replicas, one active: the holder of the Lease
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    accounts = {pod["spec"]["serviceAccountName"] for pod in pods}
    assert len(accounts) == 1 and not accounts & {"", "default"}, accounts
    (account,) = accounts
    for pod in pods:
        assert all(s["ready"] for s in pod["status"]["containerStatuses"]), pod["metadata"]["name"]
    lease = json.loads(
        kind_cluster.kubectl("get", "lease", "emporium-operator", "-n", "emporium-system", "-o", "json")
    )
    holder = lease["spec"]["holderIdentity"]
    assert any(holder.startswith(pod["metadata"]["name"]) for pod in pods), holder
    # its permissions are the chart's least-privilege RBAC: it manages PostgresDatabases in the namespaces it
    # serves, not cluster-wide; it may not delete nodes, nor read Secrets outside those namespaces
    sa = f"system:serviceaccount:emporium-system:{account}"
    assert can_i(kind_cluster, "patch", "postgresdatabases.emporium.dev", sa, namespace="emporium") == "yes"
    assert can_i(kind_cluster, "patch", "postgresdatabases.emporium.dev", sa, namespace="default") == "no"
    assert can_i(kind_cluster, "delete", "nodes", sa) == "no"
    assert can_i(kind_cluster, "get", "secrets", sa, namespace="kube-system") == "no"


def can_i(cluster: KindPlatform, verb: str, resource: str, who: str, namespace: str | None = None) -> str:
    """`kubectl auth can-i` (exits 1 when the answer is no, so not through cluster.kubectl)."""
    where = ["-n", namespace] if namespace else ["-A"]
    result = subprocess.run(
        [tool("kubectl"), *cluster.kubectl_args, "auth", "can-i", verb, resource, "--as", who, *where],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_rollout_restart_under_load_loses_nothing(kind_cluster):
    """Light bounded load through the ingress (2 buyers, at most 90 s) while orders and products restart:
    no 5xx, and every order that was accepted is there afterwards."""
    admin = kind_cluster.admin_env()
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        login = http.post(
            "/users/login", json={"email": admin["ADMIN_EMAIL"], "password": admin["ADMIN_PASSWORD"]}
        )
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        product = http.post(
            "/products",
            json={
                "name": "Restart",
                "price": "1.00",
                "stock_quantity": 10000,
                "sku": f"RST-{uuid.uuid4().hex[:6]}",
            },
            headers=headers,
        ).json()

    stop = threading.Event()
    codes: list[int] = []
    accepted: list[str] = []
    errors: list[str] = []  # every 5xx: when, what, and what the edge or the service said
    started = time.monotonic()

    def note(r: httpx.Response) -> None:
        codes.append(r.status_code)
        if r.status_code >= 500:
            when = time.monotonic() - started
            errors.append(f"{when:.0f}s {r.request.method} {r.url.path}: {r.text[:120]}")

    def buyer() -> None:
        with httpx.Client(base_url=GATEWAY, timeout=30) as client:
            while not stop.is_set():
                r = client.post(
                    "/orders", json={"items": [{"product_id": product["id"], "quantity": 1}]}, headers=headers
                )
                note(r)
                if r.status_code == 201:
                    accepted.append(r.json()["id"])
                note(client.get("/products", params={"limit": 5}))
                time.sleep(0.2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(buyer) for _ in range(2)]
        try:
            time.sleep(3)
            kind_cluster.kubectl(
                "rollout", "restart", "deployment/orders", "deployment/products", "-n", "emporium"
            )
            for deployment in ("orders", "products"):
                kind_cluster.kubectl(
                    "rollout",
                    "status",
                    f"deployment/{deployment}",
                    "-n",
                    "emporium",
                    "--timeout=180s",
                    timeout=200,
                )
            time.sleep(3)
        finally:
            stop.set()
            for future in futures:
                future.result(timeout=60)
    assert codes and not errors, errors
    assert accepted
    with httpx.Client(base_url=GATEWAY, timeout=30) as http:
        for order_id in accepted:
            assert http.get(f"/orders/{order_id}", headers=headers).status_code == 200, order_id


def test_enabling_a_service_in_an_upgrade_does_not_wait_on_its_migration(kind_cluster):
    """notifications off, then on again in an upgrade: its migration Job must not be a pre-upgrade hook (its
    database Secret and ServiceAccount only come with the upgrade, so such a Job could never start and the
    upgrade would hang until its timeout); it runs post-upgrade, and the upgrade finishes promptly."""
    chart = REPO_ROOT / "charts" / "emporium"
    helm = [tool("helm"), "--kube-context", kind_cluster.kubectl_args[1]]
    subprocess.run([*helm, "dependency", "build", str(chart)], check=True, capture_output=True, timeout=300)

    def upgrade(enabled: bool, timeout: int, *extra: str) -> float:
        started = time.monotonic()
        result = subprocess.run(
            [
                *helm,
                "upgrade",
                "emporium",
                str(chart),
                "-n",
                "emporium",
                "--reuse-values",
                "--set",
                f"notifications.enabled={str(enabled).lower()}",
                "--timeout",
                f"{timeout}s",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return time.monotonic() - started

    upgrade(False, 300, "--no-hooks")  # the other services' migrations have nothing to do: skipped
    deadline = time.monotonic() + 120
    while any(
        p["metadata"]["labels"]["app.kubernetes.io/name"] == "notifications" for p in app_pods(kind_cluster)
    ):
        assert time.monotonic() < deadline, "notifications pods still there after it was disabled"
        time.sleep(3)
    seconds = upgrade(True, 300)
    assert seconds < 240, seconds
    job = json.loads(
        kind_cluster.kubectl("get", "job", "notifications-migrate", "-n", "emporium", "-o", "json")
    )
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert job["status"].get("succeeded") == 1, job["status"]
    kind_cluster.kubectl(
        "rollout", "status", "deployment/notifications", "-n", "emporium", "--timeout=180s", timeout=200
    )
