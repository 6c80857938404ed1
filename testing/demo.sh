#!/usr/bin/env bash
# A guided tour on one machine, nothing from Azure needed: a fake Azure estate (the HTTPS fake
# of Resource Manager), the Data Plane API emulator driving a real HAProxy, "instances" on
# 127.0.0.2, 127.0.0.3, ... answering with their names, and the daemon in between.
# Each step changes the estate, prints the daemon's plan (--dry-run), applies it (--once) and
# shows which instances answer through HAProxy. Everything stops when the demo ends.
set -euo pipefail
cd "$(dirname "$0")/.."
./testing/setup.sh
py=.venv/bin/python
work=$(mktemp -d /tmp/haproxy-azure-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { $py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

frontend=$(free_port); dataplane=$(free_port); port=$(free_port); metrics=$(free_port)
backend="azure-web-$port-eastus"

estate() {   # estate N [stopped-name]: N tagged VMs on 127.0.0.2.. serving on $port
    $py - "$work/estate.json" "$port" "$@" <<'PY'
import os, sys
sys.path.insert(0, "testing")
from fake_arm import make_estate
path, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
estate = make_estate(vms=n, ip_base="127.0.0.2", services=(("web", port),))
for name in sys.argv[4:]:
    estate.update(name, power_state="deallocated")
with open(path + ".tmp", "w") as f:
    f.write(estate.to_json())
os.replace(path + ".tmp", path)
PY
}

instances() {   # run an HTTP server for each running VM of the estate
    if [ -n "${inst_pid:-}" ]; then kill "$inst_pid"; wait "$inst_pid" 2>/dev/null || true; fi
    mapfile -t pairs < <($py -c '
import json, sys
for vm in json.load(open(sys.argv[1]))["vms"]:
    if vm["power_state"] == "running":
        print(vm["name"] + "=" + vm["private_ip"])' "$work/estate.json")
    $py testing/instances.py --port "$port" "${pairs[@]}" & inst_pid=$!; pids+=("$inst_pid")
    sleep 0.5
}

step() {    # step TITLE: plan, apply, traffic
    say "$1"
    sleep 0.7                                   # the fake re-reads the estate file
    echo "-- plan (haproxy-azure-discovery --dry-run):"
    $py haproxy_azure_discovery.py -c "$work/config.json" --dry-run | sed 's/^/    /'
    echo "-- apply (--once):"
    $py haproxy_azure_discovery.py -c "$work/config.json" --once 2>&1 | grep -o '"msg": "[^"]*"' | sed 's/^/    /'
    sleep 1                                     # health checks (inter 500 ms)
    echo "-- 12 requests through HAProxy (127.0.0.1:$frontend) answered by:"
    $py testing/instances.py --hits "http://127.0.0.1:$frontend/" 12
}

say "Starting the fake of Azure Resource Manager with 3 VMs"
estate 3
$py testing/fake_arm.py --estate "$work/estate.json" --state-dir "$work/arm" > "$work/arm.env" & pids+=($!)
for _ in $(seq 50); do [ -s "$work/arm.env" ] && break; sleep 0.1; done
eval "$(cat "$work/arm.env")"
echo "    $FAKE_ARM_URL (token from its managed-identity endpoint: DefaultAzureCredential, unchanged)"

say "Starting the Data Plane API emulator with a real HAProxy (frontend 127.0.0.1:$frontend)"
printf 'frontend fe_main\n    mode http\n    bind 127.0.0.1:%s\n    use_backend %%[str(%s)]\n' \
    "$frontend" "$backend" > "$work/frontend.cfg"
$py testing/fake_dataplane.py --port "$dataplane" --api v3 --reload-delay 1 --password demo-password \
    --base-config "$work/frontend.cfg" --live > "$work/dataplane.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
    $py -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$dataplane/v3/info')" 2>/dev/null && break
    sleep 0.2
done
echo "    http://127.0.0.1:$dataplane/v3 (HAProxy $(haproxy -v | head -1 | awk '{print $3}'))"

cat > "$work/config.json" <<EOF
{
  "azure": {"subscription_id": "00000000-0000-0000-0000-000000000001",
            "resource_manager_url": "\${FAKE_ARM_URL}", "retries": 1},
  "haproxy": {"base_url": "http://127.0.0.1:$dataplane", "password": "\${DP_PASSWORD}",
              "server_slots": {"base": 4},
              "server": {"params": {"inter": 500, "rise": 1, "fall": 1}}},
  "logging": {"format": "json"}
}
EOF
# The daemon of steps 4 and 5 polls every second and drains for 20 s at most: its drain ends
# when the last session does, seconds before that bound even on a busy machine; its metrics
# listener serves the state view at /state.
$py -c 'import json, sys; c = json.load(open(sys.argv[1])); c["polling"] = {"interval_seconds": 1, "jitter_seconds": 0}
c["safety"] = {"drain_seconds": 20, "drain_confirm_seconds": 2}; c["metrics"] = {"listen": "127.0.0.1:" + sys.argv[3]}
json.dump(c, open(sys.argv[2], "w"))' "$work/config.json" "$work/daemon.json" "$metrics"
export DP_PASSWORD=demo-password
echo "    daemon configuration: $work/config.json"
$py haproxy_azure_discovery.py -c "$work/config.json" --validate | sed 's/^/    /'

instances
step "1. First sync: 3 VMs tagged HAProxy:Service:Name=web, HAProxy:Service:Port=$port"

estate 6; instances
step "2. Scale out to 6 VMs: past the 4 slots, the backend grows to 4 + ceil(2 x 1.5) = 7"

estate 6 vm-0001 vm-0004; instances
step "3. Deallocate vm-0001 and vm-0004: their servers drain (no session left: parked at once), nothing else moves"

say "The state at a glance: discovery and HAProxy side by side (--status)"
$py haproxy_azure_discovery.py -c "$work/config.json" --status | sed 's/^/    /'

say "4. The daemon takes over (a cycle a second), and the estate shrinks to 2 VMs at once"
$py haproxy_azure_discovery.py -c "$work/daemon.json" 2> "$work/daemon.log" & daemon=$!; pids+=("$daemon")
state_view() {   # the daemon's /state, printed as --status prints it
    $py -c 'import json, sys, urllib.request; sys.path.insert(0, ".")
import haproxy_azure_discovery as m
print(m.format_status(json.load(urllib.request.urlopen(sys.argv[1], timeout=5))), end="")' \
        "http://127.0.0.1:$metrics/state" | sed 's/^/    /'
}
sleep 2
estate 2; instances
steady() { grep -c '"result": "steady"' "$work/daemon.log" || true; }
# the guard's two confirmations and 2 s, then the drain (no session: parked at once), then a steady cycle
for _ in $(seq 120); do state_view 2>/dev/null | grep -q ' 2 live, 5 parked$' && break; sleep 0.25; done
seen=$(steady); for _ in $(seq 40); do [ "$(steady)" -gt "$seen" ] && break; sleep 0.25; done
echo "-- the daemon's log (JSON lines, shown here by their msg):"
grep -o '"msg": "[^"]*"' "$work/daemon.log" | uniq -c | sed 's/^/   /'
echo "   3 of 5 live servers going at once is more than safety.max_drain_percent (50%):"
echo "   the mass-drain guard held them until the same discovery was seen twice in a row and for"
echo "   safety.drain_confirm_seconds (2 s here, 300 by default)."
echo "-- 12 requests through HAProxy answered by:"
$py testing/instances.py --hits "http://127.0.0.1:$frontend/" 12
echo "-- a steady cycle costs one Data Plane request:"
grep '"result": "steady"' "$work/daemon.log" | tail -1 | grep -o '"dataplane_requests": [0-9]*' | sed 's/^/    /'

say "5. Graceful draining: vm-0001 is scaled in while an 8-second request to it is in flight"
dataplane_get() {   # the Data Plane API's JSON answer to GET /v3$1
    $py -c 'import base64, sys, urllib.request
auth = "Basic " + base64.b64encode(("admin:" + sys.argv[2]).encode()).decode()
sys.stdout.write(urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={"Authorization": auth})).read().decode())' \
        "http://127.0.0.1:$dataplane/v3$1" "$DP_PASSWORD"
}
reloads() {   # HAProxy reloads so far, as the Data Plane API numbers them (reload ids DATE-N, N from 0)
    dataplane_get /services/haproxy/reloads | $py -c 'import json, sys
print(max((int(r["id"].rsplit("-", 1)[1]) + 1 for r in json.load(sys.stdin) if r.get("id", "")[:1].isdigit()), default=0))'
}
in_flight() {   # sessions on the backend's servers now, from HAProxy's native stats
    dataplane_get "/services/haproxy/stats/native?type=server&parent=$backend" | $py -c 'import json, sys
sys.path.insert(0, ".")
import haproxy_azure_discovery as m
print(sum(n or 0 for n in m.current_sessions(json.load(sys.stdin), sys.argv[1]).values()))' "$backend"
}
before=$(reloads)
slow=()
for _ in 1 2; do     # round robin: one lands on vm-0000, one on vm-0001
    $py -c 'import sys, urllib.request
print("    the 8-second request answered (200) by", urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())' \
        "http://127.0.0.1:$frontend/slow?seconds=8" & slow+=($!)
done
for _ in $(seq 40); do n=$(in_flight 2>/dev/null) && [ "$n" -ge 2 ] && break; sleep 0.25; done   # both reached HAProxy
echo "-- sessions in flight on the backend (HAProxy's native stats): $(in_flight)"
estate 1                                  # vm-0001 leaves Azure; its server still finishes the request
park_by=$((SECONDS + 17))                 # before the drain's 20 s bound, which starts after this
for _ in $(seq 40); do state_view | grep -q ' draining ' && break; sleep 0.25; done   # the next cycle
echo "-- the daemon's view (its /state, as --status prints it): the slot drains, no new connection"
state_view
draining=$(reloads)
echo "-- 12 requests through HAProxy answered by:"
$py testing/instances.py --hits "http://127.0.0.1:$frontend/" 12
wait "${slow[@]}"
# the next cycles see no session left: a park seen before park_by is not the 20 s bound's
while ((SECONDS < park_by)); do sleep 0.25; state_view | grep -q ' draining ' || break; done
echo "-- its last session ended: parked at once, without waiting for safety.drain_seconds (20 s)"
state_view
grep -o '"msg": "server [^"]*draining[^"]*"' "$work/daemon.log" | uniq | sed 's/^/    /'
echo "-- HAProxy reloads: $((draining - before)) to drain, $(($(reloads) - draining)) to park (apply_mode transaction;"
echo "   in hybrid mode the park goes through the runtime API too: no reload at all)"

kill -TERM "$daemon"; wait "$daemon" && echo "-- SIGTERM: the daemon exited 0"
say "Done. The whole test suite: ./testing/test.sh"
