//! An in-process simulation of a clusterset: many sites' [`MeshCore`]s (gateways, and
//! sidecars on them) wired by links that carry their control messages, in the style of
//! quinn-proto's `Pair` and connlib's simulator. Deterministic: a virtual clock, messages
//! delivered in order until nothing moves. It checks what only the whole clusterset shows:
//! that views converge everywhere, that routes follow the cheapest paths, that a partition
//! withdraws what it cuts off and healing brings it back, that VIPs never move across
//! restarts, withdrawals and link churn, and member mode.
//!
//! Each gateway also keeps its [`LinkTable`] (the link records and which connection is
//! current), fed the same link events its shell would feed it, so churn, silence and restarts
//! exercise the link table and the mesh core together: routes must only ever use connections
//! the link table holds up, and a restarted node dials exactly the links it had recorded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::core::{Action, ConnId, Event, MeshCore, Publication, To};
use crate::catalog::{EndpointAd, PortAd, ServiceAd, View};
use crate::link::table::{self, LinkTable};
use crate::link::{LinkRecord, LinkState, Role as LinkRole};
use crate::names::{PortSpec, Protocol};
use crate::protocol::Control;
use crate::role::Role;
use crate::vips::{VipAllocator, VipRange, VipTable};

/// The clusterset's range.
const CIDR: &str = "127.77.0.0/16";
/// VIP quarantine in the simulation (dns.ttl + links.idle_timeout by default).
const QUARANTINE: Duration = Duration::from_secs(35);

/// A simulated connection for the link table: just its id.
#[derive(Debug, Clone, PartialEq)]
struct SimConn(ConnId);

