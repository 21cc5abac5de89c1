//! Admission of incoming QUIC handshakes: which connection attempts the agent spends state on.
//!
//! Anyone can send QUIC Initials to the agent's port, from any (even forged) source address,
//! and each one the agent accepts costs a connection's state and a server flight of up to
//! three times the client's bytes (RFC 9000 §8.1). [`Admission`] is the pure rule the accept
//! loop applies to every `Incoming`, events in and decisions out:
//!
//! - an attempt from an address that has not proved it receives our packets is answered with
//!   a stateless **Retry** (RFC 9000 §8.1.2): no state is kept and the Retry is smaller than
//!   the Initial it answers, so forged sources get nothing reflected and a flood of Initials
//!   that never come back costs no memory. Every new connection pays one round trip for it;
//!   links connect rarely and redemptions once, so that is always worth it.
//! - an attempt that comes back with a valid Retry token is admitted while the source (an
//!   IPv4 address, or an IPv6 /64) has fewer than [`Limits::per_source`] handshakes in
//!   flight and the agent fewer than [`Limits::total`]; otherwise it is refused at once
//!   (a small `CONNECTION_REFUSED` close to an address just validated), so the accept loop
//!   never waits and one source cannot take every slot.
//!
//! The slot is given back ([`Admission::finished`]) when the handshake ends, however it ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::HandshakeOutcome;

/// Bounds on handshakes in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in flight from one source: a link or redemption needs one at a time, a few
    /// spare cover dialers behind one NAT address.
    pub per_source: usize,
    /// Handshakes in flight in all: bounds the memory half-open connections can hold.
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_source: 4,
            total: 256,
        }
    }
}

/// What the accept loop does with one incoming connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer with a stateless Retry: the source has not shown it receives our packets.
    Retry,
    /// Accept it; its slot is held until [`Admission::finished`].
    Admit,
    /// Refuse it at once (validated source, over a limit).
    Refuse(Refusal),
}

/// Why an attempt from a validated source was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source already has [`Limits::per_source`] handshakes in flight.
    SourceBusy,
    /// The agent already has [`Limits::total`] handshakes in flight.
    Busy,
}

impl Decision {
    /// The `outcome` label of `causeway_handshakes_total` for this decision.
    pub fn outcome(self) -> HandshakeOutcome {
        match self {
            Decision::Retry => HandshakeOutcome::Retry,
            Decision::Admit => HandshakeOutcome::Admitted,
            Decision::Refuse(Refusal::SourceBusy) => HandshakeOutcome::RefusedSource,
            Decision::Refuse(Refusal::Busy) => HandshakeOutcome::RefusedBusy,
        }
    }
}

/// The per-source and total counts of handshakes in flight, and the rule over them.
#[derive(Debug, Default)]
pub struct Admission {
    /// The bounds applied.
    limits: Limits,
    /// Handshakes in flight per source ([`source_key`]); sources with none are removed, so
    /// the map holds at most [`Limits::total`] entries.
    in_flight: HashMap<IpAddr, usize>,
    /// Handshakes in flight in all (the sum of `in_flight`).
    total: usize,
}

impl Admission {
    /// An empty admission with `limits`.
    pub fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            in_flight: HashMap::new(),
            total: 0,
        }
    }

    /// Decides on an attempt from `source`; `validated` is whether the source has proved it
    /// receives our packets (quinn's `Incoming::remote_address_validated`: it came back with
    /// our Retry token). [`Decision::Admit`] takes a slot that [`Admission::finished`] returns.
    pub fn decide(&mut self, source: IpAddr, validated: bool) -> Decision {
        if !validated {
            return Decision::Retry;
        }
        let key = source_key(source);
        let held = self.in_flight.get(&key).copied().unwrap_or(0);
        if held >= self.limits.per_source {
            return Decision::Refuse(Refusal::SourceBusy);
        }
        if self.total >= self.limits.total {
            return Decision::Refuse(Refusal::Busy);
        }
        *self.in_flight.entry(key).or_insert(0) += 1;
        self.total += 1;
        Decision::Admit
    }

    /// Returns the slot of an admitted handshake from `source` (completed, failed or timed
    /// out). A call without a matching admission is ignored.
    pub fn finished(&mut self, source: IpAddr) {
        let key = source_key(source);
        if let Some(n) = self.in_flight.get_mut(&key) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.in_flight.remove(&key);
            }
        }
    }

    /// Handshakes in flight in all.
    pub fn in_flight(&self) -> usize {
        self.total
    }
}

