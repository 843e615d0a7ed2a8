"""`make up` from anywhere, and when it cannot start: clones Postgres and RabbitMQ cannot enter, ports held by
another platform or process, a failing step that must leave nothing running, and `make help`."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest
from emporium_testbed import platform as platform_module
from emporium_testbed.local import LocalServers, server_data_dir
from emporium_testbed.platform import LocalPlatform, Workload, _up
from emporium_testbed.process import ManagedProcess, StartupError, free_port, is_root, pid_alive, port_open
from emporium_testbed.toolchain import REPO_ROOT


@pytest.fixture
def private_dir():
    """A folder only its owner may enter, as `mktemp -d` makes it."""
    path = Path(tempfile.mkdtemp(prefix="emporium-private-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_a_clone_the_servers_can_enter_keeps_its_data_inside(testbed_dir):
    root = testbed_dir / "plain" / ".local"
    root.parent.mkdir()
    root.parent.chmod(0o755)
    assert server_data_dir(root) == root / "data"


def test_a_clone_under_a_private_folder_keeps_server_data_where_the_servers_can_reach_it(private_dir):
    root = private_dir / "emporium" / ".local"
    data = server_data_dir(root)
    if not is_root():  # the servers run as us: the clone is fine
        assert data == root / "data"
        return
    assert data.parent == Path("/var/lib/emporium"), data
    servers = LocalServers(root)
    servers.prepare()
    assert (root / "data" / "servers").resolve() == data
    for user in ("postgres", "rabbitmq"):
        reach = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(data)], check=False)
        assert reach.returncode == 0, user
    subprocess.run(["rm", "-rf", str(data)], check=False)


def test_a_path_with_spaces_keeps_server_data_elsewhere(testbed_dir):
    root = testbed_dir / "my shop" / ".local"
    data = server_data_dir(root)
    assert " " not in str(data)
    assert data != root / "data"


def _listen_from(cwd: Path, port: int) -> subprocess.Popen:
    """A process listening on port, started in cwd (the ingress's working directory is <root>/ingress)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('ready', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_up_refuses_ports_held_by_another_clones_platform(testbed_dir, monkeypatch):
    port = free_port()
    monkeypatch.setattr(platform_module, "FIXED_PORTS", (port,))
    other = testbed_dir / "other clone" / ".local"
    (other / "ingress").mkdir(parents=True)
    (other / "state.json").write_text("{}")
    holder = _listen_from(other / "ingress", port)
    try:
        with pytest.raises(StartupError) as refused:
            LocalPlatform(testbed_dir / "this clone" / ".local").check_fixed_ports()
        assert "another Emporium local platform is running" in str(refused.value)
        assert str(other) in str(refused.value) and "make down" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()


def test_up_names_any_other_process_holding_a_port(testbed_dir, monkeypatch):
    port = free_port()
    monkeypatch.setattr(platform_module, "FIXED_PORTS", (port,))
    holder = _listen_from(testbed_dir, port)
    try:
        with pytest.raises(StartupError) as refused:
            LocalPlatform(testbed_dir / "third clone" / ".local").check_fixed_ports()
        assert f"127.0.0.1:{port} is already in use by python" in str(refused.value)
        assert f"pid {holder.pid}" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(300)
def test_a_failed_up_names_the_step_and_its_log_and_stops_what_it_started(testbed_dir, monkeypatch, capsys):
    """Postgres cannot bind its port: `up` fails at that step, naming its log, and stops the control plane,
    RabbitMQ and the SMTP sink it had started beside it."""
    root = testbed_dir / "failing" / ".local"
    platform = LocalPlatform(root)
    monkeypatch.setattr(platform, "check_fixed_ports", lambda: None)  # other platforms may run here
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", platform.servers.postgres.port))
    squatter.listen()
    try:
        assert _up(platform) == 1
    finally:
        squatter.close()
    err = capsys.readouterr().err
    assert "make up failed at: postgres" in err, err
    assert str(platform.servers.postgres.log_path) in err, err
    assert "stopped what this run had started" in err and "kube-apiserver" in err, err
    leftover = [p.name for p in platform.processes() if p.pid is not None and pid_alive(p.pid)]
    assert leftover == [], leftover
    assert not port_open("127.0.0.1", platform.servers.control_plane.apiserver_port)
    assert not port_open("127.0.0.1", platform.servers.rabbitmq.amqp_port)


def test_make_help_lists_every_target():
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):(?!=)", makefile, flags=re.MULTILINE))
    helped = subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "help"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    ).stdout
    listed = {line.split()[1] for line in helped.splitlines() if line.strip().startswith("make ")}
    assert targets == listed, targets ^ listed


def test_a_migration_runs_again_only_when_its_scripts_or_its_database_changed(testbed_dir, postgres):
    """After a `make down` the databases keep their schema: `up` skips a migration Job whose command,
    environment and scripts are those of its last successful run on a database still at that revision."""

    async def sql(statement: str, dbname: str = "postgres") -> None:
        connection = await asyncpg.connect(postgres.dsn(dbname))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    platform = LocalPlatform(testbed_dir / "migrations" / ".local")
    platform.logs.mkdir(parents=True, exist_ok=True)
    platform.run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(sql("CREATE DATABASE skip_migrations"))
    env = {"DATABASE_URL": postgres.dsn("skip_migrations")}
    argv = [sys.executable, "-m", "emporium_products", "migrate"]
    process = ManagedProcess("job", argv, Path("/dev/null"), env=env)
    job = Workload("emporium", "products-migrate", None, process)
    log = platform.logs / "products-migrate.log"

    assert platform._migrate(job) is None and log.exists()  # a new database: migrated
    log.unlink()
    assert platform._migrate(job) is None and not log.exists()  # nothing changed: no process at all

    asyncio.run(sql("DROP DATABASE skip_migrations"))  # the database changed: made again, empty
    asyncio.run(sql("CREATE DATABASE skip_migrations"))
    assert platform._migrate(job) is None and log.exists(), "a database not at the recorded revision migrates"
    log.unlink()
    job.process.env = {**env, "LOG_LEVEL": "debug"}  # the Job changed
    assert platform._migrate(job) is None and log.exists()
