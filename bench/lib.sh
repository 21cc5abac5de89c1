# Shared by the bench scripts (sourced, not run): progress messages, the build, and the
# two-site topology they all measure. A script sets BENCH (its name in messages) and ROOT
# (the repository) before sourcing this.

# log MESSAGE, die MESSAGE: progress and fatal errors on stderr.
log() { printf '[%s %s] %s\n' "$BENCH" "$(date +%T)" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}

# bench_install PKG...: installs the Debian packages given (those found missing) with
# apt-get, updating the lists once if the first try fails; dies if that fails, or at once when
# SKIP_APT=1.
bench_install() {
    [ $# -gt 0 ] || return 0
    [ "${SKIP_APT:-0}" = 1 ] && die "missing packages: $*"
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; } ||
        die "apt-get install $* failed"
}

# bg NS CMD...: CMD in the background inside namespace NS, its pid appended to the caller's
# PIDS array and put in LAST_PID. `ip netns exec` execs CMD, so the pid is CMD's own (and
# `env VAR=x CMD` execs CMD too).
bg() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@" &
    PIDS+=($!)
    LAST_PID=$!
}

# bench_build: builds causeway and examples/loadgen (release, --locked) unless SKIP_BUILD is
# set, and sets CAUSEWAY and LOADGEN to them unless those are set already. Honours
# CARGO_TARGET_DIR.
bench_build() {
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    if [ -z "${SKIP_BUILD:-}" ] || [ "$SKIP_BUILD" = 0 ]; then
        log "building release binaries (target dir $target)"
        (cd "$ROOT" && CARGO_TARGET_DIR=$target cargo build --release --quiet --locked --bin causeway --example loadgen) ||
            die "cargo build failed"
    fi
    CAUSEWAY=${CAUSEWAY:-$target/release/causeway}
    LOADGEN=${LOADGEN:-$target/release/examples/loadgen}
    [ -x "$CAUSEWAY" ] && [ -x "$LOADGEN" ] || die "missing $CAUSEWAY or $LOADGEN"
}

# London's and paris's ends of the veth, and london's "pod" address, which paris has no route
# to: the servers listen there and every tool has to carry the traffic.
L_WAN=10.201.0.1
P_WAN=10.201.0.2
POD=10.1.0.1
# The servers' ports on POD: iperf3, the echo server, the answer-once server.
IPERF_PORT=5201
ECHO_PORT=7007
ONESHOT_PORT=7008

# bench_netns NS_L NS_P: creates the two namespaces and joins them with a veth (wan0 on both
# sides), with POD on london's loopback. Fails at the first step that fails.
bench_netns() {
    local l=$1 p=$2
    ip netns add "$l" && ip netns add "$p" &&
        ip -n "$l" link set lo up && ip -n "$p" link set lo up &&
        ip -n "$l" link add wan0 type veth peer name wan0 netns "$p" &&
        ip -n "$l" addr add $L_WAN/24 dev wan0 && ip -n "$p" addr add $P_WAN/24 dev wan0 &&
        ip -n "$l" addr add $POD/32 dev lo &&
        ip -n "$l" link set wan0 up && ip -n "$p" link set wan0 up
}

# bench_first_vip STATE_DIR TRIES PAUSE: polls `service list` of the agent at STATE_DIR (with
# $CAUSEWAY) up to TRIES times, PAUSE seconds apart, and prints the first VIP it lists (the
# bench exports one service with one endpoint). Prints nothing if none appears.
bench_first_vip() {
    local dir=$1 tries=$2 pause=$3 vip="" i
    for ((i = 0; i < tries; i++)); do
        vip=$("$CAUSEWAY" --state "$dir" service list -o json 2>/dev/null | tr -d ' \n' |
            grep -o '"vip":"[0-9.]*"' | head -n 1 | cut -d'"' -f4)
        [ -n "$vip" ] && break
        sleep "$pause"
    done
    printf '%s' "$vip"
}

# bench_site_config STATE_DIR SITE ADVERTISE: rewrites the causeway.yaml that `causeway init`
# wrote for the bench: links on 0.0.0.0:7400, DNS on 127.0.0.1:5353, no metrics listener; in
# london, ADVERTISE as its link address and the `bench` service exported (the three servers'
# ports on POD); links.resume as CW_RESUME says (default true), links.lanes as CW_LANES says
# (default auto: min(CPUs, 8)).
bench_site_config() {
    local dir=$1 site=$2 adv=$3
    awk -v site="$site" -v adv="$adv" -v pod="$POD" -v ports="$IPERF_PORT $ECHO_PORT $ONESHOT_PORT" -v resume="${CW_RESUME:-true}" \
        -v lanes="${CW_LANES:-auto}" '
        /^[a-z]/ { section = $1 }
        section == "links:" && /^  resume:/ { print "  resume: " resume; next }
        section == "links:" && /^  lanes:/ { print "  lanes: " lanes; next }
        /^listen:/ { print "listen: 0.0.0.0:7400"; next }
        /^advertise:/ { if (site == "london") { print "advertise: [\"" adv "\"]"; next } }
        /^metrics:/ { next }
        section == "dns:" && /^  listen:/ { print "  listen: [\"127.0.0.1:5353\"]"; next }
        /^exports: \[\]/ && site == "london" {
            print "exports:"
            print "  - service: bench"
            split(ports, p, " ")
            print "    ports: [{name: iperf, port: " p[1] "}, {name: echo, port: " p[2] "}, {name: oneshot, port: " p[3] "}]"
            print "    endpoints: [{hostname: bench-0, ip: " pod "}]"
            next
        }
        { print }' "$dir/causeway.yaml" >"$dir/causeway.yaml.new" && mv "$dir/causeway.yaml.new" "$dir/causeway.yaml"
}

