"""The local platform's servers outlive the command that starts them, are found again by the next
command, and `down` leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys

import asyncpg
from emporium_testbed.local import LocalServers
from emporium_testbed.process import pid_alive


def run(root, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emporium_testbed.local", command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_up_status_down_across_commands(testbed_dir):
    root = testbed_dir / "local"  # testbed_dir is traversable by the postgres and rabbitmq users
    try:
        up = run(root, "up")
        assert up.returncode == 0, up.stderr
        state = json.loads((root / "state.json").read_text())
        assert (root / "state.json").stat().st_mode & 0o777 == 0o600
        assert (root / "kubeconfig").exists()
        assert {
            "kube-apiserver.log",
            "postgres.log",
            "rabbitmq.log",
            "smtp-sink.log",
            "mock-oauth2-server.log",
        } <= {p.name for p in (root / "logs").iterdir()}

        # A second `up` is a no-op: same processes, same data.
        pids_before = [p.read_text() for p in sorted(root.rglob("*.pid")) if p.name != "rabbitmq.pid"]
        again = run(root, "up")
        assert again.returncode == 0, again.stderr
        assert [p.read_text() for p in sorted(root.rglob("*.pid")) if p.name != "rabbitmq.pid"] == pids_before

        status = run(root, "status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("running") == 5

        servers = LocalServers(root)  # a fresh object, as a later command would build it
        conn = await asyncpg.connect(servers.postgres.admin_dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert servers.postgres.port == state["postgres_port"]
    finally:
        pids = [int(p.read_text()) for p in root.rglob("*.pid") if p.read_text().strip().isdigit()]
        down = run(root, "down")
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if pid_alive(pid)]
    assert run(root, "status").returncode == 3
