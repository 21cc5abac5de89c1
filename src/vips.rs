//! Virtual IPs: one range for the whole clusterset, one block of it per site.
//!
//! `vips.cidr` is split into 256 equal blocks. A site owns the block its id hashes to (FNV-1a,
//! stable across versions and machines), or the one `vips.block` names. The site that owns an
//! endpoint assigns its VIP from its own block, so **the same endpoint has the same VIP in
//! every site**, and any agent can tell from a VIP alone which block (and so which site) it
//! belongs to. Inside a block, a new endpoint's address is chosen by hashing its name, probing
//! past addresses already handed out. The allocation is a [`VipTable`] that the agent persists
//! (`vips.yaml`) and loads at start, so an endpoint keeps its VIP across restarts and reloads
//! whatever else was exported since. A freed address (its endpoint withdrawn) is remembered:
//! the endpoint gets it back if it returns, and no other endpoint gets it until a quarantine
//! (DNS TTL + link idle timeout) has passed, so a client still holding it never silently
//! reaches another endpoint. Two sites landing on one block is a conflict the catalog detects
//! and reports; it is never silently shared.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::names::fnv1a;

/// Blocks per range.
pub const BLOCKS: u32 = 256;

/// Errors of VIP assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("vips.cidr {0} is too small: it needs at least 16 host bits (256 blocks of 256)")]
    TooSmall(IpNet),
    #[error("block {block} of {cidr} is full: {wanted} endpoints, {capacity} addresses; {}", wider(.cidr, *.wanted))]
    BlockFull {
        cidr: IpNet,
        block: u32,
        wanted: usize,
        capacity: u64,
    },
    #[error(
        "block {block} of {cidr} is full: {wanted} endpoints, {capacity} addresses, {held} of them freed \
         less than {quarantine_secs} s ago and held back while clients may still use them (the next \
         is free in {free_in_secs} s); {}",
        wider(.cidr, *.wanted + *.held)
    )]
    BlockHeld {
        cidr: IpNet,
        block: u32,
        wanted: usize,
        /// Freed addresses still in quarantine.
        held: usize,
        capacity: u64,
        /// The quarantine, seconds.
        quarantine_secs: u64,
        /// Seconds until the first held address may be reused.
        free_in_secs: u64,
    },
}

/// What to do about a full block: the narrowest range, written from `cidr`'s own address,
/// whose blocks hold `wanted` endpoints (as [`VipRange`] carves them), e.g. "give every site
/// the same, larger vips.cidr, such as 127.72.0.0/13 (2046 addresses per site)".
fn wider(cidr: &IpNet, wanted: usize) -> String {
    let fits = (0..cidr.prefix_len()).rev().find_map(|prefix| {
        let net = IpNet::new(cidr.network(), prefix).ok()?.trunc();
        let capacity = VipRange::new(net).ok()?.capacity();
        (capacity >= wanted as u64).then_some((net, capacity))
    });
    match fits {
        Some((net, capacity)) => {
            format!("give every site the same, larger vips.cidr, such as {net} ({capacity} addresses per site)")
        }
        None => "no vips.cidr has blocks that large; split the endpoints over more sites".into(),
    }
}

/// The clusterset's VIP range and its block arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    /// `vips.cidr`, host bits cleared.
    cidr: IpNet,
    /// Addresses per block.
    block_size: u128,
}

