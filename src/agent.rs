//! The running agent (`causeway run`): one QUIC endpoint, the links, the grants and the
//! admin API, started together and stopped together. This module wires the parts; admin
//! requests are answered by [`crate::admin::handler`].
//!
//! Incoming QUIC connections are dispatched by ALPN: link connections to [`Links::accept`],
//! redeem connections to [`Issuer::serve`]. Which attempts get a handshake at all is decided
//! by [`Admission`] (stateless Retry for unvalidated sources, per-source and total limits).
//! Shutdown is explicit, as in mini-redis: one [`CancellationToken`] is cancelled, every
//! connection is closed with a reason the peer logs, and the agent waits (bounded) for its
//! tasks to finish before the endpoint is dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::{self, api::ReloadStatus, handler::AgentHandler};
use crate::config::Config;
use crate::forward::{ForwardOptions, Forwarder};
use crate::handshake::{Admission, Decision, Limits, Throttle};
use crate::identity::{self, PeerTrust, SiteIdentity};
use crate::link::lanes::Arrived;
use crate::link::redeem::Issuer;
use crate::link::{Established, LinkHandler, Links, describe_connection_error};
use crate::mesh::{Mesh, VipStore};
use crate::metrics::{HandshakeOutcome, Metrics};
use crate::protocol::{self, ALPN_LANE, ALPN_LINK, ALPN_REDEEM, Control, close};
use crate::quic;
use crate::readiness::Readiness;
use crate::role::{Peer, Role};
use crate::state::StateDir;
use crate::token::GrantStore;
use crate::vips::{VipAllocator, VipRange, VipTable};

/// Handshakes (and redemptions) in flight, per source and in all; attempts over either are
/// refused at once (see [`crate::handshake`]).
const HANDSHAKE_LIMITS: Limits = Limits {
    per_source: 4,
    total: 256,
};
/// How long an admitted handshake may take: as long as a dialer waits for one (the link
/// dial timeout), so a silent client holds its slot no longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two warnings of a kind a flood repeats (the others are counted).
const QUIET_WARNINGS: Duration = Duration::from_secs(10);

/// How long a freed VIP is kept from other endpoints: a client may hold it from a DNS answer
/// for `dns.ttl`, and a flow through it may live on until its link's idle timeout, so no
/// client still using the address can silently reach another endpoint.
fn vip_quarantine(config: &Config) -> Duration {
    Duration::from_secs(u64::from(config.dns.ttl)) + config.links.idle_timeout
}

/// How an agent is started beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The configuration file to watch for changes to `exports` (none: no hot reload).
    pub config_path: Option<std::path::PathBuf>,
    /// Do not listen on our own endpoints' VIPs (`causeway demo`, whose sites share a host).
    pub skip_own_vips: bool,
}

/// A running agent.
pub struct Agent {
    /// The configuration it was started with.
    pub config: Config,
    /// Its state directory.
    pub state: StateDir,
    /// Where its admin socket is bound ([`StateDir::bind_admin_socket`]).
    pub admin_socket: std::path::PathBuf,
    /// Our certificates.
    identity: Arc<SiteIdentity>,
    /// The one QUIC endpoint (links and redemptions, in and out).
    endpoint: quinn::Endpoint,
    /// The address the endpoint is bound to (the port may have been chosen by the OS).
    pub local_addr: SocketAddr,
    /// Links to other sites.
    links: Arc<Links>,
    /// The issuer side of redemption.
    issuer: Arc<Issuer>,
    /// Cancelled to stop everything.
    shutdown: CancellationToken,
    /// Tasks that are not per-link (accept loop, admin API, handshakes).
    tasks: TaskTracker,
    /// The live catalog and routes.
    mesh: Arc<Mesh>,
    /// The data plane.
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    /// The `clusterset.local` DNS responder.
    dns: Arc<crate::dns::Responder>,
    /// What answers the admin API ([`crate::admin::handler`]).
    admin: Arc<AgentHandler>,
}

