# Shared helpers for the deploy/ CI scripts (sourced, not executed).
#
# A private dockerd (vfs, own socket / roots / bridge, no iptables) and a
# private etcd, so the scripts run on a bare Debian 12 machine as root and
# never touch an engine or etcd somebody else is using on the same machine.
#
#   PF_DEPLOY_DIR   state directory            (default /tmp/pilotfish-deploy)
#   PF_BRIDGE       bridge of the private engine (default pfdeploy0)
#   PF_BRIDGE_CIDR  its address                 (default 10.231.0.1/24)
#   PF_ETCD_PORT    private etcd client port    (default 24379)
#   DOCKER_HOST     if set, that engine is used and none is started

set -euo pipefail

PF_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PF_DEPLOY_DIR="${PF_DEPLOY_DIR:-/tmp/pilotfish-deploy}"
PF_BRIDGE="${PF_BRIDGE:-pfdeploy0}"
PF_BRIDGE_CIDR="${PF_BRIDGE_CIDR:-10.231.0.1/24}"
PF_BRIDGE_IP="${PF_BRIDGE_CIDR%/*}"
PF_ETCD_PORT="${PF_ETCD_PORT:-24379}"
PF_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$PF_REPO/pyproject.toml" | head -1)"
PF_REGISTRAR_IMAGE="${PILOTFISH_REGISTRAR_IMAGE:-pilotfish-registrar:$PF_VERSION}"
PF_DISCOVERER_IMAGE="${PILOTFISH_DISCOVERER_IMAGE:-pilotfish-discoverer:$PF_VERSION}"
PF_BASE_IMAGE="${PF_BASE_IMAGE:-pilotfish-base:bookworm}"
PF_WHOAMI_IMAGE="${PF_WHOAMI_IMAGE:-pilotfish-whoami:latest}"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need_packages() {  # need_packages CMD=PKG ...: apt-get install what is missing
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
            || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
    fi
}

# Start a private dockerd unless DOCKER_HOST names one; exports DOCKER_HOST.
dockerd_up() {  # the engine everything runs on: $DOCKER_HOST if set, else a private one
    if [[ -n "${DOCKER_HOST:-}" ]]; then
        docker version --format '{{.Server.Version}}' >/dev/null
        return
    fi
    DOCKER_HOST="$(engine_up docker "$PF_BRIDGE" "$PF_BRIDGE_CIDR" "$PF_HOST_IP")"
    export DOCKER_HOST
}

dockerd_down() { engine_down docker; }

# engine_up NAME BRIDGE CIDR PUBLISH_IP: a private dockerd (vfs) in
# $PF_DEPLOY_DIR/NAME with its own bridge, publishing on PUBLISH_IP; prints
# its DOCKER_HOST. Reused if already running.
engine_up() {
    local name=$1 bridge=$2 cidr=$3 publish_ip=$4
    need_packages dockerd=docker.io docker=docker.io
    local d="$PF_DEPLOY_DIR/$name"
    local url="unix://$d/docker.sock"
    mkdir -p "$d"
    if [[ -f "$d/docker.pid" ]] && kill -0 "$(cat "$d/docker.pid")" 2>/dev/null \
        && DOCKER_HOST="$url" docker version >/dev/null 2>&1; then
        echo "$url"
        return
    fi
    if ! ip link show "$bridge" >/dev/null 2>&1; then
        ip link add "$bridge" type bridge
        ip addr add "$cidr" dev "$bridge"
    fi
    ip link set "$bridge" up
    log "starting dockerd on $url (vfs, bridge $bridge, publishing on $publish_ip)"
    # --iptables=false: no rules in the machine's tables (other engines may
    # run here); published ports go through docker-proxy, and builds use
    # --network host to reach the package mirrors.
    setsid dockerd --storage-driver=vfs --data-root "$d/data" --exec-root "$d/exec" \
        -H "$url" --pidfile "$d/docker.pid" --bridge="$bridge" \
        --iptables=false --ip-masq=false --ip="$publish_ip" \
        --containerd-namespace "pilotfish-$name" --containerd-plugins-namespace "pilotfish-$name-plugins" \
        >"$d/dockerd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do
        if DOCKER_HOST="$url" docker version >/dev/null 2>&1; then
            echo "$url"
            return
        fi
        sleep 0.5
    done
    tail -20 "$d/dockerd.log" >&2
    return 1
}

engine_down() {  # engine_down NAME
    local d="$PF_DEPLOY_DIR/$1"
    [[ -f "$d/docker.pid" ]] || return 0
    local pid
    pid="$(cat "$d/docker.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    umount "$d/exec/netns/default" 2>/dev/null || true  # else rm -rf of the dir fails
}

