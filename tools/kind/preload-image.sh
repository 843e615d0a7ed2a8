#!/usr/bin/env bash
# The kind node image with the add-on images preloaded: NODE_IMAGE (tools/kind/node-image.sh) plus, in its containerd,
# every image tools/kind/deploy.sh runs besides our own (Istio, the data services, mailpit, monitoring and tracing: the
# union of the default and ha profiles, `deploy.sh --list-images`), imported as kind imports its own component images
# into its node images (pinned, not unpacked). A cluster made from it has them from the start: deploy.sh's `kind load`
# of them finds each one there and skips it, so a warm `make kind-up` loads only our own images.
#
# Cached by the ids of NODE_IMAGE and of the add-on images (tools/images/build.sh rebuilds those only when their
# recipe or pin changes) and by this script: made again only when one of them changes; superseded ones are removed.
# Prints the image's name on the last line. EMPORIUM_PRELOAD=0 (in cluster.sh) skips it: the node image as it is.
#
#   tools/kind/preload-image.sh NODE_IMAGE
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
node_image=${1:?usage: preload-image.sh NODE_IMAGE}

mapfile -t names < <({ bash "$here/deploy.sh" --list-images; bash "$here/deploy.sh" --list-images --ha; } | awk '!seen[$0]++')
# built (or pulled) here when missing; cached otherwise, and deploy.sh's own call of it is then cached too
bash "$EMPORIUM_ROOT/tools/images/build.sh" "${names[@]}" >&2
mapfile -t refs < <(bash "$EMPORIUM_ROOT/tools/images/build.sh" --list "${names[@]}")
ids=$(docker image inspect -f '{{.Id}}' "$node_image" "${refs[@]}")
key=$(recipe_key "$here/preload-image.sh" "$node_image" "${refs[*]}" "$ids")
image=emporium.local/kind-node-preloaded:$KUBERNETES_VERSION-$key

build_preloaded() { # what node-image.sh's build_node does for the component images, on top of the node image
  local id=emporium-kind-preload-$$
  docker rm -f "$id" >/dev/null 2>&1 || true
  docker run -d --entrypoint=sleep --name="$id" --security-opt seccomp=unconfined "$node_image" infinity
  trap "docker rm -f -v '$id' >/dev/null 2>&1 || true" EXIT
  docker exec "$id" bash -c 'nohup containerd >/tmp/containerd.log 2>&1 &'
  docker exec "$id" bash -c 'for i in $(seq 100); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done; exit 1'
  # one archive: the layers the images share (the Debian base) once
  docker save "${refs[@]}" | docker exec -i "$id" ctr --namespace=k8s.io images import \
    --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests -
  docker exec "$id" ctr --namespace=k8s.io images list -q
  docker exec "$id" sh -c 'pkill containerd; sleep 1; rm -f /tmp/containerd.log'
  docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' --change 'CMD []' "$id" "$image"
}
step kind-node/preload "$key" "have_image $image" -- build_preloaded
prune_superseded "$image"
echo "$image"
