"""Smoke tests: the control plane is a real Kubernetes API (CEL, garbage collection, server-side apply,
RBAC, TokenRequest, EndpointSlices), reached with the toolchain's kubectl and the Python client."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
from emporium_testbed.toolchain import tool
from kubernetes import client, config
from kubernetes.client.rest import ApiException

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.emporium.dev"},
    "spec": {
        "group": "smoke.emporium.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def api(control_plane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(control_plane.kubeconfig))


@pytest.fixture
def namespace(api) -> str:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def kubectl(control_plane, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubectl"), f"--kubeconfig={control_plane.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_version_is_stamped(control_plane):
    version = json.loads(control_plane.get("/version"))
    assert version["gitVersion"] == "v1.34.4"
    assert (version["major"], version["minor"]) == ("1", "34")


def test_cel_rule_rejects_bad_object_with_server_message(control_plane, namespace):
    created = kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(WIDGET_CRD))
    assert created.returncode == 0, created.stderr
    wait_for(
        lambda: kubectl(control_plane, "get", "widgets.smoke.emporium.dev", "-A").returncode == 0,
        what="the Widget CRD to be served",
    )
    good = {
        "apiVersion": "smoke.emporium.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "ok", "namespace": namespace},
        "spec": {"min": 1, "max": 2},
    }
    bad = {**good, "metadata": {"name": "bad", "namespace": namespace}, "spec": {"min": 3, "max": 2}}
    assert kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(good)).returncode == 0
    rejected = kubectl(control_plane, "apply", "-f", "-", stdin=json.dumps(bad))
    assert rejected.returncode != 0
    assert "min must not exceed max" in rejected.stderr


def test_garbage_collector_deletes_owned_secret(api, namespace):
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"a": "b"})
    )
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid, block_owner_deletion=False
    )
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="owned", owner_references=[reference]), string_data={"k": "v"}
        ),
    )
    core.delete_namespaced_config_map("owner", namespace)

    def secret_gone() -> bool:
        try:
            core.read_namespaced_secret("owned", namespace)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(secret_gone, timeout=60, what="the garbage collector to delete the owned Secret")


def test_server_side_apply_reports_field_manager_conflict(control_plane, namespace):
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "shared", "namespace": namespace},
        "data": {"owner": "alice"},
    }
    first = kubectl(
        control_plane,
        "apply",
        "--server-side",
        "--field-manager=alice",
        "-f",
        "-",
        stdin=json.dumps(manifest),
    )
    assert first.returncode == 0, first.stderr
    manifest["data"]["owner"] = "bob"
    second = kubectl(
        control_plane, "apply", "--server-side", "--field-manager=bob", "-f", "-", stdin=json.dumps(manifest)
    )
    assert second.returncode != 0
    assert "conflict" in second.stderr.lower() and "alice" in second.stderr


def test_rbac_denies_and_token_request_authenticates(api, control_plane, namespace):
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    token = core.create_namespaced_service_account_token(
        "reader", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    as_reader = [
        "--token",
        token,
        "--kubeconfig=/dev/null",
        f"--server={control_plane.server}",
        f"--certificate-authority={control_plane.pki.path('ca.crt')}",
    ]

    def run(*args):
        return subprocess.run(
            [tool("kubectl"), *as_reader, *args], capture_output=True, text=True, timeout=30
        )

    denied = run("get", "secrets", "-n", namespace)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="secret-reader"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="secret-reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="secret-reader"
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ),
    )
    allowed = wait_for(
        lambda: (r := run("get", "secrets", "-n", namespace)).returncode == 0 and r,
        what="the RoleBinding to take effect",
    )
    assert allowed.returncode == 0


def test_endpointslice_mirrors_manual_endpoints(api, namespace):
    core = client.CoreV1Api(api)
    core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80, target_port=8000)]),
        ),
    )
    # A documentation address (TEST-NET-1): the API server refuses loopback addresses in Endpoints, and no
    # traffic is sent to it.
    core.create_namespaced_endpoints(
        namespace,
        client.V1Endpoints(
            metadata=client.V1ObjectMeta(name="web"),
            subsets=[
                client.V1EndpointSubset(
                    addresses=[client.V1EndpointAddress(ip="192.0.2.10")],
                    ports=[client.CoreV1EndpointPort(port=8000)],
                )
            ],
        ),
    )
    discovery = client.DiscoveryV1Api(api)

    def mirrored():
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web"
        )
        return [s for s in slices.items if s.endpoints]

    slices = wait_for(mirrored, timeout=60, what="an EndpointSlice mirrored from the manual Endpoints")
    assert slices[0].endpoints[0].addresses == ["192.0.2.10"]
    assert slices[0].ports[0].port == 8000


def test_namespace_deletion_completes(api):
    core = client.CoreV1Api(api)
    name = f"doomed-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(name, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x")))
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, timeout=60, what="the namespace controller to finish deleting the namespace")
