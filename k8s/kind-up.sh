#!/usr/bin/env bash
# Creates the kind cluster "emporium", installs the cluster add-ons and runs skaffold.
#
#   k8s/kind-up.sh            # cluster + add-ons + `skaffold run` (build, load into kind, helm install)
#   k8s/kind-up.sh --dev      # ... + `skaffold dev` (rebuild and redeploy on change, port-forwards)
#   SKAFFOLD_PROFILE=no-mesh k8s/kind-up.sh
#
# Needs docker, kind, kubectl, helm and skaffold on PATH. Idempotent: re-running it upgrades in place.
# Afterwards: http://localhost:8080/health (Istio gateway), Grafana via `skaffold dev` port-forward on :3000.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cluster=emporium
context=kind-$cluster
ISTIO_VERSION=${ISTIO_VERSION:-1.30.3}
KPS_VERSION=${KPS_VERSION:-88.0.0}
mode=run
[ "${1:-}" = "--dev" ] && mode=dev

log() { printf '\n==> %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { echo "kind-up: $1 is not on PATH" >&2; exit 1; }; }
for tool in docker kind kubectl helm skaffold; do need "$tool"; done

kc() { kubectl --context "$context" "$@"; }
hi() { helm --kube-context "$context" upgrade --install --wait --timeout 10m "$@"; }

log "kind cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --config "$root/kind-config.yaml"
fi
kc apply -f "$here/namespaces.yaml"

log "Istio $ISTIO_VERSION (base, istiod, ingress gateway on NodePort 30080 -> localhost:8080)"
helm repo add istio https://istio-release.storage.googleapis.com/charts --force-update >/dev/null
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update >/dev/null
helm repo update >/dev/null
hi istio-base istio/base --version "$ISTIO_VERSION" -n istio-system --create-namespace -f "$here/istio/base-values.yaml"
hi istiod istio/istiod --version "$ISTIO_VERSION" -n istio-system -f "$here/istio/istiod-values.yaml"
hi istio-ingressgateway istio/gateway --version "$ISTIO_VERSION" -n istio-system -f "$here/istio/gateway-values.yaml"

log "kube-prometheus-stack $KPS_VERSION (Prometheus, Grafana with the dashboard sidecar, Alertmanager)"
hi kps prometheus-community/kube-prometheus-stack --version "$KPS_VERSION" -n monitoring \
  -f "$here/monitoring/kube-prometheus-stack-values.yaml"

log "development data services: Postgres, RabbitMQ, mail catcher"
kc apply -f "$here/dev/postgres.yaml" -f "$here/dev/rabbitmq.yaml" -f "$here/dev/mailpit.yaml"
kc -n data rollout status statefulset/postgres --timeout=5m
kc -n data rollout status statefulset/rabbitmq --timeout=5m
kc -n mail rollout status deployment/mailpit --timeout=5m

log "chart dependencies (the library and the four services, into the umbrella chart)"
helm dependency build "$root/charts/emporium" >/dev/null

log "operator CRDs, then the PostgresServer/RabbitServer objects (development credentials)"
kc apply --server-side -f "$root/charts/emporium-operator/crds/"
kc wait --for=condition=Established crd --all --timeout=60s
kc apply -f "$here/dev/servers.yaml"

log "skaffold $mode (operator first, then the platform)"
cd "$root"
skaffold config set --kube-context "$context" local-cluster true >/dev/null
if [ "$mode" = dev ]; then
  exec skaffold dev --kube-context "$context" ${SKAFFOLD_PROFILE:+-p "$SKAFFOLD_PROFILE"} --port-forward=user
fi
skaffold run --kube-context "$context" ${SKAFFOLD_PROFILE:+-p "$SKAFFOLD_PROFILE"}
log "ready: curl -s http://localhost:8080/health"
