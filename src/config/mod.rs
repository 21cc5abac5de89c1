//! Typed configuration for `causeway.yaml`, the one file that tells an agent
//! which site it is, where it listens, how it answers clusterset DNS, which
//! virtual IPs it may hand out and which local services it exports to the
//! other sites. The whole file is read, `${VAR}`-expanded, parsed and
//! validated up front by [`Config::load`], so a bad value stops the agent at
//! start with an error naming the file, the key and the line instead of
//! surfacing later as a broken link or a wrong DNS answer. Checks that concern
//! a single value run while deserializing, so serde_yaml attaches the key path
//! and line to them; checks that span several entries (duplicates, missing
//! ports) run in the same pass and report the entry's key path and line.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::names::LABEL_RULE;
pub use crate::names::{PortSpec, Protocol, is_dns_label};

/// Origin shown in errors from [`expand_env`] when no file path is known.
const DEFAULT_ORIGIN: &str = "causeway.yaml";
/// Default UDP port of the QUIC links.
const DEFAULT_LISTEN: &str = "0.0.0.0:7400";
/// Default address of the clusterset DNS server.
const DEFAULT_DNS_LISTEN: &str = "127.0.0.1:53";
/// Default DNS zone served for remote services.
const DEFAULT_ZONE: &str = "clusterset.local";
/// Default TTL of DNS answers, in seconds.
const DEFAULT_TTL: u32 = 5;
/// Largest TTL accepted: one day.
const MAX_TTL: u64 = 86_400;
/// Default block virtual IPs are drawn from.
const DEFAULT_VIPS: &str = "127.77.0.0/16";
/// Default cap on concurrently forwarded TCP flows.
const DEFAULT_MAX_FLOWS: usize = 4096;
/// Default idle timeout of forwarded UDP flows.
const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
/// Default silence after which a link is down for routing and DNS (docs/REFERENCE.md `links.down_after`).
const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(3);
/// Default silence after which a link's connection and flows are given up
/// (docs/REFERENCE.md `links.idle_timeout`).
const DEFAULT_LINK_IDLE: Duration = Duration::from_secs(30);
/// Most parallel QUIC connections (lanes) per link.
pub const MAX_LANES: u8 = 8;
/// Host bits a VIP block must have at least, since blocks are carved per site.
const MIN_VIP_HOST_BITS: u8 = 16;

