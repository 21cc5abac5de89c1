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

pub mod backoff;
pub mod liveness;
pub mod redeem;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::identity::{self, CertOwner, PeerTrust, SiteIdentity};
use crate::protocol::{self, ALPN_LINK, Control, PROTOCOL_VERSION, close};
use crate::role::Peer;
use crate::state::{self, StateError, rfc3339};
use backoff::Backoff;

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

/// Why a new link with a peer site is refused: one link per pair of sites.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerConflict {
    /// A link with the site exists already (we dial it, or it dials us).
    #[error("already linked to site {site} as link {name:?}; remove it first with: causeway link remove {name}")]
    Linked {
        /// The peer site.
        site: String,
        /// Our name for the existing link.
        name: String,
    },
    /// A redemption with the site (either direction) is in flight on this agent.
    #[error(
        "a link with site {site} is being made at this moment (a token redemption in progress); wait for it to finish"
    )]
    InProgress {
        /// The peer site.
        site: String,
    },
}

/// Whether a new link with `site` would be a second one: the oldest record with that peer
/// wins the name in the answer. `pending` holds the sites with a redemption in flight. Pure.
pub fn peer_conflict<'a>(
    records: impl IntoIterator<Item = &'a LinkRecord>,
    pending: &BTreeSet<String>,
    site: &str,
) -> Option<PeerConflict> {
    let existing = records
        .into_iter()
        .filter(|r| r.peer_site == site)
        .min_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    if let Some(r) = existing {
        return Some(PeerConflict::Linked {
            site: site.to_string(),
            name: r.name.clone(),
        });
    }
    pending
        .contains(site)
        .then(|| PeerConflict::InProgress { site: site.to_string() })
}

/// Records that duplicate an older link with the same peer site (left by versions that
/// allowed them): duplicate name → the name of the link kept for that site (the oldest,
/// then the first by name). Pure.
pub fn duplicates<'a>(records: impl IntoIterator<Item = &'a LinkRecord>) -> BTreeMap<String, String> {
    let mut by_site: BTreeMap<&str, Vec<&LinkRecord>> = BTreeMap::new();
    for r in records {
        by_site.entry(r.peer_site.as_str()).or_default().push(r);
    }
    let mut out = BTreeMap::new();
    for mut group in by_site.into_values() {
        group.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        let kept = group[0].name.clone();
        for r in &group[1..] {
            out.insert(r.name.clone(), kept.clone());
        }
    }
    out
}

/// What a dialer sends as its link's identity in `Hello`: the same across reconnections
/// and restarts, different for another link to the same site.
fn link_identity(record: &LinkRecord) -> String {
    format!("{}@{}", record.name, rfc3339::format(record.created))
}

/// A peer site held for one redemption in flight ([`Links::reserve_peer`]); released when
/// dropped.
pub struct PeerReservation {
    /// The set the site was added to.
    pending: Arc<Mutex<BTreeSet<String>>>,
    /// The reserved site.
    site: String,
}

impl Drop for PeerReservation {
    fn drop(&mut self) {
        lock_set(&self.pending).remove(&self.site);
    }
}

fn lock_set(m: &Mutex<BTreeSet<String>>) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
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
}

/// A link's record plus what is happening to it now.
struct Entry {
    record: LinkRecord,
    state: LinkState,
    since: SystemTime,
    conn: Option<quinn::Connection>,
    /// Stops this link's dialer task and session.
    cancel: CancellationToken,
    last_error: Option<String>,
    /// For an acceptor: the dialer's link identity (from its hello) of the current
    /// connection, so a different link of the same site cannot replace it while it lives.
    peer_link: Option<String>,
    /// Set when this record duplicates an older link with the same peer site (the name of
    /// that link): it stays idle, neither dialing nor accepting.
    duplicate_of: Option<String>,
}