# bench_netns_down NS...: stops every process in each namespace (TERM, then KILL after half a
# second for what is left) and deletes the namespace. Quiet if a namespace does not exist.
bench_netns_down() {
    local ns pids
    for ns in "$@"; do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill $pids 2>/dev/null
            sleep 0.5
            pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
            # shellcheck disable=SC2086
            [ -n "$pids" ] && kill -9 $pids 2>/dev/null
        fi
        ip netns del "$ns" 2>/dev/null
    done
    return 0
}

# Latency on an otherwise idle VM measures how fast a halted vCPU wakes up (~100 µs here)
# more than the tools. bench_spin_start runs one busy loop per CPU under SCHED_IDLE, which
# keeps the CPUs from halting and yields at once to any runnable task, like a host with some
# other work to do; bench_spin_stop ends them. Their pids are in SPIN meanwhile.
SPIN=()
bench_spin_start() {
    local c
    for c in $(seq 0 $(($(nproc) - 1))); do
        taskset -c "$c" chrt -i 0 bash -c 'while :; do :; done' &
        SPIN+=($!)
    done
}
bench_spin_stop() {
    [ ${#SPIN[@]} -gt 0 ] && kill "${SPIN[@]}" 2>/dev/null && wait "${SPIN[@]}" 2>/dev/null
    SPIN=()
}

# bench_link DIR TRIES: waits (TRIES × 0.2 s at most) until the agents with state DIR/london
# and DIR/paris answer, then london issues a one-use token and paris (in namespace $NS_P)
# redeems it. Both commands' output goes to DIR/link.log; fails if either fails.
bench_link() {
    local dir=$1 tries=$2 i
    for ((i = 0; i < tries; i++)); do
        "$CAUSEWAY" --state "$dir/london" status >/dev/null 2>&1 && "$CAUSEWAY" --state "$dir/paris" status >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$CAUSEWAY" --state "$dir/london" token issue -o "$dir/t.token" >>"$dir/link.log" 2>&1 &&
        ip netns exec "$NS_P" "$CAUSEWAY" --state "$dir/paris" token redeem "$dir/t.token" >>"$dir/link.log" 2>&1
}

# rathole, when RATHOLE is not set: on PATH, else where `cargo install --root /tmp/rathole`
# puts it.
RATHOLE=${RATHOLE:-$(command -v rathole 2>/dev/null || echo /tmp/rathole/bin/rathole)}

# bench_rathole_config DIR BASE: writes DIR/paris.toml (the server, where visitors connect:
# control channel on P_WAN:2333, services iperf, echo and oneshot on 127.0.0.1:BASE+1..3) and
# DIR/london.toml (the client next to the pod, dialling paris, forwarding to the same three
# servers on POD), with a Noise_NK key pair from `rathole --genkey`. Fails if that fails.
bench_rathole_config() {
    local d=$1 base=$2 priv pub i names=(iperf echo oneshot) ports=($IPERF_PORT $ECHO_PORT $ONESHOT_PORT)
    "$RATHOLE" --genkey >"$d/keys" 2>&1 || return 1
    priv=$(awk '/Private Key/ {getline; print; exit}' "$d/keys")
    pub=$(awk '/Public Key/ {getline; print; exit}' "$d/keys")
    {
        printf '[server]\nbind_addr = "%s:2333"\ndefault_token = "bench"\n' $P_WAN
        printf '[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "%s"\n' "$priv"
        for i in 0 1 2; do
            printf '[server.services.%s]\nbind_addr = "127.0.0.1:%d"\n' "${names[$i]}" $((base + 1 + i))
        done
    } >"$d/paris.toml"
    {
        printf '[client]\nremote_addr = "%s:2333"\ndefault_token = "bench"\n' $P_WAN
        printf '[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "%s"\n' "$pub"
        for i in 0 1 2; do
            printf '[client.services.%s]\nlocal_addr = "%s:%d"\n' "${names[$i]}" $POD "${ports[$i]}"
        done
    } >"$d/london.toml"
}