/// Everything that can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration file", path.display())]
    Io {
        /// Path that was read.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The YAML is malformed or a value is invalid; `message` already names
    /// the key path and the line.
    #[error("{origin}: {message}")]
    Parse {
        /// File (or other source) the text came from.
        origin: String,
        /// What is wrong, with key path and line.
        message: String,
    },
    /// A `${VAR}` names an environment variable that is not set.
    #[error("{origin}: line {line}: environment variable `{var}` is not set (write `$${{` for a literal `${{`)")]
    UnsetVar {
        /// File (or other source) the text came from.
        origin: String,
        /// Name of the unset variable.
        var: String,
        /// One-based line of the reference.
        line: usize,
    },
    /// A check spanning several values failed; `message` ends with the line
    /// when it could be found.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// File (or other source) the text came from.
        origin: String,
        /// Key path of the offending value, e.g. `exports[1].ports`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole `causeway.yaml`: one agent's identity, listeners and exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster id of this site; names the site in tokens, link handshakes and
    /// DNS names, so it must be a DNS-1123 label. The only required key.
    #[serde(deserialize_with = "de_label")]
    pub site: String,
    /// Namespace exports fall into when they don't name one, so a
    /// single-namespace setup need not repeat it on every export.
    #[serde(default = "default_namespace", deserialize_with = "de_label")]
    pub namespace: String,
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

fn de_block<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = Option::<u32>::deserialize(d)?;
    match v {
        Some(b) if b > 255 => Err(de::Error::custom(format!("block {b} is out of range: use 0 to 255"))),
        other => Ok(other),
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
}

impl Default for LinksConfig {
    fn default() -> Self {
        LinksConfig {
            lanes: Lanes::Auto,
            down_after: DEFAULT_DOWN_AFTER,
            idle_timeout: DEFAULT_LINK_IDLE,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Service name, the first label of its clusterset DNS name.
    #[serde(deserialize_with = "de_label")]
    pub service: String,
    /// Namespace of the service, the second label of its DNS name; `None`
    /// means the top-level `namespace` (see [`Config::export_namespace`]).
    #[serde(default, deserialize_with = "de_opt_label", skip_serializing_if = "Option::is_none")]
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

/// One backend of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Name of the backend, unique within the export, so clustered software
    /// can address one member (e.g. `etcd-0`); a DNS-1123 label.
    #[serde(deserialize_with = "de_label")]
    pub hostname: String,
    /// Address traffic for this backend is forwarded to on the local site.
    #[serde(deserialize_with = "de_ip")]
    pub ip: IpAddr,
    /// Whether the backend takes traffic; `false` keeps it known (and in
    /// DNS as not ready) without sending it connections. Defaults to true.
    #[serde(default = "default_true")]
    pub ready: bool,
}

impl Config {
    /// Reads `path`, expands `${VAR}` from the process environment (see
    /// [`expand_env`]), parses and validates it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let lookup = |name: &str| std::env::var(name).ok();
        let expanded = expand_env_in(&text, &origin, &lookup)?;
        Config::parse(&expanded, &origin)
    }

    /// Parses and validates already-expanded YAML text; `origin` (usually the
    /// file path) prefixes every error.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let missing_site = |why: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: "site".to_owned(),
            message: format!("{why}; `site` is required: the id of this cluster ({LABEL_RULE})"),
        };
        let config = match serde_yaml::from_str::<Config>(text) {
            Ok(config) => config,
            Err(e) => {
                // An empty file or one without `site` gets its own error
                // rather than serde's "EOF" or "missing field".
                return Err(match serde_yaml::from_str::<serde_yaml::Value>(text) {
                    Ok(serde_yaml::Value::Null) => missing_site("the file is empty"),
                    Ok(serde_yaml::Value::Mapping(m))
                        if !m.contains_key("site") && e.to_string().starts_with("missing field `site`") =>
                    {
                        missing_site("missing key")
                    }
                    _ => yaml_error(origin, &e),
                });
            }
        };
        config.check_exports(text, origin)?;
        if config.vips.mode == VipMode::Intercept {
            let invalid = |key: &str, message: String| ConfigError::Invalid {
                origin: origin.to_owned(),
                key: key.to_owned(),
                message,
            };
            if !config.vips.cidr.addr().is_ipv4() {
                return Err(invalid(
                    "vips.mode",
                    format!(
                        "intercept needs an IPv4 vips.cidr, not {}: use an IPv4 range (the default 127.77.0.0/16) or mode: listen",
                        config.vips.cidr
                    ),
                ));
            }
            if config.vips.intercept_port == 0 {
                return Err(invalid(
                    "vips.intercept_port",
                    "0 is not a port the nftables rule can redirect to; pick a free one, e.g. 15001".into(),
                ));
            }
        }
        if config.links.idle_timeout < config.links.down_after {
            return Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                key: "links.idle_timeout".to_owned(),
                message: format!(
                    "{} is shorter than links.down_after ({}): a link must count as down before its flows are given up",
                    humantime::format_duration(config.links.idle_timeout),
                    humantime::format_duration(config.links.down_after)
                ),
            });
        }
        Ok(config)
    }

    /// Serializes the configuration back to YAML that [`Config::parse`]
    /// reads into an equal `Config` (comments are not kept).
    pub fn to_yaml(&self) -> String {
        // Every key is a string and every value a scalar, sequence or
        // mapping of those, which serde_yaml always serializes.
        serde_yaml::to_string(self).expect("Config always serializes to YAML")
    }

    /// Addresses to write into tokens: `advertise`, or `listen` when
    /// `advertise` is empty. An unspecified `listen` IP (`0.0.0.0` or `::`)
    /// can't be dialed, so it is replaced by loopback (`127.0.0.1` or `::1`):
    /// such a token only works from the same host, and real deployments set
    /// `advertise`. `bound` is the address the agent actually bound for
    /// `listen` (its port differs when `listen` asked for port 0).
    pub fn advertise_addrs(&self, bound: SocketAddr) -> Vec<String> {
        if !self.advertise.is_empty() {
            return self.advertise.clone();
        }
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        vec![addr.to_string()]
    }

    /// The keys whose change from `running` to `self` a running agent cannot apply: it keeps
    /// their running values until restarted. Live: `exports`, `namespace`, `dns.upstream`,
    /// `dns.allow`, `dns.ttl`.
    pub fn restart_needed(&self, running: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                keys.push(key);
            }
        };
        check(self.site != running.site, "site");
        check(self.listen != running.listen, "listen");
        check(self.advertise != running.advertise, "advertise");
        check(self.dns.listen != running.dns.listen, "dns.listen");
        check(self.dns.zone != running.dns.zone, "dns.zone");
        check(self.vips != running.vips, "vips");
        check(self.links != running.links, "links");
        check(self.limits != running.limits, "limits");
        check(self.metrics != running.metrics, "metrics");
        check(self.gateway != running.gateway, "gateway");
        keys
    }

    /// Namespace of an export: its own, or the top-level `namespace`.
    pub fn export_namespace<'a>(&'a self, e: &'a Export) -> &'a str {
        e.namespace.as_deref().unwrap_or(&self.namespace)
    }

    /// Rejects two exports of the same service in the same namespace once
    /// defaults are applied (exact repeats are caught while parsing).
    fn check_exports(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (i, e) in self.exports.iter().enumerate() {
            let id = (e.service.as_str(), self.export_namespace(e));
            if let Some(first) = seen.iter().position(|s| *s == id) {
                let nth = self.exports[..=i].iter().filter(|x| x.service == e.service).count();
                let mut message = format!(
                    "duplicate export of service `{}` in namespace `{}` (also exports[{first}])",
                    id.0, id.1
                );
                if let Some(line) = find_key_value_line(text, "service", &e.service, nth) {
                    message.push_str(&format!(" at line {line}"));
                }
                return Err(ConfigError::Invalid {
                    origin: origin.to_owned(),
                    key: format!("exports[{i}]"),
                    message,
                });
            }
            seen.push(id);
        }
        Ok(())
    }
}

