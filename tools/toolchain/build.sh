#!/usr/bin/env bash
# Ensures the pinned toolchain (kube-apiserver, kube-controller-manager, kubectl, etcd, helm, kubeconform,
# skaffold, istio's pilot-discovery and pilot-agent, postgres_exporter, the OpenTelemetry Collector and
# Jaeger) and prints the bin directory on its last line.
#
# Binaries are built from the Go module proxy into ~/.cache/emporium/toolchain/bin (override with
# EMPORIUM_CACHE) and reused by every clone on the machine: only the first run pays for the build.
# A binary of the right version found in $EMPORIUM_TOOLS_BIN or on PATH is linked instead of built.
#
# Usage: build.sh [tool ...]   (default: every tool)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${EMPORIUM_CACHE:-$HOME/.cache/emporium}
bin=$cache/toolchain/bin
stamps=$cache/toolchain/stamps
mkdir -p "$bin" "$stamps"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
# One build at a time per cache: a second `make test` started meanwhile waits instead of building twice.
# Taken only when something must be built, so a run whose tools are all there never waits.
locked=""
lock() {
  [ -z "$locked" ] || return 0
  exec 9>"$cache/toolchain/.lock"
  if ! flock -n 9; then
    echo "toolchain: another build holds $cache/toolchain/.lock; waiting for it" >&2
    flock 9
  fi
  locked=1
}
log() { echo "toolchain: $*" >&2; }

# version_of TOOL BINARY: the version string the binary reports, for comparison with the pin.
version_of() {
  case $1 in
    kube-apiserver | kube-controller-manager) "$2" --version 2>/dev/null | awk '{print $2}' ;;
    kubectl) "$2" version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -1 ;;
    etcd) "$2" --version 2>/dev/null | awk '/etcd Version/ {print "v" $3}' ;;
    helm) "$2" version --template '{{.Version}}' 2>/dev/null ;;
    kubeconform) "$2" -v 2>/dev/null ;;
    pilot-discovery | pilot-agent) "$2" version --short 2>/dev/null | sed -n "s/^client version: //p" ;;
    skaffold) "$2" version 2>/dev/null ;;
    postgres_exporter) "$2" --version 2>&1 | awk '/version/ {print "v" $3; exit}' ;;
    otelcol) "$2" --version 2>/dev/null | awk '{print "v" $NF}' ;;
    jaeger) "$2" version 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' ;;
  esac
}

pin_of() {
  case $1 in
    kube-apiserver | kube-controller-manager | kubectl) echo "$KUBERNETES_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    helm) echo "$HELM_VERSION" ;;
    kubeconform) echo "$KUBECONFORM_VERSION" ;;
    skaffold) echo "$SKAFFOLD_VERSION" ;;
    pilot-discovery | pilot-agent) echo "$ISTIO_VERSION" ;;
    postgres_exporter) echo "$POSTGRES_EXPORTER_VERSION" ;;
    otelcol) echo "$OTELCOL_VERSION" ;;
    jaeger) echo "$JAEGER_VERSION" ;;
    *) log "unknown tool $1"; exit 2 ;;
  esac
}

# adopt TOOL: link an existing binary of the pinned version from EMPORIUM_TOOLS_BIN or PATH.
adopt() {
  local tool=$1 want candidate
  want=$(pin_of "$tool")
  for candidate in ${EMPORIUM_TOOLS_BIN:+"$EMPORIUM_TOOLS_BIN/$tool"} "$(command -v "$tool" || true)"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && [ "$candidate" != "$bin/$tool" ] || continue
    if [ "$(version_of "$tool" "$candidate")" = "$want" ]; then
      ln -sf "$candidate" "$bin/$tool"
      echo "$want" >"$stamps/$tool"
      log "$tool $want: using $candidate"
      return 0
    fi
  done
  return 1
}

go_build() { # go_build MODULE_DIR OUTPUT PACKAGE TAGS LDFLAGS
  (cd "$here/$1" && nice -n 10 go build -trimpath -tags "$4" -ldflags "-s -w $5" -o "$bin/$2" "$3")
}

