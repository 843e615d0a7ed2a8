#!/usr/bin/env bash
# Everything that runs IN the kind cluster "emporium" (tools/kind/cluster.sh creates the cluster, then calls this):
#  1. the add-on images (tools/images/build.sh: pulled when a registry answers, else built here), loaded into kind;
#  2. Istio from its own Helm charts (base, istiod, gateway) in the pinned istio.io/istio module source;
#  3. the development data services (Postgres, RabbitMQ with management, mailpit) and the operator's CRDs
#     and PostgresServer/RabbitServer objects;
#     when the platform's values (skaffold.yaml's emporium release of the profile) enable them:
#     monitoring (global.monitoring.enabled): prometheus-operator's CRDs, RBAC and Deployment from its pinned
#       module (tools/kind/modules/prometheus-operator), and a Prometheus (k8s/monitoring/prometheus.yaml);
#     tracing (tracing.enabled): the OpenTelemetry Collector and Jaeger (k8s/observability/tracing.yaml);
#     (the CRDs here; their images are loaded and they are started in the background during skaffold deploy,
#     and waited for at the end: nothing of ours waits for them)
#  4. what `skaffold run` does, in three steps: `skaffold build` (the five images and the operator's, from their
#     Dockerfiles) and one `kind load` of all of them as soon as it ends (both in the background, from the
#     beginning: the add-ons install meanwhile), then
#     `skaffold deploy`: the operator chart and the umbrella chart with hooks (the migration Jobs run), waiting
#     until everything is ready; then the sample catalog through the ingress.
#
#   tools/kind/deploy.sh [--dev] [--ha | -p PROFILE]     (idempotent: re-running upgrades in place)
#   tools/kind/deploy.sh --list-images [--ha | -p PROFILE]  prints the add-on images the profile runs (names for
#                                                         tools/images/build.sh; tools/kind/preload-image.sh
#                                                         preloads them into the node image)
#
# Needs kind (with the docker shim when this machine needs it), kubectl, helm, skaffold, go on PATH; the
# context kind-$KIND_CLUSTER (default emporium).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cluster=${KIND_CLUSTER:-emporium}
context=kind-$cluster
mode=run
profile=${SKAFFOLD_PROFILE:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dev) mode=dev ;;
    --list-images) mode=list ;;
    --ha) profile=ha ;;
    # before the cluster is deleted: nothing outside the cluster to clean (skaffold's ~/.skaffold/cache is a
    # build cache, kept like the images)
    --down) exit 0 ;;
    -p | --profile) profile=$2; shift ;;
    *) echo "deploy: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# value KEY: "true" when the emporium release of this profile (skaffold.yaml: its values files over the chart's
# defaults) sets KEY (dotted) true
value() {
  python3 - "$root" "${profile:-}" "$1" <<'PY'
import sys

import yaml

root, profile, key = sys.argv[1:]
config = yaml.safe_load(open(f"{root}/skaffold.yaml"))
deploy = next(
    (p["deploy"] for p in config.get("profiles", []) if p["name"] == profile and "deploy" in p), config["deploy"]
)
(release,) = [r for r in deploy["helm"]["releases"] if r["name"] == "emporium"]
values = yaml.safe_load(open(f"{root}/{release['chartPath']}/values.yaml"))


def merge(into, new):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


for f in release.get("valuesFiles", []):
    merge(values, yaml.safe_load(open(f"{root}/{f}")) or {})
for k in key.split("."):
    values = values.get(k) if isinstance(values, dict) else None
print("true" if values is True else "false")
PY
}
monitoring=$(value global.monitoring.enabled)
tracing=$(value tracing.enabled)
# the images the cluster runs (python, uv and the Dockerfile frontend are for skaffold's builds only); the
# monitoring and tracing ones are loaded apart, while skaffold deploys (nothing of ours waits for them)
cluster_images=(istio-pilot istio-proxy postgres rabbitmq mailpit)
observability_images=()
[ "$monitoring" = true ] && observability_images+=(prometheus prometheus-operator prometheus-config-reloader)
[ "$tracing" = true ] && observability_images+=(otelcol jaeger)
if [ "$mode" = list ]; then
  printf '%s\n' "${cluster_images[@]}" "${observability_images[@]}"
  exit 0
fi