/// The commented `causeway.yaml` that `causeway init --site SITE` writes,
/// holding the defaults. `site` is written as given: check it with
/// [`is_dns_label`] first, or the text won't parse back.
pub fn default_yaml(site: &str) -> String {
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

/// Replaces every `${VAR}` in `text` by `lookup(VAR)`. An unset variable is
/// an error naming it and its line; `$${` stands for a literal `${`; a `$`
/// not followed by `{` is kept as is. Comments are left alone: text from a
/// `#` at the start of a line or after whitespace, outside quotes (judged
/// line by line), to the end of the line. Values are inserted verbatim, so a
/// value with YAML syntax in it (or a newline, which shifts later line
/// numbers) should be quoted around the reference. Errors name the origin
/// `causeway.yaml`; [`Config::load`] names the real path.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    expand_env_in(text, DEFAULT_ORIGIN, &lookup)
}

/// [`expand_env`] with the origin to put in errors.
fn expand_env_in(text: &str, origin: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let lineno = index + 1;
        let syntax = |what: String| ConfigError::Parse {
            origin: origin.to_owned(),
            message: format!("{what} at line {lineno}"),
        };
        let code_len = code_len(line);
        let (code, comment) = line.split_at(code_len);
        let mut rest = code;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
            } else if let Some(after) = tail.strip_prefix("${") {
                let Some(end) = after.find('}') else {
                    return Err(syntax(
                        "unterminated `${`: expected `${NAME}` (write `$${` for a literal `${`)".to_owned(),
                    ));
                };
                let name = &after[..end];
                if !is_env_name(name) {
                    return Err(syntax(format!(
                        "`${{{name}}}` is not a variable reference: a name is letters, digits \
                         and '_', not starting with a digit (write `$${{` for a literal `${{`)"
                    )));
                }
                match lookup(name) {
                    Some(value) => out.push_str(&value),
                    None => {
                        return Err(ConfigError::UnsetVar {
                            origin: origin.to_owned(),
                            var: name.to_owned(),
                            line: lineno,
                        });
                    }
                }
                rest = &after[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok(out)
}

/// Whether `s` is an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Byte length of `line` before its YAML comment, if any: a `#` at the start
/// or after whitespace, outside single or double quotes. A quote opens a
/// quoted scalar only at the start of a value (after whitespace or `[{,:`),
/// so apostrophes inside plain words don't count.
fn code_len(line: &str) -> usize {
    #[derive(PartialEq)]
    enum State {
        Plain,
        Single,
        Double,
    }
    let mut state = State::Plain;
    let mut prev: Option<char> = None;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match state {
            State::Plain => {
                let at_value_start = prev.is_none_or(|p| p.is_whitespace() || "[{,:".contains(p));
                if c == '#' && prev.is_none_or(char::is_whitespace) {
                    return i;
                }
                if c == '\'' && at_value_start {
                    state = State::Single;
                } else if c == '"' && at_value_start {
                    state = State::Double;
                }
            }
            State::Single => {
                if c == '\'' {
                    if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                        chars.next();
                    } else {
                        state = State::Plain;
                    }
                }
            }
            State::Double => {
                if c == '\\' {
                    chars.next();
                } else if c == '"' {
                    state = State::Plain;
                }
            }
        }
        prev = Some(c);
    }
    line.len()
}

/// One-based line of the `nth` (one-based) `key: value` pair in `text`,
/// block or flow style, value plain or quoted, comments ignored. A
/// best-effort locator for errors found after parsing.
fn find_key_value_line(text: &str, key: &str, value: &str, nth: usize) -> Option<usize> {
    let mut count = 0;
    for (index, line) in text.lines().enumerate() {
        let code = &line[..code_len(line)];
        let mut from = 0;
        while let Some(at) = code[from..].find(key).map(|a| a + from) {
            from = at + key.len();
            let before_ok = code[..at]
                .chars()
                .next_back()
                .is_none_or(|c| c.is_whitespace() || "{,-".contains(c));
            let after = code[from..].trim_start();
            let Some(after) = after.strip_prefix(':') else {
                continue;
            };
            let after = after.trim_start();
            let after = after.strip_prefix(['"', '\'']).unwrap_or(after);
            let Some(after) = after.strip_prefix(value) else {
                continue;
            };
            let end_ok = after
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || ",}\"'".contains(c));
            if before_ok && end_ok {
                count += 1;
                if count == nth {
                    return Some(index + 1);
                }
            }
        }
    }
    None
}

/// Turns a serde_yaml error into [`ConfigError::Parse`], making sure the
/// message carries the line (serde_yaml leaves it out for line 1 column 1).
fn yaml_error(origin: &str, err: &serde_yaml::Error) -> ConfigError {
    let mut message = err.to_string();
    if let Some(loc) = err.location() {
        if !message.contains(" at line ") {
            message.push_str(&format!(" at line {} column {}", loc.line(), loc.column()));
        }
    }
    ConfigError::Parse {
        origin: origin.to_owned(),
        message,
    }
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

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_listen() -> SocketAddr {
    parse_default(DEFAULT_LISTEN)
}

fn default_true() -> bool {
    true
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

// ---------------------------------------------------------------------------
// Checks of single values. Each runs inside serde_yaml's visit of the value,
// so its error gets the value's key path and line.

fn check_label(s: &str) -> Result<String, String> {
    crate::names::Label::new(s).map(String::from).map_err(|e| e.to_string())
}

fn check_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a socket address: expected ip:port, e.g. 0.0.0.0:7400 or [::]:7400"))
}

fn check_upstream(s: &str) -> Result<SocketAddr, String> {
    let addr = check_socket_addr(s)?;
    if addr.port() == 0 {
        return Err(format!("`{s}`: port must be 1-65535"));
    }
    Ok(addr)
}

/// Whether `s` is a host name: dot-separated labels of letters, digits and
/// `-` (any case), at most 253 characters. Dotted IPv4 addresses pass too.
fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            (1..=63).contains(&b.len())
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn check_host_port(s: &str) -> Result<String, String> {
    let expected = "expected host:port with a port 1-65535, e.g. gw.london.example:7400, \
                    10.0.0.1:7400 or [::1]:7400";
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let Some((v6, port)) = inner.split_once("]:") else {
            return Err(format!("`{s}` is not a host:port: {expected}"));
        };
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(format!("`{s}`: `{v6}` is not an IPv6 address; {expected}"));
        }
        (v6, port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("`{s}` has no port: {expected}"));
        };
        if host.contains(':') {
            return Err(format!("`{s}`: IPv6 addresses need brackets; {expected}"));
        }
        if host.is_empty() || !is_host_name(host) {
            return Err(format!("`{s}`: `{host}` is not a host name; {expected}"));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !host.is_empty() => Ok(s.to_owned()),
        _ => Err(format!("`{s}`: `{port}` is not a port; {expected}")),
    }
}

