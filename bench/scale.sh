#!/usr/bin/env bash
# Catalog at scale: london exports one service with ENDPOINTS endpoints (two ports each, one
# TCP, one UDP); paris redeems a token. Measures how long after the redemption paris lists
# every endpoint with its VIP, how long until all its VIP listeners are bound, how long a
# withdrawal (one endpoint removed from london's causeway.yaml) takes to reach paris, how
# many addresses paris's DNS responder returns for the service, and each agent's memory.
#
#   sudo bash bench/scale.sh                   # 2,000 endpoints
#   sudo ENDPOINTS=5000 bash bench/scale.sh
#
# Knobs (environment): ENDPOINTS=2000, VIPS_CIDR (default: the narrowest range at 127.128.0.0
# whose per-site blocks hold ENDPOINTS), CARGO_TARGET_DIR (honoured), SKIP_BUILD=1.
# Needs root (network namespaces), iproute2, dnsutils (dig), bc.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
ENDPOINTS=${ENDPOINTS:-2000}
NS_L=cws-london
NS_P=cws-paris

log() { printf '[scale %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "FATAL: $*"
    exit 1
}
[ "$(id -u)" = 0 ] || die "run as root (network namespaces): sudo bash bench/scale.sh"
for tool in ip dig bc ss; do command -v $tool >/dev/null || die "missing $tool (apt-get install iproute2 dnsutils bc)"; done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building causeway (target dir $TARGET)"
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --locked --bin causeway) || die "cargo build failed"
fi
CW=$TARGET/release/causeway
[ -x "$CW" ] || die "missing $CW"

# Blocks are 1/256 of the range and keep their first and last address: 2^k - 2 usable.
if [ -z "${VIPS_CIDR:-}" ]; then
    bits=8
    while [ $(((1 << bits) - 2)) -lt "$ENDPOINTS" ]; do bits=$((bits + 1)); done
    [ $bits -le 15 ] || die "ENDPOINTS=$ENDPOINTS does not fit one site's block of a range inside 127.128/9"
    # In the upper half of 127/8, away from 127.0.0.1 and the DNS listener.
    VIPS_CIDR=127.128.0.0/$((32 - 8 - bits))
fi

WORK=$(mktemp -d /tmp/cws.XXXXXX)
cleanup() {
    trap - EXIT INT TERM
    for ns in $NS_L $NS_P; do
        pids=$(ip netns pids $ns 2>/dev/null)
        [ -n "$pids" ] && kill $pids 2>/dev/null
    done
    sleep 0.5
    for ns in $NS_L $NS_P; do ip netns del $ns 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ns in $NS_L $NS_P; do
    ip netns del $ns 2>/dev/null
    ip netns add $ns && ip -n $ns link set lo up || die "ip netns add $ns failed"
done
ip -n $NS_L link add wan0 type veth peer name wan0 netns $NS_P
ip -n $NS_L addr add 10.201.0.1/24 dev wan0
ip -n $NS_P addr add 10.201.0.2/24 dev wan0
ip -n $NS_L link set wan0 up
ip -n $NS_P link set wan0 up

for site in london paris; do
    "$CW" --state "$WORK/$site" init --site $site >/dev/null 2>&1 || die "causeway init $site failed"
    awk -v site=$site -v cidr="$VIPS_CIDR" -v n="$ENDPOINTS" '
        /^[a-z]/ { section = $1 }
        /^listen:/ { print "listen: 0.0.0.0:7400"; next }
        /^advertise:/ && site == "london" { print "advertise: [\"10.201.0.1:7400\"]"; next }
        /^metrics:/ { next }
        section == "dns:" && /^  listen:/ { print "  listen: [\"127.0.0.1:5353\"]"; next }
        section == "vips:" && /^  cidr:/ { print "  cidr: " cidr; next }
        /^exports: \[\]/ && site == "london" {
            print "exports:"
            print "  - service: grid"
            print "    ports: [{name: member, port: 7001}, {name: gossip, port: 7002, protocol: UDP}]"
            print "    endpoints:"
            for (i = 0; i < n; i++)
                printf "      - {hostname: m-%d, ip: 10.%d.%d.%d}\n", i, 1 + int(i / 62500), int(i / 250) % 250, i % 250 + 1
            next
        }
        { print }' "$WORK/$site/causeway.yaml" >"$WORK/$site.yaml" && mv "$WORK/$site.yaml" "$WORK/$site/causeway.yaml"
done

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc | awk '{printf "%.2f", $1}'; }
listed() { "$CW" --state "$WORK/paris" service list -o json 2>/dev/null | tr -d ' \n' | grep -o '"vip":"[0-9.]*"' | wc -l; }
bound() { ip netns exec $NS_P ss -ltnH | wc -l; }

