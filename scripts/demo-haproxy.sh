#!/usr/bin/env bash
# A real HAProxy steered by the demo, on loopback, in one command:
#
#   scripts/demo-haproxy.sh            # then: curl -s -o /dev/null -D - http://127.0.0.1:8080/ | grep X-Region
#
# Starts `controlplane demo --serve` (three agents, simulated backends on the ports of
# config/demo.yaml), HAProxy in front of the three regions' `order` backends (every
# server at the same weight: only the adapter makes the split), and the real adapter,
# `controlplane lb haproxy`, which keeps HAProxy's weights on the committed decision and
# reports to the agents (`cpctl status` lists it). Ctrl-C stops everything.
# HAPROXY_PORT (8080) moves HAProxy; VENV_BIN (.venv/bin) says where controlplane is.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${VENV_BIN:-$here/.venv/bin}
port=${HAPROXY_PORT:-8080}
haproxy=$(command -v haproxy || true)
if [ -z "$haproxy" ]; then
    echo "demo-haproxy: haproxy is not installed (Debian: apt-get install haproxy)" >&2
    exit 2
fi
if [ ! -x "$bin/controlplane" ]; then
    echo "demo-haproxy: no $bin/controlplane: run 'make venv' first (or set VENV_BIN)" >&2
    exit 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/controlplane-demo-haproxy.XXXXXX")
export CONTROLPLANE_ADMIN_TOKEN=${CONTROLPLANE_ADMIN_TOKEN:-$("$bin/python" -c 'import secrets; print(secrets.token_hex(16))')}
agents=http://127.0.0.1:8701,http://127.0.0.1:8702,http://127.0.0.1:8703
pids=()
cleanup() {
    trap - EXIT INT TERM
    [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat > "$work/haproxy.cfg" <<EOF
global
    stats socket $work/haproxy.sock mode 600 level admin
    stats timeout 30s
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend fe_order
    bind 127.0.0.1:$port
    default_backend be_order
backend be_order
    balance roundrobin
    server east 127.0.0.1:9101 weight 10
    server south 127.0.0.1:9201 weight 10
    server north 127.0.0.1:9301 weight 10
EOF
cat > "$work/map.yaml" <<EOF
order:
  backend: be_order
  servers: {cn-east: east, cn-south: south, cn-north: north}
EOF
"$haproxy" -c -q -f "$work/haproxy.cfg"

"$bin/controlplane" demo --serve --log-dir "$work/demo" > "$work/demo.out" 2>&1 &
pids+=($!)
if ! "$bin/python" - "$work/demo.out" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8701/readyz", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(open(sys.argv[1]).read()[-2000:] + "\ndemo-haproxy: the demo's agents did not get ready in 90 s")
PY
then
    exit 1
fi
"$haproxy" -db -f "$work/haproxy.cfg" > "$work/haproxy.log" 2>&1 &
pids+=($!)
"$bin/controlplane" lb haproxy --agent "$agents" --socket "$work/haproxy.sock" --map "$work/map.yaml" \
    --token "$CONTROLPLANE_ADMIN_TOKEN" --name demo-haproxy --report-s 2 --log-level warning \
    > "$work/lb.log" 2>&1 &
pids+=($!)

cat <<EOF
demo-haproxy: HAProxy on http://127.0.0.1:$port follows the demo's decision for 'order'.
  curl -s -o /dev/null -D - http://127.0.0.1:$port/ | grep X-Region    # which region answered
  export PATH=$bin:\$PATH CPCTL_ENDPOINT=$agents CPCTL_TOKEN=$CONTROLPLANE_ADMIN_TOKEN
  cpctl status                                                  # lists demo-haproxy
  cpctl drill cn-east --service order --duration 1m --reason try --yes
logs in $work (demo.out, haproxy.log, lb.log); Ctrl-C stops everything.
EOF
# Until Ctrl-C, or until one of them exits (which then stops the others).
wait -n "${pids[@]}"
echo "demo-haproxy: a process exited; stopping (logs: $work/demo.out, haproxy.log, lb.log)" >&2
tail -n 20 "$work/lb.log" "$work/haproxy.log" >&2 || true
exit 1
