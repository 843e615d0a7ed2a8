"""The operator SIGKILLed in the middle of a batch converges after a restart (roles created before the
kill get the password of the Secret written after it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg

PG_DB = "PostgresDatabase"


def start_operator(kube, ns: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(  # a real process, so it can be SIGKILLed
        [
            str(Path(sys.executable).parent / "kopf"),
            "run",
            "-m",
            "emporium_operator.main",
            f"--namespace={ns}",
            "--standalone",
        ],
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig), "METRICS_PORT": "0"},
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def ready(kube, ns: str, kind: str, names: list[str]) -> list[str]:
    return [n for n in names if kube.condition(kube.get(ns, kind, n)).get("status") == "True"]


async def test_killed_mid_batch_then_restarted_converges(kube, servers, tmp_path):
    ns = kube.new_namespace("restart")
    servers(kube, ns)
    kube.create(ns, "RabbitVhost", "v", {"serverRef": {"name": "rabbit"}, "name": f"v-{ns}"})
    names = [f"db{i:02d}" for i in range(24)]
    for name in names:
        kube.create(
            ns,
            PG_DB,
            name,
            {
                "serverRef": {"name": "pg"},
                "databaseName": f"{ns.replace('-', '_')}_{name}",
                "extensions": ["citext"],
            },
        )
    topologies = [f"{ns}-svc{i}" for i in range(4)]
    for name in topologies:
        kube.create(
            ns,
            "RabbitTopology",
            name,
            {
                "serverRef": {"name": "rabbit"},
                "vhost": f"v-{ns}",
                "exchanges": [{"name": "emporium.events"}],
                "queues": [{"name": f"{name}.q"}],
                "bindings": [{"source": "emporium.events", "destination": f"{name}.q", "routingKey": "#"}],
            },
        )
    log = tmp_path / "operator.log"
    proc = start_operator(kube, ns, log)
    try:
        # Kill as soon as the first database is done, i.e. while the others are still in flight.
        await kube.wait_for(
            lambda: ready(kube, ns, PG_DB, names) or proc.poll() is not None,
            within=180,
            what="first database",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    ready_before = ready(kube, ns, PG_DB, names)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert 1 <= len(ready_before) < len(names), f"the kill came with no work outstanding: {ready_before}"

    with kube.operator(ns):
        for name in names:
            await kube.wait_ready(ns, PG_DB, name, within=180)
        for name in topologies:
            await kube.wait_ready(ns, "RabbitTopology", name, within=120)
        for name in names:
            conn = await asyncpg.connect(kube.secret(ns, f"{name}-db")["uri"])
            assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'citext'") == 1
            await conn.close()
