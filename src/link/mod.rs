//! Links between sites: the records that survive restarts, and the connections behind them.
//!
//! A link is born when a token is redeemed. Both sides record it in `links.yaml` with the
//! peer's CA: the redeemer as the **dialer** (it knows the issuer's addresses), the issuer as
//! the **acceptor** (the redeemer may sit behind NAT). The dialer keeps one QUIC connection up,
//! reconnecting with [`backoff::Backoff`] after any failure or restart of either side; the
//! acceptor admits it only with a client certificate from the recorded CA ([`PeerTrust`]).
//! With TLS 1.3 the client's handshake can finish before the server has checked the client's
//! certificate, so a link counts as `up` only after the application-level `Hello`/`Welcome`
//! exchange on the control stream. A link silent for `links.down_after` shows `down` and
//! leaves routing ([`liveness`]); its connection and flows wait until `links.idle_timeout`.
//! `link remove` drops the record and the trust at once and closes the connection with a
//! reason the peer logs.
//!
//! **One link per pair of sites.** Two links between the same sites would only compete (an
//! acceptor keeps one connection per peer, so they would take turns replacing each other). A
//! redemption therefore reserves the peer site first ([`Links::reserve_peer`]) on both sides:
//! it is refused while any link with that site exists, in either direction, or while another
//! redemption with it is in flight; [`Links::add`] refuses a second record for a peer too.
//! Duplicates already in an old `links.yaml` are kept but left idle ([`duplicates`]), and an
//! acceptor refuses a *different* link of a site while one is live (the dialer names its link
//! in its hello), so two connections of one peer can never alternate.
//!
//! These rules live in [`table::LinkTable`], a plain state machine (events in, actions out,
//! no sockets or clock). [`Links`] is its shell: it owns the QUIC endpoint, the dialer and
//! session tasks and their cancellation tokens, feeds the table what happens to them, and
//! carries out the table's [`table::Action`]s.

pub mod backoff;
pub mod lanes;
pub mod liveness;
pub mod redeem;
pub mod table;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::identity::{self, CertOwner, PeerTrust, SiteIdentity};
use crate::protocol::{self, ALPN_LANE, ALPN_LINK, Control, PROTOCOL_VERSION, close};
use crate::role::Peer;
use crate::state::{self, StateError, rfc3339};
use backoff::Backoff;
use table::{Action, LinkTable};
pub use table::{PeerConflict, duplicates, peer_conflict};

/// How long a dial attempt (handshake plus hello) may take before it counts as failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of link bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("no link named {0:?} (see `causeway link list`)")]
    NotFound(String),
    #[error("a link named {0:?} already exists; choose another with --name, or `causeway link remove {0}` first")]
    Exists(String),
    #[error(transparent)]
    Conflict(#[from] PeerConflict),
}

/// What a dialer sends as its link's identity in `Hello`: the same across reconnections
/// and restarts, different for another link to the same site.
fn link_identity(record: &LinkRecord) -> String {
    format!("{}@{}", record.name, rfc3339::format(record.created))
}

/// A peer site held for one redemption in flight ([`Links::reserve_peer`]); released when
/// dropped.
pub struct PeerReservation {
    /// The table the site is reserved in.
    table: Arc<Mutex<LinkTable<quinn::Connection>>>,
    /// The reserved site.
    site: String,
}

impl Drop for PeerReservation {
    fn drop(&mut self) {
        lock_table(&self.table).release_peer(&self.site);
    }
}

fn lock_table(m: &Mutex<LinkTable<quinn::Connection>>) -> std::sync::MutexGuard<'_, LinkTable<quinn::Connection>> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Which side of the link dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// We redeemed the peer's token and dial its addresses.
    Dialer,
    /// The peer redeemed our token and dials us.
    Acceptor,
}

/// A link as remembered in `links.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Local name of the link (`--name`, default the peer's site id).
    pub name: String,
    /// The peer's site id, verified as the TLS server name and against its hello.
    pub peer_site: String,
    /// Whether we dial or accept.
    pub role: Role,
    /// Where the peer listens (dialers only).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The peer's site CA (PEM): the only CA whose certificates this link accepts.
    pub peer_ca: String,
    /// Routing cost of the link (`--cost`), lower is preferred.
    pub cost: u32,
    /// When the link was created.
    #[serde(with = "rfc3339")]
    pub created: SystemTime,
}

/// How the links of an agent are set up.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Our `vips.cidr`, sent in hellos: the clusterset shares one range.
    pub vips_cidr: String,
    /// For a sidecar: its gateway's `host:port` (`gateway:` in causeway.yaml). A sidecar
    /// links only to its gateway and persists nothing.
    pub sidecar_gateway: Option<String>,
    /// Keep-alive and idle timeout of the connections we dial (`links:`).
    pub timing: crate::quic::LinkTiming,
    /// Most lanes (parallel QUIC connections) per link to another site (`links.lanes`,
    /// resolved): a link uses the fewer of both ends' ([`protocol::agree_lanes`]). A
    /// sidecar's link to its gateway always has one.
    pub lanes: u8,
}

