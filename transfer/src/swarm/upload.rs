//! Upload control (DESIGN 5.3): one gate per node decides which requested chunk is sent next.
//! A token bucket caps the node's upload rate, so seeding never starves the node's own work;
//! waiting requests are served in strict priority order (on-demand, then boot trace, then
//! background); and the queue is bounded: when it is full, a request is answered "busy" at
//! once (with a hint of when to ask again) instead of waiting without end. A more urgent request
//! that finds the queue full pushes out the newest of the least urgent ones, which is answered
//! "busy" instead.
//!
//! Sans-IO: the driver numbers requests (`Ticket`), reports them with the time, sends what
//! [`UploadGate::poll_event`] releases, reports each send as done, and wakes the gate at
//! [`UploadGate::poll_timeout`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::wire::Priority;

/// A request, as the driver numbers them (unique among those not yet done).
pub type Ticket = u64;

/// The gate's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadConfig {
    /// The upload rate; `None` leaves it to the network.
    pub bytes_per_second: Option<u64>,
    /// Bytes that may go out at once after a quiet spell.
    pub burst_bytes: u64,
    /// Requests waiting, all priorities together.
    pub queued_max: usize,
    /// Chunks being sent at once.
    pub sending_max: usize,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            bytes_per_second: None,
            burst_bytes: 4 * 1024 * 1024,
            queued_max: 256,
            sending_max: 32,
        }
    }
}

/// What became of a request when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It waits its turn; [`UploadEvent::Send`] releases it.
    Queued,
    /// Refused now: answer "busy, ask again after `retry_after`".
    Busy {
        /// The hint for the requester.
        retry_after: Duration,
    },
}

/// What the driver is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadEvent {
    /// Send the chunk of `ticket` now, then report [`UploadGate::handle_sent`].
    Send(Ticket),
    /// A more urgent request took the place of `ticket`: answer it "busy".
    Busy {
        /// The request pushed out.
        ticket: Ticket,
        /// The hint for the requester.
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    ticket: Ticket,
    bytes: u32,
}

/// The shortest and longest "ask again" hints: a requester should not spin, nor give up on a
/// peer that will have room in a moment.
const RETRY_AFTER_MIN: Duration = Duration::from_millis(50);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(5);

/// One node's upload gate.
#[derive(Debug)]
pub struct UploadGate {
    config: UploadConfig,
    /// Bytes that may go out now. A chunk goes whenever this is not below zero, even if it is
    /// larger than what is left (a chunk is never split): the bucket lends the difference and
    /// the next send waits until the debt is paid.
    tokens: i64,
    refilled_at: Option<Instant>,
    /// Waiting requests, by priority (most urgent last, as `Priority` orders them).
    waiting: BTreeMap<Priority, VecDeque<Waiting>>,
    waiting_count: usize,
    sending: usize,
    events: VecDeque<UploadEvent>,
}

impl UploadGate {
    /// A gate with `config`, its bucket full.
    pub fn new(config: UploadConfig) -> Self {
        Self {
            config,
            tokens: i64::try_from(config.burst_bytes).unwrap_or(i64::MAX),
            refilled_at: None,
            waiting: BTreeMap::new(),
            waiting_count: 0,
            sending: 0,
            events: VecDeque::new(),
        }
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting_count
    }

    /// Chunks being sent.
    pub fn sending(&self) -> usize {
        self.sending
    }

    /// Whether another send now would wait: requests are waiting, or every send slot is in
    /// use. (What a duplicate would displace; see `SendClaims`.)
    pub fn is_busy(&self) -> bool {
        self.waiting_count > 0 || self.sending >= self.config.sending_max
    }

    /// A request for a chunk of `bytes` bytes arrived.
    pub fn handle_request(
        &mut self,
        now: Instant,
        ticket: Ticket,
        priority: Priority,
        bytes: u32,
    ) -> Admission {
        self.refill(now);
        if self.waiting_count >= self.config.queued_max {
            let Some(pushed_out) = self.push_out_below(priority) else {
                return Admission::Busy {
                    retry_after: self.retry_hint(),
                };
            };
            let retry_after = self.retry_hint();
            self.events.push_back(UploadEvent::Busy {
                ticket: pushed_out,
                retry_after,
            });
        }
        self.waiting
            .entry(priority)
            .or_default()
            .push_back(Waiting { ticket, bytes });
        self.waiting_count += 1;
        Admission::Queued
    }

    /// The requester gave up on `ticket` before it was sent.
    pub fn handle_cancel(&mut self, ticket: Ticket) {
        for queue in self.waiting.values_mut() {
            if let Some(position) = queue.iter().position(|waiting| waiting.ticket == ticket) {
                queue.remove(position);
                self.waiting_count -= 1;
                return;
            }
        }
    }