impl table::Conn for SimConn {
    fn id(&self) -> usize {
        self.0
    }
    fn rtt(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn remote(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([192, 0, 2, 1], 7400))
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// One agent: its core and what its shell would hold.
struct Node {
    site: String,
    role: Role,
    core: MeshCore,
    /// `vips.yaml` as last written.
    persisted: VipTable,
    /// The last publication.
    published: Option<Publication>,
    /// Its configured exports (causeway.yaml), applied again after a restart as the agent
    /// does at start.
    exports: Vec<ServiceAd>,
    /// Up connections by the name this node gives them (the peer site, or the sidecar's
    /// name on its gateway), with the node at the other end.
    conns: BTreeMap<String, (ConnId, String)>,
    /// A gateway's link table (sidecar sessions are not links on the gateway side, and a
    /// sidecar's one link is left out).
    links: LinkTable<SimConn>,
    /// `links.yaml` as last written.
    link_records: Vec<LinkRecord>,
    /// Links the table asked to dial since the node started.
    dialed: BTreeSet<String>,
}

/// A clusterset of nodes, by node name (a gateway is named after its site).
struct Sim {
    nodes: BTreeMap<String, Node>,
    /// Messages in flight: (from node, to node, message).
    wire: VecDeque<(String, String, Control)>,
    now: SystemTime,
    next_conn: ConnId,
    /// Messages delivered so far (a bound on runaway flooding).
    delivered: usize,
}

fn range() -> VipRange {
    VipRange::new(CIDR.parse().unwrap()).unwrap()
}

fn service(name: &str, hosts: &[&str]) -> ServiceAd {
    ServiceAd {
        service: name.into(),
        namespace: "grid".into(),
        ports: vec![PortAd::from(&PortSpec {
            name: "peer".into(),
            port: 7000,
            protocol: Protocol::Tcp,
        })],
        endpoints: hosts
            .iter()
            .enumerate()
            .map(|(i, h)| EndpointAd {
                hostname: h.to_string(),
                ip: IpAddr::from([10, 1, 0, i as u8 + 1]),
                ready: true,
                vip: None,
            })
            .collect(),
    }
}

impl Sim {
    fn new(sites: &[&str]) -> Sim {
        let mut sim = Sim {
            nodes: BTreeMap::new(),
            wire: VecDeque::new(),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            next_conn: 1,
            delivered: 0,
        };
        for s in sites {
            sim.start(s, s, Role::Gateway, VipTable::default());
        }
        sim
    }

    fn tick(&mut self) -> SystemTime {
        self.now += Duration::from_millis(1);
        self.now
    }

    /// Starts node `name` of `site` (a fresh process: nothing but its persisted table).
    fn start(&mut self, name: &str, site: &str, role: Role, table: VipTable) {
        let allocator = VipAllocator::new(range(), VipRange::block_of_site(site), QUARANTINE);
        let now = self.tick();
        let core = MeshCore::new(site, role, allocator, table.clone(), now);
        let records = self.nodes.get(name).map(|n| n.link_records.clone()).unwrap_or_default();
        let (links, actions) = LinkTable::new(
            records.clone(),
            true,
            Duration::from_secs(3),
            Duration::from_secs(30),
            now,
        );
        let dialed = actions
            .into_iter()
            .filter_map(|a| match a {
                table::Action::Dial(n) => Some(n),
                _ => None,
            })
            .collect();
        self.nodes.insert(
            name.to_string(),
            Node {
                site: site.to_string(),
                role,
                core,
                persisted: table,
                published: None,
                exports: Vec::new(),
                conns: BTreeMap::new(),
                links,
                link_records: records,
                dialed,
            },
        );
        self.drain(name);
    }

    fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.get_mut(name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Feeds one event to `name`, then takes its actions.
    fn event(&mut self, name: &str, event: Event) {
        let now = self.tick();
        self.node(name).core.handle(event, now).expect("VIPs assigned");
        self.drain(name);
    }

    /// Takes `name`'s queued actions: messages onto the wire, the table to "disk", the view.
    fn drain(&mut self, name: &str) {
        loop {
            let node = self.node(name);
            let Some(action) = node.core.poll_action() else {
                return;
            };
            match action {
                Action::PersistVips(table) => node.persisted = table,
                Action::Publish(p) => node.published = Some(p),
                Action::Send { to, msg } => {
                    let conn_name = match &to {
                        To::Link(n) | To::Member(n) => n.clone(),
                    };
                    if let Some((_, peer)) = node.conns.get(&conn_name) {
                        let peer = peer.clone();
                        self.wire.push_back((name.to_string(), peer, msg));
                    }
                }
            }
        }
    }

    /// Links gateways `a` and `b` (each names the link after the other's site).
    fn link(&mut self, a: &str, b: &str, cost: u32) {
        let conn = self.next_conn;
        self.next_conn += 1;
        for (here, there, role) in [(a, b, LinkRole::Dialer), (b, a, LinkRole::Acceptor)] {
            self.node(here)
                .conns
                .insert(there.to_string(), (conn, there.to_string()));
            let peer_site = self.node(there).site.clone();
            self.table_up(here, there, &peer_site, role, cost, conn);
            self.event(
                here,
                Event::LinkUp {
                    name: there.to_string(),
                    peer_site,
                    cost,
                    conn,
                },
            );
        }
    }

    /// Link `there`, as gateway `here` names it, is up on `conn`: recorded first if new (as
    /// a redemption would), then marked up; a connection it replaces ends in the core too, as
    /// the shell's session for it would.
    fn table_up(&mut self, here: &str, there: &str, peer_site: &str, role: LinkRole, cost: u32, conn: ConnId) {
        let now = self.now;
        let node = self.node(here);
        if node.role != Role::Gateway {
            return;
        }
        // Re-linking after a cut or restart keeps the record, whoever dialed.
        if !node.links.contains(there) {
            let record = LinkRecord {
                name: there.to_string(),
                peer_site: peer_site.to_string(),
                role,
                addresses: Vec::new(),
                peer_ca: format!("ca of {peer_site}"),
                cost,
                created: now,
            };
            for action in node.links.add(record, now).expect("one link per pair of sites") {
                match action {
                    table::Action::Persist(records) => node.link_records = records,
                    table::Action::Dial(n) => {
                        node.dialed.insert(n);
                    }
                    _ => {}
                }
            }
        }
        for action in node.links.up(there, SimConn(conn), None, now) {
            if let table::Action::Close { conn: old, .. } = action {
                self.event(
                    here,
                    Event::LinkDown {
                        name: there.to_string(),
                        conn: old.0,
                    },
                );
            }
        }
    }

    /// Link `there` of `here` on `conn` fell silent or was heard again, as the shell's
    /// liveness watch reports it: to the link table and to the core.
    fn silent(&mut self, here: &str, there: &str, conn: ConnId, silent: bool) {
        let now = self.now;
        self.node(here).links.silent(there, &SimConn(conn), silent, now);
        self.event(
            here,
            Event::LinkSilent {
                name: there.to_string(),
                conn,
                silent,
            },
        );
    }

    /// The link between `a` and `b` ends on both sides.
    fn cut(&mut self, a: &str, b: &str) {
        for (here, there) in [(a, b), (b, a)] {
            let Some((conn, _)) = self.node(here).conns.remove(there) else {
                continue;
            };
            let next = if self.node(here).links.record(there).map(|r| r.role) == Some(LinkRole::Dialer) {
                LinkState::Connecting
            } else {
                LinkState::Down
            };
            let now = self.now;
            self.node(here)
                .links
                .ended(there, &SimConn(conn), next, "cut".into(), now);
            let event = if self.node(here).role == Role::Gateway && self.node(there).role == Role::Sidecar {
                Event::MemberDown {
                    name: there.to_string(),
                    conn,
                }
            } else {
                Event::LinkDown {
                    name: there.to_string(),
                    conn,
                }
            };
            self.event(here, event);
        }
    }

    /// Sidecar `name` of `gateway`'s site connects to it.
    fn attach(&mut self, name: &str, gateway: &str) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let site = self.node(gateway).site.clone();
        self.node(gateway)
            .conns
            .insert(name.to_string(), (conn, name.to_string()));
        self.event(
            gateway,
            Event::MemberUp {
                name: name.to_string(),
                conn,
            },
        );
        self.node(name)
            .conns
            .insert(gateway.to_string(), (conn, gateway.to_string()));
        self.event(
            name,
            Event::LinkUp {
                name: gateway.to_string(),
                peer_site: site,
                cost: 1,
                conn,
            },
        );
    }

    fn export(&mut self, name: &str, services: Vec<ServiceAd>) {
        self.node(name).exports = services.clone();
        self.event(name, Event::ExportsChanged(services));
    }

    /// Delivers messages until none is in flight (bounded: flooding must die out).
    fn settle(&mut self) {
        while let Some((from, to, msg)) = self.wire.pop_front() {
            self.delivered += 1;
            assert!(self.delivered < 200_000, "messages never stop");
            // Only over a connection both still have (a cut drops what was in flight).
            let up = self
                .nodes
                .get(&to)
                .is_some_and(|n| n.conns.get(&from).is_some_and(|(_, p)| *p == from));
            if !up {
                continue;
            }
            let event = match msg {
                Control::Advert(advert) => Event::Advert {
                    from: from.clone(),
                    advert: *advert,
                },
                Control::MemberExports { services } => Event::MemberExports {
                    name: from.clone(),
                    services,
                },
                other => panic!("unexpected control message {other:?}"),
            };
            self.event(&to, event);
        }
    }

    /// Restarts `name`: its peers see the connections end, a new process starts from the
    /// persisted table (with the clock stepped `back`), and the same links come up again.
    fn restart(&mut self, name: &str, back: Duration) {
        let peers: Vec<String> = self.node(name).conns.keys().cloned().collect();
        for p in &peers {
            self.cut(name, p);
        }
        self.settle();
        let (site, role, table) = {
            let n = self.node(name);
            (n.site.clone(), n.role, n.persisted.clone())
        };
        let exports = self.node(name).exports.clone();
        self.now -= back;
        self.start(name, &site, role, table);
        // The new process dials exactly the links it recorded as their dialer.
        let expected: BTreeSet<String> = self
            .node(name)
            .link_records
            .iter()
            .filter(|r| r.role == LinkRole::Dialer)
            .map(|r| r.name.clone())
            .collect();
        assert_eq!(self.node(name).dialed, expected, "{name} after a restart");
        self.export(name, exports);
        for p in &peers {
            match (role, self.node(p).role) {
                (Role::Sidecar, _) => self.attach(name, p),
                (_, Role::Sidecar) => self.attach(p, name),
                _ => self.link(name, p, 1),
            }
        }
        self.settle();
    }

    fn view(&self, name: &str) -> &View {
        &self.nodes[name].published.as_ref().expect("published").view
    }

    /// Every (site, hostname) → VIP in `name`'s view.
    fn vips(&self, name: &str) -> BTreeMap<(String, String), Option<IpAddr>> {
        self.view(name)
            .services
            .iter()
            .flat_map(|s| &s.endpoints)
            .map(|e| ((e.site.clone(), e.hostname.clone()), e.vip))
            .collect()
    }

    /// The sites `name` has endpoints of in its view.
    fn sites_seen(&self, name: &str) -> BTreeSet<String> {
        self.view(name)
            .services
            .iter()
            .flat_map(|s| &s.endpoints)
            .map(|e| e.site.clone())
            .collect()
    }

    /// `name`'s next hop (as the peer node's name) towards `site`.
    fn next_hop(&self, name: &str, site: &str) -> Option<String> {
        let node = &self.nodes[name];
        let conn = *node.published.as_ref()?.routes.get(site)?;
        node.conns.values().find(|(c, _)| *c == conn).map(|(_, p)| p.clone())
    }

    /// Every route of every node leaves on a connection that node has up.
    fn assert_routes_use_live_connections(&self) {
        for (name, node) in &self.nodes {
            let live: BTreeSet<ConnId> = node.conns.values().map(|(c, _)| *c).collect();
            let table_up: BTreeSet<ConnId> = node.links.up_links().map(|(_, _, c)| c.0).collect();
            if let Some(p) = &node.published {
                for (site, conn) in &p.routes {
                    assert!(live.contains(conn), "{name}'s route to {site} uses a dead connection");
                    if node.role == Role::Gateway {
                        assert!(
                            table_up.contains(conn),
                            "{name}'s route to {site} uses a connection its link table does not hold up"
                        );
                    }
                }
                for (vip, conn) in &p.member_routes {
                    assert!(
                        live.contains(conn),
                        "{name}'s member route for {vip} uses a dead connection"
                    );
                }
            }
        }
    }
}

const SITES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// Five sites in a ring a-b-c-d-e-a, each exporting two members of one grid.
fn ring() -> Sim {
    let mut sim = Sim::new(&SITES);
    for s in SITES {
        sim.export(s, vec![service("grid", &[&format!("{s}-0"), &format!("{s}-1")])]);
    }
    for w in SITES.windows(2) {
        sim.link(w[0], w[1], 1);
    }
    sim.link("e", "a", 1);
    sim.settle();
    sim
}

#[test]
fn a_ring_of_five_converges_on_one_view_with_cheapest_routes() {
    let sim = ring();
    let all: BTreeSet<String> = SITES.iter().map(|s| s.to_string()).collect();
    let reference = sim.vips("a");
    assert_eq!(reference.len(), 10);
    assert!(reference.values().all(Option::is_some), "every endpoint has a VIP");
    for s in SITES {
        assert_eq!(sim.sites_seen(s), all, "{s} sees every site");
        assert_eq!(sim.vips(s), reference, "{s} has the same VIPs as a");
    }
    // Cheapest paths round the ring: from a, c is reached through b and d through e.
    assert_eq!(sim.next_hop("a", "b").as_deref(), Some("b"));
    assert_eq!(sim.next_hop("a", "c").as_deref(), Some("b"));
    assert_eq!(sim.next_hop("a", "d").as_deref(), Some("e"));
    assert_eq!(sim.next_hop("c", "e").as_deref(), Some("d"));
    sim.assert_routes_use_live_connections();
}

#[test]
fn a_costlier_link_is_avoided_and_taken_when_it_is_the_only_way() {
    let mut sim = Sim::new(&["a", "b", "c"]);
    for s in ["a", "b", "c"] {
        sim.export(s, vec![service("grid", &[&format!("{s}-0")])]);
    }
    sim.link("a", "b", 1);
    sim.link("b", "c", 1);
    sim.link("a", "c", 5);
    sim.settle();
    assert_eq!(
        sim.next_hop("a", "c").as_deref(),
        Some("b"),
        "2 through b beats 5 direct"
    );
    sim.cut("a", "b");
    sim.settle();
    assert_eq!(sim.next_hop("a", "c").as_deref(), Some("c"));
    assert_eq!(sim.next_hop("a", "b").as_deref(), Some("c"), "b now through c");
    sim.assert_routes_use_live_connections();
}

#[test]
fn a_partition_withdraws_what_it_cuts_off_and_healing_restores_it() {
    let mut sim = ring();
    let before = sim.vips("a");
    // {a, b} | {c, d, e}: cut b-c and e-a.
    sim.cut("b", "c");
    sim.cut("e", "a");
    sim.settle();
    let ab: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    let cde: BTreeSet<String> = ["c", "d", "e"].iter().map(|s| s.to_string()).collect();
    for s in ["a", "b"] {
        assert_eq!(sim.sites_seen(s), ab, "{s} keeps only its side");
        assert_eq!(sim.next_hop(s, "d"), None, "{s} has no route across the partition");
    }
    for s in ["c", "d", "e"] {
        assert_eq!(sim.sites_seen(s), cde, "{s} keeps only its side");
    }
    sim.assert_routes_use_live_connections();
    // Heal through a new link: everything returns, at the same VIPs.
    sim.link("a", "d", 1);
    sim.settle();
    for s in SITES {
        assert_eq!(sim.vips(s), before, "{s} after healing");
    }
    assert_eq!(sim.next_hop("b", "d").as_deref(), Some("a"));
    sim.assert_routes_use_live_connections();
}

#[test]
fn vips_survive_restarts_withdrawals_and_a_clock_stepped_back() {
    let mut sim = ring();
    let before = sim.vips("a");
    // c restarts with its clock 10 minutes behind: its new advertisement must still win
    // over the one the others hold (which has a higher sequence number).
    sim.restart("c", Duration::from_secs(600));
    // c dials d (it redeemed d's token) and accepts b: after the restart it dials d again.
    assert_eq!(sim.node("c").dialed, BTreeSet::from(["d".to_string()]));
    for s in SITES {
        assert_eq!(sim.vips(s), before, "{s} after c restarted");
    }
    // c withdraws c-1, a new member c-2 joins: c-2 never gets c-1's address while it may be
    // cached, and c-1 gets its own back when it returns.
    let c1 = before[&("c".to_string(), "c-1".to_string())];
    sim.export("c", vec![service("grid", &["c-0", "c-2"])]);
    sim.settle();
    let mid = sim.vips("a");
    assert!(
        !mid.contains_key(&("c".to_string(), "c-1".to_string())),
        "c-1 withdrawn everywhere"
    );
    assert_ne!(
        mid[&("c".to_string(), "c-2".to_string())],
        c1,
        "a freed VIP is not reused at once"
    );
    sim.export("c", vec![service("grid", &["c-0", "c-1", "c-2"])]);
    sim.settle();
    assert_eq!(sim.vips("e")[&("c".to_string(), "c-1".to_string())], c1);
    // And after another restart, the whole allocation is as it was.
    let now = sim.vips("a");
    sim.restart("c", Duration::ZERO);
    assert_eq!(sim.vips("a"), now);
}

#[test]
fn link_churn_and_silence_leave_consistent_views_and_routes() {
    let mut sim = ring();
    let before = sim.vips("a");
    for round in 0..20 {
        let (x, y) = (SITES[round % 5], SITES[(round + 1) % 5]);
        sim.cut(x, y);
        if round % 3 == 0 {
            sim.settle();
        }
        sim.link(x, y, 1);
        // A link falling silent and being heard again on the way.
        let conn = sim.node(x).conns[y].0;
        sim.silent(x, y, conn, true);
        if round % 2 == 0 {
            sim.settle();
            // While silent, x reaches y the other way round the ring.
            assert_eq!(
                sim.next_hop(x, y).as_deref(),
                Some(SITES[(round + 4) % 5]),
                "round {round}"
            );
        }
        sim.silent(x, y, conn, false);
        // A stale event about a connection that is gone changes nothing.
        sim.event(
            x,
            Event::LinkDown {
                name: y.to_string(),
                conn: conn + 10_000,
            },
        );
    }
    sim.settle();
    for s in SITES {
        assert_eq!(sim.vips(s), before, "{s} after churn");
    }
    assert_eq!(sim.next_hop("a", "b").as_deref(), Some("b"));
    sim.assert_routes_use_live_connections();
}

#[test]
fn a_silent_link_leaves_routing_while_its_connection_stays() {
    let mut sim = Sim::new(&["a", "b", "c"]);
    for s in ["a", "b", "c"] {
        sim.export(s, vec![service("grid", &[&format!("{s}-0")])]);
    }
    sim.link("a", "b", 1);
    sim.link("b", "c", 1);
    sim.link("a", "c", 3);
    sim.settle();
    assert_eq!(sim.next_hop("a", "b").as_deref(), Some("b"));
    let conn = sim.node("a").conns["b"].0;
    sim.silent("a", "b", conn, true);
    sim.settle();
    // a no longer uses a-b (b is reached through c), but keeps the connection; its link
    // table shows the link down with the connection kept.
    assert_eq!(sim.next_hop("a", "b").as_deref(), Some("c"));
    assert!(sim.node("a").conns.contains_key("b"));
    let shown = sim.node("a").links.list().into_iter().find(|l| l.name == "b").unwrap();
    assert_eq!(shown.state, LinkState::Down);
    assert_eq!(sim.node("a").links.conns().count(), 2);
    sim.silent("a", "b", conn, false);
    sim.settle();
    assert_eq!(sim.next_hop("a", "b").as_deref(), Some("b"));
}

#[test]
fn sidecars_export_through_their_gateway_and_route_everything_through_it() {
    let mut sim = Sim::new(&["a", "b"]);
    sim.link("a", "b", 1);
    sim.start("a-pod0", "a", Role::Sidecar, VipTable::default());
    sim.start("a-pod1", "a", Role::Sidecar, VipTable::default());
    sim.attach("a-pod0", "a");
    sim.attach("a-pod1", "a");
    sim.export("a-pod0", vec![service("grid", &["m-0"])]);
    sim.export("a-pod1", vec![service("grid", &["m-1"])]);
    sim.export("b", vec![service("grid", &["m-0"])]);
    sim.settle();
    // Every node sees all three members, at the same VIPs; site a's are assigned by its
    // gateway from a's block.
    let reference = sim.vips("b");
    assert_eq!(reference.len(), 3);
    for n in ["a", "a-pod0", "a-pod1"] {
        assert_eq!(sim.vips(n), reference, "{n}");
    }
    let vip0 = reference[&("a".to_string(), "m-0".to_string())].unwrap();
    assert_eq!(range().block_of(vip0), Some(VipRange::block_of_site("a")));
    // The gateway delivers m-0 through pod0's sidecar; a sidecar routes everything, its own
    // site included, through the gateway.
    let gw = sim.nodes["a"].published.clone().unwrap();
    let pod0_conn = sim.nodes["a"].conns["a-pod0"].0;
    assert_eq!(gw.member_routes.get(&vip0), Some(&pod0_conn));
    assert_eq!(sim.next_hop("a-pod1", "b").as_deref(), Some("a"));
    assert_eq!(sim.next_hop("a-pod1", "a").as_deref(), Some("a"));
    // A sidecar that goes away takes its member with it, everywhere.
    sim.cut("a", "a-pod0");
    sim.settle();
    assert!(!sim.vips("b").contains_key(&("a".to_string(), "m-0".to_string())));
    assert!(
        !sim.nodes["a"]
            .published
            .as_ref()
            .unwrap()
            .member_routes
            .contains_key(&vip0)
    );
    // It comes back (a restarted pod): the same VIP.
    sim.attach("a-pod0", "a");
    sim.settle();
    assert_eq!(sim.vips("b")[&("a".to_string(), "m-0".to_string())], Some(vip0));
    sim.assert_routes_use_live_connections();
}