/// The content of `links.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LinkBook {
    #[serde(default)]
    links: Vec<LinkRecord>,
}

/// Whether a link's connection is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Up,
    Connecting,
    Down,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkState::Up => "up",
            LinkState::Connecting => "connecting",
            LinkState::Down => "down",
        })
    }
}

/// One row of `link list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub name: String,
    pub peer_site: String,
    pub state: LinkState,
    /// Smoothed round-trip time while up.
    pub rtt_ms: Option<f64>,
    pub cost: u32,
    /// When the link entered its current state.
    pub since: String,
    pub role: Role,
    /// The peer's address of the current connection, or the addresses a dialer tries.
    pub remote: Option<String>,
    /// Why the last attempt failed or the last connection ended, while not up.
    pub last_error: Option<String>,
    /// How many of the link's lanes (parallel QUIC connections, `links.lanes`) are up,
    /// its first connection included; absent while the link is not up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<usize>,
}

/// An established link (after `Hello`/`Welcome`), handed to the agent's [`LinkHandler`].
pub struct Established {
    /// Local name of the link.
    pub name: String,
    /// The verified peer site.
    pub peer_site: String,
    /// The link's cost, as the dialer configured it.
    pub cost: u32,
    /// What the other end is: another site, our gateway (we are its sidecar), or one of our
    /// sidecars (we are its gateway).
    pub peer: Peer,
    pub conn: quinn::Connection,
    /// The control stream, after the hello exchange.
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// Cancelled when the link is removed or the agent stops.
    pub cancel: CancellationToken,
    /// How many lanes the two ends agreed on ([`lanes`]; 1 for a sidecar's session), so
    /// flows know bulk lanes are coming before they are up.
    pub lanes: u8,
}

/// What runs on an established link: the catalog exchange and the data plane. The link
/// layer knows nothing of either; the agent supplies this.
#[async_trait::async_trait]
pub trait LinkHandler: Send + Sync + 'static {
    /// Runs until the link ends (or is cancelled); returns why it ended.
    async fn run(&self, link: Established) -> String;

    /// The link `name` on `conn` fell silent for `links.down_after` (`silent`), or was heard
    /// again: take it out of routing and DNS, or back in. Its connection stays.
    fn silent(&self, name: &str, conn: &quinn::Connection, silent: bool);

    /// Carries flows and datagrams on `lane`, an extra lane of link `name` whose first
    /// connection is `first` ([`lanes`]), until it ends (or is dropped); returns why.
    async fn run_lane(&self, name: &str, first: &quinn::Connection, lane: quinn::Connection) -> String;
}

/// A dialled connection after its hello was welcomed.
struct Dialed {
    conn: quinn::Connection,
    /// The control stream (unused on an extra lane, whose hello is all it carries).
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// How many lanes the link uses, as the acceptor agreed (first connection only).
    lanes: u8,
}

/// What the acceptor learnt from a welcomed hello.
struct Greeted {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The link cost the dialer configured.
    cost: u32,
    /// The dialer's link identity.
    peer_link: Option<String>,
    /// For an extra lane: its index, and the link's first connection it joins.
    lane: Option<(u8, quinn::Connection)>,
    /// For a site's link's first connection: the lanes agreed in the welcome (else 1).
    lanes: u8,
}

/// The ALPN a connection was made with.
pub(crate) fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
}

/// Closes extra lanes whose first connection ended.
fn close_lanes(lanes: Vec<quinn::Connection>) {
    for lane in lanes {
        lane.close(close::SHUTDOWN.into(), b"the link's first connection ended");
    }
}

/// The links of one agent: the [`LinkTable`] and the tasks and connections behind it.
pub struct Links {
    /// Our identity, presented on every connection.
    identity: Arc<SiteIdentity>,
    /// Peer CAs we accept, derived from the records and updated with them.
    pub(crate) trust: Arc<PeerTrust>,
    /// The one QUIC endpoint, for dialing.
    endpoint: quinn::Endpoint,
    /// Our `vips.cidr`, sent in hellos: the clusterset shares one range.
    vips_cidr: String,
    /// Keep-alive and idle timeout of the connections we dial.
    timing: crate::quic::LinkTiming,
    /// Most lanes per link (`links.lanes`, resolved; see [`LinkOptions::lanes`]).
    lanes: u8,
    /// Where records are persisted.
    path: std::path::PathBuf,
    /// Records and live state by link name: the pure part, which says what to do.
    table: Arc<Mutex<LinkTable<quinn::Connection>>>,
    /// Each link's cancellation token, which stops its dialer and session tasks; a child of
    /// `shutdown`. Replaced when a link is re-created.
    cancels: Mutex<BTreeMap<String, CancellationToken>>,
    /// Woken whenever any link changes state (for `token redeem`, which waits for "up").
    changed: tokio::sync::watch::Sender<u64>,
    /// Cancelled at shutdown; every link's token is a child of it.
    shutdown: CancellationToken,
    /// Every dialer and session task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Ourselves, for the tasks we spawn.
    me: Weak<Links>,
    /// Runs established links.
    handler: Arc<dyn LinkHandler>,
    /// Sidecars connected to this gateway, by name.
    members: Mutex<BTreeMap<String, std::net::SocketAddr>>,
}

