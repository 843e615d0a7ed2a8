"""Operator benchmark: latency to Ready observed through a watch, against the backends' own floor measured
in the same run.

Starts its own test bed (control plane, Postgres with max_connections=100, RabbitMQ) in a temporary
folder and runs the operator as a real `kopf run` process. Every object is created by the bench (one API
call each, its start time taken just before the call); a watch records the moment each one is first seen
Ready at its generation. Phases (each bounded in time):

  single     one PostgresDatabase, then one RabbitTopology, at a time (--singles each): p50
  burst      --count PostgresDatabase at once, then --count RabbitTopology at once: p50, p99, in-order
  floor      the same --count CREATE ROLE + CREATE DATABASE through one Postgres session, and the same
             management API calls without the operator (the four reads at once, then one POST
             /api/definitions with user, permissions, exchange, queue, binding, policy): p50, p99
  together   a RabbitVhost and a RabbitTopology using it, created together: the topology's time to Ready
  restart    the operator restarted with every object Ready: time until it is serving again, until it has
             caught up (its metrics: every object held, no reconcile due), and the writes made within 10 s
             of the start (Kubernetes objects, Secrets, roles, broker users): should be 0
  scale      --scale PostgresDatabase objects (default 1000) at once: all Ready, time, operator peak RSS

    uv run python operator/bench/bench_operator.py [--count 100] [--singles 10] [--scale 1000] [--keep]

Only the operator's log is kept (its path is printed last) unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
from emporium_operator.rabbit import password_hash
from emporium_testbed.controlplane import ControlPlane
from emporium_testbed.postgres import PostgresServer
from emporium_testbed.process import free_port, port_open
from emporium_testbed.rabbitmq import RabbitMQServer
from emporium_testbed.toolchain import tool
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "charts" / "emporium-operator" / "crds"
GROUP, VERSION = "emporium.dev", "v1alpha1"
NS = "bench"
PLURALS = {
    "PostgresDatabase": "postgresdatabases",
    "RabbitTopology": "rabbittopologies",
    "RabbitVhost": "rabbitvhosts",
}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> str:
    return f"p50 {percentile(values, 50):.3f}s p99 {percentile(values, 99):.3f}s (n={len(values)})"


class Operator:
    def __init__(self, kubeconfig: Path, log: Path):
        self.kubeconfig, self.log = kubeconfig, log
        self.proc: subprocess.Popen | None = None
        self.peak_kb = 0
        self.liveness = free_port()
        self.metrics = free_port()

    def start(self) -> float:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "METRICS_PORT": str(self.metrics),
            "METRICS_ADDR": "127.0.0.1",
            "EMPORIUM_RECONCILE_INTERVAL": "300",
        }
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "kopf"),
                "run",
                "-m",
                "emporium_operator.main",
                f"--namespace={NS}",
                "--standalone",
                f"--liveness=http://127.0.0.1:{self.liveness}/healthz",
            ],
            env=env,
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )
        return started

    def serving(self) -> bool:
        return port_open("127.0.0.1", self.liveness)

    def caught_up(self, objects: int) -> bool:
        """The operator's own metrics: it holds every object and has no reconcile due, queued or running."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=2).text
        except httpx.HTTPError:
            return False
        held, pending = 0.0, None
        for line in text.splitlines():
            if line.startswith("emporium_operator_objects{"):
                held += float(line.rsplit(" ", 1)[1])
            elif line.startswith("emporium_operator_reconciles_pending "):
                pending = float(line.rsplit(" ", 1)[1])
        return held == objects and pending == 0

    def sample(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                pass

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator process has used (how much of the shared CPU is ours)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return float("nan")

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return float("nan")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.sample()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ReadyWatch:
    """Records, per object, the first moment a watch event shows it Ready at its generation."""

    def __init__(self, api_client: client.ApiClient, plural: str, op: Operator):
        self.api = client.CustomObjectsApi(api_client)
        self.plural, self.op = plural, op
        self.ready: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # One long watch, resumed from the last resourceVersion seen (a fresh watch would replay every
        # object: with 1,000 objects that costs the bench, and so the shared CPU, a lot).
        version = None
        while not self.stopped.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    NS,
                    self.plural,
                    timeout_seconds=60,
                    **({"resource_version": version} if version else {}),
                ):
                    now = time.monotonic()
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        version = None  # 410 Gone: start from a fresh list
                        break
                    version = obj["metadata"]["resourceVersion"]
                    name = obj["metadata"]["name"]
                    status = obj.get("status") or {}
                    ok = any(
                        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
                    )
                    if ok and status.get("observedGeneration") == obj["metadata"]["generation"]:
                        self.ready.setdefault(name, now)
                    if self.stopped.is_set():
                        break
            except Exception:
                time.sleep(0.1)
                continue
            finally:
                self.op.sample()

    def wait(self, names: list[str], deadline: float) -> dict[str, float]:
        while time.monotonic() < deadline and not all(n in self.ready for n in names):
            time.sleep(0.02)
        return {n: self.ready[n] for n in names if n in self.ready}

    def stop(self) -> None:
        self.stopped.set()


