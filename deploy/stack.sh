#!/usr/bin/env bash
# The real stack the image tests run against: a private dockerd (vfs), a
# private etcd, the images built from this checkout and a whoami image.
#
#   deploy/stack.sh up     # idempotent; prints KEY=VALUE lines (for tests/deploy)
#   deploy/stack.sh down   # stops the dockerd and etcd it started
#
# etcd listens on 127.0.0.1 (for --net host containers: the discoverer) and on
# the engine's bridge address (for bridge containers: the registrar, run with
# the seed deployment's exact flags).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

case "${1:-}" in
up)
    dockerd_up
    etcd_up
    if ! docker image inspect "$PF_REGISTRAR_IMAGE" "$PF_DISCOVERER_IMAGE" >/dev/null 2>&1 \
        || [[ "${PF_REBUILD_IMAGES:-0}" == 1 ]]; then
        "$PF_REPO/deploy/build-images.sh"
    fi
    whoami_image
    cat <<END
DOCKER_HOST=$DOCKER_HOST
PF_DOCKER_SOCKET=${DOCKER_HOST#unix://}
PF_ETCD_LOCAL=127.0.0.1:$PF_ETCD_PORT
PF_ETCD_BRIDGE=$PF_BRIDGE_IP:$PF_ETCD_PORT
PF_HOST_IP=$PF_HOST_IP
PF_REGISTRAR_IMAGE=$PF_REGISTRAR_IMAGE
PF_DISCOVERER_IMAGE=$PF_DISCOVERER_IMAGE
PF_WHOAMI_IMAGE=$PF_WHOAMI_IMAGE
PF_BASE_IMAGE=${BASE_IMAGE:-$PF_BASE_IMAGE}
END
    ;;
down)
    etcd_down
    [[ -n "${DOCKER_HOST:-}" ]] || dockerd_down
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
