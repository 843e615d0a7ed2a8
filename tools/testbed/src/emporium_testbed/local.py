"""The local platform's long-lived servers: the same control plane, Postgres, RabbitMQ, SMTP sink and OpenID
provider as the test bed, kept running between commands.

State (ports, generated passwords, node name) is written once to ``<root>/state.json`` (mode 0600) so
that every later ``up`` finds the same servers and data, and ``down``/``status`` can reach processes an
earlier command started (through their pid files). Logs of every component go to ``<root>/logs``.

    python -m emporium_testbed.local up|down|status [--root .local]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .controlplane import ControlPlane
from .oidc import MockOIDCProvider
from .postgres import PG_USER, PostgresServer
from .process import (
    BACKGROUND_NICE,
    CRITICAL_NICE,
    ManagedProcess,
    free_port,
    is_root,
    port_open,
    set_priority,
)
from .rabbitmq import RABBIT_USER, RabbitMQServer
from .toolchain import REPO_ROOT

DEFAULT_ROOT = REPO_ROOT / ".local"
OIDC_ISSUER_ID = "emporium"  # the local provider's issuer: http://127.0.0.1:<oidc_port>/emporium


def _new_state() -> dict:
    return {
        "etcd_port": free_port(),
        "etcd_peer_port": free_port(),
        "apiserver_port": free_port(),
        "controller_manager_port": free_port(),
        "postgres_port": free_port(),
        "postgres_password": secrets.token_urlsafe(18),
        "rabbitmq_amqp_port": free_port(),
        "rabbitmq_management_port": free_port(),
        "rabbitmq_dist_port": free_port(),
        "rabbitmq_epmd_port": free_port(),
        "rabbitmq_password": secrets.token_urlsafe(18),
        "rabbitmq_node": f"emporium-{secrets.token_hex(4)}@localhost",
        "rabbitmq_prometheus_port": free_port(),  # the rabbitmq_prometheus plugin (Prometheus scrapes it)
        "smtp_port": free_port(),
        "oidc_port": free_port(),
    }


# A Unix socket path must fit in 108 bytes; Postgres puts `.s.PGSQL.<port>` in its socket folder.
_MAX_SOCKET_DIR = 75


def server_data_dir(root: Path) -> Path:
    """Where Postgres and RabbitMQ keep their data: ``<root>/data`` when the servers can use it, else a
    folder of this machine's own named after the clone.

    As root, Postgres and RabbitMQ run as their own users, which cannot enter a clone below a folder only
    its owner may enter (``mktemp -d``, a 0700 home); Postgres's socket path must be short; and RabbitMQ's
    start scripts break on paths with spaces. A clone like that gets ``/var/lib/emporium/<hash>`` (root)
    or ``~/.local/state/emporium/<hash>`` instead, and ``<root>/data/servers`` links to it.
    """
    default = root / "data"
    unsafe = any(c.isspace() for c in str(default.resolve())) or len(str(default.resolve())) > _MAX_SOCKET_DIR
    if not unsafe and is_root():
        default.mkdir(parents=True, exist_ok=True)
        for folder in (root, default):
            folder.chmod(0o755)
        unsafe = not all(_can_enter(user, default) for user in (PG_USER, RABBIT_USER))
    if not unsafe:
        return default
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    base = Path("/var/lib/emporium") if is_root() else Path.home() / ".local" / "state" / "emporium"
    return base / digest


def _can_enter(user: str, path: Path) -> bool:
    """Whether user can reach path (search permission on every folder above it)."""
    result = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)], capture_output=True)
    return result.returncode == 0


@dataclass
class Component:
    name: str
    running: bool
    detail: str


class LocalServers:
    """The control plane, Postgres, RabbitMQ and SMTP sink of one local platform under root."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.state_path = self.root / "state.json"
        self.state = self._load_state()
        s = self.state
        data = Path(s["server_data"])
        self.control_plane = ControlPlane(
            self.root / "data" / "kube",  # runs as us: any path will do
            etcd_port=s["etcd_port"],
            etcd_peer_port=s["etcd_peer_port"],
            apiserver_port=s["apiserver_port"],
            controller_manager_port=s["controller_manager_port"],
            kubeconfig=self.root / "kubeconfig",
            log_dir=self.logs,
        )
        self.postgres = PostgresServer(
            data / "postgres", port=s["postgres_port"], password=s["postgres_password"], log_dir=self.logs
        )
        self.rabbitmq = RabbitMQServer(
            data / "rabbitmq",
            amqp_port=s["rabbitmq_amqp_port"],
            management_port=s["rabbitmq_management_port"],
            dist_port=s["rabbitmq_dist_port"],
            epmd_port=s["rabbitmq_epmd_port"],
            admin_password=s["rabbitmq_password"],
            node_name=s["rabbitmq_node"],
            log_dir=self.logs,
            prometheus_port=s["rabbitmq_prometheus_port"],
        )
        self.smtp_port = s["smtp_port"]
        self.maildir = self.root / "mail"
        self.smtp = ManagedProcess(
            "smtp-sink",
            [
                sys.executable,
                "-m",
                "emporium_testbed.smtp",
                "--port",
                str(self.smtp_port),
                "--maildir",
                str(self.maildir),
            ],
            self.logs / "smtp-sink.log",
            pid_path=self.root / "run" / "smtp-sink.pid",
        )

        # A real OpenID provider for "sign in with ..." (the users chart's provider "mock" on make up).
        self.oidc = MockOIDCProvider(
            data / "oidc",
            port=s["oidc_port"],
            pid_path=self.root / "run" / "oidc-provider.pid",
            log_dir=self.logs,
        )

    def _load_state(self) -> dict:
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            missing = {k: v for k, v in _new_state().items() if k not in state}
            missing.setdefault("server_data", str(self.root / "data"))  # state from before this setting
            missing = {k: v for k, v in missing.items() if k not in state}
            if missing:  # a platform made before a component was added: keep what it has, add the rest
                state.update(missing)
                self.state_path.write_text(json.dumps(state, indent=2))
            return state
        self.root.mkdir(parents=True, exist_ok=True)
        state = {**_new_state(), "server_data": str(server_data_dir(self.root))}
        self.state_path.write_text(json.dumps(state, indent=2))
        self.state_path.chmod(0o600)
        return state

    def up(self) -> None:
        """Start whatever is not running (all four at once); a no-op for what already is."""
        self.prepare()
        steps = (
            self.start_control_plane,
            self.start_postgres,
            self.start_rabbitmq,
            self.start_smtp,
            self.start_oidc,
        )
        with ThreadPoolExecutor(len(steps)) as pool:
            started = [pool.submit(step) for step in steps]
        for future in started:
            future.result()  # the first failure, if any, with its log's path

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres and rabbitmq users may need to reach <root>/data
        self.logs.mkdir(exist_ok=True)
        data = Path(self.state["server_data"])
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o755)  # the postgres and rabbitmq users must reach their data folders
        if data != self.root / "data":
            (data / "OWNER").write_text(f"data of the Emporium local platform in {self.root.resolve()}\n")
            link = self.root / "data" / "servers"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(data)

    def start_control_plane(self, wait_for_controllers: bool = True) -> None:
        if not self.control_plane.running():
            self.control_plane.stop()  # a half-running plane from a crash is restarted whole
            self.control_plane.start(wait_for_controllers=wait_for_controllers)

    def start_postgres(self) -> None:
        if not (self.postgres.process.running() and self.postgres.ready()):
            self.postgres.stop()
            self.postgres.start()

    def start_rabbitmq(self) -> None:
        if not (self.rabbitmq.running() and _safe(self.rabbitmq.ready)):
            self.rabbitmq.stop()
            # The longest step of a warm start: a restarted node loads and compiles every module of
            # every plugin to look for schema upgrades (over 10 s here), while everything else starts.
            self.rabbitmq.process.nice = CRITICAL_NICE
            self.rabbitmq.start()
            set_priority(self.rabbitmq.process.pid, 0)  # booted: an equal among the others again

    def start_smtp(self) -> None:
        if not self.smtp.running():
            self.smtp.start()
            self.smtp.wait_ready(lambda: port_open("127.0.0.1", self.smtp_port), 30)

    def start_oidc(self) -> None:
        if not (self.oidc.running() and _safe(self.oidc.ready)):
            self.oidc.stop()
            # Its JVM's start costs seconds of CPU that the rest of a start needs more (nothing waits
            # for it but "Sign in with"); at full priority again once it serves.
            self.oidc.process.nice = BACKGROUND_NICE
            self.oidc.start(timeout=180)
            set_priority(self.oidc.process.pid, 0)

    def processes(self) -> list[ManagedProcess]:
        """Every process these servers run, for stopping what a failed start left behind."""
        return [
            *self.control_plane.processes(),
            self.postgres.process,
            self.rabbitmq.process,
            self.rabbitmq.epmd,
            self.smtp,
            self.oidc.process,
        ]

    def down(self) -> None:
        self.oidc.stop()
        self.smtp.stop()
        self.rabbitmq.stop()
        self.postgres.stop()
        self.control_plane.stop()

    def status(self) -> list[Component]:
        cp = self.control_plane
        return [
            Component("control plane", cp.running(), f"{cp.server} (KUBECONFIG={cp.kubeconfig})"),
            Component(
                "postgres", self.postgres.process.running(), f"{self.postgres.host}:{self.postgres.port}"
            ),
            Component(
                "rabbitmq",
                self.rabbitmq.running(),
                f"amqp 127.0.0.1:{self.rabbitmq.amqp_port}, management {self.rabbitmq.management_url}",
            ),
            Component(
                "smtp sink", self.smtp.running(), f"127.0.0.1:{self.smtp_port}, mail in {self.maildir}"
            ),
            Component("oidc provider", self.oidc.running(), f"issuer {self.oidc.issuer(OIDC_ISSUER_ID)}"),
        ]


def _safe(check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("EMPORIUM_LOCAL", DEFAULT_ROOT)))
    args = parser.parse_args(argv)
    servers = LocalServers(args.root)
    if args.command == "up":
        servers.up()
    elif args.command == "down":
        servers.down()
    components = servers.status()
    for component in components:
        print(f"{component.name:14} {'running' if component.running else 'stopped':8} {component.detail}")
    if args.command == "status":
        return 0 if all(c.running for c in components) else 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
