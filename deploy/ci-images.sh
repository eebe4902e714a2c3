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
stop_stack_on_exit ci-images

"$PF_REPO/deploy/build-images.sh"
log "base + images: $((SECONDS - start)) s"
eval "$("$PF_REPO/deploy/stack.sh" up | sed 's/^/export /')"
test_start=$SECONDS
PF_STACK_KEEP=1 "$PYTHON" -m pytest -p no:cacheprovider -m deploy "$PF_REPO/tests/deploy/test_images.py" -v -rA "$@"
log "tests/deploy: $((SECONDS - test_start)) s"