t0=$SECONDS
log() { printf '\n==> [%3ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
# step NAME MESSAGE: logs MESSAGE and times the previous step into ~/.cache/emporium/timings.tsv as deploy/<name>
# (tools/kind/timings.sh prints them)
timings=${EMPORIUM_CACHE:-$HOME/.cache/emporium}/timings.tsv
step_name= step_t=$SECONDS
step() {
  [ -z "$step_name" ] || printf '%s\tdeploy/%s\trun\t%s\t%s\n' "$(date -Is)" "$step_name" "$((SECONDS - step_t))" \
    "${profile:-default}" >>"$timings"
  step_name=$1 step_t=$SECONDS
  [ -z "${2:-}" ] || log "$2"
}
die() { printf 'deploy: %s\n' "$*" >&2; exit 1; }
for tool in docker kind kubectl helm skaffold go; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH (make kind-up sets PATH up)"
done
kind get clusters 2>/dev/null | grep -qx "$cluster" || die "no kind cluster $cluster (make kind-up creates it)"
kc() { kubectl --context "$context" "$@"; }
# kubectl wait fails at once ("accessor error") on a CRD the API server has not given a status yet: ask again
established() {
  local deadline=$((SECONDS + 90))
  until kc wait --for=condition=Established "$@" --timeout=10s >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      kc wait --for=condition=Established "$@" --timeout=5s
      return 1
    fi
    sleep 1
  done
}
hi() { helm --kube-context "$context" upgrade --install --wait --timeout 10m "$@"; }

ISTIO_VERSION=$(sed -n 's/^ISTIO_VERSION=//p' "$root/tools/toolchain/versions.env")
istio_charts=$(cd "$root/tools/toolchain/istio" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download istio.io/istio &&
  GOTOOLCHAIN=local GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' istio.io/istio)/manifests/charts

step add-on-images "add-on images (tools/images/build.sh; logs in ~/.cache/emporium/images/logs)"
# EMPORIUM_ADDON_IMAGES_READY=1: cluster.sh has just made sure of the add-on images (preload-image.sh); only the
# build images are checked here
if [ "${EMPORIUM_ADDON_IMAGES_READY:-0}" = 1 ]; then
  bash "$root/tools/images/build.sh" python uv dockerfile-frontend
else
  bash "$root/tools/images/build.sh" python uv dockerfile-frontend "${cluster_images[@]}" "${observability_images[@]}"
fi

cd "$root"
args=(--kube-context "$context" ${profile:+-p "$profile"})
work=$(mktemp -d "${TMPDIR:-/tmp}/emporium-deploy.XXXXXX")
build_pid= observability_pid=
trap 'rm -rf "$work"; for p in $build_pid $observability_pid; do { pkill -P "$p"; kill "$p"; } 2>/dev/null || true; done' EXIT
skaffold_log=${EMPORIUM_CACHE:-$HOME/.cache/emporium}/kind/logs/skaffold-build.log
if [ "$mode" = run ]; then
  # our five images and the operator's, built (or found in skaffold's cache) while the add-ons install
  log "skaffold build, then one kind load of the images, in the background (log: $skaffold_log)"
  (
    started=$SECONDS
    skaffold build "${args[@]}" --file-output "$work/build.json" >"$skaffold_log" 2>&1 || exit 1
    printf '%s\tdeploy/skaffold-build\trun\t%s\t%s\n' "$(date -Is)" "$((SECONDS - started))" "${profile:-default}" \
      >>"$timings"
    # loaded at once, while Istio and the data services install: one archive, the shared Python layers once
    started=$SECONDS
    mapfile -t built < <(python3 -c 'import json, sys; print("\n".join(b["tag"] for b in json.load(open(sys.argv[1]))["builds"]))' \
      "$work/build.json")
    echo "==> kind load docker-image ${built[*]}" >>"$skaffold_log"
    kind load docker-image --name "$cluster" "${built[@]}" >>"$skaffold_log" 2>&1 || exit 2
    printf '%s\tdeploy/load-images\trun\t%s\t%s\n' "$(date -Is)" "$((SECONDS - started))" "${profile:-default}" \
      >>"$timings"
  ) &
  build_pid=$!
fi

# one `kind load` for all of them: one archive, their shared Debian layers once. A node that already has an image
# skips it: a node made from the preloaded node image (tools/kind/preload-image.sh, what cluster.sh creates) has
# them all, a reused cluster has them from its first run.
step load-add-on-images "loading the add-on images into kind"
mapfile -t addons < <(bash "$root/tools/images/build.sh" --list "${cluster_images[@]}")
kind load docker-image --name "$cluster" "${addons[@]}" >/dev/null

step namespaces "namespaces"
kc apply -f "$root/k8s/namespaces.yaml" >/dev/null

step data-services-apply "development data services: Postgres, RabbitMQ, mailpit (started now, waited for after Istio)"
kc apply -f "$root/k8s/dev/postgres.yaml" -f "$root/k8s/dev/rabbitmq.yaml" -f "$root/k8s/dev/mailpit.yaml" >/dev/null

if [ "$monitoring" = true ]; then
  PROMETHEUS_OPERATOR_VERSION=$(sed -n 's/^PROMETHEUS_OPERATOR_VERSION=//p' "$root/tools/images/versions.env")
  prom_op=$(cd "$root/tools/kind/modules/prometheus-operator" &&
    GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download github.com/prometheus-operator/prometheus-operator &&
    GOTOOLCHAIN=local GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' github.com/prometheus-operator/prometheus-operator)
  step monitoring-crds "monitoring: prometheus-operator $PROMETHEUS_OPERATOR_VERSION's CRDs (from $prom_op/example; the operator and Prometheus follow with skaffold deploy)"
  # the CRDs the charts use (ServiceMonitor, PodMonitor, PrometheusRule), the Prometheus the operator runs and
  # Probe, which its Prometheus controller watches; server-side: the CRDs are too large for the last-applied
  # annotation
  for crd in servicemonitors podmonitors prometheusrules prometheuses probes; do
    kc apply --server-side -f "$prom_op/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" >/dev/null
  done
  established crd/prometheuses.monitoring.coreos.com crd/servicemonitors.monitoring.coreos.com \
    crd/podmonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com
fi
# observability_up: loads the monitoring and tracing images into kind, then starts prometheus-operator (the
# module's own manifests in namespace monitoring: its Deployment names the images tools/images/build.sh made
# under their upstream names), the Prometheus, the OpenTelemetry Collector and Jaeger
observability_up() {
  [ ${#observability_images[@]} -gt 0 ] || return 0
  local images
  mapfile -t images < <(bash "$root/tools/images/build.sh" --list "${observability_images[@]}")
  kind load docker-image --name "$cluster" "${images[@]}" >/dev/null
  if [ "$tracing" = true ]; then
    # Jaeger first: a collector that dials jaeger:4317 before kube-proxy has the Service's rules reaches
    # whatever answers outside the node and keeps that connection (every export then fails with a 404)
    kc apply -f "$root/k8s/observability/tracing.yaml" -l app.kubernetes.io/name=jaeger >/dev/null
    kc -n observability rollout status deployment/jaeger --timeout=5m >/dev/null
    kc apply -f "$root/k8s/observability/tracing.yaml" >/dev/null
  fi
  if [ "$monitoring" = true ]; then
    for f in service-account cluster-role cluster-role-binding deployment service; do
      sed 's/^\( *namespace:\) default$/\1 monitoring/' "$prom_op/example/rbac/prometheus-operator/prometheus-operator-$f.yaml"
      echo ---
    done | kc apply -f - >/dev/null
    kc apply -f "$root/k8s/monitoring/prometheus.yaml" >/dev/null
  fi
}

step istio "Istio $ISTIO_VERSION from $istio_charts (base, istiod, ingress gateway on NodePort 30080 -> 127.0.0.1:8080)"
hi istio-base "$istio_charts/base" -n istio-system --create-namespace -f "$root/k8s/istio/base-values.yaml"
hi istiod "$istio_charts/istio-control/istio-discovery" -n istio-system -f "$root/k8s/istio/istiod-values.yaml" \
  --set global.tag="$ISTIO_VERSION"
hi istio-ingressgateway "$istio_charts/gateway" -n istio-system -f "$root/k8s/istio/gateway-values.yaml"

step data-services-wait "waiting for Postgres, RabbitMQ, mailpit"
kc -n data rollout status statefulset/postgres --timeout=5m
kc -n data rollout status statefulset/rabbitmq --timeout=5m
kc -n mail rollout status deployment/mailpit --timeout=5m

step operator-crds "operator CRDs, then the PostgresServer/RabbitServer objects (development credentials)"
kc apply --server-side -f "$root/charts/emporium-operator/crds/" >/dev/null
established crd --all
kc apply -f "$root/k8s/dev/servers.yaml" >/dev/null

if [ "$mode" = dev ]; then
  [ ${#observability_images[@]} -eq 0 ] || log "monitoring and tracing: ${observability_images[*]}"
  observability_up
  log "skaffold dev${profile:+ -p $profile} (builds the images, the operator chart, then the platform with its hooks; then a saved .py file of a service is synced into its pods and uvicorn reloads it, anything else rebuilds and redeploys)"
  rm -rf "$work"
  # the dev profile (skaffold.yaml, active under skaffold dev) reloads synced source: not with the production
  # settings of the ha profile
  [ "$profile" != ha ] || args+=(-p -dev)
  exec skaffold dev "${args[@]}" --port-forward=user
fi
step images-wait "waiting for skaffold build and the kind load of our images (log: $skaffold_log)"
rc=0
wait "$build_pid" || rc=$?
build_pid=
if [ $rc != 0 ]; then
  tail -n 30 "$skaffold_log" >&2
  [ $rc = 2 ] && die "kind load of our images failed (full log: $skaffold_log)"
  die "skaffold build failed (the image and step are above; full log: $skaffold_log)"
fi
if [ ${#observability_images[@]} -gt 0 ]; then
  log "monitoring and tracing in the background: ${observability_images[*]} loaded into kind, then started"
  observability_up >"$work/observability.log" 2>&1 &
  observability_pid=$!
fi
step skaffold-deploy "skaffold deploy${profile:+ -p $profile} (the operator chart, then the platform with its hooks: the migration Jobs)"
skaffold deploy "${args[@]}" --build-artifacts "$work/build.json" --load-images=false

step ingress "waiting for the ingress (http://127.0.0.1:8080/health)"
for _ in $(seq 1 60); do
  code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/health || true)
  [ "$code" = 200 ] && break
  sleep 2
done
[ "$code" = 200 ] || die "the ingress answers $code on http://127.0.0.1:8080/health (kubectl --context $context -n istio-system logs deploy/istio-ingressgateway)"

secret() { kc -n emporium get secret users-admin -o "jsonpath={.data.$1}" | base64 -d; }
step sample-catalog "the sample catalog, added as the admin through the ingress (as make up does; existing SKUs are kept)"
python3 - "$root/tools/testbed/src/emporium_testbed/data/sample-catalog.json" "$(secret ADMIN_EMAIL)" \
  "$(secret ADMIN_PASSWORD)" <<'PY'
import json, sys, urllib.error, urllib.request

catalog, email, password = sys.argv[1:]
def call(path, body, token=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"http://127.0.0.1:8080{path}", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, None
status, login = call("/users/login", {"email": email, "password": password})
assert status == 200, f"admin login through the ingress: {status}"
added = 0
for product in json.load(open(catalog)):
    status, _ = call("/products", product, login["access_token"])
    assert status in (201, 409), f"POST /products {product.get('sku')}: {status}"
    added += status == 201
print(f"sample catalog: {added} added")
PY

if [ "$monitoring" = true ] || [ "$tracing" = true ]; then
  step observability-wait "waiting for the monitoring and tracing add-ons"
  wait "$observability_pid" || { cat "$work/observability.log" >&2; die "loading or starting ${observability_images[*]} failed"; }
  observability_pid=
  if [ "$tracing" = true ]; then
    kc -n observability rollout status deployment/otel-collector --timeout=5m
    kc -n observability rollout status deployment/jaeger --timeout=5m
  fi
  if [ "$monitoring" = true ]; then
    kc -n monitoring rollout status deployment/prometheus-operator --timeout=5m
    # the operator makes the StatefulSet of the Prometheus object
    for _ in $(seq 1 60); do kc -n monitoring get statefulset/prometheus-emporium >/dev/null 2>&1 && break; sleep 2; done
    kc -n monitoring rollout status statefulset/prometheus-emporium --timeout=5m
  fi
fi

step end
printf '%s\tdeploy/total\trun\t%s\t%s\n' "$(date -Is)" "$((SECONDS - t0))" "${profile:-default}" >>"$timings"
cat <<EOF

Emporium is running on kind (context $context), ready after $((SECONDS - t0)) s:
  ingress:  http://127.0.0.1:8080   (try: curl http://127.0.0.1:8080/products)
  admin:    kubectl --context $context -n emporium get secret users-admin -o jsonpath='{.data.ADMIN_EMAIL}' | base64 -d
            kubectl --context $context -n emporium get secret users-admin -o jsonpath='{.data.ADMIN_PASSWORD}' | base64 -d
  mail:     kubectl --context $context -n mail port-forward svc/mailpit 8025  (API: /api/v1/messages)
EOF
[ "$monitoring" != true ] || cat <<EOF
  metrics:  kubectl --context $context -n monitoring port-forward svc/prometheus-operated 9090  (Prometheus; no Grafana)
EOF
[ "$tracing" != true ] || cat <<EOF
  traces:   kubectl --context $context -n observability port-forward svc/jaeger 16686  (Jaeger's UI and API)
EOF
cat <<EOF
  remove:   make kind-down
EOF
