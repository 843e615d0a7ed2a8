#!/usr/bin/env bash
# Installs what `make test` and `make up` need on a fresh machine and is a no-op once it is there:
# uv, the Python environment (from uv.lock), (as root, via apt) RabbitMQ, promtool, Postgres 15, Java and
# Maven, and the test bed's OpenID provider (mock-oauth2-server's jars, from Maven Central, once), Chromium +
# chromedriver (browser tests); then the browser tests' npm packages (package-lock.json).
# Go (for the toolchain build) must already be on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "bootstrap: $*" >&2; }

need_apt=()
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# Java and Maven: the test bed's OpenID provider (mock-oauth2-server) is a Java program from Maven Central.
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql-15)
# the storefront's browser tests: Debian's Chromium and its matching chromedriver, npm for axe-core
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${need_apt[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps the packages' own services from starting: the test bed runs its own instances.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
  else
    log "missing ${need_apt[*]}: install them (apt-get install ${need_apt[*]}) or run as root"
    exit 1
  fi
fi
command -v go >/dev/null 2>&1 || { log "Go (1.26) is required to build the toolchain: https://go.dev/dl"; exit 1; }

if ! command -v uv >/dev/null 2>&1; then
  log "installing uv from PyPI"
  python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
  export PATH="$HOME/.local/bin:$PATH"
fi
uv sync --all-packages --locked --quiet
# The test bed's OpenID provider (mock-oauth2-server): jars from Maven Central into ~/.cache/emporium, once.
uv run --locked python -m emporium_testbed.oidc install >/dev/null
# axe-core (runs inside the browser in the storefront's tests), from the npm registry by its lockfile.
# `bootstrap.sh platform` (make up) skips it: only the tests use it.
if [ "${1:-}" != platform ] && [ ! -f tests/e2e/browser/node_modules/axe-core/axe.min.js ]; then
  log "installing the browser tests' npm packages (npm ci)"
  npm ci --prefix tests/e2e/browser --ignore-scripts --no-audit --no-fund --silent
fi
