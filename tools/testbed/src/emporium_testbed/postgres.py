"""A throwaway Postgres 15 cluster from the installed binaries."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .process import ManagedProcess, StartupError, as_user, chown_to, free_port, is_root

PG_USER = "postgres"  # the OS user Postgres runs as when we are root


def pg_bin(name: str) -> str:
    """Path of a Postgres binary: on PATH, or in the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise FileNotFoundError(f"Postgres binary {name!r} not found: install postgresql-15")
    return str(candidates[-1])


@dataclass
class PostgresServer:
    """A Postgres cluster in base_dir, listening on 127.0.0.1:port with a password-protected superuser."""

    base_dir: Path
    port: int = field(default_factory=free_port)
    superuser: str = "postgres"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    host: str = "127.0.0.1"
    log_dir: Path | None = None  # default: base_dir

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.log_path = Path(self.log_dir or self.base_dir) / "postgres.log"
        self.process = ManagedProcess(
            "postgres",
            as_user(
                PG_USER,
                [
                    pg_bin("postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    "max_connections=300",
                    # Throwaway data: durability is not worth the fsyncs.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ],
            ),
            self.log_path,
            pid_path=self.base_dir / "postgres.pid",
            # SIGINT is Postgres's "fast" shutdown: it ends open sessions and exits cleanly. SIGTERM
            # ("smart") waits for every client to leave, and a SIGKILLed postmaster leaves a lock file
            # that blocks the next start.
            stop_signal=signal.SIGINT,
        )

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        """A libpq/asyncpg URL (``postgresql://``) for dbname."""
        user = user or self.superuser
        password = self.password if password is None else password
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if is_root():
            chown_to(self.base_dir, PG_USER)
        initdb = subprocess.run(
            as_user(
                PG_USER,
                [
                    pg_bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    "--pwfile",
                    str(pwfile),
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
            ),
            capture_output=True,
            text=True,
        )
        if initdb.returncode != 0:
            raise StartupError(
                f"initdb failed in {self.data_dir}: {initdb.stderr.strip() or initdb.stdout.strip()}"
            )
        pwfile.unlink()

    def start(self, timeout: float = 60) -> PostgresServer:
        self.init()
        if is_root():
            chown_to(self.base_dir, PG_USER)
        self.process.start()
        try:
            self.process.wait_ready(self.ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        result = subprocess.run(
            [pg_bin("pg_isready"), "-h", self.host, "-p", str(self.port), "-U", self.superuser],
            capture_output=True,
        )
        return result.returncode == 0

    def stop(self) -> None:
        self.process.stop()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser and return psql's unaligned output (for tests and setup)."""
        result = subprocess.run(
            [pg_bin("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", self.dsn(dbname), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def create_database(self, name: str, owner: str | None = None) -> str:
        """Create a database (quoted identifier) and return its superuser DSN."""
        ident = '"' + name.replace('"', '""') + '"'
        owner_sql = f' OWNER "{owner}"' if owner else ""
        self.psql(f"CREATE DATABASE {ident}{owner_sql}")
        return self.dsn(name)
