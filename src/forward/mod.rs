//! The data plane: VIP listeners, and flows carried through the links.
//!
//! For every ready endpoint in the view with a VIP, the agent listens on `VIP:port` for each
//! exported port (TCP listener or UDP socket), in its own site too, where the listener
//! forwards to the local endpoint; a sidecar serves its own pod's VIPs too (docs/REFERENCE.md "Names": every
//! address handed out is one the asker can use and hand on), delivering to the member. In
//! `vips.mode: intercept` there are no such listeners: one agent port takes what an
//! nftables rule redirects to it, and each flow's original destination stands in for the
//! listener's address ([`crate::intercept`]). A TCP connection becomes one QUIC bidirectional stream
//! (see [`tcp`]); UDP datagrams travel as QUIC datagrams tagged with a flow id (see [`udp`]).
//! Flows are routed hop by hop to the site that owns the endpoint ([`Mesh::next_hop`]); the
//! terminating agent accepts only VIPs of its own exports. Listeners follow the view: an
//! endpoint withdrawn anywhere loses its listeners here at once (flows already open go on
//! until they end). Concurrent TCP flows are bounded by `limits.max_flows`, and so are UDP
//! flows, with a per-client share and eviction of the least recently used ([`flowbook`]),
//! kept in the sans-IO tables of [`udpflows`].

mod final_ack;
pub mod flowbook;
pub mod header;
pub mod priority;
pub mod resume;
mod session;
pub mod tcp;
pub mod udp;
pub mod udpflows;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::catalog::{View, VipTarget};
use crate::link::lanes::{Arrived, LaneChoice};
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::names::Protocol;
use crate::role::Role;

/// QUIC stream error codes of flows, carried on reset/stop so each side learns why.
pub mod codes {
    /// The far endpoint refused the connection (or the flow's endpoint is not exported).
    pub const REFUSED: u32 = 1;
    /// No route to the owning site, or the endpoint did not answer.
    pub const UNREACHABLE: u32 = 2;
    /// One side reset the connection.
    pub const RESET: u32 = 3;
    /// The agent is at its flow limit.
    pub const LIMIT: u32 = 4;
    /// The flow header was malformed or its TTL ran out (also what an agent that cannot
    /// resume flows answers a resumable flow's header with).
    pub const BAD_HEADER: u32 = 5;
    /// A resumable flow is over for good: its other end's TCP connection failed, or the end
    /// does not know the flow a stream tried to resume. Not to be resumed.
    pub const GONE: u32 = 6;
}

/// Makes sure the addresses of `cidr` are local here, so VIP listeners can bind them. Inside
/// 127.0.0.0/8 they always are. Any other range needs a `local` route to `lo`; the agent adds
/// it (`ip route replace local <cidr> dev lo`, which needs NET_ADMIN and iproute2) and fails
/// with a clear error when it cannot.
pub fn ensure_local_vips(cidr: ipnet::IpNet) -> Result<(), String> {
    let loopback: ipnet::IpNet = "127.0.0.0/8".parse().map_err(|_| "127.0.0.0/8".to_string())?;
    if loopback.contains(&cidr) {
        return Ok(());
    }
    let probe = match cidr.hosts().next() {
        Some(ip) => SocketAddr::new(ip, 0),
        None => return Err(format!("vips.cidr {cidr} has no usable address")),
    };
    let bindable = || std::net::UdpSocket::bind(probe).is_ok();
    if bindable() {
        return Ok(());
    }
    let family = if cidr.addr().is_ipv4() { "-4" } else { "-6" };
    let cidr_text = cidr.to_string();
    let args = [family, "route", "replace", "local", cidr_text.as_str(), "dev", "lo"];
    let outcome = match std::process::Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Some(format!("cannot run `ip`: {e}")),
    };
    match outcome {
        None if bindable() => {
            info!(%cidr, "added a local route for the VIP range");
            Ok(())
        }
        reason => Err(format!(
            "vips.cidr {cidr} is outside 127.0.0.0/8 and its addresses are not local here; adding \
             `ip route replace local {cidr} dev lo` failed ({}). Give the agent NET_ADMIN (and iproute2), \
             add that route yourself, or use a range inside 127.0.0.0/8",
            reason.unwrap_or_else(|| "the addresses are still not bindable".into())
        )),
    }
}

