#!/usr/bin/env bash
# DNS benchmark: causeway's responder against unbound serving the same records as
# local-data, for names in the zone and for names forwarded to an upstream, with dnsperf.
#
# One agent (site `bench`) exports etcd (3 endpoints, 2 named ports) and grid (20
# endpoints); unbound gets the identical A/SRV/TXT records as local-data. Both forward
# example.org to the same dnsmasq (which answers with TTL 0, so unbound cannot serve those
# from its cache). Each server is pinned to one CPU and dnsperf to the other. Per query set,
# each server is run flat out REPEAT times, alternating (median qps, and the server's CPU
# time per query from /proc: the figure least disturbed by other load), then twice at a fixed
# rate for latency percentiles (from dnsperf -v): one query at a time at 5000 qps (the
# servers' own response time), and RATE qps with up to INFLIGHT (100) queries in flight.
#
# Usage: bench/dns.sh            (needs dnsperf, unbound, dnsmasq: apt-get install dnsperf unbound dnsmasq-base)
#   BIN=path/to/causeway  KEEP=1 (keep logs)  DURATION=10  REPEAT=3  RATE=20000  INFLIGHT=100  SERVER_CPU=1  CLIENT_CPU=0
#   NICE=-15  RT=1
# Servers and dnsperf run at nice NICE (root only), so other work on the machine (builds)
# disturbs the figures less; with RT=1 (root) they run SCHED_FIFO instead (chrt -f 10), which
# keeps other processes from delaying them at all: use it to measure the servers' own tail
# latency on a machine that is not quiet.
# Prints a markdown table. Builds the release binary first if BIN is not set.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
RATE=${RATE:-20000}
INFLIGHT=${INFLIGHT:-100}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
NICE=${NICE:--15}
RT=${RT:-}
CW_PORT=5301 UB_PORT=5302 UP_PORT=5303 QUIC_PORT=17499
[[ $(id -u) == 0 ]] || NICE=0 RT=
prio=(nice -n "$NICE")
[[ -n "$RT" ]] && prio=(chrt -f 10)
# nice/chrt and taskset exec the command: $! of `nice … taskset … cmd &` is cmd's pid.
pin() { local cpu=$1; shift; exec "${prio[@]}" taskset -c "$cpu" "$@"; }

for tool in dnsperf unbound dnsmasq taskset python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install dnsperf unbound dnsmasq-base)" >&2; exit 1; }
done
if [[ -z "${BIN:-}" ]]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/dns-target}
  cargo build --release --quiet
  BIN=$CARGO_TARGET_DIR/release/causeway
fi

work=$(mktemp -d /tmp/causeway-dns-bench.XXXXXX)
pids=()
main=$BASHPID
cleanup() {
  # Subshells (process substitutions) may run this trap too: only the script itself cleans up.
  [[ $BASHPID == "$main" ]] || return 0
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n "${KEEP:-}" ]]; then echo "logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- upstream: dnsmasq, example.org -> 192.0.2.7 (TTL 0) ---
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
  --listen-address=127.0.0.1 --bind-interfaces --port=$UP_PORT --pid-file= --user=root \
  --address=/example.org/192.0.2.7 --dns-forward-max=1000 --log-facility=/dev/null >/dev/null 2>&1 &
pids+=($!)

# --- causeway: one site exporting the benchmark services ---
state=$work/bench
"$BIN" --state "$state" init --site bench >/dev/null
etcd_eps="" grid_eps=""
for i in 0 1 2; do etcd_eps+="      - {hostname: etcd-$i, ip: 10.1.0.$((i + 1))}"$'\n'; done
for i in $(seq 0 19); do grid_eps+="      - {hostname: grid-$i, ip: 10.2.0.$((i + 1))}"$'\n'; done
python3 - "$state/causeway.yaml" <<EOF
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r'(?m)^listen: .*', 'listen: 127.0.0.1:$QUIC_PORT', s)
s = s.replace('"127.0.0.1:53"', '"127.0.0.1:$CW_PORT"')
s = re.sub(r'(?m)^  upstream: .*', '  upstream: ["127.0.0.1:$UP_PORT"]', s)
s = re.sub(r'(?m)^metrics: .*', '', s)
s = re.sub(r'(?m)^exports: \[\]', '''exports:
  - service: etcd
    ports: [{name: client, port: 2379}, {name: peer, port: 2380}]
    endpoints:
$etcd_eps  - service: grid
    ports: [{name: member, port: 7574}]
    endpoints:
$grid_eps''', s)
open(p, 'w').write(s)
EOF
RUST_LOG=warn "${prio[@]}" taskset -c "$SERVER_CPU" "$BIN" --state "$state" run >/dev/null 2>"$work/causeway.log" &
pids+=($!)

