#!/usr/bin/env bash
# CI: the dev/test split (compose/docker-compose.split.yml) on two engines.
#
# One etcd; the "dev" engine (the private dockerd of lib.sh) runs etcd and
# the dev profile, a second engine with its own bridge, publishing on
# 127.0.232.1, runs the test profile. Both discoverers share this machine's
# network, as two consumers of one host would: dev binds 127.0.0.1, test
# 127.0.0.3. etcd has authentication on: `pilotfish env create` (run from the
# registrar image) makes dev's and test's users, and each profile's agents
# read their environment's file. Checked: each prefix holds only its own
# environment's whoami, each consumer address only ever answers from its own
# environment, and dev's registrar user is refused in /test.
#
#   deploy/ci-compose-split.sh    # PF_KEEP=1 leaves everything up
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_packages docker-compose=docker-compose etcdctl=etcd-client

start=$SECONDS
[[ -n "${DOCKER_HOST:-}" ]] && PF_EXTERNAL_DOCKER=1
dockerd_up
DEV_DOCKER_HOST="$DOCKER_HOST"
"$PF_REPO/deploy/build-images.sh"
whoami_image
etcd_image

TEST_HOST_IP=127.0.232.1
TEST_DOCKER_HOST="$(engine_up docker-test pfdeploy1 10.232.0.1/24 "$TEST_HOST_IP")"
load_start=$SECONDS
docker save "$PF_REGISTRAR_IMAGE" "$PF_DISCOVERER_IMAGE" "$PF_WHOAMI_IMAGE" \
    | DOCKER_HOST="$TEST_DOCKER_HOST" docker load >/dev/null
log "images loaded into the test engine in $((SECONDS - load_start)) s"

export ETCD_IMAGE WHOAMI_IMAGE="$PF_WHOAMI_IMAGE"
export PILOTFISH_REGISTRAR_IMAGE="$PF_REGISTRAR_IMAGE" PILOTFISH_DISCOVERER_IMAGE="$PF_DISCOVERER_IMAGE"
ETCD_PUBLISH="127.0.0.1:$(free_port)"
WHOAMI_PORT="$(free_port)"
DEV_STATS_ADDRESS="127.0.0.1:$(free_port)"
TEST_STATS_ADDRESS="127.0.0.3:$(free_port)"
export ETCD_PUBLISH WHOAMI_PORT DEV_STATS_ADDRESS TEST_STATS_ADDRESS
for var in DEV_REGISTRAR_ADMIN_PORT DEV_DISCOVERER_ADMIN_PORT TEST_REGISTRAR_ADMIN_PORT TEST_DISCOVERER_ADMIN_PORT; do
    export "$var=$(free_port)"
done
file="$PF_REPO/compose/docker-compose.split.yml"
shared=(env DOCKER_HOST="$DEV_DOCKER_HOST" docker-compose -p "pfetcd$$" -f "$file" --profile etcd)
dev=(env DOCKER_HOST="$DEV_DOCKER_HOST" HOST_IP="$PF_HOST_IP" DOCKER_SOCKET="${DEV_DOCKER_HOST#unix://}"
    docker-compose -p "pfdev$$" -f "$file" --profile dev)
test=(env DOCKER_HOST="$TEST_DOCKER_HOST" HOST_IP="$TEST_HOST_IP" DOCKER_SOCKET="${TEST_DOCKER_HOST#unix://}"
    docker-compose -p "pftest$$" -f "$file" --profile test)

down() {
    local rc=$?
    if ((rc != 0)); then
        "${dev[@]}" logs --tail=20 >&2 || true
        "${test[@]}" logs --tail=20 >&2 || true
    fi
    if [[ "${PF_KEEP:-0}" != 1 ]]; then
        "${test[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
        "${dev[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
        "${shared[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
        rm -rf "${envs:-}"
        engine_down docker-test
        [[ -n "${PF_EXTERNAL_DOCKER:-}" ]] || dockerd_down
    fi
    log "compose split: $((SECONDS - start)) s in all (exit $rc)"
    exit $rc
}
trap down EXIT

up_start=$SECONDS
"${shared[@]}" up -d >&2

