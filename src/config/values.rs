//! Checks of single values (addresses, CIDRs, durations, numbers, host names, the DNS zone)
//! and the serde visitors that run them. Each check runs inside serde_yaml's visit of the
//! value, so its error carries the value's key path and line.
//!
//! Why visitors and not `#[serde(try_from = ...)]` types: serde's `try_from` deserializes the
//! plain value first and converts it after serde_yaml's visit has returned, and serde_yaml
//! attaches a position only to errors raised during a visit, so the error would be reported
//! against the enclosing mapping instead (`vips: ... at line 2` for a bad `vips.cidr` on line
//! 3; no line at all at the top level). Checked by trying each kind, so every check here
//! stays a visitor; [`crate::names::Label`] carries its visitor in its own `Deserialize`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

use crate::names::{LABEL_RULE, Label, is_dns_label};

/// Largest TTL accepted: one day.
const MAX_TTL: u64 = 86_400;
/// Host bits a VIP block must have at least, since blocks are carved per site.
const MIN_VIP_HOST_BITS: u8 = 16;

// ---------------------------------------------------------------------------
// Checks of single values. Each runs inside serde_yaml's visit of the value,
// so its error gets the value's key path and line.

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

/// `vips.block`: one of the range's 256 blocks ([`crate::vips::BLOCKS`]).
fn check_block(n: i128) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|b| *b < crate::vips::BLOCKS)
        .ok_or_else(|| format!("block {n} is out of range: use 0 to {}", crate::vips::BLOCKS - 1))
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

/// Visits an optional value (`null` or absent: `None`) with a [`StrCheck`] or an
/// [`IntCheck`]. (`Option<T>` checked after deserializing would lose the key and line.)
struct OptCheck<S>(S);

impl<'de, S: DeserializeSeed<'de> + Visitor<'de>> Visitor<'de> for OptCheck<S> {
    type Value = Option<<S as DeserializeSeed<'de>>::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Visitor::expecting(&self.0, f)?;
        f.write_str(" or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        DeserializeSeed::deserialize(self.0, d).map(Some)
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

impl<'de, T> DeserializeSeed<'de> for IntCheck<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_u64(self)
    }
}

// ---------------------------------------------------------------------------
// `deserialize_with` functions.

const SOCKET_ADDR: StrCheck<SocketAddr> = StrCheck {
    expecting: "a socket address ip:port",
    check: check_socket_addr,
};
const HOST_PORT: StrCheck<String> = StrCheck {
    expecting: "host:port",
    check: check_host_port,
};

/// An optional DNS-1123 label kept as a `String` (see [`crate::names::de_label_string`]):
/// `Option<Label>`'s own visit of the text keeps the key and line.
pub(super) fn de_opt_label_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Label>::deserialize(d).map(|l| l.map(String::from))
}

pub(super) fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    d.deserialize_str(SOCKET_ADDR)
}

pub(super) fn de_socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    d.deserialize_seq(SeqCheck(SOCKET_ADDR))
}

pub(super) fn de_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
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

pub(super) fn de_opt_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    d.deserialize_seq(SeqCheck(StrCheck {
        expecting: "a list of CIDRs",
        check: check_net,
    }))
    .map(Some)
}

pub(super) fn de_opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    d.deserialize_option(OptCheck(SOCKET_ADDR))
}

pub(super) fn de_host_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_seq(SeqCheck(HOST_PORT))
}

pub(super) fn de_opt_host_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_option(OptCheck(HOST_PORT))
}

pub(super) fn de_zone<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "a DNS name",
        check: check_zone,
    })
}

pub(super) fn de_cidr<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "a CIDR block",
        check: check_cidr,
    })
}

pub(super) fn de_ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "an IP address",
        check: check_ip,
    })
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(StrCheck {
        expecting: "a duration such as 60s",
        check: check_duration,
    })
}

pub(super) fn de_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    d.deserialize_u64(IntCheck {
        expecting: "a TTL in seconds",
        check: check_ttl,
    })
}

pub(super) fn de_block<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    d.deserialize_option(OptCheck(IntCheck {
        expecting: "a block number 0-255",
        check: check_block,
    }))
}

pub(super) fn de_max_flows<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    d.deserialize_u64(IntCheck {
        expecting: "a positive number",
        check: check_max_flows,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ipnet::IpNet;

    use crate::config::test_support::{SPEC, err, parse};

    #[test]
    fn bad_site() {
        let e = err("namespace: default\nsite: London_1\n");
        assert!(e.contains("site: `London_1` is not a valid name"), "{e}");
        assert!(e.contains("DNS-1123 label"), "{e}");
        assert!(e.contains("line 2"), "{e}");
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
    fn block_out_of_range_names_key_and_line() {
        let e = err("site: a\nvips:\n  cidr: 127.77.0.0/16\n  block: 300\n");
        assert!(e.contains("vips.block: block 300 is out of range"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        assert_eq!(parse("site: a\nvips:\n  block: 255\n").unwrap().vips.block, Some(255));
        assert_eq!(parse("site: a\nvips:\n  block: null\n").unwrap().vips.block, None);
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
}