    /// The send of a released ticket ended (delivered or failed): its slot is free.
    pub fn handle_sent(&mut self) {
        self.sending = self.sending.saturating_sub(1);
    }

    /// The next thing to do, if any may be done at `now`.
    pub fn poll_event(&mut self, now: Instant) -> Option<UploadEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        self.refill(now);
        if self.sending >= self.config.sending_max || self.tokens < 0 {
            return None;
        }
        let (_, queue) = self
            .waiting
            .iter_mut()
            .rev()
            .find(|(_, queue)| !queue.is_empty())?;
        let next = queue.pop_front()?;
        self.waiting_count -= 1;
        self.sending += 1;
        if self.config.bytes_per_second.is_some() {
            self.tokens -= i64::from(next.bytes);
        }
        Some(UploadEvent::Send(next.ticket))
    }

    /// When the bucket will allow the next send, if a request waits for tokens.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.events.is_empty() {
            return self.refilled_at;
        }
        if self.waiting_count == 0 || self.sending >= self.config.sending_max || self.tokens >= 0 {
            return None;
        }
        let rate = self.config.bytes_per_second?;
        let refilled_at = self.refilled_at?;
        Some(refilled_at + duration_for(self.tokens.unsigned_abs(), rate))
    }

    fn refill(&mut self, now: Instant) {
        let Some(rate) = self.config.bytes_per_second else {
            self.refilled_at = Some(now);
            return;
        };
        let Some(last) = self.refilled_at else {
            self.refilled_at = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(last);
        let earned = u128::from(rate) * elapsed.as_nanos() / 1_000_000_000;
        if earned == 0 {
            // Leave `refilled_at` alone so that fractions of a byte add up over calls.
            return;
        }
        // Advance by the time the whole bytes took, not to `now`, so nothing is lost to
        // rounding.
        let earned_bytes = u64::try_from(earned).unwrap_or(u64::MAX);
        self.refilled_at = Some(last + duration_for(earned_bytes, rate));
        let burst = i64::try_from(self.config.burst_bytes).unwrap_or(i64::MAX);
        self.tokens = self
            .tokens
            .saturating_add(i64::try_from(earned_bytes).unwrap_or(i64::MAX))
            .min(burst);
        if self.tokens == burst {
            self.refilled_at = Some(now);
        }
    }

    /// Drops the newest waiting request less urgent than `priority`, if there is one.
    fn push_out_below(&mut self, priority: Priority) -> Option<Ticket> {
        let (_, queue) = self
            .waiting
            .range_mut(..priority)
            .find(|(_, queue)| !queue.is_empty())?;
        let pushed_out = queue.pop_back()?;
        self.waiting_count -= 1;
        Some(pushed_out.ticket)
    }

    /// How long until the queue has drained: what is waiting and the debt, at the rate.
    fn retry_hint(&self) -> Duration {
        let Some(rate) = self.config.bytes_per_second else {
            return RETRY_AFTER_MIN;
        };
        let waiting_bytes: u64 = self
            .waiting
            .values()
            .flatten()
            .map(|waiting| u64::from(waiting.bytes))
            .sum();
        let debt = self.tokens.min(0).unsigned_abs();
        duration_for(waiting_bytes.saturating_add(debt), rate)
            .clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
    }
}