log "london exports $ENDPOINTS endpoints x 2 ports; vips.cidr $VIPS_CIDR"
t=$(now)
ip netns exec $NS_L env RUST_LOG=warn "$CW" --state "$WORK/london" run 2>"$WORK/london.log" >/dev/null &
ip netns exec $NS_P env RUST_LOG=warn "$CW" --state "$WORK/paris" run 2>"$WORK/paris.log" >/dev/null &
for _ in $(seq 300); do
    "$CW" --state "$WORK/london" status >/dev/null 2>&1 && "$CW" --state "$WORK/paris" status >/dev/null 2>&1 && break
    sleep 0.1
done
"$CW" --state "$WORK/london" status >/dev/null 2>&1 || die "london did not start: $(tail -n 3 "$WORK/london.log")"
startup=$(since "$t")
rss() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$(ip netns pids "$1" | head -n 1)/status"; }
rss_alone="$(rss $NS_L) / $(rss $NS_P)"
"$CW" --state "$WORK/london" token issue -o "$WORK/t.token" >/dev/null 2>&1 || die "token issue failed"
t=$(now)
ip netns exec $NS_P "$CW" --state "$WORK/paris" token redeem "$WORK/t.token" >/dev/null || die "token redeem failed"
t_listed="" t_bound=""
for _ in $(seq 3000); do
    # Listeners first: a VIP should never be listed before its listener is bound.
    [ -z "$t_bound" ] && [ "$(bound)" -ge "$ENDPOINTS" ] && t_bound=$(since "$t")
    [ -z "$t_listed" ] && [ "$(listed)" -ge "$ENDPOINTS" ] && t_listed=$(since "$t")
    [ -n "$t_listed" ] && [ -n "$t_bound" ] && break
    sleep 0.02
done
[ -n "$t_listed" ] && [ -n "$t_bound" ] || die "paris did not learn every endpoint within 60 s: $(listed) listed, $(bound) bound"
answers=$(ip netns exec $NS_P dig +short +tries=1 +time=5 @127.0.0.1 -p 5353 grid.default.svc.clusterset.local | wc -l)

sed -i '/hostname: m-7,/d' "$WORK/london/causeway.yaml"
t=$(now)
t_withdrawn=""
for _ in $(seq 500); do
    if ! "$CW" --state "$WORK/paris" service list -o json 2>/dev/null | tr -d ' \n' | grep -q '"hostname":"m-7"'; then
        t_withdrawn=$(since "$t")
        break
    fi
    sleep 0.02
done

echo
echo "| endpoints (x 2 ports) | agents up | paris listeners bound, after redeem | paris lists all | DNS answer (A records) | withdrawal seen in paris | RSS london / paris MiB, unlinked | linked |"
echo "|---|---|---|---|---|---|---|---|"
echo "| $ENDPOINTS | ${startup} s | ${t_bound} s | ${t_listed} s | $answers | ${t_withdrawn:-not within 10} s | $rss_alone | $(rss $NS_L) / $(rss $NS_P) |"
echo
echo "causeway $(git -C "$ROOT" describe --always --dirty 2>/dev/null), vips.cidr $VIPS_CIDR, $(nproc) CPUs; times are from polling the CLI every 20 ms (add ~20 ms of resolution)."
