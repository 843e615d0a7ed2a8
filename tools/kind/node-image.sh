#!/usr/bin/env bash
# Ensures kind, the buildx plugin and the kind node image for Kubernetes $KUBERNETES_VERSION; prints the node image's
# name on the last line (also written to ~/.cache/emporium/kind/node-image).
#
# The node image is pulled (kindest/node) when a registry answers. Otherwise it is built here, with no registry, from
# Debian packages (debootstrap) and the Go module proxy, like kind's own base and node images:
#   binaries   kind, crictl, Kubernetes (the toolchain's wrapper modules for Kubernetes and etcd, sharing its Go
#              build cache: kube-apiserver, kube-controller-manager and kubectl are cache hits after `make tools`),
#              CoreDNS, kube-router (the CNI), local-path-provisioner, pause (gcc, from the Kubernetes module)
#   rootfs     Debian bookworm for the node (systemd, containerd 1.6, runc, CNI plugins) and for the images that
#              need iptables (kube-proxy, kube-router, local-path's helper)
#   images     base (kind's images/base files on the node rootfs), net, one small image per component under the
#              name kubeadm or kind asks for, then the node: base + Kubernetes binaries + every component image
#              preloaded into its containerd
# Each step is cached by its inputs (pins, wrapper modules, these scripts) and rebuilt only when they change; each run
# is timed into ~/.cache/emporium/timings.tsv. Building needs root (debootstrap, chroot), gcc and libc6-dev.
#
# Usage: node-image.sh            (EMPORIUM_OFFLINE=1 skips the registry; EMPORIUM_BUILD_NODE=1 builds even online)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

exec 8>"$KIND_CACHE/.build.lock"
flock -n 8 || {
  log "another node image build holds $KIND_CACHE/.build.lock; waiting for it"
  flock 8
}

GOMODCACHE=$(go env GOMODCACHE)
MODS=$here/modules
K8S_MOD=$EMPORIUM_ROOT/tools/toolchain/kubernetes
KIND_MODDIR=$GOMODCACHE/sigs.k8s.io/kind@$KIND_VERSION
KBIN=$KIND_BIN/kubernetes-$KUBERNETES_VERSION
# The names kubeadm v1.34 and kind's manifests ask for (cmd/kubeadm/app/constants; kind's base containerd config
# pins pause 3.10 as the sandbox image).
KUBEADM_ETCD_TAG=3.6.5-0
KUBEADM_COREDNS_TAG=v1.12.1
KUBE_ROUTER_IMAGE=docker.io/cloudnativelabs/kube-router:$KUBE_ROUTER_VERSION
METRICS_SERVER_IMAGE=registry.k8s.io/metrics-server/metrics-server:$METRICS_SERVER_VERSION

modkey() { recipe_key "$1/go.mod" "$1/go.sum" ${2:+"$1/$2"}; }

go_install() { # go_install OUTPUT_DIR PACKAGE@VERSION LDFLAGS
  GOBIN=$1 GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS= nice -n 10 go install -trimpath -ldflags "-s -w $3" "$2"
}

kube_ldflags() {
  local pkg major minor out=""
  major=$(echo "${KUBERNETES_VERSION#v}" | cut -d. -f1)
  minor=$(echo "${KUBERNETES_VERSION#v}" | cut -d. -f2)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    out+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$out"
}

# --- kind (needed whether the node image is pulled or built; buildx too, at the end) -----------------------------
k_kind=$(recipe_key "$KIND_VERSION")
step kind/go-install "$k_kind" "[ -x '$KIND_BIN/kind' ]" -- go_install "$KIND_BIN" "sigs.k8s.io/kind@$KIND_VERSION" ""

ensure_buildx() { # the docker-buildx CLI plugin skaffold's useBuildkit needs, in $KIND_CACHE/docker-config
  k_buildx=$(modkey "$MODS/buildx")
  step buildx/go-build "$k_buildx" "[ -x '$KIND_BIN/docker-buildx' ]" -- \
    go_build "$MODS/buildx" "$KIND_BIN/docker-buildx" "-X github.com/docker/buildx/version.Version=$BUILDX_VERSION" \
    github.com/docker/buildx/cmd/buildx
  mkdir -p "$KIND_CACHE/docker-config/cli-plugins"
  ln -sf "$KIND_BIN/docker-buildx" "$KIND_CACHE/docker-config/cli-plugins/docker-buildx"
  # docker 20.10's CLI runs `docker build` through buildx only with this alias (what `docker buildx install` writes)
  [ -f "$KIND_CACHE/docker-config/config.json" ] || echo '{"aliases": {"builder": "buildx"}}' >"$KIND_CACHE/docker-config/config.json"
}