def body(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}


def db_spec(name: str) -> dict:
    return {"serverRef": {"name": "pg"}, "databaseName": name.replace("-", "_")}


def topo_spec(name: str, vhost: str = "bench") -> dict:
    return {
        "serverRef": {"name": "rabbit"},
        "vhost": vhost,
        "exchanges": [{"name": "emporium.events"}],
        "queues": [{"name": f"{name}.events", "messageTtl": 60000}],
        "bindings": [
            {"source": "emporium.events", "destination": f"{name}.events", "routingKey": f"{name}.#"}
        ],
    }


def create_all(api: client.CustomObjectsApi, docs: list[dict], workers: int = 8) -> dict[str, float]:
    """Create every object (workers in parallel, i.e. "applied at once"); start time per object."""
    starts: dict[str, float] = {}

    def create(doc: dict) -> None:
        starts[doc["metadata"]["name"]] = time.monotonic()
        api.create_namespaced_custom_object(GROUP, VERSION, NS, PLURALS[doc["kind"]], doc)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, docs))
    return starts


def latencies(starts: dict[str, float], ready: dict[str, float]) -> list[float]:
    return [ready[n] - starts[n] for n in starts if n in ready]


def in_order(starts: dict[str, float], ready: dict[str, float]) -> str:
    """How far the burst finished in the order it was applied. The per-object ratio (p50/p99 of each object's
    own latency) drifts towards 1 when creating the burst takes about as long as serving it (every object
    waits about the same); from the burst's start is how the floor is measured (completion times from one
    start); the rank correlation of creation order and Ready order is 1 when perfectly in order."""
    lat = latencies(starts, ready)
    if not lat:
        return "p50/p99 nan"
    first = min(starts.values())
    done = [ready[n] - first for n in starts if n in ready]
    by_start = sorted((n for n in starts if n in ready), key=starts.__getitem__)
    by_ready = {n: i for i, n in enumerate(sorted(by_start, key=ready.__getitem__))}
    k = len(by_start)
    d2 = sum((i - by_ready[n]) ** 2 for i, n in enumerate(by_start))
    rho = 1 - 6 * d2 / (k * (k * k - 1)) if k > 1 else 1.0
    return (
        f"p50/p99 {percentile(lat, 50) / percentile(lat, 99):.2f} (from the burst's start "
        f"{percentile(done, 50) / percentile(done, 99):.2f}, created over "
        f"{max(starts.values()) - first:.2f}s, rank correlation {rho:.2f})"
    )


async def pg_floor(pg: PostgresServer, names: list[str]) -> list[float]:
    """The same CREATE ROLE + CREATE DATABASE per object through one session: completion time of each."""
    conn = await asyncpg.connect(pg.admin_dsn)
    try:
        start = time.monotonic()
        done = []
        for name in names:
            await conn.execute(f"CREATE ROLE \"{name}_owner\" LOGIN PASSWORD 'x'")
            await conn.execute(f'CREATE DATABASE "{name}" OWNER "{name}_owner"')
            done.append(time.monotonic() - start)
        return done
    finally:
        await conn.close()


