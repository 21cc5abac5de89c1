#!/usr/bin/env bash
# Instructions the two causeway agents execute per round trip, per MiB and per connection,
# counted by valgrind's callgrind: repeatable to about 1% whatever else the machine is doing,
# where CPU time on this 2-vCPU VM varies ±15% from run to run. Use it to compare two builds
# of the data path; bench/run.sh stays the measure of real speed against the other tools.
#
#   sudo bash bench/instructions.sh                      # build, then measure
#   sudo CAUSEWAY=/path/causeway LOADGEN=/path/loadgen SKIP_BUILD=1 bash bench/instructions.sh
#
# Same topology as bench/run.sh (two namespaces joined by a veth, servers on london's pod
# address) with both agents running under `valgrind --tool=callgrind`, instrumentation off
# until each phase starts. Phases: PINGPONG=2000 one-byte round trips (loadgen pingpong),
# BULK_MIB=32 MiB each way through london's echo server (socat, all of it back before the
# phase ends), CONNS_SECONDS=5 of new connections (loadgen connrate, 4 at a time). Agents
# under valgrind run ~50× slower, so bulk batches grow larger than at full speed: compare
# builds with this script, not with bench/run.sh.
# Only user-space instructions count; system calls are one instruction each. KEEP=DIR keeps
# the callgrind dumps (cg.london.N, cg.paris.N; N = 1, 2, 3 for the phases above) for
# callgrind_annotate. Each phase also reports the UDP sends paris made per unit (a GSO batch
# counts once); a round trip sends one datagram each way, as at full speed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH=instr
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
NS_L=cwi-london
NS_P=cwi-paris
PINGPONG=${PINGPONG:-2000}
BULK_MIB=${BULK_MIB:-32}
CONNS_SECONDS=${CONNS_SECONDS:-5}
WORK=$(mktemp -d /tmp/cw-instr.XXXXXX)
PIDS=()

[ "$(id -u)" = 0 ] || die "run as root (network namespaces)"
for tool in valgrind callgrind_control socat; do
    command -v $tool >/dev/null || die "$tool not found (apt-get install -y valgrind socat)"
done

bench_build

cleanup() {
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 1
    bench_netns_down $NS_P $NS_L
    [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$WORK"/cg.* "$WORK"/*.out "$KEEP"/ 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench_netns_down $NS_P $NS_L
bench_netns $NS_L $NS_P || die "cannot create the namespaces and their veth pair"

inp() { ip netns exec $NS_P "$@"; }

bg $NS_L "$LOADGEN" echo-server --listen $POD:7007 --oneshot $POD:7008 2>"$WORK/echo.log"

declare -A PID
for site in london paris; do
    "$CAUSEWAY" --state "$WORK/$site" init --site $site >/dev/null 2>&1 || die "init failed"
    bench_site_config "$WORK/$site" $site $L_WAN:7400
    ns=$NS_L
    [ $site = paris ] && ns=$NS_P
    bg $ns env RUST_LOG=warn TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$WORK/cg.$site" "$CAUSEWAY" --state "$WORK/$site" run 2>"$WORK/$site.log"
    PID[$site]=$LAST_PID
done
bench_link "$WORK" 150 || die "linking the sites failed: $(tail -n 3 "$WORK/link.log")"
vip=$(bench_first_vip "$WORK/paris" 300 0.2)
[ -n "$vip" ] || die "no VIP in paris"
log "VIP $vip; warming up"
inp "$LOADGEN" pingpong --addr "$vip:7007" --count 200 --warmup 0 >/dev/null || die "no path through the VIP"

# phase NAME CMD...: instrumentation on in both agents, CMD, a dump of what it cost, off.
DUMPS=0
phase() {
    local name=$1
    shift
    local out0
    out0=$(udp_out)
    for site in london paris; do callgrind_control -i on "${PID[$site]}" >/dev/null 2>&1; done
    "$@" >"$WORK/$name.out" 2>&1 || die "$name failed: $(tail -n 3 "$WORK/$name.out")"
    # Let the slowed agents finish what the client started (closing streams, last ACKs):
    # wait until paris sends no more than keep-alives (one a second) before counting.
    local before after=$(udp_out)
    for _ in $(seq 120); do
        before=$after
        sleep 1
        after=$(udp_out)
        [ $((after - before)) -le 2 ] && break
    done
    for site in london paris; do
        callgrind_control -d "${PID[$site]}" >/dev/null 2>&1
        callgrind_control -i off "${PID[$site]}" >/dev/null 2>&1
    done
    DUMPS=$((DUMPS + 1))
    SENT[$name]=$(($(udp_out) - out0))
    for site in london paris; do
        IR[$name,$site]=$(awk '/^totals:/ {print $2}' "$WORK/cg.$site.$DUMPS")
    done
}
declare -A IR SENT
# UDP sends paris has made so far (a GSO batch counts once).
udp_out() { ip netns exec $NS_P nstat -asz 2>/dev/null | awk '$1 == "UdpOutDatagrams" { print $2 + 0 }'; }

log "ping-pong: $PINGPONG round trips"
phase pingpong inp "$LOADGEN" pingpong --addr "$vip:7007" --count "$PINGPONG" --warmup 0
log "bulk: $BULK_MIB MiB each way"
# Through the echo server, not iperf3: an iperf3 client finishes once its bytes are in its
# socket and the server then closes, so whatever the slowed agents still held was discarded
# uncounted (most of it, for small sizes). Here every byte comes back before the phase ends.
phase bulk inp sh -c "head -c ${BULK_MIB}M /dev/zero | socat -t 600 -T 600 - TCP:$vip:7007 | wc -c"
want=$((BULK_MIB * 1024 * 1024))
[ "$(tr -d ' \n' <"$WORK/bulk.out")" = $want ] || die "bulk: $(cat "$WORK/bulk.out") bytes came back, not $want"
log "connections: $CONNS_SECONDS s"
phase conns inp "$LOADGEN" connrate --addr "$vip:7008" --seconds "$CONNS_SECONDS" --concurrency 4
conns=$(sed -n 's/.*"connections":\([0-9]*\).*/\1/p' "$WORK/conns.out")
[ -n "$conns" ] && [ "$conns" -gt 0 ] || die "no connections counted"

per() { awk -v a="$1" -v n="$2" 'BEGIN { printf "%.0f", a / n }'; }
printf '\n%s (tree %s), callgrind instructions (user space) per unit\n\n' "$CAUSEWAY" "$(cd "$ROOT" && git describe --always --dirty 2>/dev/null)"
printf '| per | london | paris | both | UDP sends by paris (a GSO batch is one) |\n|---|---|---|---|---|\n'
for row in "pingpong round trip:$PINGPONG" "bulk MiB:$((BULK_MIB * 2))" "conns connection:$conns"; do
    key=${row%% *}
    rest=${row#* }
    unit=${rest%%:*}
    n=${rest##*:}
    l=${IR[$key,london]}
    p=${IR[$key,paris]}
    printf '| %s | %s | %s | %s | %s |\n' "$unit" "$(per "$l" "$n")" "$(per "$p" "$n")" "$(per $((l + p)) "$n")" \
        "$(awk -v a="${SENT[$key]}" -v n="$n" 'BEGIN { printf "%.2f", a / n }')"
done
printf '\n(%s round trips; %s MiB each way through an echo server, so a MiB row is per MiB\ncarried in one direction; %s connections)\n' "$PINGPONG" "$BULK_MIB" "$conns"
