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
//! (requests wait for its upload, ADR 0011), and then for as long as it stays busy: a
//! duplicate would displace a new copy. An idle seed that declined would only make the
//! requester wait (seconds, against the milliseconds a chunk takes on a datacenter link)
//! while its own link stands still. A member that is still fetching holds them back for the
//! windows of [`ClaimTimings`]: its declines also keep a chunk that just entered a rack
//! spreading inside it, where an idle fetcher in another rack would otherwise send it across
//! the uplinks again (measured in the storm engine and in the namespace lab).
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
    /// Tenths of a second, not seconds (ADR 0011): a chunk takes 0.2 ms on a 10 Gbit/s link
    /// and 20 ms on a 100 Mbit/s one, and its recipient's neighbours hear of it within a
    /// round trip. Second-long windows made fetchers wait seconds for chunks a neighbour could
    /// send at once (storm engine: fetch p99 5.4 s against 0.5 s with these, 1,024 nodes on
    /// 10 Gbit/s; the namespace lab: see BENCHMARKS.md).
    fn default() -> Self {
        Self {
            announced_grace: Duration::from_millis(300),
            sent_window: Duration::from_millis(500),
            in_transit_max: Duration::from_secs(10),
            in_transit_retry: Duration::from_millis(100),
        }
    }
}

/// Whether, and how long, duplicates are held back now: the driver's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldBack {
    /// Never: an idle seed sends a duplicate rather than let its link stand still.
    Never,
    /// As long as the recipient is live (and, if it has not announced the chunk, at most
    /// `in_transit_max`): a busy seed's upload goes to new copies first, whatever the clock
    /// says, and duplicates wait until it has nothing new to send.
    WhileBusy,
    /// For the windows of [`ClaimTimings`]: a member still fetching, whose declines keep a
    /// chunk that entered its rack spreading inside it.
    Windows,
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
    /// than `requester`, and duplicates are held back now (`hold_back`, see the module's
    /// text): if so, that peer and when to ask again. Otherwise the send to `requester` is
    /// noted at `now`.
    pub fn claim(
        &mut self,
        now: Instant,
        index: u32,
        requester: P,
        hold_back: HoldBack,
        is_live: impl Fn(&P) -> bool,
    ) -> Result<(), (P, Duration)> {
        let Some(slot) = self.last_sent.get_mut(index as usize) else {
            return Ok(());
        };
        if hold_back != HoldBack::Never
            && let Some(record) = *slot
            && record.recipient != requester
            && is_live(&record.recipient)
        {
            let since_sent = now.saturating_duration_since(record.at);
            let in_transit = self
                .timings
                .in_transit_max
                .saturating_sub(since_sent)
                .min(self.timings.in_transit_retry);
            let wait = match (record.announced_at, hold_back) {
                (Some(_), HoldBack::WhileBusy) => self.timings.announced_grace,
                (Some(announced), _) => self
                    .timings
                    .announced_grace
                    .saturating_sub(now.saturating_duration_since(announced))
                    .max(self.timings.sent_window.saturating_sub(since_sent)),
                (None, _) => in_transit,
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

    /// The timings of the first version (seconds), which the tests below read easily.
    fn seconds() -> ClaimTimings {
        ClaimTimings {
            announced_grace: Duration::from_secs(3),
            sent_window: Duration::from_secs(5),
            in_transit_max: Duration::from_secs(10),
            in_transit_retry: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_chunk_in_transit_points_others_at_its_recipient_until_announced_and_the_grace_ends() {
        let start = virtual_start();
        let mut claims = SendClaims::new(4, seconds());
        let live = |_: &u32| true;
        assert_eq!(claims.claim(start, 2, 10, HoldBack::Windows, live), Ok(()));
        // In transit: others are pointed at peer 10 and asked to come back within a second.
        assert_eq!(
            claims.claim(
                start + Duration::from_millis(100),
                2,
                11,
                HoldBack::Windows,
                live
            ),
            Err((10, Duration::from_secs(1)))
        );
        // The recipient itself may ask again (a retry of its own request).
        assert_eq!(claims.claim(start, 2, 10, HoldBack::Windows, live), Ok(()));
        // Announced at 1 s: the others wait for the grace after it, and the window after the send.
        claims.note_announced(start + Duration::from_secs(1), 2, 10);
        assert_eq!(
            claims.claim(
                start + Duration::from_secs(2),
                2,
                11,
                HoldBack::Windows,
                live
            ),
            Err((10, Duration::from_secs(3)))
        );
        assert_eq!(
            claims.claim(
                start + Duration::from_secs(5),
                2,
                11,
                HoldBack::Windows,
                live
            ),
            Ok(())
        );
    }

    #[test]
    fn a_busy_seed_holds_duplicates_back_whatever_the_windows_say() {
        let start = virtual_start();
        let mut claims = SendClaims::new(2, seconds());
        assert_eq!(
            claims.claim(start, 0, 10u32, HoldBack::WhileBusy, |_| true),
            Ok(())
        );
        claims.note_announced(start, 0, 10);
        let much_later = start + Duration::from_secs(60);
        assert_eq!(
            claims.claim(much_later, 0, 11, HoldBack::WhileBusy, |_| true),
            Err((10, Duration::from_secs(3)))
        );
        // Not busy any more: the duplicate goes.
        assert_eq!(
            claims.claim(much_later, 0, 11, HoldBack::Never, |_| true),
            Ok(())
        );
    }

    #[test]
    fn a_dead_recipient_or_a_released_send_holds_nobody_back() {
        let start = virtual_start();
        let mut claims = SendClaims::new(4, seconds());
        assert_eq!(
            claims.claim(start, 1, 10u32, HoldBack::Windows, |_| true),
            Ok(())
        );
        assert_eq!(
            claims.claim(start, 1, 11, HoldBack::Windows, |peer| *peer != 10),
            Ok(())
        );
        claims.release(1, 11);
        assert_eq!(
            claims.claim(start, 1, 12, HoldBack::Windows, |_| true),
            Ok(())
        );
        // Out of range: nothing to hold back.
        assert_eq!(
            claims.claim(start, 9, 12, HoldBack::Windows, |_| true),
            Ok(())
        );
        // An idle seed sends a duplicate rather than let its link stand still.
        assert_eq!(
            claims.claim(start, 1, 14, HoldBack::Never, |_| true),
            Ok(())
        );
        assert_eq!(
            claims.claim(start, 1, 13, HoldBack::Windows, |_| true),
            Err((14, Duration::from_secs(1)))
        );
        // A recipient that never announces holds the others back at most `in_transit_max`.
        let later = start + seconds().in_transit_max;
        assert_eq!(
            claims.claim(later, 1, 15, HoldBack::Windows, |_| true),
            Ok(())
        );
    }
}
