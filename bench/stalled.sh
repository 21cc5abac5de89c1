#!/usr/bin/env bash
# Memory per stalled flow, and whether a stalled link still carries other flows:
#
#   sudo bash bench/stalled.sh                       # build, then measure
#   sudo SKIP_BUILD=1 FLOWS=200 bash bench/stalled.sh
#
# Two agents in namespaces as in bench/run.sh. London's pod runs a talker (socat writing
# /dev/zero to every client) and a sink (a Python server that accepts uploads and never reads
# them). Paris opens FLOWS downloads with 4 KiB receive buffers that never
# read, and FLOWS uploads that write until blocked; after SETTLE seconds it records each
# agent's VmRSS and PSS, then times a 100 MiB download through the same link beside them.
# Prints the growth per stalled flow (both directions together) and the download time.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH=stalled
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
NS_L=cws-london
NS_P=cws-paris
FLOWS=${FLOWS:-200}
SETTLE=${SETTLE:-5}
TALK_PORT=7010
SINK_PORT=7011
WORK=$(mktemp -d /tmp/cw-stalled.XXXXXX)

[ "$(id -u)" = 0 ] || die "run as root (network namespaces)"
command -v socat >/dev/null || die "socat not found (apt-get install -y socat)"
command -v python3 >/dev/null || die "python3 not found"
bench_build

cleanup() {
    trap - EXIT INT TERM
    disown -a 2>/dev/null
    bench_netns_down $NS_P $NS_L
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench_netns_down $NS_P $NS_L
bench_netns $NS_L $NS_P || die "cannot create the namespaces and their veth pair"
inl() { ip netns exec $NS_L "$@"; }
inp() { ip netns exec $NS_P "$@"; }
inl socat TCP-LISTEN:$TALK_PORT,bind=$POD,reuseaddr,fork OPEN:/dev/zero >/dev/null 2>&1 &
inl python3 -c '
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(1024)
held = []
while True:
    held.append(l.accept()[0])
' $POD $SINK_PORT >"$WORK/sink.log" 2>&1 &
inl "$LOADGEN" echo-server --listen $POD:$ECHO_PORT >/dev/null 2>&1 &
inl iperf3 -s -B $POD -p $IPERF_PORT >/dev/null 2>&1 &

declare -A PID
for site in london paris; do
    "$CAUSEWAY" --state "$WORK/$site" init --site $site >/dev/null 2>&1 || die "init failed"
    bench_site_config "$WORK/$site" $site $L_WAN:7400
    if [ $site = london ]; then
        sed -i "s/{name: iperf, port: $IPERF_PORT}/{name: iperf, port: $IPERF_PORT}, {name: talk, port: $TALK_PORT}, {name: sink, port: $SINK_PORT}/" \
            "$WORK/$site/causeway.yaml"
    fi
    ns=$NS_L
    [ $site = paris ] && ns=$NS_P
    ip netns exec $ns env RUST_LOG=warn "$CAUSEWAY" --state "$WORK/$site" run 2>"$WORK/$site.log" >/dev/null &
    PID[$site]=$!
done
bench_link "$WORK" 50 || die "linking the sites failed: $(tail -n 3 "$WORK/link.log")"
vip=$(bench_first_vip "$WORK/paris" 50 0.2)
[ -n "$vip" ] || die "no VIP in paris"
for _ in $(seq 50); do
    inp "$LOADGEN" pingpong --addr "$vip:$ECHO_PORT" --count 10 --warmup 0 >/dev/null 2>&1 && break
    sleep 0.2
done

# snapshot KEY: each agent's VmRSS and PSS (kB) into RSS[site,KEY] and PSS[site,KEY].
declare -A RSS PSS
snapshot() {
    local s
    for s in london paris; do
        RSS[$s,$1]=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/${PID[$s]}/status")
        PSS[$s,$1]=$(awk '$1 == "Pss:" { print $2 }' "/proc/${PID[$s]}/smaps_rollup")
    done
}
snapshot before

log "$FLOWS stalled downloads and $FLOWS stalled uploads through $vip"
inp python3 - "$vip" "$TALK_PORT" "$SINK_PORT" "$FLOWS" "$WORK/held" <<'PY' &
import socket, sys, time, os
vip, talk, sink, n, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
held = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((vip, talk))
    held.append(s)
chunk = b"u" * 65536
for _ in range(n):
    s = socket.create_connection((vip, sink))
    s.setblocking(False)
    held.append(s)
# Uploads write until nothing more is taken for a second.
idle_since = time.time()
while time.time() - idle_since < 1.0:
    moved = False
    for s in held[n:]:
        try:
            s.send(chunk)
            moved = True
        except (BlockingIOError, ConnectionError):
            pass
    if moved:
        idle_since = time.time()
open(ready, "w").write("ready\n")
time.sleep(600)
PY
for _ in $(seq 600); do [ -s "$WORK/held" ] && break; sleep 0.2; done
[ -s "$WORK/held" ] || die "the stalled flows were not set up"
sleep "$SETTLE"
snapshot stalled
log "100 MiB download beside them"
t0=$(date +%s.%N)
dl=$(inp timeout 60 iperf3 -c "$vip" -p $IPERF_PORT -n 100M -R -J 2>/dev/null |
    awk '/"sum_received"/ {s = 1} s && /"bytes"/ {gsub(/,/, ""); print $2; exit}')
t1=$(date +%s.%N)

echo "causeway, $FLOWS downloads that never read (4 KiB receive buffers) + $FLOWS uploads nobody reads, after ${SETTLE}s:"
echo "| agent | VmRSS before KiB | VmRSS stalled KiB | KiB per stalled flow | PSS before KiB | PSS stalled KiB | KiB per stalled flow |"
echo "|---|---|---|---|---|---|---|"
for s in london paris; do
    awk -v s=$s -v a="${RSS[$s,before]}" -v b="${RSS[$s,stalled]}" -v c="${PSS[$s,before]}" -v d="${PSS[$s,stalled]}" -v n=$((2 * FLOWS)) \
        'BEGIN { printf "| %s | %d | %d | %.1f | %d | %d | %.1f |\n", s, a, b, (b - a) / n, c, d, (d - c) / n }'
done
awk -v b="${dl:-0}" -v a="$t0" -v c="$t1" 'BEGIN { printf "100 MiB download beside them: %d bytes in %.2f s (%.2f Gbit/s)\n", b, c - a, b * 8 / (c - a) / 1e9 }'
grep -m1 -i "panic" "$WORK"/*.log && die "an agent panicked"
exit 0
