//! The service catalog of the clusterset, as every agent sees it.
//!
//! Each site originates one **advertisement** ([`Advert`]): its exports (services, ports,
//! endpoints with the VIPs it assigned), its VIP block, and its up links with their costs.
//! Advertisements carry a sequence number (milliseconds since the epoch, always increasing,
//! so a restarted site's new advertisement beats its old one) and are flooded over every
//! link: an agent that stores a newer one passes it on to its other links, and one it already
//! has is dropped, so flooding ends without loops on any topology. [`Lsdb`] holds them;
//! [`View::compute`] turns them into what users and the data plane need: the routes, the
//! merged services (two sites exporting the same `<svc>.<ns>` are one service, MCS namespace
//! sameness), and a VIP index. Only sites reachable right now contribute, so a site that
//! drops off takes its endpoints with it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::names::{PortSpec, Protocol};
use crate::routing::{self, Adjacencies, Route};
use crate::vips::VipRange;

/// One endpoint as its site advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointAd {
    pub hostname: String,
    /// The endpoint's own address in its site (meaningless elsewhere: pod ranges overlap).
    pub ip: IpAddr,
    pub ready: bool,
    /// Assigned by the owning site from its block; `None` if its block was full.
    pub vip: Option<IpAddr>,
}

/// One port as a site advertises it: the wire form of a [`PortSpec`], kept apart from the
/// configuration's type so that the file's strictness (unknown keys are errors) never
/// applies to a peer's messages. Fields it does not know are ignored, and a port whose
/// protocol it does not know is skipped ([`PortAd::spec`]) rather than failing the advert:
/// a newer peer's additions never cut a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAd {
    pub name: String,
    pub port: u16,
    /// `TCP` or `UDP` (as in the configuration); anything else is another version's.
    pub protocol: String,
}

impl From<&PortSpec> for PortAd {
    fn from(p: &PortSpec) -> Self {
        PortAd {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.to_string(),
        }
    }
}

impl PortAd {
    /// The port, if this agent knows its protocol.
    pub fn spec(&self) -> Option<PortSpec> {
        let protocol: Protocol = self.protocol.parse().ok()?;
        Some(PortSpec {
            name: self.name.clone(),
            port: self.port,
            protocol,
        })
    }
}

/// One exported service as a site advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAd {
    pub service: String,
    pub namespace: String,
    pub ports: Vec<PortAd>,
    pub endpoints: Vec<EndpointAd>,
}

/// A site's advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// The originating site.
    pub origin: String,
    /// Newer wins.
    pub seq: u64,
    /// The VIP block the origin assigns from.
    pub block: u32,
    /// The origin's up links: neighbour site → cost.
    pub links: Adjacencies,
    pub services: Vec<ServiceAd>,
}

/// Every advertisement this agent knows, by origin.
#[derive(Debug, Clone, Default)]
pub struct Lsdb {
    adverts: BTreeMap<String, Advert>,
}

impl Lsdb {
    /// Stores `advert` if it is newer than what we have; returns whether it was.
    pub fn apply(&mut self, advert: Advert) -> bool {
        match self.adverts.get(&advert.origin) {
            Some(have) if have.seq >= advert.seq => false,
            _ => {
                self.adverts.insert(advert.origin.clone(), advert);
                true
            }
        }
    }

    pub fn get(&self, origin: &str) -> Option<&Advert> {
        self.adverts.get(origin)
    }

    pub fn all(&self) -> impl Iterator<Item = &Advert> {
        self.adverts.values()
    }
}

/// One endpoint in `service list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub site: String,
    pub hostname: String,
    /// Its address in its own site.
    pub ip: IpAddr,
    /// The address that reaches it from any site (`None`: none could be assigned).
    pub vip: Option<IpAddr>,
    pub ready: bool,
}

/// One service of the clusterset, merged across sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: String,
    pub namespace: String,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<EndpointView>,
}

