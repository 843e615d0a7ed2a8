# shellcheck shell=bash
# Common helpers for the kind path (tools/kind/*.sh and tools/images): Docker on the machine, cached and timed build
# steps, Debian root filesystems, and the environment kind, kubectl and skaffold run in. Source it; it sets no shell
# options of its own.
#
# Caches (override the root with EMPORIUM_CACHE):
#   ~/.cache/emporium/kind     kind's binaries (bin/), step stamps (stamps/), build logs (logs/), docker-config/
#   ~/.cache/emporium/images   Debian root filesystems (rootfs/<name>) that images are made from
#   ~/.cache/emporium/timings.tsv   one line per build step run: date, step, cold|cached, seconds, key

EMPORIUM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../toolchain/versions.env
source "$EMPORIUM_ROOT/tools/toolchain/versions.env"
EMPORIUM_CACHE=${EMPORIUM_CACHE:-$HOME/.cache/emporium}
KIND_CACHE=$EMPORIUM_CACHE/kind
IMAGES_CACHE=$EMPORIUM_CACHE/images
KIND_BIN=$KIND_CACHE/bin
KIND_LOGS=$KIND_CACHE/logs
KIND_STAMPS=$KIND_CACHE/stamps
EMPORIUM_TIMINGS=$EMPORIUM_CACHE/timings.tsv
KIND_CLUSTER=${KIND_CLUSTER:-emporium}
KIND_CONTEXT=kind-$KIND_CLUSTER
KIND_SHIM_DIR=$EMPORIUM_ROOT/tools/kind/docker-shim
DEBIAN_SUITE=bookworm
mkdir -p "$KIND_BIN" "$KIND_LOGS" "$KIND_STAMPS" "$IMAGES_CACHE"

log() { printf '%s kind: %s\n' "$(date +%T)" "$*" >&2; }
die() {
  printf 'kind: %s\n' "$*" >&2
  exit 1
}

# --- Docker ---------------------------------------------------------------------------------------------------

docker_answers() { timeout 20 docker info >/dev/null 2>&1; }

# ensure_docker: a Docker engine that answers. Reuses a running one (DOCKER_HOST or /var/run/docker.sock);
# as root installs Debian's docker.io when no engine is installed and starts a dockerd when none answers
# (data in /var/lib/docker, log in /var/log/emporium-dockerd.log; it keeps running for the next run).
ensure_docker() {
  command -v docker >/dev/null 2>&1 && docker_answers && return 0
  local root=0
  [ "$(id -u)" = 0 ] && root=1
  if [ -S /var/run/docker.sock ] && [ $root = 0 ] && ! [ -w /var/run/docker.sock ]; then
    die "a Docker engine is running but $(id -un) may not use /var/run/docker.sock: add the user to the docker
group (usermod -aG docker $(id -un), then log in again) or run as root"
  fi
  if ! command -v dockerd >/dev/null 2>&1 && ! [ -x /usr/sbin/dockerd ] && ! [ -x /usr/bin/dockerd ]; then
    [ $root = 1 ] || die "no container engine on this machine. Install Docker (as root: apt-get install docker.io)
or run this as root, which installs Debian's docker.io and starts it. Nothing was started."
    log "installing Debian's docker.io (dockerd, containerd, runc; data goes to /var/lib/docker)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d: the package must not try to start its service (there may be no init system); we start it below.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null || {
      rm -f /usr/sbin/policy-rc.d
      die "apt-get install docker.io failed"
    }
    rm -f /usr/sbin/policy-rc.d
  fi
  if ! command -v docker >/dev/null 2>&1; then
    die "dockerd is installed but the docker CLI is not; install it (apt-get install docker.io)"
  fi
  [ $root = 1 ] || die "no Docker engine answers (docker info failed). Start it (sudo systemctl start docker, or
