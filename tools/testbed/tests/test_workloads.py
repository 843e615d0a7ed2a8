"""Translating a Deployment's container into a local process (pure logic, no servers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from emporium_testbed.toolchain import REPO_ROOT, tool
from emporium_testbed.workloads import WorkloadError, container_process

DEPLOYMENT = {
    "metadata": {"name": "orders", "namespace": "shop"},
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "orders",
                        "args": ["python", "-m", "emporium_orders", "serve"],
                        "ports": [
                            {"name": "metrics", "containerPort": 9000},
                            {"name": "http", "containerPort": 8000},
                        ],
                        "env": [
                            {"name": "PRODUCTS_URL", "value": "http://products.shop.svc.cluster.local:8000"},
                            {"name": "JWKS_URL", "value": "http://users:8000/.well-known/jwks.json"},
                            {"name": "OTHER_URL", "value": "http://elsewhere.example:8000"},
                            {"name": "AMQP_URL", "value": "amqp://orders:1234@10.0.0.9:5672/shop"},
                            {
                                "name": "DATABASE_URL",
                                "valueFrom": {"secretKeyRef": {"name": "orders-db", "key": "DATABASE_URL"}},
                            },
                            {
                                "name": "MAYBE",
                                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}},
                            },
                            {"name": "JWT_KEYS_DIR", "value": "/var/run/keys"},
                        ],
                        "volumeMounts": [
                            {"name": "keys", "mountPath": "/var/run/keys"},
                            {"name": "tmp", "mountPath": "/tmp"},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "keys", "secret": {"secretName": "signing-keys"}},
                    {"name": "tmp", "emptyDir": {}},
                ],
            }
        }
    },
}

OBJECTS = {
    ("Secret", "shop", "orders-db"): {"DATABASE_URL": b"postgresql://u:p@127.0.0.1:5432/orders"},
    ("Secret", "shop", "signing-keys"): {"current.pem": b"PEM"},
}


def read(kind, namespace, name):
    try:
        return OBJECTS[(kind, namespace, name)]
    except KeyError:
        raise LookupError(f"{kind} {name} not found") from None


ADDRESSES = {
    ("shop", "products"): ("127.0.0.1", 18001),
    ("shop", "users"): ("127.0.0.1", 18000),
    ("shop", "orders"): ("127.0.0.1", 18002),
}


def test_env_secrets_volumes_and_service_addresses(tmp_path):
    local = container_process(DEPLOYMENT, read, ADDRESSES, tmp_path)
    assert local.argv == ["python", "-m", "emporium_orders", "serve"]
    assert local.port == 8000
    assert local.env["PRODUCTS_URL"] == "http://127.0.0.1:18001"
    assert local.env["JWKS_URL"] == "http://127.0.0.1:18000/.well-known/jwks.json"
    assert local.env["OTHER_URL"] == "http://elsewhere.example:8000"
    assert local.env["AMQP_URL"] == "amqp://orders:1234@10.0.0.9:5672/shop"  # userinfo, not a service URL
    assert local.env["DATABASE_URL"] == "postgresql://u:p@127.0.0.1:5432/orders"
    assert "MAYBE" not in local.env
    assert local.env["JWT_KEYS_DIR"] == str(tmp_path / "orders" / "keys")
    assert local.files == {tmp_path / "orders" / "keys" / "current.pem": b"PEM"}


def test_missing_secret_key_is_a_clear_error(tmp_path):
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    env = broken["spec"]["template"]["spec"]["containers"][0]["env"]
    next(v for v in env if v["name"] == "DATABASE_URL")["valueFrom"]["secretKeyRef"]["key"] = "URI"
    with pytest.raises(WorkloadError, match="orders-db has no key 'URI'"):
        container_process(broken, read, ADDRESSES, tmp_path)


def test_every_deployment_of_the_umbrella_chart_translates(tmp_path):
    """The umbrella chart's Deployments use only what the local platform can provide."""
    chart = REPO_ROOT / "charts" / "emporium"
    subprocess.run([tool("helm"), "dependency", "build", str(chart)], check=True, capture_output=True)
    rendered = subprocess.run(
        [tool("helm"), "template", "emporium", str(chart), "--namespace", "emporium"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    deployments = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} >= {"users", "products", "orders", "notifications"}
    services = {
        ("emporium", d["metadata"]["name"]): ("127.0.0.1", 20000 + i) for i, d in enumerate(deployments)
    }

    def any_secret(kind, namespace, name):
        return _AnyKeys()

    for deployment in deployments:
        deployment["metadata"].setdefault("namespace", "emporium")
        local = container_process(deployment, any_secret, services, Path(tmp_path))
        assert local.argv[:2] == ["python", "-m"], local.argv
        assert local.port == 8000
        env = " ".join(local.env.values())
        for _, service in services:
            assert f"//{service}.emporium.svc" not in env, local.env  # every platform URL now points locally


class _AnyKeys(dict):
    """A Secret that has every key (its value names the key)."""

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return f"value-of-{key}".encode()

    def __iter__(self):
        return iter(())


def test_ports_are_remapped_and_binds_stay_on_loopback(tmp_path):
    operator = {
        "metadata": {"name": "op", "namespace": "system"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "operator",
                            "args": ["kopf", "run", "--liveness=http://0.0.0.0:8080/healthz"],
                            "ports": [
                                {"name": "healthz", "containerPort": 8080},
                                {"name": "http-metrics", "containerPort": 9090},
                            ],
                            "env": [
                                {"name": "METRICS_PORT", "value": "9090"},
                                {"name": "RETRIES", "value": "3"},
                            ],
                        }
                    ]
                }
            }
        },
    }
    local = container_process(operator, read, {}, tmp_path, port_map={8080: 31001, 9090: 31002})
    assert local.argv[-1] == "--liveness=http://127.0.0.1:31001/healthz"
    assert local.env == {"METRICS_PORT": "31002", "RETRIES": "3"}
    assert local.ports == {"healthz": 31001, "http-metrics": 31002}
