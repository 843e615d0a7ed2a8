"""Property-based run of the published OpenAPI against a real server process: no input may cause a 5xx.

Bounded: ``testing.FUZZ_EXAMPLES`` examples per operation and mode (200 in ``make test``).
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
MAX_EXAMPLES = testing.FUZZ_EXAMPLES


# `python -m emporium_users serve` with bcrypt at 4 rounds, as conftest.py sets for the in-process tests:
# what is fuzzed is the handling of inputs, and at 12 rounds (a quarter of a second of CPU per hash, more on
# a busy machine) the hundreds of registrations and logins took most of the run.
SERVE_FAST_HASHES = """
import sys, bcrypt
import emporium_users.security as security
security.BCRYPT_ROUNDS = 4
security._DUMMY_HASH = bcrypt.hashpw(b"not-a-real-password", bcrypt.gensalt(4))
from emporium_users.__main__ import main
sys.exit(main(["serve"]))
"""


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
        # Failed logins from one address are slowed down (up to 4 s each after 10 failures): the fuzzer's
        # hundreds of logins would spend most of the run asleep. The throttling has tests of its own.
        "LOGIN_SLOWDOWN_MAX_SECONDS": "0",
    }
    log_path = tmp_path_factory.mktemp("fuzz-log") / "users.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", SERVE_FAST_HASHES], env=env, stdout=log, stderr=log)
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


@pytest.mark.timeout(testing.fuzz_timeout(operations=20))
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
                response = case.call(base_url=base_url, timeout=30)  # bcrypt on a busy machine
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
