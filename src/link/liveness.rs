//! Whether a link's peer is still heard: the `links.down_after` rule as a plain state machine.
//!
//! QUIC keep-alives make a healthy connection receive a packet at least every keep-alive
//! interval. A link whose connection has received nothing for `down_after` is **silent**: it
//! leaves routing and DNS (new flows take another path or see the endpoint gone), while the
//! connection and its flows are kept until the QUIC idle timeout (`links.idle_timeout`), so an
//! outage shorter than that costs no flow. The first packet heard again makes it usable at once.
//! The session feeds this the connection's received-datagram count on a timer (no sockets
//! here), and acts on the [`Change`]s it returns.

use std::time::{Duration, Instant};

/// A change in whether the peer is heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing received for `down_after`: out of routing and DNS.
    Silent,
    /// A packet arrived after a silence: back in routing and DNS.
    Heard,
}

/// Tracks when a connection last received anything.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// Silence that makes the link count as down.
    down_after: Duration,
    /// Datagrams received as of the last observation; any increase means the peer was heard.
    received: u64,
    /// When an increase was last seen.
    heard: Instant,
    /// Whether the link is silent now.
    silent: bool,
}

impl Liveness {
    /// Starts tracking at `now`, with `received` datagrams so far; the peer counts as heard.
    pub fn new(down_after: Duration, now: Instant, received: u64) -> Self {
        Liveness {
            down_after,
            received,
            heard: now,
            silent: false,
        }
    }

    /// How often to observe: a quarter of `down_after` (at least 10 ms), so silence is noticed
    /// within 1.25 × `down_after`.
    pub fn interval(&self) -> Duration {
        (self.down_after / 4).max(Duration::from_millis(10))
    }

    /// Whether the link is silent now.
    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// Takes the received-datagram count at `now`; returns a change, if there is one.
    pub fn observe(&mut self, now: Instant, received: u64) -> Option<Change> {
        if received != self.received {
            self.received = received;
            self.heard = now;
            if self.silent {
                self.silent = false;
                return Some(Change::Heard);
            }
        } else if !self.silent && now.saturating_duration_since(self.heard) >= self.down_after {
            self.silent = true;
            return Some(Change::Silent);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_after_down_after_and_back_on_the_first_packet() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Liveness::new(Duration::from_secs(3), t0, 10);
        assert_eq!(l.interval(), Duration::from_millis(750));
        // Packets keep arriving: never silent.
        assert_eq!(l.observe(t0 + s, 11), None);
        assert_eq!(l.observe(t0 + 3 * s, 12), None);
        // Nothing for 2.9 s: still up; at 3 s: silent, once.
        assert_eq!(l.observe(t0 + 5 * s + Duration::from_millis(900), 12), None);
        assert_eq!(l.observe(t0 + 6 * s, 12), Some(Change::Silent));
        assert!(l.is_silent());
        assert_eq!(l.observe(t0 + 20 * s, 12), None);
        // The first packet heard again: back at once.
        assert_eq!(l.observe(t0 + 21 * s, 13), Some(Change::Heard));
        assert!(!l.is_silent());
        assert_eq!(l.observe(t0 + 22 * s, 14), None);
        // A new silence counts from the last packet.
        assert_eq!(l.observe(t0 + 24 * s, 14), None);
        assert_eq!(l.observe(t0 + 25 * s, 14), Some(Change::Silent));
    }

    #[test]
    fn interval_has_a_floor() {
        let l = Liveness::new(Duration::from_millis(20), Instant::now(), 0);
        assert_eq!(l.interval(), Duration::from_millis(10));
    }
}
