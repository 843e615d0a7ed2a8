"""serve(): the real uvicorn server, in a process of its own."""

import socket
import subprocess
import sys
import time

import httpx

SERVER = """
import gc, sys
from emporium_common import Settings
from emporium_common.app import serve
from fastapi import FastAPI

app = FastAPI()

@app.get("/gc")
def gc_state() -> dict:
    return {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}

serve(app, Settings(host="127.0.0.1", port=int(sys.argv[1])))
"""


def test_serve_freezes_what_startup_built() -> None:
    """What the process built before serving is out of the collector's sight (gc.freeze): full collections
    walk only what requests leave behind, not the modules, the app and its routes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                state = httpx.get(f"http://127.0.0.1:{port}/gc", timeout=2).json()
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert state["frozen"] > 10_000, state
    assert state["tracked"] < state["frozen"] / 2, state