fn check_zone(s: &str) -> Result<String, String> {
    let zone = s.trim_end_matches('.').to_ascii_lowercase();
    if !zone.is_empty() && zone.len() <= 253 && zone.split('.').all(is_dns_label) {
        Ok(zone)
    } else {
        Err(format!(
            "`{s}` is not a DNS name: expected dot-separated labels, e.g. clusterset.local ({LABEL_RULE})"
        ))
    }
}

fn check_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a CIDR block: expected address/prefix, e.g. 127.77.0.0/16"))?;
    let host_bits = net.max_prefix_len() - net.prefix_len();
    if host_bits < MIN_VIP_HOST_BITS {
        return Err(format!(
            "`{s}` is too small: blocks are carved per site, so it needs at least \
             {MIN_VIP_HOST_BITS} host bits (prefix at most /{})",
            net.max_prefix_len() - MIN_VIP_HOST_BITS
        ));
    }
    Ok(net.trunc())
}

fn check_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an IP address, e.g. 10.1.0.1 or fd00::1"))
}

fn check_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err(format!("`{s}`: must be more than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("`{s}` is not a duration ({e}): e.g. 60s, 2m, 1h30m")),
    }
}

fn check_ttl(n: i128) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|t| u64::from(*t) <= MAX_TTL)
        .ok_or_else(|| format!("{n}: a TTL must be 0-{MAX_TTL} seconds"))
}

fn check_max_flows(n: i128) -> Result<usize, String> {
    usize::try_from(n)
        .ok()
        .filter(|m| *m >= 1)
        .ok_or_else(|| format!("{n}: must be at least 1"))
}

// ---------------------------------------------------------------------------
// Visitors running those checks.

/// Visits a scalar as text and runs `check` on it.
struct StrCheck<T> {
    expecting: &'static str,
    check: fn(&str) -> Result<T, String>,
}

impl<T> Clone for StrCheck<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for StrCheck<T> {}

impl<T> Visitor<'_> for StrCheck<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(v).map_err(E::custom)
    }
}

impl<'de, T> DeserializeSeed<'de> for StrCheck<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

/// Visits a sequence of scalars, running a [`StrCheck`] on each element.
struct SeqCheck<T>(StrCheck<T>);

impl<'de, T> Visitor<'de> for SeqCheck<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.0.expecting)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.0)? {
            out.push(v);
        }
        Ok(out)
    }
}

/// Visits an optional scalar (`null` or absent: `None`) with a [`StrCheck`].
struct OptCheck<T>(StrCheck<T>);

impl<'de, T> Visitor<'de> for OptCheck<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} or null", self.0.expecting)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_str(self.0).map(Some)
    }
}

/// Visits an integer and runs `check` on it.
struct IntCheck<T> {
    expecting: &'static str,
    check: fn(i128) -> Result<T, String>,
}

impl<T> Visitor<'_> for IntCheck<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.check)(i128::from(v)).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.check)(i128::from(v)).map_err(E::custom)
    }
}

/// Visits a sequence of mappings, deserializing each element as `T` and
/// running `check(keys seen so far, element)` inside the element's own visit
/// so an error gets the element's key path and line. `check` refuses an element
/// whose unique keys are already in the set, and adds them: one hash lookup per
/// element, so a list of thousands of endpoints is checked in linear time.
struct UniqueSeq<T> {
    expecting: &'static str,
    check: fn(&mut HashSet<String>, &T) -> Result<(), String>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for UniqueSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list, each {}", self.expecting)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out: Vec<T> = Vec::new();
        let mut seen = HashSet::new();
        loop {
            let seed = UniqueElem {
                seen: &mut seen,
                expecting: self.expecting,
                check: self.check,
                marker: PhantomData,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(out),
            }
        }
    }
}

/// One element of a [`UniqueSeq`].
struct UniqueElem<'a, T> {
    seen: &'a mut HashSet<String>,
    expecting: &'static str,
    check: fn(&mut HashSet<String>, &T) -> Result<(), String>,
    marker: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for UniqueElem<'_, T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for UniqueElem<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<T, M::Error> {
        let value = T::deserialize(MapAccessDeserializer::new(map))?;
        (self.check)(self.seen, &value).map_err(de::Error::custom)?;
        Ok(value)
    }
}

