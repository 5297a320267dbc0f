//! Which peer a chunk went to last (ADR 0009): after sending a chunk to one peer, a member
//! declines other peers' requests for it and names that peer instead, until the recipient has
//! announced the chunk and a grace period has passed (its other neighbours heard the
//! announcement too, and ask it rather than this member). A seed's upload then goes to new
//! copies, not to the same chunk twenty times at the start of a storm.
//!
//! Tied to the recipient's announcement, not to a clock alone, so that slow recipients (a
//! loaded machine, a debug build) do not turn declines into duplicates.
//!
//! A seed (a member that holds the whole image) holds duplicates back only while it is busy
//! (requests wait for its upload, ADR 0011): a duplicate then would displace a new copy, but
//! an idle seed that declines only makes the requester wait (seconds, against the
//! milliseconds a chunk takes on a datacenter link) while its own link stands still. A member
//! that is still fetching always holds them back: its declines also keep a chunk that just
//! entered a rack spreading inside it, where an idle fetcher in another rack would otherwise
//! send it across the uplinks again (measured in the storm engine and in the namespace lab).
//!
//! Sans-IO: the driver hands in the time and says which peers are live; the same rule runs in
//! `node`'s peerings and in the simulator.

use std::time::{Duration, Instant};

/// The timings of the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimTimings {
    /// How long after the recipient announced the chunk others are still pointed at it.
    pub announced_grace: Duration,
    /// And at least this long after the send: on a fast machine the announcement comes within
    /// milliseconds, and the recipient's neighbours need a moment to ask it instead.
    pub sent_window: Duration,
    /// How long a recipient that never announces the chunk (it gave up on the request, or
    /// failed to verify or store it) holds the others back.
    pub in_transit_max: Duration,
    /// The "ask again" hint while a chunk is in transit to its first recipient.
    pub in_transit_retry: Duration,
}

impl Default for ClaimTimings {
    fn default() -> Self {
        Self {
            announced_grace: Duration::from_secs(3),
            sent_window: Duration::from_secs(5),
            in_transit_max: Duration::from_secs(10),
            in_transit_retry: Duration::from_secs(1),
        }
    }
}

/// The last send of one chunk.
#[derive(Debug, Clone, Copy)]
struct SentRecord<P> {
    at: Instant,
    recipient: P,
    /// When the recipient announced the chunk, if it has.
    announced_at: Option<Instant>,
}

/// Per chunk of one image: its last send. `P` names peers (an address in `node`, an index in
/// the simulator).
#[derive(Debug, Clone)]
pub struct SendClaims<P> {
    timings: ClaimTimings,
    last_sent: Vec<Option<SentRecord<P>>>,
}

impl<P: Copy + PartialEq> SendClaims<P> {
    /// No sends yet, for an image of `chunk_count` chunks.
    pub fn new(chunk_count: u32, timings: ClaimTimings) -> Self {
        Self {
            timings,
            last_sent: vec![None; chunk_count as usize],
        }
    }

    /// Whether chunk `index` is on its way to, or was just announced by, another live peer
    /// than `requester`, and duplicates are held back now (`hold_back`: the driver's call, see
    /// the module's text): if so, that peer and when to ask again. Otherwise the send to
    /// `requester` is noted at `now`.
    pub fn claim(
        &mut self,
        now: Instant,
        index: u32,
        requester: P,
        hold_back: bool,
        is_live: impl Fn(&P) -> bool,
    ) -> Result<(), (P, Duration)> {
        let Some(slot) = self.last_sent.get_mut(index as usize) else {
            return Ok(());
        };
        if hold_back
            && let Some(record) = *slot
            && record.recipient != requester
            && is_live(&record.recipient)
        {
            let since_sent = now.saturating_duration_since(record.at);
            let wait = match record.announced_at {
                Some(announced) => self
                    .timings
                    .announced_grace
                    .saturating_sub(now.saturating_duration_since(announced))
                    .max(self.timings.sent_window.saturating_sub(since_sent)),
                None => self
                    .timings
                    .in_transit_max
                    .saturating_sub(since_sent)
                    .min(self.timings.in_transit_retry),
            };
            if !wait.is_zero() {
                return Err((record.recipient, wait));
            }
        }
        *slot = Some(SentRecord {
            at: now,
            recipient: requester,
            announced_at: None,
        });
        Ok(())
    }

    /// The send of chunk `index` to `requester` did not happen after all.
    pub fn release(&mut self, index: u32, requester: P) {
        if let Some(slot) = self.last_sent.get_mut(index as usize)
            && slot.is_some_and(|record| {
                record.recipient == requester && record.announced_at.is_none()
            })
        {
            *slot = None;
        }
    }

    /// `peer` announced chunk `index` at `now`.
    pub fn note_announced(&mut self, now: Instant, index: u32, peer: P) {
        if let Some(Some(record)) = self.last_sent.get_mut(index as usize)
            && record.recipient == peer
            && record.announced_at.is_none()
        {
            record.announced_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The origin of virtual time; nothing depends on its value.
    #[expect(
        clippy::disallowed_methods,
        reason = "an Instant can only be made from the clock; the claims never read it"
    )]
    fn virtual_start() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_chunk_in_transit_points_others_at_its_recipient_until_announced_and_the_grace_ends() {
        let start = virtual_start();
        let mut claims = SendClaims::new(4, ClaimTimings::default());
        let live = |_: &u32| true;
        assert_eq!(claims.claim(start, 2, 10, true, live), Ok(()));
        // In transit: others are pointed at peer 10 and asked to come back within a second.
        assert_eq!(
            claims.claim(start + Duration::from_millis(100), 2, 11, true, live),
            Err((10, Duration::from_secs(1)))
        );
        // The recipient itself may ask again (a retry of its own request).
        assert_eq!(claims.claim(start, 2, 10, true, live), Ok(()));
        // Announced at 1 s: the others wait for the grace after it, and the window after the send.
        claims.note_announced(start + Duration::from_secs(1), 2, 10);
        assert_eq!(
            claims.claim(start + Duration::from_secs(2), 2, 11, true, live),
            Err((10, Duration::from_secs(3)))
        );
        assert_eq!(
            claims.claim(start + Duration::from_secs(5), 2, 11, true, live),
            Ok(())
        );
    }

    #[test]
    fn a_dead_recipient_or_a_released_send_holds_nobody_back() {
        let start = virtual_start();
        let mut claims = SendClaims::new(4, ClaimTimings::default());
        assert_eq!(claims.claim(start, 1, 10u32, true, |_| true), Ok(()));
        assert_eq!(claims.claim(start, 1, 11, true, |peer| *peer != 10), Ok(()));
        claims.release(1, 11);
        assert_eq!(claims.claim(start, 1, 12, true, |_| true), Ok(()));
        // Out of range: nothing to hold back.
        assert_eq!(claims.claim(start, 9, 12, true, |_| true), Ok(()));
        // An idle seed sends a duplicate rather than let its link stand still.
        assert_eq!(claims.claim(start, 1, 14, false, |_| true), Ok(()));
        assert_eq!(
            claims.claim(start, 1, 13, true, |_| true),
            Err((14, Duration::from_secs(1)))
        );
        // A recipient that never announces holds the others back at most `in_transit_max`.
        let later = start + ClaimTimings::default().in_transit_max;
        assert_eq!(claims.claim(later, 1, 15, true, |_| true), Ok(()));
    }
}