/// The unit a per-source limit applies to: an IPv4 address (IPv4-mapped IPv6 included), or
/// the /64 of an IPv6 address, since one host or subscriber commonly holds a whole /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A warning that would repeat for every attempt of a flood, logged at most once per
/// `every`; the calls in between are counted and reported with the next one logged.
#[derive(Debug)]
pub struct Throttle {
    /// The least time between two logged occurrences.
    every: Duration,
    /// When one was last logged (None: never), and how many were suppressed since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// A throttle logging at most once per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Whether to log this occurrence at `now`: `Some(n)` with the `n` suppressed since the
    /// last one logged, or `None` to stay quiet (it is counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let due = state
            .0
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if due {
            let suppressed = state.1;
            *state = (Some(now), 0);
            Some(suppressed)
        } else {
            state.1 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unvalidated_sources_get_a_retry_and_hold_nothing() {
        let mut a = Admission::new(Limits {
            per_source: 1,
            total: 1,
        });
        for _ in 0..1000 {
            assert_eq!(a.decide(ip("192.0.2.1"), false), Decision::Retry);
        }
        assert_eq!(a.in_flight(), 0);
        assert_eq!(a.decide(ip("192.0.2.1"), true), Decision::Admit);
        // Even with every slot taken, a new source is asked to validate first.
        assert_eq!(a.decide(ip("192.0.2.2"), false), Decision::Retry);
    }

    #[test]
    fn one_source_is_held_to_its_share_and_gets_it_back() {
        let mut a = Admission::new(Limits {
            per_source: 4,
            total: 256,
        });
        let src = ip("198.51.100.7");
        for _ in 0..4 {
            assert_eq!(a.decide(src, true), Decision::Admit);
        }
        assert_eq!(a.decide(src, true), Decision::Refuse(Refusal::SourceBusy));
        assert_eq!(a.decide(ip("198.51.100.8"), true), Decision::Admit);
        a.finished(src);
        assert_eq!(a.decide(src, true), Decision::Admit);
        assert_eq!(a.in_flight(), 5);
    }

    #[test]
    fn the_total_bounds_many_sources_and_frees_with_finished() {
        let mut a = Admission::new(Limits {
            per_source: 4,
            total: 8,
        });
        let sources: Vec<IpAddr> = (1..=8).map(|i| ip(&format!("203.0.113.{i}"))).collect();
        for s in &sources {
            assert_eq!(a.decide(*s, true), Decision::Admit);
        }
        assert_eq!(a.decide(ip("203.0.113.99"), true), Decision::Refuse(Refusal::Busy));
        a.finished(sources[3]);
        assert_eq!(a.decide(ip("203.0.113.99"), true), Decision::Admit);
        for s in &sources {
            a.finished(*s);
        }
        a.finished(ip("203.0.113.99"));
        assert_eq!(a.in_flight(), 0);
        assert!(a.in_flight.is_empty(), "sources with nothing in flight are forgotten");
    }

    #[test]
    fn finished_without_admission_changes_nothing() {
        let mut a = Admission::new(Limits::default());
        a.finished(ip("192.0.2.1"));
        assert_eq!(a.in_flight(), 0);
        assert_eq!(a.decide(ip("192.0.2.1"), true), Decision::Admit);
        a.finished(ip("192.0.2.9"));
        assert_eq!(a.in_flight(), 1);
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        let mut a = Admission::new(Limits {
            per_source: 2,
            total: 256,
        });
        assert_eq!(a.decide(ip("2001:db8:1:2::1"), true), Decision::Admit);
        assert_eq!(a.decide(ip("2001:db8:1:2:ffff::9"), true), Decision::Admit);
        assert_eq!(
            a.decide(ip("2001:db8:1:2:abcd::1"), true),
            Decision::Refuse(Refusal::SourceBusy)
        );
        assert_eq!(a.decide(ip("2001:db8:1:3::1"), true), Decision::Admit);
        assert_eq!(a.decide(ip("::ffff:192.0.2.1"), true), Decision::Admit);
        assert_eq!(a.decide(ip("192.0.2.1"), true), Decision::Admit);
        assert_eq!(a.decide(ip("192.0.2.1"), true), Decision::Refuse(Refusal::SourceBusy));
    }

    #[test]
    fn outcomes_name_the_decision() {
        assert_eq!(Decision::Retry.outcome().as_str(), "retry");
        assert_eq!(Decision::Admit.outcome().as_str(), "admitted");
        assert_eq!(
            Decision::Refuse(Refusal::SourceBusy).outcome().as_str(),
            "refused_source"
        );
        assert_eq!(Decision::Refuse(Refusal::Busy).outcome().as_str(), "refused_busy");
    }

    #[test]
    fn throttle_logs_once_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(t.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(25)), Some(1));
    }
}
