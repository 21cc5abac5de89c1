#!/usr/bin/env bash
# causeway benchmark: direct TCP, socat, stunnel (mTLS), ssh -L, rathole (if installed) and
# causeway, side by side, between two network namespaces on this machine.
#
#   sudo bash bench/run.sh
#
# Topology (nothing leaves these two namespaces):
#
#   cwb-paris (client side)                          cwb-london (server side)
#   lo 127.0.0.1 (tool listeners, VIPs)              lo 127.0.0.1, 10.1.0.1/32 ("pod")
#   wan0 10.201.0.2/24  ══════════ veth ══════════   wan0 10.201.0.1/24
#
# The servers (iperf3, loadgen echo-server) run in london on the pod address 10.1.0.1, which
# paris has no route to, so every tool needs a piece on each side. "direct" is the one
# exception: the same servers also listen on london's veth address 10.201.0.1 and the
# client connects there, with nothing in between.
#
# Knobs (environment): TOOLS="direct socat stunnel ssh rathole causeway", IPERF_SECONDS=10,
# PINGPONG_COUNT=20000, PINGPONG_WARMUP=1000, CONNRATE_SECONDS=5, CONNRATE_CONCURRENCY=32, IDLE_FLOWS=1000,
# IDLE_HOLD=3, CW_WORKERS=1 (tokio worker threads per causeway agent), CW_RESUME=true (links.resume), CW_LANES=auto (links.lanes), RATHOLE=/path/to/rathole (default: found on PATH or in /tmp/rathole/bin),
# PROFILE=1 (perf record, at PERF_FREQ=499 Hz, and per-thread CPU of the causeway agents during ping-pong, iperf3
# and the connection test, kept in bench/results/), QUIET_WAIT=60 (seconds to wait, at most, before
# each tool for other work on the machine to calm down), FOREIGN_MAX=10 and ATTEMPTS=2 (a
# tool is measured again if other processes took more than FOREIGN_MAX% of the machine
# meanwhile), ROUNDS=1 (measure every tool this many times, the tools taking turns; the report
# shows each figure's median over the rounds and the per-round values of the headline ones),
# CARGO_TARGET_DIR (honoured), SKIP_BUILD=1, SKIP_APT=1, KEEP_WORK=1 (keep the work directory, with
# every agent's log, in /tmp/cwb.*).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH=bench
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
NS_L=cwb-london
NS_P=cwb-paris

TOOLS=${TOOLS:-direct socat stunnel ssh rathole causeway}
IPERF_SECONDS=${IPERF_SECONDS:-10}
PINGPONG_COUNT=${PINGPONG_COUNT:-20000}
PINGPONG_WARMUP=${PINGPONG_WARMUP:-1000}
CONNRATE_SECONDS=${CONNRATE_SECONDS:-5}
CONNRATE_CONCURRENCY=${CONNRATE_CONCURRENCY:-32}
IDLE_FLOWS=${IDLE_FLOWS:-1000}
IDLE_HOLD=${IDLE_HOLD:-3}
QUIET_WAIT=${QUIET_WAIT:-60}
FOREIGN_MAX=${FOREIGN_MAX:-10}
ATTEMPTS=${ATTEMPTS:-2}
ROUNDS=${ROUNDS:-1}
CW_WORKERS=${CW_WORKERS:-1}
RESULTS_DIR=$HERE/results

[ "$(id -u)" = 0 ] || die "run as root (network namespaces): sudo bash bench/run.sh"

