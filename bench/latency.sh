#!/usr/bin/env bash
# Interactive latency under bulk load (issue 15 item 7): a 1-byte ping-pong over one TCP
# connection, alone and while STREAMS parallel iperf3 streams cross the same path, for direct
# TCP, socat and causeway, on the two namespaces of bench/run.sh:
#
#   sudo bash bench/latency.sh                       # build, then measure
#   sudo SKIP_BUILD=1 CAUSEWAY=./causeway LOADGEN=./loadgen bash bench/latency.sh
#   sudo COUNT=2000 DURATION=6 TOOLS="socat causeway" bash bench/latency.sh
#
# Per tool: the ping-pong alone (COUNT round trips after WARMUP), STREAMS iperf3 streams alone
# for DURATION s (their throughput is the bulk baseline), then the same iperf3 run with the
# ping-pong started LOAD_DELAY s into it and cut off LOAD_DELAY s before it ends (so it never
# measures an idle path: the output's count says how many round trips fitted). One SCHED_IDLE
# busy loop per CPU keeps idle vCPUs from halting (as in bench/run.sh), so "alone" measures
# the tools rather than wake-up latency. The table gives p50, p99 and mean of both runs, the
# under-load/alone ratios, the bulk throughput alone and under the ping-pong and, for causeway,
# how full the receiving agent's UDP socket buffer ran meanwhile (sampled every 10 ms).
#
# Knobs (environment): TOOLS="direct socat causeway", COUNT=5000, WARMUP=500, STREAMS=4,
# DURATION=12, LOAD_DELAY=1, ROUNDS=1 (each tool this many times, tools taking turns),
# CW_WORKERS=1 (tokio workers per agent, as bench/run.sh), CW_LANES=auto (links.lanes), CAUSEWAY, LOADGEN,
# CARGO_TARGET_DIR, SKIP_BUILD=1, SKIP_APT=1. Takes about ROUNDS × tools × (2 × DURATION + 10) s.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH=latency
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
NS_L=cwl-london
NS_P=cwl-paris

TOOLS=${TOOLS:-direct socat causeway}
COUNT=${COUNT:-5000}
WARMUP=${WARMUP:-500}
STREAMS=${STREAMS:-4}
DURATION=${DURATION:-12}
LOAD_DELAY=${LOAD_DELAY:-1}
ROUNDS=${ROUNDS:-1}
CW_WORKERS=${CW_WORKERS:-1}

[ "$(id -u)" = 0 ] || die "run as root (network namespaces): sudo bash bench/latency.sh"
[ "$DURATION" -gt $((2 * LOAD_DELAY + 1)) ] || die "DURATION must exceed 2 × LOAD_DELAY + 1"

need_pkgs=()
for pair in iperf3:iperf3 socat:socat ip:iproute2 chrt:util-linux taskset:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
bench_install "${need_pkgs[@]}"

bench_build

WORK=$(mktemp -d /tmp/cwl.XXXXXX)
PIDS=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    disown -a 2>/dev/null
    bench_spin_stop
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    bench_netns_down $NS_P $NS_L
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

inp() { ip netns exec $NS_P "$@"; }

bench_netns_down $NS_P $NS_L
bench_netns $NS_L $NS_P || die "cannot create the namespaces and their veth pair"

# Servers in london: iperf3 on the pod address (tunnels) and the veth address (direct), one
# echo server on both.
bg $NS_L iperf3 -s -B $POD -p $IPERF_PORT >"$WORK/iperf3-pod.log" 2>&1
bg $NS_L iperf3 -s -B $L_WAN -p $IPERF_PORT >"$WORK/iperf3-wan.log" 2>&1
bg $NS_L "$LOADGEN" echo-server --listen $POD:$ECHO_PORT --listen $L_WAN:$ECHO_PORT 2>"$WORK/echo.log"
sleep 0.5

