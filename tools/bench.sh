#!/usr/bin/env bash
# `make bench`: every benchmark script, each bounded in count and time, printing its figures.
# Benchmarks start their own servers on loopback (the test bed's classes); nothing else is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
bash tools/bootstrap.sh
EMPORIUM_TOOLCHAIN_BIN=$(bash tools/toolchain/build.sh | tail -n 1)
export EMPORIUM_TOOLCHAIN_BIN PATH="$EMPORIUM_TOOLCHAIN_BIN:$PATH"

for script in services/bench/bench_services.py services/bench/bench_tracing.py operator/bench/bench_operator.py \
  tools/bench_platform.py; do
  echo "== $script"
  uv run --locked python "$script" "$@"
done