ensure_docker

# --- pulled when a registry answers -----------------------------------------------------------------------------
recipe=$(recipe_key "$here/node-image.sh" "$here/node/entrypoint" "$here/node/iptables-wrapper" \
  "$here/manifests/kube-router.yaml" "$KUBERNETES_VERSION" "$KIND_VERSION")
if [ "${EMPORIUM_BUILD_NODE:-0}" != 1 ] && ! have_image "$(cat "$KIND_CACHE/node-image" 2>/dev/null || echo none)" &&
  try_pull "kindest/node:$KUBERNETES_VERSION"; then
  log "pulled kindest/node:$KUBERNETES_VERSION"
  ensure_buildx
  echo "kindest/node:$KUBERNETES_VERSION" | tee "$KIND_CACHE/node-image"
  exit 0
fi
need_root "building the kind node image"
# gcc and a static libc for pause
if ! command -v gcc >/dev/null || ! ls /usr/lib/*/libc.a >/dev/null 2>&1; then
  log "installing gcc and libc6-dev (for the pause binary)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev binutils >/dev/null
fi

# --- binaries ---------------------------------------------------------------------------------------------------
k_crictl=$(recipe_key "$CRICTL_VERSION")
step crictl/go-install "$k_crictl" "[ -x '$KIND_BIN/crictl' ]" -- go_install "$KIND_BIN" \
  "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"

build_pause() {
  local src
  src=$(cd "$K8S_MOD" && GOFLAGS=-mod=mod go mod download -json k8s.io/kubernetes | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  gcc -Os -static -Wall -DVERSION="v$PAUSE_VERSION" -o "$KIND_BIN/pause" "$src/build/pause/linux/pause.c"
  strip "$KIND_BIN/pause"
}
k_pause=$(recipe_key "$PAUSE_VERSION" "$KUBERNETES_VERSION")
step pause/gcc "$k_pause" "[ -x '$KIND_BIN/pause' ]" -- build_pause


# kind's default StorageClass manifest (local-path-provisioner), printed from kind's own Go source in its module
storage_manifest() {
  local d
  d=$(mktemp -d)
  sed 's/^package nodeimage$/package main/' "$KIND_MODDIR/pkg/build/nodeimage/const_storage.go" >"$d/storage.go"
  printf 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Print(defaultStorageManifest) }\n' >"$d/main.go"
  printf 'module emporium.dev/kind/storage\n\ngo 1.24.0\n' >"$d/go.mod"
  (cd "$d" && GOFLAGS= go run . >"$KIND_CACHE/default-storage.yaml")
  rm -rf "$d"
}
(cd "$MODS/coredns" && GOFLAGS= go mod download "sigs.k8s.io/kind@$KIND_VERSION")
step kind-node/storage-manifest "$k_kind" "[ -s '$KIND_CACHE/default-storage.yaml' ]" -- storage_manifest

# --- root filesystems ----------------------------------------------------------------------------------------------
NODE_PKGS=systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2
NODE_PKGS+=,pigz,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,e2fsprogs
NET_PKGS=iptables,nftables,conntrack,ipset,kmod,iproute2,ca-certificates
node_rootfs=$(debian_rootfs kind-node "$NODE_PKGS")
net_rootfs=$(debian_rootfs kind-net "$NET_PKGS")

# --- images ---------------------------------------------------------------------------------------------------------
k_base=$(recipe_key "$recipe" "$NODE_PKGS" "$k_crictl")
BASE_IMAGE=emporium.local/kind-base:$k_base
build_base() { # kind's images/base/Dockerfile, on a copy of the debootstrapped rootfs
  local r f=$KIND_MODDIR/images/base/files
  r=$(mktemp -d "$KIND_CACHE/base.XXXXXX")
  trap "rm -rf '$r'" EXIT
  cp -a "$node_rootfs/." "$r/"
  install -m0755 "$f"/usr/local/bin/* "$r/usr/local/bin/"
  mv "$r/usr/local/bin/entrypoint" "$r/usr/local/bin/entrypoint-kind"
  install -m0755 "$here/node/entrypoint" "$r/usr/local/bin/entrypoint"
  mkdir -p "$r/kind/bin" "$r/LICENSES" "$r/etc/containerd" "$r/etc/default" "$r/etc/sysctl.d" \
    "$r/etc/systemd/system/kubelet.service.d" "$r/etc/kubernetes/manifests" "$r/opt/cni/bin"
  install -m0644 "$f/kind/README.txt" "$r/kind/"
  install -m0755 "$f"/kind/bin/* "$r/kind/bin/"
  install -m0644 "$f/LICENSES/README.txt" "$r/LICENSES/"
  install -m0644 "$f/etc/crictl.yaml" "$r/etc/"
  install -m0644 "$f"/etc/containerd/* "$r/etc/containerd/"
  install -m0644 "$f"/etc/default/* "$r/etc/default/"
  install -m0644 "$f"/etc/sysctl.d/* "$r/etc/sysctl.d/"
  install -m0644 "$f"/etc/systemd/system/*.service "$f"/etc/systemd/system/*.slice "$r/etc/systemd/system/"
  install -m0644 "$f"/etc/systemd/system/kubelet.service.d/* "$r/etc/systemd/system/kubelet.service.d/"
  find "$r/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
  rm -f "$r"/lib/systemd/system/multi-user.target.wants/* "$r"/etc/systemd/system/*.wants/* \
    "$r"/lib/systemd/system/local-fs.target.wants/* "$r"/lib/systemd/system/sockets.target.wants/*udev* \
    "$r"/lib/systemd/system/sockets.target.wants/*initctl* "$r"/lib/systemd/system/basic.target.wants/*
  echo "ReadKMsg=no" >>"$r/etc/systemd/journald.conf"
  ln -sf /usr/lib/systemd/systemd "$r/sbin/init"
  # Debian's containerd, runc and CNI plugins where kind's units and configs expect them
  for b in containerd ctr containerd-shim-runc-v2; do ln -sf "/usr/bin/$b" "$r/usr/local/bin/$b"; done
  for p in host-local loopback ptp portmap bridge; do ln -sf "/usr/lib/cni/$p" "$r/opt/cni/bin/$p"; done
  install -m0755 "$KIND_BIN/crictl" "$r/usr/local/bin/crictl"
  chroot "$r" systemctl enable kubelet.service containerd.service undo-mount-hacks.service
  chroot "$r" systemctl mask systemd-binfmt.service
  chroot "$r" sh -c 'ctr oci spec | jq ".hooks.createContainer[.hooks.createContainer | length] |= . + {\"path\": \"/kind/bin/mount-product-files.sh\"}" | jq "del(.process.rlimits)" >/etc/containerd/cri-base.json'
  import_rootfs "$r" "$BASE_IMAGE" "$(printf 'ENV container=docker\nSTOPSIGNAL SIGRTMIN+3\nENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]')"
}
step kind-node/base-image "$k_base" "have_image $BASE_IMAGE" -- build_base
prune_superseded "$BASE_IMAGE"

k_net=$(recipe_key "$recipe" "$NET_PKGS")
NET_IMAGE=emporium.local/kind-net:$k_net
build_net() {
  local r
  r=$(mktemp -d "$KIND_CACHE/net.XXXXXX")
  trap "rm -rf '$r'" EXIT
  cp -a "$net_rootfs/." "$r/"
  install -m0755 "$here/node/iptables-wrapper" "$r/usr/sbin/iptables-wrapper"
  chroot "$r" sh -ec 'for v in iptables ip6tables; do
    update-alternatives --install /usr/sbin/$v $v /usr/sbin/iptables-wrapper 100 \
      --slave /usr/sbin/$v-restore $v-restore /usr/sbin/iptables-wrapper --slave /usr/sbin/$v-save $v-save /usr/sbin/iptables-wrapper
    update-alternatives --set $v /usr/sbin/iptables-wrapper
  done'
  import_rootfs "$r" "$NET_IMAGE" 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
}
step kind-node/net-image "$k_net" "have_image $NET_IMAGE" -- build_net
prune_superseded "$NET_IMAGE"

# --- the Go builds (the longest part) ------------------------------------------------------------------------
k_coredns=$(modkey "$MODS/coredns" main.go)
step coredns/go-build "$k_coredns" "[ -x '$KIND_BIN/coredns' ]" -- go_build "$MODS/coredns" "$KIND_BIN/coredns" "" .

k_router=$(modkey "$MODS/kube-router")
step kube-router/go-build "$k_router" "[ -x '$KIND_BIN/kube-router' ]" -- go_build "$MODS/kube-router" \
  "$KIND_BIN/kube-router" "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
  github.com/cloudnativelabs/kube-router/v2/cmd/kube-router

k_lpp=$(modkey "$MODS/local-path-provisioner")
step local-path-provisioner/go-build "$k_lpp" "[ -x '$KIND_BIN/local-path-provisioner' ]" -- \
  go_build "$MODS/local-path-provisioner" "$KIND_BIN/local-path-provisioner" "" github.com/rancher/local-path-provisioner

# Kubernetes from the toolchain's wrapper module (tools/toolchain/kubernetes), with the toolchain's flags: kubelet,
# kubeadm, kube-proxy, kube-scheduler and, cached from the toolchain's own build (same module, same Go build cache),
# kube-apiserver, kube-controller-manager and kubectl. etcd likewise from tools/toolchain/etcd.
k_kube=$(recipe_key "$K8S_MOD/go.mod" "$K8S_MOD/go.sum" "$KUBERNETES_VERSION")
step kubernetes/go-build "$k_kube" "[ -x '$KBIN/kubelet' ] && [ -x '$KBIN/kube-apiserver' ]" -- \
  go_build "$K8S_MOD" "$KBIN/" "$(kube_ldflags)" -tags=selinux,notest,grpcnotrace \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl
ETCD_MOD=$EMPORIUM_ROOT/tools/toolchain/etcd
k_etcd=$(recipe_key "$ETCD_MOD/go.mod" "$ETCD_MOD/go.sum" "$ETCD_VERSION")
step etcd/go-build "$k_etcd" "[ -x '$KIND_BIN/etcd' ]" -- go_build "$ETCD_MOD" "$KIND_BIN/etcd" "" go.etcd.io/etcd/server/v3

storage_images=$(sed -n 's/^ *image: *//p' "$KIND_CACHE/default-storage.yaml" | sort -u)
LPP_IMAGE=$(echo "$storage_images" | grep local-path-provisioner)
LPP_HELPER_IMAGE=$(echo "$storage_images" | grep local-path-helper)

