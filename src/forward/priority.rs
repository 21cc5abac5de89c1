//! Small-first scheduling of a link's streams: which flows quinn sends first when the link's
//! congestion window has room for only some of them.
//!
//! Every TCP flow of a link is a stream of one QUIC connection, and all of them share its
//! congestion window. quinn sends the streams of the highest priority first and
//! round-robins among equals, so with every stream at one priority a grid's heartbeat or a
//! one-byte request waits for a frame of every bulk transfer on the link before it goes.
//! [`SmallFirst`] gives each direction of a flow a priority from what it sent lately: a flow
//! that sent less than [`BULK_BYTES`] within the current and the previous [`WINDOW`] is
//! *interactive* ([`INTERACTIVE`]) and goes before every *bulk* one ([`BULK`]); a bulk flow
//! that quiets down for a window becomes interactive again. Strict priority cannot starve bulk flows: an interactive
//! one by definition sends little. Pure, unit-tested with times passed in.

use std::time::{Duration, Instant};

/// Stream priority of a flow that sent little lately (quinn: higher goes first).
pub const INTERACTIVE: i32 = 1;
/// Stream priority of a flow that sent at least [`BULK_BYTES`] within [`WINDOW`].
pub const BULK: i32 = 0;
/// Bytes within one [`WINDOW`] from which a flow counts as bulk: 256 KiB in 100 ms is about
/// 20 Mbit/s, far above a request/response or heartbeat flow and far below a transfer.
pub const BULK_BYTES: u64 = 256 * 1024;
/// How far back "lately" reaches.
pub const WINDOW: Duration = Duration::from_millis(100);

/// One direction of one flow: how much it sent in the current window, and the priority its
/// stream has now.
#[derive(Debug, Clone)]
pub struct SmallFirst {
    /// Start of the current window.
    since: Instant,
    /// Bytes sent since `since`.
    sent: u64,
    /// Bytes sent in the window before, if it directly preceded this one: a steady transfer
    /// stays bulk across window boundaries.
    previous: u64,
    /// The priority last given to the stream, so it is set only on a change.
    priority: i32,
}

impl SmallFirst {
    /// A new flow starts interactive; its stream is opened with [`INTERACTIVE`].
    pub fn new(now: Instant) -> SmallFirst {
        SmallFirst {
            since: now,
            sent: 0,
            previous: 0,
            priority: INTERACTIVE,
        }
    }

    /// The priority a new flow's stream is opened with.
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// The flow is about to send `bytes` at `now`: returns the stream's new priority when it
    /// changes (the caller sets it before writing), else `None`.
    pub fn on_send(&mut self, bytes: usize, now: Instant) -> Option<i32> {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= WINDOW {
            // A new window; the one before counts only if it just ended.
            self.previous = if elapsed < 2 * WINDOW { self.sent } else { 0 };
            self.since = now;
            self.sent = 0;
        }
        self.sent = self.sent.saturating_add(bytes as u64);
        let lately = self.sent.saturating_add(self.previous);
        let priority = if lately >= BULK_BYTES { BULK } else { INTERACTIVE };
        (priority != self.priority).then(|| {
            self.priority = priority;
            priority
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_response_flow_stays_interactive() {
        let t0 = Instant::now();
        let mut f = SmallFirst::new(t0);
        assert_eq!(f.priority(), INTERACTIVE);
        // 1,000 one-byte pings a millisecond apart, and a few 16 KiB answers.
        for i in 0..1000u32 {
            assert_eq!(f.on_send(1, t0 + Duration::from_millis(i.into())), None);
        }
        for i in 0..10u32 {
            assert_eq!(
                f.on_send(16 * 1024, t0 + Duration::from_millis(1000 + 20 * u64::from(i))),
                None
            );
        }
        assert_eq!(f.priority(), INTERACTIVE);
    }

    #[test]
    fn a_transfer_becomes_bulk_and_a_quiet_one_interactive_again() {
        let t0 = Instant::now();
        let mut f = SmallFirst::new(t0);
        // 64 KiB writes back to back: the fourth reaches 256 KiB within the window.
        assert_eq!(f.on_send(64 * 1024, t0), None);
        assert_eq!(f.on_send(64 * 1024, t0 + Duration::from_millis(1)), None);
        assert_eq!(f.on_send(64 * 1024, t0 + Duration::from_millis(2)), None);
        assert_eq!(f.on_send(64 * 1024, t0 + Duration::from_millis(3)), Some(BULK));
        assert_eq!(f.on_send(64 * 1024, t0 + Duration::from_millis(4)), None, "set once");
        // Still sending in the next windows: stays bulk across their boundaries.
        for w in 1..5u32 {
            for i in 0..8u64 {
                let at = t0 + WINDOW * w + Duration::from_millis(i * 10);
                assert_eq!(f.on_send(64 * 1024, at), None, "window {w}");
            }
        }
        // It pauses for a window: the first small write after it is interactive again.
        assert_eq!(f.on_send(10, t0 + WINDOW * 7), Some(INTERACTIVE));
    }

    #[test]
    fn time_going_backwards_or_huge_writes_do_not_panic() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut f = SmallFirst::new(t0);
        assert_eq!(f.on_send(usize::MAX, t0 - Duration::from_secs(5)), Some(BULK));
        assert_eq!(f.on_send(usize::MAX, t0), None);
    }
}
