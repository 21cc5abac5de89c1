//! The commented `causeway.yaml` that `causeway init` writes: every key with its default and
//! a word on what it is for, so a new site's operator edits a working file instead of
//! starting from the reference. Its defaults are [`super::schema`]'s, and a test parses it
//! back into the same values.

use super::schema::{
    DEFAULT_DNS_LISTEN, DEFAULT_INTERCEPT_PORT, DEFAULT_LISTEN, DEFAULT_MAX_FLOWS, DEFAULT_TTL, DEFAULT_VIPS,
    DEFAULT_ZONE,
};
use crate::names::Label;

/// The commented `causeway.yaml` that `causeway init --site SITE` writes,
/// holding the defaults. `site` is a [`Label`], so the text always parses back.
pub fn default_yaml(site: &Label) -> String {
    let site_line = format!("site: {site}");
    format!(
        "# causeway.yaml: configuration of the causeway agent of site {site}.
# Every key but `site` is optional; ${{VAR}} is replaced from the environment
# (write $${{ for a literal ${{).
{site_line:<31} # cluster id, DNS-1123 label
namespace: default              # default namespace for exports
listen: {DEFAULT_LISTEN}            # QUIC links (UDP)
advertise: []                   # host:port written into tokens; empty: listen (0.0.0.0 -> 127.0.0.1)
dns:
  listen: [\"{DEFAULT_DNS_LISTEN}\"]      # UDP and TCP
  zone: {DEFAULT_ZONE}
  upstream: []                  # e.g. [\"10.96.0.10:53\"]; empty: REFUSED outside the zone
  # allow: [10.0.0.0/8]         # who may have names outside the zone forwarded, besides loopback;
  #                             # default: the networks of this host's interfaces
  ttl: {DEFAULT_TTL}
vips:
  cidr: {DEFAULT_VIPS}           # virtual IPs for remote endpoints (inside 127/8 needs no privilege)
  mode: listen                  # listen: one listener per VIP and port (no privilege; members bind their own address);
                                # intercept: one agent port, traffic to vips.cidr redirected to it by an
                                # nftables rule (`causeway intercept install`, needs NET_ADMIN once)
  # intercept_port: {DEFAULT_INTERCEPT_PORT}         # intercept mode: the agent port the rule redirects to
metrics: 127.0.0.1:9400         # Prometheus text format at /metrics; omit to disable
# gateway: causeway.grid.svc:7400 # sidecars only: the site's gateway, the one agent a sidecar links to
links:
  lanes: auto                   # parallel QUIC connections per link; auto = min(CPUs, 8)
  down_after: 3s                # silence after which a link counts as down for routing and DNS
  idle_timeout: 30s             # silence after which a link's connections and their flows are given up
  resume: true                  # open TCP flows move to another path when theirs fails
limits:
  max_flows: {DEFAULT_MAX_FLOWS}               # concurrent forwarded TCP flows per agent
  udp_idle: 60s                 # humantime duration, idle UDP flows expire
exports: []
# exports:
#   - service: etcd
#     namespace: default          # optional, defaults to top-level namespace
#     ports:
#       - {{name: peer, port: 2380, protocol: TCP}}
#       - {{name: client, port: 2379}}              # protocol defaults to TCP
#       - {{name: gossip, port: 7946, protocol: UDP}}
#     endpoints:
#       - {{hostname: etcd-0, ip: 10.1.0.1}}        # ready unless `ready: false`
"
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::test_support::{no_env, parse};
    use crate::config::{DnsConfig, Limits, VipsConfig, expand_env};

    #[test]
    fn default_yaml_round_trips() {
        let london = Label::new("london").unwrap();
        let c = parse(&default_yaml(&london)).expect("default parses");
        assert_eq!(c.site, "london");
        assert_eq!(c.namespace, "default");
        assert_eq!(c.listen, "0.0.0.0:7400".parse::<SocketAddr>().unwrap());
        assert!(c.advertise.is_empty());
        assert_eq!(c.dns, DnsConfig::default());
        assert_eq!(c.vips, VipsConfig::default());
        assert_eq!(c.metrics, Some("127.0.0.1:9400".parse().unwrap()));
        assert_eq!(c.gateway, None);
        assert_eq!(c.limits, Limits::default());
        assert!(c.exports.is_empty());
        // No variables in it, and it survives expansion untouched.
        assert_eq!(
            expand_env(&default_yaml(&london), no_env).unwrap(),
            default_yaml(&london)
        );
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
    }
}