# component IMAGE... : a small image per binary (Dockerfile on stdin, context holds BIN), tagged with every name given
component() {
  local bin=$1 ctx
  shift
  ctx=$(mktemp -d)
  [ "$bin" = - ] || cp "$bin" "$ctx/"
  cat >"$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q --label "emporium.recipe=$recipe" -t "$1" "$ctx" >/dev/null
  local t
  for t in "${@:2}"; do docker tag "$1" "$t"; done
  rm -rf "$ctx"
}
PATHENV='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
COMPONENT_IMAGES=(registry.k8s.io/pause:$PAUSE_VERSION registry.k8s.io/pause:3.10 registry.k8s.io/etcd:$KUBEADM_ETCD_TAG
  registry.k8s.io/kube-apiserver:$KUBERNETES_VERSION registry.k8s.io/kube-controller-manager:$KUBERNETES_VERSION
  registry.k8s.io/kube-scheduler:$KUBERNETES_VERSION registry.k8s.io/kube-proxy:$KUBERNETES_VERSION
  registry.k8s.io/coredns/coredns:$KUBEADM_COREDNS_TAG "$KUBE_ROUTER_IMAGE" "$LPP_IMAGE" "$LPP_HELPER_IMAGE")
build_components() {
  component "$KIND_BIN/pause" registry.k8s.io/pause:"$PAUSE_VERSION" registry.k8s.io/pause:3.10 <<EOF
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
EOF
  component "$KIND_BIN/etcd" registry.k8s.io/etcd:$KUBEADM_ETCD_TAG <<EOF
FROM scratch
$PATHENV
COPY etcd /usr/local/bin/etcd
EOF
  local c
  for c in kube-apiserver kube-controller-manager; do
    component "$KBIN/$c" "registry.k8s.io/$c:$KUBERNETES_VERSION" <<EOF
FROM scratch
$PATHENV
COPY $c /usr/local/bin/$c
EOF
  done
  component "$KBIN/kube-scheduler" "registry.k8s.io/kube-scheduler:$KUBERNETES_VERSION" <<EOF
FROM scratch
$PATHENV
COPY kube-scheduler /usr/local/bin/kube-scheduler
EOF
  component "$KBIN/kube-proxy" "registry.k8s.io/kube-proxy:$KUBERNETES_VERSION" <<EOF
FROM $NET_IMAGE
COPY kube-proxy /usr/local/bin/kube-proxy
EOF
  component "$KIND_BIN/coredns" "registry.k8s.io/coredns/coredns:$KUBEADM_COREDNS_TAG" <<EOF
FROM scratch
COPY coredns /coredns
EXPOSE 53 53/udp
ENTRYPOINT ["/coredns"]
EOF
  component "$KIND_BIN/kube-router" "$KUBE_ROUTER_IMAGE" <<EOF
FROM $NET_IMAGE
COPY kube-router /usr/local/bin/kube-router
ENTRYPOINT ["/usr/local/bin/kube-router"]
EOF
  component "$KIND_BIN/local-path-provisioner" "$LPP_IMAGE" <<EOF
FROM scratch
$PATHENV
COPY local-path-provisioner /usr/local/bin/local-path-provisioner
ENTRYPOINT ["/usr/local/bin/local-path-provisioner"]
EOF
  component - "$LPP_HELPER_IMAGE" <<EOF
FROM $NET_IMAGE
EOF
}
k_components=$(recipe_key "$recipe" "$k_net" "$k_pause" "$k_etcd" "$k_kube" "$k_coredns" "$k_router" "$k_lpp" "$k_kind")
all_components() { local i; for i in "${COMPONENT_IMAGES[@]}"; do have_image "$i" || return 1; done; }
step kind-node/component-images "$k_components" all_components -- build_components

