//! The live clusterset as this agent sees it: our advertisement, everyone else's, the links
//! that carry them, and the view computed from them.
//!
//! This is the async shell around the pure [`catalog`](crate::catalog) and
//! [`routing`](crate::routing) logic. It originates our advertisement whenever our exports or
//! our up links change, floods adverts it has not seen to every other link, and after each
//! change recomputes the [`View`] and the route table (destination site → connection of the
//! next hop). The data plane reads routes on every flow and datagram; DNS, `service list` and
//! the VIP listeners follow the view through a `watch` channel.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::catalog::{Advert, EndpointAd, Lsdb, ServiceAd, View};
use crate::config::Export;
use crate::metrics::Metrics;
use crate::protocol::Control;
use crate::vips::{VipAllocator, VipError, VipRange};

/// A link that is up, as the mesh uses it.
struct UpLink {
    peer_site: String,
    cost: u32,
    conn: quinn::Connection,
    /// Frames for the link's control stream (a writer task drains it).
    control: mpsc::UnboundedSender<Control>,
}

/// Mutable state behind one lock (changes are rare: exports, links, adverts).
struct Inner {
    lsdb: Lsdb,
    /// Sequence number of our latest advertisement.
    seq: u64,
    allocator: VipAllocator,
    /// Our exports as advertised (with VIPs).
    services: Vec<ServiceAd>,
    /// Up links by name.
    links: BTreeMap<String, UpLink>,
}

/// The live catalog and routing table.
pub struct Mesh {
    /// Our site id.
    site: String,
    /// The clusterset's VIP range.
    range: VipRange,
    inner: Mutex<Inner>,
    /// The current view, for listeners, DNS and the admin API.
    view: watch::Sender<Arc<View>>,
    /// Destination site → connection to the next hop: read on every flow and datagram.
    routes: RwLock<HashMap<String, quinn::Connection>>,
    metrics: Arc<Metrics>,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Mesh {
    pub fn new(site: &str, range: VipRange, block: u32, metrics: Arc<Metrics>) -> Arc<Mesh> {
        let mesh = Arc::new(Mesh {
            site: site.to_string(),
            range,
            inner: Mutex::new(Inner {
                lsdb: Lsdb::default(),
                seq: 0,
                allocator: VipAllocator::new(range, block),
                services: Vec::new(),
                links: BTreeMap::new(),
            }),
            view: watch::channel(Arc::new(View::default())).0,
            routes: RwLock::new(HashMap::new()),
            metrics,
        });
        {
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

    /// Replaces our exports (from causeway.yaml) and advertises them at once.
    pub fn set_exports(&self, exports: &[Export], default_namespace: &str) -> Result<(), VipError> {
        let mut inner = self.lock();
        let keys: Vec<_> = exports
            .iter()
            .flat_map(|e| {
                let ns = e.namespace.clone().unwrap_or_else(|| default_namespace.to_string());
                e.endpoints
                    .iter()
                    .map(move |ep| (e.service.clone(), ns.clone(), ep.hostname.clone()))
            })
            .collect();
        let vips = inner.allocator.assign(&keys)?;
        let services: Vec<ServiceAd> = exports
            .iter()
            .map(|e| {
                let ns = e.namespace.clone().unwrap_or_else(|| default_namespace.to_string());
                ServiceAd {
                    service: e.service.clone(),
                    namespace: ns.clone(),
                    ports: e.ports.clone(),
                    endpoints: e
                        .endpoints
                        .iter()
                        .map(|ep| EndpointAd {
                            hostname: ep.hostname.clone(),
                            ip: ep.ip,
                            ready: ep.ready,
                            vip: vips.get(&(e.service.clone(), ns.clone(), ep.hostname.clone())).copied(),
                        })
                        .collect(),
                }
            })
            .collect();
        if services != inner.services {
            inner.services = services;
            info!(services = inner.services.len(), "exports changed; advertising");
            self.originate(&mut inner);
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
        for advert in inner.lsdb.all() {
            let _ = control.send(Control::Advert(Box::new(advert.clone())));
        }
        inner.links.insert(
            name.to_string(),
            UpLink {
                peer_site: peer_site.to_string(),
                cost,
                conn,
                control,
            },
        );
        self.originate(&mut inner);
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
            self.originate(&mut inner);
        }
    }

    /// An advert arrived on link `from`.
    pub fn on_advert(&self, from: &str, advert: Advert) {
        let mut inner = self.lock();
        if advert.origin == self.site {
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
            if name != from {
                let _ = link.control.send(Control::Advert(advert.clone()));
            }
        }
        self.recompute(&inner);
    }

    /// Builds, stores and floods our own advertisement, then recomputes.
    fn originate(&self, inner: &mut Inner) {
        inner.seq = now_millis().max(inner.seq + 1);
        let mut links: BTreeMap<String, u32> = BTreeMap::new();
        for l in inner.links.values() {
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
        self.recompute(inner);
    }

    fn recompute(&self, inner: &Inner) {
        let view = View::compute(&self.site, &inner.lsdb, &self.range);
        let mut routes = HashMap::new();
        for (site, route) in &view.routes {
            let best = inner
                .links
                .values()
                .filter(|l| l.peer_site == route.next_hop)
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