/// A listener's identity: address, port, protocol.
pub type ListenerKey = (IpAddr, u16, Protocol);

/// Where a flow goes next.
enum Hop {
    /// To the endpoint, from here.
    Local,
    /// Over this connection: a link towards the owning site, or the sidecar that delivers it.
    Conn(quinn::Connection),
    /// Nowhere: the owning site is not reachable.
    Unreachable,
}

/// Options of the data plane.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Most concurrent TCP flows (and UDP flows) this agent carries.
    pub max_flows: usize,
    /// Idle UDP flows are forgotten after this long.
    pub udp_idle: Duration,
    /// Whether to listen on the VIPs of our own endpoints too. Always true in production;
    /// `causeway demo` turns it off because its two sites share one host's loopback.
    pub bind_own: bool,
    /// How long a resumable TCP flow whose path failed may take to move (`links.idle_timeout`):
    /// the origin retries reopening it that long, the terminus holds it detached that long.
    pub resume_window: Duration,
    /// Whether TCP flows started here are resumable (`links.resume`).
    pub resume: bool,
}

/// How often an intercepting agent checks that its nftables rule is still in place.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// `vips.mode: intercept`: the sockets the redirected traffic arrives at (see
/// [`crate::intercept`]), set up by [`Intercepting::setup`].
pub struct Intercepting {
    /// The range the nftables rule redirects.
    cidr: ipnet::Ipv4Net,
    /// The intercept port.
    port: u16,
    /// Redirected TCP connections; taken by the accept task.
    tcp: Mutex<Option<tokio::net::TcpListener>>,
    /// The transparent UDP socket and the raw socket answers leave by, when the agent may
    /// have them (`CAP_NET_RAW`); otherwise UDP keeps per-VIP listeners.
    udp: Option<(Arc<tokio::net::UdpSocket>, Arc<crate::intercept::RawUdp>)>,
    /// Whether the TCP rule was seen to redirect to us (probed at start and by `status`).
    active: std::sync::atomic::AtomicBool,
}

impl Intercepting {
    /// Binds the intercept port for `cidr` and checks that the nftables rule sends traffic
    /// there. Without the rule, installs it when this process may (root on a plain Linux
    /// host), else warns how to: the agent runs anyway and says so in `status`.
    ///
    /// Errors: `cidr` not IPv4, or the port taken.
    pub async fn setup(cidr: ipnet::IpNet, port: u16) -> Result<Intercepting, crate::intercept::InterceptError> {
        use crate::intercept;
        let cidr = intercept::ipv4_range(cidr)?;
        let tcp = intercept::tcp_listener(port)?;
        let udp = match (intercept::udp_socket(port), intercept::RawUdp::new()) {
            (Ok(socket), Ok(raw)) => Some((Arc::new(socket), Arc::new(raw))),
            (Err(e), _) | (_, Err(e)) => {
                warn!(
                    error = %e,
                    "UDP to VIPs is not intercepted (needs CAP_NET_RAW, in the default set of Docker and containerd); \
                     keeping one UDP listener per VIP and port instead, as in listen mode"
                );
                None
            }
        };
        let me = Intercepting {
            cidr,
            port,
            tcp: Mutex::new(Some(tcp)),
            udp,
            active: std::sync::atomic::AtomicBool::new(false),
        };
        if !me.probe().await {
            me.repair().await;
        }
        if me.active() {
            info!(%cidr, port, udp = me.udp.is_some(), "intercepting VIP traffic");
        }
        Ok(me)
    }

