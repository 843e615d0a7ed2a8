"""Operator benchmark: apply-to-Ready latency, restart convergence and peak memory.

Starts its own test bed (control plane, Postgres, RabbitMQ from emporium_testbed) in a temporary folder, runs
the operator as a real `kopf run` process, and prints:
  - time from `kubectl apply` to Ready (p50, p99) for N PostgresDatabase and N RabbitTopology objects,
  - time to converge after an operator restart (every object's spec changed while it was down),
  - the operator process's peak resident memory (VmHWM).
Bounded: every phase has a deadline derived from --timeout (default 600 s overall).

    uv run python operator/bench/bench_operator.py [--count 100] [--timeout 600]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from emporium_testbed.controlplane import ControlPlane
from emporium_testbed.postgres import PostgresServer
from emporium_testbed.rabbitmq import RabbitMQServer
from emporium_testbed.toolchain import tool
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "charts" / "emporium-operator" / "crds"
GROUP, VERSION = "emporium.dev", "v1alpha1"
NS = "bench"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Operator:
    def __init__(self, kubeconfig: Path, log: Path):
        self.kubeconfig, self.log = kubeconfig, log
        self.proc: subprocess.Popen | None = None
        self.peak_kb = 0

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "METRICS_PORT": "0",
            "EMPORIUM_RECONCILE_INTERVAL": "300",
            "EMPORIUM_RETRY_DELAY": "5",
        }
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "kopf"),
                "run",
                "-m",
                "emporium_operator.main",
                "--namespace",
                NS,
                "--standalone",
            ],
            env=env,
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )

    def sample(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )


def ready_times(
    api: client.CustomObjectsApi, plural: str, names: set[str], start: float, deadline: float, op: Operator
) -> dict[str, float]:
    """Poll the list until every object is Ready at its current generation; seconds since start per object."""
    done: dict[str, float] = {}
    while len(done) < len(names) and time.monotonic() < deadline:
        items = api.list_namespaced_custom_object(GROUP, VERSION, NS, plural)["items"]
        now = time.monotonic()
        for item in items:
            name = item["metadata"]["name"]
            if name in done or name not in names:
                continue
            status = item.get("status") or {}
            ready = [
                c for c in status.get("conditions") or [] if c["type"] == "Ready" and c["status"] == "True"
            ]
            if ready and status.get("observedGeneration") == item["metadata"]["generation"]:
                done[name] = now - start
        op.sample()
        time.sleep(0.25)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=600, help="overall deadline in seconds")
    args = parser.parse_args()
    overall = time.monotonic() + args.timeout
    base = Path(tempfile.mkdtemp(prefix="emporium-bench-"))
    base.chmod(0o755)
    started = []
    op = None
    try:
        cp = ControlPlane(base / "kube").start()
        started.append(cp)
        pg = PostgresServer(base / "postgres").start()
        started.append(pg)
        rmq = RabbitMQServer(base / "rabbitmq").start()
        started.append(rmq)
        kc = cp.kubeconfig
        kubectl(kc, "apply", "--server-side", "-f", str(CRDS))
        kubectl(kc, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl(kc, "create", "namespace", NS)
        kubectl(
            kc,
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "pg-admin",
            f"--from-literal=username={pg.superuser}",
            f"--from-literal=password={pg.password}",
        )
        kubectl(
            kc,
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "rabbit-admin",
            f"--from-literal=username={rmq.admin_user}",
            f"--from-literal=password={rmq.admin_password}",
        )
        base_docs = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "PostgresServer",
                "metadata": {"name": "pg"},
                "spec": {
                    "host": pg.host,
                    "port": pg.port,
                    "sslMode": "disable",
                    "adminSecretRef": {"name": "pg-admin"},
                },
            },
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "RabbitServer",
                "metadata": {"name": "rabbit"},
                "spec": {
                    "managementUrl": rmq.management_url,
                    "amqpHost": rmq.host,
                    "amqpPort": rmq.amqp_port,
                    "adminSecretRef": {"name": "rabbit-admin"},
                },
            },
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "RabbitVhost",
                "metadata": {"name": "bench"},
                "spec": {"serverRef": {"name": "rabbit"}},
            },
        ]
        kubectl(kc, "-n", NS, "apply", "-f", "-", stdin=yaml.safe_dump_all(base_docs))
        api = client.CustomObjectsApi(config.new_client_from_config(str(kc)))
        op = Operator(kc, base / "operator.log")
        op.start()
        servers = ready_times(
            api, "rabbitvhosts", {"bench"}, time.monotonic(), min(overall, time.monotonic() + 90), op
        )
        if not servers:
            print("the vhost never became Ready; see", base / "operator.log")
            return 1

        n = args.count
        dbs = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "PostgresDatabase",
                "metadata": {"name": f"db{i:03d}"},
                "spec": {"serverRef": {"name": "pg"}},
            }
            for i in range(n)
        ]
        topos = [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "RabbitTopology",
                "metadata": {"name": f"svc{i:03d}"},
                "spec": {
                    "serverRef": {"name": "rabbit"},
                    "vhost": "bench",
                    "exchanges": [{"name": "emporium.events"}],
                    "queues": [{"name": f"svc{i:03d}.events", "messageTtl": 60000}],
                    "bindings": [
                        {
                            "source": "emporium.events",
                            "destination": f"svc{i:03d}.events",
                            "routingKey": f"svc{i:03d}.#",
                        }
                    ],
                },
            }
            for i in range(n)
        ]
        results = {}
        for kind, plural, docs in (
            ("PostgresDatabase", "postgresdatabases", dbs),
            ("RabbitTopology", "rabbittopologies", topos),
        ):
            start = time.monotonic()
            kubectl(kc, "-n", NS, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
            phase_deadline = min(overall, start + max(60.0, (overall - start) / 3))
            done = ready_times(api, plural, {d["metadata"]["name"] for d in docs}, start, phase_deadline, op)
            results[kind] = done
            print(
                f"{kind}: {len(done)}/{n} Ready; apply->Ready p50 {percentile(list(done.values()), 50):.2f}s "
                f"p99 {percentile(list(done.values()), 99):.2f}s; "
                f"all within {max(done.values(), default=0):.2f}s",
                flush=True,
            )

        # Restart: stop the operator, change every object, start it again, wait for all to converge.
        op.stop()
        for d in dbs:
            d["spec"]["extensions"] = ["citext"]
        for t in topos:
            t["spec"]["queues"][0]["messageTtl"] = 30000
        kubectl(kc, "-n", NS, "apply", "-f", "-", stdin=yaml.safe_dump_all(dbs + topos))
        start = time.monotonic()
        op.start()
        deadline = min(overall, start + 180)
        done_db = ready_times(
            api, "postgresdatabases", {d["metadata"]["name"] for d in dbs}, start, deadline, op
        )
        done_t = ready_times(
            api, "rabbittopologies", {t["metadata"]["name"] for t in topos}, start, deadline, op
        )
        total = max([*done_db.values(), *done_t.values()], default=float("nan"))
        print(
            f"restart: {len(done_db) + len(done_t)}/{2 * n} objects converged after restart in {total:.2f}s",
            flush=True,
        )
        op.sample()
        print(f"operator peak memory (VmHWM): {op.peak_kb / 1024:.1f} MiB", flush=True)
        ok = all(len(v) == n for v in results.values()) and len(done_db) + len(done_t) == 2 * n
        return 0 if ok else 1
    finally:
        if op:
            op.stop()
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
