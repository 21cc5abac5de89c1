//! A bounded table of client connections that makes room by evicting the idlest.
//!
//! The metrics port and the admin socket both serve short request/response exchanges to
//! clients they cannot trust to be quick. Bounding them with a semaphore taken *before*
//! accepting (as both once did) lets a handful of clients that connect and send nothing hold
//! every slot while the Kubernetes probe or the operator's `causeway status` waits in the
//! kernel's queue until it times out. Here every connection is accepted at once and takes a
//! slot; when the table is full, the connection that has been waiting for its client longest
//! (idle, not being answered) is evicted to admit the new one. An idle or slow client can
//! therefore delay nobody: a new client always gets in, and only the stalest waiter pays.
//! When every slot is busy answering (bounded work), the new connection is refused instead.
//!
//! The choice of whom to evict is the pure [`idlest`]; [`ConnTable`] holds the slots.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// What a connection is doing, for the eviction choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for its client (a request, or the client's close): evictable.
    Idle,
    /// Being answered: its work is bounded, so it is left to finish.
    Busy,
}

/// Which connection to evict: among the idle ones, the one idle since the earliest instant
/// (ties: the oldest id); `None` when every connection is busy.
pub fn idlest(entries: impl IntoIterator<Item = (u64, Phase, Instant)>) -> Option<u64> {
    entries
        .into_iter()
        .filter(|(_, phase, _)| *phase == Phase::Idle)
        .min_by_key(|(id, _, since)| (*since, *id))
        .map(|(id, _, _)| id)
}

struct Entry {
    phase: Phase,
    /// When the connection last became idle (or was admitted).
    since: Instant,
    /// Cancelled to evict it; its task drops the connection.
    evict: CancellationToken,
}

#[derive(Default)]
struct Table {
    next: u64,
    entries: BTreeMap<u64, Entry>,
}

/// At most `max` connections; see the module doc.
pub struct ConnTable {
    max: usize,
    table: Mutex<Table>,
}

/// A connection's place in the table, given back when dropped.
pub struct Slot {
    table: Arc<ConnTable>,
    id: u64,
    evicted: CancellationToken,
}

impl ConnTable {
    /// A table of at most `max` connections (at least one).
    pub fn new(max: usize) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max: max.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Admits a new connection as idle, evicting the idlest one if the table is full.
    /// `None` when the table is full of busy connections: refuse the new one.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let now = Instant::now();
        let mut table = self.lock();
        if table.entries.len() >= self.max {
            let victim = idlest(table.entries.iter().map(|(id, e)| (*id, e.phase, e.since)))?;
            if let Some(entry) = table.entries.remove(&victim) {
                entry.evict.cancel();
            }
        }
        let id = table.next;
        table.next += 1;
        let evicted = CancellationToken::new();
        table.entries.insert(
            id,
            Entry {
                phase: Phase::Idle,
                since: now,
                evict: evicted.clone(),
            },
        );
        Some(Slot {
            table: Arc::clone(self),
            id,
            evicted,
        })
    }

    /// Connections in the table now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Slot {
    /// The connection is being answered: not evictable until [`Slot::idle`].
    pub fn busy(&self) {
        self.set(Phase::Busy);
    }

    /// The connection waits for its client again.
    pub fn idle(&self) {
        self.set(Phase::Idle);
    }

    fn set(&self, phase: Phase) {
        if let Some(entry) = self.table.lock().entries.get_mut(&self.id) {
            entry.phase = phase;
            entry.since = Instant::now();
        }
    }

    /// Cancelled when this connection is evicted to make room: drop it then.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().entries.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_idle_connection_waiting_longest_is_chosen() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            idlest([
                (1, Phase::Idle, at(20)),
                (2, Phase::Idle, at(10)),
                (3, Phase::Busy, at(0))
            ]),
            Some(2)
        );
        // Ties go to the older connection.
        assert_eq!(idlest([(5, Phase::Idle, at(10)), (4, Phase::Idle, at(10))]), Some(4));
    }

    #[test]
    fn busy_connections_are_never_chosen() {
        let now = Instant::now();
        assert_eq!(idlest([(1, Phase::Busy, now), (2, Phase::Busy, now)]), None);
        assert_eq!(idlest(Vec::new()), None);
    }

    #[test]
    fn a_full_table_evicts_the_idlest_and_refuses_when_all_are_busy() {
        let table = ConnTable::new(2);
        let a = table.admit().expect("room");
        std::thread::sleep(Duration::from_millis(2));
        let b = table.admit().expect("room");
        let c = table.admit().expect("a is evicted for c");
        assert!(a.evicted().is_cancelled());
        assert!(!b.evicted().is_cancelled());
        assert_eq!(table.len(), 2);
        drop(a); // its task ends: nothing left to remove
        assert_eq!(table.len(), 2);

        b.busy();
        c.busy();
        assert!(table.admit().is_none(), "every slot is answering");
        c.idle();
        let d = table.admit().expect("c is idle again");
        assert!(c.evicted().is_cancelled());
        drop((b, d));
        assert!(table.is_empty());
    }
}