    /// The rule is not (or no longer) in place: installs it when this process may (root on
    /// a plain Linux host), else says what to run. Until it is back, connections to VIPs
    /// are refused, or reach a local program bound to a wildcard address on their port.
    async fn repair(&self) {
        use crate::intercept;
        let (cidr, port) = (self.cidr, self.port);
        // `nft` is a child process: waited for off the runtime's threads.
        let installed = tokio::task::spawn_blocking(move || intercept::install(ipnet::IpNet::V4(cidr), port))
            .await
            .unwrap_or_else(|e| Err(intercept::InterceptError::Nft { stderr: e.to_string() }));
        match installed {
            Ok(()) if self.probe().await => {
                info!(table = intercept::TABLE, %cidr, port, "installed the nftables rule redirecting VIP traffic")
            }
            Ok(()) => warn!(%cidr, port, "installed the nftables rule, but VIP traffic still does not arrive"),
            Err(e) => warn!(
                error = %e,
                %cidr,
                port,
                "VIP traffic is not redirected to this agent (connections to VIPs are refused, or reach a local \
                 program bound to 0.0.0.0 on their port): run `causeway intercept install` in this network \
                 namespace with CAP_NET_ADMIN (in Kubernetes, the sidecar's initContainer)"
            ),
        }
    }

    /// Watches the rule while the agent runs: every [`WATCH_EVERY`] a probe; when the rule
    /// disappears (someone ran `intercept remove`, flushed nftables, or a restart of the
    /// network namespace's firewall dropped it), says so and repairs it where it may.
    async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = stop.cancelled() => return,
            }
            let was = self.active();
            match (was, self.probe().await) {
                (true, false) => {
                    warn!(
                        table = crate::intercept::TABLE,
                        "the nftables rule redirecting VIP traffic is gone"
                    );
                    self.repair().await;
                }
                (false, true) => {
                    info!(cidr = %self.cidr, port = self.port, "VIP traffic is redirected to this agent again")
                }
                _ => {}
            }
        }
    }

    /// Probes whether TCP to the range arrives here, and remembers the answer.
    pub async fn probe(&self) -> bool {
        let ok = crate::intercept::probe(self.cidr).await;
        self.active.store(ok, std::sync::atomic::Ordering::Relaxed);
        ok
    }

    /// Whether the rule was last seen in place.
    pub fn active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What `status` shows.
    pub fn status(&self) -> InterceptStatus {
        InterceptStatus {
            port: self.port,
            redirected: self.active(),
            udp: if self.udp.is_some() {
                UdpInterception::Tproxy
            } else {
                UdpInterception::Listeners
            },
        }
    }
}

/// `vips.intercept` in `causeway status -o json`: how VIP traffic reaches an agent in
/// `vips.mode: intercept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InterceptStatus {
    /// The intercept port the nftables rule redirects to.
    pub port: u16,
    /// Whether TCP to the VIP range was last seen arriving here (probed by each `status`).
    pub redirected: bool,
    /// How UDP to VIPs arrives.
    pub udp: UdpInterception,
}

/// How UDP to VIPs reaches an intercepting agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UdpInterception {
    /// Through the intercept port (the nftables `tproxy` rule; needs `CAP_NET_RAW`).
    Tproxy,
    /// Through one listener per VIP and port, as in listen mode.
    Listeners,
}

