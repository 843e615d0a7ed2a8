"""serve_reloading (RELOAD_DIR, skaffold dev only): a real uvicorn with reload serves an app factory found on
PYTHONPATH and serves the edited code after a .py file under RELOAD_DIR changes, logging JSON lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

APP = """
from fastapi import FastAPI


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/version")
    def version() -> dict:
        return {{"version": VERSION}}

    return app


VERSION = {version}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_version(url: str, expected: int, deadline: float) -> None:
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=2).json()["version"]
            if last == expected:
                return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"version {expected} not served; last answer: {last!r}")


def test_reload_serves_the_edited_source(tmp_path: Path) -> None:
    source = tmp_path / "dev"
    source.mkdir()
    (source / "reload_probe_app.py").write_text(APP.format(version=1))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(source),
        "RELOAD_DIR": str(source),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SERVICE_NAME": "reload-probe",
    }
    code = (
        "from emporium_common.reload import serve_reloading\n"
        "from emporium_common.config import Settings\n"
        "serve_reloading('reload_probe_app:build_app', Settings())\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/version"
    try:
        wait_for_version(url, 1, time.monotonic() + 60)
        (source / "reload_probe_app.py").write_text(APP.format(version=2))
        wait_for_version(url, 2, time.monotonic() + 60)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=20)
    # the worker logs through our JSON logging (reloading_app), not uvicorn's plain lines
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(r.get("service") == "reload-probe" for r in records), output[-2000:]
