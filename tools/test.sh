#!/usr/bin/env bash
# `make test`: install what is missing, ensure the toolchain, lint, then run the whole pytest suite.
# Extra arguments go to pytest (e.g. `make test ARGS="services/users -k login"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"

bash tools/bootstrap.sh
EMPORIUM_TOOLCHAIN_BIN=$(bash tools/toolchain/build.sh | tail -n 1)
export EMPORIUM_TOOLCHAIN_BIN
export PATH="$EMPORIUM_TOOLCHAIN_BIN:$PATH"

# The kind suite runs when Docker can run containers: as root this installs Debian's docker.io and starts a dockerd
# when none answers (tools/kind/lib.sh ensure_docker); otherwise it says why and the kind tests are skipped.
if bash tools/kind/cluster.sh docker; then
  export EMPORIUM_DOCKER=1
else
  echo "== no usable Docker engine (reason above): the kind tests will not run" >&2
  export EMPORIUM_DOCKER=0
fi

echo "== ruff"
uv run --locked ruff check .
uv run --locked ruff format --check .

# Issue 12: schemathesis runs 200 examples per operation (0 5xx) in every make test, hence in CI.
export SCHEMATHESIS_MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-200}"

echo "== pytest"
status=0
uv run --locked pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
