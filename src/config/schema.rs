//! The shape of `causeway.yaml`: one serde type per section, each key documented with why it
//! exists, its default and its unit. Every key but `site` has a default, and unknown keys are
//! errors (a typo must not silently fall back to a default). Single values are checked while
//! deserializing by the functions of [`super::values`] and lists by [`super::validate`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::validate::{de_endpoints, de_exports, de_ports};
use super::values::{
    de_block, de_cidr, de_duration, de_host_ports, de_ip, de_max_flows, de_opt_host_port, de_opt_label_string,
    de_opt_nets, de_opt_socket_addr, de_socket_addr, de_socket_addrs, de_ttl, de_upstreams, de_zone,
};
use crate::names::{Label, PortSpec, de_label_string};

/// Default UDP port of the QUIC links.
pub(super) const DEFAULT_LISTEN: &str = "0.0.0.0:7400";
/// Default address of the clusterset DNS server.
pub(super) const DEFAULT_DNS_LISTEN: &str = "127.0.0.1:53";
/// Default DNS zone served for remote services.
pub(super) const DEFAULT_ZONE: &str = "clusterset.local";
/// Default TTL of DNS answers, in seconds.
pub(super) const DEFAULT_TTL: u32 = 5;
/// Default block virtual IPs are drawn from.
pub(super) const DEFAULT_VIPS: &str = "127.77.0.0/16";
/// Default cap on concurrently forwarded TCP flows.
pub(super) const DEFAULT_MAX_FLOWS: usize = 4096;
/// Default idle timeout of forwarded UDP flows.
pub(super) const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// Default silence after which a link is down for routing and DNS (docs/REFERENCE.md `links.down_after`).
pub(super) const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(3);
/// Default silence after which a link's connection and flows are given up
/// (docs/REFERENCE.md `links.idle_timeout`).
pub(super) const DEFAULT_LINK_IDLE: Duration = Duration::from_secs(30);
/// Most parallel QUIC connections (lanes) per link.
pub const MAX_LANES: u8 = 8;

/// The whole `causeway.yaml`: one agent's identity, listeners and exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster id of this site; names the site in tokens, link handshakes and
    /// DNS names, so it must be a DNS-1123 label. The only required key.
    pub site: Label,
    /// Namespace exports fall into when they don't name one, so a
    /// single-namespace setup need not repeat it on every export.
    #[serde(default = "default_namespace")]
    pub namespace: Label,
    /// UDP address the QUIC listener binds for links from other sites and
    /// sidecars. Port 0 lets the OS pick one (useful in tests).
    #[serde(default = "default_listen", deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// `host:port` addresses written into join tokens, for when peers must
    /// dial something other than `listen` (NAT, load balancer, DNS name).
    /// Empty means `listen`; see [`Config::advertise_addrs`].
    #[serde(default, deserialize_with = "de_host_ports")]
    pub advertise: Vec<String>,
    /// The clusterset DNS server that resolves remote services to VIPs.
    #[serde(default)]
    pub dns: DnsConfig,
    /// The address block remote endpoints get virtual IPs from.
    #[serde(default)]
    pub vips: VipsConfig,
    /// Where Prometheus metrics are served (text format at `/metrics`);
    /// `None` (key omitted) disables the endpoint.
    #[serde(
        default,
        deserialize_with = "de_opt_socket_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub metrics: Option<SocketAddr>,
    /// Sidecars only: `host:port` of the site's gateway, the one agent a
    /// sidecar links to instead of dialing every site itself.
    #[serde(
        default,
        deserialize_with = "de_opt_host_port",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway: Option<String>,
    /// How links notice silence and how long they wait it out.
    #[serde(default)]
    pub links: LinksConfig,
    /// Concurrency bounds that keep one agent from exhausting its host.
    #[serde(default)]
    pub limits: Limits,
    /// Local services this site offers to the other sites.
    #[serde(default, deserialize_with = "de_exports")]
    pub exports: Vec<Export>,
}