impl Agent {
    /// Starts an agent on `state` with `config`: binds the QUIC port and the admin socket
    /// and re-establishes every recorded link.
    pub async fn start(state: StateDir, config: Config, opts: StartOptions) -> anyhow::Result<Arc<Agent>> {
        // A second agent on one state directory would fight the first over its links and
        // files; say so, rather than fail later on a port that happens to be taken.
        if let Ok(socket) = state.admin_socket()
            && std::os::unix::net::UnixStream::connect(&socket).is_ok()
        {
            anyhow::bail!(
                "an agent is already running for {} (its admin socket {} answers); stop it first, \
                 or give this one another --state",
                state.root.display(),
                socket.display()
            );
        }
        let open_files = match crate::rlimit::raise_open_files() {
            Ok(limit) => {
                if let Some(from) = limit.raised_from {
                    info!(from, to = limit.soft, "open-files limit raised to the hard limit");
                }
                if let Some(short) = limit.shortfall(config.limits.max_flows, 0) {
                    warn!(
                        limit = limit.soft,
                        max_flows = config.limits.max_flows,
                        short,
                        "the open-files limit is too low for limits.max_flows (2 per flow, 1 per VIP listener): raise \
                         the hard limit (ulimit -Hn, LimitNOFILE=, the container runtime's nofile) or lower limits.max_flows"
                    );
                }
                Some(limit)
            }
            Err(e) => {
                warn!(error = %e, "could not raise the open-files limit");
                None
            }
        };
        let identity = Arc::new(identity::load(&state).with_context(|| {
            format!(
                "loading the site identity from {} (run `causeway init` first?)",
                state.root.display()
            )
        })?);
        if identity.site != config.site {
            anyhow::bail!(
                "causeway.yaml names site {:?} but the state dir {} holds site {:?}",
                config.site,
                state.root.display(),
                identity.site
            );
        }
        let role = Role::of_config(&config);
        match (role, identity.role) {
            (Role::Sidecar, Role::Gateway) => anyhow::bail!(
                "causeway.yaml sets `gateway:`, so this agent is a sidecar, but {} holds a gateway's credentials; \
                 give the sidecar the output of `causeway sidecar credentials` run on the gateway",
                state.root.display()
            ),
            (Role::Gateway, Role::Sidecar) => anyhow::bail!(
                "{} holds sidecar (member) credentials, which need `gateway: <host:port>` in causeway.yaml",
                state.root.display()
            ),
            _ => {}
        }
        let trust = PeerTrust::new();
        let timing = quic::LinkTiming::from(&config.links);
        let endpoint = if role == Role::Sidecar {
            // A sidecar only dials its gateway: it exposes no port.
            let any: std::net::SocketAddr = if config.listen.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .context("client address")?;
            quic::endpoint(any, None, identity.stateless_reset_key()).context("opening the sidecar's QUIC socket")?
        } else {
            let server = quic::server_config(&identity, trust.clone(), &[ALPN_LINK, ALPN_LANE, ALPN_REDEEM], &timing)?;
            quic::endpoint(config.listen, Some(server), identity.stateless_reset_key())
                .with_context(|| format!("binding the QUIC link port {} (listen)", config.listen))?
        };
        let local_addr = endpoint.local_addr().context("reading the bound QUIC address")?;
        let shutdown = CancellationToken::new();
        let vips_cidr = config.vips.cidr.to_string();
        // The DNS responder's counters, which the registry reads at scrape time.
        let dns_stats = Arc::new(crate::dns::Stats::default());
        let metrics = Metrics::with_collectors(vec![Box::new(dns_stats.clone())]);
        if let Some(limit) = open_files {
            metrics.set_open_files_limit(limit.soft);
        }
        let range = VipRange::new(config.vips.cidr).context("vips.cidr")?;
        crate::forward::ensure_local_vips(config.vips.cidr).map_err(anyhow::Error::msg)?;
        let block = config
            .vips
            .block
            .unwrap_or_else(|| VipRange::block_of_site(&config.site));
        let allocator = VipAllocator::new(range, block, vip_quarantine(&config));
        // A sidecar assigns no VIPs (its gateway does) and may run on a read-only state.
        let vips = if role == Role::Sidecar {
            VipStore {
                allocator,
                table: VipTable::default(),
                file: None,
            }
        } else {
            VipStore {
                allocator,
                table: crate::mesh::load_vip_table(&state.vips()),
                file: Some(state.vips()),
            }
        };
        let mesh = Mesh::new(&config.site, vips, role, metrics.clone());
        mesh.set_exports(&config.exports, &config.namespace)
            .context("assigning VIPs to exports")?;
        let intercept = match config.vips.mode {
            crate::config::VipMode::Listen => None,
            crate::config::VipMode::Intercept => Some(
                crate::forward::Intercepting::setup(config.vips.cidr, config.vips.intercept_port)
                    .await
                    .with_context(|| {
                        format!(
                            "setting up vips.mode: intercept on port {} (vips.intercept_port)",
                            config.vips.intercept_port
                        )
                    })?,
            ),
        };
        let forwarder = Forwarder::start(
            mesh.clone(),
            metrics.clone(),
            ForwardOptions {
                max_flows: config.limits.max_flows,
                udp_idle: config.limits.udp_idle,
                bind_own: !opts.skip_own_vips,
                resume_window: config.links.idle_timeout,
                resume: config.links.resume,
            },
            intercept,
            shutdown.child_token(),
        );
        let handler = Arc::new(Session {
            mesh: mesh.clone(),
            forwarder: forwarder.clone(),
        });
        let links = Links::start(
            &state,
            identity.clone(),
            trust,
            endpoint.clone(),
            crate::link::LinkOptions {
                vips_cidr: vips_cidr.clone(),
                sidecar_gateway: config.gateway.clone(),
                timing,
                lanes: config.links.lanes.count(),
            },
            handler,
            shutdown.child_token(),
        )
        .context("loading links")?;
        let grants = Arc::new(GrantStore::load(state.grants()).context("loading grants")?);
        let dns = Arc::new(
            crate::dns::Responder::start(
                &config.dns,
                &config.site,
                forwarder.served_views(),
                dns_stats,
                shutdown.child_token(),
            )
            .await
            .context("starting the DNS responder")?,
        );
        let issuer = Arc::new(Issuer {
            identity: identity.clone(),
            grants: grants.clone(),
            links: links.clone(),
            vips_cidr: vips_cidr.clone(),
            warnings: crate::handshake::Throttle::new(Duration::from_secs(10)),
        });
        let socket_path = state.bind_admin_socket().context("placing the admin socket")?;
        let listener = admin::bind(&socket_path)
            .await
            .with_context(|| format!("binding the admin socket {}", socket_path.display()))?;
        let admin = Arc::new(AgentHandler {
            identity: identity.clone(),
            endpoint: endpoint.clone(),
            local_addr,
            advertise: config.advertise_addrs(local_addr),
            vips_cidr,
            state_dir: state.root.clone(),
            started: SystemTime::now(),
            open_files,
            links: links.clone(),
            grants,
            mesh: mesh.clone(),
            forwarder: forwarder.clone(),
            dns: dns.clone(),
            reload: Mutex::new(None),
        });
        let agent = Arc::new(Agent {
            config,
            state,
            admin_socket: socket_path.clone(),
            identity,
            endpoint,
            local_addr,
            links,
            issuer,
            shutdown,
            tasks: TaskTracker::new(),
            mesh,
            forwarder,
            metrics,
            dns,
            admin,
        });
        if let Some(addr) = agent.config.metrics {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "binding the metrics address {addr} (metrics; another agent on this host may have it: \
                         choose another port in `metrics:`, or remove the key)"
                )
            })?;
            info!(metrics = %listener.local_addr().unwrap_or(addr), "serving Prometheus metrics at /metrics");
            // A weak handle: the metrics task must not keep the agent alive.
            let me = Arc::downgrade(&agent);
            let ready: crate::metrics::ReadyFn = Arc::new(move || match me.upgrade() {
                Some(agent) => agent.readiness(),
                None => Readiness {
                    ready: false,
                    reason: "the agent is shutting down".into(),
                },
            });
            agent.tasks.spawn(crate::metrics::serve(
                listener,
                agent.metrics.clone(),
                ready,
                agent.shutdown.clone(),
            ));
        }
        agent.tasks.spawn(agent.clone().refresh_link_metrics());
        if let Some(path) = opts.config_path.clone() {
            agent.tasks.spawn(agent.clone().watch_config(path));
        }
        agent.tasks.spawn(agent.clone().accept_loop());
        agent.tasks.spawn(admin::serve(
            listener,
            socket_path,
            agent.admin.clone(),
            agent.shutdown.clone(),
            agent.tasks.clone(),
        ));
        info!(site = %agent.identity.site, quic = %local_addr, state = %agent.state.root.display(), "agent started");
        Ok(agent)
    }

    /// The site id.
    pub fn site(&self) -> &str {
        &self.identity.site
    }

    /// The addresses the DNS responder answers on (UDP and TCP each; port 0 resolved).
    pub fn dns_addrs(&self) -> &[SocketAddr] {
        self.dns.local_addrs()
    }

    /// Whether the agent has a catalogue to answer from ([`crate::readiness`]): `/readyz`
    /// and `causeway status`.
    pub fn readiness(&self) -> Readiness {
        self.admin.readiness()
    }

    /// Decides on every incoming connection attempt at once ([`Admission`]): a stateless
    /// Retry for unvalidated sources, a refusal over the limits, otherwise a handshake task
    /// that holds its slot until the handshake (and, for a redemption, the exchange) ends.
    /// The loop itself never waits, so a legitimate attempt is never queued behind a flood.
    async fn accept_loop(self: Arc<Self>) {
        let admission = Arc::new(Mutex::new(Admission::new(HANDSHAKE_LIMITS)));
        let refused = Throttle::new(QUIET_WARNINGS);
        let no_cert = Arc::new(Throttle::new(QUIET_WARNINGS));
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
                _ = self.shutdown.cancelled() => break,
            };
            let remote = incoming.remote_address();
            let decision = lock(&admission).decide(remote.ip(), incoming.remote_address_validated());
            self.metrics.handshake(decision.outcome());
            match decision {
                Decision::Retry => {
                    // Unvalidated implies may_retry (quinn's contract); should that ever
                    // fail, the attempt gets no answer at all rather than state.
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                        self.metrics.handshake(HandshakeOutcome::Ignored);
                    }
                    continue;
                }
                Decision::Refuse(why) => {
                    incoming.refuse();
                    if let Some(suppressed) = refused.allow(Instant::now()) {
                        warn!(
                            %remote,
                            reason = ?why,
                            suppressed,
                            per_source = HANDSHAKE_LIMITS.per_source,
                            total = HANDSHAKE_LIMITS.total,
                            "handshake refused: too many in flight (further refusals are counted in \
                             causeway_handshakes_total and logged at most every 10 s)"
                        );
                    }
                    continue;
                }
                Decision::Admit => {}
            }
            let slot = Slot {
                admission: admission.clone(),
                source: remote.ip(),
            };
            let me = self.clone();
            let no_cert = no_cert.clone();
            self.tasks.spawn(
                async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async { incoming.accept()?.await });
                    let conn = match handshake.await {
                        Ok(Ok(c)) => {
                            me.metrics.handshake(HandshakeOutcome::Completed);
                            c
                        }
                        Ok(Err(e)) => {
                            me.metrics.handshake(HandshakeOutcome::Failed);
                            debug!(error = %crate::link::describe_connection_error(&e), "handshake failed");
                            return;
                        }
                        Err(_) => {
                            me.metrics.handshake(HandshakeOutcome::TimedOut);
                            debug!("handshake timed out");
                            return;
                        }
                    };
                    match crate::link::alpn(&conn).as_deref() {
                        Some(ALPN_REDEEM) => {
                            // A redeemer is not authenticated until its request is checked, so
                            // the exchange (bounded by its own timeout) keeps the slot.
                            me.issuer.serve(conn).await;
                            drop(slot);
                        }
                        Some(ALPN_LINK | ALPN_LANE) => {
                            drop(slot);
                            if conn.peer_identity().is_none() {
                                if let Some(suppressed) = no_cert.allow(Instant::now()) {
                                    warn!(suppressed, "link attempt without a client certificate refused");
                                }
                                conn.close(close::REJECTED.into(), b"links require a client certificate");
                                return;
                            }
                            me.links.clone().accept(conn).await;
                        }
                        _ => conn.close(close::PROTOCOL.into(), b"unknown ALPN"),
                    }
                }
                .instrument(info_span!("conn", %remote)),
            );
        }
    }

    /// Stops the agent: closes links with a reason, stops the admin API and waits (bounded)
    /// for every task.
    pub async fn shutdown(&self) {
        info!("shutting down");
        self.shutdown.cancel();
        self.links.shutdown().await;
        self.forwarder.shutdown().await;
        self.dns.shutdown().await;
        self.endpoint.close(close::SHUTDOWN.into(), b"agent shutting down");
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        let _ = std::fs::remove_file(&self.admin_socket);
        info!("stopped");
    }
}

