"""The local platform's long-lived servers: the same control plane, Postgres, RabbitMQ, SMTP sink and OpenID
provider as the test bed, kept running between commands.

State (ports, generated passwords, node name) is written once to ``<root>/state.json`` (mode 0600) so
that every later ``up`` finds the same servers and data, and ``down``/``status`` can reach processes an
earlier command started (through their pid files). Logs of every component go to ``<root>/logs``.

    python -m emporium_testbed.local up|down|status [--root .local]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from .controlplane import ControlPlane
from .oidc import MockOIDCProvider
from .postgres import PostgresServer
from .process import ManagedProcess, free_port, port_open
from .rabbitmq import RabbitMQServer
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
        "smtp_port": free_port(),
        "oidc_port": free_port(),
    }


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
        data = self.root / "data"
        self.control_plane = ControlPlane(
            data / "kube",
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
            if missing:  # a platform made before a component was added: keep what it has, add the rest
                state.update(missing)
                self.state_path.write_text(json.dumps(state, indent=2))
            return state
        self.root.mkdir(parents=True, exist_ok=True)
        state = _new_state()
        self.state_path.write_text(json.dumps(state, indent=2))
        self.state_path.chmod(0o600)
        return state

    def up(self) -> None:
        """Start whatever is not running; a no-op for what already is."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres and rabbitmq users must reach their data folders
        (self.root / "data").mkdir(exist_ok=True)
        (self.root / "data").chmod(0o755)
        self.logs.mkdir(exist_ok=True)
        if not self.control_plane.running():
            self.control_plane.stop()  # a half-running plane from a crash is restarted whole
            self.control_plane.start()
        if not (self.postgres.process.running() and self.postgres.ready()):
            self.postgres.stop()
            self.postgres.start()
        if not (self.rabbitmq.running() and _safe(self.rabbitmq.ready)):
            self.rabbitmq.stop()
            self.rabbitmq.start()
        if not self.smtp.running():
            self.smtp.start()
            self.smtp.wait_ready(lambda: port_open("127.0.0.1", self.smtp_port), 30)
        if not (self.oidc.running() and _safe(self.oidc.ready)):
            self.oidc.stop()
            self.oidc.start()

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
