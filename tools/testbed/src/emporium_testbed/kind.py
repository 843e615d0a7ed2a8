"""The kind platform for tests and benchmarks: `make kind-up` (tools/kind/cluster.sh up: the cluster, Istio,
the data services, `skaffold run`) as a context manager that deletes the cluster again on exit.

    with KindPlatform() as cluster:
        cluster.kubectl("get", "pods", "-A")

The cluster is the one `make kind-up` makes (``emporium``, context ``kind-emporium``), so an existing one is
refused with a clear message (``make kind-down`` removes it) unless ``EMPORIUM_KIND_REUSE=1`` says to use it
as it is; ``EMPORIUM_KIND_KEEP=1`` leaves the cluster running on exit (for the next run to reuse).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from emporium_testbed.toolchain import tool

REPO_ROOT = Path(__file__).resolve().parents[4]
CLUSTER = "emporium"
CONTEXT = f"kind-{CLUSTER}"
CLUSTER_SCRIPT = REPO_ROOT / "tools" / "kind" / "cluster.sh"
# `make test` runs the kind suite whenever Docker can run containers (EMPORIUM_KIND=0 turns it off)
RUN_BY_DEFAULT = True
LOG_DIR = Path(os.environ.get("EMPORIUM_CACHE", Path.home() / ".cache" / "emporium")) / "kind" / "logs"


class KindError(RuntimeError):
    """`make kind-up` or `make kind-down` failed (the message names the log)."""


def kind_unavailable() -> str | None:
    """Why the kind platform cannot run here, or None when it can (Docker runs containers, or we are root
    and tools/kind/cluster.sh installs and starts it)."""
    if os.environ.get("EMPORIUM_DOCKER") == "0":  # tools/test.sh: tools/kind/cluster.sh docker found none
        return "Docker cannot run containers here (EMPORIUM_DOCKER=0)"
    if not CLUSTER_SCRIPT.exists():
        return f"{CLUSTER_SCRIPT} is missing"
    if os.geteuid() == 0:
        return None
    if shutil.which("docker") is None:
        return "no docker and not root (make kind-up installs Debian's docker.io as root)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    return None if info.returncode == 0 else f"docker does not answer: {info.stderr.strip()[:200]}"


def cluster_exists() -> bool:
    names = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label=io.x-k8s.kind.cluster={CLUSTER}",
            "--format",
            "{{.Names}}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return names.returncode == 0 and bool(names.stdout.strip())


def _cluster_script(command: str, log: Path, timeout: float) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), command],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=REPO_ROOT,
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise KindError(f"tools/kind/cluster.sh {command} failed (log: {log}):\n{tail}")
    return time.monotonic() - started


class KindPlatform:
    kubectl_args = ["--context", CONTEXT]

    def __init__(self, up_timeout: float = 3600) -> None:
        self.up_timeout = up_timeout
        self.reused = False
        self.up_seconds: float | None = None

    def __enter__(self) -> KindPlatform:
        if cluster_exists():
            if os.environ.get("EMPORIUM_KIND_REUSE") != "1":
                raise KindError(
                    f"a kind cluster {CLUSTER!r} already exists: `make kind-down` deletes it "
                    "(or EMPORIUM_KIND_REUSE=1 runs against it as it is)"
                )
            self.reused = True
        else:
            try:
                self.up_seconds = _cluster_script("up", LOG_DIR / "test-kind-up.log", self.up_timeout)
            except BaseException:
                self._down()
                raise
            print(f"kind-up: {self.up_seconds:.0f} s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reused or os.environ.get("EMPORIUM_KIND_KEEP") == "1":
            return
        self._down()
        if cluster_exists():
            raise KindError(f"containers of the kind cluster {CLUSTER!r} are left after kind-down")

    def _down(self) -> None:
        _cluster_script("down", LOG_DIR / "test-kind-down.log", 600)

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 180) -> str:
        result = subprocess.run(
            [tool("kubectl"), *self.kubectl_args, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise KindError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def secret(self, namespace: str, name: str) -> dict[str, str]:
        data = json.loads(self.kubectl("get", "secret", name, "-n", namespace, "-o", "json"))["data"]
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    def admin_env(self) -> dict[str, str]:
        return self.secret("emporium", "users-admin")

    def mails(self) -> list[str]:
        """Every mail mailpit holds, each as the JSON of its summary (addresses, subject, snippet)."""
        listing = json.loads(
            self.kubectl(
                "get", "--raw", "/api/v1/namespaces/mail/services/http:mailpit:8025/proxy/api/v1/messages"
            )
        )
        return [json.dumps(message) for message in listing.get("messages") or []]