impl Agent {
    /// Keeps the per-link metrics current.
    async fn refresh_link_metrics(self: Arc<Self>) {
        let mut known: Vec<(String, String)> = Vec::new();
        loop {
            let stats = self.links.stats();
            for (name, peer) in &known {
                if !stats.iter().any(|s| &s.0 == name && &s.1 == peer) {
                    self.metrics.remove_link(name, peer);
                }
            }
            known = stats.iter().map(|s| (s.0.clone(), s.1.clone())).collect();
            for (name, peer, sample) in stats {
                self.metrics.set_link(&name, &peer, &sample);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Picks up changes to `exports` in the configuration file while running. Kubernetes
    /// updates a mounted ConfigMap by swapping a symlink, so the file is compared by content.
    async fn watch_config(self: Arc<Self>, path: std::path::PathBuf) {
        let mut last = std::fs::read(&path).ok();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = std::fs::read(&path).ok();
            if now.is_none() || now == last {
                continue;
            }
            last = now;
            let outcome = match Config::load(&path) {
                Ok(cfg) => self.apply(&cfg),
                Err(e) => Err(e.to_string()),
            };
            let status = match outcome {
                Ok(restart_needed) => {
                    if !restart_needed.is_empty() {
                        warn!(
                            keys = ?restart_needed,
                            "configuration change applied, except {}: restart needed for those (the running values stay)",
                            restart_needed.join(", ")
                        );
                    }
                    ReloadStatus {
                        at: SystemTime::now(),
                        applied: true,
                        error: None,
                        restart_needed: restart_needed.into_iter().map(String::from).collect(),
                    }
                }
                Err(error) => {
                    warn!(error = %error, "configuration change not applied (the previous one stays in force)");
                    ReloadStatus {
                        at: SystemTime::now(),
                        applied: false,
                        error: Some(error),
                        restart_needed: Vec::new(),
                    }
                }
            };
            self.metrics.config_reload(status.applied);
            self.admin.reloaded(status);
        }
    }

    /// Applies what of `cfg` can change while running (exports, `dns.upstream`, `dns.allow`,
    /// `dns.ttl`); returns the changed keys that need a restart.
    fn apply(&self, cfg: &Config) -> Result<Vec<&'static str>, String> {
        let mut restart_needed = cfg.restart_needed(&self.config);
        self.mesh
            .set_exports(&cfg.exports, &cfg.namespace)
            .map_err(|e| format!("exports: {e}"))?;
        for key in self.dns.reconfigure(&cfg.dns).map_err(|e| format!("dns: {e}"))? {
            if !restart_needed.contains(&key) {
                restart_needed.push(key);
            }
        }
        Ok(restart_needed)
    }
}

/// An admitted handshake's slot in the [`Admission`]; given back when dropped, however the
/// handshake task ends.
struct Slot {
    /// The admission it was taken from.
    admission: Arc<Mutex<Admission>>,
    /// The attempt's source address.
    source: std::net::IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.admission).finished(self.source);
    }
}