async def rabbit_floor(rmq: RabbitMQServer, names: list[str], vhost: str) -> list[float]:
    """The same management API calls (user, permissions, definitions) without the operator."""
    async with httpx.AsyncClient(
        base_url=rmq.management_url + "/api", auth=(rmq.admin_user, rmq.admin_password), timeout=30
    ) as http:
        (await http.put(f"/vhosts/{vhost}", json={"description": "floor"})).raise_for_status()
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        (await http.put(f"/permissions/{vhost}/{rmq.admin_user}", json=perms)).raise_for_status()
        start = time.monotonic()
        done = []
        for name in names:
            # The operator's reads, sent at once: vhost, user, permissions, the vhost's definitions.
            await asyncio.gather(
                http.get(f"/vhosts/{vhost}", params={"disable_stats": "true"}),
                http.get(f"/users/{name}"),
                http.get(f"/permissions/{vhost}/{name}"),
                http.get(f"/definitions/{vhost}"),
            )
            user_perms = {"configure": "^$", "write": ".*", "read": ".*"}
            # Then one write: user, permissions, exchange, queue, binding, policy.
            definitions = {
                "users": [
                    {
                        "name": name,
                        "password_hash": password_hash("x" * 32),
                        "hashing_algorithm": "rabbit_password_hashing_sha256",
                        "tags": f"emporium-operator:floor/{name}",
                    }
                ],
                "permissions": [{"user": name, "vhost": vhost, **user_perms}],
                "exchanges": [
                    {
                        "name": "emporium.events",
                        "vhost": vhost,
                        "type": "topic",
                        "durable": True,
                        "auto_delete": False,
                        "internal": False,
                        "arguments": {},
                    }
                ],
                "queues": [
                    {
                        "name": f"{name}.events",
                        "vhost": vhost,
                        "durable": True,
                        "auto_delete": False,
                        "arguments": {"x-queue-type": "quorum"},
                    }
                ],
                "bindings": [
                    {
                        "source": "emporium.events",
                        "vhost": vhost,
                        "destination": f"{name}.events",
                        "destination_type": "queue",
                        "routing_key": f"{name}.#",
                        "arguments": {},
                    }
                ],
                "policies": [
                    {
                        "name": f"emporium-queue.{name}.events",
                        "vhost": vhost,
                        "pattern": f"^{name}\\.events$",
                        "apply-to": "queues",
                        "priority": 100,
                        "definition": {"message-ttl": 60000},
                    }
                ],
            }
            (await http.post("/definitions", json=definitions)).raise_for_status()
            done.append(time.monotonic() - start)
        return done


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )


