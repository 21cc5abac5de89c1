//! The link table: every link's record and what is happening to it, as a plain state machine.
//!
//! [`LinkTable`] holds no sockets, spawns no tasks and reads no clock, like quinn-proto's
//! `Connection`: the shell ([`super::Links`]) feeds it events (a record added or removed, a
//! dial attempt begun or failed, a connection up or ended, a link silent or heard again) with
//! the time they happened, and carries out the [`Action`]s it returns (start or stop a link's
//! tasks, close a connection with a reason, write `links.yaml`, replace the trusted peer
//! CAs). Queries (`list`, `name_for_peer`, `live_other_link`, …) answer from the table alone.
//! It is generic over the connection handle ([`Conn`]), so its rules (one link per pair of
//! sites, idle duplicates, only the current connection may take a link down, silence is
//! `down` but keeps the connection) are unit-tested below with plain fakes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::{LinkError, LinkRecord, LinkState, LinkStatus, Role};
use crate::protocol::close;
use crate::state::rfc3339;

/// What the table needs of a connection: an identity that outlives clones, and what
/// `link list` shows of it. Implemented for `quinn::Connection`.
pub trait Conn: Clone {
    /// Same for every clone of one connection, different between connections.
    fn id(&self) -> usize;
    /// Smoothed round-trip time.
    fn rtt(&self) -> Duration;
    /// The peer's address.
    fn remote(&self) -> SocketAddr;
    /// Whether the connection has been closed (by either side or by timeout).
    fn is_closed(&self) -> bool;
}

impl Conn for quinn::Connection {
    fn id(&self) -> usize {
        self.stable_id()
    }
    fn rtt(&self) -> Duration {
        quinn::Connection::rtt(self)
    }
    fn remote(&self) -> SocketAddr {
        self.remote_address()
    }
    fn is_closed(&self) -> bool {
        self.close_reason().is_some()
    }
}

