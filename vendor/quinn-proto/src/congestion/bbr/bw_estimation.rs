use std::collections::VecDeque;
use std::fmt::{Debug, Display, Formatter};

use super::min_max::MinMax;
use crate::{Duration, Instant};

/// causeway patch: delivery-rate samples as in BBR's draft (section "Delivery Rate
/// Estimation"). Upstream's sample for each acknowledged packet was that one packet's bytes
/// divided by the time since the previous acknowledgement (and by the time between the last
/// two sends): with many packets per ACK frame and per GSO send, it measured one packet per
/// ACK interval, a fraction of the real rate (44 MB/s for a 250 MB/s link). With the
/// bandwidth underestimated, the ACK arrival rate always exceeded it, the ack-aggregation
/// epoch never ended, and its "excess" (everything acknowledged since) went into the window:
/// 2 GB measured, so nothing but flow control bounded the data in flight and the queue in
/// front of the slowest hop. Here each send (a GSO batch shares one send time) records how
/// much had been delivered and when; when a packet of it is acknowledged, the sample is the
/// bytes delivered since over the longer of the send and the acknowledgement intervals.
#[derive(Clone, Debug, Default)]
pub(crate) struct BandwidthEstimation {
    total_acked: u64,
    /// When the latest acknowledgement arrived, and when the packet it acknowledged was sent.
    delivered_time: Option<Instant>,
    first_sent_time: Option<Instant>,
    /// Per send still unacknowledged, oldest first: (send time, total_acked then,
    /// delivered_time then, first_sent_time then).
    sends: VecDeque<(Instant, u64, Instant, Instant)>,
    max_filter: MinMax,
    acked_at_last_window: u64,
}

/// Sends remembered at most (a bound on memory if acknowledgements stop coming).
const MAX_SENDS: usize = 1 << 16;

impl BandwidthEstimation {
    pub(crate) fn on_sent(&mut self, now: Instant, _bytes: u64) {
        if self.sends.is_empty() {
            // Nothing in flight: intervals start now, not at the last acknowledgement.
            self.delivered_time = Some(now);
            self.first_sent_time = Some(now);
        }
        if self.sends.len() == MAX_SENDS {
            self.sends.pop_front();
        }
        self.sends.push_back((
            now,
            self.total_acked,
            self.delivered_time.unwrap_or(now),
            self.first_sent_time.unwrap_or(now),
        ));
    }

    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        round: u64,
        app_limited: bool,
        min_rtt: Duration,
    ) {
        self.total_acked += bytes;
        self.delivered_time = Some(now);
        self.first_sent_time = Some(sent);
        // Sends before this packet's are acknowledged or lost by now (ACKs rarely reorder;
        // a late one only loses its sample).
        while self.sends.front().is_some_and(|s| s.0 < sent) {
            self.sends.pop_front();
        }
        let Some(&(at, delivered, delivered_time, first_sent)) = self.sends.front() else {
            return;
        };
        if at != sent {
            return;
        }
        let interval = sent
            .saturating_duration_since(first_sent)
            .max(now.saturating_duration_since(delivered_time));
        // Shorter than a round trip, the sample measures ACK compression, not the path.
        if interval.is_zero() || interval < min_rtt {
            return;
        }
        // An app-limited sample is a lower bound on the bandwidth: it may raise the windowed
        // maximum but does not count towards it otherwise (as in the draft).
        let bandwidth = Self::bw_from_delta(self.total_acked - delivered, interval).unwrap_or(0);
        if !app_limited || self.max_filter.get() < bandwidth {
            self.max_filter.update_max(round, bandwidth);
        }
    }

    pub(crate) fn bytes_acked_this_window(&self) -> u64 {
        self.total_acked - self.acked_at_last_window
    }

    pub(crate) fn end_acks(&mut self, _current_round: u64, _app_limited: bool) {
        self.acked_at_last_window = self.total_acked;
    }

    pub(crate) fn get_estimate(&self) -> u64 {
        self.max_filter.get()
    }

    pub(crate) const fn bw_from_delta(bytes: u64, delta: Duration) -> Option<u64> {
        let window_duration_ns = delta.as_nanos();
        if window_duration_ns == 0 {
            return None;
        }
        let b_ns = bytes * 1_000_000_000;
        let bytes_per_second = b_ns / (window_duration_ns as u64);
        Some(bytes_per_second)
    }
}

impl Display for BandwidthEstimation {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} MB/s",
            self.get_estimate() as f32 / (1024 * 1024) as f32
        )
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// causeway patch: batches of 40 packets sent every 100 µs (580 MB/s), each acknowledged
    /// by one ACK frame 1 ms later. Upstream's per-packet samples gave one packet per ACK
    /// interval (14.5 MB/s); delivery-rate samples give the real rate.
    #[test]
    fn estimate_follows_the_delivery_rate_of_batched_sends_and_acks() {
        const PACKET: u64 = 1452;
        let mut bw = BandwidthEstimation::default();
        let start = Instant::now();
        let gap = Duration::from_micros(100);
        let rtt = Duration::from_millis(1);
        let sent_at = |i: u32| start + gap * i;
        let mut round = 0;
        for i in 0..200u32 {
            bw.on_sent(sent_at(i), 40 * PACKET);
            // The batch sent one RTT ago is acknowledged now, all 40 packets in one frame.
            if let Some(j) = i.checked_sub(10) {
                for _ in 0..40 {
                    bw.on_ack(sent_at(i), sent_at(j), PACKET, round, false, rtt);
                }
                round += 1;
            }
        }
        let real = 40 * PACKET * 10_000;
        let est = bw.get_estimate();
        assert!(
            est > real * 9 / 10 && est < real * 11 / 10,
            "estimate {est}, real {real}"
        );
    }
}
