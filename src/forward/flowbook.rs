//! The UDP flow budget: which flows an agent holds, who holds them, and whom to evict.
//!
//! UDP has no close, so a flow table fills with whatever clients start; without a rule one
//! client sending from thousands of source ports would take every slot and every other
//! client's new flow would be dropped until the flood's flows went idle (`limits.udp_idle`).
//! [`FlowBook`] is that rule, as a plain value (no sockets; times are passed in):
//!
//! * the book holds at most `limits.max_flows` flows, so memory stays bounded;
//! * a *local client* (one source address) holds at most its [`share`] of them; at its share,
//!   its least recently used flow is evicted to admit its new one;
//! * when the book is full, the least recently used flow of the holder with the most flows
//!   is evicted, so a holder with few flows is never refused.
//!
//! Flows that arrive over a link (relayed, or delivered to our endpoints) are held by the
//! link they came from, without a share: a link carries many clients of another site, which
//! only the full book limits. The async layer (`udp.rs`) asks the book before it creates a
//! flow and drops whatever the book evicts.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How often one holder's evictions are logged, at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The most flows one local client may hold when the agent carries `max_flows`:
/// `max(64, max_flows / 8)`, and never more than `max_flows`.
pub fn share(max_flows: usize) -> usize {
    (max_flows / 8).max(64).min(max_flows.max(1))
}

/// Why a flow was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its client was at its share and opened another flow.
    ClientShare,
    /// The book was full; its holder held the most flows.
    TableFull,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ClientShare => "client_share",
            Reason::TableFull => "table_full",
        }
    }

    /// The `reason` label of `causeway_udp_flows_evicted_total`.
    pub fn label(self) -> crate::metrics::EvictReason {
        match self {
            Reason::ClientShare => crate::metrics::EvictReason::ClientShare,
            Reason::TableFull => crate::metrics::EvictReason::TableFull,
        }
    }
}

/// A flow the book gave up to admit another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction<F, K> {
    /// The evicted flow.
    pub flow: F,
    /// Who held it.
    pub holder: K,
    /// Why it went.
    pub reason: Reason,
    /// How many flows the holder still has (after the eviction, before any admission).
    pub held: usize,
    /// Whether to log it: true at most once per holder per [`LOG_EVERY`].
    pub log: bool,
}

/// One flow's place in the book.
#[derive(Debug, Clone, Copy)]
struct Slot<K> {
    holder: K,
    /// Its position in the holder's LRU order (a value of `FlowBook::clock`).
    seq: u64,
    /// When it last carried a datagram.
    last: Instant,
}

/// One holder's flows.
#[derive(Debug)]
struct Holder<F> {
    /// Flows by `seq`: the first is the least recently used.
    lru: BTreeMap<u64, F>,
    /// When an eviction of this holder's flows was last logged.
    logged: Option<Instant>,
}

/// The flows of one agent by holder, in least-recently-used order. `F` names a flow, `K` a
/// holder (a client address, or a link).
#[derive(Debug)]
pub struct FlowBook<F, K> {
    /// Most flows held at once (`limits.max_flows`, at least 1).
    capacity: usize,
    /// Most flows one share-limited holder may hold ([`share`]).
    share: usize,
    /// Increases with every admission and use: orders flows by last use.
    clock: u64,
    flows: HashMap<F, Slot<K>>,
    holders: HashMap<K, Holder<F>>,
}

impl<F: Copy + Eq + Hash, K: Copy + Eq + Hash> FlowBook<F, K> {
    /// A book for at most `max_flows` flows (at least 1), with the per-client share derived
    /// from it ([`share`]).
    pub fn new(max_flows: usize) -> Self {
        FlowBook {
            capacity: max_flows.max(1),
            share: share(max_flows),
            clock: 0,
            flows: HashMap::new(),
            holders: HashMap::new(),
        }
    }

    /// Flows held.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is held.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Flows held by `holder`.
    pub fn held_by(&self, holder: &K) -> usize {
        self.holders.get(holder).map_or(0, |h| h.lru.len())
    }

    /// Whether `flow` is held.
    pub fn contains(&self, flow: &F) -> bool {
        self.flows.contains_key(flow)
    }

    /// Marks `flow` used at `now` (a datagram either way); false if it is not held.
    pub fn touch(&mut self, flow: &F, now: Instant) -> bool {
        let Some(slot) = self.flows.get_mut(flow) else {
            return false;
        };
        self.clock += 1;
        if let Some(h) = self.holders.get_mut(&slot.holder) {
            h.lru.remove(&slot.seq);
            h.lru.insert(self.clock, *flow);
        }
        slot.seq = self.clock;
        slot.last = now;
        true
    }