impl Links {
    /// Loads `links.yaml`, installs trust for every recorded peer, and starts dialing.
    pub fn start(
        state_dir: &state::StateDir,
        identity: Arc<SiteIdentity>,
        trust: Arc<PeerTrust>,
        endpoint: quinn::Endpoint,
        opts: LinkOptions,
        handler: Arc<dyn LinkHandler>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Links>, LinkError> {
        let LinkOptions {
            vips_cidr,
            sidecar_gateway,
            timing,
            lanes,
        } = opts;
        let path = state_dir.links();
        let book: LinkBook = match &sidecar_gateway {
            // A sidecar's one link: to its site's gateway, pinned to the site's own CA.
            Some(gateway) => LinkBook {
                links: vec![LinkRecord {
                    name: "gateway".into(),
                    peer_site: identity.site.clone(),
                    role: Role::Dialer,
                    addresses: vec![gateway.clone()],
                    peer_ca: identity.ca_pem.clone(),
                    cost: 1,
                    created: SystemTime::now(),
                }],
            },
            None => {
                // A gateway accepts its own site's sidecars (member certificates only).
                trust.set_own(&identity.site, &identity.ca_der)?;
                state::read_yaml_or_default(&path)?
            }
        };
        let (table, actions) = LinkTable::new(
            book.links,
            sidecar_gateway.is_none(),
            timing.down_after,
            timing.idle_timeout,
            SystemTime::now(),
        );
        let links = Arc::new_cyclic(|me| Links {
            me: me.clone(),
            handler,
            members: Mutex::new(BTreeMap::new()),
            identity,
            trust,
            endpoint,
            vips_cidr,
            timing,
            lanes: lanes.max(1),
            path,
            table: Arc::new(Mutex::new(table)),
            cancels: Mutex::new(BTreeMap::new()),
            changed: tokio::sync::watch::channel(0).0,
            shutdown,
            tasks: TaskTracker::new(),
        });
        links.apply(actions)?;
        Ok(links)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkTable<quinn::Connection>> {
        lock_table(&self.table)
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CancellationToken>> {
        match self.cancels.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Link `name`'s cancellation token, made on first use.
    fn cancel_token(&self, name: &str) -> CancellationToken {
        self.lock_cancels()
            .entry(name.to_string())
            .or_insert_with(|| self.shutdown.child_token())
            .clone()
    }

    /// Carries out what the table asked for, in order; the first persistence or trust error
    /// is returned after the rest are done.
    fn apply(&self, actions: Vec<Action<quinn::Connection>>) -> Result<(), LinkError> {
        let mut first_error = None;
        for action in actions {
            let result = match action {
                Action::Dial(name) => {
                    self.spawn_dialer(&name);
                    Ok(())
                }
                Action::Stop(name) => {
                    if let Some(token) = self.lock_cancels().remove(&name) {
                        token.cancel();
                    }
                    Ok(())
                }
                Action::Close { conn, code, reason } => {
                    conn.close(code.into(), reason.as_bytes());
                    Ok(())
                }
                Action::Persist(records) => {
                    state::write_yaml(&self.path, &LinkBook { links: records }).map_err(LinkError::from)
                }
                Action::Trust(cas) => {
                    let peers: Vec<(String, CertificateDer<'static>)> = cas
                        .into_iter()
                        .filter_map(|(site, pem)| identity::parse_cert_pem(&pem, "peer_ca").ok().map(|ca| (site, ca)))
                        .collect();
                    self.trust.set(&peers).map_err(LinkError::from)
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether a link of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains(name)
    }

    /// Holds `site` for one redemption: refused ([`PeerConflict`]) while a link with it
    /// exists, in either direction, or another redemption with it is in flight. Both the
    /// redeemer (before dialing) and the issuer (before consuming the grant) take one, and
    /// keep it until the link is recorded.
    pub fn reserve_peer(&self, site: &str) -> Result<PeerReservation, PeerConflict> {
        self.lock().reserve_peer(site)?;
        Ok(PeerReservation {
            table: self.table.clone(),
            site: site.to_string(),
        })
    }

    /// Adds (or, for the same name, peer CA and role, replaces) a link record durably,
    /// trusts its CA, and starts dialing if we are the dialer. Errors: [`LinkError::Exists`]
    /// for a name taken by another link, [`PeerConflict::Linked`] when another link already
    /// has this peer site (one link per pair of sites), and state-file errors.
    pub fn add(&self, record: LinkRecord) -> Result<(), LinkError> {
        let actions = self.lock().add(record, SystemTime::now())?;
        let result = self.apply(actions);
        self.notify();
        result
    }

    /// Removes a link: the record and the peer's trust go at once, and its connection is
    /// closed with a reason the peer logs.
    pub fn remove(&self, name: &str) -> Result<LinkRecord, LinkError> {
        let (record, actions) = self.lock().remove(name)?;
        let result = self.apply(actions);
        self.notify();
        result.map(|()| record)
    }

    /// A fresh name for an acceptor record of `site` (the site id, or `site-2`, …).
    pub fn acceptor_name(&self, site: &str, peer_ca: &str) -> String {
        self.lock().acceptor_name(site, peer_ca)
    }

    /// Every link with its state.
    pub fn list(&self) -> Vec<LinkStatus> {
        self.lock().list()
    }

    /// Waits until the named link is up, or `timeout` passes; returns its status either way.
    pub async fn wait_up(&self, name: &str, timeout: Duration) -> Option<LinkStatus> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.list().into_iter().find(|s| s.name == name);
            match &status {
                Some(s) if s.state == LinkState::Up => return status,
                None => return None,
                _ => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return status;
            }
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Applies an event to the table and wakes those waiting for a change.
    fn event<R>(&self, f: impl FnOnce(&mut LinkTable<quinn::Connection>) -> R) -> R {
        let r = f(&mut self.lock());
        self.notify();
        r
    }

    /// Link `name` is up on `conn`: recorded, and a connection it replaces closed.
    fn up(&self, name: &str, conn: &quinn::Connection, peer_link: Option<String>) {
        let replaced = self.event(|t| t.up(name, conn.clone(), peer_link, SystemTime::now()));
        // Only Close actions come back, which cannot fail.
        let _ = self.apply(replaced);
    }

    fn spawn_dialer(&self, name: &str) {
        let Some(record) = self.lock().record(name).cloned() else {
            return;
        };
        let cancel = self.cancel_token(name);
        let Some(me) = self.me.upgrade() else { return };
        let span = info_span!("link", name = %record.name, peer = %record.peer_site, role = "dialer");
        self.tasks
            .spawn(async move { me.dial_loop(record, cancel).await }.instrument(span));
    }

    /// Keeps a dialer link connected until it is removed or the agent stops.
    async fn dial_loop(self: Arc<Self>, record: LinkRecord, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut attempt: u64 = 0;
        while !cancel.is_cancelled() {
            attempt += 1;
            self.event(|t| t.dialing(&record.name, None, SystemTime::now()));
            let result = tokio::select! {
                r = self.connect(&record) => r,
                _ = cancel.cancelled() => break,
            };
            match result {
                Ok(Dialed {
                    conn,
                    send,
                    recv,
                    lanes,
                }) => {
                    backoff.reset();
                    info!(remote = %conn.remote_address(), rtt_ms = conn.rtt().as_millis() as u64, lanes, "link up");
                    self.up(&record.name, &conn, None);
                    let session = self.session(Established {
                        name: record.name.clone(),
                        peer_site: record.peer_site.clone(),
                        cost: record.cost,
                        peer: self.identity.role.dialed_peer(),
                        conn: conn.clone(),
                        send,
                        recv,
                        cancel: cancel.clone(),
                        lanes,
                    });
                    let reason = tokio::select! {
                        reason = session => reason,
                        never = self.keep_lanes(&record, &conn, lanes, &cancel) => match never {},
                    };
                    let lanes = self.event(|t| {
                        t.ended(
                            &record.name,
                            &conn,
                            LinkState::Connecting,
                            reason.clone(),
                            SystemTime::now(),
                        )
                    });
                    close_lanes(lanes);
                    if cancel.is_cancelled() {
                        break;
                    }
                    warn!(reason = %reason, "link down; reconnecting");
                }
                Err(e) => {
                    if attempt == 1 || attempt % 10 == 0 {
                        warn!(attempt, error = %e, "link attempt failed");
                    } else {
                        debug!(attempt, error = %e, "link attempt failed");
                    }
                    self.event(|t| t.dialing(&record.name, Some(e), SystemTime::now()));
                }
            }
            let delay = backoff.next_delay(rand::random::<f64>());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => break,
            }
        }
        debug!("dialer stopped");
    }

    /// The client configuration that dials `record`'s peer with `alpn` (a link's first
    /// connection, or one of its lanes), pinned to the peer's recorded CA.
    fn dial_config(&self, record: &LinkRecord, alpn: &[u8]) -> Result<quinn::ClientConfig, String> {
        let ca = identity::parse_cert_pem(&record.peer_ca, "peer_ca").map_err(|e| e.to_string())?;
        crate::quic::client_config(&self.identity, &ca, alpn, true, &self.timing).map_err(|e| e.to_string())
    }

    /// One attempt: every address of the peer in turn, handshake, then hello.
    async fn connect(&self, record: &LinkRecord) -> Result<Dialed, String> {
        let cfg = self.dial_config(record, ALPN_LINK)?;
        let mut errors = Vec::new();
        for addr in resolve_all(&record.addresses, &mut errors).await {
            match tokio::time::timeout(DIAL_TIMEOUT, self.connect_addr(&cfg, addr, record, None)).await {
                Ok(Ok(ok)) => return Ok(ok),
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: timed out")),
            }
        }
        Err(errors.join("; "))
    }

    /// One handshake and hello at `addr`: the link's first connection (`lane` = `None`), or
    /// its extra lane `lane`.
    async fn connect_addr(
        &self,
        cfg: &quinn::ClientConfig,
        addr: std::net::SocketAddr,
        record: &LinkRecord,
        lane: Option<u8>,
    ) -> Result<Dialed, String> {
        let (peer_site, cost) = (record.peer_site.as_str(), record.cost);
        let conn = self
            .endpoint
            .connect_with(cfg.clone(), addr, peer_site)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| describe_connection_error(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| describe_connection_error(&e))?;
        let hello = Control::Hello {
            version: PROTOCOL_VERSION,
            min_version: Some(protocol::MIN_PROTOCOL_VERSION),
            site: self.identity.site.clone(),
            vips_cidr: self.vips_cidr.clone(),
            cost,
            link: Some(link_identity(record)),
            // Lanes are for links between sites; a sidecar's link to its gateway has one.
            lanes: (self.identity.role.dialed_peer() == Peer::Site && lane.is_none()).then_some(self.lanes),
            lane,
        };
        // With TLS 1.3 a refused client certificate shows up only after connect(): on this
        // write or on the read below, whichever meets the close first. Either way, say why
        // the peer closed rather than "connection lost".
        // The stream may fail a moment before the connection records why: wait for that (an
        // error path, bounded).
        let closed_because = |e: protocol::ProtocolError| {
            let conn = conn.clone();
            async move {
                match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
                    Ok(reason) => describe_connection_error(&reason),
                    Err(_) => e.to_string(),
                }
            }
        };
        if let Err(e) = protocol::write_frame(&mut send, &hello).await {
            return Err(closed_because(e).await);
        }
        match protocol::read_frame::<_, Control>(&mut recv).await {
            Ok(Control::Welcome { site, version, lanes }) if site == peer_site => {
                debug!(peer = %site, version = version.unwrap_or(1), lanes, "link protocol agreed");
                Ok(Dialed {
                    conn,
                    send,
                    recv,
                    // An acceptor without lanes names none: then one connection, so no
                    // lane can ever be taken there for a reconnection of the link.
                    lanes: lanes.unwrap_or(1).clamp(1, self.lanes),
                })
            }
            Ok(Control::Welcome { site, .. }) => {
                conn.close(close::PROTOCOL.into(), b"unexpected site");
                Err(format!("peer answered as site {site:?}, expected {peer_site:?}"))
            }
            Ok(Control::Reject { message }) => Err(format!("peer rejected the link: {message}")),
            Ok(other) => {
                conn.close(close::PROTOCOL.into(), b"unexpected frame");
                Err(format!("unexpected {other:?}"))
            }
            Err(e) => Err(closed_because(e).await),
        }
    }

    /// Keeps the extra lanes of a dialled link up while its first connection `first` runs
    /// (the caller drops this future when it ends, which ends the lanes): dials the missing
    /// ones one at a time (a source may have only a few handshakes in flight at the
    /// acceptor), and dials a lane again after backoff when it fails alone. Never returns.
    async fn keep_lanes(
        &self,
        record: &LinkRecord,
        first: &quinn::Connection,
        lanes: u8,
        cancel: &CancellationToken,
    ) -> std::convert::Infallible {
        let Some(me) = self.me.upgrade() else {
            return std::future::pending().await;
        };
        let mut missing: Vec<u8> = (1..lanes).rev().collect();
        let mut running = tokio::task::JoinSet::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let next = missing.last().copied();
            tokio::select! {
                (i, dialed) = async {
                    match next {
                        Some(i) => (i, self.dial_lane(record, first, i).await),
                        None => std::future::pending().await,
                    }
                } => match dialed {
                    Ok(lane) => {
                        missing.pop();
                        backoff.reset();
                        if missing.is_empty() {
                            info!(lanes, "all lanes up");
                        }
                        let (me, name, first, cancel) = (me.clone(), record.name.clone(), first.clone(), cancel.clone());
                        running.spawn(async move { me.lane_session(&name, &first, lane, i, &cancel).await }.in_current_span());
                    }
                    Err(e) => {
                        debug!(lane = i, error = %e, "lane attempt failed");
                        tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
                    }
                },
                Some(ended) = running.join_next() => {
                    if let Ok(i) = ended {
                        missing.push(i);
                    }
                    tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
                }
            }
        }
    }

    /// Dials extra lane `index` of the link whose first connection is `first`, to the same
    /// address.
    async fn dial_lane(
        &self,
        record: &LinkRecord,
        first: &quinn::Connection,
        index: u8,
    ) -> Result<quinn::Connection, String> {
        let cfg = self.dial_config(record, ALPN_LANE)?;
        let dialed = tokio::time::timeout(
            DIAL_TIMEOUT,
            self.connect_addr(&cfg, first.remote_address(), record, Some(index)),
        )
        .await
        .map_err(|_| "timed out".to_string())??;
        Ok(dialed.conn)
    }

    /// Runs extra lane `index` of link `name` (first connection `first`), on either side,
    /// until it, the first connection or the link ends; returns `index`. The lane is in the
    /// table (for `link list` and metrics) while this runs, and closed when it returns or is
    /// dropped.
    async fn lane_session(
        &self,
        name: &str,
        first: &quinn::Connection,
        lane: quinn::Connection,
        index: u8,
        cancel: &CancellationToken,
    ) -> u8 {
        /// Takes the lane out of the table and closes it, however the session ends.
        struct Guard<'a> {
            links: &'a Links,
            name: &'a str,
            lane: quinn::Connection,
            reason: String,
        }
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                self.links.event(|t| t.lane_ended(self.name, &self.lane));
                self.lane.close(close::SHUTDOWN.into(), b"lane closed");
                debug!(reason = %self.reason, "lane ended");
            }
        }
        lane.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(crate::quic::LINK_BIDI_STREAMS));
        if !self.event(|t| t.lane_up(name, first, lane.clone())) {
            lane.close(close::SHUTDOWN.into(), b"the link's first connection ended");
            return index;
        }
        let mut guard = Guard {
            links: self,
            name,
            lane: lane.clone(),
            reason: String::new(),
        };
        debug!(lane = index, remote = %lane.remote_address(), "lane up");
        guard.reason = tokio::select! {
            biased;
            _ = cancel.cancelled() => "link stopped".to_string(),
            r = self.handler.run_lane(name, first, lane.clone()) => r,
            e = lane.closed() => describe_connection_error(&e),
            _ = first.closed() => "the link's first connection ended".to_string(),
        };
        index
    }

    /// Handles a connection that arrived with the link ALPN: identifies the peer by its
    /// certificate (a linked site, or a sidecar of our own site), checks its hello, and keeps
    /// the session until it ends.
    pub async fn accept(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let leaf = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().cloned());
        match leaf.and_then(|l| self.trust.identify(&l)) {
            Some(CertOwner::Site(site)) => self.accept_site(conn, site).await,
            Some(CertOwner::Member) => self.accept_member(conn).await,
            None => {
                warn!(%remote, "link from an untrusted site refused");
                conn.close(close::REJECTED.into(), b"not a trusted site");
            }
        }
    }

