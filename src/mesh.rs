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

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::catalog::{Advert, EndpointAd, Lsdb, PortAd, ServiceAd, View};
use crate::config::Export;
use crate::metrics::Metrics;
use crate::protocol::Control;
use crate::role::Role;
use crate::vips::{VipAllocator, VipError, VipRange, VipTable};

/// A link that is up, as the mesh uses it.
struct UpLink {
    peer_site: String,
    cost: u32,
    conn: quinn::Connection,
    /// Frames for the link's control stream (a writer task drains it).
    control: mpsc::UnboundedSender<Control>,
    /// Nothing heard for `links.down_after`: kept (its flows wait), but out of our advert and
    /// our routes until it is heard again.
    silent: bool,
    /// An advert arrived on this connection: the peer's catalogue has reached us, which is
    /// what readiness waits for ([`crate::readiness`]).
    heard: bool,
}

/// A sidecar connected to this gateway.
struct Member {
    conn: quinn::Connection,
    control: mpsc::UnboundedSender<Control>,
    /// Order of connection (higher is newer): when two sidecars export the same endpoint, the
    /// newest delivers it. A pod whose sidecar restarted connects again before the old,
    /// killed sidecar's connection times out (`links.idle_timeout`), and the new one must win
    /// at once; closing the older one instead could make two live, misconfigured pods
    /// replace each other in a loop.
    connected: u64,
    /// Its pod's exports, without VIPs.
    exports: Vec<ServiceAd>,
}

/// Mutable state behind one lock (changes are rare: exports, links, adverts).
struct Inner {
    lsdb: Lsdb,
    /// Sequence number of our latest advertisement.
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
}

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