def snapshot(api_client: client.ApiClient, pg: PostgresServer, rmq: RabbitMQServer) -> dict:
    custom = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    rvs = {}
    for plural in PLURALS.values():
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, NS, plural)["items"]:
            rvs[f"{plural}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    for s in core.list_namespaced_secret(NS).items:
        rvs[f"secret/{s.metadata.name}"] = s.metadata.resource_version
    rvs["roles"] = pg.psql(
        "SELECT md5(string_agg(rolname || rolpassword, ',' ORDER BY rolname)) FROM pg_authid"
    )
    rvs["users"] = json.dumps(rmq.api("GET", "/api/users"), sort_keys=True)
    return rvs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100, help="objects per burst")
    parser.add_argument("--singles", type=int, default=10, help="single objects, one at a time")
    parser.add_argument("--scale", type=int, default=1000, help="objects in the scale phase (0: skip)")
    parser.add_argument("--timeout", type=float, default=900, help="overall deadline in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the test bed's data directories")
    args = parser.parse_args()
    overall = time.monotonic() + args.timeout
    base = Path(tempfile.mkdtemp(prefix="emporium-bench-"))
    base.chmod(0o755)
    started, watches = [], []
    op = None
    ok = True
    try:
        cp = ControlPlane(base / "kube").start()
        started.append(cp)
        pg = PostgresServer(base / "postgres")
        pg.process.argv = [
            "max_connections=100" if a == "max_connections=300" else a for a in pg.process.argv
        ]
        pg.start()
        started.append(pg)
        assert pg.psql("SHOW max_connections") == "100"
        rmq = RabbitMQServer(base / "rabbitmq").start()
        started.append(rmq)
        kc = cp.kubeconfig
        kubectl(kc, "apply", "--server-side", "-f", str(CRDS))
        kubectl(kc, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl(kc, "create", "namespace", NS)
        for name, user, password in (
            ("pg-admin", pg.superuser, pg.password),
            ("rabbit-admin", rmq.admin_user, rmq.admin_password),
        ):
            kubectl(
                kc,
                "-n",
                NS,
                "create",
                "secret",
                "generic",
                name,
                f"--from-literal=username={user}",
                f"--from-literal=password={password}",
            )
        api_client = config.new_client_from_config(str(kc))
        api = client.CustomObjectsApi(api_client)
        op = Operator(kc, base / "operator.log")
        watches = {plural: ReadyWatch(api_client, plural, op) for plural in PLURALS.values()}
        servers = [
            body(
                "PostgresServer",
                "pg",
                {
                    "host": pg.host,
                    "port": pg.port,
                    "sslMode": "disable",
                    "adminSecretRef": {"name": "pg-admin"},
                },
            ),
            body(
                "RabbitServer",
                "rabbit",
                {
                    "managementUrl": rmq.management_url,
                    "amqpHost": rmq.host,
                    "amqpPort": rmq.amqp_port,
                    "adminSecretRef": {"name": "rabbit-admin"},
                },
            ),
        ]
        for doc in servers:
            api.create_namespaced_custom_object(GROUP, VERSION, NS, doc["kind"].lower() + "s", doc)
        create_all(api, [body("RabbitVhost", "bench", {"serverRef": {"name": "rabbit"}})])
        op.start()
        if not watches["rabbitvhosts"].wait(["bench"], min(overall, time.monotonic() + 90)):
            print("the vhost never became Ready; see", base / "operator.log")
            return 1
        print(
            f"# operator vs floor, one run, {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}"
        )

        # single objects, one at a time
        for kind, plural, spec_of, prefix in (
            ("PostgresDatabase", "postgresdatabases", db_spec, "single-db"),
            ("RabbitTopology", "rabbittopologies", topo_spec, "single-topo"),
        ):
            lat = []
            for i in range(args.singles):
                name = f"{prefix}{i:02d}"
                starts = create_all(api, [body(kind, name, spec_of(name))], workers=1)
                ready = watches[plural].wait([name], min(overall, time.monotonic() + 30))
                lat += latencies(starts, ready)
            ok &= len(lat) == args.singles
            print(
                f"single {kind}: apply->Ready (watch) {summary(lat)}, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )

        # bursts
        n = args.count
        burst = {}
        for kind, plural, spec_of, prefix in (
            ("PostgresDatabase", "postgresdatabases", db_spec, "burst-db"),
            ("RabbitTopology", "rabbittopologies", topo_spec, "burst-topo"),
        ):
            docs = [body(kind, f"{prefix}{i:03d}", spec_of(f"{prefix}{i:03d}")) for i in range(n)]
            cpu = op.cpu_seconds()
            starts = create_all(api, docs)
            ready = watches[plural].wait(list(starts), min(overall, time.monotonic() + 180))
            lat = latencies(starts, ready)
            burst[kind] = lat
            ok &= len(lat) == n
            print(
                f"burst {n} {kind}: operator {summary(lat)}, {in_order(starts, ready)}, "
                f"load {os.getloadavg()[0]:.1f}, operator CPU {op.cpu_seconds() - cpu:.1f}s",
                flush=True,
            )

        # the floor, in the same run
        pg_lat = asyncio.run(pg_floor(pg, [f"floor_db{i:03d}" for i in range(n)]))
        rb_lat = asyncio.run(rabbit_floor(rmq, [f"floor-topo{i:03d}" for i in range(n)], "floor"))
        for kind, floor in (("PostgresDatabase", pg_lat), ("RabbitTopology", rb_lat)):
            ratio = percentile(burst[kind], 99) / percentile(floor, 99)
            print(f"floor {n} {kind}: {summary(floor)}; operator p99 / floor p99 = {ratio:.2f}", flush=True)

        # a vhost and a topology together
        lat = []
        for i in range(3):
            vhost = f"together{i}"
            starts = create_all(
                api,
                [
                    body("RabbitVhost", vhost, {"serverRef": {"name": "rabbit"}}),
                    body("RabbitTopology", f"{vhost}-topo", topo_spec(f"{vhost}-topo", vhost)),
                ],
                workers=2,
            )
            ready = watches["rabbittopologies"].wait([f"{vhost}-topo"], min(overall, time.monotonic() + 60))
            lat += [ready[f"{vhost}-topo"] - starts[f"{vhost}-topo"]] if ready else []
        print(f"RabbitVhost + RabbitTopology together: topology Ready {summary(lat)}", flush=True)

        # restart with everything Ready: serving again, caught up (every object held, nothing pending,
        # from the operator's own metrics), and no writes
        op.stop()
        before = snapshot(api_client, pg, rmq)
        objects = sum(
            len(api.list_namespaced_custom_object(GROUP, VERSION, NS, plural)["items"])
            for plural in (*PLURALS.values(), "postgresservers", "rabbitservers")
        )
        t0 = op.start()
        serving = converged = None
        while time.monotonic() - t0 < 60 and converged is None:
            if serving is None and op.serving():
                serving = time.monotonic() - t0
            if serving is not None and op.caught_up(objects):
                converged = time.monotonic() - t0
            time.sleep(0.05)
        time.sleep(max(0.0, t0 + 10 - time.monotonic()))
        after = snapshot(api_client, pg, rmq)
        changed = sorted(k for k in before if before[k] != after.get(k))
        total = sum(1 for k in before if "/" in k and not k.startswith("secret/"))
        print(
            f"restart with {total} Ready objects: serving after {serving or float('nan'):.2f}s, converged "
            f"(all {objects} objects held, nothing pending) after {converged or float('nan'):.2f}s; "
            f"writes within 10 s of the start: {len(changed)} {changed[:5]}",
            flush=True,
        )
        ok &= not changed and converged is not None and converged <= 10

        # scale: many objects against max_connections=100
        if args.scale:
            docs = [
                body("PostgresDatabase", f"scale{i:04d}", db_spec(f"scale{i:04d}")) for i in range(args.scale)
            ]
            t0 = time.monotonic()
            cpu = op.cpu_seconds()
            starts = create_all(api, docs)
            ready = watches["postgresdatabases"].wait(list(starts), min(overall, time.monotonic() + 600))
            lat = latencies(starts, ready)
            op.sample()
            print(
                f"scale {args.scale} PostgresDatabase (max_connections=100): {len(lat)}/{args.scale} Ready "
                "in "
                f"{time.monotonic() - t0:.1f}s, {summary(lat)}; operator RSS now {op.rss_mib():.0f} MiB, "
                f"peak {op.peak_kb / 1024:.0f} MiB; operator CPU {op.cpu_seconds() - cpu:.1f}s, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            ok &= len(lat) == args.scale
        op.sample()
        print(f"operator peak memory (VmHWM): {op.peak_kb / 1024:.1f} MiB", flush=True)
        return 0 if ok else 1
    finally:
        for w in watches.values() if isinstance(watches, dict) else []:
            w.stop()
        if op:
            op.stop()
        for server in reversed(started):
            server.stop()
        if not args.keep:  # 1,000 databases are ~8 GB: keep only the operator's log
            for sub in ("kube", "postgres", "rabbitmq"):
                shutil.rmtree(base / sub, ignore_errors=True)
        print("operator log:", base / "operator.log")


if __name__ == "__main__":
    sys.exit(main())
