//! The mesh as a plain state machine: events in, actions out, no sockets, no clock of its
//! own (quinn-proto's `Connection`, firezone's connlib).
//!
//! [`MeshCore`] holds everything the mesh decides with: the advert database, our own
//! advertisement and its sequence number, the VIP allocation, our configured exports, the up
//! links and (on a gateway) the connected sidecars. The shell ([`super::Mesh`]) feeds it
//! [`Event`]s as they happen (a link up or down, an advert, changed exports, a sidecar's
//! pod exports) with the current time, and carries out the [`Action`]s it queues: send a
//! control message on a link or to a sidecar, persist the VIP allocation, publish a new view
//! with its routes. Connections are [`ConnId`]s here (the shell's handle for a quinn
//! connection), so the whole mesh, flooding, routing, withdrawal, VIP assignment and member
//! mode included, runs deterministically in unit tests and in the many-site simulation of
//! `mesh/sim.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use crate::catalog::{Advert, Lsdb, ServiceAd, View};
use crate::protocol::Control;
use crate::role::Role;
use crate::vips::{VipAllocator, VipError, VipRange, VipTable};

/// The shell's handle for one connection (a link's or a sidecar's): quinn's stable id. A
/// link that reconnects gets a new one, so an event about an old connection is recognised
/// and ignored.
pub type ConnId = usize;

/// Something that happened, for [`MeshCore::handle`].
#[derive(Debug, Clone)]
pub enum Event {
    /// Our exports from causeway.yaml changed (VIPs not yet assigned).
    ExportsChanged(Vec<ServiceAd>),
    /// Link `name` to `peer_site` came up on `conn`, with `cost`.
    LinkUp {
        name: String,
        peer_site: String,
        cost: u32,
        conn: ConnId,
    },
    /// Link `name`'s connection `conn` ended.
    LinkDown { name: String, conn: ConnId },
    /// Link `name`'s connection `conn` fell silent for `links.down_after`, or was heard again.
    LinkSilent { name: String, conn: ConnId, silent: bool },
    /// An advert arrived on link `from`.
    Advert { from: String, advert: Advert },
    /// A sidecar connected (gateways only).
    MemberUp { name: String, conn: ConnId },
    /// A sidecar's connection ended.
    MemberDown { name: String, conn: ConnId },
    /// A sidecar sent its pod's exports.
    MemberExports { name: String, services: Vec<ServiceAd> },
}

/// Where a control message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// The link of that name.
    Link(String),
    /// The sidecar of that name.
    Member(String),
}

/// What the shell must do, in order.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send `msg` on a link's or a sidecar's control stream.
    Send { to: To, msg: Control },
    /// Write the VIP allocation (`vips.yaml`) before anything that uses it is sent: it is
    /// queued before the advert that carries the new VIPs.
    PersistVips(VipTable),
    /// A new view and the tables the data plane routes with.
    Publish(Publication),
}

/// A view and its routes, as one [`Action::Publish`].
#[derive(Debug, Clone)]
pub struct Publication {
    pub view: View,
    /// Destination site → connection of the next hop.
    pub routes: HashMap<String, ConnId>,
    /// VIP → connection of the sidecar that delivers it (gateways).
    pub member_routes: HashMap<IpAddr, ConnId>,
}

/// A link that is up.
#[derive(Debug, Clone)]
struct UpLink {
    peer_site: String,
    cost: u32,
    conn: ConnId,
    /// Nothing heard for `links.down_after`: kept (its flows wait), but out of our advert and
    /// our routes until it is heard again.
    silent: bool,
    /// An advert arrived on this connection: the peer's catalogue has reached us, which is
    /// what readiness waits for ([`crate::readiness`]).
    heard: bool,
}

/// A sidecar connected to this gateway.
#[derive(Debug, Clone)]
struct Member {
    conn: ConnId,
    /// Order of connection (higher is newer): when two sidecars export the same endpoint, the
    /// newest delivers it. A pod whose sidecar restarted connects again before the old,
    /// killed sidecar's connection times out (`links.idle_timeout`), and the new one must win
    /// at once; closing the older one instead could make two live, misconfigured pods
    /// replace each other in a loop.
    connected: u64,
    /// Its pod's exports, without VIPs.
    exports: Vec<ServiceAd>,
}

