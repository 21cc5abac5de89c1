#!/usr/bin/env bash
# Where a ping-pong round trip's time goes, for causeway and (if installed) rathole, measured
# in turn on the same pair of namespaces as bench/run.sh:
#
#   sudo bash bench/roundtrip.sh                 # build, then measure
#   sudo SKIP_BUILD=1 CARGO_TARGET_DIR=/tmp/bench-target ROUNDS=3 bash bench/roundtrip.sh
#
# Per tool and round: the ping-pong median (COUNT=10000 one-byte round trips, one SCHED_IDLE
# busy loop per CPU keeping the vCPUs awake, as in bench/run.sh), the CPU time both agents ran
# per round trip and the time they waited on a run queue after being woken (from
# /proc/PID/task/*/schedstat around the ping-pong), then, in a separate pass under
# `strace -c -f` (which slows everything), the system calls both agents made per round trip.
# This is how docs/BENCHMARKS.md (*Latency*) compares the two relays. RATHOLE as in run.sh.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH=roundtrip
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
NS_L=cwr-london
NS_P=cwr-paris
COUNT=${COUNT:-10000}
ROUNDS=${ROUNDS:-2}
STRACE_COUNT=${STRACE_COUNT:-2000}
WORK=$(mktemp -d /tmp/cw-rt.XXXXXX)

[ "$(id -u)" = 0 ] || die "run as root (network namespaces)"
command -v strace >/dev/null || die "strace not found (apt-get install -y strace)"

bench_build

cleanup() {
    trap - EXIT INT TERM
    disown -a 2>/dev/null # no "Killed" line for each background process below
    bench_spin_stop
    bench_netns_down $NS_P $NS_L
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench_netns_down $NS_P $NS_L
bench_netns $NS_L $NS_P || die "cannot create the namespaces and their veth pair"
inp() { ip netns exec $NS_P "$@"; }
ip netns exec $NS_L "$LOADGEN" echo-server --listen $POD:$ECHO_PORT 2>"$WORK/echo.log" >/dev/null &

# causeway: two agents, one tokio worker each, as in bench/run.sh.
for site in london paris; do
    "$CAUSEWAY" --state "$WORK/$site" init --site $site >/dev/null 2>&1 || die "init failed"
    bench_site_config "$WORK/$site" $site $L_WAN:7400
    ns=$NS_L
    [ $site = paris ] && ns=$NS_P
    ip netns exec $ns env RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$CAUSEWAY" --state "$WORK/$site" run \
        2>"$WORK/$site.log" >/dev/null &
done
bench_link "$WORK" 50 || die "linking the sites failed: $(tail -n 3 "$WORK/link.log")"
vip=$(bench_first_vip "$WORK/paris" 50 0.2)
[ -n "$vip" ] || die "no VIP in paris"
declare -A ADDR=([causeway]="$vip:$ECHO_PORT")

# rathole, configured as in bench/run.sh (its echo service on 127.0.0.1:14002).
TOOLS=(causeway)
if [ -x "$RATHOLE" ]; then
    mkdir -p "$WORK/rathole" && bench_rathole_config "$WORK/rathole" 14000 || die "rathole --genkey failed"
    ip netns exec $NS_P env RUST_LOG=error "$RATHOLE" --server "$WORK/rathole/paris.toml" >/dev/null 2>&1 &
    sleep 0.3
    ip netns exec $NS_L env RUST_LOG=error "$RATHOLE" --client "$WORK/rathole/london.toml" >/dev/null 2>&1 &
    ADDR[rathole]=127.0.0.1:14002
    TOOLS+=(rathole)
else
    log "rathole not found ($RATHOLE): causeway only"
fi
for tool in "${TOOLS[@]}"; do
    ok=
    for _ in $(seq 50); do
        inp "$LOADGEN" pingpong --addr "${ADDR[$tool]}" --count 100 --warmup 0 >/dev/null 2>&1 && ok=1 && break
        sleep 0.2
    done
    [ -n "$ok" ] || die "no path through $tool"
done

# The agents' processes of a tool, by name, in both namespaces.
agents() {
    local ns p
    for ns in $NS_L $NS_P; do
        for p in $(ip netns pids $ns); do
            [ "$(cat /proc/$p/comm 2>/dev/null)" = "$1" ] && echo "$p"
        done
    done
}
# Sum of run and run-queue wait nanoseconds over every thread of the given processes.
schedstat() {
    local run=0 wait=0 p f a b c
    for p in "$@"; do
        for f in /proc/$p/task/*/schedstat; do
            read -r a b c <"$f" 2>/dev/null || continue
            run=$((run + a)) wait=$((wait + b))
        done
    done
    echo "$run $wait"
}

bench_spin_start
printf '| tool | round | median µs | agents run µs per round trip | agents run-queue wait µs per round trip |\n|---|---|---|---|---|\n'
for r in $(seq "$ROUNDS"); do
    for tool in "${TOOLS[@]}"; do
        mapfile -t pids < <(agents "$tool")
        read -r run0 wait0 < <(schedstat "${pids[@]}")
        median=$(inp "$LOADGEN" pingpong --addr "${ADDR[$tool]}" --count "$COUNT" |
            grep -o '"median_us":[0-9.]*' | cut -d: -f2)
        read -r run1 wait1 < <(schedstat "${pids[@]}")
        awk -v t="$tool" -v r="$r" -v m="$median" -v n="$COUNT" -v dr=$((run1 - run0)) -v dw=$((wait1 - wait0)) \
            'BEGIN { printf "| %s | %d | %.0f | %.0f | %.1f |\n", t, r, m, dr / n / 1000, dw / n / 1000 }'
    done
done
bench_spin_stop

printf '\n| tool | system calls per round trip, both agents (strace -c, %d round trips) | of which recvmmsg / epoll_wait |\n|---|---|---|\n' "$STRACE_COUNT"
for tool in "${TOOLS[@]}"; do
    # Only the tokio worker threads, which carry the data path; the agents' DNS and config
    # threads wake on timers of their own.
    tracers=()
    for p in $(agents "$tool"); do
        for t in /proc/$p/task/*; do
            [ "$(cat "$t/comm" 2>/dev/null)" = tokio-rt-worker ] || continue
            strace -c -p "${t##*/}" -o "$WORK/strace.$tool.${t##*/}" 2>/dev/null &
            tracers+=($!)
        done
    done
    sleep 1
    inp "$LOADGEN" pingpong --addr "${ADDR[$tool]}" --count "$STRACE_COUNT" --warmup 0 >/dev/null
    kill -INT "${tracers[@]}" 2>/dev/null
    wait "${tracers[@]}" 2>/dev/null
    # strace -c columns: % time, seconds, usecs/call, calls, [errors,] syscall.
    cat "$WORK"/strace."$tool".* | awk -v t="$tool" -v n="$STRACE_COUNT" '
        $4 ~ /^[0-9]+$/ && $NF ~ /^[a-z_0-9]+$/ && $NF != "total" { total += $4; by[$NF] += $4 }
        END { printf "| %s | %.1f | %.2f / %.2f |\n", t, total / n, by["recvmmsg"] / n, (by["epoll_wait"] + by["epoll_pwait"]) / n }'
done