/// The links of one agent.
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
    /// Where records are persisted.
    path: std::path::PathBuf,
    /// Records and live state by link name.
    entries: Mutex<BTreeMap<String, Entry>>,
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
    /// Peer sites with a redemption in flight (either direction), so two redemptions cannot
    /// both pass the one-link-per-site check before either records its link.
    pending: Arc<Mutex<BTreeSet<String>>>,
    /// False for a sidecar, whose one link (to its gateway) comes from its configuration and
    /// whose state directory may be a read-only Secret.
    persistent: bool,
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
        let now = SystemTime::now();
        let dups = duplicates(&book.links);
        let mut entries = BTreeMap::new();
        for record in book.links {
            let duplicate_of = dups.get(&record.name).cloned();
            let state = match record.role {
                Role::Dialer if duplicate_of.is_none() => LinkState::Connecting,
                _ => LinkState::Down,
            };
            let last_error = duplicate_of.as_ref().map(|kept| {
                warn!(
                    link = %record.name, peer = %record.peer_site, kept = %kept,
                    "second link to the same site left idle; remove it with: causeway link remove {}",
                    record.name
                );
                duplicate_message(&record, kept)
            });
            let cancel = shutdown.child_token();
            entries.insert(
                record.name.clone(),
                Entry {
                    record,
                    state,
                    since: now,
                    conn: None,
                    cancel,
                    last_error,
                    peer_link: None,
                    duplicate_of,
                },
            );
        }
        let links = Arc::new_cyclic(|me| Links {
            me: me.clone(),
            handler,
            members: Mutex::new(BTreeMap::new()),
            pending: Arc::new(Mutex::new(BTreeSet::new())),
            persistent: sidecar_gateway.is_none(),
            identity,
            trust,
            endpoint,
            vips_cidr,
            timing,
            path,
            entries: Mutex::new(entries),
            changed: tokio::sync::watch::channel(0).0,
            shutdown,
            tasks: TaskTracker::new(),
        });
        links.refresh_trust()?;
        let dialers: Vec<String> = links
            .lock()
            .values()
            .filter(|e| e.record.role == Role::Dialer && e.duplicate_of.is_none())
            .map(|e| e.record.name.clone())
            .collect();
        for name in dialers {
            links.spawn_dialer(&name);
        }
        Ok(links)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Writes the records and rebuilds the trust set from them.
    fn persist(&self, entries: &BTreeMap<String, Entry>) -> Result<(), LinkError> {
        if !self.persistent {
            return Ok(());
        }
        let book = LinkBook {
            links: entries.values().map(|e| e.record.clone()).collect(),
        };
        state::write_yaml(&self.path, &book)?;
        Ok(())
    }

    fn refresh_trust(&self) -> Result<(), LinkError> {
        let peers: Vec<(String, CertificateDer<'static>)> = self
            .lock()
            .values()
            .filter_map(|e| {
                identity::parse_cert_pem(&e.record.peer_ca, "peer_ca")
                    .ok()
                    .map(|ca| (e.record.peer_site.clone(), ca))
            })
            .collect();
        self.trust.set(&peers)?;
        Ok(())
    }

    /// Whether a link of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Holds `site` for one redemption: refused ([`PeerConflict`]) while a link with it
    /// exists, in either direction, or another redemption with it is in flight. Both the
    /// redeemer (before dialing) and the issuer (before consuming the grant) take one, and
    /// keep it until the link is recorded.
    pub fn reserve_peer(&self, site: &str) -> Result<PeerReservation, PeerConflict> {
        let entries = self.lock();
        let mut pending = lock_set(&self.pending);
        if let Some(conflict) = peer_conflict(entries.values().map(|e| &e.record), &pending, site) {
            return Err(conflict);
        }
        pending.insert(site.to_string());
        Ok(PeerReservation {
            pending: self.pending.clone(),
            site: site.to_string(),
        })
    }

    /// Adds (or, for the same name, peer CA and role, replaces) a link record durably,
    /// trusts its CA, and starts dialing if we are the dialer. Errors: [`LinkError::Exists`]
    /// for a name taken by another link, [`PeerConflict::Linked`] when another link already
    /// has this peer site (one link per pair of sites), and state-file errors.
    pub fn add(&self, record: LinkRecord) -> Result<(), LinkError> {
        let name = record.name.clone();
        let role = record.role;
        {
            let mut entries = self.lock();
            let others = entries.values().filter(|e| e.record.name != name).map(|e| &e.record);
            if let Some(conflict) = peer_conflict(others, &BTreeSet::new(), &record.peer_site) {
                return Err(conflict.into());
            }
            if let Some(old) = entries.get(&name) {
                if old.record.peer_ca != record.peer_ca || old.record.role != role {
                    return Err(LinkError::Exists(name));
                }
                old.cancel.cancel();
                if let Some(c) = &old.conn {
                    c.close(close::REPLACED.into(), b"link re-created");
                }
            }
            let state = if role == Role::Dialer {
                LinkState::Connecting
            } else {
                LinkState::Down
            };
            entries.insert(
                name.clone(),
                Entry {
                    record,
                    state,
                    since: SystemTime::now(),
                    conn: None,
                    cancel: self.shutdown.child_token(),
                    last_error: None,
                    peer_link: None,
                    duplicate_of: None,
                },
            );
            self.persist(&entries)?;
        }
        self.refresh_trust()?;
        if role == Role::Dialer {
            self.spawn_dialer(&name);
        }
        self.notify();
        Ok(())
    }

    /// Removes a link: the record and the peer's trust go at once, and its connection is
    /// closed with a reason the peer logs.
    pub fn remove(&self, name: &str) -> Result<LinkRecord, LinkError> {
        let entry = {
            let mut entries = self.lock();
            let entry = entries
                .remove(name)
                .ok_or_else(|| LinkError::NotFound(name.to_string()))?;
            self.persist(&entries)?;
            entry
        };
        self.refresh_trust()?;
        entry.cancel.cancel();
        if let Some(conn) = &entry.conn {
            conn.close(close::REMOVED.into(), b"link removed");
        }
        info!(link = %name, peer = %entry.record.peer_site, "link removed; peer trust revoked");
        self.reactivate_duplicates(name);
        self.notify();
        Ok(entry.record)
    }

    /// After link `removed` is gone, the oldest idle duplicate of it (if any) becomes the
    /// site's link: it starts dialing, or accepting.
    fn reactivate_duplicates(&self, removed: &str) {
        let dialer = {
            let mut entries = self.lock();
            let idle: Vec<LinkRecord> = entries
                .values()
                .filter(|e| e.duplicate_of.as_deref() == Some(removed))
                .map(|e| e.record.clone())
                .collect();
            let Some(next) = idle
                .iter()
                .min_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)))
                .map(|r| r.name.clone())
            else {
                return;
            };
            for r in &idle {
                if let Some(e) = entries.get_mut(&r.name) {
                    if r.name == next {
                        e.duplicate_of = None;
                        e.last_error = None;
                    } else {
                        e.duplicate_of = Some(next.clone());
                        e.last_error = Some(duplicate_message(r, &next));
                    }
                }
            }
            info!(link = %next, "link is no longer a duplicate; it takes over");
            entries
                .get(&next)
                .filter(|e| e.record.role == Role::Dialer)
                .map(|e| e.record.name.clone())
        };
        if let Some(name) = dialer {
            self.spawn_dialer(&name);
        }
    }

    /// The name of the (non-duplicate) link whose peer is this site, preferring acceptor
    /// records.
    fn name_for_peer(&self, site: &str) -> Option<String> {
        let entries = self.lock();
        entries
            .values()
            .filter(|e| e.record.peer_site == site && e.duplicate_of.is_none())
            .min_by_key(|e| e.record.role != Role::Acceptor)
            .map(|e| e.record.name.clone())
    }

    /// A fresh name for an acceptor record of `site` (the site id, or `site-2`, …).
    pub fn acceptor_name(&self, site: &str, peer_ca: &str) -> String {
        let entries = self.lock();
        let free = |n: &str| {
            entries
                .get(n)
                .is_none_or(|e| e.record.peer_ca == peer_ca && e.record.role == Role::Acceptor)
        };
        if free(site) {
            return site.to_string();
        }
        (2..)
            .map(|i| format!("{site}-{i}"))
            .find(|n| free(n))
            .unwrap_or_else(|| site.to_string())
    }

    /// Every link with its state.
    pub fn list(&self) -> Vec<LinkStatus> {
        self.lock()
            .values()
            .map(|e| LinkStatus {
                name: e.record.name.clone(),
                peer_site: e.record.peer_site.clone(),
                state: e.state,
                rtt_ms: e
                    .conn
                    .as_ref()
                    .filter(|_| e.state == LinkState::Up)
                    .map(|c| (c.rtt().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
                cost: e.record.cost,
                since: rfc3339::format(e.since),
                role: e.record.role,
                remote: match &e.conn {
                    Some(c) if e.state == LinkState::Up => Some(c.remote_address().to_string()),
                    _ if e.record.role == Role::Dialer => Some(e.record.addresses.join(",")),
                    _ => None,
                },
                last_error: if e.state == LinkState::Up {
                    None
                } else {
                    e.last_error.clone()
                },
            })
            .collect()
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

    /// Records a state change of the named link (if `conn` still matches when given).
    fn set_state(&self, name: &str, state: LinkState, conn: Option<quinn::Connection>, error: Option<String>) {
        {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(name) else { return };
            if state != LinkState::Up {
                // Only the connection that is current may take the link down.
                if let (Some(cur), Some(c)) = (&e.conn, &conn)
                    && cur.stable_id() != c.stable_id()
                {
                    return;
                }
                e.conn = None;
            } else {
                if let Some(old) = e.conn.take()
                    && conn.as_ref().is_some_and(|c| c.stable_id() != old.stable_id())
                {
                    old.close(close::REPLACED.into(), b"replaced by a newer connection");
                }
                e.conn = conn;
            }
            if e.state != state {
                e.since = SystemTime::now();
            }
            e.state = state;
            if error.is_some() {
                e.last_error = error;
            }
        }
        self.notify();
    }

    fn spawn_dialer(&self, name: &str) {
        let Some((record, cancel)) = self.lock().get(name).map(|e| (e.record.clone(), e.cancel.clone())) else {
            return;
        };
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
            self.set_state(&record.name, LinkState::Connecting, None, None);
            let result = tokio::select! {
                r = self.connect(&record) => r,
                _ = cancel.cancelled() => break,
            };
            match result {
                Ok((conn, send, recv)) => {
                    backoff.reset();
                    info!(remote = %conn.remote_address(), rtt_ms = conn.rtt().as_millis() as u64, "link up");
                    self.set_state(&record.name, LinkState::Up, Some(conn.clone()), None);
                    let reason = self
                        .session(Established {
                            name: record.name.clone(),
                            peer_site: record.peer_site.clone(),
                            cost: record.cost,
                            peer: self.identity.role.dialed_peer(),
                            conn: conn.clone(),
                            send,
                            recv,
                            cancel: cancel.clone(),
                        })
                        .await;
                    if cancel.is_cancelled() {
                        break;
                    }
                    warn!(reason = %reason, "link down; reconnecting");
                    self.set_state(&record.name, LinkState::Connecting, Some(conn), Some(reason));
                }
                Err(e) => {
                    if attempt == 1 || attempt % 10 == 0 {
                        warn!(attempt, error = %e, "link attempt failed");
                    } else {
                        debug!(attempt, error = %e, "link attempt failed");
                    }
                    self.set_state(&record.name, LinkState::Connecting, None, Some(e));
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

    /// One attempt: every address of the peer in turn, handshake, then hello.
    async fn connect(
        &self,
        record: &LinkRecord,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
        let ca = identity::parse_cert_pem(&record.peer_ca, "peer_ca").map_err(|e| e.to_string())?;
        let cfg = crate::quic::client_config(&self.identity, &ca, ALPN_LINK, true, &self.timing)
            .map_err(|e| e.to_string())?;
        let mut errors = Vec::new();
        for addr in resolve_all(&record.addresses, &mut errors).await {
            match tokio::time::timeout(DIAL_TIMEOUT, self.connect_addr(&cfg, addr, record)).await {
                Ok(Ok(ok)) => return Ok(ok),
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: timed out")),
            }
        }
        Err(errors.join("; "))
    }

    async fn connect_addr(
        &self,
        cfg: &quinn::ClientConfig,
        addr: std::net::SocketAddr,
        record: &LinkRecord,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
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
            Ok(Control::Welcome { site, version }) if site == peer_site => {
                debug!(peer = %site, version = version.unwrap_or(1), "link protocol agreed");
                Ok((conn, send, recv))
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
        let Some(name) = self.name_for_peer(&site) else {
            conn.close(close::REJECTED.into(), b"no link");
            return;
        };
        let span = info_span!("link", name = %name, peer = %site, role = "acceptor");
        async move {
            let Some((send, recv, cost, peer_link)) = self.hello(&conn, &site, Some(&name)).await else {
                return;
            };
            let Some(cancel) = self.lock().get(&name).map(|e| e.cancel.clone()) else {
                return;
            };
            info!(%remote, "link up");
            self.set_state(&name, LinkState::Up, Some(conn.clone()), None);
            if let Some(e) = self.lock().get_mut(&name)
                && e.conn.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                e.peer_link = peer_link;
            }
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
                })
                .await;
            info!(reason = %reason, "link down");
            self.set_state(&name, LinkState::Down, Some(conn), Some(reason));
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
            let Some((send, recv, _, _)) = self.hello(&conn, &site, None).await else {
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

    /// Whether link `name` has a live connection from a dialer link other than `claimed`
    /// (both known): then that other link must not replace it. Returns the live one's
    /// identity.
    fn live_other_link(&self, name: &str, claimed: Option<&str>) -> Option<String> {
        let entries = self.lock();
        let e = entries.get(name)?;
        let live = e.state == LinkState::Up && e.conn.as_ref().is_some_and(|c| c.close_reason().is_none());
        let current = e.peer_link.as_deref()?;
        (live && claimed.is_some_and(|c| c != current)).then(|| current.to_string())
    }

    /// The acceptor's side of the hello: checks the dialer's claims against its certificate
    /// (`site`) and our settings, and, for a site's link `link`, that no other link of that
    /// site is live on it; answers `Welcome` or `Reject`. Returns the control stream, the
    /// link cost the dialer configured and the dialer's link identity.
    async fn hello(
        &self,
        conn: &quinn::Connection,
        site: &str,
        link: Option<&str>,
    ) -> Option<(quinn::SendStream, quinn::RecvStream, u32, Option<String>)> {
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
                    .and_then(|name| self.live_other_link(name, claimed.as_deref()))
                    .map(|live| {
                        format!(
                            "site {site} already has a live link with {} ({live}); one link per pair of sites: \
                             remove the extra one on {site} with `causeway link remove`",
                            self.identity.site
                        )
                    }),
                other => Some(format!("expected hello, got {other:?}")),
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
            protocol::write_frame(
                &mut send,
                &Control::Welcome {
                    site: self.identity.site.clone(),
                    version: agreed.ok(),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let (cost, peer_link) = match msg {
                Control::Hello { cost, link, .. } => (cost.max(1), link),
                _ => (1, None),
            };
            Ok::<_, String>((send, recv, cost, peer_link))
        };
        match tokio::time::timeout(DIAL_TIMEOUT, exchange).await {
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
        tokio::select! {
            reason = self.handler.run(link) => reason,
            e = conn.closed() => describe_connection_error(&e),
            _ = cancel.cancelled() => "link stopped".to_string(),
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
            self.set_silent(name, conn, silent);
            self.handler.silent(name, conn, silent);
        }
    }

    /// Shows a silent link as `down` (and back as `up`), if `conn` is still its connection.
    fn set_silent(&self, name: &str, conn: &quinn::Connection, silent: bool) {
        {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(name) else {
                return;
            };
            if e.conn.as_ref().map(|c| c.stable_id()) != Some(conn.stable_id()) {
                return;
            }
            let (state, error) = if silent {
                (
                    LinkState::Down,
                    Some(format!(
                        "nothing heard for {}: down for routing and DNS; the connection waits up to {} (links.idle_timeout)",
                        humantime::format_duration(self.timing.down_after),
                        humantime::format_duration(self.timing.idle_timeout)
                    )),
                )
            } else {
                (LinkState::Up, None)
            };
            e.state = state;
            e.since = SystemTime::now();
            e.last_error = error;
        }
        self.notify();
    }

    /// Per-link numbers for metrics: (name, peer, up, rtt, bytes sent, bytes received).
    pub fn stats(&self) -> Vec<(String, String, bool, Option<Duration>, u64, u64)> {
        self.lock()
            .values()
            .map(|e| {
                let up = e.state == LinkState::Up;
                let conn = e.conn.as_ref().filter(|_| up);
                let stats = conn.map(|c| c.stats());
                (
                    e.record.name.clone(),
                    e.record.peer_site.clone(),
                    up,
                    conn.map(|c| c.rtt()),
                    stats.as_ref().map(|s| s.udp_tx.bytes).unwrap_or(0),
                    stats.as_ref().map(|s| s.udp_rx.bytes).unwrap_or(0),
                )
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
        for e in self.lock().values() {
            if let Some(c) = &e.conn {
                c.close(close::SHUTDOWN.into(), b"agent shutting down");
            }
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
    }
}

/// What `link list` shows for an idle duplicate link.
fn duplicate_message(record: &LinkRecord, kept: &str) -> String {
    format!(
        "idle: a second link to site {} (link {kept:?} is the one used); one link per pair of sites: \
         remove this one with: causeway link remove {}",
        record.peer_site, record.name
    )
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
    fn a_second_link_to_a_site_conflicts_in_either_direction() {
        let none = BTreeSet::new();
        let links = [
            record("london", "london", Role::Dialer, 10),
            record("rome", "rome", Role::Acceptor, 20),
        ];
        // We dial london already: another redemption of a london token is refused.
        let c = peer_conflict(&links, &none, "london").unwrap();
        assert_eq!(
            c.to_string(),
            "already linked to site london as link \"london\"; remove it first with: causeway link remove london"
        );
        // rome dials us already: redeeming a rome token (the reverse direction) is refused too.
        assert_eq!(
            peer_conflict(&links, &none, "rome"),
            Some(PeerConflict::Linked {
                site: "rome".into(),
                name: "rome".into()
            })
        );
        assert_eq!(peer_conflict(&links, &none, "paris"), None);
        // A redemption in flight holds the site.
        let pending: BTreeSet<String> = ["paris".to_string()].into();
        assert_eq!(
            peer_conflict(&links, &pending, "paris"),
            Some(PeerConflict::InProgress { site: "paris".into() })
        );
    }

    #[test]
    fn the_oldest_link_of_a_site_is_named_and_kept() {
        let links = [
            record("london-again", "london", Role::Dialer, 30),
            record("london", "london", Role::Dialer, 10),
            record("hub", "london", Role::Acceptor, 20),
            record("rome", "rome", Role::Dialer, 5),
        ];
        let c = peer_conflict(&links, &BTreeSet::new(), "london").unwrap();
        assert_eq!(
            c,
            PeerConflict::Linked {
                site: "london".into(),
                name: "london".into()
            }
        );
        let dups = duplicates(&links);
        assert_eq!(dups.len(), 2, "{dups:?}");
        assert_eq!(dups["london-again"], "london");
        assert_eq!(dups["hub"], "london");
        assert!(!dups.contains_key("rome"));
        // Same creation time: the first by name wins, whatever the order in the file.
        let tie = [
            record("b", "london", Role::Dialer, 1),
            record("a", "london", Role::Dialer, 1),
        ];
        assert_eq!(
            duplicates(&tie).into_iter().collect::<Vec<_>>(),
            vec![("b".into(), "a".into())]
        );
        assert!(duplicates(&[]).is_empty());
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