/// The mesh's state and rules (see the module doc).
pub struct MeshCore {
    site: String,
    role: Role,
    range: VipRange,
    lsdb: Lsdb,
    /// Sequence number of our latest advertisement (milliseconds since the epoch, always
    /// increasing).
    seq: u64,
    /// Assigns our endpoints' VIPs from our block.
    allocator: VipAllocator,
    /// The allocation: live VIPs and freed ones in (or past) quarantine, as last persisted.
    vip_table: VipTable,
    /// Exports from causeway.yaml, without VIPs.
    config_exports: Vec<ServiceAd>,
    /// Our exports as advertised (with VIPs): the configured ones and our members'.
    services: Vec<ServiceAd>,
    /// Up links by name (on a sidecar: the one to its gateway).
    links: BTreeMap<String, UpLink>,
    /// Connected sidecars by name (gateways only).
    members: BTreeMap<String, Member>,
    /// VIPs of endpoints that a sidecar delivers, and which one.
    member_vips: HashMap<IpAddr, String>,
    /// The last [`Member::connected`] handed out.
    member_seq: u64,
    /// The last view published.
    view: View,
    actions: VecDeque<Action>,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MeshCore {
    /// The mesh of `site`, a gateway or a sidecar (`role`), assigning VIPs with `allocator`
    /// from the allocation `table` persisted before this start. A gateway originates its
    /// (empty) advertisement at once, at `now`.
    pub fn new(site: &str, role: Role, allocator: VipAllocator, table: VipTable, now: SystemTime) -> MeshCore {
        let mut core = MeshCore {
            site: site.to_string(),
            role,
            range: allocator.range(),
            lsdb: Lsdb::default(),
            seq: 0,
            allocator,
            vip_table: table,
            config_exports: Vec::new(),
            services: Vec::new(),
            links: BTreeMap::new(),
            members: BTreeMap::new(),
            member_vips: HashMap::new(),
            member_seq: 0,
            view: View::default(),
            actions: VecDeque::new(),
        };
        if role == Role::Gateway {
            core.originate(now);
        }
        core
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The current view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Our VIP block.
    pub fn block(&self) -> u32 {
        self.allocator.block()
    }

    /// Our exports from causeway.yaml (VIPs not yet assigned).
    pub fn config_exports(&self) -> &[ServiceAd] {
        &self.config_exports
    }

    /// Our exports as advertised, with their VIPs.
    pub fn services(&self) -> &[ServiceAd] {
        &self.services
    }

    /// The VIP allocation as last persisted.
    pub fn vip_table(&self) -> &VipTable {
        &self.vip_table
    }

    /// The links an advert has arrived on.
    pub fn links_heard(&self) -> BTreeSet<String> {
        self.links
            .iter()
            .filter(|(_, l)| l.heard)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Applies `event`, which happened at `now`, and queues what follows from it. Errors:
    /// a VIP block too small for the exports (the exports stay as they were advertised).
    pub fn handle(&mut self, event: Event, now: SystemTime) -> Result<(), VipError> {
        match event {
            Event::ExportsChanged(ads) => {
                if self.config_exports == ads {
                    return Ok(());
                }
                self.config_exports = ads;
                match self.role {
                    Role::Sidecar => {
                        let names: Vec<String> = self.links.keys().cloned().collect();
                        for name in names {
                            self.send(
                                To::Link(name),
                                Control::MemberExports {
                                    services: self.config_exports.clone(),
                                },
                            );
                        }
                        Ok(())
                    }
                    Role::Gateway => self.rebuild(now),
                }
            }
            Event::MemberExports { name, services } => {
                match self.members.get_mut(&name) {
                    Some(m) if m.exports != services => m.exports = services,
                    _ => return Ok(()),
                }
                self.rebuild(now)
            }
            Event::MemberUp { name, conn } => {
                for advert in self.lsdb.all().cloned().collect::<Vec<_>>() {
                    self.send(To::Member(name.clone()), Control::Advert(Box::new(advert)));
                }
                self.member_seq += 1;
                let connected = self.member_seq;
                self.members.insert(
                    name,
                    Member {
                        conn,
                        exports: Vec::new(),
                        connected,
                    },
                );
                Ok(())
            }
            Event::MemberDown { name, conn } => {
                if self.members.get(&name).is_some_and(|m| m.conn == conn) {
                    self.members.remove(&name);
                    return self.rebuild(now);
                }
                Ok(())
            }
            Event::LinkUp {
                name,
                peer_site,
                cost,
                conn,
            } => {
                match self.role {
                    // Our gateway: it wants our pod's exports; adverts come from it, not from us.
                    Role::Sidecar => self.send(
                        To::Link(name.clone()),
                        Control::MemberExports {
                            services: self.config_exports.clone(),
                        },
                    ),
                    Role::Gateway => {
                        for advert in self.lsdb.all().cloned().collect::<Vec<_>>() {
                            self.send(To::Link(name.clone()), Control::Advert(Box::new(advert)));
                        }
                    }
                }
                self.links.insert(
                    name,
                    UpLink {
                        peer_site,
                        cost,
                        conn,
                        silent: false,
                        heard: false,
                    },
                );
                self.changed(now);
                Ok(())
            }
            Event::LinkDown { name, conn } => {
                if self.links.get(&name).is_some_and(|l| l.conn == conn) {
                    self.links.remove(&name);
                    self.changed(now);
                }
                Ok(())
            }
            Event::LinkSilent { name, conn, silent } => {
                let Some(link) = self.links.get_mut(&name) else {
                    return Ok(());
                };
                if link.conn != conn || link.silent == silent {
                    return Ok(());
                }
                link.silent = silent;
                self.changed(now);
                Ok(())
            }
            Event::Advert { from, advert } => {
                self.on_advert(&from, advert, now);
                Ok(())
            }
        }
    }

    fn send(&mut self, to: To, msg: Control) {
        self.actions.push_back(Action::Send { to, msg });
    }

    /// Our links changed: a gateway advertises them, a sidecar only recomputes.
    fn changed(&mut self, now: SystemTime) {
        match self.role {
            Role::Sidecar => self.recompute(),
            Role::Gateway => self.originate(now),
        }
    }

    fn on_advert(&mut self, from: &str, advert: Advert, now: SystemTime) {
        if let Some(link) = self.links.get_mut(from) {
            link.heard = true;
        }
        if advert.origin == self.site && self.role == Role::Gateway {
            // An old advertisement of ours from before a restart (or a clock step): make
            // sure ours is newer, so the whole clusterset forgets the old one.
            if advert.seq >= self.seq {
                self.seq = advert.seq;
                self.originate(now);
            }
            return;
        }
        let origin = advert.origin.clone();
        let seq = advert.seq;
        if !self.lsdb.apply(advert.clone()) {
            return;
        }
        debug!(%origin, seq, from, "advert applied");
        let advert = Box::new(advert);
        if self.role == Role::Gateway {
            let others: Vec<String> = self.links.keys().filter(|n| n.as_str() != from).cloned().collect();
            for name in others {
                self.send(To::Link(name), Control::Advert(advert.clone()));
            }
        }
        let members: Vec<String> = self.members.keys().cloned().collect();
        for name in members {
            self.send(To::Member(name), Control::Advert(advert.clone()));
        }
        self.recompute();
    }

    /// Merges our configured exports with our members', assigns VIPs, and advertises the
    /// result if it changed. Two sources of one `<svc>.<ns>` merge into one service.
    fn rebuild(&mut self, now: SystemTime) -> Result<(), VipError> {
        let mut merged: BTreeMap<(String, String), ServiceAd> = BTreeMap::new();
        let mut owner: HashMap<(String, String, String), String> = HashMap::new();
        // Newest sidecar first: of two claiming one endpoint, it delivers (see Member).
        let mut members: Vec<(&String, &Member)> = self.members.iter().collect();
        members.sort_by_key(|(_, m)| std::cmp::Reverse(m.connected));
        let sources = std::iter::once((None, &self.config_exports))
            .chain(members.into_iter().map(|(n, m)| (Some(n), &m.exports)));
        for (member, ads) in sources {
            for ad in ads {
                let entry = merged
                    .entry((ad.namespace.clone(), ad.service.clone()))
                    .or_insert_with(|| ServiceAd {
                        service: ad.service.clone(),
                        namespace: ad.namespace.clone(),
                        ports: Vec::new(),
                        endpoints: Vec::new(),
                    });
                for p in &ad.ports {
                    if !entry.ports.contains(p) {
                        entry.ports.push(p.clone());
                    }
                }
                for ep in &ad.endpoints {
                    if entry.endpoints.iter().any(|e| e.hostname == ep.hostname) {
                        tracing::warn!(service = %ad.service, hostname = %ep.hostname, "two pods export the same hostname (or a restarted pod's old sidecar has not timed out yet); the most recently connected one delivers it");
                        continue;
                    }
                    entry.endpoints.push(ep.clone());
                    if let Some(m) = member {
                        owner.insert(
                            (ad.service.clone(), ad.namespace.clone(), ep.hostname.clone()),
                            m.clone(),
                        );
                    }
                }
            }
        }
        let keys: Vec<_> = merged
            .values()
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| (s.service.clone(), s.namespace.clone(), e.hostname.clone()))
            })
            .collect();
        let table = self.allocator.assign(&self.vip_table, &keys, now)?;
        if table != self.vip_table {
            // Persisted before anyone is told, so no address handed out is forgotten by a
            // restart.
            self.actions.push_back(Action::PersistVips(table.clone()));
            self.vip_table = table;
        }
        let vips = self.vip_table.live();
        let mut member_vips = HashMap::new();
        let services: Vec<ServiceAd> = merged
            .into_values()
            .map(|mut s| {
                for e in &mut s.endpoints {
                    let key = (s.service.clone(), s.namespace.clone(), e.hostname.clone());
                    e.vip = vips.get(&key).copied();
                    if let (Some(vip), Some(m)) = (e.vip, owner.get(&key)) {
                        member_vips.insert(vip, m.clone());
                    }
                }
                s
            })
            .collect();
        self.member_vips = member_vips;
        if services != self.services {
            self.services = services;
            info!(
                services = self.services.len(),
                members = self.members.len(),
                "exports changed; advertising"
            );
            self.originate(now);
        } else {
            self.recompute();
        }
        Ok(())
    }