wait_path() {
    local i
    for ((i = 0; i < 100; i++)); do
        inp timeout 3 "$LOADGEN" pingpong --addr "$1" --count 1 --warmup 0 >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# jget KEY < one-line JSON: the value of a number field.
jget() { sed -n "s/.*\"$1\":\([0-9.e+-]*\).*/\1/p" | head -1; }
# iperf3 -J output on stdin: the receiver's Gbit/s over all streams.
gbps() { tr -d ' \t\n' | sed -n 's/.*"sum_received":{[^}]*"bits_per_second":\([0-9.e+]*\).*/\1/p' | awk '{printf "%.2f", $1 / 1e9}'; }

# The relays of each tool: start_TOOL sets ECHO and IPERF (host:port seen from paris) and
# appends its pids to TOOL_PIDS; direct has none.
start_direct() {
    ECHO=$L_WAN:$ECHO_PORT IPERF=$L_WAN:$IPERF_PORT
}
# socat as in bench/run.sh: paris listens locally and relays to a socat in london, which
# relays to the pod; one process per connection on each side.
start_socat() {
    local base=11000 i ports=($IPERF_PORT $ECHO_PORT)
    for i in 0 1; do
        bg $NS_L socat TCP-LISTEN:$((base + 11 + i)),bind=$L_WAN,fork,reuseaddr,nodelay TCP:$POD:${ports[$i]},nodelay 2>>"$WORK/socat.log"
        TOOL_PIDS+=("$LAST_PID")
        bg $NS_P socat TCP-LISTEN:$((base + 1 + i)),bind=127.0.0.1,fork,reuseaddr,nodelay TCP:$L_WAN:$((base + 11 + i)),nodelay 2>>"$WORK/socat.log"
        TOOL_PIDS+=("$LAST_PID")
    done
    IPERF=127.0.0.1:$((base + 1)) ECHO=127.0.0.1:$((base + 2))
}
# causeway: two agents linked by a token, london exporting the servers, as in bench/run.sh.
start_causeway() {
    local d=$WORK/causeway site ns vip
    rm -rf "$d" && mkdir -p "$d"
    for site in london paris; do
        "$CAUSEWAY" --state "$d/$site" init --site $site >/dev/null 2>>"$d/init.log" || return 1
        bench_site_config "$d/$site" $site "$L_WAN:7400"
        ns=$NS_L
        [ $site = paris ] && ns=$NS_P
        bg $ns env RUST_LOG=warn TOKIO_WORKER_THREADS="$CW_WORKERS" "$CAUSEWAY" --state "$d/$site" run 2>"$d/$site.log"
        TOOL_PIDS+=("$LAST_PID")
    done
    bench_link "$d" 50 || return 1
    vip=$(bench_first_vip "$d/paris" 150 0.1)
    [ -n "$vip" ] || return 1
    IPERF=$vip:$IPERF_PORT ECHO=$vip:$ECHO_PORT
}

# udp_queue PID SECS: every 10 ms for SECS s, the receive queue (bytes the kernel charges,
# headers and slack included) of the QUIC socket (port 7400) in PID's namespace, one a line.
# Pure bash between the sleeps, so it costs the CPUs under test little.
udp_queue() {
    local pid=$1 end=$((SECONDS + $2)) sl local rem st q rest
    while [ $SECONDS -lt $end ] && [ -r /proc/$pid/net/udp ]; do
        while read -r sl local rem st q rest; do
            [[ $local == *:1CE8 ]] && echo $((16#${q#*:}))
        done </proc/$pid/net/udp
        sleep 0.01
    done
}
# p50 and p99 of numbers on stdin, in KiB, as "p50 / p99".
kib_pct() { sort -n | awk '{v[NR] = $1} END {i = int(NR * 0.99) + 1; if (i > NR) i = NR; if (NR) printf "%.0f / %.0f", v[int(NR * 0.5) + 1] / 1024, v[i] / 1024; else printf "-"}'; }

# measure TOOL ROUND: one row of the table (or a failure row).
measure() {
    local tool=$1 round=$2 alone loaded bulk bulk_loaded ipid udpq qpid
    TOOL_PIDS=()
    if ! "start_$tool" || ! wait_path "$ECHO"; then
        printf '| %s | %d | failed: no path (see %s) |\n' "$tool" "$round" "$WORK" | tee -a "$WORK/table"
        [ ${#TOOL_PIDS[@]} -gt 0 ] && kill "${TOOL_PIDS[@]}" 2>/dev/null
        return 1
    fi
    bench_spin_start
    log "$tool: ping-pong alone ($COUNT round trips)"
    alone=$(inp timeout 120 "$LOADGEN" pingpong --addr "$ECHO" --count "$COUNT" --warmup "$WARMUP" 2>&1)
    log "$tool: $STREAMS iperf3 streams alone (${DURATION}s)"
    bulk=$(inp timeout $((DURATION + 30)) iperf3 -c "${IPERF%:*}" -p "${IPERF##*:}" -P "$STREAMS" -t "$DURATION" -J 2>&1 | gbps)
    log "$tool: ping-pong under $STREAMS iperf3 streams"
    inp timeout $((DURATION + 30)) iperf3 -c "${IPERF%:*}" -p "${IPERF##*:}" -P "$STREAMS" -t "$DURATION" -J \
        >"$WORK/iperf3-$tool-$round.json" 2>&1 &
    ipid=$!
    sleep "$LOAD_DELAY"
    # causeway: how deep the receiving agent's (london's) UDP queue runs meanwhile.
    qpid=
    if [ "$tool" = causeway ]; then
        udp_queue "${TOOL_PIDS[0]}" $((DURATION - 2 * LOAD_DELAY - 1)) >"$WORK/udpq-$round" &
        qpid=$!
    fi
    loaded=$(inp timeout $((DURATION + 30)) "$LOADGEN" pingpong --addr "$ECHO" --count "$COUNT" --warmup "$WARMUP" \
        --seconds $((DURATION - 2 * LOAD_DELAY - 1)) 2>&1)
    wait $ipid
    bulk_loaded=$(gbps <"$WORK/iperf3-$tool-$round.json")
    udpq=-
    [ -n "$qpid" ] && wait "$qpid" && udpq=$(kib_pct <"$WORK/udpq-$round")
    bench_spin_stop
    echo "$tool round $round alone: $alone" >>"$WORK/raw"
    echo "$tool round $round loaded: $loaded" >>"$WORK/raw"
    awk -v t="$tool" -v r="$round" -v s="$STREAMS" \
        -v a50="$(jget median_us <<<"$alone")" -v a99="$(jget p99_us <<<"$alone")" -v am="$(jget mean_us <<<"$alone")" \
        -v l50="$(jget median_us <<<"$loaded")" -v l99="$(jget p99_us <<<"$loaded")" -v lm="$(jget mean_us <<<"$loaded")" \
        -v ln="$(jget count <<<"$loaded")" -v b="$bulk" -v bl="$bulk_loaded" -v q="$udpq" '
        function ratio(x, y) { return (y > 0) ? sprintf("%.1f×", x / y) : "-" }
        BEGIN {
            if (a99 == "" || l99 == "") { printf "| %s | %d | failed: ping-pong gave no figures |\n", t, r; exit }
            printf "| %s | %d | %.0f / %.0f / %.0f | %.0f / %.0f / %.0f (%d) | %s | %s | %s / %s | %s |\n",
                t, r, a50, a99, am, l50, l99, lm, ln, ratio(l99, a99), ratio(lm, am), b, bl, q
        }' | tee -a "$WORK/table"
    # Not a bare `wait` when there are none (direct): that would wait for the servers too.
    if [ ${#TOOL_PIDS[@]} -gt 0 ]; then
        kill "${TOOL_PIDS[@]}" 2>/dev/null
        wait "${TOOL_PIDS[@]}" 2>/dev/null
    fi
}

for tool in $TOOLS; do
    case $tool in
    direct | socat | causeway) ;;
    *) die "unknown tool $tool (direct, socat, causeway)" ;;
    esac
done
{
    echo "ping-pong: 1-byte round trips on one TCP connection, µs (p50 / p99 / mean), alone and under"
    echo "$STREAMS iperf3 streams (round trips measured in brackets); bulk: the iperf3 streams' Gbit/s alone / under the ping-pong."
    echo "$(nproc) CPUs; COUNT=$COUNT WARMUP=$WARMUP STREAMS=$STREAMS DURATION=$DURATION CW_WORKERS=$CW_WORKERS; $("$CAUSEWAY" --version 2>/dev/null)"
    echo
    echo "| tool | round | alone p50 / p99 / mean | under load p50 / p99 / mean (n) | p99 ratio | mean ratio | bulk Gbit/s | london UDP queue KiB p50 / p99 |"
    echo "|---|---|---|---|---|---|---|---|"
} | tee "$WORK/table"
for r in $(seq "$ROUNDS"); do
    for tool in $TOOLS; do
        measure "$tool" "$r"
    done
done