impl VipRange {
    pub fn new(cidr: IpNet) -> Result<Self, VipError> {
        let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
        if host_bits < 16 {
            return Err(VipError::TooSmall(cidr));
        }
        let block_size = 1u128 << (host_bits - 8).min(64);
        Ok(VipRange {
            cidr: cidr.trunc(),
            block_size,
        })
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// The block a site owns by default.
    pub fn block_of_site(site: &str) -> u32 {
        (fnv1a(site.as_bytes()) % u64::from(BLOCKS)) as u32
    }

    fn base(&self) -> u128 {
        to_u128(self.cidr.network())
    }

    /// The block a VIP falls in, if it is inside the range.
    pub fn block_of(&self, ip: IpAddr) -> Option<u32> {
        if !self.cidr.contains(&ip) || ip.is_ipv4() != self.cidr.network().is_ipv4() {
            return None;
        }
        Some(((to_u128(ip) - self.base()) / self.block_size) as u32)
    }

    /// Usable addresses of a block: all but its first and last, which look like network and
    /// broadcast addresses to people and some tools.
    pub fn capacity(&self) -> u64 {
        (self.block_size - 2).min(u128::from(u64::MAX)) as u64
    }

    /// The address at `offset` (0-based, among usable ones) in `block`.
    fn addr(&self, block: u32, offset: u64) -> IpAddr {
        from_u128(
            self.base() + u128::from(block) * self.block_size + 1 + u128::from(offset),
            self.cidr.network(),
        )
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(v: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

/// Identifies an endpoint within its site: service, namespace, hostname.
pub type EndpointKey = (String, String, String);

/// One row of the allocation table: an address this site handed out and still remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipEntry {
    /// Service of the endpoint the address was given to.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Its hostname within the service.
    pub hostname: String,
    /// The address; it names this endpoint in every site for as long as the row exists.
    pub vip: IpAddr,
    /// When the endpoint was withdrawn (rounded up to a whole second), or `None` while it
    /// exists. A freed address is kept for the endpoint should it come back, and given to no
    /// other endpoint until the quarantine has passed, since clients may still hold it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::state::rfc3339::option"
    )]
    pub freed_at: Option<SystemTime>,
}

impl VipEntry {
    fn key(&self) -> EndpointKey {
        (self.service.clone(), self.namespace.clone(), self.hostname.clone())
    }
}

/// The site's VIP allocation: what `vips.yaml` in the state directory holds, so that a
/// restart cannot reorder it. Rows are sorted by endpoint (service, namespace, hostname).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipTable {
    /// Every remembered address, live or freed; at most one row per endpoint and per address.
    #[serde(default)]
    pub vips: Vec<VipEntry>,
}

impl VipTable {
    /// The live assignments (endpoints that exist now) and their VIPs.
    pub fn live(&self) -> BTreeMap<EndpointKey, IpAddr> {
        self.vips
            .iter()
            .filter(|e| e.freed_at.is_none())
            .map(|e| (e.key(), e.vip))
            .collect()
    }
}

/// A row of the table while [`VipAllocator::assign`] works on it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    vip: IpAddr,
    freed_at: Option<SystemTime>,
}

/// `t` rounded up to a whole second since the epoch: the precision `vips.yaml` keeps, rounded
/// the way that can only lengthen a quarantine.
fn ceil_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            UNIX_EPOCH.checked_add(Duration::from_secs(secs)).unwrap_or(t)
        }
        Err(_) => t,
    }
}

/// Assigns VIPs to this site's endpoints from its block, stably.
///
/// Pure: [`assign`](VipAllocator::assign) takes the current [`VipTable`] and the time and
/// returns the next table; the caller persists it (`vips.yaml`) and loads it at start.
#[derive(Debug, Clone)]
pub struct VipAllocator {
    /// The clusterset's range.
    range: VipRange,
    /// Our block.
    block: u32,
    /// How long a freed address is kept from other endpoints: long enough for every client
    /// that may hold it (a cached DNS answer, a flow still open) to have let go of it.
    quarantine: Duration,
}

impl VipAllocator {
    /// An allocator for `block` of `range` that holds freed addresses back for `quarantine`.
    pub fn new(range: VipRange, block: u32, quarantine: Duration) -> Self {
        VipAllocator {
            range,
            block,
            quarantine,
        }
    }

    /// Our block (0–255).
    pub fn block(&self) -> u32 {
        self.block
    }

    /// The clusterset's range.
    pub fn range(&self) -> VipRange {
        self.range
    }

    /// How long a freed address waits before another endpoint may get it.
    pub fn quarantine(&self) -> Duration {
        self.quarantine
    }

    /// Whether `ip` is a usable address of our block (not its first or last).
    fn ours(&self, ip: IpAddr) -> bool {
        if self.range.block_of(ip) != Some(self.block) {
            return false;
        }
        let first = to_u128(self.range.addr(self.block, 0));
        let v = to_u128(ip);
        v >= first && v - first < u128::from(self.range.capacity())
    }

