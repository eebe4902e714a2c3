#!/usr/bin/env bash
# CI: build the base image, both agent images (real `docker build`, vfs) and
# run them as containers: tests/deploy (the seed deployment's docker run
# commands, whoami reachable through the discoverer container's HAProxy).
# Prints image sizes and timings. Everything runs on a private dockerd and
# etcd that are stopped at the end (PF_KEEP=1 keeps them).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PYTHON="${PYTHON:-$PF_REPO/.venv/bin/python}"

start=$SECONDS
external="${DOCKER_HOST:-}"
cleanup() {
    local rc=$?
    if [[ "${PF_KEEP:-0}" != 1 ]]; then
        etcd_down
        [[ -n "$external" ]] || dockerd_down
    fi
    log "ci-images: $((SECONDS - start)) s in all (exit $rc)"
    exit $rc
}
trap cleanup EXIT

"$PF_REPO/deploy/build-images.sh"
log "base + images: $((SECONDS - start)) s"
eval "$("$PF_REPO/deploy/stack.sh" up | sed 's/^/export /')"
test_start=$SECONDS
PF_STACK_KEEP=1 "$PYTHON" -m pytest -p no:cacheprovider -m deploy "$PF_REPO/tests/deploy/test_images.py" -v -rA "$@"
log "tests/deploy: $((SECONDS - test_start)) s"
