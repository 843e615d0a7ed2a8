"""Starting, watching and stopping local server processes.

Every component of the test bed is a plain child process in its own session (process group), with its
output in a log file, so a stop can take the whole group down and no process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class StartupError(RuntimeError):
    """A component did not become ready; the message names its log file."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise StartupError(f"{what} not ready after {timeout:.0f} s" + (f"; see {log}" if log else ""))


def is_root() -> bool:
    return os.geteuid() == 0


def chown_to(path: Path, user: str) -> None:
    """Give a directory tree to a service user (Postgres and RabbitMQ refuse to run as root)."""
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def as_user(user: str | None, argv: Sequence[str]) -> list[str]:
    """argv run as user when we are root; as ourselves otherwise."""
    if user and is_root():
        return ["runuser", "-u", user, "--", *argv]
    return list(argv)


class ManagedProcess:
    """One long-running child process with a log file and a pid file.

    The pid file lets a later command (``make down``, ``make status``) find a process that an earlier
    command started, which is how the local platform outlives the command that starts it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pid_path: Path | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.nice = nice
        self.stop_signal = stop_signal
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.pid_path = pid_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        if self.nice:
            set_priority(self.popen.pid, self.nice)
        if self.pid_path:
            self.pid_path.parent.mkdir(parents=True, exist_ok=True)
            self.pid_path.write_text(str(self.popen.pid))
        return self

    @property
    def pid(self) -> int | None:
        if self.popen:
            return self.popen.pid
        if self.pid_path and self.pid_path.exists():
            with contextlib.suppress(ValueError):
                return int(self.pid_path.read_text().strip())
        return None

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        pid = self.pid
        return pid is not None and pid_alive(pid)

    def check_alive(self) -> None:
        if not self.running():
            raise StartupError(f"{self.name} exited early; see {self.log_path}:\n{tail(self.log_path)}")

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        def alive_and_ready() -> bool:
            self.check_alive()
            return check()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(Exception):
                if alive_and_ready():
                    return
            time.sleep(0.2)
        raise StartupError(
            f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.pid
        if pid is not None:
            stop_group(pid, timeout, first=self.stop_signal)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
        if self.pid_path:
            self.pid_path.unlink(missing_ok=True)


# The niceness, while they boot, of a process no step of a start waits for (a lab's sign-in provider)
# and of the one every start waits for longest (RabbitMQ), which only root may raise.
BACKGROUND_NICE = 5
CRITICAL_NICE = -10


def set_priority(pid: int, nice: int) -> None:
    """Weigh a process's claim to CPU when it is short. Each process here has its own session, and with
    the kernel's autogroup scheduling a session's weight is its autogroup's nice value, so set both that
    and the process's own. Best effort: raising a priority takes root."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PGRP, pid, nice)  # the process and whatever it started (its own group)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_group(pid: int, timeout: float = 15.0, first: signal.Signals = signal.SIGTERM) -> None:
    """Signal the process group led by pid (SIGTERM unless the server wants another), then SIGKILL what is
    left after timeout."""
    for sig in (first, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid) and not group_alive(pid):
                return
            time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def listener_pid(port: int) -> int | None:
    """The process listening on TCP port (any address), from /proc; None if none or not visible."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(fd_dir.parent.name)
    return None


def describe_process(pid: int) -> str:
    """`name (pid N, started in DIR)` for messages about a process we did not start."""
    name = cwd = "?"
    with contextlib.suppress(OSError):
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    with contextlib.suppress(OSError):
        cwd = os.readlink(f"/proc/{pid}/cwd")
    return f"{name} (pid {pid}, working directory {cwd})"