/// What the shell must do after an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<C> {
    /// Start the dialer task of this link.
    Dial(String),
    /// Stop every task of this link (its dialer and its session), now.
    Stop(String),
    /// Close a connection with an application error code ([`close`]) and a reason the peer
    /// logs.
    Close { conn: C, code: u32, reason: &'static str },
    /// Write these records to `links.yaml` (only for a persistent table).
    Persist(Vec<LinkRecord>),
    /// Trust exactly these peer CAs: (peer site, CA PEM), one per record.
    Trust(Vec<(String, String)>),
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

/// What `link list` shows for an idle duplicate link.
fn duplicate_message(record: &LinkRecord, kept: &str) -> String {
    format!(
        "idle: a second link to site {} (link {kept:?} is the one used); one link per pair of sites: \
         remove this one with: causeway link remove {}",
        record.peer_site, record.name
    )
}

/// A link's record plus what is happening to it now.
#[derive(Debug)]
struct Entry<C> {
    /// What `links.yaml` holds for it.
    record: LinkRecord,
    /// What `link list` shows, and whether routing may use it.
    state: LinkState,
    /// When `state` last changed, for `link list`'s `since`.
    since: SystemTime,
    /// The current connection: the only one that may take the link down, and the one a
    /// newer connection replaces.
    conn: Option<C>,
    /// The current connection's extra lanes ([`super::lanes`]) that are up: they live and
    /// die with it.
    lanes: Vec<C>,
    /// Why the last attempt failed or the last connection ended (shown while not up).
    last_error: Option<String>,
    /// For an acceptor: the dialer's link identity (from its hello) of the current
    /// connection, so a different link of the same site cannot replace it while it lives.
    peer_link: Option<String>,
    /// Set when this record duplicates an older link with the same peer site (the name of
    /// that link): it stays idle, neither dialing nor accepting.
    duplicate_of: Option<String>,
}

impl<C> Entry<C> {
    fn new(record: LinkRecord, now: SystemTime) -> Entry<C> {
        let state = match record.role {
            Role::Dialer => LinkState::Connecting,
            Role::Acceptor => LinkState::Down,
        };
        Entry {
            record,
            state,
            since: now,
            conn: None,
            lanes: Vec::new(),
            last_error: None,
            peer_link: None,
            duplicate_of: None,
        }
    }

    fn set_state(&mut self, state: LinkState, now: SystemTime) {
        if self.state != state {
            self.since = now;
        }
        self.state = state;
    }
}

/// The links of one agent, by name. See the module docs.
#[derive(Debug)]
pub struct LinkTable<C> {
    /// Records and live state by link name.
    entries: BTreeMap<String, Entry<C>>,
    /// Peer sites with a redemption in flight (either direction), so two redemptions cannot
    /// both pass the one-link-per-site check before either records its link.
    pending: BTreeSet<String>,
    /// False for a sidecar, whose one link comes from its configuration and whose state
    /// directory may be read-only: no [`Action::Persist`].
    persistent: bool,
    /// `links.down_after` and `links.idle_timeout`, for the message a silent link shows.
    timing: (Duration, Duration),
}

impl<C: Conn> LinkTable<C> {
    /// A table of `records` (from `links.yaml`, or a sidecar's one configured link) at `now`:
    /// duplicates of an older link with the same site stay idle with a message saying so;
    /// every other dialer is dialed (the returned actions).
    pub fn new(
        records: Vec<LinkRecord>,
        persistent: bool,
        down_after: Duration,
        idle_timeout: Duration,
        now: SystemTime,
    ) -> (LinkTable<C>, Vec<Action<C>>) {
        let dups = duplicates(&records);
        let mut entries = BTreeMap::new();
        let mut actions = Vec::new();
        for record in records {
            let mut e = Entry::new(record, now);
            if let Some(kept) = dups.get(&e.record.name) {
                warn!(
                    link = %e.record.name, peer = %e.record.peer_site, kept = %kept,
                    "second link to the same site left idle; remove it with: causeway link remove {}",
                    e.record.name
                );
                e.state = LinkState::Down;
                e.last_error = Some(duplicate_message(&e.record, kept));
                e.duplicate_of = Some(kept.clone());
            } else if e.record.role == Role::Dialer {
                actions.push(Action::Dial(e.record.name.clone()));
            }
            entries.insert(e.record.name.clone(), e);
        }
        let table = LinkTable {
            entries,
            pending: BTreeSet::new(),
            persistent,
            timing: (down_after, idle_timeout),
        };
        actions.insert(0, table.trust());
        (table, actions)
    }

    /// The peer CAs to trust: one per record.
    fn trust(&self) -> Action<C> {
        Action::Trust(
            self.entries
                .values()
                .map(|e| (e.record.peer_site.clone(), e.record.peer_ca.clone()))
                .collect(),
        )
    }

    /// Writing and trusting the records after a change of them.
    fn records_changed(&self, actions: &mut Vec<Action<C>>) {
        if self.persistent {
            actions.push(Action::Persist(
                self.entries.values().map(|e| e.record.clone()).collect(),
            ));
        }
        actions.push(self.trust());
    }

    /// Whether a link of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Holds `site` for one redemption: refused ([`PeerConflict`]) while a link with it
    /// exists, in either direction, or another redemption with it is in flight. Undo with
    /// [`LinkTable::release_peer`].
    pub fn reserve_peer(&mut self, site: &str) -> Result<(), PeerConflict> {
        if let Some(conflict) = peer_conflict(self.entries.values().map(|e| &e.record), &self.pending, site) {
            return Err(conflict);
        }
        self.pending.insert(site.to_string());
        Ok(())
    }

    /// Ends the redemption that reserved `site`.
    pub fn release_peer(&mut self, site: &str) {
        self.pending.remove(site);
    }

    /// Adds (or, for the same name, peer CA and role, replaces) a link record. Errors:
    /// [`LinkError::Exists`] for a name taken by another link, [`PeerConflict::Linked`] when
    /// another link already has this peer site (one link per pair of sites).
    pub fn add(&mut self, record: LinkRecord, now: SystemTime) -> Result<Vec<Action<C>>, LinkError> {
        let name = record.name.clone();
        let others = self
            .entries
            .values()
            .filter(|e| e.record.name != name)
            .map(|e| &e.record);
        if let Some(conflict) = peer_conflict(others, &BTreeSet::new(), &record.peer_site) {
            return Err(conflict.into());
        }
        let mut actions = Vec::new();
        if let Some(old) = self.entries.get(&name) {
            if old.record.peer_ca != record.peer_ca || old.record.role != record.role {
                return Err(LinkError::Exists(name));
            }
            actions.push(Action::Stop(name.clone()));
            if let Some(conn) = &old.conn {
                actions.push(Action::Close {
                    conn: conn.clone(),
                    code: close::REPLACED,
                    reason: "link re-created",
                });
            }
        }
        let dialer = record.role == Role::Dialer;
        self.entries.insert(name.clone(), Entry::new(record, now));
        self.records_changed(&mut actions);
        if dialer {
            actions.push(Action::Dial(name));
        }
        Ok(actions)
    }

    /// Removes a link: its record and trust go, its tasks stop and its connection is closed
    /// with a reason the peer logs; the oldest idle duplicate of it (if any) takes over.
    /// Returns the removed record. Errors: [`LinkError::NotFound`].
    pub fn remove(&mut self, name: &str) -> Result<(LinkRecord, Vec<Action<C>>), LinkError> {
        let entry = self
            .entries
            .remove(name)
            .ok_or_else(|| LinkError::NotFound(name.to_string()))?;
        let mut actions = Vec::new();
        self.records_changed(&mut actions);
        actions.push(Action::Stop(name.to_string()));
        if let Some(conn) = entry.conn {
            actions.push(Action::Close {
                conn,
                code: close::REMOVED,
                reason: "link removed",
            });
        }
        info!(link = %name, peer = %entry.record.peer_site, "link removed; peer trust revoked");
        self.reactivate_duplicates(name, &mut actions);
        Ok((entry.record, actions))
    }

    /// After link `removed` is gone, the oldest idle duplicate of it (if any) becomes the
    /// site's link: it starts dialing, or accepting.
    fn reactivate_duplicates(&mut self, removed: &str, actions: &mut Vec<Action<C>>) {
        let idle: Vec<LinkRecord> = self
            .entries
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
            if let Some(e) = self.entries.get_mut(&r.name) {
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
        if self.entries.get(&next).is_some_and(|e| e.record.role == Role::Dialer) {
            actions.push(Action::Dial(next));
        }
    }

    /// The dialer of link `name` begins an attempt (`error` None) or saw one fail (`error`
    /// Some): the link is `connecting`.
    pub fn dialing(&mut self, name: &str, error: Option<String>, now: SystemTime) {
        let Some(e) = self.entries.get_mut(name) else { return };
        e.conn = None;
        e.set_state(LinkState::Connecting, now);
        if error.is_some() {
            e.last_error = error;
        }
    }

    /// Link `name` is up on `conn` (after the hello exchange); `peer_link` is the dialer's
    /// link identity when we accepted. A previous, different connection is closed as
    /// replaced.
    pub fn up(&mut self, name: &str, conn: C, peer_link: Option<String>, now: SystemTime) -> Vec<Action<C>> {
        let Some(e) = self.entries.get_mut(name) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        if let Some(old) = e.conn.take()
            && old.id() != conn.id()
        {
            actions.push(Action::Close {
                conn: old,
                code: close::REPLACED,
                reason: "replaced by a newer connection",
            });
            actions.extend(e.lanes.drain(..).map(|lane| Action::Close {
                conn: lane,
                code: close::REPLACED,
                reason: "the link's first connection was replaced",
            }));
        }
        e.conn = Some(conn);
        e.peer_link = peer_link;
        e.set_state(LinkState::Up, now);
        actions
    }

    /// Link `name`'s connection `conn` ended because of `reason`; the link becomes `next`
    /// (`connecting` for a dialer, which retries; `down` for an acceptor). Ignored unless
    /// `conn` is the link's current connection or it has none: an old connection ending
    /// late must not take down its replacement.
    ///
    /// Returns the connection's extra lanes, which end with it: the shell closes them.
    pub fn ended(&mut self, name: &str, conn: &C, next: LinkState, reason: String, now: SystemTime) -> Vec<C> {
        let Some(e) = self.entries.get_mut(name) else {
            return Vec::new();
        };
        if e.conn.as_ref().is_some_and(|cur| cur.id() != conn.id()) {
            return Vec::new();
        }
        e.conn = None;
        e.set_state(next, now);
        e.last_error = Some(reason);
        std::mem::take(&mut e.lanes)
    }

    /// Whether an extra lane claiming to belong to the dialer link `claimed` may join link
    /// `name` now: the link must be up on a live first connection of that same dialer link
    /// (an acceptor) or of ours (a dialer, `claimed` = `None`). Returns that first
    /// connection, or why not.
    pub fn lane_first(&self, name: &str, claimed: Option<&str>) -> Result<C, String> {
        let e = self.entries.get(name).ok_or_else(|| format!("no link {name:?}"))?;
        let first = e
            .conn
            .as_ref()
            .filter(|c| !c.is_closed())
            .ok_or_else(|| format!("link {name:?} has no live first connection for a lane to join"))?;
        if e.peer_link.as_deref() != claimed {
            return Err(format!(
                "the lane claims link {:?} but link {name:?} is up with {:?}",
                claimed.unwrap_or("-"),
                e.peer_link.as_deref().unwrap_or("-")
            ));
        }
        Ok(first.clone())
    }

    /// An extra lane `lane` of link `name`'s first connection `first` is up. False (the
    /// lane should close) when `first` is no longer the link's connection.
    pub fn lane_up(&mut self, name: &str, first: &C, lane: C) -> bool {
        let Some(e) = self.entries.get_mut(name) else {
            return false;
        };
        if e.conn.as_ref().map(|c| c.id()) != Some(first.id()) {
            return false;
        }
        if !e.lanes.iter().any(|l| l.id() == lane.id()) {
            e.lanes.push(lane);
        }
        true
    }

    /// An extra lane of link `name` ended.
    pub fn lane_ended(&mut self, name: &str, lane: &C) {
        if let Some(e) = self.entries.get_mut(name) {
            e.lanes.retain(|l| l.id() != lane.id());
        }
    }

    /// The extra lanes of link `name` that are up (for metrics: their bytes count too).
    pub fn lanes(&self, name: &str) -> &[C] {
        self.entries.get(name).map_or(&[], |e| e.lanes.as_slice())
    }

    /// Link `name`'s connection `conn` fell silent for `links.down_after` (`silent`), or was
    /// heard again: shown `down` with the reason (the connection is kept), or `up`. Returns
    /// whether it applied (`conn` is still the link's connection).
    pub fn silent(&mut self, name: &str, conn: &C, silent: bool, now: SystemTime) -> bool {
        let (down_after, idle_timeout) = self.timing;
        let Some(e) = self.entries.get_mut(name) else {
            return false;
        };
        if e.conn.as_ref().map(|c| c.id()) != Some(conn.id()) {
            return false;
        }
        if silent {
            e.state = LinkState::Down;
            e.last_error = Some(format!(
                "nothing heard for {}: down for routing and DNS; the connection waits up to {} (links.idle_timeout)",
                humantime::format_duration(down_after),
                humantime::format_duration(idle_timeout)
            ));
        } else {
            e.state = LinkState::Up;
            e.last_error = None;
        }
        e.since = now;
        true
    }

    /// The name of the (non-duplicate) link whose peer is this site, preferring acceptor
    /// records: the link an incoming connection from `site` belongs to.
    pub fn name_for_peer(&self, site: &str) -> Option<String> {
        self.entries
            .values()
            .filter(|e| e.record.peer_site == site && e.duplicate_of.is_none())
            .min_by_key(|e| e.record.role != Role::Acceptor)
            .map(|e| e.record.name.clone())
    }

    /// A fresh name for an acceptor record of `site` (the site id, or `site-2`, …).
    pub fn acceptor_name(&self, site: &str, peer_ca: &str) -> String {
        let free = |n: &str| {
            self.entries
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

    /// Whether link `name` has a live connection from a dialer link other than `claimed`
    /// (both known): then that other link must not replace it. Returns the live one's
    /// identity.
    pub fn live_other_link(&self, name: &str, claimed: Option<&str>) -> Option<String> {
        let e = self.entries.get(name)?;
        let live = e.state == LinkState::Up && e.conn.as_ref().is_some_and(|c| !c.is_closed());
        let current = e.peer_link.as_deref()?;
        (live && claimed.is_some_and(|c| c != current)).then(|| current.to_string())
    }

    /// The record of link `name`.
    pub fn record(&self, name: &str) -> Option<&LinkRecord> {
        self.entries.get(name).map(|e| &e.record)
    }

    /// Every link with its state (`link list`).
    pub fn list(&self) -> Vec<LinkStatus> {
        self.entries
            .values()
            .map(|e| {
                let up = e.state == LinkState::Up;
                let conn = e.conn.as_ref().filter(|_| up);
                LinkStatus {
                    name: e.record.name.clone(),
                    peer_site: e.record.peer_site.clone(),
                    state: e.state,
                    rtt_ms: conn.map(|c| (c.rtt().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
                    cost: e.record.cost,
                    since: rfc3339::format(e.since),
                    role: e.record.role,
                    remote: match conn {
                        Some(c) => Some(c.remote().to_string()),
                        None if e.record.role == Role::Dialer => Some(e.record.addresses.join(",")),
                        None => None,
                    },
                    last_error: if up { None } else { e.last_error.clone() },
                    lanes: conn.map(|_| 1 + e.lanes.len()),
                }
            })
            .collect()
    }

    /// Links that are up with their connection: (name, peer site, connection).
    pub fn up_links(&self) -> impl Iterator<Item = (&str, &str, &C)> {
        self.entries
            .values()
            .filter(|e| e.state == LinkState::Up)
            .filter_map(|e| {
                e.conn
                    .as_ref()
                    .map(|c| (e.record.name.as_str(), e.record.peer_site.as_str(), c))
            })
    }

    /// Every link with its current connection, up or not: for metrics, which list down links
    /// too. (name, peer site, connection while up.)
    pub fn each(&self) -> impl Iterator<Item = (&str, &str, Option<&C>)> {
        self.entries.values().map(|e| {
            (
                e.record.name.as_str(),
                e.record.peer_site.as_str(),
                e.conn.as_ref().filter(|_| e.state == LinkState::Up),
            )
        })
    }

    /// Every current connection (for closing them all at shutdown).
    pub fn conns(&self) -> impl Iterator<Item = &C> {
        self.entries
            .values()
            .flat_map(|e| e.conn.as_ref().into_iter().chain(e.lanes.iter()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake connection: an id, a fixed RTT and address, and a closed flag.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Fake {
        id: usize,
        closed: bool,
    }

    impl Conn for Fake {
        fn id(&self) -> usize {
            self.id
        }
        fn rtt(&self) -> Duration {
            Duration::from_micros(1500)
        }
        fn remote(&self) -> SocketAddr {
            SocketAddr::from(([192, 0, 2, 1], 7400))
        }
        fn is_closed(&self) -> bool {
            self.closed
        }
    }

    fn conn(id: usize) -> Fake {
        Fake { id, closed: false }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn record(name: &str, peer: &str, role: Role, created_secs: u64) -> LinkRecord {
        LinkRecord {
            name: name.into(),
            peer_site: peer.into(),
            role,
            addresses: vec![format!("{peer}.example:7400")],
            peer_ca: format!("ca of {peer}"),
            cost: 1,
            created: at(created_secs),
        }
    }

    fn table(records: Vec<LinkRecord>) -> (LinkTable<Fake>, Vec<Action<Fake>>) {
        LinkTable::new(records, true, Duration::from_secs(3), Duration::from_secs(30), at(100))
    }

    fn state(t: &LinkTable<Fake>, name: &str) -> LinkStatus {
        t.list().into_iter().find(|s| s.name == name).unwrap()
    }

    fn dials(actions: &[Action<Fake>]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dial(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
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
    fn loading_dials_every_dialer_but_leaves_duplicates_idle_and_trusts_every_record() {
        let (t, actions) = table(vec![
            record("london", "london", Role::Dialer, 10),
            record("london-again", "london", Role::Dialer, 30),
            record("rome", "rome", Role::Acceptor, 20),
        ]);
        assert_eq!(dials(&actions), ["london"]);
        assert!(matches!(&actions[0], Action::Trust(cas) if cas.len() == 3));
        assert_eq!(state(&t, "london").state, LinkState::Connecting);
        assert_eq!(state(&t, "rome").state, LinkState::Down);
        let dup = state(&t, "london-again");
        assert_eq!(dup.state, LinkState::Down);
        assert!(dup.last_error.unwrap().contains("causeway link remove london-again"));
        // An incoming connection from london belongs to the kept link.
        assert_eq!(t.name_for_peer("london").as_deref(), Some("london"));
    }

    #[test]
    fn removing_the_kept_link_lets_the_oldest_duplicate_take_over() {
        let (mut t, _) = table(vec![
            record("london", "london", Role::Dialer, 10),
            record("london-2", "london", Role::Dialer, 20),
            record("london-3", "london", Role::Dialer, 30),
        ]);
        t.up("london", conn(1), None, at(101));
        let (removed, actions) = t.remove("london").unwrap();
        assert_eq!(removed.name, "london");
        assert!(actions.contains(&Action::Stop("london".into())));
        assert!(actions.contains(&Action::Close {
            conn: conn(1),
            code: close::REMOVED,
            reason: "link removed"
        }));
        assert!(matches!(&actions[0], Action::Persist(r) if r.len() == 2));
        assert_eq!(dials(&actions), ["london-2"]);
        assert_eq!(state(&t, "london-2").last_error, None);
        assert!(
            state(&t, "london-3")
                .last_error
                .unwrap()
                .contains("\"london-2\" is the one used")
        );
        assert!(matches!(t.remove("london"), Err(LinkError::NotFound(_))));
    }

    #[test]
    fn add_refuses_a_second_site_link_and_a_taken_name_but_recreates_the_same_link() {
        let (mut t, _) = table(vec![record("london", "london", Role::Dialer, 10)]);
        let err = t.add(record("again", "london", Role::Dialer, 50), at(101)).unwrap_err();
        assert!(err.to_string().contains("already linked to site london"), "{err}");
        let mut other_ca = record("london", "london", Role::Dialer, 50);
        other_ca.peer_ca = "another CA".into();
        assert!(matches!(t.add(other_ca, at(101)), Err(LinkError::Exists(_))));
        // The same link again (a re-redeemed token of the same site): replaced, redialed.
        t.up("london", conn(1), None, at(101));
        let actions = t.add(record("london", "london", Role::Dialer, 50), at(102)).unwrap();
        assert_eq!(actions[0], Action::Stop("london".into()));
        assert!(matches!(&actions[1], Action::Close { conn, code, .. } if conn.id == 1 && *code == close::REPLACED));
        assert_eq!(dials(&actions), ["london"]);
        assert_eq!(state(&t, "london").state, LinkState::Connecting);
    }

    #[test]
    fn a_sidecar_table_never_persists() {
        let (mut t, _) = LinkTable::<Fake>::new(
            vec![record("gateway", "paris", Role::Dialer, 1)],
            false,
            Duration::from_secs(3),
            Duration::from_secs(30),
            at(1),
        );
        let actions = t.add(record("other", "rome", Role::Acceptor, 2), at(2)).unwrap();
        assert!(!actions.iter().any(|a| matches!(a, Action::Persist(_))));
        assert!(actions.iter().any(|a| matches!(a, Action::Trust(_))));
    }

    #[test]
    fn reservations_hold_a_site_until_released() {
        let (mut t, _) = table(vec![record("london", "london", Role::Dialer, 10)]);
        assert!(matches!(t.reserve_peer("london"), Err(PeerConflict::Linked { .. })));
        t.reserve_peer("paris").unwrap();
        assert_eq!(
            t.reserve_peer("paris"),
            Err(PeerConflict::InProgress { site: "paris".into() })
        );
        t.release_peer("paris");
        t.reserve_peer("paris").unwrap();
    }

    #[test]
    fn only_the_current_connection_takes_a_link_down_and_a_newer_one_replaces_it() {
        let (mut t, _) = table(vec![record("rome", "rome", Role::Acceptor, 10)]);
        assert!(t.up("rome", conn(1), Some("rome@a".into()), at(101)).is_empty());
        let up = state(&t, "rome");
        assert_eq!(up.state, LinkState::Up);
        assert_eq!(up.rtt_ms, Some(1.5));
        assert_eq!(up.remote.as_deref(), Some("192.0.2.1:7400"));
        // A reconnection replaces the old connection, which is closed.
        let actions = t.up("rome", conn(2), Some("rome@a".into()), at(102));
        assert_eq!(
            actions,
            [Action::Close {
                conn: conn(1),
                code: close::REPLACED,
                reason: "replaced by a newer connection"
            }]
        );
        // The old connection's session ends late: it must not take the link down.
        t.ended("rome", &conn(1), LinkState::Down, "closed".into(), at(103));
        assert_eq!(state(&t, "rome").state, LinkState::Up);
        t.ended("rome", &conn(2), LinkState::Down, "peer went away".into(), at(104));
        let down = state(&t, "rome");
        assert_eq!(down.state, LinkState::Down);
        assert_eq!(down.last_error.as_deref(), Some("peer went away"));
        assert_eq!(down.since, rfc3339::format(at(104)));
        assert_eq!(down.remote, None);
    }

    #[test]
    fn a_live_link_of_a_site_cannot_be_replaced_by_another_link_of_it() {
        let (mut t, _) = table(vec![record("rome", "rome", Role::Acceptor, 10)]);
        t.up("rome", conn(1), Some("rome@a".into()), at(101));
        assert_eq!(t.live_other_link("rome", Some("rome@b")).as_deref(), Some("rome@a"));
        assert_eq!(t.live_other_link("rome", Some("rome@a")), None);
        assert_eq!(t.live_other_link("rome", None), None, "old dialers without an identity");
        // Once its connection is closed, the other link may take over.
        t.up("rome", Fake { id: 1, closed: true }, Some("rome@a".into()), at(102));
        assert_eq!(t.live_other_link("rome", Some("rome@b")), None);
    }

    #[test]
    fn silence_shows_down_but_keeps_the_connection_and_hearing_again_restores_it() {
        let (mut t, _) = table(vec![record("london", "london", Role::Dialer, 10)]);
        t.up("london", conn(7), None, at(101));
        // Another connection's liveness is not this link's.
        assert!(!t.silent("london", &conn(8), true, at(104)));
        assert!(t.silent("london", &conn(7), true, at(104)));
        let s = state(&t, "london");
        assert_eq!(s.state, LinkState::Down);
        assert!(s.last_error.unwrap().contains("nothing heard for 3s"));
        assert_eq!(t.up_links().count(), 0, "out of routing");
        assert_eq!(t.conns().count(), 1, "but its connection is kept");
        assert!(t.silent("london", &conn(7), false, at(106)));
        assert_eq!(state(&t, "london").state, LinkState::Up);
        assert_eq!(
            t.up_links().map(|(n, _, c)| (n, c.id)).collect::<Vec<_>>(),
            [("london", 7)]
        );
    }

    #[test]
    fn a_dialer_retrying_shows_connecting_with_the_last_error() {
        let (mut t, _) = table(vec![record("london", "london", Role::Dialer, 10)]);
        t.dialing("london", Some("london.example:7400: timed out".into()), at(101));
        let s = state(&t, "london");
        assert_eq!(s.state, LinkState::Connecting);
        assert_eq!(s.last_error.as_deref(), Some("london.example:7400: timed out"));
        assert_eq!(s.remote.as_deref(), Some("london.example:7400"));
        // A new attempt keeps the last error until it succeeds.
        t.dialing("london", None, at(102));
        assert!(state(&t, "london").last_error.is_some());
        t.up("london", conn(1), None, at(103));
        assert_eq!(state(&t, "london").last_error, None);
    }

    #[test]
    fn acceptor_names_avoid_other_links() {
        let (t, _) = table(vec![
            record("rome", "rome", Role::Dialer, 10),
            record("rome-2", "other", Role::Acceptor, 10),
        ]);
        assert_eq!(t.acceptor_name("rome", "ca of rome"), "rome-3");
        assert_eq!(t.acceptor_name("paris", "ca of paris"), "paris");
        let (t, _) = table(vec![record("rome", "rome", Role::Acceptor, 10)]);
        assert_eq!(t.acceptor_name("rome", "ca of rome"), "rome", "the same link again");
    }

    /// Churn: many rounds of connections coming and going, some ending out of order, and
    /// silence in between. The table always ends with the newest connection, never closes
    /// it, and never has a link up without a connection.
    #[test]
    fn link_churn_keeps_the_newest_connection() {
        let (mut t, _) = table(vec![
            record("london", "london", Role::Dialer, 10),
            record("rome", "rome", Role::Acceptor, 20),
        ]);
        let mut next_id = 0;
        let mut current: BTreeMap<&str, usize> = BTreeMap::new();
        for round in 0..50u64 {
            for name in ["london", "rome"] {
                next_id += 1;
                let old = current.insert(name, next_id);
                let actions = t.up(name, conn(next_id), None, at(200 + round));
                for a in &actions {
                    if let Action::Close { conn, .. } = a {
                        assert_eq!(Some(conn.id), old, "only the replaced connection is closed");
                    }
                }
                if let Some(old) = old {
                    // The replaced connection ends late, out of order.
                    let next = if name == "london" {
                        LinkState::Connecting
                    } else {
                        LinkState::Down
                    };
                    t.ended(name, &conn(old), next, "replaced".into(), at(200 + round));
                }
                if round % 7 == 0 {
                    t.silent(name, &conn(next_id), true, at(200 + round));
                    t.silent(name, &conn(next_id), false, at(200 + round));
                }
                assert_eq!(state(&t, name).state, LinkState::Up, "round {round} {name}");
            }
            for (name, _, c) in t.up_links() {
                assert_eq!(Some(&c.id), current.get(name));
            }
        }
    }

    #[test]
    fn lanes_join_only_the_live_first_connection_of_the_same_dialer_link_and_end_with_it() {
        let (mut t, _) = table(vec![record("rome", "rome", Role::Acceptor, 10)]);
        // No first connection yet: no lane may join.
        assert!(t.lane_first("rome", Some("rome@a")).is_err());
        t.up("rome", conn(1), Some("rome@a".into()), at(200));
        assert_eq!(t.lane_first("rome", Some("rome@a")), Ok(conn(1)));
        // Another dialer link of the site, or none named, cannot add lanes to this one.
        assert!(t.lane_first("rome", Some("rome@b")).unwrap_err().contains("rome@b"));
        assert!(t.lane_first("rome", None).is_err());
        assert!(t.lane_first("paris", Some("rome@a")).is_err());

        assert!(t.lane_up("rome", &conn(1), conn(2)));
        assert!(t.lane_up("rome", &conn(1), conn(3)));
        assert!(t.lane_up("rome", &conn(1), conn(3)), "the same lane twice counts once");
        assert!(
            !t.lane_up("rome", &conn(9), conn(4)),
            "a lane of a connection that is not current"
        );
        assert_eq!(state(&t, "rome").lanes, Some(3));
        assert_eq!(t.lanes("rome").len(), 2);
        assert_eq!(t.conns().count(), 3, "shutdown closes lanes too");
        t.lane_ended("rome", &conn(2));
        assert_eq!(state(&t, "rome").lanes, Some(2));

        // A reconnection of the same dialer link replaces the first connection and closes
        // its lanes.
        let actions = t.up("rome", conn(5), Some("rome@a".into()), at(300));
        let closed: Vec<usize> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Close { conn, .. } => Some(conn.id),
                _ => None,
            })
            .collect();
        assert_eq!(closed, vec![1, 3]);
        assert!(t.lanes("rome").is_empty());

        // The first connection ends: its lanes come back to be closed, and none may join.
        assert!(t.lane_up("rome", &conn(5), conn(6)));
        let lanes = t.ended("rome", &conn(5), LinkState::Down, "gone".into(), at(400));
        assert_eq!(lanes, vec![conn(6)]);
        assert_eq!(state(&t, "rome").lanes, None, "no lanes while down");
        assert!(t.lane_first("rome", Some("rome@a")).is_err());
    }
}