/// The live catalog and routing table.
pub struct Mesh {
    /// Our site id.
    site: String,
    /// The clusterset's VIP range.
    range: VipRange,
    /// Where the VIP allocation is persisted (see [`VipStore::file`]).
    vip_file: Option<PathBuf>,
    inner: Mutex<Inner>,
    /// The current view, for listeners, DNS and the admin API.
    view: watch::Sender<Arc<View>>,
    /// Destination site → connection to the next hop: read on every flow and datagram.
    routes: RwLock<HashMap<String, quinn::Connection>>,
    /// VIP → connection of the sidecar that delivers it (gateways only); read per flow.
    member_routes: RwLock<HashMap<IpAddr, quinn::Connection>>,
    /// Gateway, or sidecar (member mode, see the module doc).
    role: Role,
    metrics: Arc<Metrics>,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Mesh {
    /// A mesh for `site`, of a gateway or a sidecar (`role`), whose VIPs come from `vips`; a
    /// gateway originates its (empty) advertisement at once.
    pub fn new(site: &str, vips: VipStore, role: Role, metrics: Arc<Metrics>) -> Arc<Mesh> {
        let mesh = Arc::new(Mesh {
            site: site.to_string(),
            range: vips.allocator.range(),
            vip_file: vips.file,
            inner: Mutex::new(Inner {
                lsdb: Lsdb::default(),
                seq: 0,
                allocator: vips.allocator,
                vip_table: vips.table,
                config_exports: Vec::new(),
                services: Vec::new(),
                links: BTreeMap::new(),
                members: BTreeMap::new(),
                member_vips: HashMap::new(),
                member_seq: 0,
            }),
            view: watch::channel(Arc::new(View::default())).0,
            routes: RwLock::new(HashMap::new()),
            member_routes: RwLock::new(HashMap::new()),
            role,
            metrics,
        });
        if role == Role::Gateway {
            let mut inner = mesh.lock();
            mesh.originate(&mut inner);
        }
        mesh
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn range(&self) -> VipRange {
        self.range
    }

    /// Our VIP block.
    pub fn block(&self) -> u32 {
        self.lock().allocator.block()
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// The connection a flow to `site` leaves on, if `site` is reachable.
    pub fn next_hop(&self, site: &str) -> Option<quinn::Connection> {
        match self.routes.read() {
            Ok(r) => r.get(site).cloned(),
            Err(p) => p.into_inner().get(site).cloned(),
        }
    }

    /// What this agent is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our exports from causeway.yaml (VIPs not yet assigned).
    pub fn config_exports(&self) -> Vec<ServiceAd> {
        self.lock().config_exports.clone()
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
        let mut inner = self.lock();
        if inner.config_exports == ads {
            return Ok(());
        }
        inner.config_exports = ads;
        if self.role == Role::Sidecar {
            for link in inner.links.values() {
                let _ = link.control.send(Control::MemberExports {
                    services: inner.config_exports.clone(),
                });
            }
            return Ok(());
        }
        self.rebuild(&mut inner)
    }

    /// A sidecar sent its pod's exports (gateways only).
    pub fn set_member_exports(&self, name: &str, services: Vec<ServiceAd>) -> Result<(), VipError> {
        let mut inner = self.lock();
        match inner.members.get_mut(name) {
            Some(m) if m.exports != services => m.exports = services,
            _ => return Ok(()),
        }
        self.rebuild(&mut inner)
    }

    /// A sidecar connected: it gets everything we know.
    pub fn member_up(&self, name: &str, conn: quinn::Connection, control: mpsc::UnboundedSender<Control>) {
        let mut inner = self.lock();
        for advert in inner.lsdb.all() {
            let _ = control.send(Control::Advert(Box::new(advert.clone())));
        }
        inner.member_seq += 1;
        let connected = inner.member_seq;
        inner.members.insert(
            name.to_string(),
            Member {
                conn,
                control,
                exports: Vec::new(),
                connected,
            },
        );
    }

    /// A sidecar went away: its endpoints are withdrawn.
    pub fn member_down(&self, name: &str, conn: &quinn::Connection) {
        let mut inner = self.lock();
        if inner
            .members
            .get(name)
            .is_some_and(|m| m.conn.stable_id() == conn.stable_id())
        {
            inner.members.remove(name);
            if let Err(e) = self.rebuild(&mut inner) {
                warn!(error = %e, "re-assigning VIPs after a sidecar left");
            }
        }
    }

    /// The connection of the sidecar that delivers `vip`, if one does.
    pub fn member_for(&self, vip: &IpAddr) -> Option<quinn::Connection> {
        match self.member_routes.read() {
            Ok(r) => r.get(vip).cloned(),
            Err(p) => p.into_inner().get(vip).cloned(),
        }
    }

    /// Merges our configured exports with our members', assigns VIPs, and advertises the
    /// result if it changed. Two sources of one `<svc>.<ns>` merge into one service.
    fn rebuild(&self, inner: &mut Inner) -> Result<(), VipError> {
        let mut merged: BTreeMap<(String, String), ServiceAd> = BTreeMap::new();
        let mut owner: HashMap<(String, String, String), String> = HashMap::new();
        // Newest sidecar first: of two claiming one endpoint, it delivers (see Member).
        let mut members: Vec<(&String, &Member)> = inner.members.iter().collect();
        members.sort_by_key(|(_, m)| std::cmp::Reverse(m.connected));
        let sources = std::iter::once((None, &inner.config_exports))
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
                        warn!(service = %ad.service, hostname = %ep.hostname, "two pods export the same hostname (or a restarted pod's old sidecar has not timed out yet); the most recently connected one delivers it");
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
        let table = inner.allocator.assign(&inner.vip_table, &keys, SystemTime::now())?;
        if table != inner.vip_table {
            // Persisted before anyone is told, so no address handed out is forgotten by a
            // restart; failing that, the VIPs still work until the next restart.
            if let Some(path) = &self.vip_file
                && let Err(e) = crate::state::write_yaml(path, &table)
            {
                warn!(error = %e, "VIP allocation not persisted; a restart may give endpoints new VIPs");
            }
            inner.vip_table = table;
        }
        let vips = inner.vip_table.live();
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
        inner.member_vips = member_vips;
        if services != inner.services {
            inner.services = services;
            info!(
                services = inner.services.len(),
                members = inner.members.len(),
                "exports changed; advertising"
            );
            self.originate(inner);
        } else {
            self.recompute(inner);
        }
        Ok(())
    }

    /// A link came up: remember it, give the peer everything we know, advertise the change.
    pub fn link_up(
        &self,
        name: &str,
        peer_site: &str,
        cost: u32,
        conn: quinn::Connection,
        control: mpsc::UnboundedSender<Control>,
    ) {
        let mut inner = self.lock();
        if self.role == Role::Sidecar {
            // Our gateway: it wants our pod's exports; adverts come from it, not from us.
            let _ = control.send(Control::MemberExports {
                services: inner.config_exports.clone(),
            });
        } else {
            for advert in inner.lsdb.all() {
                let _ = control.send(Control::Advert(Box::new(advert.clone())));
            }
        }
        let link = UpLink {
            peer_site: peer_site.to_string(),
            cost,
            conn,
            control,
            silent: false,
            heard: false,
        };
        inner.links.insert(name.to_string(), link);
        match self.role {
            Role::Sidecar => self.recompute(&inner),
            Role::Gateway => self.originate(&mut inner),
        }
    }

    /// A link went down (only if `conn` is still the one we have for it).
    pub fn link_down(&self, name: &str, conn: &quinn::Connection) {
        let mut inner = self.lock();
        if inner
            .links
            .get(name)
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
        {
            inner.links.remove(name);
            match self.role {
                Role::Sidecar => self.recompute(&inner),
                Role::Gateway => self.originate(&mut inner),
            }
        }
    }

    /// The link `name` on `conn` fell silent (`silent`) or was heard again
    /// ([`crate::link::liveness`]): a silent link is left out of our advert and of routes, so
    /// its peer's endpoints leave routing and DNS unless another path reaches them; its
    /// connection and open flows stay. Sidecar sessions on a gateway are not links: ignored.
    pub fn link_silent(&self, name: &str, conn: &quinn::Connection, silent: bool) {
        let mut inner = self.lock();
        let Some(link) = inner.links.get_mut(name) else {
            return;
        };
        if link.conn.stable_id() != conn.stable_id() || link.silent == silent {
            return;
        }
        link.silent = silent;
        match self.role {
            Role::Sidecar => self.recompute(&inner),
            Role::Gateway => self.originate(&mut inner),
        }
    }

    /// Names of the up links on whose current connection an advert has arrived (on a
    /// sidecar: its gateway link once the gateway's catalogue came), for readiness.
    pub fn links_heard(&self) -> std::collections::BTreeSet<String> {
        self.lock()
            .links
            .iter()
            .filter(|(_, l)| l.heard)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// An advert arrived on link `from`.
    pub fn on_advert(&self, from: &str, advert: Advert) {
        let mut inner = self.lock();
        if let Some(link) = inner.links.get_mut(from) {
            link.heard = true;
        }
        if advert.origin == self.site && self.role == Role::Gateway {
            // An old advertisement of ours from before a restart (or a clock step): make
            // sure ours is newer, so the whole clusterset forgets the old one.
            if advert.seq >= inner.seq {
                inner.seq = advert.seq;
                self.originate(&mut inner);
            }
            return;
        }
        let origin = advert.origin.clone();
        let seq = advert.seq;
        if !inner.lsdb.apply(advert.clone()) {
            return;
        }
        debug!(%origin, seq, from, "advert applied");
        let advert = Box::new(advert);
        for (name, link) in &inner.links {
            if name != from && self.role == Role::Gateway {
                let _ = link.control.send(Control::Advert(advert.clone()));
            }
        }
        for m in inner.members.values() {
            let _ = m.control.send(Control::Advert(advert.clone()));
        }
        self.recompute(&inner);
    }

    /// Builds, stores and floods our own advertisement, then recomputes.
    fn originate(&self, inner: &mut Inner) {
        inner.seq = now_millis().max(inner.seq + 1);
        let mut links: BTreeMap<String, u32> = BTreeMap::new();
        for l in inner.links.values().filter(|l| !l.silent) {
            let c = links.entry(l.peer_site.clone()).or_insert(l.cost);
            *c = (*c).min(l.cost);
        }
        let advert = Advert {
            origin: self.site.clone(),
            seq: inner.seq,
            block: inner.allocator.block(),
            links,
            services: inner.services.clone(),
        };
        inner.lsdb.apply(advert.clone());
        let advert = Box::new(advert);
        for link in inner.links.values() {
            let _ = link.control.send(Control::Advert(advert.clone()));
        }
        for m in inner.members.values() {
            let _ = m.control.send(Control::Advert(advert.clone()));
        }
        self.recompute(inner);
    }

    fn recompute(&self, inner: &Inner) {
        let view = View::compute(&self.site, &inner.lsdb, &self.range);
        let mut routes = HashMap::new();
        if self.role == Role::Sidecar {
            // Everything leaves through the gateway, our own site's other pods included.
            if let Some(gw) = inner.links.values().find(|l| !l.silent) {
                for site in view.routes.keys().chain(std::iter::once(&self.site)) {
                    routes.insert(site.clone(), gw.conn.clone());
                }
            }
        }
        for (site, route) in view.routes.iter().filter(|_| self.role == Role::Gateway) {
            let best = inner
                .links
                .values()
                .filter(|l| l.peer_site == route.next_hop && !l.silent)
                .min_by_key(|l| l.cost)
                .map(|l| l.conn.clone());
            if let Some(conn) = best {
                routes.insert(site.clone(), conn);
            }
        }
        match self.routes.write() {
            Ok(mut r) => *r = routes,
            Err(p) => *p.into_inner() = routes,
        }
        let member_routes: HashMap<IpAddr, quinn::Connection> = inner
            .member_vips
            .iter()
            .filter_map(|(vip, name)| inner.members.get(name).map(|m| (*vip, m.conn.clone())))
            .collect();
        match self.member_routes.write() {
            Ok(mut r) => *r = member_routes,
            Err(p) => *p.into_inner() = member_routes,
        }
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
    }
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
