#!/usr/bin/env bash
# The kind cluster "emporium": `make kind-up`, `make kind-dev`, `make kind-down`.
#
#   cluster.sh up [--ha] [--no-deploy]   Docker (installed/started when missing, as root), kind and the node image
#                                        (tools/kind/node-image.sh; for a new cluster tools/kind/preload-image.sh
#                                        adds the add-on images, EMPORIUM_PRELOAD=0 skips that), the cluster from
#                                        kind-config.yaml (--ha: kind-config-ha.yaml, 3 nodes, plus metrics-server),
#                                        then the deploy step (tools/kind/deploy.sh: add-ons, images, skaffold run,
#                                        while CoreDNS and local-path-provisioner finish starting) unless
#                                        --no-deploy.
#   cluster.sh dev [--ha]                The same, then `skaffold dev` (deploy.sh --dev).
#   cluster.sh down                      Deletes the cluster and everything `up` made outside it (deploy.sh --down).
#   cluster.sh docker                    Only makes sure a Docker engine answers (installs/starts it as root); exit 1
#                                        with the reason when it cannot (`make test` then skips the kind suite).
#
# An existing cluster is reused (nothing is recreated); the ingress is http://127.0.0.1:8080. KIND_CONFIG overrides the
# cluster config file.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"

cmd=${1:-up}
[ $# -gt 0 ] && shift
ha=0 deploy=1 dev=0
for a in "$@"; do
  case $a in
    --ha) ha=1 ;;
    --no-deploy) deploy=0 ;;
    --dev) dev=1 ;;
    *) die "unknown option $a (usage: cluster.sh up|dev|down [--ha] [--no-deploy])" ;;
  esac
done
[ "$cmd" = dev ] && dev=1 && cmd=up
config=${KIND_CONFIG:-$EMPORIUM_ROOT/kind-config.yaml}
[ "$ha" = 1 ] && config=${KIND_CONFIG:-$EMPORIUM_ROOT/kind-config-ha.yaml}

cluster_exists() { command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; }