fn check_port_entry(seen: &mut HashSet<String>, p: &PortSpec) -> Result<(), String> {
    let (name, number) = (format!("name {}", p.name), format!("port {}/{}", p.port, p.protocol));
    if seen.contains(&name) {
        return Err(format!("duplicate port name `{}`", p.name));
    }
    if seen.contains(&number) {
        return Err(format!("duplicate port {}/{}", p.port, p.protocol));
    }
    seen.extend([name, number]);
    Ok(())
}

fn check_endpoint_entry(seen: &mut HashSet<String>, e: &EndpointSpec) -> Result<(), String> {
    if !seen.insert(e.hostname.clone()) {
        return Err(format!("duplicate endpoint hostname `{}`", e.hostname));
    }
    Ok(())
}

fn check_export_entry(seen: &mut HashSet<String>, e: &Export) -> Result<(), String> {
    if e.ports.is_empty() {
        return Err(format!(
            "export `{}` has no ports: list at least one, e.g. ports: [{{name: client, port: 2379}}]",
            e.service
        ));
    }
    // An export without a namespace is keyed apart from every explicit one, as before:
    // which namespace it lands in is only known once the whole file is read.
    if !seen.insert(format!("{}/{:?}", e.service, e.namespace)) {
        return Err(match &e.namespace {
            Some(ns) => format!("duplicate export of service `{}` in namespace `{ns}`", e.service),
            None => format!("duplicate export of service `{}`", e.service),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// `deserialize_with` functions.

const LABEL: StrCheck<String> = StrCheck {
    expecting: "a DNS-1123 label",
    check: check_label,
};
const SOCKET_ADDR: StrCheck<SocketAddr> = StrCheck {
    expecting: "a socket address ip:port",
    check: check_socket_addr,
};
const HOST_PORT: StrCheck<String> = StrCheck {
    expecting: "host:port",
    check: check_host_port,
};

fn de_label<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(LABEL)
}

fn de_opt_label<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_option(OptCheck(LABEL))
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    d.deserialize_str(SOCKET_ADDR)
}

fn de_socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    d.deserialize_seq(SeqCheck(SOCKET_ADDR))
}

fn de_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    d.deserialize_seq(SeqCheck(StrCheck {
        expecting: "a resolver address ip:port",
        check: check_upstream,
    }))
}

fn check_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("`{s}` is not a network: expected a CIDR such as 10.0.0.0/8 or fd00::/8, or an address"))
}

fn de_opt_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    d.deserialize_seq(SeqCheck(StrCheck {
        expecting: "a list of CIDRs",
        check: check_net,
    }))
    .map(Some)
}

fn de_opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    d.deserialize_option(OptCheck(SOCKET_ADDR))
}

fn de_host_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_seq(SeqCheck(HOST_PORT))
}

fn de_opt_host_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_option(OptCheck(HOST_PORT))
}

fn de_zone<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "a DNS name",
        check: check_zone,
    })
}

fn de_cidr<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "a CIDR block",
        check: check_cidr,
    })
}

fn de_ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "an IP address",
        check: check_ip,
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "a duration such as 60s",
        check: check_duration,
    })
}

fn de_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    d.deserialize_u64(IntCheck {
        expecting: "a TTL in seconds",
        check: check_ttl,
    })
}

fn de_max_flows<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    d.deserialize_u64(IntCheck {
        expecting: "a positive number",
        check: check_max_flows,
    })
}

fn de_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PortSpec>, D::Error> {
    d.deserialize_seq(UniqueSeq {
        expecting: "a port mapping like {name: client, port: 2379}",
        check: check_port_entry,
    })
}

fn de_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EndpointSpec>, D::Error> {
    d.deserialize_seq(UniqueSeq {
        expecting: "an endpoint mapping like {hostname: etcd-0, ip: 10.1.0.1}",
        check: check_endpoint_entry,
    })
}

