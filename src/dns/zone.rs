//! What the responder answers: a pure function of one parsed request, the latest catalog
//! [`View`] and this site's [`Authority`] (zone, site, TTL, whether to forward).
//!
//! Nothing is cached: every answer is computed from the view it is given, so an endpoint that
//! is withdrawn or marked not ready is gone from the very next answer.
//!
//! Names in the zone (MCS-API DNS, KEP-1645; docs/REFERENCE.md "Names"), labels compared without regard
//! to case:
//!
//! | name | records |
//! |---|---|
//! | `<zone>` | SOA, NS `ns.dns.<zone>` (so resolvers that prime a stub zone, unbound's `stub-prime` and BIND's stub zones, find the server) |
//! | `ns.dns.<zone>` | A/AAAA: the responder's address the query was sent to (or its configured `dns.listen` addresses) |
//! | `dns-version.<zone>` | TXT `"1.0.0"` |
//! | `<svc>.<ns>.svc.<zone>` | A/AAAA of every answerable endpoint, in every site |
//! | `<host>.<site>.<svc>.<ns>.svc.<zone>` | A/AAAA of that endpoint |
//! | `_<port>._<tcp\|udp>.<svc>.<ns>.svc.<zone>` | SRV `0 10 <port> <host>.<site>.<svc>.<ns>.svc.<zone>` per answerable endpoint exporting the port, with the targets' addresses as glue |
//!
//! An endpoint is **answerable** when it is ready and has an address for this site: its real
//! address (`ip`) if it belongs to this site, its VIP otherwise (an endpoint of another site
//! without a VIP is left out: nothing here could reach it). All SRV records have priority 0
//! and weight 10: every member of a grid is an equal peer, wherever it runs. A service whose
//! sites export a port under the same name with different numbers gets, per endpoint, the
//! number its own site exports.
//!
//! Negative answers carry the zone's SOA in the authority section (RFC 2308; its TTL and
//! minimum are `dns.ttl`). A name with none of these records is NXDOMAIN (a service with no
//! answerable endpoint included), except the empty non-terminals above existing names
//! (`svc.<zone>`, `<ns>.svc.<zone>`, `<site>.<svc>…`, `_tcp.<svc>…`), which exist without
//! records (RFC 8020) and, like an existing name asked for a type it lacks, get NODATA
//! (NOERROR, no answer, SOA).
//!
//! Outside the zone, PTR queries for an address this site hands out (the VIPs of every site,
//! the real addresses of this site's endpoints) are answered with the per-endpoint name(s);
//! every other name is forwarded when an upstream is configured and REFUSED otherwise.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::DnsError;
use super::wire::{Request, Response};
use crate::catalog::{EndpointView, ServiceView, View};
use crate::names::{PortSpec, Protocol};

/// The text of `dns-version.<zone>` TXT: the MCS DNS schema version implemented.
pub const SCHEMA_VERSION: &str = "1.0.0";

/// SRV priority of every record: all endpoints are equally preferred.
pub const SRV_PRIORITY: u16 = 0;
/// SRV weight of every record: equal, so clients spread over all endpoints.
pub const SRV_WEIGHT: u16 = 10;

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Send this response.
    Respond(Response),
    /// The name is not ours: ask the upstream resolvers.
    Forward,
}

/// Everything about this responder that does not change while it runs.
#[derive(Debug, Clone)]
pub struct Authority {
    /// The zone apex, lowercase and fully qualified (`clusterset.local.`).
    zone: Name,
    /// Labels in `zone`, to split a query name into its part below the apex.
    zone_labels: usize,
    /// This agent's site: its endpoints are answered with their real addresses.
    site: String,
    /// TTL of every record, and the negative-caching TTL (short: endpoints come and go).
    ttl: u32,
    /// Whether names outside the zone are forwarded (an upstream is configured). Without one
    /// they are REFUSED, so the responder never becomes an open resolver by accident.
    forward: bool,
    /// The zone's SOA record, for the authority section of negative answers.
    soa: Record,
    /// The zone's name server, `ns.dns.<zone>` (also the SOA's MNAME).
    ns: Name,
    /// Addresses `ns` resolves to when the address a query was sent to is not known (the
    /// specific addresses of `dns.listen`).
    ns_addrs: Vec<IpAddr>,
}

impl Authority {
    /// The authority for `zone` (e.g. `clusterset.local`) at `site`.
    pub fn new(zone: &str, site: &str, ttl: u32, forward: bool) -> Result<Authority, DnsError> {
        let invalid = |reason: String| DnsError::Zone {
            zone: zone.to_string(),
            reason,
        };
        let apex = Name::from_ascii(zone.trim_end_matches('.'))
            .map_err(|e| invalid(e.to_string()))?
            .to_lowercase();
        let mut apex = apex;
        apex.set_fqdn(true);
        if apex.is_root() {
            return Err(invalid("the root cannot be the zone".into()));
        }
        let sub = |labels: &[&[u8]]| {
            Name::from_labels(labels.iter().copied())
                .and_then(|n| n.append_domain(&apex))
                .map_err(|e| invalid(e.to_string()))
        };
        let ns = sub(&[b"ns", b"dns"])?;
        let soa = SOA::new(ns.clone(), sub(&[b"hostmaster"])?, 1, 7200, 1800, 86400, ttl);
        Ok(Authority {
            zone_labels: apex.iter().len(),
            soa: Record::from_rdata(apex.clone(), ttl, RData::SOA(soa)),
            zone: apex,
            site: site.to_string(),
            ttl,
            forward,
            ns,
            ns_addrs: Vec::new(),
        })
    }

