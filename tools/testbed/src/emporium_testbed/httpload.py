"""A lean HTTP/1.1 load client for the benchmarks: one keep-alive connection per worker, raw bytes.

httpx's AsyncClient cost 1.77 ms of CPU per request against a trivial server here, this client 0.074 ms
(same run, 2,000 requests each at concurrency 8, load average 84): at hundreds of requests a second a
client sharing the two cores with the servers measured itself as much as them. This one writes the
request bytes and reads ``Content-Length`` (or chunked) bodies straight from an asyncio stream.
Loopback only; it speaks just enough HTTP for the benchmarks' own services.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self) -> object:
        return jsonlib.loads(self.body)


class Connection:
    """One keep-alive connection to host:port (reopened when the server closes it)."""

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = parts.netloc
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        body = b"" if json is None else jsonlib.dumps(json).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.netloc}\r\n{self.headers}"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if json is not None:
            head += "Content-Type: application/json\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        raw = (head + "\r\n").encode() + body
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(raw)
                return await self._read_reply()
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_reply(self) -> Reply:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.readexactly(length or 0)
        if close:
            await self.close()
        return Reply(status, body)


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of its reaped children), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after "(comm)": state ppid ... utime(12) stime(13) cutime(14) cstime(15)
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return stats


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class CpuMeter:
    """CPU seconds (user + system) spent by processes and their descendants (reaped children included),
    and by this process alone as ``client``."""

    pids: Mapping[str, int]
    start: dict[str, float] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        stats = _proc_stats()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)

        def tree(pid: int) -> float:
            return stats.get(pid, (0, 0.0))[1] + sum(tree(child) for child in children.get(pid, []))

        used = {name: tree(pid) for name, pid in self.pids.items()}
        used["client"] = time.process_time()  # this process alone (its children are the servers)
        return used

    def __enter__(self) -> CpuMeter:
        self.start = self.snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self.snapshot()
        self.used = {name: end[name] - self.start[name] for name in end}


async def run_phase(
    name: str,
    make_request: Callable[[Connection], Awaitable[bool]],
    connect: Callable[[], Connection],
    total: int,
    concurrency: int,
    max_seconds: float,
    cpu_pids: Mapping[str, int] | None = None,
) -> dict:
    """``concurrency`` workers, each on its own connection, until ``total`` requests or ``max_seconds``.

    Returns throughput, latency percentiles and, for ``cpu_pids`` (plus this client), the CPU milliseconds
    each spent per request: unlike throughput, that figure barely moves with the machine's other load.
    """
    latencies: list[float] = []
    errors = 0
    issued = 0
    connections = [connect() for _ in range(concurrency)]

    async def worker(connection: Connection) -> None:
        nonlocal issued, errors
        while issued < total and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                ok = await make_request(connection)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
                await connection.close()
            latencies.append(time.perf_counter() - t0)
            errors += 0 if ok else 1

    with CpuMeter(cpu_pids or {}) as meter:
        start = time.perf_counter()
        deadline = start + max_seconds
        await asyncio.gather(*(worker(c) for c in connections))
        elapsed = time.perf_counter() - start
    for connection in connections:
        await connection.close()
    count = len(latencies)
    return {
        "phase": name,
        "requests": count,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "rps": round(count / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        "cpu_ms": {k: round(v * 1000 / count, 2) for k, v in meter.used.items()} if count else {},
    }


def cpu_line(result: Mapping) -> str:
    """``products 1.20 + postgres 0.40 + client 0.05 = 1.65 CPU-ms/req (~1212 req/s on 2 idle cores)``."""
    cpu = result.get("cpu_ms") or {}
    if not cpu:
        return ""
    total = sum(cpu.values())
    cores = os.cpu_count() or 1
    parts = " + ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    ceiling = f" (ceiling ~{cores * 1000 / total:.0f} req/s on {cores} idle cores)" if total else ""
    return f"{parts} = {total:.2f} CPU-ms/req{ceiling}"