kube_ldflags() {
  local v=$KUBERNETES_VERSION major minor
  major=$(echo "${v#v}" | cut -d. -f1)
  minor=$(echo "${v#v}" | cut -d. -f2)
  local out="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    out+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$out"
}

build() {
  local tool=$1 helm_k8s_minor
  case $tool in
    kube-apiserver | kube-controller-manager | kubectl)
      go_build kubernetes "$tool" "k8s.io/kubernetes/cmd/$tool" "selinux,notest,grpcnotrace" "$(kube_ldflags)" ;;
    etcd)
      go_build etcd etcd go.etcd.io/etcd/server/v3 "" "" ;;
    helm)
      helm_k8s_minor=$(echo "${KUBERNETES_VERSION#v}" | cut -d. -f2)
      go_build helm helm helm.sh/helm/v3/cmd/helm "" \
        "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
         -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor \
         -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor" ;;
    kubeconform)
      go_build kubeconform kubeconform github.com/yannh/kubeconform/cmd/kubeconform "" "" ;;
    skaffold) # 10-20 min on 2 cores, once per machine
      go_build skaffold skaffold github.com/GoogleContainerTools/skaffold/v2/cmd/skaffold "" \
        "-X github.com/GoogleContainerTools/skaffold/v2/pkg/skaffold/version.version=$(pin_of skaffold)" ;;
    pilot-discovery)
      go_build istio pilot-discovery istio.io/istio/pilot/cmd/pilot-discovery "vtprotobuf,disable_pgv" "$(istio_ldflags)" ;;
    pilot-agent)
      go_build istio pilot-agent istio.io/istio/pilot/cmd/pilot-agent "agent,disable_pgv,grpcnotrace,retrynotrace" "$(istio_ldflags)" ;;
    postgres_exporter)
      go_build postgres_exporter postgres_exporter github.com/prometheus-community/postgres_exporter/cmd/postgres_exporter "" \
        "-X github.com/prometheus/common/version.Version=${POSTGRES_EXPORTER_VERSION#v}" ;;
    otelcol) # our own main.go: only the OTLP receiver, the batch processor and the OTLP exporter
      go_build otelcol otelcol . "" "-X main.version=${OTELCOL_VERSION#v}" ;;
    jaeger) # Jaeger v2 (an OpenTelemetry Collector distribution): 10-20 min on 2 cores, once per machine
      go_build jaeger jaeger github.com/jaegertracing/jaeger/cmd/jaeger "" \
        "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION" ;;
  esac
}

istio_ldflags() {
  local p=istio.io/istio/pkg/version
  echo "-X $p.buildVersion=$ISTIO_VERSION -X $p.buildGitRevision=$ISTIO_VERSION -X $p.buildStatus=Clean -X $p.buildTag=$ISTIO_VERSION"
}

ensure() {
  local tool=$1 want
  want=$(pin_of "$tool")
  if [ -x "$bin/$tool" ] && [ "$(cat "$stamps/$tool" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  adopt "$tool" && return 0
  lock
  # Built meanwhile by the run that held the lock?
  if [ -x "$bin/$tool" ] && [ "$(cat "$stamps/$tool" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  log "building $tool $want (first run on this machine; later runs reuse it)"
  local start=$SECONDS
  build "$tool"
  echo "$want" >"$stamps/$tool"
  log "built $tool $want in $((SECONDS - start)) s"
}

tools=("$@")
# Default: everything `make test` and `make up` use (the first run on a machine builds it all, later runs
# reuse it): the control plane, kubectl, helm, kubeconform (chart tests), pilot-agent and istiod (the local
# ingress), postgres_exporter, otelcol and jaeger (the local platform's metrics and traces; jaeger takes
# 10-35 minutes on 2 cores, once), and last skaffold, the longest build and the one fewest tests need.
[ ${#tools[@]} -gt 0 ] || tools=(etcd kube-apiserver kube-controller-manager kubectl helm kubeconform pilot-agent \
  pilot-discovery postgres_exporter otelcol jaeger skaffold)
for t in "${tools[@]}"; do ensure "$t"; done
echo "$bin"