/// Locks the admission (a poisoned lock still holds consistent counts: every update is one
/// step).
fn lock(admission: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    match admission.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The agent's [`LinkHandler`]: adverts on the control stream, flows and datagrams on the
/// connection.
struct Session {
    mesh: Arc<Mesh>,
    forwarder: Arc<Forwarder>,
}

/// Takes a link out of the mesh however its session ends (including being dropped).
struct UpGuard<'a> {
    mesh: &'a Mesh,
    name: String,
    conn: quinn::Connection,
    /// What the session is with: a sidecar's session on its gateway is no link.
    peer: Peer,
}

impl Drop for UpGuard<'_> {
    fn drop(&mut self) {
        if self.peer.is_link() {
            self.mesh.link_down(&self.name, &self.conn);
        } else {
            self.mesh.member_down(&self.name, &self.conn);
        }
    }
}

#[async_trait::async_trait]
impl LinkHandler for Session {
    fn silent(&self, name: &str, conn: &quinn::Connection, silent: bool) {
        self.mesh.link_silent(name, conn, silent);
    }

    async fn run(&self, link: Established) -> String {
        let Established {
            name,
            peer_site,
            cost,
            peer,
            conn,
            mut send,
            mut recv,
            cancel: _,
            lanes,
        } = link;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // On a gateway, a session with one of our sidecars is no link; on a sidecar, the
        // one link is to the gateway and is a link like any other to the mesh.
        let sidecar_here = peer == Peer::Sidecar;
        if peer.is_link() {
            self.mesh.link_up(&name, &peer_site, cost, conn.clone(), lanes, tx);
        } else {
            self.mesh.member_up(&name, conn.clone(), tx);
        }
        let _guard = UpGuard {
            mesh: &self.mesh,
            name: name.clone(),
            conn: conn.clone(),
            peer,
        };
        let writer = async {
            while let Some(msg) = rx.recv().await {
                if let Err(e) = protocol::write_frame(&mut send, &msg).await {
                    return format!("control stream: {e}");
                }
            }
            "control stream closed".to_string()
        };
        let reader = async {
            loop {
                match protocol::read_frame::<_, Control>(&mut recv).await {
                    Ok(Control::Advert(advert)) if !sidecar_here => self.mesh.on_advert(&name, *advert),
                    Ok(Control::MemberExports { services }) if sidecar_here => {
                        if let Err(e) = self.mesh.set_member_exports(&name, services) {
                            warn!(error = %e, "sidecar exports not applied");
                        }
                    }
                    Ok(other) => debug!(?other, "unexpected control frame ignored"),
                    Err(e) => return format!("control stream: {e}"),
                }
            }
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
            r = self.carry(&conn, if peer == Peer::Sidecar { Arrived::Unknown } else { Arrived::Interactive }) => r,
        }
    }

