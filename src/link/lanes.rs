//! Lanes: a link's parallel QUIC connections (`links.lanes`), and which one a flow takes.
//!
//! One QUIC connection is driven by one task: its packets are decrypted, acknowledged and
//! reassembled in order on one core, so one link could never use more than one core, and an
//! interactive flow's packet waited behind every bulk packet read before it. A link therefore
//! runs up to [`MAX_LANES`](crate::config::MAX_LANES) connections between the same two
//! agents. Lane 0 is the link's first connection: it carries the control stream, and its
//! liveness is the link's (`links.down_after`). The dialer opens the others once the first is
//! up, each with a hello naming its index, and keeps them open while the first lasts; when
//! the first ends, its lanes end with it. A lane that fails alone is dialled again, and its
//! resumable flows move to the other lanes.
//!
//! A flow's lane follows what it carries ([`LaneChoice`]). Lane 0 is the *interactive* lane:
//! a resumable TCP flow starts there, and moves (once, by the resume machinery) to one of the
//! other, *bulk* lanes when it has carried [`BULK_MOVE`] bytes. So heartbeats and requests
//! share their congestion window and their receiving task with nothing bulk, which would
//! otherwise queue ahead of them, while transfers spread over the other lanes and cores. UDP
//! flows and plain (non-resumable) TCP flows cannot move and are spread over every lane.
//!
//! Otherwise a flow stays on its lane: a TCP flow is one stream, and a UDP flow's datagrams
//! keep their order and their relay's flow entry. The lane among several is chosen by
//! rendezvous hashing (highest random weight) of a per-flow key over the lanes' connection
//! ids, so a lane that comes or goes moves only the flows that were on it or now hash to it
//! (about 1 in n), never the rest. [`pick_index`] is that choice, pure and unit-tested;
//! [`LaneSet`] holds one link's live connections for the data plane.

use std::sync::RwLock;

/// Mixes a 64-bit value (splitmix64's finaliser): every input bit moves every output bit,
/// so nearby keys (consecutive source ports) and nearby connection ids spread evenly.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The index in `ids` (the lanes' connection ids) of the lane a flow with `key` takes:
/// the one whose `mix(key, id)` weighs most. `None` for no lanes. The same key and ids
/// always give the same lane; removing a lane moves only its own flows.
pub fn pick_index(key: u64, ids: impl IntoIterator<Item = u64>) -> Option<usize> {
    let key = mix(key);
    ids.into_iter()
        .enumerate()
        .max_by_key(|(_, id)| mix(key ^ mix(*id).rotate_left(17)))
        .map(|(i, _)| i)
}

/// The kind of lane a flow's stream arrived on, so that a relay sends it onward on the same
/// kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrived {
    /// A link's first connection: the interactive lane.
    Interactive,
    /// One of a link's other lanes.
    Bulk,
    /// A sidecar's connection to its gateway, which has one lane for everything.
    Unknown,
}

impl Arrived {
    /// The lane onward for a flow that arrived so; `key` spreads it among several.
    pub fn onward(self, key: u64) -> LaneChoice {
        match self {
            Arrived::Interactive => LaneChoice::Interactive,
            Arrived::Bulk => LaneChoice::Bulk(key),
            Arrived::Unknown => LaneChoice::Spread(key),
        }
    }
}

/// Bytes a resumable TCP flow carries (both directions, at its origin) on the interactive
/// lane before it moves to a bulk lane: far more than a request, a response or a burst of
/// heartbeats, and little against a transfer, which pays one resume (a round trip) to move.
pub const BULK_MOVE: u64 = 1024 * 1024;

/// Which of a link's lanes a flow takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneChoice {
    /// Any lane, by the flow's key: flows that cannot move (UDP, plain TCP, relayed
    /// streams whose class is unknown).
    Spread(u64),
    /// Lane 0, the link's first connection: a resumable flow until it turns bulk.
    Interactive,
    /// One of the lanes after the first, by the flow's key (lane 0 when there is no other).
    Bulk(u64),
}

/// The index in `ids` (a link's lanes' connection ids, the first connection first) of the
/// lane `choice` takes; 0 when `ids` has one or none.
pub fn choose(choice: LaneChoice, ids: &[u64]) -> usize {
    let (key, skip) = match choice {
        LaneChoice::Interactive => return 0,
        LaneChoice::Spread(key) => (key, 0),
        LaneChoice::Bulk(key) if ids.len() > 1 => (key, 1),
        LaneChoice::Bulk(key) => (key, 0),
    };
    pick_index(key, ids[skip.min(ids.len())..].iter().copied()).map_or(0, |i| i + skip)
}

/// A per-flow key from what identifies the flow at its start (a client's address and
/// port, a UDP flow's id): hashed, so flows from one client spread too.
pub fn flow_key(parts: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(parts)
}

/// One link's live connections, lane 0 first, as the data plane reads them on every new
/// flow. Shared by the mesh's route table and the link's lane sessions, which add and
/// remove lanes as they come and go.
#[derive(Debug)]
pub struct LaneSet {
    /// The link's first connection: the id routing knows the link by, never removed.
    first: quinn::Connection,
    /// Lane 0 and every extra lane that is up. Read per flow (an uncontended read lock);
    /// written only when a lane comes or goes.
    conns: RwLock<Vec<quinn::Connection>>,
    /// How many lanes the link's ends agreed on: a flow that turns bulk before the others
    /// are up moves anyway, and on to a bulk lane once one is.
    agreed: u8,
}

