"""A throwaway RabbitMQ node (Debian's rabbitmq-server) with the management plugin.

Every path the node writes (data, logs, feature flags, plugins, cookie) lives in base_dir, owned by the
``rabbitmq`` user when we are root, and the node has its own name, ports and epmd, so several nodes can
run side by side and none touches /var/lib/rabbitmq.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .process import ManagedProcess, as_user, chown_to, free_port, is_root, port_open

RABBIT_USER = "rabbitmq"
RABBIT_SBIN = Path("/usr/lib/rabbitmq/bin")


def rabbit_bin(name: str) -> str:
    path = RABBIT_SBIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"RabbitMQ's {name} not found: install Debian's rabbitmq-server (make test does this as root)"
        )
    return found


@dataclass
class RabbitMQServer:
    """A RabbitMQ node with AMQP on 127.0.0.1:amqp_port and management on 127.0.0.1:management_port."""

    base_dir: Path
    amqp_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    admin_user: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    node_name: str = field(default_factory=lambda: f"emporium-{secrets.token_hex(4)}@localhost")
    host: str = "127.0.0.1"
    log_dir: Path | None = None  # default: base_dir
    prometheus_port: int | None = None  # the rabbitmq_prometheus plugin's /metrics (off when None)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        log_dir = Path(self.log_dir or self.base_dir)
        self.log_path = log_dir / "rabbitmq.log"
        env = {
            "HOME": str(self.base_dir),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base_dir / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.base_dir / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.base_dir / "plugins-expand"),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
            "RABBITMQ_PID_FILE": str(self.base_dir / "rabbitmq.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base_dir / "rabbitmq-env.conf"),
        }
        self.env = env
        # epmd runs in the foreground under our control: an epmd that erl starts itself daemonizes
        # out of our process group and would outlive the node.
        self.epmd = ManagedProcess(
            "epmd",
            as_user(RABBIT_USER, ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"]),
            log_dir / "epmd.log",
            env=env,
            pid_path=self.base_dir / "epmd.managed.pid",
        )
        self.process = ManagedProcess(
            "rabbitmq",
            as_user(
                RABBIT_USER, ["env", *(f"{k}={v}" for k, v in env.items()), rabbit_bin("rabbitmq-server")]
            ),
            self.log_path,
            env=env,
            pid_path=self.base_dir / "rabbitmq.managed.pid",
        )

    @property
    def amqp_url(self) -> str:
        return self.url_for(self.admin_user, self.admin_password)

    def url_for(self, user: str, password: str, vhost: str = "/") -> str:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"amqp://{credentials}@{self.host}:{self.amqp_port}/{quote(vhost, safe='')}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    def configure(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("mnesia", "log", "plugins-expand"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        plugins = "rabbitmq_management" + (",rabbitmq_prometheus" if self.prometheus_port else "")
        (self.base_dir / "enabled_plugins").write_text(f"[{plugins}].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("")
        (self.base_dir / "advanced.config").write_text("[].\n")
        (self.base_dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = {self.host}:{self.amqp_port}",
                    f"management.tcp.ip = {self.host}",
                    f"management.tcp.port = {self.management_port}",
                    f"default_user = {self.admin_user}",
                    f"default_pass = {self.admin_password}",
                    "default_user_tags.administrator = true",
                    "default_permissions.configure = .*",
                    "default_permissions.read = .*",
                    "default_permissions.write = .*",
                    "loopback_users = none",
                    "log.console = true",
                    "log.console.level = info",
                    "log.file = false",
                    # Small disk thresholds so a nearly full test disk does not block publishers.
                    "disk_free_limit.absolute = 50MB",
                    *(
                        [f"prometheus.tcp.ip = {self.host}", f"prometheus.tcp.port = {self.prometheus_port}"]
                        if self.prometheus_port
                        else []
                    ),
                    "",
                ]
            )
        )
        if is_root():
            chown_to(self.base_dir, RABBIT_USER)

    def start(self, timeout: float = 90) -> RabbitMQServer:
        self.configure()
        if not self.epmd.running():
            self.epmd.start()
            self.epmd.wait_ready(lambda: port_open(self.host, self.epmd_port), 15)
        self.process.start()
        try:
            self.process.wait_ready(self.ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        if not port_open(self.host, self.amqp_port):
            return False
        return self.api("GET", "/api/overview") is not None

    def running(self) -> bool:
        return self.process.running()

    def stop(self, with_epmd: bool = True) -> None:
        self.process.stop(timeout=30)
        if with_epmd:
            self.epmd.stop()

    def api(self, method: str, path: str, body: object | None = None) -> object | None:
        """Call the management HTTP API as the admin user; returns parsed JSON (or {} for an empty body)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.management_url + path, data=data, method=method)
        token = base64.b64encode(f"{self.admin_user}:{self.admin_password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}
