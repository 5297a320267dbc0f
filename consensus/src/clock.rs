//! How far another server's clock is from this one's, measured as NTP does: over one request
//! and its answer, which carries the other's clock. The answer was read somewhere within the
//! round trip, so the offset is known to within half of it.
//!
//! Address uniqueness across servers (ADR 0007) holds only while every two servers' clocks are
//! within the drift bound; a reading that is certainly beyond it is what an operator must hear.

/// One measurement of another server's clock against this one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// How far the other clock is ahead (negative: behind), in milliseconds.
    pub offset_ms: i64,
    /// The offset is right to within this much (half the round trip).
    pub uncertainty_ms: u64,
}

impl ClockReading {
    /// The reading from a request sent at `sent_ms` and answered with `peer_ms`, received at
    /// `received_ms` (this server's clock, Unix milliseconds).
    pub fn from_exchange(sent_ms: u64, peer_ms: u64, received_ms: u64) -> Self {
        let round_trip = received_ms.saturating_sub(sent_ms);
        let midpoint = sent_ms.saturating_add(round_trip / 2);
        let offset = i128::from(peer_ms) - i128::from(midpoint);
        Self {
            offset_ms: i64::try_from(offset).unwrap_or(if offset < 0 {
                i64::MIN
            } else {
                i64::MAX
            }),
            uncertainty_ms: round_trip.div_ceil(2),
        }
    }

    /// Whether the two clocks are certainly further apart than `bound_ms`, however the round
    /// trip was split.
    pub fn certainly_beyond(&self, bound_ms: u64) -> bool {
        self.offset_ms.unsigned_abs() > bound_ms.saturating_add(self.uncertainty_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_measured_from_the_middle_of_the_round_trip() {
        let reading = ClockReading::from_exchange(1_000, 16_005, 1_010);
        assert_eq!(reading.offset_ms, 15_000);
        assert_eq!(reading.uncertainty_ms, 5);
        assert!(reading.certainly_beyond(10_000));
        let behind = ClockReading::from_exchange(50_000, 39_000, 50_002);
        assert_eq!(behind.offset_ms, -11_001);
        assert!(behind.certainly_beyond(10_000));
    }

    #[test]
    fn a_slow_answer_is_not_taken_for_a_skewed_clock() {
        // 10.5 s apart at the midpoint, but the answer took 4 s: it may be 8.5 s.
        let reading = ClockReading::from_exchange(0, 12_500, 4_000);
        assert_eq!(reading.offset_ms, 10_500);
        assert!(!reading.certainly_beyond(10_000));
        assert!(!ClockReading::from_exchange(0, 9_000, 2).certainly_beyond(10_000));
    }
}