    /// Sets the addresses the zone's NS name resolves to when a query's own destination is
    /// not known; unspecified addresses (wildcard listeners) are left out.
    pub fn with_ns_addrs(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.ns_addrs = addrs.into_iter().filter(|a| !a.is_unspecified()).collect();
        self
    }

    /// The zone apex.
    pub fn zone(&self) -> &Name {
        &self.zone
    }

    /// Whether names outside the zone are forwarded.
    pub fn forwards(&self) -> bool {
        self.forward
    }

    /// Answers `request` from `view`.
    pub fn answer(&self, request: &Request, view: &View) -> Answer {
        let mut response = Response::to(request);
        response.metadata.recursion_available = self.forward;
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            response.metadata.response_code = ResponseCode::BADVERS;
            return Answer::Respond(response);
        }
        let query = &request.query;
        let class_in = matches!(query.query_class(), DNSClass::IN | DNSClass::ANY);
        if self.zone.zone_of(query.name()) {
            if !class_in || matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR) {
                // Other classes have no data here; zone transfers are not offered.
                response.metadata.response_code = ResponseCode::Refused;
            } else {
                response.metadata.authoritative = true;
                self.in_zone(query, view, request.server, request.local, &mut response);
            }
            return Answer::Respond(response);
        }
        if class_in && matches!(query.query_type(), RecordType::PTR | RecordType::ANY) {
            if let Some(addr) = reverse_address(query.name()) {
                let targets = self.ptr_targets(addr, view);
                if !targets.is_empty() {
                    response.metadata.authoritative = true;
                    response.answers = targets
                        .into_iter()
                        .map(|t| Record::from_rdata(query.name().clone(), self.ttl, RData::PTR(PTR(t))))
                        .collect();
                    return Answer::Respond(response);
                }
            }
        }
        if self.forward {
            Answer::Forward
        } else {
            response.metadata.response_code = ResponseCode::Refused;
            Answer::Respond(response)
        }
    }

    /// Fills `response` for a name inside the zone.
    fn in_zone(&self, query: &Query, view: &View, server: Option<IpAddr>, local: bool, response: &mut Response) {
        // No name in the zone has more than five labels below the apex.
        let depth = query.name().iter().len().saturating_sub(self.zone_labels);
        let mut below: [&[u8]; 5] = [&[]; 5];
        for (slot, label) in below.iter_mut().zip(query.name().iter()) {
            *slot = label;
        }
        let node = match below.get(..depth) {
            Some(below) => self.node(below, query.name(), view, server, local),
            None => Node::Missing,
        };
        match node {
            Node::Missing => {
                response.metadata.response_code = ResponseCode::NXDomain;
                response.authorities.push(self.soa.clone());
            }
            Node::Exists { records, glue } => {
                let qtype = query.query_type();
                response.answers = records
                    .into_iter()
                    .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                    .collect();
                if response.answers.is_empty() {
                    response.authorities.push(self.soa.clone());
                } else if matches!(qtype, RecordType::SRV | RecordType::NS | RecordType::ANY) {
                    response.additionals = glue;
                }
            }
        }
    }

    /// The records at the name whose labels below the apex are `below` (left to right), for
    /// an asker in this agent's network namespace (`local`) or not.
    fn node(&self, below: &[&[u8]], owner: &Name, view: &View, server: Option<IpAddr>, local: bool) -> Node {
        let exists = |yes: bool| if yes { Node::empty() } else { Node::Missing };
        // The name server's addresses: the one this query reached, else the configured ones.
        let ns_addrs = || -> Vec<IpAddr> {
            match server.filter(|a| !a.is_unspecified()) {
                Some(a) => vec![a],
                None => self.ns_addrs.clone(),
            }
        };
        match below {
            [] => Node::Exists {
                records: vec![
                    self.soa.clone(),
                    Record::from_rdata(owner.clone(), self.ttl, RData::NS(NS(self.ns.clone()))),
                ],
                glue: self.address_records(&self.ns, ns_addrs().into_iter()),
            },
            [l] if eq(l, "dns") => Node::empty(),
            [n, l] if eq(n, "ns") && eq(l, "dns") => Node::with(self.address_records(owner, ns_addrs().into_iter())),
            [l] if eq(l, "dns-version") => Node::with(vec![Record::from_rdata(
                owner.clone(),
                self.ttl,
                RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
            )]),
            [l] if eq(l, "svc") => exists(view.services.iter().any(|s| self.answerable(s, local).next().is_some())),
            [ns, l] if eq(l, "svc") => exists(
                view.services
                    .iter()
                    .any(|s| eq(ns, &s.namespace) && self.answerable(s, local).next().is_some()),
            ),
            [svc, ns, l] if eq(l, "svc") => match find(view, svc, ns) {
                Some(s) => Node::with(self.address_records(owner, self.answerable(s, local).map(|(_, a)| a))),
                None => Node::Missing,
            },
            [x, svc, ns, l] if eq(l, "svc") => match find(view, svc, ns) {
                Some(s) if x.starts_with(b"_") => exists(protocol(x).is_some_and(|p| {
                    self.answerable(s, local)
                        .any(|(e, _)| ports(view, s, e).any(|q| q.protocol == p))
                })),
                Some(s) => exists(self.answerable(s, local).any(|(e, _)| eq(x, &e.site))),
                None => Node::Missing,
            },
            [y, x, svc, ns, l] if eq(l, "svc") => match find(view, svc, ns) {
                Some(s) if x.starts_with(b"_") => self.srv(view, s, y, x, owner, local),
                Some(s) => Node::with(
                    self.address_records(
                        owner,
                        self.answerable(s, local)
                            .filter(|(e, _)| eq(x, &e.site) && eq(y, &e.hostname))
                            .map(|(_, a)| a),
                    ),
                ),
                None => Node::Missing,
            },
            _ => Node::Missing,
        }
    }

    /// `_<port>._<proto>.<svc>.<ns>.svc.<zone>`.
    fn srv(&self, view: &View, service: &ServiceView, port: &[u8], proto: &[u8], owner: &Name, local: bool) -> Node {
        let (Some(protocol), Some(port_name)) = (protocol(proto), port.strip_prefix(b"_")) else {
            return Node::Missing;
        };
        let mut records = Vec::new();
        let mut glue = Vec::new();
        for (e, addr) in self.answerable(service, local) {
            let Some(target) = self.endpoint_name(e, service) else {
                continue;
            };
            let mut any = false;
            for p in ports(view, service, e).filter(|p| p.protocol == protocol && eq(port_name, &p.name)) {
                any = true;
                records.push(Record::from_rdata(
                    owner.clone(),
                    self.ttl,
                    RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, p.port, target.clone())),
                ));
            }
            if any {
                glue.push(self.address_record(&target, addr));
            }
        }
        // No duplicates to remove: a site's endpoints have distinct hostnames and its ports
        // distinct names, so each (endpoint, port) is one record and each target one glue.
        if records.is_empty() {
            return Node::Missing;
        }
        Node::Exists { records, glue }
    }

    /// The ready endpoints of `service` this site can answer with, and their addresses for
    /// a `local` asker or another.
    fn answerable<'v>(
        &'v self,
        service: &'v ServiceView,
        local: bool,
    ) -> impl Iterator<Item = (&'v EndpointView, IpAddr)> + 'v {
        service
            .endpoints
            .iter()
            .filter_map(move |e| self.address(e, local).map(|a| (e, a)))
    }

    /// The address `e` is answered with at this site, if it is answered at all (docs/REFERENCE.md "Names":
    /// every address handed out is one the asker can use and hand on to its peers in other
    /// sites). Another site's endpoint: its VIP. One of this site's: its VIP for an asker in
    /// this agent's network namespace (`local`: a sidecar's pod, a plain Linux site's host),
    /// which this agent serves; its real address for other clients of the site (other pods
    /// asking a gateway), or when it has no VIP.
    fn address(&self, e: &EndpointView, local: bool) -> Option<IpAddr> {
        if !e.ready {
            None
        } else if e.site == self.site {
            Some(e.vip.filter(|_| local).unwrap_or(e.ip))
        } else {
            e.vip
        }
    }

    /// A/AAAA records of `owner` for `addrs`, each address once (two endpoints of this site
    /// may share one): an RRset has no duplicates (RFC 2181 §5).
    fn address_records(&self, owner: &Name, addrs: impl Iterator<Item = IpAddr>) -> Vec<Record> {
        let mut addrs: Vec<IpAddr> = addrs.collect();
        // Duplicates are rare (VIPs are unique; only this site's real addresses may repeat):
        // look for one cheaply, and only then remove them keeping the first of each.
        let repeated = if addrs.len() <= 16 {
            addrs.iter().enumerate().any(|(i, a)| addrs[..i].contains(a))
        } else {
            let mut sorted = addrs.clone();
            sorted.sort_unstable();
            sorted.windows(2).any(|w| w[0] == w[1])
        };
        if repeated {
            let mut seen = HashSet::with_capacity(addrs.len());
            addrs.retain(|a| seen.insert(*a));
        }
        addrs.into_iter().map(|a| self.address_record(owner, a)).collect()
    }

    fn address_record(&self, owner: &Name, addr: IpAddr) -> Record {
        let data = match addr {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        };
        Record::from_rdata(owner.clone(), self.ttl, data)
    }

    /// `<host>.<site>.<svc>.<ns>.svc.<zone>`, if it fits in 255 bytes.
    fn endpoint_name(&self, e: &EndpointView, service: &ServiceView) -> Option<Name> {
        let labels = [&e.hostname, &e.site, &service.service, &service.namespace, "svc"];
        Name::from_labels(labels.iter().map(|l| l.as_bytes()))
            .and_then(|n| n.append_domain(&self.zone))
            .ok()
    }

    /// The per-endpoint names of the endpoints this site hands out `addr` for, sorted.
    fn ptr_targets(&self, addr: IpAddr, view: &View) -> Vec<Name> {
        let mut names = Vec::new();
        for s in &view.services {
            for e in &s.endpoints {
                let handed_out = e.ready && (e.vip == Some(addr) || (e.site == self.site && e.ip == addr));
                if handed_out {
                    names.extend(self.endpoint_name(e, s));
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

/// The records at a name, or that it does not exist.
enum Node {
    Missing,
    /// The name exists (possibly as an empty non-terminal, with no records).
    Exists {
        records: Vec<Record>,
        glue: Vec<Record>,
    },
}

impl Node {
    /// An empty non-terminal: exists, no records.
    fn empty() -> Node {
        Node::Exists {
            records: Vec::new(),
            glue: Vec::new(),
        }
    }

    /// A name that has `records`; none means it does not exist.
    fn with(records: Vec<Record>) -> Node {
        if records.is_empty() {
            return Node::Missing;
        }
        Node::Exists {
            records,
            glue: Vec::new(),
        }
    }
}

/// A label equals a catalog name, ignoring ASCII case.
fn eq(label: &[u8], name: &str) -> bool {
    label.eq_ignore_ascii_case(name.as_bytes())
}

fn find<'v>(view: &'v View, service: &[u8], namespace: &[u8]) -> Option<&'v ServiceView> {
    view.services
        .iter()
        .find(|s| eq(service, &s.service) && eq(namespace, &s.namespace))
}

/// `_tcp` or `_udp`.
fn protocol(label: &[u8]) -> Option<Protocol> {
    if eq(label, "_tcp") {
        Some(Protocol::Tcp)
    } else if eq(label, "_udp") {
        Some(Protocol::Udp)
    } else {
        None
    }
}

/// The ports endpoint `e` serves: those its own site exports (found through its VIP), or
/// the service's merged ports when it has no VIP.
fn ports<'v>(view: &'v View, service: &'v ServiceView, e: &EndpointView) -> impl Iterator<Item = &'v PortSpec> + 'v {
    let own = e
        .vip
        .and_then(|v| view.vips.get(&v))
        .filter(|t| t.site == e.site && t.hostname == e.hostname)
        .map(|t| t.ports.as_slice());
    own.unwrap_or(&service.ports).iter()
}

/// The address a reverse-mapping name stands for: `d.c.b.a.in-addr.arpa.` (decimal octets
/// without leading zeros) or the 32 nibbles of `….ip6.arpa.`; `None` for anything else,
/// including partial names such as `77.127.in-addr.arpa.`.
pub fn reverse_address(name: &Name) -> Option<IpAddr> {
    let labels: Vec<&[u8]> = name.iter().collect();
    match labels.as_slice() {
        [d, c, b, a, inaddr, arpa] if eq(inaddr, "in-addr") && eq(arpa, "arpa") => {
            let octet = |l: &[u8]| -> Option<u8> {
                let digits = l.iter().all(u8::is_ascii_digit) && !l.is_empty() && l.len() <= 3;
                if !digits || (l.len() > 1 && l[0] == b'0') {
                    return None;
                }
                std::str::from_utf8(l).ok()?.parse().ok()
            };
            Some(IpAddr::V4(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?)))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && eq(ip6, "ip6") && eq(arpa, "arpa") => {
            let mut value: u128 = 0;
            for l in nibbles.iter().rev() {
                let [c] = l[..] else { return None };
                let digit = char::from(c).to_digit(16)?;
                value = (value << 4) | u128::from(digit);
            }
            Some(IpAddr::V6(Ipv6Addr::from(value)))
        }
        _ => None,
    }
}

/// The reverse-mapping name of `addr` (`4.3.2.1.in-addr.arpa.`), for `causeway resolve` and
/// tests.
pub fn reverse_name(addr: IpAddr) -> Name {
    let text = match addr {
        IpAddr::V4(a) => {
            let [a, b, c, d] = a.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        IpAddr::V6(a) => {
            let mut s = String::with_capacity(72);
            for byte in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    // Digits, hex letters and dots: always a valid name.
    Name::from_ascii(text).unwrap_or_else(|_| Name::root())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::Transport;
    use hickory_proto::op::{Edns, Message};

    const ZONE: &str = "clusterset.local";

    fn ep(site: &str, host: &str, ip: &str, vip: Option<&str>, ready: bool) -> EndpointView {
        EndpointView {
            site: site.into(),
            hostname: host.into(),
            ip: ip.parse().unwrap(),
            vip: vip.map(|v| v.parse().unwrap()),
            ready,
        }
    }

    fn port(name: &str, port: u16, protocol: Protocol) -> PortSpec {
        PortSpec {
            name: name.into(),
            port,
            protocol,
        }
    }

    /// etcd in london (2) and paris (1, plus one not ready); redis in tokyo with no VIP;
    /// v6app in paris on IPv6 only; down in london, nothing ready.
    fn view() -> View {
        let etcd_ports = vec![port("client", 2379, Protocol::Tcp), port("gossip", 7946, Protocol::Udp)];
        let services = vec![
            ServiceView {
                service: "etcd".into(),
                namespace: "default".into(),
                ports: etcd_ports.clone(),
                endpoints: vec![
                    ep("london", "etcd-0", "10.1.0.1", Some("127.77.1.10"), true),
                    ep("london", "etcd-1", "10.1.0.2", Some("127.77.1.11"), true),
                    ep("paris", "etcd-0", "10.1.0.1", Some("127.77.2.10"), true),
                    ep("paris", "etcd-2", "10.1.0.3", Some("127.77.2.12"), false),
                ],
            },
            ServiceView {
                service: "redis".into(),
                namespace: "cache".into(),
                ports: vec![port("redis", 6379, Protocol::Tcp)],
                endpoints: vec![ep("tokyo", "redis-0", "10.2.0.1", None, true)],
            },
            ServiceView {
                service: "v6app".into(),
                namespace: "default".into(),
                ports: vec![port("http", 80, Protocol::Tcp)],
                endpoints: vec![ep("paris", "v6-0", "fd00::1", Some("fd77::2:1"), true)],
            },
            ServiceView {
                service: "down".into(),
                namespace: "default".into(),
                ports: vec![port("http", 80, Protocol::Tcp)],
                endpoints: vec![ep("london", "down-0", "10.1.0.9", Some("127.77.1.99"), false)],
            },
        ];
        crate::dns::fuzzing::view_of(services)
    }

    fn auth(site: &str, forward: bool) -> Authority {
        Authority::new(ZONE, site, 5, forward).unwrap()
    }

    fn request(name: &str, qtype: RecordType) -> Request {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        Request::parse(&m.to_vec().unwrap()).unwrap()
    }

    fn ask_with(a: &Authority, v: &View, name: &str, qtype: RecordType) -> Response {
        match a.answer(&request(name, qtype), v) {
            Answer::Respond(r) => r,
            Answer::Forward => panic!("{name} {qtype} was forwarded"),
        }
    }

    /// Asks paris (forwarding off).
    fn ask(name: &str, qtype: RecordType) -> Response {
        ask_with(&auth("paris", false), &view(), name, qtype)
    }

    fn rdata(r: &Response) -> Vec<String> {
        r.answers.iter().map(|r| r.data.to_string()).collect()
    }

    fn assert_negative(r: &Response, rcode: ResponseCode) {
        assert_eq!(r.rcode(), rcode, "{r:?}");
        assert!(r.answers.is_empty(), "{r:?}");
        assert!(r.metadata.authoritative);
        assert_eq!(r.authorities.len(), 1);
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(r.authorities[0].name.to_ascii(), "clusterset.local.");
        let RData::SOA(soa) = &r.authorities[0].data else {
            panic!()
        };
        assert_eq!(soa.minimum, 5);
    }

    #[test]
    fn service_name_lists_every_ready_endpoint_local_by_ip_remote_by_vip() {
        let r = ask("etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(r.rcode(), ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.authorities.is_empty());
        // london's two by VIP; paris's own etcd-0 by its real address; etcd-2 is not ready.
        assert_eq!(rdata(&r), ["127.77.1.10", "127.77.1.11", "10.1.0.1"]);
        assert!(r.answers.iter().all(|a| a.ttl == 5));
        // From london the picture flips.
        let r = ask_with(
            &auth("london", false),
            &view(),
            "etcd.default.svc.clusterset.local.",
            RecordType::A,
        );
        assert_eq!(rdata(&r), ["10.1.0.1", "10.1.0.2", "127.77.2.10"]);
        // From tokyo, redis-0 is local (no VIP needed); from paris it cannot be reached.
        let r = ask_with(
            &auth("tokyo", false),
            &view(),
            "redis.cache.svc.clusterset.local.",
            RecordType::A,
        );
        assert_eq!(rdata(&r), ["10.2.0.1"]);
        assert_negative(
            &ask("redis.cache.svc.clusterset.local.", RecordType::A),
            ResponseCode::NXDomain,
        );
    }

    /// docs/REFERENCE.md "Names": an asker in the agent's own network namespace (a sidecar's pod, a plain
    /// Linux site's host) gets this site's endpoints, its own included, at their VIPs, which
    /// are valid in every site; other askers of the site (other pods) get real addresses.
    #[test]
    fn local_askers_get_this_sites_endpoints_at_their_vips() {
        let london = auth("london", false);
        let local = |name: &str, qtype| {
            let mut req = request(name, qtype);
            req.local = true;
            match london.answer(&req, &view()) {
                Answer::Respond(r) => r,
                Answer::Forward => panic!("forwarded"),
            }
        };
        let r = local("etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.77.1.10", "127.77.1.11", "127.77.2.10"]);
        let r = local("etcd-0.london.etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.77.1.10"]);
        let r = local("_client._tcp.etcd.default.svc.clusterset.local.", RecordType::SRV);
        let glue: Vec<String> = r.additionals.iter().map(|g| g.data.to_string()).collect();
        assert_eq!(glue, ["127.77.1.10", "127.77.1.11", "127.77.2.10"]);
        // Not local: the real addresses, as before.
        let r = ask_with(
            &london,
            &view(),
            "etcd-0.london.etcd.default.svc.clusterset.local.",
            RecordType::A,
        );
        assert_eq!(rdata(&r), ["10.1.0.1"]);
        // An endpoint of this site without a VIP is still answered, by its real address.
        let tokyo = auth("tokyo", false);
        let mut req = request("redis.cache.svc.clusterset.local.", RecordType::A);
        req.local = true;
        let Answer::Respond(r) = tokyo.answer(&req, &view()) else {
            panic!("forwarded")
        };
        assert_eq!(rdata(&r), ["10.2.0.1"]);
        // PTR: both addresses of a local endpoint name it.
        for addr in ["127.77.1.10", "10.1.0.1"] {
            let name = reverse_name(addr.parse().unwrap()).to_ascii();
            let r = ask_with(&london, &view(), &name, RecordType::PTR);
            assert_eq!(
                rdata(&r),
                ["etcd-0.london.etcd.default.svc.clusterset.local."],
                "{addr}"
            );
        }
    }

    #[test]
    fn two_local_endpoints_on_one_address_give_one_record() {
        let mut v = view();
        v.services[0].endpoints[1].ip = "10.1.0.1".parse().unwrap();
        let r = ask_with(
            &auth("london", false),
            &v,
            "etcd.default.svc.clusterset.local.",
            RecordType::A,
        );
        assert_eq!(rdata(&r), ["10.1.0.1", "127.77.2.10"]);
    }

    #[test]
    fn per_endpoint_names() {
        let r = ask("etcd-1.london.etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.77.1.11"]);
        let r = ask("etcd-0.paris.etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["10.1.0.1"]);
        // Same hostname, other site: other record.
        let r = ask("etcd-0.london.etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.77.1.10"]);
        // Not ready: gone.
        assert_negative(
            &ask("etcd-2.paris.etcd.default.svc.clusterset.local.", RecordType::A),
            ResponseCode::NXDomain,
        );
        assert_negative(
            &ask("etcd-9.paris.etcd.default.svc.clusterset.local.", RecordType::A),
            ResponseCode::NXDomain,
        );
    }

    #[test]
    fn aaaa_records_and_nodata_for_the_other_family() {
        let r = ask("v6app.default.svc.clusterset.local.", RecordType::AAAA);
        assert_eq!(rdata(&r), ["fd00::1"]);
        assert_negative(
            &ask("v6app.default.svc.clusterset.local.", RecordType::A),
            ResponseCode::NoError,
        );
        assert_negative(
            &ask("etcd.default.svc.clusterset.local.", RecordType::AAAA),
            ResponseCode::NoError,
        );
        let r = ask_with(
            &auth("london", false),
            &view(),
            "v6-0.paris.v6app.default.svc.clusterset.local.",
            RecordType::AAAA,
        );
        assert_eq!(rdata(&r), ["fd77::2:1"]);
    }

    #[test]
    fn srv_one_per_endpoint_per_named_port_with_glue() {
        let r = ask("_client._tcp.etcd.default.svc.clusterset.local.", RecordType::SRV);
        assert_eq!(
            rdata(&r),
            [
                "0 10 2379 etcd-0.london.etcd.default.svc.clusterset.local.",
                "0 10 2379 etcd-1.london.etcd.default.svc.clusterset.local.",
                "0 10 2379 etcd-0.paris.etcd.default.svc.clusterset.local.",
            ]
        );
        let glue: Vec<String> = r.additionals.iter().map(|g| format!("{} {}", g.name, g.data)).collect();
        assert_eq!(
            glue,
            [
                "etcd-0.london.etcd.default.svc.clusterset.local. 127.77.1.10",
                "etcd-1.london.etcd.default.svc.clusterset.local. 127.77.1.11",
                "etcd-0.paris.etcd.default.svc.clusterset.local. 10.1.0.1",
            ]
        );
        let r = ask("_gossip._udp.etcd.default.svc.clusterset.local.", RecordType::SRV);
        assert_eq!(r.answers.len(), 3);
        // Wrong protocol, unknown port, other proto label: NXDOMAIN.
        for name in [
            "_gossip._tcp.etcd.default.svc.clusterset.local.",
            "_peer._tcp.etcd.default.svc.clusterset.local.",
            "_client._sctp.etcd.default.svc.clusterset.local.",
            "client._tcp.etcd.default.svc.clusterset.local.",
        ] {
            assert_negative(&ask(name, RecordType::SRV), ResponseCode::NXDomain);
        }
        // The SRV name exists: A there is NODATA, with no glue.
        let r = ask("_client._tcp.etcd.default.svc.clusterset.local.", RecordType::A);
        assert_negative(&r, ResponseCode::NoError);
        assert!(r.additionals.is_empty());
    }

    #[test]
    fn srv_ports_are_the_ones_each_site_exports() {
        let mut v = view();
        // london exports `client` on 3379.
        for t in v.vips.values_mut().filter(|t| t.site == "london") {
            t.ports = vec![port("client", 3379, Protocol::Tcp)];
        }
        let r = ask_with(
            &auth("paris", false),
            &v,
            "_client._tcp.etcd.default.svc.clusterset.local.",
            RecordType::SRV,
        );
        let ports: Vec<u16> = r
            .answers
            .iter()
            .map(|a| match &a.data {
                RData::SRV(s) => s.port,
                _ => 0,
            })
            .collect();
        assert_eq!(ports, [3379, 3379, 2379]);
    }

    #[test]
    fn dns_version_and_apex() {
        let r = ask("dns-version.clusterset.local.", RecordType::TXT);
        let RData::TXT(txt) = &r.answers[0].data else { panic!() };
        assert_eq!(txt.txt_data.len(), 1);
        assert_eq!(&*txt.txt_data[0], b"1.0.0");
        assert_negative(
            &ask("dns-version.clusterset.local.", RecordType::A),
            ResponseCode::NoError,
        );
        let r = ask("clusterset.local.", RecordType::SOA);
        assert_eq!(
            rdata(&r),
            ["ns.dns.clusterset.local. hostmaster.clusterset.local. 1 7200 1800 86400 5"]
        );
        assert_negative(&ask("clusterset.local.", RecordType::A), ResponseCode::NoError);
    }

    #[test]
    fn the_apex_has_ns_and_the_ns_name_resolves() {
        // Resolvers that prime a stub zone (unbound stub-prime, BIND stub zones) ask the apex
        // for NS, then the NS name for its address.
        let configured = auth("paris", false).with_ns_addrs(["0.0.0.0".parse().unwrap(), "127.0.0.1".parse().unwrap()]);
        let v = view();
        let r = ask_with(&configured, &v, "clusterset.local.", RecordType::NS);
        assert!(r.metadata.authoritative);
        assert_eq!(rdata(&r), ["ns.dns.clusterset.local."]);
        let glue: Vec<String> = r.additionals.iter().map(|a| format!("{} {}", a.name, a.data)).collect();
        assert_eq!(glue, ["ns.dns.clusterset.local. 127.0.0.1"]);
        let r = ask_with(&configured, &v, "ns.dns.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.0.0.1"]);
        assert_negative(
            &ask_with(&configured, &v, "ns.dns.clusterset.local.", RecordType::AAAA),
            ResponseCode::NoError,
        );
        assert_negative(
            &ask_with(&configured, &v, "dns.clusterset.local.", RecordType::A),
            ResponseCode::NoError,
        );
        // The address the query was sent to wins (a wildcard listener answers with it).
        let mut req = request("ns.dns.clusterset.local.", RecordType::A);
        req.server = Some("10.9.0.53".parse().unwrap());
        let Answer::Respond(r) = configured.answer(&req, &v) else {
            panic!()
        };
        assert_eq!(rdata(&r), ["10.9.0.53"]);
        // ANY at the apex has SOA and NS.
        let r = ask("clusterset.local.", RecordType::ANY);
        let types: Vec<RecordType> = r.answers.iter().map(|a| a.record_type()).collect();
        assert_eq!(types, [RecordType::SOA, RecordType::NS]);
    }

    #[test]
    fn nxdomain_for_unknown_names_and_services_with_nothing_ready() {
        for name in [
            "down.default.svc.clusterset.local.",
            "down-0.london.down.default.svc.clusterset.local.",
            "nope.default.svc.clusterset.local.",
            "etcd.nope.svc.clusterset.local.",
            "www.clusterset.local.",
            "etcd.default.pod.clusterset.local.",
            "a.b.c.d.e.f.g.clusterset.local.",
            "x.etcd-0.london.etcd.default.svc.clusterset.local.",
            "tokyo.etcd.default.svc.clusterset.local.",
            "_http._tcp.down.default.svc.clusterset.local.",
        ] {
            for t in [RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::TXT] {
                assert_negative(&ask(name, t), ResponseCode::NXDomain);
            }
        }
    }

    #[test]
    fn empty_non_terminals_are_nodata() {
        for name in [
            "svc.clusterset.local.",
            "default.svc.clusterset.local.",
            "london.etcd.default.svc.clusterset.local.",
            "_tcp.etcd.default.svc.clusterset.local.",
            "_udp.etcd.default.svc.clusterset.local.",
        ] {
            assert_negative(&ask(name, RecordType::A), ResponseCode::NoError);
        }
        // A namespace whose only service has nothing ready does not exist.
        let mut v = view();
        v.services.retain(|s| s.namespace == "cache");
        assert_negative(
            &ask_with(&auth("paris", false), &v, "cache.svc.clusterset.local.", RecordType::A),
            ResponseCode::NXDomain,
        );
        assert_negative(
            &ask_with(&auth("paris", false), &v, "svc.clusterset.local.", RecordType::A),
            ResponseCode::NXDomain,
        );
        // No UDP port in redis: `_udp` does not exist.
        assert_negative(
            &ask_with(
                &auth("tokyo", false),
                &view(),
                "_udp.redis.cache.svc.clusterset.local.",
                RecordType::A,
            ),
            ResponseCode::NXDomain,
        );
    }

    #[test]
    fn labels_match_without_regard_to_case_and_the_question_case_is_kept() {
        let r = ask("ETCD.Default.SVC.ClusterSet.Local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.77.1.10", "127.77.1.11", "10.1.0.1"]);
        assert_eq!(r.answers[0].name.to_ascii(), "ETCD.Default.SVC.ClusterSet.Local.");
        assert_eq!(
            r.query.as_ref().unwrap().name().to_ascii(),
            "ETCD.Default.SVC.ClusterSet.Local."
        );
        let r = ask("_CLIENT._TCP.etcd.DEFAULT.svc.clusterset.LOCAL.", RecordType::SRV);
        assert_eq!(r.answers.len(), 3);
        let r = ask("Etcd-0.LONDON.etcd.default.svc.clusterset.local.", RecordType::A);
        assert_eq!(rdata(&r), ["127.77.1.10"]);
        let r = ask("DNS-VERSION.clusterset.local.", RecordType::TXT);
        assert_eq!(r.answers.len(), 1);
    }

    #[test]
    fn any_returns_every_record_at_the_name() {
        let r = ask("etcd-0.paris.etcd.default.svc.clusterset.local.", RecordType::ANY);
        assert_eq!(rdata(&r), ["10.1.0.1"]);
        let r = ask("_client._tcp.etcd.default.svc.clusterset.local.", RecordType::ANY);
        assert_eq!(r.answers.len(), 3);
        assert_eq!(r.additionals.len(), 3);
    }

    #[test]
    fn ptr_for_every_address_handed_out() {
        let ptr = |a: &Authority, addr: &str| {
            ask_with(
                a,
                &view(),
                &reverse_name(addr.parse().unwrap()).to_ascii(),
                RecordType::PTR,
            )
        };
        let paris = auth("paris", false);
        // Every site's VIPs, paris's own included.
        let r = ptr(&paris, "127.77.1.11");
        assert!(r.metadata.authoritative);
        assert_eq!(rdata(&r), ["etcd-1.london.etcd.default.svc.clusterset.local."]);
        let r = ptr(&paris, "127.77.2.10");
        assert_eq!(rdata(&r), ["etcd-0.paris.etcd.default.svc.clusterset.local."]);
        // paris's real address.
        let r = ptr(&paris, "10.1.0.1");
        assert_eq!(rdata(&r), ["etcd-0.paris.etcd.default.svc.clusterset.local."]);
        let r = ptr(&paris, "fd77::2:1");
        assert_eq!(rdata(&r), ["v6-0.paris.v6app.default.svc.clusterset.local."]);
        // Not handed out here: london's real address (10.1.0.2), a not-ready VIP, a stranger.
        for addr in ["10.1.0.2", "127.77.2.12", "192.0.2.1", "127.77.1.99"] {
            assert_eq!(ptr(&paris, addr).rcode(), ResponseCode::Refused, "{addr}");
            let name = reverse_name(addr.parse().unwrap()).to_ascii();
            assert_eq!(
                auth("paris", true).answer(&request(&name, RecordType::PTR), &view()),
                Answer::Forward
            );
        }
        // Two endpoints of london on one address both get a name.
        let mut v = view();
        v.services[0].endpoints[1].ip = "10.1.0.1".parse().unwrap();
        v.services[3].endpoints[0].ready = true;
        v.services[3].endpoints[0].ip = "10.1.0.1".parse().unwrap();
        let name = reverse_name("10.1.0.1".parse().unwrap()).to_ascii();
        let r = ask_with(&auth("london", false), &v, &name, RecordType::PTR);
        assert_eq!(
            rdata(&r),
            [
                "down-0.london.down.default.svc.clusterset.local.",
                "etcd-0.london.etcd.default.svc.clusterset.local.",
                "etcd-1.london.etcd.default.svc.clusterset.local.",
            ]
        );
    }

    #[test]
    fn reverse_names_parse_strictly() {
        // Raw labels: a name on the wire may hold any bytes.
        let parse = |s: &str| {
            reverse_address(&Name::from_labels(s.trim_end_matches('.').split('.').map(str::as_bytes)).unwrap())
        };
        assert_eq!(parse("10.0.77.127.in-addr.arpa."), Some("127.77.0.10".parse().unwrap()));
        assert_eq!(parse("10.0.77.127.IN-ADDR.ARPA."), Some("127.77.0.10".parse().unwrap()));
        for bad in [
            "77.127.in-addr.arpa.",
            "1.10.0.77.127.in-addr.arpa.",
            "010.0.77.127.in-addr.arpa.",
            "+1.0.77.127.in-addr.arpa.",
            "256.0.77.127.in-addr.arpa.",
            "x.0.77.127.in-addr.arpa.",
            "10.0.77.127.in-addr.example.",
            "1.0.ip6.arpa.",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        for addr in ["fd77::2:1", "2001:db8::ff00:42:8329", "::1"] {
            let a: IpAddr = addr.parse().unwrap();
            assert_eq!(reverse_address(&reverse_name(a)), Some(a));
            let upper = Name::from_ascii(reverse_name(a).to_ascii().to_uppercase()).unwrap();
            assert_eq!(reverse_address(&upper), Some(a));
        }
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(reverse_name(a).to_ascii(), "7.2.0.192.in-addr.arpa.");
    }

    #[test]
    fn outside_the_zone_forward_or_refuse() {
        let req = request("example.org.", RecordType::A);
        assert_eq!(auth("paris", true).answer(&req, &view()), Answer::Forward);
        let Answer::Respond(r) = auth("paris", false).answer(&req, &view()) else {
            panic!()
        };
        assert_eq!(r.rcode(), ResponseCode::Refused);
        assert!(!r.metadata.authoritative);
        assert!(!r.metadata.recursion_available);
        // A sibling zone that shares a suffix is not ours.
        let req = request("evil-clusterset.local.", RecordType::A);
        assert_eq!(auth("paris", true).answer(&req, &view()), Answer::Forward);
        // In-zone answers say recursion is available when it is.
        let r = ask_with(
            &auth("paris", true),
            &view(),
            "etcd.default.svc.clusterset.local.",
            RecordType::A,
        );
        assert!(r.metadata.recursion_available && r.metadata.recursion_desired);
    }

    #[test]
    fn other_classes_zone_transfers_and_edns_versions() {
        let mut req = request("etcd.default.svc.clusterset.local.", RecordType::A);
        req.query.set_query_class(DNSClass::CH);
        let Answer::Respond(r) = auth("paris", true).answer(&req, &view()) else {
            panic!()
        };
        assert_eq!(r.rcode(), ResponseCode::Refused);
        let r = ask("clusterset.local.", RecordType::AXFR);
        assert_eq!(r.rcode(), ResponseCode::Refused);
        let mut req = request("etcd.default.svc.clusterset.local.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_version(1);
        req.edns = Some(edns);
        let Answer::Respond(r) = auth("paris", false).answer(&req, &view()) else {
            panic!()
        };
        assert_eq!(r.rcode(), ResponseCode::BADVERS);
        assert!(r.edns);
        let m = Message::from_vec(&r.encode(512)).unwrap();
        // 16 is BADVERS with an OPT record (hickory names it BADSIG, the same code).
        assert_eq!(u16::from(m.metadata.response_code), 16);
    }

    #[test]
    fn names_too_long_for_dns_are_left_out() {
        let mut v = view();
        let long = "h".repeat(63);
        v.services[0].service = "s".repeat(63);
        v.services[0].namespace = "n".repeat(63);
        v.services[0].endpoints[2].hostname = long.clone();
        v.services[0].endpoints[2].site = "p".repeat(63);
        // Four 63-byte labels, `svc` and the zone: 278 bytes > 255. The service name fits,
        // this one per-endpoint name does not.
        let svc = format!("{}.{}.svc.clusterset.local.", "s".repeat(63), "n".repeat(63));
        let r = ask_with(&auth("paris", false), &v, &svc, RecordType::A);
        assert_eq!(r.answers.len(), 3);
        let srv = format!("_client._tcp.{svc}");
        let r = ask_with(&auth("paris", false), &v, &srv, RecordType::SRV);
        assert_eq!(r.answers.len(), 2, "the one without a valid name is skipped");
    }

    #[test]
    fn a_withdrawn_endpoint_is_gone_from_the_next_answer() {
        let a = auth("paris", false);
        let mut v = view();
        let req = request("etcd.default.svc.clusterset.local.", RecordType::A);
        let Answer::Respond(before) = a.answer(&req, &v) else {
            panic!()
        };
        assert_eq!(before.answers.len(), 3);
        v.services[0].endpoints[0].ready = false;
        let Answer::Respond(after) = a.answer(&req, &v) else {
            panic!()
        };
        assert_eq!(rdata(&after), ["127.77.1.11", "10.1.0.1"]);
        v.services[0].endpoints.clear();
        let Answer::Respond(gone) = a.answer(&req, &v) else {
            panic!()
        };
        assert_negative(&gone, ResponseCode::NXDomain);
    }

    #[test]
    fn big_answers_truncate_over_udp_and_fit_over_tcp() {
        let mut v = view();
        v.services[0].endpoints = (0..200)
            .map(|i| {
                ep(
                    "london",
                    &format!("etcd-{i}"),
                    "10.1.0.1",
                    Some(&format!("127.77.{}.{}", 1 + i / 250, i % 250)),
                    true,
                )
            })
            .collect();
        let a = auth("paris", false);
        let req = request("etcd.default.svc.clusterset.local.", RecordType::A);
        let Answer::Respond(r) = a.answer(&req, &v) else {
            panic!()
        };
        assert_eq!(r.answers.len(), 200);
        let udp = Message::from_vec(&r.encode(req.max_response(Transport::Udp))).unwrap();
        assert!(udp.metadata.truncation);
        let tcp = Message::from_vec(&r.encode(req.max_response(Transport::Tcp))).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 200);
    }
}
