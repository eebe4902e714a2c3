#!/usr/bin/env bash
# Bring the compose demo (compose/docker-compose.yml) up with locally built
# images, check the registrar registered the three whoami instances in etcd,
# reach them through the discoverer's HAProxy from the client container, and
# take it down.
#
#   deploy/ci-compose.sh          # on a private dockerd (see lib.sh); PF_KEEP=1 keeps it up
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_packages docker-compose=docker-compose etcdctl=etcd-client

[[ -n "${DOCKER_HOST:-}" ]] && PF_DOCKER_HOST_GIVEN=1
start=$SECONDS
dockerd_up
"$PF_REPO/deploy/build-images.sh"
whoami_image
etcd_image
log "images ready after $((SECONDS - start)) s"

export ETCD_IMAGE HOST_IP="$PF_HOST_IP" DOCKER_SOCKET="${DOCKER_HOST#unix://}"
export PILOTFISH_REGISTRAR_IMAGE="$PF_REGISTRAR_IMAGE" PILOTFISH_DISCOVERER_IMAGE="$PF_DISCOVERER_IMAGE"
export PILOTFISH_CATALOG_IMAGE="$PF_REGISTRAR_IMAGE"  # the catalog runs in the registrar's image
export WHOAMI_IMAGE="$PF_WHOAMI_IMAGE" PILOTFISH_PREFIX="/demo-$$"
# Host-network ports moved off the defaults, so the demo never collides with
# anything else on the CI machine.
ETCD_PUBLISH="127.0.0.1:$(free_port)"
WHOAMI_PORT="$(free_port)"
STATS_ADDRESS="127.0.0.1:$(free_port)"
DISCOVERER_ADMIN_ADDRESS="127.0.0.1:$(free_port)"
CATALOG_PUBLISH="127.0.0.1:$(free_port)"
export ETCD_PUBLISH WHOAMI_PORT STATS_ADDRESS DISCOVERER_ADMIN_ADDRESS CATALOG_PUBLISH
compose=(docker-compose -p "pfdemo$$" -f "$PF_REPO/compose/docker-compose.yml")

down() {
    local rc=$?
    if ((rc != 0)); then "${compose[@]}" logs --tail=30 registrar discoverer >&2 || true; fi
    if [[ "${PF_KEEP:-0}" != 1 ]]; then
        "${compose[@]}" down -v --remove-orphans >&2 || true
        [[ -n "${PF_EXTERNAL_DOCKER:-}" ]] || dockerd_down
    fi
    log "compose run: $((SECONDS - start)) s in all (exit $rc)"
    exit $rc
}
[[ -n "${PF_DOCKER_HOST_GIVEN:-}" ]] && PF_EXTERNAL_DOCKER=1
trap down EXIT

up_start=$SECONDS
"${compose[@]}" up -d >&2
log "compose up in $((SECONDS - up_start)) s"

registered() {
    [[ "$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD_PUBLISH" get --prefix --keys-only \
        "$PILOTFISH_PREFIX/services/whoami/" 2>/dev/null | grep -c .)" == 3 ]]
}
wait_for 60 "3 whoami instances registered under $PILOTFISH_PREFIX" registered
log "registrar: 3 whoami instances in etcd after $((SECONDS - up_start)) s"

# nc, not wget: Debian's static busybox wget crashes (SIGSEGV) in these images.
fetch() {
    "${compose[@]}" exec -T client sh -c \
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 127.0.0.1 $WHOAMI_PORT" 2>/dev/null \
        | grep '^Hostname:'
}
wait_for 60 "whoami through the discoverer on 127.0.0.1:$WHOAMI_PORT" fetch >/dev/null
seen="$(for _ in $(seq 1 12); do fetch; done | sort -u)"
printf '%s\n' "$seen" >&2
[[ "$(grep -c '^Hostname:' <<<"$seen")" == 3 ]] || { log "expected 3 distinct backends"; exit 1; }
log "client reached all 3 whoami instances through HAProxy after $((SECONDS - up_start)) s"

catalog_lists() {
    python3 -c 'import json, sys, urllib.request as r
body = json.load(r.urlopen(f"http://{sys.argv[1]}/api/v1/services?name=whoami", timeout=2))
sys.exit(0 if [s["instances"] for s in body["services"]] == [3] else 1)' "$CATALOG_PUBLISH" 2>/dev/null
}
wait_for 60 "the catalog on $CATALOG_PUBLISH listing the 3 whoami instances" catalog_lists
log "catalog: 3 whoami instances on http://$CATALOG_PUBLISH/ after $((SECONDS - up_start)) s"