# ---------------------------------------------------------------- prerequisites and build
need_pkgs=()
for pair in iperf3:iperf3 socat:socat stunnel4:stunnel4 sshd:openssh-server ssh:openssh-client \
    openssl:openssl ip:iproute2 pgrep:procps chrt:util-linux; do
    cmd=${pair%%:*} pkg=${pair#*:}
    if [ "$cmd" = sshd ]; then
        [ -x /usr/sbin/sshd ] || need_pkgs+=("$pkg")
    elif ! command -v "$cmd" >/dev/null 2>&1; then
        need_pkgs+=("$pkg")
    fi
done
bench_install "${need_pkgs[@]}"

bench_build

# ---------------------------------------------------------------- cleanup
WORK=$(mktemp -d /tmp/cwb.XXXXXX)
PIDS=()


teardown() {
    local p
    bench_spin_stop
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    bench_netns_down $NS_P $NS_L
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    log "cleaning up"
    teardown
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# Left over from an interrupted run: those namespaces are ours by name.
for ns in $NS_P $NS_L; do
    if ip netns list | grep -qw "$ns"; then
        log "removing a stale namespace $ns"
        bench_netns_down "$ns"
    fi
done

# ---------------------------------------------------------------- namespaces
log "creating namespaces $NS_L and $NS_P"
bench_netns $NS_L $NS_P || die "cannot create the namespaces and their veth pair"
for ns in $NS_L $NS_P; do
    # Many short connections per second: more ephemeral ports, reuse of TIME_WAIT ports. The
    # range starts above the tools' listening ports (11000-14999): a client socket left on one
    # of those by an earlier connection test made `ssh -L` and stunnel fail to bind.
    ip netns exec "$ns" sysctl -q -w net.ipv4.ip_local_port_range="15000 65000" net.ipv4.tcp_tw_reuse=1
done
ulimit -n "$(ulimit -Hn)" || true

inl() { ip netns exec $NS_L "$@"; }
inp() { ip netns exec $NS_P "$@"; }

# ---------------------------------------------------------------- servers in london
# Two iperf3 servers (one test at a time each): the pod address for the tunnels, the veth
# address for direct. One echo server listens on both.
bg $NS_L iperf3 -s -B $POD -p $IPERF_PORT >"$WORK/iperf3-pod.log" 2>&1
bg $NS_L iperf3 -s -B $L_WAN -p $IPERF_PORT >"$WORK/iperf3-wan.log" 2>&1
bg $NS_L "$LOADGEN" echo-server --listen $POD:$ECHO_PORT --listen $L_WAN:$ECHO_PORT \
    --oneshot $POD:$ONESHOT_PORT --oneshot $L_WAN:$ONESHOT_PORT 2>"$WORK/echo-server.log"
sleep 0.5

# ---------------------------------------------------------------- helpers
# Succeeds once a 1-byte round trip works through ADDR (from paris), within SECS.
wait_path() {
    local addr=$1 secs=${2:-20} i
    for ((i = 0; i < secs * 5; i++)); do
        inp timeout 3 "$LOADGEN" pingpong --addr "$addr" --count 1 --warmup 0 >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# jget KEY < one-line JSON: the value of a number or string field.
jget() { sed -n "s/.*\"$1\":\"\{0,1\}\([^,\"}]*\).*/\1/p" | head -1; }

# The given pids and all their descendants (one ps, so it is quick with 2,000 processes).
tree() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do {
                changed = 0
                for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
            } while (changed)
            for (p in keep) if (p in parent) print p
        }'
}

# /proc/PID/FILE of the given pids and their descendants, concatenated (vanished ones skipped).
proc_cat() {
    local file=$1 p
    shift
    for p in $(tree "$@"); do echo "/proc/$p/$file"; done | xargs -r cat 2>/dev/null
}

# Sum of a memory field (kB) over the process trees: VmRSS from status, Pss from smaps_rollup.
rss() { proc_cat status "$@" | awk '$1 == "VmRSS:" { s += $2 } END { print s + 0 }'; }
pss() { proc_cat smaps_rollup "$@" | awk '$1 == "Pss:" { s += $2 } END { print s + 0 }'; }

# CPU ticks (user+system, including reaped children) over the process trees of the pids.
cpu_ticks() { proc_cat stat "$@" | awk '{ sub(/.*\) /, ""); s += $12 + $13 + $14 + $15 } END { print s + 0 }'; }
CLK_TCK=$(getconf CLK_TCK)

# "InDatagrams RcvbufErrors SndbufErrors" of a namespace, and the difference of two of those.
udp_counters() { ip netns exec "$1" nstat -asz 2>/dev/null | awk '$1 == "UdpInDatagrams" {a = $2} $1 == "UdpRcvbufErrors" {b = $2} $1 == "UdpSndbufErrors" {c = $2} END {print a + 0, b + 0, c + 0}'; }
udp_delta() { awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " "); printf "%d datagrams in, %d receive-buffer drops, %d send-buffer drops", y[1] - x[1], y[2] - x[2], y[3] - x[3]}'; }