impl LaneSet {
    /// A set of one lane, the link's first connection, of a link that agreed on `agreed`
    /// lanes.
    pub fn new(first: quinn::Connection, agreed: u8) -> LaneSet {
        LaneSet {
            conns: RwLock::new(vec![first.clone()]),
            first,
            agreed,
        }
    }

    /// How many lanes the link's ends agreed on (some may not be up).
    pub fn agreed(&self) -> u8 {
        self.agreed
    }

    /// The link's first connection (lane 0).
    pub fn first(&self) -> &quinn::Connection {
        &self.first
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<quinn::Connection>> {
        match self.conns.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<quinn::Connection>> {
        match self.conns.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The connection a flow takes ([`LaneChoice`]; keys from [`flow_key`], choice among
    /// several by [`pick_index`]).
    pub fn pick(&self, choice: LaneChoice) -> quinn::Connection {
        if choice == LaneChoice::Interactive {
            return self.first.clone();
        }
        let conns = self.read();
        let mut ids = [0u64; crate::config::MAX_LANES as usize];
        let n = conns.len().min(ids.len());
        for (id, c) in ids.iter_mut().zip(conns.iter()) {
            *id = c.stable_id() as u64;
        }
        conns[choose(choice, &ids[..n])].clone()
    }

    /// Adds an extra lane.
    pub fn add(&self, lane: quinn::Connection) {
        let mut conns = self.write();
        if !conns.iter().any(|c| c.stable_id() == lane.stable_id()) {
            conns.push(lane);
        }
    }

    /// Removes an extra lane (never the first connection).
    pub fn remove(&self, lane: &quinn::Connection) {
        if lane.stable_id() != self.first.stable_id() {
            self.write().retain(|c| c.stable_id() != lane.stable_id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_takes_the_same_lane_and_no_lanes_means_none() {
        let ids = [11, 12, 13, 14];
        for key in 0..1000u64 {
            assert_eq!(pick_index(key, ids), pick_index(key, ids));
        }
        assert_eq!(pick_index(7, []), None);
        assert_eq!(pick_index(7, [42]), Some(0));
    }

    #[test]
    fn interactive_flows_take_the_first_lane_and_bulk_ones_never_do_while_others_exist() {
        let ids = [40, 41, 42, 43];
        let mut bulk = [0usize; 4];
        for key in 0..4000u64 {
            assert_eq!(choose(LaneChoice::Interactive, &ids), 0);
            bulk[choose(LaneChoice::Bulk(key), &ids)] += 1;
            assert_eq!(choose(LaneChoice::Bulk(key), &ids), choose(LaneChoice::Bulk(key), &ids));
        }
        assert_eq!(bulk[0], 0, "a bulk flow on the interactive lane");
        assert!(bulk[1..].iter().all(|n| (1100..1600).contains(n)), "uneven: {bulk:?}");
        // Alone, the first lane carries everything; nothing at all still gives index 0.
        assert_eq!(choose(LaneChoice::Bulk(9), &[40]), 0);
        assert_eq!(choose(LaneChoice::Spread(9), &[]), 0);
        let spread: std::collections::BTreeSet<usize> =
            (0..100u64).map(|k| choose(LaneChoice::Spread(k), &ids)).collect();
        assert_eq!(spread.len(), 4, "spread flows use every lane, the first too");
        // A relay keeps the kind of lane a stream arrived on.
        assert_eq!(Arrived::Interactive.onward(3), LaneChoice::Interactive);
        assert_eq!(Arrived::Bulk.onward(3), LaneChoice::Bulk(3));
        assert_eq!(Arrived::Unknown.onward(3), LaneChoice::Spread(3));
    }

    #[test]
    fn flows_spread_evenly_over_lanes() {
        let ids: Vec<u64> = (1..=4).collect();
        let mut counts = [0usize; 4];
        // Consecutive source ports of one client, as a load generator opens them.
        for port in 40000..44000u16 {
            let key = flow_key(("10.0.0.1", port));
            counts[pick_index(key, ids.iter().copied()).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn a_lane_that_goes_or_comes_moves_only_its_own_flows() {
        let four: Vec<u64> = vec![5, 6, 7, 8];
        let three: Vec<u64> = vec![5, 6, 8];
        let mut moved = 0;
        for key in 0..4000u64 {
            let before = four[pick_index(key, four.iter().copied()).unwrap()];
            let after = three[pick_index(key, three.iter().copied()).unwrap()];
            if before != 7 {
                assert_eq!(before, after, "a flow not on the lost lane moved");
            } else {
                moved += 1;
            }
        }
        assert!((800..1200).contains(&moved), "{moved} flows were on the lost lane");
        // Adding it back moves only the flows that now hash to it.
        let back = (0..4000u64)
            .filter(|k| {
                three[pick_index(*k, three.iter().copied()).unwrap()]
                    != four[pick_index(*k, four.iter().copied()).unwrap()]
            })
            .count();
        assert_eq!(back, moved);
    }
}