/// What a VIP leads to, for the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipTarget {
    /// The site that owns the endpoint (where flows are delivered).
    pub site: String,
    pub service: String,
    pub namespace: String,
    pub hostname: String,
    /// The endpoint's address in its own site.
    pub ip: IpAddr,
    /// Ports the owning site exports for this endpoint's service.
    pub ports: Vec<PortSpec>,
    pub ready: bool,
}

impl VipTarget {
    /// Whether `port`/`protocol` is exported for this endpoint.
    pub fn exports(&self, port: u16, protocol: Protocol) -> bool {
        self.ports.iter().any(|p| p.port == port && p.protocol == protocol)
    }
}

/// The catalog as computed from the current advertisements.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Route to every reachable site but ourselves.
    pub routes: BTreeMap<String, Route>,
    /// Services, sorted by namespace then name.
    pub services: Vec<ServiceView>,
    /// Every assigned VIP of a reachable site.
    pub vips: HashMap<IpAddr, VipTarget>,
    /// Problems users must fix (VIP block collisions), in words.
    pub conflicts: Vec<String>,
}

impl View {
    /// Computes the view of `me` from `lsdb` (which must hold our own advertisement).
    pub fn compute(me: &str, lsdb: &Lsdb, range: &VipRange) -> View {
        let graph: BTreeMap<String, Adjacencies> = lsdb.all().map(|a| (a.origin.clone(), a.links.clone())).collect();
        let routes = routing::shortest_paths(me, &graph);
        let reachable: Vec<&Advert> = lsdb
            .all()
            .filter(|a| a.origin == me || routes.contains_key(&a.origin))
            .collect();

        // Block collisions: the site whose id sorts first keeps the block; the others'
        // VIPs are withheld until an operator moves them (vips.block).
        let mut by_block: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for a in &reachable {
            by_block.entry(a.block).or_default().push(&a.origin);
        }
        let mut conflicts = Vec::new();
        let mut withheld: Vec<&str> = Vec::new();
        for (block, mut sites) in by_block {
            if sites.len() > 1 {
                sites.sort();
                conflicts.push(format!(
                    "VIP block {block} of {} is claimed by sites {}; {} keeps it, the others get no VIPs until \
                     they set a free `vips.block` in causeway.yaml",
                    range.cidr(),
                    sites.join(", "),
                    sites[0]
                ));
                withheld.extend(&sites[1..]);
            }
        }

        let mut services: BTreeMap<(String, String), ServiceView> = BTreeMap::new();
        let mut vips = HashMap::new();
        for a in &reachable {
            let keep_vips = !withheld.contains(&a.origin.as_str());
            for s in &a.services {
                let view = services
                    .entry((s.namespace.clone(), s.service.clone()))
                    .or_insert_with(|| ServiceView {
                        service: s.service.clone(),
                        namespace: s.namespace.clone(),
                        ports: Vec::new(),
                        endpoints: Vec::new(),
                    });
                let ports: Vec<PortSpec> = s.ports.iter().filter_map(PortAd::spec).collect();
                for p in &ports {
                    if !view.ports.contains(p) {
                        view.ports.push(p.clone());
                    }
                }
                for e in &s.endpoints {
                    // A VIP must lie in the origin's own block; anything else is ignored.
                    let vip = e.vip.filter(|v| keep_vips && range.block_of(*v) == Some(a.block));
                    view.endpoints.push(EndpointView {
                        site: a.origin.clone(),
                        hostname: e.hostname.clone(),
                        ip: e.ip,
                        vip,
                        ready: e.ready,
                    });
                    if let Some(v) = vip {
                        vips.insert(
                            v,
                            VipTarget {
                                site: a.origin.clone(),
                                service: s.service.clone(),
                                namespace: s.namespace.clone(),
                                hostname: e.hostname.clone(),
                                ip: e.ip,
                                ports: ports.clone(),
                                ready: e.ready,
                            },
                        );
                    }
                }
            }
        }
        let services = services
            .into_values()
            .map(|mut s| {
                s.endpoints
                    .sort_by(|a, b| (&a.site, &a.hostname).cmp(&(&b.site, &b.hostname)));
                s
            })
            .collect();
        View {
            routes,
            services,
            vips,
            conflicts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> VipRange {
        VipRange::new("127.77.0.0/16".parse().unwrap()).unwrap()
    }

    fn advert(origin: &str, seq: u64, block: u32, links: &[(&str, u32)], hosts: &[(&str, &str)]) -> Advert {
        Advert {
            origin: origin.into(),
            seq,
            block,
            links: links.iter().map(|(s, c)| (s.to_string(), *c)).collect(),
            services: vec![ServiceAd {
                service: "etcd".into(),
                namespace: "default".into(),
                ports: vec![PortAd::from(&PortSpec {
                    name: "client".into(),
                    port: 2379,
                    protocol: Protocol::Tcp,
                })],
                endpoints: hosts
                    .iter()
                    .map(|(h, vip)| EndpointAd {
                        hostname: h.to_string(),
                        ip: "10.1.0.1".parse().unwrap(),
                        ready: true,
                        vip: Some(vip.parse().unwrap()),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn newer_adverts_win_and_old_ones_are_dropped() {
        let mut db = Lsdb::default();
        assert!(db.apply(advert("a", 2, 1, &[], &[])));
        assert!(!db.apply(advert("a", 2, 1, &[], &[])), "duplicates stop flooding");
        assert!(!db.apply(advert("a", 1, 1, &[], &[])));
        assert!(db.apply(advert("a", 3, 1, &[], &[])));
        assert_eq!(db.get("a").unwrap().seq, 3);
    }

    #[test]
    fn same_named_services_merge_and_same_named_pods_do_not_collide() {
        let mut db = Lsdb::default();
        db.apply(advert("london", 1, 1, &[("paris", 1)], &[("etcd-0", "127.77.1.10")]));
        db.apply(advert("paris", 1, 2, &[("london", 1)], &[("etcd-0", "127.77.2.10")]));
        let v = View::compute("paris", &db, &range());
        assert_eq!(v.services.len(), 1);
        let eps = &v.services[0].endpoints;
        assert_eq!(eps.len(), 2);
        assert_eq!((eps[0].site.as_str(), eps[0].hostname.as_str()), ("london", "etcd-0"));
        assert_eq!((eps[1].site.as_str(), eps[1].hostname.as_str()), ("paris", "etcd-0"));
        assert_eq!(v.vips[&"127.77.1.10".parse().unwrap()].site, "london");
        assert_eq!(v.routes["london"].next_hop, "london");
    }

    #[test]
    fn unreachable_sites_are_withdrawn() {
        let mut db = Lsdb::default();
        db.apply(advert("london", 1, 1, &[("paris", 1)], &[("etcd-0", "127.77.1.10")]));
        // paris lost its link: its new advertisement lists none.
        db.apply(advert("paris", 2, 2, &[], &[]));
        let v = View::compute("paris", &db, &range());
        assert!(v.services.iter().all(|s| s.endpoints.iter().all(|e| e.site == "paris")));
        assert!(v.vips.is_empty());
    }

    #[test]
    fn block_collisions_are_reported_not_shared() {
        let mut db = Lsdb::default();
        db.apply(advert("alpha", 1, 7, &[("beta", 1)], &[("a-0", "127.77.7.10")]));
        db.apply(advert("beta", 1, 7, &[("alpha", 1)], &[("b-0", "127.77.7.10")]));
        let v = View::compute("beta", &db, &range());
        assert_eq!(v.conflicts.len(), 1, "{:?}", v.conflicts);
        assert!(v.conflicts[0].contains("alpha, beta"));
        assert_eq!(v.vips[&"127.77.7.10".parse().unwrap()].site, "alpha");
        let b0 = v.services[0].endpoints.iter().find(|e| e.site == "beta").unwrap();
        assert_eq!(b0.vip, None);
    }

    #[test]
    fn vips_outside_the_origin_block_are_ignored() {
        let mut db = Lsdb::default();
        db.apply(advert("a", 1, 1, &[], &[("x", "127.77.9.9")]));
        let v = View::compute("a", &db, &range());
        assert!(v.vips.is_empty());
        assert_eq!(v.services[0].endpoints[0].vip, None);
    }
}