sudo dockerd &) or run this as root, which starts one. Nothing was started."
  [ -z "${DOCKER_HOST:-}" ] || die "DOCKER_HOST=$DOCKER_HOST does not answer; unset it to use (or start) the default engine"
  if [ -d /run/systemd/system ] && systemctl cat docker.service >/dev/null 2>&1; then
    log "starting docker.service"
    systemctl start docker.service
  else
    log "starting dockerd (data in /var/lib/docker, log /var/log/emporium-dockerd.log); it keeps running afterwards"
    PATH=$PATH:/usr/sbin:/sbin setsid nohup dockerd >>/var/log/emporium-dockerd.log 2>&1 </dev/null &
  fi
  local i
  for i in $(seq 60); do
    docker_answers && return 0
    sleep 1
  done
  die "dockerd did not answer within 60 s; see /var/log/emporium-dockerd.log"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# prune_superseded IMAGE: removes the other tags of IMAGE's repository (older recipe keys of an image built here), so
# the cache does not grow with every recipe change. Images still in use stay.
prune_superseded() {
  local repo=${1%:*} t
  for t in $(docker images --format '{{.Repository}}:{{.Tag}}' "$repo"); do
    [ "$t" = "$1" ] || docker rmi "$t" >/dev/null 2>&1 || true
  done
}

# try_pull IMAGE: pull when a registry answers (bounded); fails fast offline. EMPORIUM_OFFLINE=1 skips pulls.
try_pull() {
  [ "${EMPORIUM_OFFLINE:-0}" = 1 ] && return 1
  timeout "${EMPORIUM_PULL_TIMEOUT:-60}" docker pull -q "$1" >/dev/null 2>&1
}

# privileged_works IMAGE: can docker start a --privileged container here? (No on hosts whose capability
# bounding set lacks a capability docker grants to privileged containers, e.g. CAP_SYS_RESOURCE on this VM.)
privileged_works() {
  docker run --rm --privileged --entrypoint /bin/true "$1" >/dev/null 2>&1
}

# --- cached, timed steps --------------------------------------------------------------------------------------

# recipe_key FILE_OR_STRING...: a short hash of the given files' contents (or the strings themselves).
recipe_key() {
  local a
  for a in "$@"; do
    if [ -f "$a" ]; then
      printf 'file %s\n' "${a#"$EMPORIUM_ROOT"/}"
      cat "$a"
    else
      printf 'str %s\n' "$a"
    fi
  done | sha256sum | cut -c1-16
}

# step NAME KEY CHECK -- COMMAND...: run COMMAND (output to $KIND_LOGS/NAME.log) unless the stamp of NAME holds KEY
# and CHECK (a shell condition, e.g. '[ -x file ]' or 'have_image tag') still holds. NAME is "<image>/<step>".
# Times every run into $EMPORIUM_TIMINGS. On failure: one message naming the image, the step and the log, and exit.
step() {
  local name=$1 key=$2 check=$3
  shift 4
  local stamp=$KIND_STAMPS/${name//\//--} logf=$KIND_LOGS/${name//\//--}.log start=$SECONDS
  if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && eval "$check"; then
    printf '%s\t%s\tcached\t0\t%s\n' "$(date -Is)" "$name" "$key" >>"$EMPORIUM_TIMINGS"
    return 0
  fi
  log "$name: building (log: $logf)"
  local rc=0
  # in the background so that `set -e` holds inside COMMAND (it is ignored in a condition's context)
  (
    set -e
    "$@"
  ) >"$logf" 2>&1 &
  wait $! || rc=$?
  if [ $rc != 0 ]; then
    tail -n 15 "$logf" | sed 's/^/    /' >&2
    die "build of ${name%%/*} failed at step ${name#*/} after $((SECONDS - start)) s; full log: $logf"
  fi
  echo "$key" >"$stamp"
  printf '%s\t%s\tcold\t%s\t%s\n' "$(date -Is)" "$name" "$((SECONDS - start))" "$key" >>"$EMPORIUM_TIMINGS"
  log "$name: done in $((SECONDS - start)) s"
}

# go_build MODULE_DIR OUTPUT LDFLAGS PACKAGE...: a static, reproducible build at low priority (the machine is shared).
go_build() {
  local dir=$1 out=$2 ld=$3
  shift 3
  (cd "$dir" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 10 \
    go build -trimpath -ldflags "-s -w $ld" -o "$out" "$@")
}

# --- Debian root filesystems ----------------------------------------------------------------------------------

debian_mirror() {
  local m
  m=$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list 2>/dev/null |
    grep -o 'https\?://[^ ]*/debian/\?$\|https\?://[^ ]*/debian ' | head -n 1 | tr -d ' ')
  echo "${DEBIAN_MIRROR:-${m:-http://deb.debian.org/debian}}"
}

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (debootstrap, chroot): run it as root, or on a machine where a registry answers"; }