    /// Makes `keys` the set of live endpoints at time `now`, starting from `table`, and
    /// returns the new table (`table` itself is not changed).
    ///
    /// An endpoint in `table` keeps its VIP, and one that comes back gets its old VIP again
    /// (even after its quarantine, unless another endpoint has taken it since). A vanished
    /// endpoint's row is kept with `freed_at = now`. A new endpoint gets a never-used address
    /// (by hash of its name, probing past remembered ones); when there is none, the address
    /// freed longest ago whose quarantine has passed, whose old owner is then forgotten.
    /// Rows of `table` outside our block (a changed `vips.cidr` or `vips.block`), and a
    /// second row for one endpoint or one address (a hand-edited file), are dropped.
    ///
    /// Errors: [`VipError::BlockFull`] when `keys` outnumber the block's addresses;
    /// [`VipError::BlockHeld`] when the only addresses left are freed ones still in quarantine.
    pub fn assign(&self, table: &VipTable, keys: &[EndpointKey], now: SystemTime) -> Result<VipTable, VipError> {
        let capacity = self.range.capacity();
        let wanted: BTreeSet<&EndpointKey> = keys.iter().collect();
        if wanted.len() as u64 > capacity {
            return Err(VipError::BlockFull {
                cidr: self.range.cidr,
                block: self.block,
                wanted: wanted.len(),
                capacity,
            });
        }
        let wanted_count = wanted.len();
        let mut slots: BTreeMap<EndpointKey, Slot> = BTreeMap::new();
        let mut owners: BTreeMap<IpAddr, EndpointKey> = BTreeMap::new();
        for e in &table.vips {
            let key = e.key();
            if !self.ours(e.vip) || slots.contains_key(&key) || owners.contains_key(&e.vip) {
                continue;
            }
            owners.insert(e.vip, key.clone());
            slots.insert(
                key,
                Slot {
                    vip: e.vip,
                    freed_at: e.freed_at,
                },
            );
        }
        let freed = ceil_to_second(now);
        for (key, slot) in slots.iter_mut() {
            if wanted.contains(key) {
                slot.freed_at = None;
            } else if slot.freed_at.is_none() {
                slot.freed_at = Some(freed);
            }
        }
        for key in wanted {
            if slots.contains_key(key) {
                continue;
            }
            let name = format!("{}/{}/{}", key.1, key.0, key.2);
            let start = fnv1a(name.as_bytes()) % capacity;
            let never_used = if (owners.len() as u64) < capacity {
                (0..capacity)
                    .map(|i| self.range.addr(self.block, (start + i) % capacity))
                    .find(|ip| !owners.contains_key(ip))
            } else {
                None
            };
            let vip = match never_used {
                Some(ip) => ip,
                None => {
                    let reusable = slots
                        .iter()
                        .filter_map(|(k, s)| Some((s.freed_at?, s.vip, k)))
                        .filter(|(t, _, _)| now.duration_since(*t).is_ok_and(|d| d >= self.quarantine))
                        .min()
                        .map(|(_, vip, k)| (vip, k.clone()));
                    let Some((vip, old)) = reusable else {
                        return Err(self.held(&slots, wanted_count, now));
                    };
                    slots.remove(&old);
                    vip
                }
            };
            owners.insert(vip, key.clone());
            slots.insert(key.clone(), Slot { vip, freed_at: None });
        }
        Ok(VipTable {
            vips: slots
                .into_iter()
                .map(|((service, namespace, hostname), s)| VipEntry {
                    service,
                    namespace,
                    hostname,
                    vip: s.vip,
                    freed_at: s.freed_at,
                })
                .collect(),
        })
    }