/// The clusterset DNS server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Addresses the DNS server binds, each for both UDP and TCP, so pods
    /// (or a cluster DNS forwarding stub) can resolve remote services.
    #[serde(deserialize_with = "de_socket_addrs")]
    pub listen: Vec<SocketAddr>,
    /// Zone answered from the service catalog (lowercased, no trailing dot),
    /// kept separate from `cluster.local` so local names never change.
    #[serde(deserialize_with = "de_zone")]
    pub zone: String,
    /// Resolvers queries outside `zone` are forwarded to; empty means such
    /// queries are answered REFUSED, so the server can't become an open
    /// resolver by accident.
    #[serde(deserialize_with = "de_upstreams")]
    pub upstream: Vec<SocketAddr>,
    /// Clients (CIDRs) whose queries outside the zone are forwarded to `upstream`, besides
    /// loopback; others get REFUSED, so a responder reachable from other networks is no open
    /// resolver. Unset: the networks of this host's (or pod's) own interfaces. Answers inside
    /// the zone go to every client.
    #[serde(default, deserialize_with = "de_opt_nets", skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<IpNet>>,
    /// TTL in seconds of answers from `zone`; short, so clients notice
    /// endpoints coming and going quickly. At most 86400.
    #[serde(deserialize_with = "de_ttl")]
    pub ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: vec![parse_default(DEFAULT_DNS_LISTEN)],
            zone: DEFAULT_ZONE.to_owned(),
            upstream: Vec::new(),
            allow: None,
            ttl: DEFAULT_TTL,
        }
    }
}

/// The virtual IP block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VipsConfig {
    /// Block remote endpoints get virtual IPs from, so local clients can
    /// connect to a remote pod by an address this agent intercepts. Inside
    /// 127.0.0.0/8 it needs no privilege. Blocks are carved per site, so it
    /// must keep at least 16 host bits (prefix <= 16 for IPv4, <= 112 for
    /// IPv6); host bits given in the address are cleared.
    #[serde(deserialize_with = "de_cidr")]
    pub cidr: IpNet,
    /// Which of the range's 256 blocks this site assigns its endpoints' VIPs from
    /// (a causeway extension). Unset: derived from the site id by hash, which
    /// is stable; set it only to resolve a reported block collision.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "de_block")]
    pub block: Option<u32>,
    /// How local clients' traffic to VIPs reaches the agent (docs/REFERENCE.md `vips.mode`).
    pub mode: VipMode,
    /// `intercept` mode: the one agent port (TCP and UDP, on 127.0.0.1) the nftables rule
    /// redirects VIP traffic to (a causeway extension). Pick a port no local program uses;
    /// `causeway intercept install` and the agent must read the same value.
    pub intercept_port: u16,
}

/// How clients' traffic to VIPs reaches the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipMode {
    /// One listener per VIP and exported port. Needs no privilege, but a local program
    /// bound to a wildcard address (`0.0.0.0:P`) and a VIP listener on port P exclude each
    /// other, so members must bind their own (pod) address.
    #[default]
    Listen,
    /// One agent port; an nftables table `causeway` redirects TCP and UDP for `vips.cidr` to
    /// it (`causeway intercept install`, NET_ADMIN once), and the agent recovers each
    /// flow's original destination. Members may bind any address. IPv4 ranges only.
    Intercept,
}

impl std::fmt::Display for VipMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VipMode::Listen => "listen",
            VipMode::Intercept => "intercept",
        })
    }
}

/// Default `vips.intercept_port`.
pub const DEFAULT_INTERCEPT_PORT: u16 = 15001;

impl Default for VipsConfig {
    fn default() -> Self {
        VipsConfig {
            cidr: parse_default(DEFAULT_VIPS),
            block: None,
            mode: VipMode::Listen,
            intercept_port: DEFAULT_INTERCEPT_PORT,
        }
    }
}