# PROFILE=1: per-thread CPU (top -H) and a perf profile of both causeway agents while a
# measurement of SECS seconds runs, into bench/results/causeway-PHASE-{threads.txt,perf.data}.
PROF=()
profile_start() {
    local phase=$1 secs=$2
    [ "${PROFILE:-0}" = 1 ] || return 0
    mkdir -p "$RESULTS_DIR"
    top -H -b -d 1 -n $((secs > 2 ? secs - 1 : 1)) -p "$CW_LONDON_PID,$CW_PARIS_PID" \
        >"$RESULTS_DIR/causeway-$phase-threads.txt" 2>&1 &
    PROF+=($!)
    if command -v perf >/dev/null; then
        perf record -F "${PERF_FREQ:-499}" -g -p "$CW_LONDON_PID,$CW_PARIS_PID" -o "$RESULTS_DIR/causeway-$phase-perf.data" \
            -- sleep $((secs > 2 ? secs - 1 : 1)) >/dev/null 2>"$RESULTS_DIR/causeway-$phase-perf.log" &
        PROF+=($!)
    fi
}
profile_wait() {
    [ ${#PROF[@]} -gt 0 ] && wait "${PROF[@]}"
    PROF=()
}


RAW=$WORK/raw.txt
: >"$RAW"
declare -A R

# measure TOOL IPERF_HOST IPERF_PORT ECHO_ADDR ONESHOT_ADDR -- PIDS...
# PIDS: the tool's processes on both sides (empty for direct).
measure() {
    local tool=$1 ihost=$2 iport=$3 echo_addr=$4 oneshot_addr=$5
    shift 6
    local pids=("$@") out t0 t1 c0 c1

    if ! wait_path "$echo_addr" 20; then
        log "$tool: no round trip through $echo_addr; skipping"
        R[$tool,status]="failed: no path through $echo_addr"
        return 1
    fi
    R[$tool,status]=ok

    # Idle flows first, on processes that have carried only the probe connections above
    # (again at the end, after traffic, when the allocators hold freed memory).
    idle_phase "$tool" "$echo_addr" fresh "${pids[@]}"

    log "$tool: ping-pong latency ($PINGPONG_COUNT round trips, CPUs kept awake, then idle)"
    bench_spin_start
    [ "$tool" = causeway ] && profile_start pingpong 4
    c0=$(cpu_ticks "${pids[@]}")
    out=$(inp timeout 120 "$LOADGEN" pingpong --addr "$echo_addr" --count "$PINGPONG_COUNT" \
        --warmup "$PINGPONG_WARMUP" 2>&1)
    c1=$(cpu_ticks "${pids[@]}")
    [ "$tool" = causeway ] && profile_wait
    # CPU time of the tool (both sides) per round trip, warm-up included: what the tool's
    # own work adds to every request and response.
    R[$tool,rt_cpu_us]=$(awk -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v n="$((PINGPONG_COUNT + PINGPONG_WARMUP))" \
        'BEGIN {if (n > 0 && c > 0) printf "%.0f", 1e6 * c / hz / n}')
    bench_spin_stop
    echo "$tool pingpong (CPUs kept awake): $out" >>"$RAW"
    R[$tool,p50]=$(jget median_us <<<"$out")
    R[$tool,p99]=$(jget p99_us <<<"$out")
    out=$(inp timeout 120 "$LOADGEN" pingpong --addr "$echo_addr" --count "$PINGPONG_COUNT" 2>&1)
    echo "$tool pingpong (CPUs idle between round trips): $out" >>"$RAW"
    R[$tool,idle_p50]=$(jget median_us <<<"$out")
    R[$tool,idle_p99]=$(jget p99_us <<<"$out")

    log "$tool: connections per second (${CONNRATE_SECONDS}s, concurrency $CONNRATE_CONCURRENCY)"
    local udp0_l udp0_p
    if [ "$tool" = causeway ]; then
        udp0_l=$(udp_counters $NS_L)
        udp0_p=$(udp_counters $NS_P)
        profile_start connrate "$CONNRATE_SECONDS"
    fi
    c0=$(cpu_ticks "${pids[@]}")
    out=$(inp timeout $((CONNRATE_SECONDS + 60)) "$LOADGEN" connrate --addr "$oneshot_addr" \
        --seconds "$CONNRATE_SECONDS" --concurrency "$CONNRATE_CONCURRENCY" 2>&1)
    c1=$(cpu_ticks "${pids[@]}")
    echo "$tool connrate: $out" >>"$RAW"
    R[$tool,cps]=$(jget per_sec <<<"$out")
    R[$tool,cps_failed]=$(jget failed <<<"$out")
    # CPU time of the tool (both sides) per connection: what a connection costs the tool
    # itself, whatever the client and servers leave it of the two CPUs.
    R[$tool,cps_cpu_us]=$(awk -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v n="$(jget connections <<<"$out")" \
        'BEGIN {if (n > 0 && c > 0) printf "%.0f", 1e6 * c / hz / n}')
    if [ "$tool" = causeway ]; then
        # Datagrams per connection, both ways: what each flow's opening and closing costs in
        # packets (every one encrypted, sent and received by an agent).
        echo "causeway connrate: UDP counters in london $(udp_delta "$udp0_l" "$(udp_counters $NS_L)")," \
            "in paris $(udp_delta "$udp0_p" "$(udp_counters $NS_P)"), $(jget connections <<<"$out") connections" >>"$RAW"
        profile_wait
    fi

    log "$tool: iperf3 single stream, ${IPERF_SECONDS}s"
    if [ "$tool" = causeway ]; then
        udp0_l=$(udp_counters $NS_L)
        udp0_p=$(udp_counters $NS_P)
        profile_start iperf3 "$IPERF_SECONDS"
    fi
    t0=$(date +%s.%N)
    c0=$(cpu_ticks "${pids[@]}")
    inp timeout $((IPERF_SECONDS + 30)) iperf3 -c "$ihost" -p "$iport" -t "$IPERF_SECONDS" -P 1 -J \
        --connect-timeout 5000 >"$WORK/$tool.iperf.json" 2>&1
    c1=$(cpu_ticks "${pids[@]}")
    t1=$(date +%s.%N)
    R[$tool,gbps]=$(awk '/"sum_received"/ {s = 1} s && /"bits_per_second"/ {gsub(/,/, ""); printf "%.2f", $2 / 1e9; exit}' \
        "$WORK/$tool.iperf.json")
    R[$tool,retr]=$(awk '/"sum_sent"/ {s = 1} s && /"retransmits"/ {gsub(/,/, ""); print $2; exit}' "$WORK/$tool.iperf.json")
    R[$tool,cpu]=$(awk -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", 100 * c / hz / (b - a)}')
    if [ "$tool" = causeway ]; then
        echo "causeway iperf3: UDP counters in london $(udp_delta "$udp0_l" "$(udp_counters $NS_L)")," \
            "in paris $(udp_delta "$udp0_p" "$(udp_counters $NS_P)")" >>"$RAW"
        profile_wait
    fi
    echo "$tool iperf3: ${R[$tool,gbps]} Gbit/s receiver, retransmits ${R[$tool,retr]}, tool cpu ${R[$tool,cpu]}%" >>"$RAW"
    [ -n "${R[$tool,gbps]}" ] || grep -m3 -i error "$WORK/$tool.iperf.json" >>"$RAW"
    idle_phase "$tool" "$echo_addr" after "${pids[@]}"
    return 0
}

# idle_phase TOOL ECHO_ADDR KEY PIDS...: IDLE_FLOWS flows held IDLE_HOLD seconds; the memory of
# the tool's processes before and while holding them, into R[TOOL,KEY,...].
idle_phase() {
    local tool=$1 echo_addr=$2 key=$3
    shift 3
    local pids=("$@") out cw_london0 cw_paris0 before_pss before_rss during_pss during_rss idle_pid
    local ready=$WORK/$tool.$key.ready waited=0
    log "$tool: $IDLE_FLOWS idle flows held ${IDLE_HOLD}s ($key)"
    before_pss=$(pss "${pids[@]}")
    before_rss=$(rss "${pids[@]}")
    if [ "$tool" = causeway ]; then
        cw_london0=$(rss "$CW_LONDON_PID")
        cw_paris0=$(rss "$CW_PARIS_PID")
    fi
    inp timeout $((IDLE_HOLD + 90)) "$LOADGEN" idle --addr "$echo_addr" --flows "$IDLE_FLOWS" --hold "$IDLE_HOLD" \
        --ready-file "$ready" >"$WORK/$tool.$key.idle.json" 2>"$WORK/$tool.$key.idle.err" &
    idle_pid=$!
    while [ ! -s "$ready" ] && kill -0 $idle_pid 2>/dev/null && [ $waited -lt 600 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if [ -s "$ready" ]; then
        sleep 0.5
        during_pss=$(pss "${pids[@]}")
        during_rss=$(rss "${pids[@]}")
        R[$tool,$key,open]=$(cat "$ready")
        R[$tool,$key,pss_kib]=$(per_flow "$before_pss" "$during_pss")
        R[$tool,$key,rss_kib]=$(per_flow "$before_rss" "$during_rss")
        echo "$tool memory $key (KiB, processes ${pids[*]:-none} and children): PSS $before_pss -> $during_pss," \
            "VmRSS $before_rss -> $during_rss" >>"$RAW"
        if [ "$tool" = causeway ]; then
            R[causeway,$key,london_before]=$cw_london0
            R[causeway,$key,paris_before]=$cw_paris0
            R[causeway,$key,london_during]=$(rss "$CW_LONDON_PID")
            R[causeway,$key,paris_during]=$(rss "$CW_PARIS_PID")
        fi
    fi
    wait $idle_pid
    out=$(cat "$WORK/$tool.$key.idle.json")
    echo "$tool idle $key: $out $(head -c 300 "$WORK/$tool.$key.idle.err")" >>"$RAW"
    R[$tool,$key,alive]=$(jget alive_after_hold <<<"$out")
}
per_flow() { awk -v a="$1" -v b="$2" -v n="$IDLE_FLOWS" 'BEGIN {printf "%.1f", (b - a) / n}'; }

# ---------------------------------------------------------------- the tools
ran=()
run_direct() {
    measure direct $L_WAN $IPERF_PORT $L_WAN:$ECHO_PORT $L_WAN:$ONESHOT_PORT --
}

# Two relays, the shape of the tunnels: paris listens locally and relays to a socat in
# london, which relays to the pod. socat forks one process per connection on each side.
run_socat() {
    local pids=() i base=11000 ports=($IPERF_PORT $ECHO_PORT $ONESHOT_PORT)
    for i in 0 1 2; do
        bg $NS_L socat TCP-LISTEN:$((base + 11 + i)),bind=$L_WAN,fork,reuseaddr,backlog=1024,nodelay TCP:$POD:${ports[$i]},nodelay 2>>"$WORK/socat.log"
        pids+=("$LAST_PID")
        bg $NS_P socat TCP-LISTEN:$((base + 1 + i)),bind=127.0.0.1,fork,reuseaddr,backlog=1024,nodelay TCP:$L_WAN:$((base + 11 + i)),nodelay 2>>"$WORK/socat.log"
        pids+=("$LAST_PID")
    done
    measure socat 127.0.0.1 $((base + 1)) 127.0.0.1:$((base + 2)) 127.0.0.1:$((base + 3)) -- "${pids[@]}"
    kill "${pids[@]}" 2>/dev/null
}

# stunnel: server in london (verify = 2: a client certificate signed by the CA is required),
# client in paris (verifies london's certificate against the same CA). Default TLS settings.
run_stunnel() {
    local d=$WORK/stunnel base=12000 i names=(iperf echo oneshot) ports=($IPERF_PORT $ECHO_PORT $ONESHOT_PORT) pids=()
    rm -rf "$d" && mkdir -p "$d"
    (
        cd "$d" || exit 1
        openssl ecparam -genkey -name prime256v1 -noout -out ca.key 2>/dev/null &&
            openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.crt 2>/dev/null &&
            for who in london paris; do
                openssl ecparam -genkey -name prime256v1 -noout -out $who.key 2>/dev/null &&
                    openssl req -new -key $who.key -subj /CN=$who -out $who.csr 2>/dev/null &&
                    printf 'subjectAltName=DNS:%s,IP:%s\n' $who $L_WAN >$who.ext &&
                    openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                        -extfile $who.ext -out $who.crt 2>/dev/null || exit 1
            done
    ) || {
        R[stunnel,status]="failed: openssl"
        return 1
    }
    {
        printf 'foreground = yes\npid =\ndebug = 3\ncert = %s/london.crt\nkey = %s/london.key\nCAfile = %s/ca.crt\nverify = 2\n' "$d" "$d" "$d"
        for i in 0 1 2; do
            printf '[%s]\naccept = %s:%d\nconnect = %s:%d\n' "${names[$i]}" $L_WAN $((base + 11 + i)) $POD "${ports[$i]}"
        done
    } >"$d/london.conf"
    {
        printf 'foreground = yes\npid =\ndebug = 3\nclient = yes\ncert = %s/paris.crt\nkey = %s/paris.key\nCAfile = %s/ca.crt\nverify = 2\n' "$d" "$d" "$d"
        for i in 0 1 2; do
            printf '[%s]\naccept = 127.0.0.1:%d\nconnect = %s:%d\n' "${names[$i]}" $((base + 1 + i)) $L_WAN $((base + 11 + i))
        done
    } >"$d/paris.conf"
    bg $NS_L stunnel4 "$d/london.conf" 2>"$d/london.log"
    pids+=("$LAST_PID")
    bg $NS_P stunnel4 "$d/paris.conf" 2>"$d/paris.log"
    pids+=("$LAST_PID")
    measure stunnel 127.0.0.1 $((base + 1)) 127.0.0.1:$((base + 2)) 127.0.0.1:$((base + 3)) -- "${pids[@]}" ||
        tail -n 5 "$d"/*.log >>"$RAW"
    kill "${pids[@]}" 2>/dev/null
}

# ssh -L: sshd in london on 10.201.0.1:2222 (public-key login only), one ssh client in paris
# with three -L forwards to the pod, cipher aes128-gcm@openssh.com, no compression.
run_ssh() {
    local d=$WORK/ssh base=13000 pids=()
    rm -rf "$d" && mkdir -p "$d" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$d/host" && ssh-keygen -q -t ed25519 -N '' -f "$d/id" || {
        R[ssh,status]="failed: ssh-keygen"
        return 1
    }
    cp "$d/id.pub" "$d/authorized_keys"
    cat >"$d/sshd_config" <<EOF
Port 2222
ListenAddress $L_WAN
HostKey $d/host
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
AllowTcpForwarding yes
Ciphers aes128-gcm@openssh.com
MaxStartups 100
LogLevel ERROR
EOF
    bg $NS_L /usr/sbin/sshd -D -e -f "$d/sshd_config" 2>"$d/sshd.log"
    pids+=("$LAST_PID")
    sleep 0.5
    bg $NS_P ssh -N -F /dev/null -i "$d/id" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o Ciphers=aes128-gcm@openssh.com -o Compression=no \
        -o ExitOnForwardFailure=yes -p 2222 \
        -L 127.0.0.1:$((base + 1)):$POD:$IPERF_PORT -L 127.0.0.1:$((base + 2)):$POD:$ECHO_PORT \
        -L 127.0.0.1:$((base + 3)):$POD:$ONESHOT_PORT root@$L_WAN 2>"$d/ssh.log"
    pids+=("$LAST_PID")
    measure ssh 127.0.0.1 $((base + 1)) 127.0.0.1:$((base + 2)) 127.0.0.1:$((base + 3)) -- "${pids[@]}" ||
        tail -n 5 "$d"/*.log >>"$RAW"
    kill "${pids[@]}" 2>/dev/null
}

# rathole (if a binary is available): its server is where visitors connect, so it runs in
# paris (control channel on 10.201.0.2:2333); its client runs in london next to the pod and
# dials paris. Noise transport (Noise_NK_25519_ChaChaPoly_BLAKE2s), keys from --genkey.
run_rathole() {
    local d=$WORK/rathole base=14000 pids=()
    if [ ! -x "$RATHOLE" ]; then
        log "rathole: no binary ($RATHOLE); skipping"
        R[rathole,status]="not run: no rathole binary"
        return 1
    fi
    rm -rf "$d" && mkdir -p "$d"
    bench_rathole_config "$d" $base || {
        R[rathole,status]="failed: rathole --genkey"
        return 1
    }
    bg $NS_P env RUST_LOG=error "$RATHOLE" --server "$d/paris.toml" 2>"$d/paris.log" >&2
    pids+=("$LAST_PID")
    sleep 0.3
    bg $NS_L env RUST_LOG=error "$RATHOLE" --client "$d/london.toml" 2>"$d/london.log" >&2
    pids+=("$LAST_PID")
    measure rathole 127.0.0.1 $((base + 1)) 127.0.0.1:$((base + 2)) 127.0.0.1:$((base + 3)) -- "${pids[@]}" ||
        tail -n 5 "$d"/*.log >>"$RAW"
    kill "${pids[@]}" 2>/dev/null
}

# causeway: london exports the pod's ports, paris redeems london's token and forwards its
# VIP (VIP port = exported port) over the QUIC link.
run_causeway() {
    local d=$WORK/causeway vip="" site
    rm -rf "$d" && mkdir -p "$d"
    for site in london paris; do
        "$CAUSEWAY" --state "$d/$site" init --site $site >/dev/null 2>"$d/init.log" || {
            R[causeway,status]="failed: init"
            return 1
        }
        bench_site_config "$d/$site" $site "$L_WAN:7400"
    done
    # Both agents, the client and the servers share this machine's CPUs: one runtime worker
    # per agent (CW_WORKERS, default 1; tokio's TOKIO_WORKER_THREADS, which defaults to one
    # per CPU) avoids cross-thread wake-ups that buy nothing when every CPU is already busy.
    bg $NS_L env RUST_LOG=warn TOKIO_WORKER_THREADS="$CW_WORKERS" "$CAUSEWAY" --state "$d/london" run 2>"$d/london.log"
    CW_LONDON_PID=$LAST_PID
    bg $NS_P env RUST_LOG=warn TOKIO_WORKER_THREADS="$CW_WORKERS" "$CAUSEWAY" --state "$d/paris" run 2>"$d/paris.log"
    CW_PARIS_PID=$LAST_PID
    bench_link "$d" 50 || {
        R[causeway,status]="failed: token redeem"
        tail -n 5 "$d"/*.log >>"$RAW"
        return 1
    }
    cat "$d/link.log" >>"$RAW"
    local t_link=$(date +%s.%N)
    vip=$(bench_first_vip "$d/paris" 150 0.1)
    echo "causeway: VIP known in paris $(awk -v a="$t_link" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s after the redemption" >>"$RAW"
    if [ -z "$vip" ]; then
        R[causeway,status]="failed: no VIP for bench in paris"
        { "$CAUSEWAY" --state "$d/paris" service list -o json; "$CAUSEWAY" --state "$d/paris" service list; "$CAUSEWAY" --state "$d/paris" link list; tail -n 5 "$d"/*.log; } >>"$RAW" 2>&1
        return 1
    fi
    log "causeway: VIP $vip"
    echo "causeway VIP: $vip" >>"$RAW"
    measure causeway "$vip" $IPERF_PORT "$vip:$ECHO_PORT" "$vip:$ONESHOT_PORT" -- "$CW_LONDON_PID" "$CW_PARIS_PID" ||
        tail -n 5 "$d"/*.log >>"$RAW"
    kill "$CW_LONDON_PID" "$CW_PARIS_PID" 2>/dev/null
    wait "$CW_LONDON_PID" "$CW_PARIS_PID" 2>/dev/null
}

# Percentage of all CPUs busy over one second (anything on the machine, ours included).
busy_pct() {
    local a b
    a=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit}' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {split(a, x, " "); split(b, y, " "); t = (y[1] - x[1]) + (y[2] - x[2]); printf "%.0f", t ? 100 * (y[1] - x[1]) / t : 0}'
}

# Other work on the machine (builds, tests) skews every number. Before each tool, wait (at
# most QUIET_WAIT s) until the machine is under 15% busy; while the tool is measured, count
# the CPU time of every other user process (outside our namespaces and this script); if it
# took more than FOREIGN_MAX% of the machine, measure the tool again (ATTEMPTS in all).
wait_quiet() {
    local busy waited=0
    busy=$(busy_pct)
    while [ "$busy" -gt 15 ] && [ $waited -lt "$QUIET_WAIT" ]; do
        [ $waited = 0 ] && log "the machine is ${busy}% busy with other work; waiting up to ${QUIET_WAIT}s for it to calm down"
        sleep 4
        waited=$((waited + 5))
        busy=$(busy_pct)
    done
    [ "$busy" -gt 15 ] && log "WARNING: the machine is ${busy}% busy with other work; measuring anyway"
    echo "$busy"
}

HOST_NET_INODE=$(readlink /proc/$$/ns/net | tr -dc 0-9)
# "pid ticks" for every user process in the host's network namespace outside this script.
foreign_snapshot() {
    local ours
    ours=" $(tree $$ | tr '\n' ' ') "
    find /proc/[0-9]*/ns/net -maxdepth 0 -lname "net:?$HOST_NET_INODE?" 2>/dev/null | cut -d/ -f3 |
        while read -r p; do
            case "$ours" in *" $p "*) continue ;; esac
            echo "/proc/$p/stat"
        done | xargs -r cat 2>/dev/null |
        awk '{ pid = $1; sub(/.*\) /, ""); if (pid != 2 && $2 != 2) print pid, $12 + $13 }'
}
# foreign_pct BEFORE AFTER SECONDS: their CPU time in between, in % of all CPUs.
foreign_pct() {
    awk -v secs="$3" -v hz="$CLK_TCK" -v n="$(nproc)" 'NR == FNR { s[$1] = $2; next }
        { d = $2 - (($1 in s) ? s[$1] : 0); if (d > 0) t += d }
        END { printf "%.0f", (secs > 0) ? (100 * t / hz / secs / n) : 0 }' "$1" "$2"
}

# Each round's figures of one tool, kept as RR[round|key] for the medians below.
declare -A RR
# keep_round ROUND TOOL: copy the tool's figures out of R, then clear them for the next round.
keep_round() {
    local key
    for key in "${!R[@]}"; do
        case $key in "$2",*) RR["$1|$key"]=${R[$key]} && unset "R[$key]" ;; esac
    done
}
# median_rounds: put back into R each figure's median over the rounds in which it was
# measured (numbers only; for anything else, the last round's value).
median_rounds() {
    local key r v vals
    declare -A seen
    for key in "${!RR[@]}"; do seen[${key#*|}]=1; done
    for key in "${!seen[@]}"; do
        vals=()
        for r in $(seq "$ROUNDS"); do
            v=${RR["$r|$key"]:-}
            [ -n "$v" ] && vals+=("$v")
        done
        [ ${#vals[@]} -gt 0 ] || continue
        if printf '%s\n' "${vals[@]}" | grep -qvE '^-?[0-9]+(\.[0-9]+)?$'; then
            R[$key]=${vals[-1]}
        else
            R[$key]=$(printf '%s\n' "${vals[@]}" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
        fi
    done
}

START=$(date +%s)
for tool in $TOOLS; do
    case $tool in
    direct | socat | stunnel | ssh | rathole | causeway) ;;
    *) die "unknown tool $tool" ;;
    esac
done
for round in $(seq "$ROUNDS"); do
for tool in $TOOLS; do
    [ "$ROUNDS" -gt 1 ] && echo "round $round of $ROUNDS" >>"$RAW"
    for attempt in $(seq "$ATTEMPTS"); do
        b=$(wait_quiet)
        log "=== $tool (round $round of $ROUNDS, attempt $attempt; machine ${b}% busy just before)"
        echo "$tool: attempt $attempt, machine ${b}% busy (1 s sample) before starting" >>"$RAW"
        foreign_snapshot >"$WORK/foreign.0"
        t0=$(date +%s.%N)
        "run_$tool"
        foreign_snapshot >"$WORK/foreign.1"
        R[$tool,foreign]=$(foreign_pct "$WORK/foreign.0" "$WORK/foreign.1" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')")
        R[$tool,attempts]=$attempt
        echo "$tool: other processes used ${R[$tool,foreign]}% of the machine during attempt $attempt" >>"$RAW"
        [ "${R[$tool,foreign]}" -le "$FOREIGN_MAX" ] && break
        [ "$attempt" -lt "$ATTEMPTS" ] &&
            log "$tool: other processes used ${R[$tool,foreign]}% of the machine meanwhile; measuring $tool again"
    done
    [ "$round" = 1 ] && ran+=("$tool")
    keep_round "$round" "$tool"
    sleep 1
done
done
median_rounds

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f×", a / b }'; }
num() { awk -v a="$1" -v f="$2" 'BEGIN { if (a == "") print "-"; else printf f, a }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "-"; else printf "%+.0f", a - b }'; }

report() {
    local t
    echo "# causeway benchmark: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)," \
        "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)."
    echo "causeway $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "(not a git checkout)"), built with" \
        "$(rustc --version 2>/dev/null || echo "an unknown rustc"); $(iperf3 --version | head -n 1 | cut -d' ' -f1-2)," \
        "$(socat -V | sed -n 's/^socat version \([^ ]*\).*/socat \1/p'), $(stunnel4 -version 2>&1 | awk '/^stunnel/ {print $1, $2; exit}')," \
        "$(ssh -V 2>&1 | cut -d, -f1)$([ -x "$RATHOLE" ] && echo ", rathole $("$RATHOLE" --version 2>/dev/null | awk '/Build Version/ {print $3}')")."
    echo "Two network namespaces joined by a veth pair; every tool's two pieces, the servers and the clients share these CPUs" \
        "(causeway agents with TOKIO_WORKER_THREADS=$CW_WORKERS)."
    echo "iperf3 ${IPERF_SECONDS}s single stream (receiver); ping-pong ${PINGPONG_COUNT} 1-byte round trips on one connection;" \
        "connections ${CONNRATE_SECONDS}s at concurrency ${CONNRATE_CONCURRENCY}, each with a 1-byte round trip;" \
        "${IDLE_FLOWS} idle flows held ${IDLE_HOLD}s."
    echo
    echo "| tool | Gbit/s | × direct | tool CPU % | CPU % per Gbit/s | RTT median µs | RTT p99 µs | added RTT µs | conn/s | × direct | KiB per idle flow, fresh / after traffic | other load % |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    local d=direct
    for t in "${ran[@]}"; do
        if [ "${R[$t,status]:-}" != ok ]; then
            echo "| $t | ${R[$t,status]:-not run} | | | | | | | | | | |"
            continue
        fi
        local mem="-" cpu="-" per="-"
        if [ $t != direct ]; then
            mem="$(num "${R[$t,fresh,pss_kib]:-}" "%.1f") / $(num "${R[$t,after,pss_kib]:-}" "%.1f")"
            cpu=$(num "${R[$t,cpu]:-}" "%.0f")
            per=$(awk -v c="${R[$t,cpu]:-}" -v g="${R[$t,gbps]:-}" 'BEGIN { if (c == "" || g + 0 == 0) print "-"; else printf "%.0f", c / g }')
        fi
        echo "| $t | $(num "${R[$t,gbps]:-}" "%.2f") | $(ratio "${R[$t,gbps]:-}" "${R[$d,gbps]:-}") | $cpu | $per" \
            "| $(num "${R[$t,p50]:-}" "%.0f") | $(num "${R[$t,p99]:-}" "%.0f") | $(added "${R[$t,p50]:-}" "${R[$d,p50]:-}")" \
            "| $(num "${R[$t,cps]:-}" "%.0f") | $(ratio "${R[$t,cps]:-}" "${R[$d,cps]:-}") | $mem | ${R[$t,foreign]:--} |"
    done
    echo
    echo "Columns: Gbit/s is iperf3's receiver rate; tool CPU % is the CPU time of the tool's processes on both sides" \
        "(all threads and children; 200% = both CPUs) during iperf3; RTT is a 1-byte ping-pong with the CPUs kept" \
        "awake (see below), added RTT is the tool's median minus direct's; conn/s counts connections that each did a" \
        "1-byte round trip; KiB per idle flow is the growth of the PSS of all the tool's processes, both sides," \
        "divided by the number of flows, measured first on freshly started processes and again after all the other" \
        "tests (allocators then hold freed memory); other load is the CPU time of every other process on the" \
        "machine while the tool was measured, in % of both CPUs (above ${FOREIGN_MAX}%, the tool was measured again)."
    echo
    if [ "$ROUNDS" -gt 1 ]; then
        echo "Every figure above is the median of $ROUNDS rounds (the tools took turns). Per round, Gbit/s; added RTT µs; conn/s:"
        echo
        for t in "${ran[@]}"; do
            local r line=""
            for r in $(seq "$ROUNDS"); do
                line+="$(num "${RR["$r|$t,gbps"]:-}" "%.2f"); $(added "${RR["$r|$t,p50"]:-}" "${RR["$r|direct,p50"]:-}"); $(num "${RR["$r|$t,cps"]:-}" "%.0f") · "
            done
            echo "- $t: ${line% · }"
        done
        echo
    fi
    echo "RTT median / p99 µs with the CPUs left idle between round trips (vCPU wake-up dominates):" \
        "$(for t in "${ran[@]}"; do [ -n "${R[$t,idle_p50]:-}" ] && printf '%s %s / %s, ' "$t" "$(num "${R[$t,idle_p50]}" "%.0f")" "$(num "${R[$t,idle_p99]:-}" "%.0f")"; done | sed 's/, $//')."
    echo
    if [ "${R[causeway,status]:-}" = ok ] && [ -n "${R[causeway,fresh,london_during]:-}" ]; then
        echo "causeway agents, VmRSS holding ${IDLE_FLOWS} idle flows:"
        echo
        echo "| agent | when | VmRSS before KiB | VmRSS holding KiB | KiB per idle flow |"
        echo "|---|---|---|---|---|"
        for key in fresh after; do
            for site in london paris; do
                [ -n "${R[causeway,$key,${site}_during]:-}" ] || continue
                echo "| $site | $key | ${R[causeway,$key,${site}_before]} | ${R[causeway,$key,${site}_during]} |" \
                    "$(per_flow "${R[causeway,$key,${site}_before]}" "${R[causeway,$key,${site}_during]}") |"
            done
        done
        echo
    fi
    echo "Idle flows, VmRSS sum instead of PSS (counts shared pages again in every process), fresh / after:" \
        "$(for t in "${ran[@]}"; do [ "$t" != direct ] && printf '%s %s / %s KiB, ' "$t" "${R[$t,fresh,rss_kib]:--}" "${R[$t,after,rss_kib]:--}"; done | sed 's/, $//')."
    echo "Flows alive after the hold, fresh / after: $(for t in "${ran[@]}"; do printf '%s %s / %s, ' "$t" "${R[$t,fresh,alive]:--}" "${R[$t,after,alive]:--}"; done | sed 's/, $//') (of $IDLE_FLOWS)."
    echo "Tool CPU time per round trip during ping-pong with the CPUs kept awake (both sides, µs): $(for t in "${ran[@]}"; do [ "$t" = direct ] || printf '%s %s, ' "$t" "${R[$t,rt_cpu_us]:--}"; done | sed 's/, $//')."
    echo "Tool CPU time per connection during conn/s (both sides, µs): $(for t in "${ran[@]}"; do [ "$t" = direct ] || printf '%s %s, ' "$t" "${R[$t,cps_cpu_us]:--}"; done | sed 's/, $//')."
    echo "Failed connections during conn/s: $(for t in "${ran[@]}"; do printf '%s %s, ' "$t" "${R[$t,cps_failed]:--}"; done | sed 's/, $//')."
    echo "iperf3 retransmits (sender): $(for t in "${ran[@]}"; do printf '%s %s, ' "$t" "${R[$t,retr]:--}"; done | sed 's/, $//')."
    echo "Other processes on the machine while each tool was measured (% of all CPUs; attempts):" \
        "$(for t in "${ran[@]}"; do printf '%s %s%% (%s), ' "$t" "${R[$t,foreign]:--}" "${R[$t,attempts]:--}"; done | sed 's/, $//')."
    echo "Run time: $(($(date +%s) - START)) s."
    echo
    echo "## Raw"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
}

mkdir -p "$RESULTS_DIR"
report >"$RESULTS_DIR/latest.md"
echo
sed '/^## Raw/,$d' "$RESULTS_DIR/latest.md"
log "written to $RESULTS_DIR/latest.md"