# A private etcd on 127.0.0.1 and the private bridge's address, so a
# container on the default bridge reaches it as $PF_BRIDGE_IP:$PF_ETCD_PORT
# and a --net host container as 127.0.0.1:$PF_ETCD_PORT.
etcd_up() {
    need_packages etcd=etcd-server
    local d="$PF_DEPLOY_DIR/etcd"
    mkdir -p "$d"
    if [[ -f "$d/pid" ]] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then return; fi
    local urls="http://127.0.0.1:$PF_ETCD_PORT"
    ip addr show "$PF_BRIDGE" 2>/dev/null | grep -q "inet $PF_BRIDGE_IP/" && urls="$urls,http://$PF_BRIDGE_IP:$PF_ETCD_PORT"
    rm -rf "$d/data"
    setsid etcd --name pfdeploy --data-dir "$d/data" \
        --listen-client-urls "$urls" --advertise-client-urls "http://127.0.0.1:$PF_ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$((PF_ETCD_PORT + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((PF_ETCD_PORT + 1))" \
        --initial-cluster "pfdeploy=http://127.0.0.1:$((PF_ETCD_PORT + 1))" \
        >"$d/etcd.log" 2>&1 </dev/null &
    echo $! >"$d/pid"
    for _ in $(seq 1 60); do
        ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PF_ETCD_PORT" endpoint health >/dev/null 2>&1 && return
        sleep 0.5
    done
    tail -20 "$d/etcd.log" >&2
    return 1
}

etcd_down() {
    local f="$PF_DEPLOY_DIR/etcd/pid"
    [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
}

# Pip configuration for `docker build`, as build args in the array
# PF_PIP_ARGS: the host's index settings (file:// indexes do not exist inside
# the build and are dropped; an http(s) index on the host's loopback is
# reachable because the builds run with --network host), and the CAs this
# machine added to its trust store (/usr/local/share/ca-certificates), for an
# index behind a TLS-inspecting proxy. The CAs are used in the build stage
# only; the final image does not contain them.
pip_build_args() {
    PF_PIP_ARGS=()
    local var value kept url key
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
        value="${!var:-}"
        if [[ -z "$value" ]] && command -v pip3 >/dev/null; then
            key="${var#PIP_}"; key="${key,,}"; key="${key//_/-}"
            value="$(pip3 config get "global.$key" 2>/dev/null || true)"
        fi
        kept=""
        for url in $value; do [[ "$url" == file:* ]] || kept="${kept:+$kept }$url"; done
        [[ -n "$kept" ]] && PF_PIP_ARGS+=(--build-arg "$var=$kept")
    done
    local cas
    cas="$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)"
    [[ -n "$cas" ]] && PF_PIP_ARGS+=(--build-arg "EXTRA_CA_CERTS=$cas")
    return 0
}

# The etcd image of the compose files, built from Debian's etcd-server when
# missing (no registry here); sets ETCD_IMAGE.
etcd_image() {
    ETCD_IMAGE="${ETCD_IMAGE:-pilotfish-etcd:bookworm}"
    docker image inspect "$ETCD_IMAGE" >/dev/null 2>&1 && return
    log "docker build -f compose/etcd.Dockerfile -t $ETCD_IMAGE"
    docker build --network host -f "$PF_REPO/compose/etcd.Dockerfile" -t "$ETCD_IMAGE" \
        --build-arg BASE_IMAGE="$PF_BASE_IMAGE" "$PF_REPO/compose" >"$PF_DEPLOY_DIR/build-etcd.log" 2>&1 \
        || { tail -30 "$PF_DEPLOY_DIR/build-etcd.log" >&2; return 1; }
}

# For a CI script running tests on the stack: on exit, stop the private etcd
# and dockerd (not an engine DOCKER_HOST named; PF_KEEP=1 keeps both) and log
# how long NAME took.
stop_stack_on_exit() {  # stop_stack_on_exit NAME
    PF_RUN_NAME=$1 PF_RUN_START=$SECONDS PF_RUN_EXTERNAL="${DOCKER_HOST:-}"
    trap _stop_stack EXIT
}

_stop_stack() {
    local rc=$?
    if [[ "${PF_KEEP:-0}" != 1 ]]; then
        etcd_down
        [[ -n "$PF_RUN_EXTERNAL" ]] || dockerd_down
    fi
    log "$PF_RUN_NAME: $((SECONDS - PF_RUN_START)) s in all (exit $rc)"
    exit $rc
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || { log "timed out: $what"; return 1; }
        sleep 1
    done
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A busybox "whoami": answers every GET with its hostname (the container id).
whoami_image() {
    docker image inspect "$PF_WHOAMI_IMAGE" >/dev/null 2>&1 && return
    need_packages busybox=busybox-static
    local root
    root="$(mktemp -d)"
    mkdir -p "$root/bin" "$root/www" "$root/tmp"
    cp "$(command -v busybox)" "$root/bin/busybox"
    for tool in sh httpd hostname wget sleep cat kill; do ln -s busybox "$root/bin/$tool"; done
    cat >"$root/bin/whoami" <<'EOF2'
#!/bin/sh
# busybox httpd as PID 1 ignores SIGTERM: keep a shell as PID 1.
echo "Hostname: $(hostname)" >/www/index.html
httpd -f -p "${PORT:-8080}" -h /www &
child=$!
trap 'kill $child; exit 0' TERM INT
wait $child
EOF2
    chmod +x "$root/bin/whoami"
    tar -C "$root" -c . | docker import \
        --change 'CMD ["/bin/whoami"]' --change 'EXPOSE 8080' --change 'ENV PATH=/bin' \
        - "$PF_WHOAMI_IMAGE" >/dev/null
    rm -rf "$root"
}

# Address the private engine publishes on (its own loopback address: engines
# on one machine each pick "random" host ports from the same range, so two
# engines publishing on one IP collide).
PF_HOST_IP="${PF_HOST_IP:-127.0.231.1}"