# port_owner PORT: who listens on PORT (empty when it is free)
port_owner() {
  local line
  if command -v ss >/dev/null; then
    line=$(ss -Hltnp "sport = :$1" 2>/dev/null | head -n 1)
    [ -n "$line" ] || return 0
    echo "$line" | sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | grep . || echo "another process"
  elif (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "another process"
  fi
}

check_ports() { # the host ports the kind config maps (127.0.0.1:8080 and :8443)
  local p owner
  for p in $(sed -n 's/^ *hostPort: *\([0-9]*\).*/\1/p' "$config"); do
    owner=$(port_owner $p)
    [ -z "$owner" ] && continue
    die "port 127.0.0.1:$p is already taken by $owner, and the cluster's ingress needs it.
If that is the local platform (make up), stop it with \`make down\`; then run this again. Nothing was started."
  done
}

down() {
  export PATH="$KIND_BIN:$PATH"
  if [ -f "$here/deploy.sh" ] && cluster_exists; then bash "$here/deploy.sh" --down || true; fi
  if cluster_exists; then
    log "deleting kind cluster $KIND_CLUSTER"
    kind delete cluster --name "$KIND_CLUSTER"
  else
    log "no kind cluster $KIND_CLUSTER"
  fi
}

wait_ready() {
  local start=$SECONDS
  kubectl --context "$KIND_CONTEXT" wait --for=condition=Ready node --all --timeout=180s >/dev/null
  kubectl --context "$KIND_CONTEXT" -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null
  kubectl --context "$KIND_CONTEXT" -n local-path-storage rollout status deployment/local-path-provisioner \
    --timeout=180s >/dev/null
  if [ "$ha" = 1 ]; then
    kubectl --context "$KIND_CONTEXT" -n kube-system rollout status deployment/metrics-server --timeout=180s >/dev/null
  fi
  log "nodes, CoreDNS and local-path-provisioner ready ($((SECONDS - start)) s)"
}

up() {
  local start=$SECONDS node_image
  export PATH="$KIND_BIN:$PATH"
  if ! cluster_exists; then check_ports; fi
  ensure_docker
  node_image=$(bash "$here/node-image.sh" | tail -n 1)
  kind_env
  command -v kubectl >/dev/null || toolchain_bin kubectl >/dev/null
  # a new cluster starts from the node image with the add-on images preloaded (deploy.sh then loads only ours)
  if ! cluster_exists && [ "${EMPORIUM_PRELOAD:-1}" != 0 ]; then
    local t=$SECONDS
    node_image=$(bash "$here/preload-image.sh" "$node_image" | tail -n 1)
    export EMPORIUM_ADDON_IMAGES_READY=1
    printf '%s\tcluster/preload-image\trun\t%s\t%s\n' "$(date -Is)" "$((SECONDS - t))" "$node_image" >>"$EMPORIUM_TIMINGS"
  fi
  case ":$PATH:" in *":$KIND_SHIM_DIR:"*) log "docker --privileged fails here: kind runs through $KIND_SHIM_DIR" ;; esac
  if cluster_exists; then
    log "cluster $KIND_CLUSTER exists: reusing it (\`make kind-down\` deletes it)"
    kubectl --context "$KIND_CONTEXT" get nodes >/dev/null 2>&1 || die "cluster $KIND_CLUSTER exists but its API server
does not answer (context $KIND_CONTEXT). Delete it with \`make kind-down\` (or kind delete cluster --name $KIND_CLUSTER)
and run this again."
    local nodes
    nodes=$(kubectl --context "$KIND_CONTEXT" get nodes --no-headers 2>/dev/null | wc -l)
    if [ "$ha" = 1 ] && [ "$nodes" -lt 3 ]; then
      die "cluster $KIND_CLUSTER exists with $nodes node(s); --ha needs the 3-node variant: \`make kind-down\` first"
    fi
    [ "$nodes" -ge 3 ] && ha=1
  else
    # kind bind-mounts /lib/modules; on hosts without loadable modules the directory may not exist
    [ -d /lib/modules ] || mkdir -p /lib/modules 2>/dev/null || true
    log "creating kind cluster $KIND_CLUSTER ($(basename "$config"), node image $node_image)"
    local t=$SECONDS
    kind create cluster --name "$KIND_CLUSTER" --config "$config" --image "$node_image" --wait 180s ||
      die "kind create cluster failed (kind removed the half-made cluster). Re-run with more detail:
  PATH=$PATH kind create cluster --name $KIND_CLUSTER --config $config --image $node_image --retain -v 3
then \`kind export logs --name $KIND_CLUSTER\` and \`make kind-down\`."
    printf '%s\t%s\tcold\t%s\t%s\n' "$(date -Is)" "cluster/kind-create$([ "$ha" = 1 ] && echo -ha)" "$((SECONDS - t))" \
      "$node_image" >>"$EMPORIUM_TIMINGS"
  fi
  if [ "$ha" = 1 ]; then
    kind load docker-image --name "$KIND_CLUSTER" "registry.k8s.io/metrics-server/metrics-server:$METRICS_SERVER_VERSION" \
      >/dev/null 2>&1 || true
    kubectl --context "$KIND_CONTEXT" apply -f "$here/manifests/metrics-server.yaml" >/dev/null
  fi
  if [ "$deploy" = 1 ] && [ -f "$here/deploy.sh" ]; then
    toolchain_bin helm skaffold >/dev/null
    local args=() ready_pid rc=0
    [ "$dev" = 1 ] && args+=(--dev)
    [ "$ha" = 1 ] && args+=(--ha)
    # the node is Ready (kind create --wait); CoreDNS and local-path-provisioner finish starting while the deploy
    # step checks its images and installs Istio (nothing there needs them before the data services are waited for)
    wait_ready &
    ready_pid=$!
    # (skaffold dev runs until interrupted: it starts once they are)
    [ "$dev" = 0 ] || wait "$ready_pid" || die "the cluster's own pods did not become ready (kubectl --context $KIND_CONTEXT get pods -A)"
    bash "$here/deploy.sh" "${args[@]}" || rc=$?
    [ "$dev" = 1 ] || wait "$ready_pid" || die "the cluster's own pods did not become ready (kubectl --context $KIND_CONTEXT get pods -A)"
    [ $rc = 0 ] || exit $rc
  else
    wait_ready
    log "cluster $KIND_CLUSTER ready in $((SECONDS - start)) s (context $KIND_CONTEXT)"
  fi
  log "done in $((SECONDS - start)) s. Ingress: http://127.0.0.1:8080 (kubectl --context $KIND_CONTEXT ...)"
}

case $cmd in
  docker) ensure_docker ;;
  up) up ;;
  down) down ;;
  *) die "usage: cluster.sh up|dev|down|docker [--ha] [--no-deploy]" ;;
esac
