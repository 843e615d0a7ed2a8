"""Property-based run of the published OpenAPI against a real server process: no input may cause a 5xx.

Bounded: a few dozen examples per operation and mode, about a minute in all.
"""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import schemathesis
from emporium_common import testing
from emporium_common.migrations import upgrade_head
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import ALEMBIC_INI

# A deeper local run: SCHEMATHESIS_MAX_EXAMPLES=500 uv run pytest services/users/tests/test_schemathesis.py
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "30"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    # Its own database: the data this run commits cannot meet the other tests' rows.
    database_url = testing.create_test_database(postgres, "users_fuzz")
    upgrade_head(ALEMBIC_INI, database_url)
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PORT": str(port),
        "JWT_KEYS_DIR": str(tmp_path_factory.mktemp("fuzz-keys")),
        "LOG_LEVEL": "WARNING",
    }
    log_path = tmp_path_factory.mktemp("fuzz-log") / "users.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "emporium_users", "serve"], env=env, stdout=log, stderr=log
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a busy shared machine imports slowly
        while True:
            try:
                if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"users server did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base_url, log_path
    finally:
        process.terminate()
        process.wait(10)


def test_no_input_causes_a_server_error(server):
    base_url, log_path = server
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures = []
    seen: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/users/register", "/users/login", "/users/me"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=base_url, timeout=10)
                seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.path} -> {response.status_code}: {case.as_curl_command()}"
                    )

            try:
                check()
            except Unsatisfiable:  # negative mode on an operation without inputs: nothing to break
                assert mode is GenerationMode.NEGATIVE
    # The run did reach the handlers, with valid and invalid input alike.
    assert {201, 422} <= seen["POST /users/register"], seen
    assert 422 in seen["POST /users/login"] and 401 in seen["GET /users/me"], seen
    assert not failures, "\n".join(failures[:20]) + f"\n(server log: {log_path})"