    async fn accept_site(self: Arc<Self>, conn: quinn::Connection, site: String) {
        let remote = conn.remote_address();
        let name_for_peer = self.lock().name_for_peer(&site);
        let Some(name) = name_for_peer else {
            conn.close(close::REJECTED.into(), b"no link");
            return;
        };
        let span = info_span!("link", name = %name, peer = %site, role = "acceptor");
        async move {
            let Some(Greeted {
                send,
                recv,
                cost,
                peer_link,
                lane,
                lanes,
            }) = self.hello(&conn, &site, Some(&name)).await
            else {
                return;
            };
            if !self.contains(&name) {
                return;
            }
            let cancel = self.cancel_token(&name);
            if let Some((index, first)) = lane {
                // The hello was all an extra lane's control stream carries.
                drop((send, recv));
                self.lane_session(&name, &first, conn, index, &cancel).await;
                return;
            }
            info!(%remote, lanes, "link up");
            self.up(&name, &conn, peer_link);
            let reason = self
                .session(Established {
                    name: name.clone(),
                    peer_site: site.clone(),
                    cost,
                    peer: Peer::Site,
                    conn: conn.clone(),
                    send,
                    recv,
                    cancel,
                    lanes,
                })
                .await;
            info!(reason = %reason, "link down");
            close_lanes(self.event(|t| t.ended(&name, &conn, LinkState::Down, reason, SystemTime::now())));
        }
        .instrument(span)
        .await
    }

