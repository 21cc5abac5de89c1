# Shared by bench/run.sh and bench/instructions.sh (sourced, not run).

# bench_site_config STATE_DIR SITE ADVERTISE: rewrites the causeway.yaml that `causeway init`
# wrote for the bench: links on 0.0.0.0:7400, DNS on 127.0.0.1:5353, no metrics listener; in
# london, ADVERTISE as its link address and the `bench` service exported (iperf3 5201, echo
# 7007, answer-once 7008 on the pod address 10.1.0.1).
bench_site_config() {
    local dir=$1 site=$2 adv=$3
    awk -v site="$site" -v adv="$adv" '
        /^[a-z]/ { section = $1 }
        /^listen:/ { print "listen: 0.0.0.0:7400"; next }
        /^advertise:/ { if (site == "london") { print "advertise: [\"" adv "\"]"; next } }
        /^metrics:/ { next }
        section == "dns:" && /^  listen:/ { print "  listen: [\"127.0.0.1:5353\"]"; next }
        /^exports: \[\]/ && site == "london" {
            print "exports:"
            print "  - service: bench"
            print "    ports: [{name: iperf, port: 5201}, {name: echo, port: 7007}, {name: oneshot, port: 7008}]"
            print "    endpoints: [{hostname: bench-0, ip: 10.1.0.1}]"
            next
        }
        { print }' "$dir/causeway.yaml" >"$dir/causeway.yaml.new" && mv "$dir/causeway.yaml.new" "$dir/causeway.yaml"
}