/// The data plane of one agent.
pub struct Forwarder {
    site: String,
    mesh: Arc<Mesh>,
    metrics: Arc<Metrics>,
    opts: ForwardOptions,
    /// Permits for concurrent TCP flows.
    flow_permits: Arc<Semaphore>,
    /// UDP flow tables.
    udp: udp::Tables,
    /// Running listeners and how to stop each.
    listeners: Mutex<HashMap<ListenerKey, CancellationToken>>,
    /// Listeners that could not be bound, with the error (shown in `status`).
    bind_errors: Mutex<BTreeMap<String, String>>,
    /// On a sidecar: the VIPs of our own pod's endpoints, with their service and namespace.
    own: Mutex<HashMap<IpAddr, (String, String)>>,
    /// UDP listener sockets by address: a sidecar delivering a datagram from a client's
    /// VIP and port sends it from the listener bound there, if there is one.
    udp_sockets: Mutex<HashMap<SocketAddr, Arc<tokio::net::UdpSocket>>>,
    /// The newest view whose listeners have all been started (or failed to start, see
    /// `bind_errors`). DNS answers and `service list` come from it rather than from the mesh,
    /// so that a name never resolves to a VIP that nobody listens on yet: binding thousands
    /// of listeners when a large site links takes a noticeable fraction of a second.
    served: watch::Sender<Arc<View>>,
    /// `vips.mode: intercept`: the agent port and how it is reached; `None` in listen mode.
    intercept: Option<Arc<Intercepting>>,
    /// Resumable TCP flows ending here, by token: where a stream that resumes one is handed,
    /// and the VIP and port it was opened for (a resume must name the same).
    resumes: Mutex<HashMap<resume::Token, session::Resumable>>,
    /// Sites whose terminus answered (`true`) or refused (`false`) a resumable flow, and when:
    /// flows to a site not known to resume wait for the first answer before sending.
    resume_peers: Mutex<HashMap<String, (bool, std::time::Instant)>>,
    /// Final acks of resumable flows waiting for the next tick, to share packets.
    final_acks: final_ack::FinalAcks,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Forwarder {
    pub fn start(
        mesh: Arc<Mesh>,
        metrics: Arc<Metrics>,
        opts: ForwardOptions,
        intercept: Option<Intercepting>,
        shutdown: CancellationToken,
    ) -> Arc<Forwarder> {
        let resume_window = opts.resume_window;
        let fwd = Arc::new(Forwarder {
            site: mesh.site().to_string(),
            flow_permits: Arc::new(Semaphore::new(opts.max_flows)),
            udp: udp::tables(opts.max_flows, opts.udp_idle, metrics.clone()),
            mesh,
            metrics,
            opts,
            listeners: Mutex::new(HashMap::new()),
            bind_errors: Mutex::new(BTreeMap::new()),
            own: Mutex::new(HashMap::new()),
            udp_sockets: Mutex::new(HashMap::new()),
            served: watch::channel(Arc::new(View::default())).0,
            intercept: intercept.map(Arc::new),
            resumes: Mutex::new(HashMap::new()),
            resume_peers: Mutex::new(HashMap::new()),
            final_acks: final_ack::FinalAcks::new(resume_window),
            shutdown,
            tasks: TaskTracker::new(),
        });
        if let Some(i) = &fwd.intercept {
            if let Some(listener) = lock(&i.tcp).take() {
                fwd.tasks.spawn(fwd.clone().intercepted_tcp(listener));
            }
            if let Some((socket, raw)) = &i.udp {
                fwd.tasks
                    .spawn(fwd.clone().intercepted_udp(socket.clone(), raw.clone()));
            }
            fwd.tasks.spawn(i.clone().watch(fwd.shutdown.clone()));
        } else {
            // Listen mode: a table left from intercept mode would send every VIP connection
            // to a port nobody listens on. Remove it where we may, else say what to run.
            fwd.tasks.spawn(async {
                match tokio::task::spawn_blocking(crate::intercept::remove_leftover).await {
                    Ok(Ok(true)) => warn!(
                        table = crate::intercept::TABLE,
                        "removed a leftover nftables table from vips.mode intercept: in listen mode it would send \
                         every connection to a VIP to a port nobody listens on"
                    ),
                    Ok(Err(e)) => warn!(
                        error = %e,
                        "an nftables table from vips.mode intercept is left in this network namespace and sends every \
                         connection to a VIP to a port nobody listens on in listen mode: run `causeway intercept remove`"
                    ),
                    _ => {}
                }
            });
        }
        fwd.tasks.spawn(fwd.clone().follow_view());
        fwd.tasks.spawn(fwd.clone().sweep_udp());
        let f = fwd.clone();
        fwd.tasks
            .spawn(async move { f.final_acks.run(f.shutdown.clone()).await });
        fwd
    }

    /// `vips.mode: intercept`: how it stands, for `status` (`None` in listen mode). Probes
    /// the rule anew.
    pub async fn intercept_status(&self) -> Option<InterceptStatus> {
        let i = self.intercept.as_ref()?;
        i.probe().await;
        Some(i.status())
    }

    /// Whether flows of `proto` to VIPs arrive through the intercept port rather than
    /// per-VIP listeners.
    fn intercepted(&self, proto: Protocol) -> bool {
        self.intercept.as_ref().is_some_and(|i| match proto {
            Protocol::Tcp => true,
            Protocol::Udp => i.udp.is_some(),
        })
    }

    /// Whether `addr` is where the agent probes its own nftables rule.
    fn is_probe(&self, addr: &SocketAddr) -> bool {
        self.intercept
            .as_ref()
            .is_some_and(|i| *addr == crate::intercept::probe_addr(i.cidr))
    }

    /// Whether `addr` is a VIP of the range this agent intercepts.
    fn in_range(&self, addr: &SocketAddr) -> bool {
        match (&self.intercept, addr) {
            (Some(i), SocketAddr::V4(a)) => i.cidr.contains(a.ip()),
            _ => false,
        }
    }

    /// Where a flow for `target`, reached at `vip`, goes from here; `lane` says which lane it
    /// takes on a link ([`crate::link::lanes`]).
    fn hop(&self, vip: &IpAddr, target: &VipTarget, lane: LaneChoice) -> Hop {
        let own_site = target.site == self.site;
        match self.mesh.role() {
            // A sidecar delivers its own pod's endpoints; everything else, its own site's
            // other pods included, leaves through its gateway (the route to every site).
            Role::Sidecar if own_site && self.own_vip(vip).is_some() => return Hop::Local,
            Role::Sidecar => {}
            // A gateway delivers its site's endpoints, through the sidecar of a member that
            // has one.
            Role::Gateway if own_site => {
                return match self.mesh.member_for(vip) {
                    Some(conn) => Hop::Conn(conn),
                    None => Hop::Local,
                };
            }
            Role::Gateway => {}
        }
        match self.mesh.next_hop(&target.site, lane) {
            Some(conn) => Hop::Conn(conn),
            None => Hop::Unreachable,
        }
    }

    /// Whether this agent itself takes a flow for `vip`, one of its own site's VIPs, at the
    /// end of the path: a gateway takes every one (and delivers it directly or through the
    /// member's sidecar), a sidecar only its own pod's.
    fn delivers(&self, vip: &IpAddr) -> bool {
        match self.mesh.role() {
            Role::Gateway => true,
            Role::Sidecar => self.own_vip(vip).is_some(),
        }
    }

    /// On a sidecar: whether `vip` belongs to our own pod (and to which service).
    fn own_vip(&self, vip: &IpAddr) -> Option<(String, String)> {
        lock(&self.own).get(vip).cloned()
    }

    /// On a sidecar: the client's own VIP for a flow to `target` (its pod's endpoint in the
    /// same service, else any of its pod's endpoints), so the far sidecar can connect from it.
    fn src_vip(&self, target: &VipTarget) -> Option<IpAddr> {
        if self.mesh.role() == Role::Gateway {
            return None;
        }
        let own = lock(&self.own);
        own.iter()
            .find(|(_, (svc, ns))| *svc == target.service && *ns == target.namespace)
            .or_else(|| own.iter().min_by_key(|(vip, _)| **vip))
            .map(|(vip, _)| *vip)
    }

    /// Listener bind failures, for `status`.
    pub fn bind_errors(&self) -> BTreeMap<String, String> {
        lock(&self.bind_errors).clone()
    }

    /// Views as they become served: each one after its listeners are in place.
    pub fn served_views(&self) -> watch::Receiver<Arc<View>> {
        self.served.subscribe()
    }

    /// The newest served view (see [`Forwarder::served_views`]).
    pub fn served_view(&self) -> Arc<View> {
        self.served.borrow().clone()
    }

    /// Number of running listeners.
    pub fn listener_count(&self) -> usize {
        lock(&self.listeners).len()
    }

    async fn follow_view(self: Arc<Self>) {
        let mut rx = self.mesh.subscribe();
        loop {
            let view = rx.borrow_and_update().clone();
            self.reconcile(&view);
            self.served.send_replace(view);
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = self.shutdown.cancelled() => break,
            }
        }
        for (_, token) in lock(&self.listeners).drain() {
            token.cancel();
        }
    }