    /// Admits a new `flow` of `holder` at `now` (only touches it if already held). With
    /// `limited`, the holder is a local client bound to its share. Always admits; returns
    /// the flow evicted to make room, if one was, which the caller must drop.
    pub fn admit(&mut self, flow: F, holder: K, limited: bool, now: Instant) -> Option<Eviction<F, K>> {
        if self.touch(&flow, now) {
            return None;
        }
        let evicted = if limited && self.held_by(&holder) >= self.share {
            self.evict_lru(holder, Reason::ClientShare, now)
        } else if self.flows.len() >= self.capacity {
            self.largest_holder()
                .and_then(|largest| self.evict_lru(largest, Reason::TableFull, now))
        } else {
            None
        };
        self.clock += 1;
        self.flows.insert(
            flow,
            Slot {
                holder,
                seq: self.clock,
                last: now,
            },
        );
        self.holders
            .entry(holder)
            .or_insert_with(|| Holder {
                lru: BTreeMap::new(),
                logged: None,
            })
            .lru
            .insert(self.clock, flow);
        evicted
    }

    /// Forgets `flow` (it ended); returns its holder.
    pub fn remove(&mut self, flow: &F) -> Option<K> {
        let slot = self.flows.remove(flow)?;
        if let Some(h) = self.holders.get_mut(&slot.holder) {
            h.lru.remove(&slot.seq);
            if h.lru.is_empty() {
                self.holders.remove(&slot.holder);
            }
        }
        Some(slot.holder)
    }