    async fn run_lane(&self, name: &str, first: &quinn::Connection, lane: quinn::Connection) -> String {
        /// Takes the lane out of routing however its session ends.
        struct LaneGuard<'a> {
            mesh: &'a Mesh,
            first: &'a quinn::Connection,
            lane: quinn::Connection,
        }
        impl Drop for LaneGuard<'_> {
            fn drop(&mut self) {
                self.mesh.lane_down(self.first, &self.lane);
            }
        }
        if !self.mesh.lane_up(first, lane.clone()) {
            return format!("link {name} is not routed");
        }
        let _guard = LaneGuard {
            mesh: &self.mesh,
            first,
            lane: lane.clone(),
        };
        self.carry(&lane, Arrived::Bulk).await
    }
}

impl Session {
    /// Carries what the peer sends on `conn`, a link's first connection or one of its
    /// lanes: flows (bidirectional streams), UDP datagrams, and datagrams too large for one
    /// (unidirectional streams). `lane`: which kind of lane `conn` is
    /// ([`crate::link::lanes`]). Returns why the connection ended.
    async fn carry(&self, conn: &quinn::Connection, lane: Arrived) -> String {
        let streams = async {
            loop {
                match conn.accept_bi().await {
                    Ok((s, r)) => self.forwarder.accept_stream(s, r, lane),
                    Err(e) => return describe_connection_error(&e),
                }
            }
        };
        let datagrams = async {
            loop {
                match conn.read_datagram().await {
                    Ok(d) => self.forwarder.on_link_datagram(conn, &d),
                    Err(e) => return describe_connection_error(&e),
                }
            }
        };
        let unis = async {
            loop {
                match conn.accept_uni().await {
                    Ok(r) => self.forwarder.accept_uni(conn.clone(), r),
                    Err(e) => return describe_connection_error(&e),
                }
            }
        };
        tokio::select! {
            r = streams => r,
            r = datagrams => r,
            r = unis => r,
        }
    }
}
