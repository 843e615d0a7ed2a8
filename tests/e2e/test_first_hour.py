"""The first hour, as a newcomer lives it: a copy of this checkout in a folder only its owner may enter, with
a space in its path; `make up` there (cold, timed); the README's quick start pasted verbatim into a new login
shell (`make up` again, the curl walkthrough, `make loadgen` with no failure, the kubectl commands); `make
down` leaves no process behind.

The ingress uses fixed ports (8080, 15000, 15010, 15020, 15021, 15090): one platform per machine. The module
holds a machine-wide lock while its platform runs, so two test runs on one machine take turns.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.local import LocalServers
from emporium_testbed.process import pid_alive, port_open

REPO = Path(__file__).resolve().parents[2]
PLATFORM_LOCK = Path(tempfile.gettempdir()) / "emporium-local-platform-tests.lock"
pytestmark = pytest.mark.timeout(1500)


def make(clone: Path, target: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # the copy has its own environment
    return subprocess.run(
        ["make", "-C", str(clone), target], capture_output=True, text=True, timeout=timeout, env=env
    )


def copy_checkout(destination: Path) -> None:
    """The files git sees in this checkout (tracked and new, not ignored): a clone with the working tree's
    changes, without .local, .venv or caches."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def platform_lock():
    with open(PLATFORM_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def clone(platform_lock, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the checkout in a 0700 folder, with a space in its path, as `mktemp -d` would give."""
    private = Path(tempfile.mkdtemp(prefix="emporium-e2e-"))
    assert private.stat().st_mode & 0o777 == 0o700
    clone = private / "my shop"
    copy_checkout(clone)
    yield clone
    shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="module")
def local(clone: Path):
    assert not port_open("127.0.0.1", GATEWAY_PORT), "port 8080 is taken (is `make up` running? `make down`)"
    root = clone / ".local"
    started = time.monotonic()
    try:
        up = make(clone, "up")
        assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
        print(f"cold up (new clone, toolchain built): {time.monotonic() - started:.0f} s")
        assert "Next, try:" in up.stdout and "export KUBECONFIG=" in up.stdout, up.stdout
        yield root
    finally:
        pids = [int(p.read_text()) for p in root.rglob("*.pid") if p.read_text().strip().isdigit()]
        server_data = (
            Path(LocalServers(root).state["server_data"]) if (root / "state.json").exists() else None
        )
        down = make(clone, "down", timeout=300)
        assert down.returncode == 0, down.stderr
        alive = [pid for pid in pids if pid_alive(pid)]
        assert not alive, f"processes left after down: {alive}"
        assert not port_open("127.0.0.1", GATEWAY_PORT)
        if server_data and not server_data.is_relative_to(clone):
            shutil.rmtree(server_data, ignore_errors=True)  # /var/lib/emporium/<hash> of this copy


def readme_quick_start(readme: Path) -> str:
    """Every `sh` block of the README's quick start, in order, as one script: what a newcomer pastes."""
    text = readme.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL))


def test_readme_commands_work_verbatim_in_a_new_login_shell(local, clone):
    """The README's quick start, pasted into a new login shell in the clone (nothing inherited from this
    process but HOME): `make up` again (warm), the curl walkthrough, `make loadgen` with 0 failures and the
    kubectl commands."""
    script = readme_quick_start(clone / "README.md")
    assert "make up" in script and "make loadgen" in script and "kubectl apply" in script
    started = time.monotonic()
    run = subprocess.run(
        ["env", "-i", f"HOME={Path.home()}", "TERM=dumb", "bash", "-l", "-c", script],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout
    report = (
        f"exit {run.returncode} after {time.monotonic() - started:.0f} s\n{out[-6000:]}\n{run.stderr[-4000:]}"
    )
    assert run.returncode == 0, report
    assert "Emporium is up" in out, report  # the warm `make up`
    assert '"email":"ann@example.com"' in out.replace(" ", ""), report  # /users/me
    assert '"total_amount"' in out and '"notifications"' in out, report  # the order, the notifications
    # The ingress's refusals (the first follows the previous curl's JSON, which ends without a newline).
    assert re.search(r"403\n401\n403$", out, flags=re.MULTILINE), report
    # make loadgen: no failure (Locust prints its summary on stderr)
    assert re.search(r"Aggregated\s+\d+\s+0\(0\.00%\)", run.stderr), report
    assert "condition met" in out, report  # kubectl wait
    assert "postgresql://" in out, report  # the new database's Secret