    /// Builds, stores and floods our own advertisement, then recomputes.
    fn originate(&mut self, now: SystemTime) {
        self.seq = millis(now).max(self.seq + 1);
        let mut links: BTreeMap<String, u32> = BTreeMap::new();
        for l in self.links.values().filter(|l| !l.silent) {
            let c = links.entry(l.peer_site.clone()).or_insert(l.cost);
            *c = (*c).min(l.cost);
        }
        let advert = Advert {
            origin: self.site.clone(),
            seq: self.seq,
            block: self.allocator.block(),
            links,
            services: self.services.clone(),
        };
        self.lsdb.apply(advert.clone());
        let advert = Box::new(advert);
        let links: Vec<String> = self.links.keys().cloned().collect();
        for name in links {
            self.send(To::Link(name), Control::Advert(advert.clone()));
        }
        let members: Vec<String> = self.members.keys().cloned().collect();
        for name in members {
            self.send(To::Member(name), Control::Advert(advert.clone()));
        }
        self.recompute();
    }

    /// Recomputes the view and the routes, and publishes them.
    fn recompute(&mut self) {
        let view = View::compute(&self.site, &self.lsdb, &self.range);
        let mut routes = HashMap::new();
        match self.role {
            Role::Sidecar => {
                // Everything leaves through the gateway, our own site's other pods included.
                if let Some(gw) = self.links.values().find(|l| !l.silent) {
                    for site in view.routes.keys().chain(std::iter::once(&self.site)) {
                        routes.insert(site.clone(), gw.conn);
                    }
                }
            }
            Role::Gateway => {
                for (site, route) in &view.routes {
                    let best = self
                        .links
                        .values()
                        .filter(|l| l.peer_site == route.next_hop && !l.silent)
                        .min_by_key(|l| l.cost)
                        .map(|l| l.conn);
                    if let Some(conn) = best {
                        routes.insert(site.clone(), conn);
                    }
                }
            }
        }
        let member_routes: HashMap<IpAddr, ConnId> = self
            .member_vips
            .iter()
            .filter_map(|(vip, name)| self.members.get(name).map(|m| (*vip, m.conn)))
            .collect();
        self.view = view.clone();
        self.actions.push_back(Action::Publish(Publication {
            view,
            routes,
            member_routes,
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::catalog::{EndpointAd, PortAd};
    use crate::names::{PortSpec, Protocol};

    fn core(role: Role) -> MeshCore {
        let range = VipRange::new("127.77.0.0/16".parse().unwrap()).unwrap();
        let allocator = VipAllocator::new(range, 7, Duration::from_secs(35));
        MeshCore::new(
            "london",
            role,
            allocator,
            VipTable::default(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(100),
        )
    }

    fn web(hosts: &[&str]) -> Vec<ServiceAd> {
        vec![ServiceAd {
            service: "web".into(),
            namespace: "default".into(),
            ports: vec![PortAd::from(&PortSpec {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            })],
            endpoints: hosts
                .iter()
                .map(|h| EndpointAd {
                    hostname: h.to_string(),
                    ip: "10.1.0.1".parse().unwrap(),
                    ready: true,
                    vip: None,
                })
                .collect(),
        }]
    }

    fn actions(c: &mut MeshCore) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn new_vips_are_persisted_before_the_advert_that_carries_them() {
        let mut c = core(Role::Gateway);
        actions(&mut c);
        c.handle(
            Event::LinkUp {
                name: "paris".into(),
                peer_site: "paris".into(),
                cost: 1,
                conn: 1,
            },
            at(101),
        )
        .unwrap();
        actions(&mut c);
        c.handle(Event::ExportsChanged(web(&["web-0"])), at(102)).unwrap();
        let a = actions(&mut c);
        let persisted = a
            .iter()
            .position(|x| matches!(x, Action::PersistVips(_)))
            .expect("persisted");
        let advert = a
            .iter()
            .position(|x| matches!(x, Action::Send { msg: Control::Advert(ad), .. } if !ad.services.is_empty()))
            .expect("advertised");
        assert!(persisted < advert, "{a:?}");
        assert!(matches!(a.last(), Some(Action::Publish(_))));
        // The same exports again: nothing to do.
        c.handle(Event::ExportsChanged(web(&["web-0"])), at(103)).unwrap();
        assert!(actions(&mut c).is_empty());
    }

    #[test]
    fn events_about_a_replaced_connection_are_ignored() {
        let mut c = core(Role::Gateway);
        let up = |conn| Event::LinkUp {
            name: "paris".into(),
            peer_site: "paris".into(),
            cost: 1,
            conn,
        };
        c.handle(up(1), at(101)).unwrap();
        // The link reconnected (conn 2) before the old connection's end was noticed.
        c.handle(up(2), at(102)).unwrap();
        actions(&mut c);
        c.handle(
            Event::LinkDown {
                name: "paris".into(),
                conn: 1,
            },
            at(103),
        )
        .unwrap();
        c.handle(
            Event::LinkSilent {
                name: "paris".into(),
                conn: 1,
                silent: true,
            },
            at(104),
        )
        .unwrap();
        assert!(actions(&mut c).is_empty(), "nothing changed");
        c.handle(
            Event::LinkDown {
                name: "paris".into(),
                conn: 2,
            },
            at(105),
        )
        .unwrap();
        assert!(!actions(&mut c).is_empty());
    }

    #[test]
    fn a_sidecar_sends_its_exports_to_its_gateway_and_originates_nothing() {
        let mut c = core(Role::Sidecar);
        assert!(actions(&mut c).is_empty(), "a sidecar has no advertisement of its own");
        c.handle(Event::ExportsChanged(web(&["web-0"])), at(101)).unwrap();
        assert!(actions(&mut c).is_empty(), "no gateway yet");
        c.handle(
            Event::LinkUp {
                name: "gateway".into(),
                peer_site: "london".into(),
                cost: 1,
                conn: 9,
            },
            at(102),
        )
        .unwrap();
        let a = actions(&mut c);
        assert!(
            matches!(&a[0], Action::Send { to: To::Link(n), msg: Control::MemberExports { services } } if n == "gateway" && services.len() == 1),
            "{a:?}"
        );
        assert!(!a.iter().any(|x| matches!(
            x,
            Action::Send {
                msg: Control::Advert(_),
                ..
            }
        )));
        let Some(Action::Publish(p)) = a.last() else {
            panic!("{a:?}")
        };
        assert_eq!(
            p.routes.get("london"),
            Some(&9),
            "its own site is reached through the gateway"
        );
    }
}
