#!/usr/bin/env bash
# CI: the README's first command, for real. `make demo` must answer through
# HAProxy from three different containers; `make demo-down` must leave nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR="${PILOTFISH_DEMO_DIR:-/tmp/pilotfish-demo}"

make demo
pids="$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(" ".join(str(v) for k,v in s.items() if k.endswith("_pid")))' "$DEMO_DIR/state.json")"
bridge="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("bridge") or "")' "$DEMO_DIR/state.json")"
answers="$(for _ in $(seq 1 12); do curl -fsS --max-time 2 127.0.0.1:8080; done | sort -u | wc -l)"
echo "distinct containers answering on 127.0.0.1:8080: $answers"
curl -fsS --max-time 2 -o /dev/null 127.0.0.1:1936/ && echo "stats page answers on :1936"
catalog="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["catalog_url"])' "$DEMO_DIR/state.json")"
listed=""
for _ in $(seq 1 50); do
    listed="$(curl -fsS --max-time 2 "${catalog}api/v1/services?name=whoami" | grep -o '"instances":3' || true)"
    [[ -n "$listed" ]] && break
    sleep 0.1
done
echo "catalog at $catalog lists whoami: ${listed:-no}"
# The upgrade the demo prints: tag v2 as latest, curl answering all along.
docker_host="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["docker_host"])' "$DEMO_DIR/state.json")"
v2="$(docker -H "$docker_host" image inspect -f '{{.Id}}' pilotfish-whoami:v2)"
curl_log="$(mktemp)"
( for _ in $(seq 1 400); do curl -fsS --max-time 2 -o /dev/null 127.0.0.1:8080 || echo failed; sleep 0.05; done ) >"$curl_log" &
curling=$!
docker -H "$docker_host" tag pilotfish-whoami:v2 pilotfish-whoami:latest
upgraded=0
for _ in $(seq 1 120); do
    upgraded="$(docker -H "$docker_host" ps -q --filter label=pilotfish.demo=1 \
        | xargs -r docker -H "$docker_host" inspect -f '{{.Image}}' | grep -c "$v2" || true)"
    [[ "$upgraded" == 3 ]] && break
    sleep 0.5
done
wait "$curling"
failed_curls="$(grep -c failed "$curl_log" || true)"
rm -f "$curl_log"
echo "upgraded to v2: $upgraded of 3 containers; failed requests meanwhile: $failed_curls"
make demo-down

left=""
for pid in $pids; do
    # A zombie (nobody reaps orphans in some CI sandboxes) counts as gone.
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -z "$state" || "$state" == Z ]] || left+=" pid $pid"
done
[[ -z "$bridge" ]] || ! ip link show "$bridge" >/dev/null 2>&1 || left+=" bridge $bridge"
[[ ! -e "$DEMO_DIR" ]] || left+=" $DEMO_DIR"
if [[ "$answers" -lt 3 || -z "$listed" || "$upgraded" != 3 || "$failed_curls" != 0 || -n "$left" ]]; then
    echo "demo check failed: $answers distinct answers (want 3), catalog listing: ${listed:-none}; upgraded $upgraded of 3 with $failed_curls failed requests; left behind:${left:- nothing}" >&2
    exit 1
fi
echo "demo up, answered by 3 containers, upgraded with no failed request, and removed without a trace"
