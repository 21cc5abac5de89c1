//! Reconnect pacing: exponential backoff with jitter, capped.
//!
//! A plain value with the randomness passed in, so its schedule is tested exactly.

use std::time::Duration;

/// Delays between reconnect attempts: `base`, doubling per failure up to `cap`, each scaled
/// by a random factor in [0.5, 1.0] so that many dialers do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay after a failure.
    base: Duration,
    /// Largest delay; the issue caps it at 5 s so a link returns quickly after an outage.
    cap: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, failures: 0 }
    }

    /// The delay before the next attempt; `unit` is a random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let full = self.base.saturating_mul(1u32 << exp).min(self.cap);
        full.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Called after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_with_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let maxes: Vec<_> = (0..10).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(maxes[0], Duration::from_millis(100));
        assert_eq!(maxes[1], Duration::from_millis(200));
        assert_eq!(maxes[5], Duration::from_millis(3200));
        assert!(maxes[6..].iter().all(|d| *d == Duration::from_secs(5)));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(2500));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }
}
