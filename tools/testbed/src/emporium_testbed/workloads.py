"""Run a Deployment's container as a local process, configured exactly as the chart declares it.

The local platform has a real API server but no kubelet. Where a pod would run, this module builds the
process a kubelet would have started: the container's ``command``/``args``, its environment (literal
values, and ``secretKeyRef``/``configMapKeyRef`` read from the API server), and its Secret and ConfigMap
volumes written to a folder. Only what a pod's network would resolve changes: cluster DNS names of the
platform's Services become the loopback address and port of the process that replaces their pods.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# http://users.emporium.svc.cluster.local:8000/... or http://users.emporium.svc:8000 or http://users:8000
_SERVICE_URL = re.compile(
    r"(?P<scheme>https?|wss?|amqp)://(?P<service>[a-z0-9-]+)"
    r"(?:\.(?P<namespace>[a-z0-9-]+)(?:\.svc(?:\.cluster\.local)?)?)?:(?P<port>\d+)"
    # Only a whole authority: "amqp://user:1234@host" has userinfo, not a service on port 1234.
    r"(?=[/?#]|$)"
)


class WorkloadError(RuntimeError):
    """The Deployment refers to something the local platform cannot provide (a clear message says what)."""


@dataclass
class LocalContainer:
    """What a kubelet would run for one container, translated to a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    files: dict[Path, bytes] = field(default_factory=dict)  # Secret/ConfigMap volume contents to write
    port: int | None = None  # the local port of the containerPort named "http" (or the first one)
    ports: dict[str, int] = field(default_factory=dict)  # container port name -> local port


# A reader returns the decoded data of a Secret or ConfigMap: read(kind, namespace, name) -> {key: bytes}.
ObjectReader = Callable[[str, str, str], Mapping[str, bytes]]


def kube_reader(core_v1) -> ObjectReader:
    """An ObjectReader over a kubernetes.client.CoreV1Api."""

    def read(kind: str, namespace: str, name: str) -> Mapping[str, bytes]:
        if kind == "Secret":
            secret = core_v1.read_namespaced_secret(name, namespace)
            return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        config_map = core_v1.read_namespaced_config_map(name, namespace)
        return {k: v.encode() for k, v in (config_map.data or {}).items()}

    return read


def container_process(
    deployment: Mapping,
    read: ObjectReader,
    service_addresses: Mapping[tuple[str, str], tuple[str, int]],
    volume_root: Path,
    container_name: str | None = None,
    port_map: Mapping[int, int] | None = None,
) -> LocalContainer:
    """Translate one container of a rendered Deployment or Job (a dict) into a LocalContainer.

    ``service_addresses`` maps (namespace, service name) to the (host, port) of the local process that
    replaces its pods; ``volume_root`` is where Secret and ConfigMap volumes are materialised.
    ``port_map`` gives container ports their local ports: pods have a network namespace each, local
    processes share one. Env values equal to a mapped port and ``0.0.0.0:PORT`` binds in args are
    rewritten (binds go to 127.0.0.1: the local platform serves loopback only).
    """
    port_map = dict(port_map or {})
    namespace = deployment["metadata"].get("namespace", "default")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"]
    container = next((c for c in containers if c["name"] == container_name), containers[0])

    mounts: dict[str, Path] = {}  # mountPath -> local folder
    files: dict[Path, bytes] = {}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        local = volume_root / deployment["metadata"]["name"] / mount["name"]
        if "secret" in volume or "configMap" in volume:
            kind, source = (
                ("Secret", volume["secret"]) if "secret" in volume else ("ConfigMap", volume["configMap"])
            )
            name = source.get("secretName") or source.get("name")
            data = _read(read, kind, namespace, name, optional=source.get("optional", False))
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] in data:
                    files[local / item["path"]] = data[item["key"]]
        # emptyDir and the like: an empty local folder serves.
        mounts[mount["mountPath"].rstrip("/")] = local

    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            value = var["value"]
        elif "valueFrom" in var:
            value = _value_from(var, var["valueFrom"], read, namespace)
            if value is None:
                continue
        else:
            value = ""
        value = _localise(value, namespace, service_addresses, mounts)
        if value.isdigit() and int(value) in port_map:
            value = str(port_map[int(value)])
        env[var["name"]] = value

    argv = [_rebind(a, port_map) for a in [*container.get("command", []), *container.get("args", [])]]
    if not argv:
        raise WorkloadError(
            f"{deployment['metadata']['name']}: container {container['name']} has no command or args"
        )
    ports = container.get("ports", [])
    http = next((p for p in ports if p.get("name") == "http"), ports[0] if ports else None)
    local_port = {
        p.get("name", str(p["containerPort"])): port_map.get(p["containerPort"], p["containerPort"])
        for p in ports
    }
    return LocalContainer(
        name=deployment["metadata"]["name"],
        argv=[_localise(a, namespace, service_addresses, mounts) for a in argv],
        env=env,
        files=files,
        port=port_map.get(http["containerPort"], http["containerPort"]) if http else None,
        ports=local_port,
    )


def _rebind(arg: str, port_map: Mapping[int, int]) -> str:
    def replace(match: re.Match) -> str:
        port = int(match["port"])
        return f"127.0.0.1:{port_map.get(port, port)}"

    return re.sub(r"(?:0\.0\.0\.0|\[::\]|127\.0\.0\.1|localhost):(?P<port>\d+)", replace, arg)


def _read(read: ObjectReader, kind: str, namespace: str, name: str, optional: bool) -> Mapping[str, bytes]:
    try:
        return read(kind, namespace, name)
    except Exception as error:
        if optional:
            return {}
        raise WorkloadError(f"{kind} {namespace}/{name} is not readable: {error}") from error


def _value_from(var: Mapping, source: Mapping, read: ObjectReader, namespace: str) -> str | None:
    for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
        if key in source:
            ref = source[key]
            optional = ref.get("optional", False)
            data = _read(read, kind, namespace, ref["name"], optional)
            if ref["key"] not in data:
                if optional:
                    return None
                raise WorkloadError(
                    f"env {var['name']}: {kind} {namespace}/{ref['name']} has no key {ref['key']!r}"
                )
            return data[ref["key"]].decode()
    raise WorkloadError(f"env {var['name']}: only secretKeyRef and configMapKeyRef are supported locally")


def _localise(
    value: str,
    namespace: str,
    service_addresses: Mapping[tuple[str, str], tuple[str, int]],
    mounts: Mapping[str, Path],
) -> str:
    def replace(match: re.Match) -> str:
        key = (match["namespace"] or namespace, match["service"])
        if key not in service_addresses:
            return match[0]
        host, port = service_addresses[key]
        return f"{match['scheme']}://{host}:{port}"

    value = _SERVICE_URL.sub(replace, value)
    for mount_path, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(local) + value[len(mount_path) :]
    return value