    /// Forgets every flow unused for longer than `idle` at `now`; returns them with their
    /// holders.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> Vec<(F, K)> {
        let mut out = Vec::new();
        for (holder, h) in &mut self.holders {
            // In LRU order, so the expired ones come first.
            while let Some((&seq, &flow)) = h.lru.first_key_value() {
                let stale = self
                    .flows
                    .get(&flow)
                    .is_none_or(|s| now.saturating_duration_since(s.last) > idle);
                if !stale {
                    break;
                }
                h.lru.remove(&seq);
                self.flows.remove(&flow);
                out.push((flow, *holder));
            }
        }
        self.holders.retain(|_, h| !h.lru.is_empty());
        out
    }

    /// The holder with the most flows (ties: the one whose oldest flow is older).
    fn largest_holder(&self) -> Option<K> {
        self.holders
            .iter()
            .filter_map(|(k, h)| h.lru.first_key_value().map(|(seq, _)| (h.lru.len(), *seq, *k)))
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)))
            .map(|(_, _, k)| k)
    }

    /// Evicts the least recently used flow of `holder`.
    fn evict_lru(&mut self, holder: K, reason: Reason, now: Instant) -> Option<Eviction<F, K>> {
        let h = self.holders.get_mut(&holder)?;
        let (_, flow) = h.lru.pop_first()?;
        self.flows.remove(&flow);
        let held = h.lru.len();
        let log = h.logged.is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if log {
            h.logged = Some(now);
        }
        if held == 0 {
            self.holders.remove(&holder);
        }
        Some(Eviction {
            flow,
            holder,
            reason,
            held,
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOD: u8 = 1;
    const QUIET: u8 = 2;

    #[test]
    fn the_share_is_an_eighth_but_at_least_64_and_at_most_everything() {
        assert_eq!(share(4096), 512);
        assert_eq!(share(100_000), 12_500);
        assert_eq!(share(256), 64);
        assert_eq!(share(10), 10);
        assert_eq!(share(0), 1);
    }

    #[test]
    fn a_client_at_its_share_loses_its_least_recently_used_flow() {
        let t0 = Instant::now();
        let mut book = FlowBook::<u32, u8>::new(4096);
        for port in 0..512 {
            assert_eq!(book.admit(port, FLOOD, true, t0), None);
        }
        // Flow 0 carries traffic again; flow 1 is now the least recently used.
        assert!(book.touch(&0, t0 + Duration::from_millis(1)));
        let ev = book.admit(512, FLOOD, true, t0 + Duration::from_millis(2)).unwrap();
        assert_eq!(
            (ev.flow, ev.holder, ev.reason, ev.held),
            (1, FLOOD, Reason::ClientShare, 511)
        );
        assert!(ev.log);
        assert_eq!(book.held_by(&FLOOD), 512);
        assert!(book.contains(&0) && book.contains(&512) && !book.contains(&1));
        // The flooder keeps going: each new port evicts its oldest; nothing else is touched.
        for port in 513..5000 {
            let ev = book.admit(port, FLOOD, true, t0 + Duration::from_millis(3)).unwrap();
            assert_eq!(ev.reason, Reason::ClientShare);
            assert!(!ev.log, "logged at most once per interval");
        }
        assert_eq!(book.len(), 512);
        // Another client is admitted at once, with nothing evicted.
        assert_eq!(book.admit(9_000, QUIET, true, t0 + Duration::from_millis(4)), None);
        assert_eq!(book.held_by(&QUIET), 1);
        // After the interval, the flooder's next eviction is logged again.
        let ev = book
            .admit(9_001, FLOOD, true, t0 + LOG_EVERY + Duration::from_millis(2))
            .unwrap();
        assert!(ev.log);
    }

    #[test]
    fn a_full_book_evicts_from_the_largest_holder_never_the_small_one() {
        let t0 = Instant::now();
        let mut book = FlowBook::<u32, u8>::new(100);
        // Link-held flows have no share: one link fills the book.
        for id in 0..99 {
            assert_eq!(book.admit(id, FLOOD, false, t0), None);
        }
        assert_eq!(book.admit(1_000, QUIET, false, t0), None);
        assert_eq!(book.len(), 100);
        // Full: a new flow of the small holder evicts the large holder's oldest.
        let ev = book.admit(1_001, QUIET, false, t0).unwrap();
        assert_eq!((ev.flow, ev.holder, ev.reason), (0, FLOOD, Reason::TableFull));
        // And a new flow of the large holder evicts its own oldest, not the small one's.
        let ev = book.admit(99, FLOOD, false, t0).unwrap();
        assert_eq!((ev.flow, ev.holder), (1, FLOOD));
        assert_eq!(book.held_by(&QUIET), 2);
        assert_eq!(book.len(), 100);
    }

    #[test]
    fn ties_evict_from_the_holder_with_the_older_flow() {
        let t0 = Instant::now();
        let mut book = FlowBook::<u32, u8>::new(4);
        book.admit(1, QUIET, false, t0);
        book.admit(2, FLOOD, false, t0);
        book.admit(3, FLOOD, false, t0);
        book.admit(4, QUIET, false, t0);
        let ev = book.admit(5, 9, false, t0).unwrap();
        assert_eq!((ev.flow, ev.holder), (1, QUIET));
    }

    #[test]
    fn readmitting_a_held_flow_only_touches_it() {
        let t0 = Instant::now();
        let mut book = FlowBook::<u32, u8>::new(64);
        book.admit(7, FLOOD, true, t0);
        assert_eq!(book.admit(7, FLOOD, true, t0), None);
        assert_eq!(book.len(), 1);
        assert!(!book.touch(&8, t0));
    }

    #[test]
    fn idle_flows_expire_and_removed_holders_are_forgotten() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(60);
        let mut book = FlowBook::<u32, u8>::new(4096);
        book.admit(1, FLOOD, true, t0);
        book.admit(2, FLOOD, true, t0 + Duration::from_secs(30));
        book.admit(3, QUIET, true, t0);
        book.touch(&3, t0 + Duration::from_secs(50));
        let mut gone = book.expire(t0 + Duration::from_secs(61), idle);
        gone.sort();
        assert_eq!(gone, vec![(1, FLOOD)]);
        assert_eq!(book.len(), 2);
        assert_eq!(book.remove(&2), Some(FLOOD));
        assert_eq!(book.remove(&2), None);
        assert_eq!(book.held_by(&FLOOD), 0);
        assert!(!book.holders.contains_key(&FLOOD), "an empty holder costs nothing");
        let gone = book.expire(t0 + Duration::from_secs(200), idle);
        assert_eq!(gone, vec![(3, QUIET)]);
        assert!(book.is_empty() && book.holders.is_empty());
    }

    #[test]
    fn memory_stays_bounded_under_any_mix() {
        let t0 = Instant::now();
        let mut book = FlowBook::<u32, u16>::new(256);
        let mut rng = 12345u32;
        for i in 0..20_000u32 {
            rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let holder = (rng >> 16) as u16 % 40;
            let limited = holder % 2 == 0;
            book.admit(i, holder, limited, t0 + Duration::from_millis(u64::from(i)));
            assert!(book.len() <= 256);
            if limited {
                assert!(book.held_by(&holder) <= share(256));
            }
        }
        let total: usize = book.holders.values().map(|h| h.lru.len()).sum();
        assert_eq!(total, book.len());
    }
}
