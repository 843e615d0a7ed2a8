"""The process helpers leave nothing behind: a stop takes the whole process group down."""

from __future__ import annotations

import sys

import pytest
from emporium_testbed.process import ManagedProcess, StartupError, group_alive, pid_alive


def test_stop_kills_the_whole_group(tmp_path):
    # A parent that starts a child which ignores SIGTERM: both must be gone after stop().
    stubborn_child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    spawn = f"subprocess.Popen([sys.executable, '-c', {stubborn_child!r}])"
    script = f"import subprocess, sys, time\n{spawn}\ntime.sleep(600)\n"
    process = ManagedProcess(
        "sleeper", [sys.executable, "-c", script], tmp_path / "sleeper.log", pid_path=tmp_path / "sleeper.pid"
    ).start()
    pid = process.pid
    assert pid and pid_alive(pid)
    process.stop(timeout=2)
    assert not pid_alive(pid)
    assert not group_alive(pid)
    assert not (tmp_path / "sleeper.pid").exists()


def test_early_exit_is_reported_with_log(tmp_path):
    process = ManagedProcess(
        "broken", [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"], tmp_path / "broken.log"
    ).start()
    with pytest.raises(StartupError, match="bad flag"):
        process.wait_ready(lambda: False, timeout=10)
