#!/usr/bin/env bash
# `make up|down|status`: the local platform (emporium_testbed.platform). State, kubeconfig, admin
# credentials and logs live in .local/ (override with EMPORIUM_LOCAL).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
command=${1:?usage: platform.sh up|down|status}
if [ "$command" = up ]; then
  bash tools/bootstrap.sh platform
  EMPORIUM_TOOLCHAIN_BIN=$(bash tools/toolchain/build.sh etcd kube-apiserver kube-controller-manager kubectl helm \
    pilot-discovery pilot-agent postgres_exporter otelcol jaeger | tail -n 1)
  export EMPORIUM_TOOLCHAIN_BIN
fi
exec uv run --locked python -m emporium_testbed.platform "$command"
