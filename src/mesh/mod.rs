//! The live clusterset as this agent sees it: our advertisement, everyone else's, the links
//! that carry them, and the view computed from them.
//!
//! This is the async shell around the pure [`catalog`](crate::catalog) and
//! [`routing`](crate::routing) logic. It originates our advertisement whenever our exports or
//! our up links change, floods adverts it has not seen to every other link, and after each
//! change recomputes the [`View`] and the route table (destination site → connection of the
//! next hop). The data plane reads routes on every flow and datagram; DNS, `service list` and
//! the VIP listeners follow the view through a `watch` channel.
//!
//! A gateway also serves its site's **sidecars** (members): each sends the exports of its
//! pod, which the gateway assigns VIPs to and advertises as its site's own, and each gets
//! every advert. A sidecar's mesh runs in **member mode**: it originates nothing, sends its
//! exports to its gateway, takes the site's advert from it, and routes every flow that is not
//! for its own pod to the gateway.
//!
//! A gateway's VIP allocation ([`VipTable`]) is written to `vips.yaml` in the state directory
//! whenever it changes, before the VIPs in it are advertised, so a restart hands every
//! endpoint the address it had; [`load_vip_table`] reads it back at start.
//!
//! The decisions are [`core::MeshCore`]'s, a state machine without sockets or clock; this
//! shell turns calls into its events, and its actions into control messages on the links'
//! streams, writes of `vips.yaml`, and the published view and route tables. `sim` runs many
//! cores against each other in one process (tests only).

pub mod core;

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tracing::warn;

use self::core::{Action, ConnId, Event, MeshCore, Publication, To};
use crate::catalog::{Advert, EndpointAd, PortAd, ServiceAd, View};
use crate::config::Export;
use crate::link::lanes::{LaneChoice, LaneSet};
use crate::metrics::Metrics;
use crate::protocol::Control;
use crate::role::Role;
use crate::vips::{VipAllocator, VipError, VipRange, VipTable};

/// Where a mesh's VIP allocation starts from and is kept.
pub struct VipStore {
    /// Assigns addresses: range, our block, quarantine of freed addresses.
    pub allocator: VipAllocator,
    /// The allocation as persisted before this start ([`load_vip_table`]), or empty.
    pub table: VipTable,
    /// `vips.yaml`, written on every change; `None` keeps it in memory only (sidecars, which
    /// assign nothing and may have a read-only state directory, and tests).
    pub file: Option<PathBuf>,
}

/// Reads the VIP allocation persisted at `path`. An absent file is an empty table; so is an
/// unreadable or corrupt one, after a warning naming the file (the agent still starts, but
/// its VIPs may move this once); a corrupt file is first renamed to `<name>.corrupt` so that
/// it can be inspected.
pub fn load_vip_table(path: &Path) -> VipTable {
    match crate::state::read_yaml_or_default::<VipTable>(path) {
        Ok(table) => table,
        Err(e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".corrupt");
            let aside = PathBuf::from(aside);
            let kept = matches!(e, crate::state::StateError::Corrupt { .. }) && std::fs::rename(path, &aside).is_ok();
            warn!(
                file = %path.display(),
                error = %e,
                kept = %if kept { aside.display().to_string() } else { "no".into() },
                "the VIP allocation cannot be read; starting with an empty one, so endpoints may get new VIPs once"
            );
            VipTable::default()
        }
    }
}

/// The live catalog and routing table: [`MeshCore`] and the connections it names.
pub struct Mesh {
    /// Our site id.
    site: String,
    /// The clusterset's VIP range.
    range: VipRange,
    /// Where the VIP allocation is persisted (see [`VipStore::file`]).
    vip_file: Option<PathBuf>,
    /// The core and the connections behind its [`ConnId`]s, under one lock (changes are
    /// rare: exports, links, adverts).
    inner: Mutex<Shell>,
    /// The current view, for listeners, DNS and the admin API.
    view: watch::Sender<Arc<View>>,
    /// Destination site → lanes of the link to the next hop: read on every flow and
    /// datagram.
    routes: RwLock<HashMap<String, Arc<LaneSet>>>,
    /// Bumped whenever the routes or a link's lanes change: what an open flow watches to
    /// move when its next hop (or its lane) does. One channel for both, as every open flow
    /// polls it on each of its wake-ups.
    routes_changed: watch::Sender<u64>,
    /// Extra lane's connection id → its link's first connection id ([`Mesh::link_of`]);
    /// read per UDP datagram from a link.
    lane_links: RwLock<HashMap<usize, ConnId>>,
    /// VIP → connection of the sidecar that delivers it (gateways only); read per flow.
    member_routes: RwLock<HashMap<IpAddr, quinn::Connection>>,
    /// Gateway, or sidecar (member mode, see the module doc).
    role: Role,
    metrics: Arc<Metrics>,
}