    /// The error for a block whose only free addresses are still in quarantine.
    fn held(&self, slots: &BTreeMap<EndpointKey, Slot>, wanted: usize, now: SystemTime) -> VipError {
        let freed: Vec<SystemTime> = slots.values().filter_map(|s| s.freed_at).collect();
        let free_in = freed
            .iter()
            .map(|t| {
                let elapsed = now.duration_since(*t).unwrap_or(Duration::ZERO);
                self.quarantine.saturating_sub(elapsed)
            })
            .min()
            .unwrap_or(Duration::ZERO);
        VipError::BlockHeld {
            cidr: self.range.cidr,
            block: self.block,
            wanted,
            held: freed.len(),
            capacity: self.range.capacity(),
            quarantine_secs: self.quarantine.as_secs(),
            free_in_secs: free_in.as_secs() + u64::from(free_in.subsec_nanos() > 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, h: &str) -> EndpointKey {
        (s.to_string(), "default".to_string(), h.to_string())
    }

    fn range() -> VipRange {
        VipRange::new("127.77.0.0/16".parse().unwrap()).unwrap()
    }

    /// DNS TTL 5 s + link idle timeout 30 s, the defaults.
    const Q: Duration = Duration::from_secs(35);

    /// A fixed instant, so tests pass times in rather than sleep.
    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn allocator(block: u32) -> VipAllocator {
        VipAllocator::new(range(), block, Q)
    }

    /// One assignment round: `table` becomes the new table; returns the live assignments.
    fn step(
        a: &VipAllocator,
        table: &mut VipTable,
        keys: &[EndpointKey],
        now: SystemTime,
    ) -> BTreeMap<EndpointKey, IpAddr> {
        *table = a.assign(table, keys, now).unwrap();
        table.live()
    }

    /// What `vips.yaml` holds after a write and a read.
    fn persisted(table: &VipTable) -> VipTable {
        serde_yaml::from_str(&serde_yaml::to_string(table).unwrap()).unwrap()
    }

    #[test]
    fn blocks_are_stable_and_inside_the_range() {
        assert_eq!(VipRange::block_of_site("london"), VipRange::block_of_site("london"));
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        let r = range();
        assert_eq!(r.capacity(), 254);
        let ip: IpAddr = "127.77.5.1".parse().unwrap();
        assert_eq!(r.block_of(ip), Some(5));
        assert_eq!(r.block_of("127.78.0.1".parse().unwrap()), None);
        assert_eq!(r.block_of("::1".parse().unwrap()), None);
        assert!(VipRange::new("10.0.0.0/24".parse().unwrap()).is_err());
    }

    #[test]
    fn assignment_is_stable_and_unique() {
        let r = range();
        let a = allocator(9);
        let mut table = VipTable::default();
        let keys: Vec<_> = (0..50).map(|i| key("etcd", &format!("etcd-{i}"))).collect();
        let first = step(&a, &mut table, &keys, t(0));
        let ips: BTreeSet<_> = first.values().collect();
        assert_eq!(ips.len(), 50);
        assert!(first.values().all(|ip| r.block_of(*ip) == Some(9)));
        assert!(
            first
                .values()
                .all(|ip| !ip.to_string().ends_with(".0") && !ip.to_string().ends_with(".255"))
        );
        // Removing one and adding another leaves the rest untouched.
        let mut keys2 = keys[1..].to_vec();
        keys2.push(key("redis", "redis-0"));
        let second = step(&a, &mut table, &keys2, t(1));
        for k in &keys[1..] {
            assert_eq!(first[k], second[k]);
        }
        // A fresh allocator (agent restart) places the same endpoints the same way.
        let b = allocator(9);
        assert_eq!(b.assign(&VipTable::default(), &keys, t(2)).unwrap().live(), first);
    }

    #[test]
    fn a_full_block_is_an_error() {
        let a = allocator(0);
        let keys: Vec<_> = (0..255).map(|i| key("s", &format!("h{i}"))).collect();
        let err = a.assign(&VipTable::default(), &keys, t(0)).unwrap_err();
        assert!(matches!(err, VipError::BlockFull { .. }));
        assert_eq!(
            err.to_string(),
            "block 0 of 127.77.0.0/16 is full: 255 endpoints, 254 addresses; give every site the same, \
             larger vips.cidr, such as 127.76.0.0/15 (510 addresses per site)"
        );
        assert_eq!(
            a.assign(&VipTable::default(), &keys[..254], t(0)).unwrap().live().len(),
            254
        );
        // The suggestion is the narrowest range that fits, or says that none does.
        let cidr: IpNet = "127.77.0.0/16".parse().unwrap();
        assert!(wider(&cidr, 2000).contains("127.72.0.0/13 (2046 addresses per site)"));
        assert!(wider(&cidr, 2046).contains("/13"));
        assert!(wider(&cidr, 2047).contains("/12"));
        assert!(wider(&cidr, 100_000_000).contains("no vips.cidr"));
        let v6: IpNet = "fd00:77::/112".parse().unwrap();
        assert!(wider(&v6, 70_000).contains("fd00:77::/103"));
    }

    #[test]
    fn ipv6_ranges_work() {
        let r = VipRange::new("fd00:77::/112".parse().unwrap()).unwrap();
        let a = VipAllocator::new(r, 3, Q);
        let got = a.assign(&VipTable::default(), &[key("s", "h")], t(0)).unwrap().live();
        let ip = got.values().next().copied().unwrap();
        assert_eq!(r.block_of(ip), Some(3));
    }

    /// Issue 15, item 3: `web-0`, then 200 more endpoints, then a restart.
    #[test]
    fn a_restart_moves_no_vip() {
        let a = allocator(9);
        let web = key("web", "web-0");
        let mut keys = vec![web.clone()];
        let mut table = VipTable::default();
        let vip = step(&a, &mut table, &keys, t(0))[&web];
        keys.extend((0..200).map(|i| key("cache", &format!("cache-{i}"))));
        let before = step(&a, &mut table, &keys, t(10));
        assert_eq!(before[&web], vip);
        // Without the table, placing them all at once (in name order) gives web-0's address
        // to a cache endpoint and moves web-0: the bug.
        let forgetful = a.assign(&VipTable::default(), &keys, t(20)).unwrap().live();
        assert_ne!(forgetful[&web], vip);
        assert!(forgetful.values().any(|ip| *ip == vip));
        // A fresh allocator from the persisted table keeps every VIP where it was.
        let fresh = allocator(9);
        let after = fresh.assign(&persisted(&table), &keys, t(20)).unwrap().live();
        assert_eq!(after, before);
        assert_eq!(after[&web], vip);
        assert_eq!(after.values().filter(|ip| **ip == vip).count(), 1);
        // And in another order of keys, too.
        keys.reverse();
        assert_eq!(fresh.assign(&table, &keys, t(21)).unwrap().live(), before);
    }

    #[test]
    fn a_freed_vip_waits_out_its_quarantine() {
        let a = allocator(4);
        let all: Vec<_> = (0..254).map(|i| key("grid", &format!("m-{i}"))).collect();
        let mut table = VipTable::default();
        let full = step(&a, &mut table, &all, t(0));
        // m-0 leaves at t(100) (plus half a second, which the table rounds up).
        let left = t(100) + Duration::from_millis(500);
        step(&a, &mut table, &all[1..], left);
        let row = table.vips.iter().find(|e| e.hostname == "m-0").unwrap();
        assert_eq!(row.freed_at, Some(t(101)));
        // A newcomer finds only m-0's address, and that one is held back until 35 s after.
        let mut keys = all[1..].to_vec();
        keys.push(key("new", "n-0"));
        let err = a
            .assign(&table, &keys, t(101) + Q - Duration::from_millis(1))
            .unwrap_err();
        assert!(
            matches!(
                err,
                VipError::BlockHeld {
                    held: 1,
                    free_in_secs: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "block 4 of 127.77.0.0/16 is full: 254 endpoints, 254 addresses, 1 of them freed less than 35 s \
             ago and held back while clients may still use them (the next is free in 1 s); give every site \
             the same, larger vips.cidr, such as 127.76.0.0/15 (510 addresses per site)"
        );
        // The error left the table as it was: the caller keeps the old one.
        assert_eq!(persisted(&table).live().len(), 253);
        let got = step(&a, &mut table, &keys, t(101) + Q);
        assert_eq!(got[&key("new", "n-0")], full[&all[0]]);
        // m-0 is forgotten: its address belongs to n-0 now.
        assert!(!table.vips.iter().any(|e| e.hostname == "m-0"));
    }

    #[test]
    fn never_used_addresses_go_first_then_the_longest_freed() {
        let a = allocator(4);
        let mut table = VipTable::default();
        let old: Vec<_> = (0..10).map(|i| key("old", &format!("o-{i}"))).collect();
        let old_vips: BTreeSet<IpAddr> = step(&a, &mut table, &old, t(0)).into_values().collect();
        step(&a, &mut table, &[], t(1));
        // A day later, 244 newcomers fill every never-used address and none of the freed ones.
        let new: Vec<_> = (0..244).map(|i| key("new", &format!("n-{i}"))).collect();
        let got = step(&a, &mut table, &new, t(86_400));
        assert!(got.values().all(|ip| !old_vips.contains(ip)));
        // Now the block is full of live and freed rows; free one more, later than the old ones.
        step(&a, &mut table, &new[1..], t(86_401));
        let n0 = got[&new[0]];
        // The next newcomer gets an address freed at t(1), not n-0's (freed last).
        let mut keys = new[1..].to_vec();
        keys.push(key("late", "l-0"));
        let got = step(&a, &mut table, &keys, t(86_402));
        let l0 = got[&key("late", "l-0")];
        assert!(old_vips.contains(&l0), "{l0}");
        assert_ne!(l0, n0);
        assert_eq!(table.vips.len(), 254);
    }

    #[test]
    fn a_returning_endpoint_gets_its_old_vip_back() {
        let a = allocator(2);
        let web = key("web", "web-0");
        let mut table = VipTable::default();
        let vip = step(&a, &mut table, std::slice::from_ref(&web), t(0))[&web];
        // Withdrawn, then back within the quarantine.
        step(&a, &mut table, &[], t(1));
        assert!(table.live().is_empty());
        assert_eq!(step(&a, &mut table, std::slice::from_ref(&web), t(2))[&web], vip);
        // Withdrawn; meanwhile many others come and go; back a week later (and after a
        // restart): still its address, which nobody else took.
        step(&a, &mut table, &[], t(3));
        let others: Vec<_> = (0..100).map(|i| key("x", &format!("x-{i}"))).collect();
        let got = step(&a, &mut table, &others, t(100));
        assert!(got.values().all(|ip| *ip != vip));
        step(&a, &mut table, &[], t(200));
        let mut keys = others.clone();
        keys.push(web.clone());
        let back = allocator(2)
            .assign(&persisted(&table), &keys, t(7 * 86_400))
            .unwrap()
            .live();
        assert_eq!(back[&web], vip);
        assert_eq!(back.values().filter(|ip| **ip == vip).count(), 1);
        // The others came back to theirs too.
        for k in &others {
            assert_eq!(back[k], got[k]);
        }
    }

    #[test]
    fn the_table_survives_yaml_and_bad_rows_are_dropped() {
        let a = allocator(5);
        let mut table = VipTable::default();
        step(&a, &mut table, &[key("web", "web-0"), key("web", "web-1")], t(0));
        step(&a, &mut table, &[key("web", "web-0")], t(5));
        let text = serde_yaml::to_string(&table).unwrap();
        assert!(text.contains("freed_at: 2023-11-14T22:13:25Z"), "{text}");
        assert_eq!(persisted(&table), table);
        // Absent or empty: no rows, and assignment works from nothing.
        let empty: VipTable = serde_yaml::from_str("{}").unwrap();
        assert_eq!(empty, VipTable::default());
        assert_eq!(a.assign(&empty, &[key("web", "web-0")], t(6)).unwrap().live().len(), 1);
        // Garbage is an error to report, never a panic.
        for bad in [
            "{{{",
            "vips: 3",
            "vips: [{service: web}]",
            "vips: [{service: a, namespace: b, hostname: c, vip: nope}]",
        ] {
            assert!(serde_yaml::from_str::<VipTable>(bad).is_err(), "{bad}");
        }
        // Rows outside our block (vips.block changed), on its first or last address, or a
        // second row for one address or one endpoint (a hand-edited file) are dropped.
        let hand = "vips:\n\
            - {service: a, namespace: default, hostname: a-0, vip: 127.77.9.10}\n\
            - {service: b, namespace: default, hostname: b-0, vip: 127.77.5.0}\n\
            - {service: c, namespace: default, hostname: c-0, vip: 127.77.5.255}\n\
            - {service: d, namespace: default, hostname: d-0, vip: 127.77.5.20}\n\
            - {service: e, namespace: default, hostname: e-0, vip: 127.77.5.20}\n\
            - {service: d, namespace: default, hostname: d-0, vip: 127.77.5.21}\n\
            - {service: f, namespace: default, hostname: f-0, vip: '::1'}\n";
        let hand: VipTable = serde_yaml::from_str(hand).unwrap();
        let keys: Vec<_> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|s| key(s, &format!("{s}-0")))
            .collect();
        let got = a.assign(&hand, &keys, t(0)).unwrap().live();
        assert_eq!(got.len(), 6);
        assert_eq!(got[&keys[3]], "127.77.5.20".parse::<IpAddr>().unwrap());
        assert_eq!(got.values().collect::<BTreeSet<_>>().len(), 6);
        assert!(got.values().all(|ip| a.ours(*ip)));
    }
}
