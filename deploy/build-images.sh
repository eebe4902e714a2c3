#!/usr/bin/env bash
# Build the registrar and discoverer images with a real `docker build`.
#
#   deploy/build-images.sh                 # FROM the local pilotfish-base:bookworm (made if missing)
#   BASE_IMAGE=python:3.12-slim deploy/build-images.sh   # FROM the official image (needs a registry)
#
# Builds run with --network host so pip reaches the machine's package index
# (even one on the host's loopback); the host's pip index settings are passed
# as build args. Prints each image's size and the build times.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BASE_IMAGE="${BASE_IMAGE:-$PF_BASE_IMAGE}"
dockerd_up
if [[ "$BASE_IMAGE" == "$PF_BASE_IMAGE" ]]; then
    start=$SECONDS
    "$PF_REPO/deploy/make-base-image.sh"
    log "base image ready in $((SECONDS - start)) s"
fi

pip_build_args
revision="$(git -C "$PF_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
build() {  # build DOCKERFILE IMAGE
    local start=$SECONDS
    log "docker build -f $1 -t $2 (FROM $BASE_IMAGE)"
    docker build --network host --pull=false -f "$PF_REPO/$1" -t "$2" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VERSION="$PF_VERSION" \
        --build-arg REVISION="$revision" "${PF_PIP_ARGS[@]}" \
        "$PF_REPO" >"$PF_DEPLOY_DIR/build-${2%%:*}.log" 2>&1 \
        || { tail -40 "$PF_DEPLOY_DIR/build-${2%%:*}.log" >&2; return 1; }
    log "built $2 in $((SECONDS - start)) s"
}
mkdir -p "$PF_DEPLOY_DIR"
build Dockerfile.register "$PF_REGISTRAR_IMAGE"
build Dockerfile.discover "$PF_DISCOVERER_IMAGE"
docker image ls --format 'table {{.Repository}}:{{.Tag}}\t{{.Size}}' \
    | grep -E "^(REPOSITORY|${PF_REGISTRAR_IMAGE%%:*}|${PF_DISCOVERER_IMAGE%%:*}|${BASE_IMAGE%%:*})" >&2