    /// A sidecar of our own site: no record, no persistence; it lasts as long as its
    /// connection.
    async fn accept_member(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let name = format!("member-{remote}");
        let span = info_span!("member", %remote);
        async move {
            let site = self.identity.site.clone();
            let Some(Greeted { send, recv, .. }) = self.hello(&conn, &site, None).await else {
                return;
            };
            info!("sidecar connected");
            self.lock_members().insert(name.clone(), remote);
            let reason = self
                .session(Established {
                    name: name.clone(),
                    peer_site: site,
                    cost: 1,
                    peer: Peer::Sidecar,
                    conn,
                    send,
                    recv,
                    cancel: self.shutdown.child_token(),
                    lanes: 1,
                })
                .await;
            self.lock_members().remove(&name);
            info!(reason = %reason, "sidecar disconnected");
        }
        .instrument(span)
        .await
    }

    /// Connected sidecars (gateway only): name → address.
    pub fn members(&self) -> BTreeMap<String, std::net::SocketAddr> {
        self.lock_members().clone()
    }

    fn lock_members(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, std::net::SocketAddr>> {
        match self.members.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The acceptor's side of the hello: checks the dialer's claims against its certificate
    /// (`site`) and our settings, and, for a site's link `link`, that no other link of that
    /// site is live on it; answers `Welcome` or `Reject`. Returns the control stream, the
    /// link cost the dialer configured and the dialer's link identity, and for an extra
    /// lane ([`lanes`]) the first connection it joins. A lane is welcomed only on a site's
    /// link that is up with the same dialer link; it never replaces the link's connection.
    async fn hello(&self, conn: &quinn::Connection, site: &str, link: Option<&str>) -> Option<Greeted> {
        let remote = conn.remote_address();
        let exchange = async {
            let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| describe_connection_error(&e))?;
            let msg: Control = protocol::read_frame(&mut recv).await.map_err(|e| e.to_string())?;
            let agreed = match &msg {
                Control::Hello {
                    version, min_version, ..
                } => protocol::negotiate(*version, *min_version),
                _ => Ok(PROTOCOL_VERSION),
            };
            let reject = match &msg {
                Control::Hello { .. } if agreed.is_err() => agreed.clone().err(),
                Control::Hello { site: claimed, .. } if claimed != site => Some(format!(
                    "hello claims site {claimed:?} but the certificate is for {site:?}"
                )),
                Control::Hello { vips_cidr, .. } if *vips_cidr != self.vips_cidr => Some(format!(
                    "vips.cidr differs: this site uses {}, the peer uses {vips_cidr}; every site of a clusterset must use the same range",
                    self.vips_cidr
                )),
                Control::Hello { link: claimed, .. } => link
                    .and_then(|name| self.lock().live_other_link(name, claimed.as_deref()))
                    .map(|live| {
                        format!(
                            "site {site} already has a live link with {} ({live}); one link per pair of sites: \
                             remove the extra one on {site} with `causeway link remove`",
                            self.identity.site
                        )
                    }),
                other => Some(format!("expected hello, got {other:?}")),
            };
            // An extra lane joins the live first connection of the same dialer link, and
            // comes with the lane ALPN (which agents before lanes refuse); a first connection
            // never does.
            let lane_alpn = alpn(conn).as_deref() == Some(ALPN_LANE);
            let (reject, lane) = match (&msg, reject, link) {
                (_, Some(r), _) => (Some(r), None),
                (Control::Hello { lane, .. }, None, _) if lane.is_some() != lane_alpn => (
                    Some("a lane's hello must come on a lane connection, and only there".to_string()),
                    None,
                ),
                // Never more lanes than this end is configured for, whatever a peer sends.
                (Control::Hello { lane: Some(i), .. }, None, _) if *i == 0 || *i >= self.lanes => (
                    Some(format!(
                        "lane {i} is out of range: this agent runs at most {} lanes",
                        self.lanes
                    )),
                    None,
                ),
                (Control::Hello { lane: Some(_), .. }, None, None) => {
                    (Some("a sidecar's link has no lanes".to_string()), None)
                }
                (
                    Control::Hello {
                        lane: Some(i),
                        link: claimed,
                        ..
                    },
                    None,
                    Some(name),
                ) => {
                    // Checked and recorded under one lock, so lanes arriving at once cannot
                    // all pass the count before any is recorded.
                    let mut table = self.lock();
                    match table.lane_first(name, claimed.as_deref()) {
                        Ok(_) if table.lanes(name).len() + 1 >= usize::from(self.lanes) => {
                            (Some(format!("link {name} has all its {} lanes up", self.lanes)), None)
                        }
                        Ok(first) if table.lane_up(name, &first, conn.clone()) => (None, Some((*i, first))),
                        Ok(_) => (Some(format!("link {name} changed its connection")), None),
                        Err(e) => (Some(e), None),
                    }
                }
                (_, None, _) => (None, None),
            };
            if let Some(message) = reject {
                let _ = protocol::write_frame(
                    &mut send,
                    &Control::Reject {
                        message: message.clone(),
                    },
                )
                .await;
                let _ = send.finish();
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.close(close::REJECTED.into(), message.as_bytes());
                return Err(message);
            }
            // Lanes are agreed on a site's link's first connection; a sidecar's has one.
            let lanes = match &msg {
                Control::Hello { lanes: offered, .. } if link.is_some() && lane.is_none() => {
                    Some(protocol::agree_lanes(*offered, self.lanes))
                }
                _ => None,
            };
            protocol::write_frame(
                &mut send,
                &Control::Welcome {
                    site: self.identity.site.clone(),
                    version: agreed.ok(),
                    lanes,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let (cost, peer_link) = match msg {
                Control::Hello { cost, link, .. } => (cost.max(1), link),
                _ => (1, None),
            };
            Ok::<_, String>(Greeted {
                send,
                recv,
                cost,
                peer_link,
                lane,
                lanes: lanes.unwrap_or(1),
            })
        };
        let result = tokio::time::timeout(DIAL_TIMEOUT, exchange).await;
        if !matches!(result, Ok(Ok(_)))
            && let Some(name) = link
        {
            // A lane recorded before its welcome failed is no lane (a no-op otherwise).
            self.event(|t| t.lane_ended(name, conn));
        }
        match result {
            Ok(Ok(streams)) => Some(streams),
            Ok(Err(e)) => {
                warn!(%remote, error = %e, "link hello failed");
                None
            }
            Err(_) => {
                conn.close(close::PROTOCOL.into(), b"hello timed out");
                warn!(%remote, "link hello timed out");
                None
            }
        }
    }

    /// Runs an established link until it ends; returns why it ended. Both sides first raise
    /// the streams the peer may open from the handshake's few to one per flow
    /// ([`crate::quic::HANDSHAKE_BIDI_STREAMS`] → [`crate::quic::LINK_BIDI_STREAMS`]); the peer
    /// learns it from a MAX_STREAMS frame.
    async fn session(&self, link: Established) -> String {
        let conn = link.conn.clone();
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(crate::quic::LINK_BIDI_STREAMS));
        let cancel = link.cancel.clone();
        let name = link.name.clone();
        // Biased, the stop first: at shutdown the connection closes and the handler fails
        // at about the same time, and the link-down reason would vary from run to run.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => "link stopped".to_string(),
            reason = self.handler.run(link) => reason,
            e = conn.closed() => describe_connection_error(&e),
            never = self.watch_liveness(&name, &conn) => match never {},
        }
    }

    /// Applies `links.down_after` to the link's connection for as long as it runs: silent
    /// links show as `down` and leave routing and DNS; the connection is kept (see
    /// [`liveness`]).
    async fn watch_liveness(&self, name: &str, conn: &quinn::Connection) -> std::convert::Infallible {
        let mut live = liveness::Liveness::new(
            self.timing.down_after,
            std::time::Instant::now(),
            conn.stats().udp_rx.datagrams,
        );
        let mut tick = tokio::time::interval(live.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(change) = live.observe(std::time::Instant::now(), conn.stats().udp_rx.datagrams) else {
                continue;
            };
            let silent = change == liveness::Change::Silent;
            if silent {
                warn!(
                    link = name,
                    down_after = ?self.timing.down_after,
                    idle_timeout = ?self.timing.idle_timeout,
                    "link silent: down for routing and DNS; its connection and flows wait until the idle timeout"
                );
            } else {
                info!(link = name, "link heard again: back in routing and DNS");
            }
            self.event(|t| t.silent(name, conn, silent, SystemTime::now()));
            self.handler.silent(name, conn, silent);
        }
    }

    /// Per-link numbers for metrics: (name, peer, sample). The RTT is the first
    /// connection's; bytes are every lane's that is up.
    pub fn stats(&self) -> Vec<(String, String, crate::metrics::LinkSample)> {
        let table = self.lock();
        table
            .each()
            .map(|(name, peer, conn)| {
                let lanes = table.lanes(name).iter().filter(|_| conn.is_some());
                let mut sample = crate::metrics::LinkSample {
                    up: conn.is_some(),
                    rtt: conn.map(|c| c.rtt()),
                    ..Default::default()
                };
                for c in conn.into_iter().chain(lanes) {
                    let s = c.stats();
                    sample.tx_bytes += s.udp_tx.bytes;
                    sample.rx_bytes += s.udp_rx.bytes;
                    sample.lanes += 1;
                }
                (name.to_string(), peer.to_string(), sample)
            })
            .collect()
    }

    /// Tracks a task that belongs to the links (so shutdown waits for it).
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Closes every connection with a shutdown reason and waits for the link tasks to end.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        for c in self.lock().conns() {
            c.close(close::SHUTDOWN.into(), b"agent shutting down");
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
    }
}

/// Resolves `host:port` strings, recording the ones that fail.
pub async fn resolve_all(addresses: &[String], errors: &mut Vec<String>) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for a in addresses {
        match tokio::net::lookup_host(a.as_str()).await {
            Ok(it) => out.extend(it),
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    out
}

/// Whether the peer refused the connection before its handshake (`CONNECTION_REFUSED`,
/// RFC 9000 §20.1): it has too many handshakes in flight from us or in all
/// ([`crate::handshake`]), so trying again shortly is expected to succeed.
pub fn is_refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// Words for why a QUIC connection failed or ended, naming certificate problems plainly.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            format!(
                "closed by peer: {} ({reason})",
                close::describe(c.error_code.into_inner())
            )
        }
        E::ConnectionClosed(c) if u64::from(c.error_code) & !0xff == 0x100 => {
            format!("TLS handshake refused: {c}")
        }
        E::TransportError(t) => format!("transport error: {t}"),
        E::TimedOut => "timed out (no answer from the peer)".to_string(),
        E::LocallyClosed => "closed locally".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, peer: &str, role: Role, created_secs: u64) -> LinkRecord {
        LinkRecord {
            name: name.into(),
            peer_site: peer.into(),
            role,
            addresses: Vec::new(),
            peer_ca: "ca".into(),
            cost: 1,
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(created_secs),
        }
    }

    #[test]
    fn link_identity_is_stable_per_record_and_differs_between_links() {
        let a = record("london", "london", Role::Dialer, 10);
        let b = record("london-again", "london", Role::Dialer, 10);
        assert_eq!(link_identity(&a), link_identity(&a.clone()));
        assert_ne!(link_identity(&a), link_identity(&b));
        let mut later = a.clone();
        later.created += Duration::from_secs(1);
        assert_ne!(
            link_identity(&a),
            link_identity(&later),
            "a re-created link is another link"
        );
    }

    #[test]
    fn hellos_from_older_dialers_without_a_link_identity_still_parse() {
        let old = br#"{"type":"hello","version":1,"site":"paris","vips_cidr":"127.77.0.0/16","cost":2}"#;
        let msg: Control = serde_json::from_slice(old).unwrap();
        assert!(matches!(
            msg,
            Control::Hello {
                link: None,
                cost: 2,
                ..
            }
        ));
    }
}
