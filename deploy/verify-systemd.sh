#!/usr/bin/env bash
# Check the systemd units in systemd/ without booting systemd:
#  1. `systemd-analyze verify` in a scratch root (--root) holding the units,
#     systemd's own units and an executable at the ExecStart path; any
#     message (an unknown key is only a warning there) fails the check;
#  2. the ExecStart command line parses with this checkout's CLI (--help);
#  3. the example environment files are valid settings for their agent;
#  4. `systemd-analyze security --offline` prints each unit's exposure score
#     and fails above PF_SECURITY_THRESHOLD (default 4.0, "OK" or better).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
need_packages systemd-analyze=systemd

PYTHON="${PYTHON:-$PF_REPO/.venv/bin/python}"
UNITS=(pilotfish-registrar.service pilotfish-discoverer.service pilotfish-catalog.service
       pilotfish-upgrader.service)
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
status=0
for unit in "${UNITS[@]}"; do
    cp "$PF_REPO/systemd/$unit" "$root/etc/systemd/system/"
    exec_start="$(sed -n 's/^ExecStart=//p' "$PF_REPO/systemd/$unit")"
    binary="${exec_start%% *}"
    mkdir -p "$root$(dirname "$binary")"
    printf '#!/bin/sh\nexit 0\n' >"$root$binary"
    chmod +x "$root$binary"
    # The commented etcd TLS credentials block, switched on, must verify too.
    sed 's/^#LoadCredential=/LoadCredential=/; s/^#Environment=PILOTFISH_ETCD/Environment=PILOTFISH_ETCD/' \
        "$PF_REPO/systemd/$unit" >"$root/etc/systemd/system/${unit%.service}-tls.service"
    grep -q '^LoadCredential=etcd-key' "$root/etc/systemd/system/${unit%.service}-tls.service"
done

out="$(systemd-analyze verify --root="$root" "${UNITS[@]}" "${UNITS[@]/%.service/-tls.service}" 2>&1)" || status=1
if [[ -n "$out" ]]; then
    printf '%s\n' "$out" >&2
    status=1
fi
[[ $status == 0 ]] && log "systemd-analyze verify: ${UNITS[*]} OK"

for unit in "${UNITS[@]}"; do
    exec_start="$(sed -n 's/^ExecStart=//p' "$PF_REPO/systemd/$unit")"
    read -r -a argv <<<"$exec_start"
    # /opt/pilotfish/bin/pilotfish <command> [flags] -> this checkout's CLI
    if ! "$PYTHON" -m agents "${argv[@]:1}" --help >/dev/null; then
        log "$unit: ExecStart arguments rejected by the CLI: ${argv[*]:1}"
        status=1
    fi
    command="${argv[1]}"
    env_file="$PF_REPO/systemd/${unit#pilotfish-}"
    env_file="${env_file%.service}.env.example"
    if ! env -i PATH="$PATH" bash -c "set -a; source '$env_file'; \
        $(sed -n 's/^Environment=/export /p' "$PF_REPO/systemd/$unit" | tr '\n' ';') \
        exec '$PYTHON' -c 'import sys
from agents.cli import load_settings
print(load_settings(sys.argv[1], {}).model_dump(exclude={\"etcd_password\"}))' '$command'" >/dev/null; then
        log "$unit: $env_file is not valid for pilotfish $command"
        status=1
    fi
    score="$(systemd-analyze security --offline=yes --root="$root" --no-pager "$unit" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for [^:]*: *\([0-9.]*\).*/\1/p')"
    log "$unit: exposure ${score:-?} (systemd-analyze security; 0 = fully sandboxed, 10 = none)"
    if [[ -z "$score" ]] || awk -v s="$score" -v t="${PF_SECURITY_THRESHOLD:-4.0}" 'BEGIN { exit !(s > t) }'; then
        status=1
    fi
done
exit $status