/// Link timing and lanes (docs/REFERENCE.md `links:`).
///
/// A link that hears nothing from its peer for `down_after` is taken out of routing and DNS
/// (new flows take another path, or see NXDOMAIN), but its connection and open flows are kept
/// until `idle_timeout`: an outage shorter than that costs no flow, as it costs no direct TCP
/// connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinksConfig {
    /// Parallel QUIC connections per link, so one link can use several cores; `auto` is
    /// min(CPUs, 8).
    pub lanes: Lanes,
    /// Silence (no packet from the peer) after which the link is down for routing and DNS.
    /// Keep-alives go every `down_after / 3` (at most 1 s), so a healthy link is never silent
    /// that long. A humantime duration, more than zero.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub down_after: Duration,
    /// Silence after which the link's connection and every flow on it are given up (the QUIC
    /// idle timeout, RFC 9000 §10.1). At least `down_after`.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Whether the TCP flows this agent originates are resumable: framed end to end with a
    /// bounded replay buffer, so an open flow moves to another path when its own fails
    /// (docs/REFERENCE.md, *What survives a path change*). Its cost per connection is
    /// within the benchmarks' noise (docs/BENCHMARKS.md, *Session 12*); `false` gives plain
    /// streams, which an outage shorter than
    /// `idle_timeout` on their own path still survives. Flows from other agents are resumable
    /// as they ask, whatever this says.
    pub resume: bool,
}

impl Default for LinksConfig {
    fn default() -> Self {
        LinksConfig {
            lanes: Lanes::Auto,
            down_after: DEFAULT_DOWN_AFTER,
            idle_timeout: DEFAULT_LINK_IDLE,
            resume: true,
        }
    }
}

impl LinksConfig {
    /// How often to send keep-alives: a third of `down_after`, at most 1 s, at least 50 ms.
    pub fn keep_alive(&self) -> Duration {
        (self.down_after / 3).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// `links.lanes`: `auto` or a count from 1 to [`MAX_LANES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// min(available CPUs, [`MAX_LANES`]).
    Auto,
    /// Exactly this many.
    Count(u8),
}

impl Lanes {
    /// The number of lanes this resolves to on this machine.
    pub fn count(self) -> u8 {
        match self {
            Lanes::Count(n) => n,
            Lanes::Auto => std::thread::available_parallelism()
                .map(|n| n.get().min(usize::from(MAX_LANES)) as u8)
                .unwrap_or(1),
        }
    }
}

impl Serialize for Lanes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Lanes::Auto => s.serialize_str("auto"),
            Lanes::Count(n) => s.serialize_u8(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Lanes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lanes, D::Error> {
        /// A visitor rather than an untagged enum, so errors keep the key path and line.
        struct LanesVisitor;
        impl de::Visitor<'_> for LanesVisitor {
            type Value = Lanes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "`auto` or a number of lanes from 1 to {MAX_LANES}")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Lanes, E> {
                u8::try_from(n)
                    .ok()
                    .filter(|n| (1..=MAX_LANES).contains(n))
                    .map(Lanes::Count)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "{n}: expected `auto` or a number of lanes from 1 to {MAX_LANES}"
                        ))
                    })
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Lanes, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, w: &str) -> Result<Lanes, E> {
                if w.trim() == "auto" {
                    Ok(Lanes::Auto)
                } else if w.trim().parse::<u64>().is_ok() {
                    Err(E::custom(format!(
                        "\"{w}\" is a quoted string: write the number of lanes without quotes \
                         (lanes: {w}), or `auto`"
                    )))
                } else {
                    Err(E::custom(format!(
                        "`{w}`: expected `auto` or a number of lanes from 1 to {MAX_LANES}"
                    )))
                }
            }
        }
        d.deserialize_any(LanesVisitor)
    }
}

/// Concurrency bounds (a causeway extension of the common format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most TCP flows one agent forwards at once, so a connection storm
    /// exhausts a budget rather than file descriptors or memory. At least 1.
    #[serde(deserialize_with = "de_max_flows")]
    pub max_flows: usize,
    /// How long a forwarded UDP flow may stay silent before it is dropped,
    /// since UDP has no close to tell us a flow is over. A humantime
    /// duration such as `60s` or `2m`; must be more than zero.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub udp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: DEFAULT_MAX_FLOWS,
            udp_idle: DEFAULT_UDP_IDLE,
        }
    }
}