k_node=$(recipe_key "$k_base" "$k_components")
NODE_IMAGE=emporium.local/kind-node:$KUBERNETES_VERSION-$k_node
build_node() { # what `kind build node-image` does, from local images only
  local id=emporium-kind-build-$$ i
  docker rm -f "$id" >/dev/null 2>&1 || true
  docker run -d --entrypoint=sleep --name="$id" --security-opt seccomp=unconfined "$BASE_IMAGE" infinity
  trap "docker rm -f -v '$id' >/dev/null 2>&1 || true" EXIT
  for i in kubeadm kubelet; do docker cp "$KBIN/$i" "$id:/usr/bin/$i"; done
  docker cp "$KBIN/kubectl" "$id:/usr/bin/kubectl"
  docker exec "$id" sh -ec "chown root:root /usr/bin/kubeadm /usr/bin/kubelet /usr/bin/kubectl
    echo $KUBERNETES_VERSION >/kind/version; mkdir -p /kind/manifests"
  docker cp "$here/manifests/kube-router.yaml" "$id:/kind/manifests/default-cni.yaml"
  docker cp "$KIND_CACHE/default-storage.yaml" "$id:/kind/manifests/default-storage.yaml"
  docker exec "$id" bash -c 'nohup containerd >/tmp/containerd.log 2>&1 &'
  docker exec "$id" bash -c 'for i in $(seq 100); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1'
  for i in "${COMPONENT_IMAGES[@]}"; do
    docker save "$i" | docker exec -i "$id" ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned \
      --all-platforms --no-unpack --digests -
  done
  docker exec "$id" ctr --namespace=k8s.io images list -q
  docker exec "$id" sh -c 'pkill containerd; sleep 1; rm -f /tmp/containerd.log'
  # the build container ran `sleep infinity`: restore the base image's entrypoint, without that command
  docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' --change 'CMD []' "$id" "$NODE_IMAGE"
}
step kind-node/node-image "$k_node" "have_image $NODE_IMAGE" -- build_node
prune_superseded "$NODE_IMAGE"

# metrics-server, for the HPAs of the ha profile (cluster.sh --ha loads it into the nodes)
k_ms=$(modkey "$MODS/metrics-server")
step metrics-server/go-build "$k_ms" "[ -x '$KIND_BIN/metrics-server' ]" -- go_build "$MODS/metrics-server" \
  "$KIND_BIN/metrics-server" "-X k8s.io/client-go/pkg/version.gitVersion=$METRICS_SERVER_VERSION" \
  sigs.k8s.io/metrics-server/cmd/metrics-server

k_ms_image=$(recipe_key "$k_ms" "$recipe")
build_metrics_server() {
  component "$KIND_BIN/metrics-server" "$METRICS_SERVER_IMAGE" <<EOF
FROM scratch
COPY metrics-server /metrics-server
USER 65534:65534
ENTRYPOINT ["/metrics-server"]
EOF
}
step metrics-server/image "$k_ms_image" "have_image $METRICS_SERVER_IMAGE" -- build_metrics_server
ensure_buildx
echo "$NODE_IMAGE" | tee "$KIND_CACHE/node-image"