/// What the shell keeps beside the core: how to reach what the core names.
struct Shell {
    core: MeshCore,
    /// Control streams of up links by name, with their connection's id.
    links: BTreeMap<String, (ConnId, mpsc::UnboundedSender<Control>)>,
    /// Control streams of connected sidecars by name (gateways only).
    members: BTreeMap<String, (ConnId, mpsc::UnboundedSender<Control>)>,
    /// Every connection the core may route to, by the id of its first connection, with
    /// the link's extra lanes ([`crate::link::lanes`]).
    conns: HashMap<ConnId, Arc<LaneSet>>,
}

impl Mesh {
    /// A mesh for `site`, of a gateway or a sidecar (`role`), whose VIPs come from `vips`; a
    /// gateway originates its (empty) advertisement at once.
    pub fn new(site: &str, vips: VipStore, role: Role, metrics: Arc<Metrics>) -> Arc<Mesh> {
        let range = vips.allocator.range();
        let core = MeshCore::new(site, role, vips.allocator, vips.table, SystemTime::now());
        let mesh = Arc::new(Mesh {
            site: site.to_string(),
            range,
            vip_file: vips.file,
            inner: Mutex::new(Shell {
                core,
                links: BTreeMap::new(),
                members: BTreeMap::new(),
                conns: HashMap::new(),
            }),
            view: watch::channel(Arc::new(View::default())).0,
            routes: RwLock::new(HashMap::new()),
            member_routes: RwLock::new(HashMap::new()),
            routes_changed: watch::channel(0).0,
            lane_links: RwLock::new(HashMap::new()),
            role,
            metrics,
        });
        let mut shell = mesh.lock();
        mesh.carry_out(&mut shell);
        drop(shell);
        mesh
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shell> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Feeds `event` to the core and carries out what follows.
    fn handle(&self, shell: &mut Shell, event: Event) -> Result<(), VipError> {
        let result = shell.core.handle(event, SystemTime::now());
        self.carry_out(shell);
        result
    }

    /// Carries out the core's queued actions, in order.
    fn carry_out(&self, shell: &mut Shell) {
        while let Some(action) = shell.core.poll_action() {
            match action {
                Action::Send { to, msg } => {
                    let tx = match &to {
                        To::Link(name) => shell.links.get(name),
                        To::Member(name) => shell.members.get(name),
                    };
                    if let Some((_, tx)) = tx {
                        let _ = tx.send(msg);
                    }
                }
                Action::PersistVips(table) => {
                    // Written before anything that carries the new VIPs is sent; failing
                    // that, the VIPs still work until the next restart.
                    if let Some(path) = &self.vip_file
                        && let Err(e) = crate::state::write_yaml(path, &table)
                    {
                        warn!(error = %e, "VIP allocation not persisted; a restart may give endpoints new VIPs");
                    }
                }
                Action::Publish(p) => self.publish(shell, p),
            }
        }
    }

    /// Installs a new view and its routes.
    fn publish(&self, shell: &Shell, p: Publication) {
        let Publication {
            view,
            routes,
            member_routes,
        } = p;
        let routes: HashMap<String, Arc<LaneSet>> = routes
            .into_iter()
            .filter_map(|(site, id)| shell.conns.get(&id).map(|c| (site, c.clone())))
            .collect();
        *write(&self.routes) = routes;
        let member_routes: HashMap<IpAddr, quinn::Connection> = member_routes
            .into_iter()
            .filter_map(|(vip, id)| shell.conns.get(&id).map(|c| (vip, c.first().clone())))
            .collect();
        *write(&self.member_routes) = member_routes;
        for c in &view.conflicts {
            warn!("{c}");
        }
        self.metrics.set_services(view.services.len());
        self.metrics.set_endpoints(
            view.services
                .iter()
                .flat_map(|s| &s.endpoints)
                .filter(|e| e.ready)
                .count(),
        );
        self.view.send_replace(Arc::new(view));
        // After the view: a flow that wakes reads both.
        self.routes_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn range(&self) -> VipRange {
        self.range
    }

    /// Our VIP block.
    pub fn block(&self) -> u32 {
        self.lock().core.block()
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// The connection a flow to `site` leaves on, if `site` is reachable: the lane of the
    /// next hop's link that `choice` picks, the same one for the same choice while the
    /// link's lanes stay.
    pub fn next_hop(&self, site: &str, choice: LaneChoice) -> Option<quinn::Connection> {
        self.with_route(site, |l| l.pick(choice))
    }

    /// `f` of the lanes of the link to `site`'s next hop, if `site` is reachable (under the
    /// routes' read lock: no reference count taken on this per-flow path).
    fn with_route<R>(&self, site: &str, f: impl FnOnce(&LaneSet) -> R) -> Option<R> {
        read(&self.routes).get(site).map(|l| f(l))
    }

    /// Whether the link to `site`'s next hop has (or agreed to have) lanes besides its first
    /// connection: a resumable flow there moves to one once it turns bulk.
    pub fn has_bulk_lanes(&self, site: &str) -> bool {
        self.with_route(site, |l| l.agreed() > 1).unwrap_or(false)
    }

    /// An extra lane of the link whose first connection is `first` came up: new flows may
    /// take it. False when that link is no longer routed (the lane should close).
    pub fn lane_up(&self, first: &quinn::Connection, lane: quinn::Connection) -> bool {
        let added = match self.lock().conns.get(&first.stable_id()) {
            Some(lanes) => {
                write(&self.lane_links).insert(lane.stable_id(), first.stable_id());
                lanes.add(lane);
                true
            }
            None => false,
        };
        self.routes_changed.send_modify(|n| *n = n.wrapping_add(1));
        added
    }

    /// An extra lane of the link whose first connection is `first` ended.
    pub fn lane_down(&self, first: &quinn::Connection, lane: &quinn::Connection) {
        if let Some(lanes) = self.lock().conns.get(&first.stable_id()) {
            lanes.remove(lane);
        }
        write(&self.lane_links).remove(&lane.stable_id());
        self.routes_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The id of the link `conn` belongs to: its first connection's id (`conn`'s own for a
    /// first connection, or any connection that is no lane).
    pub fn link_of(&self, conn: &quinn::Connection) -> usize {
        let id = conn.stable_id();
        read(&self.lane_links).get(&id).copied().unwrap_or(id)
    }

    /// A receiver that sees every change of the routes or of any link's lanes.
    pub fn subscribe_routes(&self) -> watch::Receiver<u64> {
        self.routes_changed.subscribe()
    }

    /// What this agent is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our exports from causeway.yaml (VIPs not yet assigned).
    pub fn config_exports(&self) -> Vec<ServiceAd> {
        self.lock().core.config_exports().to_vec()
    }

    /// Replaces our exports (from causeway.yaml) and advertises them at once; a sidecar
    /// sends them to its gateway instead.
    pub fn set_exports(&self, exports: &[Export], default_namespace: &str) -> Result<(), VipError> {
        let ads: Vec<ServiceAd> = exports
            .iter()
            .map(|e| ServiceAd {
                service: e.service.clone(),
                namespace: e.namespace.clone().unwrap_or_else(|| default_namespace.to_string()),
                ports: e.ports.iter().map(PortAd::from).collect(),
                endpoints: e
                    .endpoints
                    .iter()
                    .map(|ep| EndpointAd {
                        hostname: ep.hostname.clone(),
                        ip: ep.ip,
                        ready: ep.ready,
                        vip: None,
                    })
                    .collect(),
            })
            .collect();
        let mut shell = self.lock();
        self.handle(&mut shell, Event::ExportsChanged(ads))
    }

    /// A sidecar sent its pod's exports (gateways only).
    pub fn set_member_exports(&self, name: &str, services: Vec<ServiceAd>) -> Result<(), VipError> {
        let mut shell = self.lock();
        self.handle(
            &mut shell,
            Event::MemberExports {
                name: name.to_string(),
                services,
            },
        )
    }

    /// A sidecar connected: it gets everything we know.
    pub fn member_up(&self, name: &str, conn: quinn::Connection, control: mpsc::UnboundedSender<Control>) {
        let mut shell = self.lock();
        let id = conn.stable_id();
        shell.conns.insert(id, Arc::new(LaneSet::new(conn, 1)));
        shell.members.insert(name.to_string(), (id, control));
        let _ = self.handle(
            &mut shell,
            Event::MemberUp {
                name: name.to_string(),
                conn: id,
            },
        );
    }

    /// A sidecar went away: its endpoints are withdrawn.
    pub fn member_down(&self, name: &str, conn: &quinn::Connection) {
        let mut shell = self.lock();
        let id = conn.stable_id();
        if let Err(e) = self.handle(
            &mut shell,
            Event::MemberDown {
                name: name.to_string(),
                conn: id,
            },
        ) {
            warn!(error = %e, "re-assigning VIPs after a sidecar left");
        }
        if shell.members.get(name).is_some_and(|(c, _)| *c == id) {
            shell.members.remove(name);
        }
        shell.conns.remove(&id);
    }

    /// The connection of the sidecar that delivers `vip`, if one does.
    pub fn member_for(&self, vip: &IpAddr) -> Option<quinn::Connection> {
        read(&self.member_routes).get(vip).cloned()
    }

    /// A link came up: remember it, give the peer everything we know, advertise the change.
    pub fn link_up(
        &self,
        name: &str,
        peer_site: &str,
        cost: u32,
        conn: quinn::Connection,
        lanes: u8,
        control: mpsc::UnboundedSender<Control>,
    ) {
        let mut shell = self.lock();
        let id = conn.stable_id();
        shell.conns.insert(id, Arc::new(LaneSet::new(conn, lanes)));
        shell.links.insert(name.to_string(), (id, control));
        let _ = self.handle(
            &mut shell,
            Event::LinkUp {
                name: name.to_string(),
                peer_site: peer_site.to_string(),
                cost,
                conn: id,
            },
        );
    }

    /// A link went down (only if `conn` is still the one we have for it).
    pub fn link_down(&self, name: &str, conn: &quinn::Connection) {
        let mut shell = self.lock();
        let id = conn.stable_id();
        let _ = self.handle(
            &mut shell,
            Event::LinkDown {
                name: name.to_string(),
                conn: id,
            },
        );
        if shell.links.get(name).is_some_and(|(c, _)| *c == id) {
            shell.links.remove(name);
        }
        shell.conns.remove(&id);
    }

    /// The link `name` on `conn` fell silent (`silent`) or was heard again
    /// ([`crate::link::liveness`]): a silent link is left out of our advert and of routes, so
    /// its peer's endpoints leave routing and DNS unless another path reaches them; its
    /// connection and open flows stay. Sidecar sessions on a gateway are not links: ignored.
    pub fn link_silent(&self, name: &str, conn: &quinn::Connection, silent: bool) {
        let mut shell = self.lock();
        let _ = self.handle(
            &mut shell,
            Event::LinkSilent {
                name: name.to_string(),
                conn: conn.stable_id(),
                silent,
            },
        );
    }

    /// The links an advert has arrived on (readiness).
    pub fn links_heard(&self) -> std::collections::BTreeSet<String> {
        self.lock().core.links_heard()
    }

    /// An advert arrived on link `from`.
    pub fn on_advert(&self, from: &str, advert: Advert) {
        let mut shell = self.lock();
        let _ = self.handle(
            &mut shell,
            Event::Advert {
                from: from.to_string(),
                advert,
            },
        );
    }
}

/// Reads `l`, whether or not a writer panicked: the tables are replaced whole or changed by
/// one insert or remove, so a poisoned one is still consistent.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes `l`, whether or not a writer panicked (see [`read`]).
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vip_table_loads_absent_good_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vips.yaml");
        // Absent, or empty: an empty table.
        assert_eq!(load_vip_table(&path), VipTable::default());
        std::fs::write(&path, "").unwrap();
        assert_eq!(load_vip_table(&path), VipTable::default());
        // Good: read back as written.
        let text = "vips:\n- service: web\n  namespace: default\n  hostname: web-0\n  vip: 127.77.95.182\n\
                    - service: web\n  namespace: default\n  hostname: web-1\n  vip: 127.77.95.17\n  \
                    freed_at: 2023-11-14T22:13:25Z\n";
        std::fs::write(&path, text).unwrap();
        let table = load_vip_table(&path);
        assert_eq!(table.vips.len(), 2);
        assert_eq!(table.live().len(), 1);
        assert_eq!(serde_yaml::to_string(&table).unwrap(), text);
        // Corrupt: an empty table, and the file is set aside, not lost.
        for bad in [
            "vips: [{{{",
            "vips:\n- {service: web, vip: 1.2.3.4}\n",
            "\u{0}\u{1}garbage",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(load_vip_table(&path), VipTable::default(), "{bad:?}");
            assert!(!path.exists());
            assert_eq!(
                std::fs::read_to_string(dir.path().join("vips.yaml.corrupt")).unwrap(),
                bad
            );
        }
    }
}