# debian_rootfs NAME PACKAGES: a debootstrapped bookworm (minbase + PACKAGES, comma-separated) in
# $IMAGES_CACHE/rootfs/NAME, rebuilt only when the package list changes. Prints the directory.
debian_rootfs() {
  local name=$1 pkgs=$2 dir=$IMAGES_CACHE/rootfs/$1
  step "rootfs-$name/debootstrap" "$(recipe_key "$DEBIAN_SUITE" "$pkgs")" "[ -x '$dir/bin/sh' ]" -- \
    _debootstrap "$dir" "$pkgs"
  echo "$dir"
}
_debootstrap() {
  need_root debootstrap
  command -v debootstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
  rm -rf "$1" "$1.tmp"
  debootstrap --variant=minbase ${2:+--include="$2"} "$DEBIAN_SUITE" "$1.tmp" "$(debian_mirror)"
  rm -rf "$1.tmp"/var/cache/apt/archives/*.deb "$1.tmp"/var/lib/apt/lists/*
  mv "$1.tmp" "$1"
}

# import_rootfs DIR IMAGE [DOCKERFILE_LINES]: docker import of a root filesystem, plus image metadata (ENV, ENTRYPOINT,
# ...) added by a one-line build (docker 20.10's `import --change` rejects some instructions).
import_rootfs() {
  local dir=$1 image=$2 extra=${3:-}
  tar -C "$dir" --numeric-owner -c . | docker import - "$image-rootfs" >/dev/null
  printf 'FROM %s\n%s\n' "$image-rootfs" "$extra" | DOCKER_BUILDKIT=0 docker build -q -t "$image" - >/dev/null
  docker rmi "$image-rootfs" >/dev/null
}

# debian_base_image: emporium.local/debian:bookworm (minbase + ca-certificates), a FROM for locally built images.
# Prints its name.
debian_base_image() {
  local dir image=emporium.local/debian:$DEBIAN_SUITE
  dir=$(debian_rootfs debian ca-certificates)
  step debian/image "$(recipe_key "$DEBIAN_SUITE" ca-certificates v1)" "have_image $image" -- import_rootfs "$dir" "$image" \
    "$(printf 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nCMD ["bash"]')"
  echo "$image"
}

# --- the environment kind, kubectl, helm and skaffold run in ---------------------------------------------------

toolchain_bin() { bash "$EMPORIUM_ROOT/tools/toolchain/build.sh" "$@" | tail -n 1; }

# kind_env: PATH with kind, kubectl and the toolchain's bin directory (helm, skaffold: `toolchain_bin helm skaffold`
# builds them), the docker shim when privileged containers fail here, DOCKER_CONFIG with the buildx plugin. Needs the
# node image (built or pulled) for the privileged probe.
kind_env() {
  export PATH="$KIND_BIN:$KIND_BIN/kubernetes-$KUBERNETES_VERSION:$EMPORIUM_CACHE/toolchain/bin:$PATH"
  export DOCKER_CONFIG=$KIND_CACHE/docker-config
  if [ -f "$KIND_CACHE/node-image" ] && ! privileged_works "$(cat "$KIND_CACHE/node-image")"; then
    export PATH="$KIND_SHIM_DIR:$PATH"
  fi
}