/// How long `bytes` take at `rate` bytes per second (rounded up to the nanosecond).
fn duration_for(bytes: u64, rate: u64) -> Duration {
    let rate = u128::from(rate.max(1));
    let nanos = (u128::from(bytes) * 1_000_000_000).div_ceil(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic, reason = "a failed step fails the test")]
    use super::*;

    /// The origin of virtual time; nothing depends on its value.
    #[expect(
        clippy::disallowed_methods,
        reason = "an Instant can only be made from the clock; the gate never reads it"
    )]
    fn virtual_start() -> Instant {
        Instant::now()
    }

    const CHUNK: u32 = 64 * 1024;

    fn limited(bytes_per_second: u64, burst_bytes: u64, queued_max: usize) -> UploadGate {
        UploadGate::new(UploadConfig {
            bytes_per_second: Some(bytes_per_second),
            burst_bytes,
            queued_max,
            sending_max: 64,
        })
    }

    fn drain(gate: &mut UploadGate, now: Instant) -> Vec<UploadEvent> {
        std::iter::from_fn(|| gate.poll_event(now)).collect()
    }

    #[test]
    fn the_most_urgent_waiting_request_goes_first() {
        let start = virtual_start();
        // A bucket in debt: everything waits, then leaves in priority order.
        let mut gate = limited(u64::from(CHUNK), 0, 16);
        gate.tokens = -1;
        gate.refilled_at = Some(start);
        assert_eq!(
            gate.handle_request(start, 1, Priority::Background, CHUNK),
            Admission::Queued
        );
        gate.handle_request(start, 2, Priority::BootTrace, CHUNK);
        gate.handle_request(start, 3, Priority::OnDemand, CHUNK);
        gate.handle_request(start, 4, Priority::OnDemand, CHUNK);
        assert_eq!(drain(&mut gate, start), vec![]);
        let mut order = Vec::new();
        while order.len() < 4 {
            let now = gate.poll_timeout().expect("requests wait for tokens");
            for event in drain(&mut gate, now) {
                let UploadEvent::Send(ticket) = event else {
                    panic!("unexpected {event:?}");
                };
                order.push(ticket);
                gate.handle_sent();
            }
        }
        assert_eq!(order, vec![3, 4, 2, 1]);
    }

    #[test]
    fn the_bucket_holds_the_rate_over_time() {
        let start = virtual_start();
        let rate = 1_000_000;
        let burst = u64::from(CHUNK);
        let mut gate = limited(rate, burst, 1024);
        for ticket in 0..200 {
            gate.handle_request(start, ticket, Priority::Background, CHUNK);
        }
        let mut now = start;
        let mut sent_bytes = 0u64;
        for _ in 0..10_000 {
            for event in drain(&mut gate, now) {
                assert!(matches!(event, UploadEvent::Send(_)));
                sent_bytes += u64::from(CHUNK);
                gate.handle_sent();
            }
            let Some(wake) = gate.poll_timeout() else {
                break;
            };
            assert!(wake >= now, "the gate must not ask to be woken in the past");
            now = wake;
        }
        assert_eq!(gate.waiting(), 0, "every request was sent");
        // What went out is the burst plus the rate over the time taken, give or take the one
        // chunk the bucket lends.
        let elapsed_nanos = (now - start).as_nanos();
        let earned =
            u64::try_from(u128::from(rate) * elapsed_nanos / 1_000_000_000).expect("a short test");
        assert!(
            sent_bytes <= burst + earned + u64::from(CHUNK),
            "{sent_bytes} bytes sent in {elapsed_nanos} ns: faster than the rate"
        );
        assert!(
            sent_bytes + u64::from(CHUNK) >= burst + earned,
            "{sent_bytes} bytes sent in {elapsed_nanos} ns: slower than the rate"
        );
    }

    #[test]
    fn a_full_queue_answers_busy_and_urgent_requests_push_out_background_ones() {
        let start = virtual_start();
        let mut gate = limited(1000, 0, 2);
        gate.tokens = -1;
        gate.refilled_at = Some(start);
        gate.handle_request(start, 1, Priority::Background, CHUNK);
        gate.handle_request(start, 2, Priority::Background, CHUNK);
        let Admission::Busy { retry_after } =
            gate.handle_request(start, 3, Priority::Background, CHUNK)
        else {
            panic!("a full queue must refuse a request of equal priority");
        };
        assert!(retry_after >= RETRY_AFTER_MIN && retry_after <= RETRY_AFTER_MAX);
        assert_eq!(
            gate.handle_request(start, 4, Priority::OnDemand, CHUNK),
            Admission::Queued
        );
        assert_eq!(
            gate.poll_event(start),
            Some(UploadEvent::Busy {
                ticket: 2,
                retry_after: RETRY_AFTER_MAX
            })
        );
        assert_eq!(gate.waiting(), 2);
    }

    #[test]
    fn sends_in_flight_are_bounded_and_cancelled_requests_are_never_sent() {
        let start = virtual_start();
        let mut gate = UploadGate::new(UploadConfig {
            sending_max: 2,
            ..UploadConfig::default()
        });
        for ticket in 0..5 {
            gate.handle_request(start, ticket, Priority::Background, CHUNK);
        }
        gate.handle_cancel(2);
        assert_eq!(
            drain(&mut gate, start),
            vec![UploadEvent::Send(0), UploadEvent::Send(1)]
        );
        assert_eq!(gate.poll_timeout(), None, "nothing to wait for but a send");
        gate.handle_sent();
        assert_eq!(drain(&mut gate, start), vec![UploadEvent::Send(3)]);
        gate.handle_sent();
        gate.handle_sent();
        assert_eq!(drain(&mut gate, start), vec![UploadEvent::Send(4)]);
        assert_eq!(gate.waiting(), 0);
    }
}
