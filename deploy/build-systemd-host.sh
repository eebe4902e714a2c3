#!/usr/bin/env bash
# Build the systemd host image (deploy/systemd-host.Dockerfile): a Debian
# base with systemd and HAProxy, pilotfish installed from this checkout's
# wheel with the README's commands. Prints the image name.
#
#   PF_SYSTEMD_HOST_IMAGE   image name (default pilotfish-systemd-host:<version>)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PYTHON="${PYTHON:-$PF_REPO/.venv/bin/python}"
IMAGE="${PF_SYSTEMD_HOST_IMAGE:-pilotfish-systemd-host:$PF_VERSION}"

dockerd_up
docker image inspect "$PF_BASE_IMAGE" >/dev/null 2>&1 || "$PF_REPO/deploy/make-base-image.sh"
pip_build_args
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
start=$SECONDS
mkdir -p "$PF_DEPLOY_DIR"
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$context" "$PF_REPO" >"$PF_DEPLOY_DIR/wheel.log" 2>&1 \
    || { tail -20 "$PF_DEPLOY_DIR/wheel.log" >&2; exit 1; }
cp -r "$PF_REPO/systemd" "$PF_REPO/requirements.lock" "$context/"
docker build --network host --pull=false -f "$PF_REPO/deploy/systemd-host.Dockerfile" -t "$IMAGE" \
    --build-arg BASE_IMAGE="$PF_BASE_IMAGE" "${PF_PIP_ARGS[@]}" "$context" \
    >"$PF_DEPLOY_DIR/build-systemd-host.log" 2>&1 \
    || { tail -40 "$PF_DEPLOY_DIR/build-systemd-host.log" >&2; exit 1; }
log "built $IMAGE in $((SECONDS - start)) s"
echo "$IMAGE"
