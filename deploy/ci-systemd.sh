#!/usr/bin/env bash
# CI: the systemd units run by a real systemd (tests/deploy/test_systemd.py):
# a container of the private engine boots systemd with pilotfish installed by
# the README's commands; both units start (READY), ping the watchdog, route a
# whoami, run sandboxed as dynamic users, read etcd TLS files through
# LoadCredential= and stop with their HAProxy. The private dockerd and etcd
# are stopped at the end (PF_KEEP=1 keeps them).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PYTHON="${PYTHON:-$PF_REPO/.venv/bin/python}"

stop_stack_on_exit ci-systemd

eval "$("$PF_REPO/deploy/stack.sh" up | sed 's/^/export /')"
PF_STACK_KEEP=1 "$PYTHON" -m pytest -p no:cacheprovider -m deploy "$PF_REPO/tests/deploy/test_systemd.py" -v -rA "$@"