# --- unbound: the same records as local-data ---
z=clusterset.local
{
  cat <<EOF
server:
  interface: 127.0.0.1@$UB_PORT
  port: $UB_PORT
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "$work"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  so-reuseport: yes
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "iterator"
  local-zone: "$z." static
  local-data: "$z. 5 IN SOA ns.dns.$z. hostmaster.$z. 1 7200 1800 86400 5"
  local-data: "dns-version.$z. 5 IN TXT \"1.0.0\""
EOF
  for i in 0 1 2; do
    echo "  local-data: \"etcd.default.svc.$z. 5 IN A 10.1.0.$((i + 1))\""
    echo "  local-data: \"etcd-$i.bench.etcd.default.svc.$z. 5 IN A 10.1.0.$((i + 1))\""
    echo "  local-data: \"_client._tcp.etcd.default.svc.$z. 5 IN SRV 0 10 2379 etcd-$i.bench.etcd.default.svc.$z.\""
  done
  for i in $(seq 0 19); do
    echo "  local-data: \"grid.default.svc.$z. 5 IN A 10.2.0.$((i + 1))\""
    echo "  local-data: \"grid-$i.bench.grid.default.svc.$z. 5 IN A 10.2.0.$((i + 1))\""
  done
  cat <<EOF
forward-zone:
  name: "example.org."
  forward-addr: 127.0.0.1@$UP_PORT
EOF
} >"$work/unbound.conf"
"${prio[@]}" taskset -c "$SERVER_CPU" unbound -d -c "$work/unbound.conf" >/dev/null 2>"$work/unbound.log" &
pids+=($!)

# --- query sets ---
{
  for i in 0 1 2; do echo "etcd-$i.bench.etcd.default.svc.$z A"; done
  for i in $(seq 0 19); do echo "grid-$i.bench.grid.default.svc.$z A"; done
  for _ in 1 2 3 4 5; do echo "etcd.default.svc.$z A"; echo "grid.default.svc.$z A"; done
  echo "_client._tcp.etcd.default.svc.$z SRV"
  echo "dns-version.$z TXT"
  echo "nope.default.svc.$z A"
} >"$work/zone.txt"
for i in $(seq 1 1000); do echo "host$i.example.org A"; done >"$work/forward.txt"

wait_up() {
  for _ in $(seq 100); do
    dig +short +time=1 +tries=1 @127.0.0.1 -p "$1" "etcd.default.svc.$z" | grep -q 10.1.0.1 && return 0
    sleep 0.1
  done
  echo "error: nothing answers on port $1" >&2
  cat "$work"/*.log >&2
  exit 1
}
wait_up $CW_PORT
wait_up $UB_PORT

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# throughput PID PORT FILE -> "qps lost cpu_us_per_query": flat out, 200 queries outstanding
throughput() {
  local before after
  before=$(cpu_ticks "$1")
  read -r qps lost < <((pin "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$2" -d "$3" -l "$DURATION" -c 8 -q 200 2>>"$work/dnsperf.err") |
    awk '/Queries per second/ {q=$4} /Queries lost/ {l=$3} END {printf "%d %d\n", q, l}') || { qps=0 lost=0; }
  after=$(cpu_ticks "$1")
  echo "$qps $lost $(python3 -c "print(f'{($after - $before) * $TICK_US / max(1, $qps * $DURATION):.1f}')")"
}
# latency PORT FILE QPS OUTSTANDING -> "p50_ms p99_ms" at QPS queries/s with at most
# OUTSTANDING queries in flight
latency() {
  (pin "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$1" -d "$2" -l "$DURATION" -c 1 -Q "$3" -q "$4" -v 2>/dev/null) |
    python3 -c '
import sys
lat = []
for line in sys.stdin:
    f = line.split()
    # "> NOERROR name type 0.000123": rcode and latency in seconds ("> T ..." = timeout)
    if len(f) >= 5 and f[0] == ">" and f[1] not in ("T", "I"):
        lat.append(float(f[-1]))
lat.sort()
pick = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
print(f"{pick(0.50):.3f} {pick(0.99):.3f}")
'
}
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

cw_pid=${pids[1]} ub_pid=${pids[2]}
echo "| server | queries | qps (median of $REPEAT) | server CPU µs/query | lost | p50 / p99 one at a time, 5k qps (ms) | p50 / p99 at $RATE qps, ≤ $INFLIGHT in flight (ms) |"
echo "|---|---|---|---|---|---|---|"
for set in zone forward; do
  declare -A qps_runs=() cpu_runs=() lost_runs=()
  # Rounds alternate the servers, so drifting background load hits both alike.
  for _ in $(seq "$REPEAT"); do
    for server in causeway unbound; do
      if [[ $server == causeway ]]; then port=$CW_PORT pid=$cw_pid; else port=$UB_PORT pid=$ub_pid; fi
      read -r qps lost cpu < <(throughput "$pid" $port "$work/$set.txt")
      echo "$set $server: $qps qps, $lost lost, $cpu µs CPU/query" >&2
      qps_runs[$server]+="$qps "
      cpu_runs[$server]+="$cpu "
      lost_runs[$server]=$((${lost_runs[$server]:-0} + lost))
    done
  done
  for server in causeway unbound; do
    port=$CW_PORT
    [[ $server == unbound ]] && port=$UB_PORT
    read -r p50 p99 < <(latency $port "$work/$set.txt" 5000 1) || { p50=nan p99=nan; }
    read -r l50 l99 < <(latency $port "$work/$set.txt" "$RATE" "$INFLIGHT") || { l50=nan l99=nan; }
    qps=$(tr ' ' '\n' <<<"${qps_runs[$server]}" | grep . | median)
    cpu=$(tr ' ' '\n' <<<"${cpu_runs[$server]}" | grep . | median)
    echo "| $server | $set | $qps | $cpu | ${lost_runs[$server]} | $p50 / $p99 | $l50 / $l99 |"
  done
  unset qps_runs cpu_runs lost_runs
done
# The machine itself: a p99 under 1 ms needs pauses to cover well under 1% of the time.
echo
echo "Pauses of this machine, measured on the client CPU $CLIENT_CPU (bench/pauses.py):" \
  "$(taskset -c "${CLIENT_CPU%%,*}" python3 "$(dirname "$0")/pauses.py" 5)"