    /// Starts listeners the view wants and stops the ones it no longer does.
    fn reconcile(self: &Arc<Self>, view: &View) {
        if self.mesh.role() == Role::Sidecar {
            // Our pod's own endpoints, which this sidecar delivers itself.
            let mine: Vec<(String, String, String)> = self
                .mesh
                .config_exports()
                .into_iter()
                .flat_map(|s| {
                    s.endpoints
                        .into_iter()
                        .map(move |e| (s.service.clone(), s.namespace.clone(), e.hostname))
                })
                .collect();
            let own: HashMap<IpAddr, (String, String)> = view
                .vips
                .iter()
                .filter(|(_, t)| {
                    t.site == self.site
                        && mine
                            .iter()
                            .any(|m| m.0 == t.service && m.1 == t.namespace && m.2 == t.hostname)
                })
                .map(|(vip, t)| (*vip, (t.service.clone(), t.namespace.clone())))
                .collect();
            *lock(&self.own) = own;
        }
        let mut wanted: HashSet<ListenerKey> = HashSet::new();
        for (vip, target) in &view.vips {
            if !target.ready || (!self.opts.bind_own && target.site == self.site) {
                continue;
            }
            for p in target.ports.iter().filter(|p| !self.intercepted(p.protocol)) {
                wanted.insert((*vip, p.port, p.protocol));
            }
        }
        let mut listeners = lock(&self.listeners);
        // Whether any listener stopped or started: only then is the reconcile worth a line.
        let mut changed = false;
        listeners.retain(|key, token| {
            let keep = wanted.contains(key);
            if !keep {
                changed = true;
                debug!(vip = %key.0, port = key.1, proto = %key.2, "listener stopped");
                token.cancel();
                if key.2 == Protocol::Udp {
                    lock(&self.udp_sockets).remove(&SocketAddr::new(key.0, key.1));
                }
            }
            keep
        });
        let mut errors = lock(&self.bind_errors);
        errors.retain(|k, _| wanted.iter().any(|w| listener_name(w) == *k));
        for key in wanted {
            if listeners.contains_key(&key) {
                continue;
            }
            let addr = SocketAddr::new(key.0, key.1);
            let token = self.shutdown.child_token();
            let result = match key.2 {
                Protocol::Tcp => tcp::bind(addr).map(|l| {
                    self.tasks.spawn(self.clone().tcp_listener(l, key, token.clone()));
                }),
                Protocol::Udp => udp::bind(addr).map(|s| {
                    lock(&self.udp_sockets).insert(addr, s.clone());
                    self.tasks.spawn(self.clone().udp_listener(s, key, token.clone()));
                }),
            };
            match result {
                Ok(()) => {
                    changed = true;
                    debug!(%addr, proto = %key.2, "listener started");
                    errors.remove(&listener_name(&key));
                    listeners.insert(key, token);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && self.own_vip(&key.0).is_some() => {
                    // Our own pod's member bound its VIP itself (listen mode lets it): it
                    // serves that address directly, which is all a listener would do.
                    errors.remove(&listener_name(&key));
                    debug!(%addr, proto = %key.2, "own VIP held by the member itself");
                }
                Err(e) => {
                    let hint = if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                        " (the VIP range is not local here: keep vips.cidr inside 127.0.0.0/8, or make it local with \
                         `ip route add local <cidr> dev lo`)"
                    } else if e.kind() == std::io::ErrorKind::AddrInUse {
                        " (a program here binds this port on a wildcard address such as 0.0.0.0, or on this VIP: \
                         local clients of this VIP reach that program instead; bind it to its own address, or set \
                         vips.mode: intercept)"
                    } else if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) {
                        " (out of open files: raise the hard open-files limit, e.g. `ulimit -Hn`, LimitNOFILE= or the \
                         container runtime's nofile, or lower limits.max_flows)"
                    } else {
                        ""
                    };
                    let name = listener_name(&key);
                    if errors.insert(name.clone(), format!("{e}{hint}")).is_none() {
                        warn!(listener = %name, error = %e, "cannot listen on VIP{hint}");
                    }
                }
            }
        }
        self.metrics.set_listener_errors(errors.len());
        if changed {
            info!(listeners = listeners.len(), "VIP listeners reconciled");
        }
    }

    /// Takes a flow's stream that arrived on a link (relays or delivers it), on a lane of the
    /// kind `arrived` (a relay keeps it on that kind onward: [`crate::link::lanes`]).
    pub fn accept_stream(self: &Arc<Self>, send: quinn::SendStream, recv: quinn::RecvStream, arrived: Arrived) {
        self.tasks.spawn(self.clone().serve_stream(send, recv, arrived));
    }

    /// Takes an oversized datagram carried on a unidirectional stream.
    pub fn accept_uni(self: &Arc<Self>, from: quinn::Connection, mut recv: quinn::RecvStream) {
        let me = self.clone();
        self.tasks.spawn(async move {
            match recv.read_to_end(udp::MAX_STREAMED).await {
                Ok(data) => me.on_link_datagram(&from, &data),
                Err(e) => debug!(error = %e, "streamed datagram dropped"),
            }
        });
    }

    /// Waits (bounded) for listener and flow tasks after shutdown was cancelled.
    pub async fn shutdown(&self) {
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

fn listener_name(key: &ListenerKey) -> String {
    format!("{}/{}", SocketAddr::new(key.0, key.1), key.2)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::vips::VipRange;

    // Two workers: the test reads the served view while the forwarder's task may still be
    // binding, as DNS does from its own threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_view_is_served_only_once_its_listeners_listen() {
        let mut yaml = "site: london\nexports:\n  - service: grid\n    ports: [{name: member, port: 7001}, \
                        {name: gossip, port: 7002, protocol: UDP}]\n    endpoints:\n"
            .to_string();
        for i in 0..300 {
            yaml.push_str(&format!(
                "      - {{hostname: m-{i}, ip: 10.1.{}.{}}}\n",
                i / 250,
                i % 250 + 1
            ));
        }
        let config = Config::parse(&yaml, "test").unwrap();
        let range = VipRange::new("127.88.0.0/15".parse().unwrap()).unwrap();
        let metrics = Metrics::new();
        let vips = crate::mesh::VipStore {
            allocator: crate::vips::VipAllocator::new(range, 7, Duration::from_secs(35)),
            table: Default::default(),
            file: None,
        };
        let mesh = Mesh::new("london", vips, Role::Gateway, metrics.clone());
        let opts = ForwardOptions {
            max_flows: 16,
            udp_idle: Duration::from_secs(60),
            bind_own: true,
            resume_window: Duration::from_secs(30),
            resume: true,
        };
        let shutdown = CancellationToken::new();
        let fwd = Forwarder::start(mesh.clone(), metrics, opts, None, shutdown.clone());
        let mut served = fwd.served_views();
        mesh.set_exports(&config.exports, "default").unwrap();
        let view = loop {
            served.changed().await.unwrap();
            let view = served.borrow_and_update().clone();
            if view.vips.len() == 300 {
                break view;
            }
        };
        // The moment the view is served, every VIP in it takes connections and datagrams.
        // (A connection may be reset as soon as it is accepted, since the endpoints here do
        // not exist; only a refusal means that nothing listens.)
        for vip in view.vips.keys() {
            let tcp = tokio::net::TcpStream::connect((*vip, 7001)).await;
            let refused = tcp
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            assert!(!refused, "{vip}:7001 not listening: {tcp:?}");
            let udp = std::net::UdpSocket::bind((*vip, 7002));
            assert!(udp.is_err(), "{vip}:7002/udp is free, so nothing listens there");
        }
        assert_eq!(fwd.listener_count(), 600);
        shutdown.cancel();
        fwd.shutdown().await;
    }
}