# The environments: etcd's own access control keeps dev out of /test.
envs="$PF_DEPLOY_DIR/environments$$"
mkdir -p "$envs"
root_password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')"
etcdctl_root() { ETCDCTL_API=3 etcdctl --endpoints "$ETCD_PUBLISH" --user "root:$root_password" "$@"; }
pilotfish_env() {  # pilotfish_env ARGS...: `pilotfish env` from the registrar image, as root
    DOCKER_HOST="$DEV_DOCKER_HOST" docker run --rm --network host --user 0 -e PILOTFISH_RUN_AS= \
        -v "$envs:$envs" -e PILOTFISH_ETCD_HOST="$ETCD_PUBLISH" -e PILOTFISH_ETCD_USERNAME=root \
        -e PILOTFISH_ETCD_PASSWORD="$root_password" "$PF_REGISTRAR_IMAGE" \
        pilotfish env "$@" --env-dir "$envs"
}
etcd_answers() { ETCDCTL_API=3 etcdctl --endpoints "$ETCD_PUBLISH" endpoint health >/dev/null 2>&1; }
wait_for 60 "etcd answering on $ETCD_PUBLISH" etcd_answers
pilotfish_env create dev --env-prefix /dev --enable-auth >&2
pilotfish_env create test --env-prefix /test >&2
pilotfish_env list >&2
for environment in dev test; do
    for kind in registrar discoverer; do
        export "${environment^^}_${kind^^}_ENV=$envs/$environment/$kind.env"
    done
done
dev_user="$(sed -n 's/^PILOTFISH_ETCD_USERNAME=//p' "$envs/dev/registrar.env")"
dev_password="$(sed -n 's/^PILOTFISH_ETCD_PASSWORD=//p' "$envs/dev/registrar.env")"
if ETCDCTL_API=3 etcdctl --endpoints "$ETCD_PUBLISH" --user "$dev_user:$dev_password" \
    put /test/services/whoami/intruder/0123456789ab:8080 '{}' >/dev/null 2>&1; then
    log "dev's registrar user could write into /test"; exit 1
fi
log "etcd refuses dev's registrar user in /test"

"${dev[@]}" up -d >&2
"${test[@]}" up -d >&2
log "three projects up in $((SECONDS - up_start)) s"

addresses() {  # addresses PREFIX: the whoami instances' addresses under PREFIX
    etcdctl_root get --prefix --print-value-only "$1/services/whoami/" 2>/dev/null | python3 -c '
import json, sys
print(" ".join(sorted(json.loads(line)["address"] for line in sys.stdin if line.strip())))'
}
registered() { [[ "$(addresses /dev)" == "$PF_HOST_IP" && "$(addresses /test)" == "$TEST_HOST_IP" ]]; }
wait_for 90 "one whoami under /dev ($PF_HOST_IP) and one under /test ($TEST_HOST_IP)" registered
log "etcd: /dev holds only $PF_HOST_IP, /test only $TEST_HOST_IP"

container_of() {  # container_of ENGINE PROJECT SERVICE: the container's short id (its hostname)
    DOCKER_HOST="$1" docker ps -q --no-trunc --filter "label=com.docker.compose.project=$2" \
        --filter "label=com.docker.compose.service=$3" | cut -c1-12
}
dev_id="$(container_of "$DEV_DOCKER_HOST" "pfdev$$" dev-whoami)"
test_id="$(container_of "$TEST_DOCKER_HOST" "pftest$$" test-whoami)"
[[ -n "$dev_id" && -n "$test_id" ]] || { log "whoami containers not found"; exit 1; }
answers() {  # answers BIND_ADDRESS: the hostnames of 10 answers through that consumer
    python3 - "$1" "$WHOAMI_PORT" <<'EOF'
import sys, urllib.request
for _ in range(10):
    with urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/", timeout=2) as reply:
        print(reply.read().decode().split("Hostname: ", 1)[1].strip())
EOF
}
routed() { [[ "$(answers 127.0.0.1 2>/dev/null | sort -u)" == "$dev_id" ]]; }
wait_for 60 "the dev consumer (127.0.0.1:$WHOAMI_PORT) answering from dev's whoami" routed
routed() { [[ "$(answers 127.0.0.3 2>/dev/null | sort -u)" == "$test_id" ]]; }
wait_for 60 "the test consumer (127.0.0.3:$WHOAMI_PORT) answering from test's whoami" routed
# Once both route, neither may ever answer from the other environment.
[[ "$(answers 127.0.0.1 | sort -u)" == "$dev_id" ]] || { log "dev consumer reached test"; exit 1; }
[[ "$(answers 127.0.0.3 | sort -u)" == "$test_id" ]] || { log "test consumer reached dev"; exit 1; }
log "dev consumer -> $dev_id only, test consumer -> $test_id only, after $((SECONDS - up_start)) s"
