# Shared by the bench scripts (sourced, not run): progress messages, the build, and the
# two-site topology they all measure. A script sets BENCH (its name in messages) and ROOT
# (the repository) before sourcing this.

# log MESSAGE, die MESSAGE: progress and fatal errors on stderr.
log() { printf '[%s %s] %s\n' "$BENCH" "$(date +%T)" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
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
# london, ADVERTISE as its link address and the `bench` service exported (iperf3 5201, echo
# 7007, answer-once 7008 on POD).
bench_site_config() {
    local dir=$1 site=$2 adv=$3
    awk -v site="$site" -v adv="$adv" -v pod="$POD" '
        /^[a-z]/ { section = $1 }
        /^listen:/ { print "listen: 0.0.0.0:7400"; next }
        /^advertise:/ { if (site == "london") { print "advertise: [\"" adv "\"]"; next } }
        /^metrics:/ { next }
        section == "dns:" && /^  listen:/ { print "  listen: [\"127.0.0.1:5353\"]"; next }
        /^exports: \[\]/ && site == "london" {
            print "exports:"
            print "  - service: bench"
            print "    ports: [{name: iperf, port: 5201}, {name: echo, port: 7007}, {name: oneshot, port: 7008}]"
            print "    endpoints: [{hostname: bench-0, ip: " pod "}]"
            next
        }
        { print }' "$dir/causeway.yaml" >"$dir/causeway.yaml.new" && mv "$dir/causeway.yaml.new" "$dir/causeway.yaml"
}
