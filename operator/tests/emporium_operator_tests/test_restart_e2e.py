"""The operator killed (SIGKILL) in the middle of reconciling a batch, then restarted, converges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg


async def test_killed_mid_reconcile_then_restarted_converges(kube, servers, tmp_path):
    ns = kube.new_namespace("restart")
    servers(kube, ns)
    kube.create(ns, "RabbitVhost", "v", {"serverRef": {"name": "rabbit"}, "name": f"v-{ns}"})
    names = [f"db{i}" for i in range(8)]
    for name in names:
        kube.create(ns, "PostgresDatabase", name, {"serverRef": {"name": "pg"}, "extensions": ["citext"]})
    topologies = [f"svc{i}" for i in range(4)]
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
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(  # noqa: ASYNC220 - a real process, so it can be SIGKILLed
        [
            str(Path(sys.executable).parent / "kopf"),
            "run",
            "-m",
            "emporium_operator.main",
            "--namespace",
            ns,
            "--standalone",
        ],
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig), "METRICS_PORT": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Kill as soon as the first object is done, i.e. while the others are still in flight.
        await kube.wait_for(
            lambda: (
                any(
                    kube.condition(kube.get(ns, "PostgresDatabase", n)).get("status") == "True" for n in names
                )
                or proc.poll() is not None
            ),
            within=60,
            what="first database provisioned",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
    ready_before = sum(
        kube.condition(kube.get(ns, "PostgresDatabase", n)).get("status") == "True" for n in names
    )
    assert ready_before < len(names) + 1  # informative: the kill happened with work outstanding

    with kube.operator(ns):
        for name in names:
            await kube.wait_ready(ns, "PostgresDatabase", name, within=60)
        for name in topologies:
            await kube.wait_ready(ns, "RabbitTopology", name, within=60)
        for name in names:
            conn = await asyncpg.connect(kube.secret(ns, f"{name}-db")["uri"])
            assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'citext'") == 1
            await conn.close()
