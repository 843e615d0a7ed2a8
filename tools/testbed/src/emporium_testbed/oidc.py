"""A real OpenID Connect provider for tests and the local platform: NAV's mock-oauth2-server (Maven Central,
``no.nav.security:mock-oauth2-server``), run as a plain Java process.

Why this one: it is a complete OIDC provider (discovery, JWKS, authorization code flow with PKCE checks,
nonce, any number of issuers under ``/<issuer_id>``) that starts in seconds in ~150 MB, and its login page
takes the claims to put in the ID token, so tests can sign in as a user whose email is or is not verified,
or get an ID token for another audience or with another nonce, through the real flow. Keycloak would need
a realm, clients and users set up per case and ~1 GB; Dex cannot issue an unverified email or odd claims.

Install: the jar and its runtime dependencies are copied from Maven Central by ``mvn`` (Java 17 and Maven
are on the machine) into ``~/.cache/emporium/mock-oauth2-server/<version>/lib`` once
(``python -m emporium_testbed.oidc install``; tools/bootstrap.sh runs it). Each issuer id is its own
provider: ``provider.issuer("default")`` is ``http://127.0.0.1:<port>/default``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .process import ManagedProcess, free_port

VERSION = "6.0.2"
MAIN_CLASS = "no.nav.security.mock.oauth2.StandaloneMockOAuth2ServerKt"
CACHE_ROOT = Path(os.environ.get("EMPORIUM_CACHE", Path.home() / ".cache" / "emporium"))

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>emporium.testbed</groupId>
  <artifactId>mock-oauth2-server-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>no.nav.security</groupId>
      <artifactId>mock-oauth2-server</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


def lib_dir(version: str = VERSION) -> Path:
    return CACHE_ROOT / "mock-oauth2-server" / version / "lib"


def install(version: str = VERSION) -> Path:
    """The directory with the server's jars, copied from Maven Central on first use (a no-op afterwards)."""
    lib = lib_dir(version)
    if (lib / ".complete").exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs installing at once: one does it, the other waits
        if (lib / ".complete").exists():
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise FileNotFoundError(
                "mvn (Maven) is needed once to fetch mock-oauth2-server: apt-get install maven"
            )
        with tempfile.TemporaryDirectory() as work:
            (Path(work) / "pom.xml").write_text(_POM.format(version=version))
            target = Path(work) / "lib"
            subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={target}",
                    "-DincludeScope=runtime",
                ],
                cwd=work,
                check=True,
                stdin=subprocess.DEVNULL,
            )
            if lib.exists():
                shutil.rmtree(lib)
            shutil.copytree(target, lib)
        (lib / ".complete").write_text(version)
    return lib


@dataclass
class MockOIDCProvider:
    """mock-oauth2-server on 127.0.0.1:port with the interactive login page."""

    base_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    pid_path: Path | None = None
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        self.log_path = (self.log_dir or self.base_dir) / "mock-oauth2-server.log"
        config = {"interactiveLogin": True, "httpServer": "NettyWrapper"}
        env = {"SERVER_HOSTNAME": self.host, "SERVER_PORT": str(self.port), "JSON_CONFIG": json.dumps(config)}
        # argv is filled in at start (finding the jars may mean fetching them); stop works from any process.
        self.process = ManagedProcess(
            "mock-oauth2-server", [], self.log_path, env=env, cwd=self.base_dir, pid_path=self.pid_path
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def issuer(self, issuer_id: str = "default") -> str:
        return f"{self.url}/{issuer_id}"

    def _argv(self) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise FileNotFoundError("java (17 or newer) is needed for mock-oauth2-server")
        # Small heap, serial GC, C1 only: it serves a handful of requests per test.
        return [
            java,
            "-Xmx160m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Xss512k",
            "-cp",
            f"{install()}/*",
            MAIN_CLASS,
        ]

    def start(self, timeout: float = 90) -> MockOIDCProvider:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.process.argv = self._argv()
        self.process.start()
        try:
            self.process.wait_ready(self.ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        with urllib.request.urlopen(
            f"{self.issuer()}/.well-known/openid-configuration", timeout=2
        ) as response:
            return response.status == 200

    def running(self) -> bool:
        return self.process.running()

    def stop(self) -> None:
        self.process.stop(timeout=10)

    def sign_in(self, authorize_url: str, username: str, claims: dict | None = None) -> str:
        """Play the browser at the provider's login page: submit ``username`` (the ``sub``) and extra ID token
        ``claims``; returns where the provider redirects (the relying party's callback URL, with code and
        state). Claims given here override the provider's own (``aud``, ``nonce``, ``iss``: for tests of the
        relying party's checks)."""
        form = urllib.parse.urlencode({"username": username, "claims": json.dumps(claims or {})}).encode()
        request = urllib.request.Request(authorize_url, data=form, method="POST")
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            opener.open(request, timeout=10)
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303) and exc.headers.get("Location"):
                return exc.headers["Location"]
            raise
        raise RuntimeError("the provider did not redirect after the login")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description="mock-oauth2-server, a real OpenID provider for local runs")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="fetch the jars from Maven Central into the cache (once)")
    run = commands.add_parser("run", help="run it in the foreground")
    run.add_argument("--port", type=int, default=8090)
    run.add_argument("--dir", type=Path, default=Path(".local/oidc"))
    args = parser.parse_args()
    if args.command == "install":
        print(install())
        return
    provider = MockOIDCProvider(args.dir, port=args.port).start()
    print(f"OpenID provider: issuers {provider.url}/<id>, e.g. {provider.issuer()}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        provider.stop()


if __name__ == "__main__":
    main()