fn de_exports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Export>, D::Error> {
    d.deserialize_seq(UniqueSeq {
        expecting: "an export mapping with service, ports and endpoints",
        check: check_export_entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"site: london                    # cluster id, DNS-1123 label
namespace: default              # default namespace for exports
listen: 0.0.0.0:7400            # QUIC links (UDP)
advertise: ["gw.london.example:7400"]   # addresses written into tokens; default: listen
dns:
  listen: ["127.0.0.1:53"]      # UDP and TCP
  zone: clusterset.local
  upstream: []                  # e.g. ["10.96.0.10:53"]; empty: REFUSED outside the zone
  ttl: 5
vips:
  cidr: 127.77.0.0/16           # virtual IPs for remote endpoints (inside 127/8 needs no privilege)
metrics: 127.0.0.1:9400         # Prometheus text format at /metrics; omit to disable
gateway: causeway.grid.svc:7400 # sidecars only: the site's gateway, the one agent a sidecar links to
limits:                         # (our extension) concurrency bounds
  max_flows: 4096               # concurrent forwarded TCP flows per agent
  udp_idle: 60s                 # humantime duration, idle UDP flows expire
exports:
  - service: etcd
    namespace: default          # optional, defaults to top-level namespace
    ports:
      - {name: peer, port: 2380, protocol: TCP}
      - {name: client, port: 2379}              # protocol defaults to TCP
      - {name: gossip, port: 7946, protocol: UDP}
    endpoints:
      - {hostname: etcd-0, ip: 10.1.0.1}        # ready unless `ready: false`
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "causeway.yaml")
    }

    /// The error text for `text`, which must fail to parse.
    fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn default_yaml_round_trips() {
        let c = parse(&default_yaml("london")).expect("default parses");
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
            expand_env(&default_yaml("london"), no_env).unwrap(),
            default_yaml("london")
        );
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn spec_example_parses() {
        let c = parse(SPEC).expect("spec example parses");
        assert_eq!(c.site, "london");
        assert_eq!(c.namespace, "default");
        assert_eq!(c.listen, "0.0.0.0:7400".parse::<SocketAddr>().unwrap());
        assert_eq!(c.advertise, vec!["gw.london.example:7400".to_owned()]);
        assert_eq!(c.advertise_addrs(c.listen), vec!["gw.london.example:7400".to_owned()]);
        assert_eq!(c.dns.listen, vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()]);
        assert_eq!(c.dns.zone, "clusterset.local");
        assert!(c.dns.upstream.is_empty());
        assert_eq!(c.dns.ttl, 5);
        assert_eq!(c.vips.cidr, "127.77.0.0/16".parse::<IpNet>().unwrap());
        assert_eq!(c.metrics, Some("127.0.0.1:9400".parse().unwrap()));
        assert_eq!(c.gateway.as_deref(), Some("causeway.grid.svc:7400"));
        assert_eq!(c.limits.max_flows, 4096);
        assert_eq!(c.limits.udp_idle, Duration::from_secs(60));
        assert_eq!(
            c.exports,
            vec![Export {
                service: "etcd".into(),
                namespace: Some("default".into()),
                ports: vec![
                    PortSpec {
                        name: "peer".into(),
                        port: 2380,
                        protocol: Protocol::Tcp
                    },
                    PortSpec {
                        name: "client".into(),
                        port: 2379,
                        protocol: Protocol::Tcp
                    },
                    PortSpec {
                        name: "gossip".into(),
                        port: 7946,
                        protocol: Protocol::Udp
                    },
                ],
                endpoints: vec![EndpointSpec {
                    hostname: "etcd-0".into(),
                    ip: "10.1.0.1".parse().unwrap(),
                    ready: true,
                }],
            }]
        );
        assert_eq!(c.export_namespace(&c.exports[0]), "default");
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
        assert_eq!(Protocol::Udp.to_string(), "UDP");
        assert_eq!(Protocol::Tcp.to_string(), "TCP");
    }

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
    fn unknown_top_level_key() {
        let e = err("site: london\nlisten: 0.0.0.0:7400\nlisten_addr: 1.2.3.4:5\n");
        assert!(e.starts_with("causeway.yaml: "), "{e}");
        assert!(e.contains("unknown field `listen_addr`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        // Even on the very first line, where serde_yaml omits the position.
        let e = err("sitee: london\n");
        assert!(e.contains("`sitee`") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn unknown_nested_key() {
        let text = SPEC.replace("  listen: [\"127.0.0.1:53\"]", "  listn: [\"127.0.0.1:53\"]");
        let e = err(&text);
        assert!(
            e.starts_with("causeway.yaml: dns: unknown field `listn`, expected one of"),
            "{e}"
        );
        assert!(e.ends_with("at line 6 column 3"), "{e}");
        let e = err("site: a\nexports:\n  - service: x\n    ports: [{name: p, port: 1, proto: TCP}]\n");
        assert!(e.contains("exports[0].ports[0]: unknown field `proto`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn bad_site() {
        let e = err("namespace: default\nsite: London_1\n");
        assert!(e.contains("site: `London_1` is not a valid name"), "{e}");
        assert!(e.contains("DNS-1123 label"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn missing_or_empty_site() {
        for text in ["", "# nothing yet\n", "namespace: default\n"] {
            let e = err(text);
            assert!(e.contains("site"), "{e}");
            assert!(matches!(parse(text), Err(ConfigError::Invalid { ref key, .. }) if key == "site"));
        }
    }

    #[test]
    fn bad_listen() {
        let e = err("site: london\nlisten: 0.0.0.0\n");
        assert!(e.contains("listen: `0.0.0.0` is not a socket address"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = err("site: london\ndns:\n  upstream: [\"10.0.0.1:53\", nope]\n");
        assert!(e.contains("dns.upstream[1]: `nope`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = err("site: london\nmetrics: localhost:9400\n");
        assert!(e.contains("metrics:") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_advertise_and_gateway() {
        for bad in ["gw.example", "gw.example:0", ":7400", "::1:7400", "gw.example:99999"] {
            let e = err(&format!("site: a\nadvertise: [\"{bad}\"]\n"));
            assert!(e.contains("advertise[0]:") && e.contains("line 2"), "{bad}: {e}");
        }
        let e = err("site: a\ngateway: \"gw_x:7400\"\n");
        assert!(e.contains("gateway:") && e.contains("line 2"), "{e}");
        let c = parse("site: a\nadvertise: [\"[::1]:7400\", \"10.0.0.1:1\"]\n").unwrap();
        assert_eq!(c.advertise.len(), 2);
    }

    #[test]
    fn bad_cidr() {
        let e = err("site: london\nvips:\n  cidr: 127.77.0.0/33\n");
        assert!(e.contains("vips.cidr: `127.77.0.0/33` is not a CIDR block"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = err("site: london\nvips:\n  cidr: 127.77.0.0/24\n");
        assert!(e.contains("vips.cidr:") && e.contains("16 host bits"), "{e}");
        let c = parse("site: london\nvips:\n  cidr: fd00::5/112\n").unwrap();
        assert_eq!(c.vips.cidr, "fd00::/112".parse::<IpNet>().unwrap());
    }

    #[test]
    fn bad_numbers_and_zone() {
        let e = err("site: a\ndns:\n  ttl: 86401\n");
        assert!(e.contains("dns.ttl:") && e.contains("line 3"), "{e}");
        let e = err("site: a\nlimits:\n  max_flows: 0\n");
        assert!(e.contains("limits.max_flows:") && e.contains("line 3"), "{e}");
        let e = err("site: a\nlimits:\n  udp_idle: soon\n");
        assert!(e.contains("limits.udp_idle:") && e.contains("line 3"), "{e}");
        let e = err("site: a\ndns:\n  zone: bad_zone.local\n");
        assert!(e.contains("dns.zone:") && e.contains("line 3"), "{e}");
        let c = parse("site: a\ndns:\n  zone: ClusterSet.Local.\nlimits:\n  udp_idle: 2m\n").unwrap();
        assert_eq!(c.dns.zone, "clusterset.local");
        assert_eq!(c.limits.udp_idle, Duration::from_secs(120));
    }

    #[test]
    fn port_zero() {
        let text = SPEC.replace("port: 2379", "port: 0");
        let e = err(&text);
        assert!(e.contains("exports[0].ports[1].port: 0 is not a port"), "{e}");
        assert!(e.contains("line 22"), "{e}");
    }

    #[test]
    fn bad_protocol() {
        let text = SPEC.replace("protocol: UDP", "protocol: SCTP");
        let e = err(&text);
        assert!(e.contains("exports[0].ports[2].protocol"), "{e}");
        assert!(e.contains("SCTP") && e.contains("line 23"), "{e}");
    }

    #[test]
    fn thousands_of_endpoints_parse_and_a_late_duplicate_is_found() {
        let mut text = SPEC.to_string();
        for i in 1..5000 {
            text.push_str(&format!(
                "      - {{hostname: etcd-{i}, ip: 10.1.{}.{}}}\n",
                i / 250,
                i % 250 + 1
            ));
        }
        assert_eq!(parse(&text).unwrap().exports[0].endpoints.len(), 5000);
        text.push_str("      - {hostname: etcd-2500, ip: 10.2.0.1}\n");
        let e = err(&text);
        assert!(e.contains("exports[0].endpoints[5000]"), "{e}");
        assert!(e.contains("duplicate endpoint hostname `etcd-2500`"), "{e}");
    }

    #[test]
    fn duplicate_hostname() {
        let text = format!("{SPEC}      - {{hostname: etcd-0, ip: 10.1.0.2}}\n");
        let e = err(&text);
        assert!(e.contains("exports[0].endpoints[1]"), "{e}");
        assert!(e.contains("duplicate endpoint hostname `etcd-0`"), "{e}");
        assert!(e.contains("line 26"), "{e}");
    }

    #[test]
    fn duplicate_ports() {
        let text = SPEC.replace("name: gossip", "name: peer");
        let e = err(&text);
        assert!(e.contains("exports[0].ports[2]: duplicate port name `peer`"), "{e}");
        assert!(e.contains("line 23"), "{e}");
        let text = SPEC.replace("port: 7946, protocol: UDP", "port: 2380");
        let e = err(&text);
        assert!(e.contains("duplicate port 2380/TCP") && e.contains("line 23"), "{e}");
        // Same number over another protocol is fine.
        parse(&SPEC.replace("port: 7946", "port: 2380")).unwrap();
    }

    #[test]
    fn duplicate_or_portless_exports() {
        let base = "site: a\nexports:\n  - service: x\n    ports: [{name: p, port: 1}]\n";
        let e = err(&format!("{base}  - service: x\n    ports: [{{name: p, port: 1}}]\n"));
        assert!(e.contains("exports[1]: duplicate export of service `x`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        // Duplicate only once the default namespace is applied.
        let e = err(&format!(
            "{base}  - service: \"x\"\n    namespace: default\n    ports: [{{name: p, port: 1}}]\n"
        ));
        assert!(e.contains("exports[1]: duplicate export"), "{e}");
        assert!(e.contains("namespace `default`") && e.contains("line 5"), "{e}");
        // Another namespace is another export.
        parse(&format!(
            "{base}  - service: x\n    namespace: other\n    ports: [{{name: p, port: 1}}]\n"
        ))
        .unwrap();
        let e = err("site: a\nexports:\n  - service: x\n    endpoints: []\n");
        assert!(e.contains("exports[0]: export `x` has no ports"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn protocol_and_ready_defaults() {
        let c = parse(
            "site: a\nexports:\n  - service: x\n    namespace: b\n    ports: [{name: p, port: 80}]\n    endpoints:\n      - {hostname: h, ip: \"fd00::1\"}\n      - {hostname: i, ip: 10.0.0.2, ready: false}\n",
        )
        .unwrap();
        let e = &c.exports[0];
        assert_eq!(e.ports[0].protocol, Protocol::Tcp);
        assert!(e.endpoints[0].ready);
        assert!(!e.endpoints[1].ready);
        assert_eq!(c.export_namespace(e), "b");
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
    }

    #[test]
    fn env_expansion() {
        let lookup = |name: &str| (name == "POD_NAME").then(|| "london".to_owned());
        let out = expand_env("site: ${POD_NAME}\nnamespace: ns-${POD_NAME}\n", lookup).unwrap();
        assert_eq!(out, "site: london\nnamespace: ns-london\n");
        assert_eq!(parse(&out).unwrap().site, "london");
        let quoted = expand_env("site: \"${POD_NAME}\" # it's ${UNSET}\n", lookup).unwrap();
        assert_eq!(quoted, "site: \"london\" # it's ${UNSET}\n");
    }

    #[test]
    fn env_unset_names_var_and_line() {
        let e = expand_env("site: a\n\nnamespace: ${POD_NAMESPACE}\n", no_env).unwrap_err();
        match &e {
            ConfigError::UnsetVar { var, line, .. } => {
                assert_eq!(var, "POD_NAMESPACE");
                assert_eq!(*line, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("POD_NAMESPACE") && msg.contains("line 3"), "{msg}");
        let e = expand_env("a: ${BAD NAME}\n", no_env).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = expand_env("a: b\na: ${OPEN\n", no_env).unwrap_err().to_string();
        assert!(e.contains("unterminated") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn env_escape() {
        let out = expand_env("a: \"$${HOME} costs $5 and $$\"\n", no_env).unwrap();
        assert_eq!(out, "a: \"${HOME} costs $5 and $$\"\n");
    }

    #[test]
    fn env_comments_not_expanded() {
        let text = "# set ${NOPE} first\nsite: a # or ${NOPE}\nx: 'a # ${Q}'\ny: b#${Q}\n";
        let lookup = |name: &str| (name == "Q").then(|| "q".to_owned());
        let out = expand_env(text, lookup).unwrap();
        assert_eq!(out, "# set ${NOPE} first\nsite: a # or ${NOPE}\nx: 'a # q'\ny: b#q\n");
        let text = "z: 'it''s' # ${NOPE}\nw: \"a \\\" # ${Q}\" # ${NOPE}\n";
        let out = expand_env(text, lookup).unwrap();
        assert_eq!(out, "z: 'it''s' # ${NOPE}\nw: \"a \\\" # q\" # ${NOPE}\n");
    }

    #[test]
    fn advertise_defaults_from_listen() {
        let c = parse("site: a\n").unwrap();
        assert_eq!(c.advertise_addrs(c.listen), vec!["127.0.0.1:7400".to_owned()]);
        let c = parse("site: a\nlisten: \"[::]:7401\"\n").unwrap();
        assert_eq!(c.advertise_addrs(c.listen), vec!["[::1]:7401".to_owned()]);
        let c = parse("site: a\nlisten: 10.0.0.5:7400\n").unwrap();
        assert_eq!(c.advertise_addrs(c.listen), vec!["10.0.0.5:7400".to_owned()]);
    }

    #[test]
    fn load_reads_expands_and_reports_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("causeway.yaml");
        std::fs::write(&path, default_yaml("berlin")).unwrap();
        assert_eq!(Config::load(&path).unwrap().site, "berlin");

        std::fs::write(&path, "site: a\nbogus: 1\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("bogus") && e.contains("line 2"), "{e}");

        std::fs::write(&path, "site: ${CAUSEWAY_TEST_SURELY_UNSET_VAR}\n").unwrap();
        match Config::load(&path) {
            Err(ConfigError::UnsetVar { origin, var, line }) => {
                assert_eq!(origin, path.display().to_string());
                assert_eq!(var, "CAUSEWAY_TEST_SURELY_UNSET_VAR");
                assert_eq!(line, 1);
            }
            other => panic!("unexpected {other:?}"),
        }

        let missing = dir.path().join("missing.yaml");
        assert!(matches!(Config::load(&missing), Err(ConfigError::Io { .. })));
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
        let e = err("site: a\nlinks:\n  down_after: 0s\n");
        assert!(e.contains("links.down_after") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn dns_allow_takes_cidrs_and_addresses() {
        let c = parse("site: a\n").unwrap();
        assert_eq!(c.dns.allow, None);
        let c = parse("site: a\ndns:\n  allow: [10.0.0.0/8, 192.168.1.7, \"fd00::/8\", 10.1.2.3/16]\n").unwrap();
        let allow: Vec<String> = c.dns.allow.clone().unwrap().iter().map(|n| n.to_string()).collect();
        assert_eq!(allow, ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "10.1.0.0/16"]);
        assert!(parse(&c.to_yaml()).unwrap() == c);
        let c = parse("site: a\ndns:\n  allow: []\n").unwrap();
        assert_eq!(c.dns.allow, Some(vec![]));
        let e = err("site: a\ndns:\n  allow: [everyone]\n");
        assert!(
            e.contains("dns.allow") && e.contains("line 3") && e.contains("not a network"),
            "{e}"
        );
    }

    #[test]
    fn which_changes_need_a_restart() {
        let running = parse("site: a\n").unwrap();
        let live =
            parse("site: a\nnamespace: grid\ndns:\n  upstream: [\"10.0.0.1:53\"]\n  ttl: 9\n  allow: [10.0.0.0/8]\n")
                .unwrap();
        assert!(live.restart_needed(&running).is_empty());
        let not_live = parse(
            "site: a\nlisten: 0.0.0.0:7401\ndns:\n  listen: [\"127.0.0.1:5354\"]\nmetrics: 127.0.0.1:9401\nlinks:\n  down_after: 1s\nlimits:\n  max_flows: 10\n",
        )
        .unwrap();
        assert_eq!(
            not_live.restart_needed(&running),
            ["listen", "dns.listen", "links", "limits", "metrics"]
        );
    }
}
