//! Virtual IPs: one range for the whole clusterset, one block of it per site.
//!
//! `vips.cidr` is split into 256 equal blocks. A site owns the block its id hashes to (FNV-1a,
//! stable across versions and machines), or the one `vips.block` names. The site that owns an
//! endpoint assigns its VIP from its own block, so **the same endpoint has the same VIP in
//! every site**, and any agent can tell from a VIP alone which block (and so which site) it
//! belongs to. Inside a block, an endpoint's address is chosen by hashing its name, probing
//! past taken ones, and is kept for as long as the endpoint exists. Two sites landing on one
//! block is a conflict the catalog detects and reports; it is never silently shared.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

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

/// FNV-1a, 64 bit: a hash whose value never changes between builds.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
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

/// Assigns VIPs to this site's endpoints from its block, stably.
#[derive(Debug, Clone)]
pub struct VipAllocator {
    range: VipRange,
    /// Our block.
    block: u32,
    /// Current assignments; kept while the endpoint exists.
    assigned: BTreeMap<EndpointKey, IpAddr>,
}

impl VipAllocator {
    pub fn new(range: VipRange, block: u32) -> Self {
        VipAllocator {
            range,
            block,
            assigned: BTreeMap::new(),
        }
    }

    pub fn block(&self) -> u32 {
        self.block
    }

    /// Makes `keys` the set of endpoints: keeps existing VIPs, frees vanished ones, and
    /// assigns new ones by hash with linear probing.
    pub fn assign(&mut self, keys: &[EndpointKey]) -> Result<BTreeMap<EndpointKey, IpAddr>, VipError> {
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
        self.assigned.retain(|k, _| wanted.contains(k));
        let mut taken: BTreeSet<IpAddr> = self.assigned.values().copied().collect();
        for key in wanted {
            if self.assigned.contains_key(key) {
                continue;
            }
            let name = format!("{}/{}/{}", key.1, key.0, key.2);
            let start = fnv1a(name.as_bytes()) % capacity;
            let ip = (0..capacity)
                .map(|i| self.range.addr(self.block, (start + i) % capacity))
                .find(|ip| !taken.contains(ip))
                .ok_or(VipError::BlockFull {
                    cidr: self.range.cidr,
                    block: self.block,
                    wanted: keys.len(),
                    capacity,
                })?;
            taken.insert(ip);
            self.assigned.insert(key.clone(), ip);
        }
        Ok(self.assigned.clone())
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
        let mut a = VipAllocator::new(r, 9);
        let keys: Vec<_> = (0..50).map(|i| key("etcd", &format!("etcd-{i}"))).collect();
        let first = a.assign(&keys).unwrap();
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
        let second = a.assign(&keys2).unwrap();
        for k in &keys[1..] {
            assert_eq!(first[k], second[k]);
        }
        // A fresh allocator (agent restart) places the same endpoints the same way.
        let mut b = VipAllocator::new(r, 9);
        assert_eq!(b.assign(&keys).unwrap(), first);
    }

    #[test]
    fn a_full_block_is_an_error() {
        let mut a = VipAllocator::new(range(), 0);
        let keys: Vec<_> = (0..255).map(|i| key("s", &format!("h{i}"))).collect();
        let err = a.assign(&keys).unwrap_err();
        assert!(matches!(err, VipError::BlockFull { .. }));
        assert_eq!(
            err.to_string(),
            "block 0 of 127.77.0.0/16 is full: 255 endpoints, 254 addresses; give every site the same, \
             larger vips.cidr, such as 127.76.0.0/15 (510 addresses per site)"
        );
        assert_eq!(a.assign(&keys[..254]).unwrap().len(), 254);
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
        let mut a = VipAllocator::new(r, 3);
        let got = a.assign(&[key("s", "h")]).unwrap();
        let ip = got.values().next().copied().unwrap();
        assert_eq!(r.block_of(ip), Some(3));
    }
}