/// One local service offered to the other sites.
///
/// Its names are checked DNS-1123 labels but kept as `String`s: they go on unchanged into
/// this site's advert ([`crate::catalog::ServiceAd`]), whose names are `String`s because
/// peers' adverts are taken as they come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Service name, the first label of its clusterset DNS name; a DNS-1123 label.
    #[serde(deserialize_with = "de_label_string")]
    pub service: String,
    /// Namespace of the service, the second label of its DNS name (a DNS-1123 label);
    /// `None` means the top-level `namespace` (see [`Config::export_namespace`]).
    #[serde(
        default,
        deserialize_with = "de_opt_label_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub namespace: Option<String>,
    /// Ports remote sites may reach; at least one, since an export without
    /// ports can carry no traffic.
    #[serde(default, deserialize_with = "de_ports")]
    pub ports: Vec<PortSpec>,
    /// Backends traffic for this service is forwarded to, each also named
    /// in DNS by its hostname (as for a headless service's pods).
    #[serde(default, deserialize_with = "de_endpoints")]
    pub endpoints: Vec<EndpointSpec>,
}

/// One backend of an export (its hostname a `String` for the reason [`Export`]'s names are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Name of the backend, unique within the export, so clustered software
    /// can address one member (e.g. `etcd-0`); a DNS-1123 label.
    #[serde(deserialize_with = "de_label_string")]
    pub hostname: String,
    /// Address traffic for this backend is forwarded to on the local site.
    #[serde(deserialize_with = "de_ip")]
    pub ip: IpAddr,
    /// Whether the backend takes traffic; `false` keeps it known (and in
    /// DNS as not ready) without sending it connections. Defaults to true.
    #[serde(default = "default_true")]
    pub ready: bool,
}

// ---------------------------------------------------------------------------
// Defaults.

/// Parses a compile-time default; the constants above are known to be valid.
fn parse_default<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: fmt::Debug,
{
    s.parse().expect("built-in default is valid")
}

fn default_namespace() -> Label {
    parse_default("default")
}

pub(super) fn default_listen() -> SocketAddr {
    parse_default(DEFAULT_LISTEN)
}

fn default_true() -> bool {
    true
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::test_support::{err, parse};

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse("site: paris\n").unwrap();
        assert_eq!(c.namespace, "default");
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.dns, DnsConfig::default());
        assert_eq!(c.vips, VipsConfig::default());
        assert_eq!(c.metrics, None);
        assert_eq!(c.limits, Limits::default());
        assert!(c.to_yaml().contains("udp_idle: 1m"));
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
    }
    #[test]
    fn links_timing_and_lanes() {
        let c = parse("site: a\n").unwrap();
        assert_eq!(c.links, LinksConfig::default());
        assert_eq!(c.links.down_after, Duration::from_secs(3));
        assert_eq!(c.links.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.links.keep_alive(), Duration::from_secs(1));
        let c = parse("site: a\nlinks:\n  lanes: 4\n  down_after: 600ms\n  idle_timeout: 2m\n").unwrap();
        assert_eq!(c.links.lanes, Lanes::Count(4));
        assert_eq!(c.links.keep_alive(), Duration::from_millis(200));
        assert_eq!(c.links.idle_timeout, Duration::from_secs(120));
        assert!(parse(&c.to_yaml()).unwrap() == c);
        let e = err("site: a\nlinks:\n  down_after: 10s\n  idle_timeout: 5s\n");
        assert!(
            e.contains("links.idle_timeout") && e.contains("shorter than links.down_after"),
            "{e}"
        );
        let e = err("site: a\nlinks:\n  lanes: 9\n");
        assert!(e.contains("links.lanes") && e.contains("1 to 8"), "{e}");
        let e = err("site: a\nlinks:\n  lanes: many\n");
        assert!(e.contains("links.lanes") && e.contains("auto"), "{e}");
        let e = err("site: a\nlinks:\n  lanes: \"3\"\n");
        assert!(e.contains("links.lanes") && e.contains("quoted string"), "{e}");
        let e = err("site: a\nlinks:\n  down_after: 0s\n");
        assert!(e.contains("links.down_after") && e.contains("line 3"), "{e}");
    }
}
