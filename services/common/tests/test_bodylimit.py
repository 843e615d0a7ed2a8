"""Request bodies are bounded per route (413 beyond) without reading the excess."""

import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from emporium_common import Settings, create_app, testing
from fastapi import APIRouter, Request
from pydantic import BaseModel

router = APIRouter()


class Note(BaseModel):
    text: str


@router.post("/notes")
async def add_note(note: Note) -> dict:
    return {"length": len(note.text)}


@router.post("/raw")
async def raw(request: Request) -> dict:
    return {"length": len(await request.body())}


@router.get("/hello")
async def hello() -> dict:
    return {"hello": "world"}


def _app(database_url: str):
    settings = Settings(service_name="bodies", database_url=database_url, max_body_bytes=4096)
    return create_app(settings, [router], body_limits={"POST /raw": 100_000})


@pytest.fixture(scope="module")
def app(common_database_url):
    return _app(common_database_url)


async def test_bodies_within_the_limit_reach_the_route_intact(app):
    async with testing.app_client(app) as client:
        assert (await client.post("/notes", json={"text": "x" * 4000})).json() == {"length": 4000}
        assert (await client.post("/raw", content=b"y" * 99_000)).json() == {"length": 99_000}

        async def chunked():  # no Content-Length: read as it comes
            for _ in range(9):
                yield b"z" * 10_000

        assert (await client.post("/raw", content=chunked())).json() == {"length": 90_000}
        assert (await client.get("/hello")).status_code == 200


async def test_larger_bodies_are_413_per_route(app):
    async with testing.app_client(app) as client:
        response = await client.post("/notes", json={"text": "x" * 5000})
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"
        assert response.headers["connection"] == "close"
        assert (await client.post("/raw", content=b"y" * 100_001)).status_code == 413

        async def chunked():
            for _ in range(20):
                yield b"z" * 10_000

        assert (await client.post("/raw", content=chunked())).status_code == 413
        metrics = (await client.get("/metrics")).text
        assert 'status="413"' in metrics


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _post_huge(base_url: str, path: str, total: int, *, chunked: bool) -> tuple[bytes, int]:
    """POST `total` bytes from one reused 1 MB buffer over a raw socket, reading the answer meanwhile (the
    server may answer and close before the body is through). Returns (answer, bytes sent)."""
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{length}\r\n\r\n".encode()
    )
    answer = bytearray()

    def read() -> None:
        try:
            while data := sock.recv(65536):
                answer.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    block = b" " * (1024 * 1024)
    framed = b"%x\r\n" % len(block) + block + b"\r\n" if chunked else block
    sent = 0
    try:
        while sent < total and not answer:
            sock.sendall(framed)
            sent += len(block)
    except OSError:  # the server closed the connection: it is not reading the rest
        pass
    reader.join(10)
    sock.close()
    return bytes(answer), sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_200_mb_body_is_refused_without_memory_growth(common_database_url, chunked):
    server, thread, base_url = testing.serve_in_thread(_app(common_database_url))
    try:
        before, peak, done = _rss_bytes(), 0, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answer, sent = _post_huge(base_url, "/notes", 200 * 1024 * 1024, chunked=chunked)
        done.set()
        sampler.join()
    finally:
        server.should_exit = True
        thread.join(10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 50 * 1024 * 1024  # the server stopped taking the body long before 200 MB
    assert peak - before < 30 * 1024 * 1024, (before, peak)
