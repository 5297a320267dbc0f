//! One read transfer, from the first OACK or DATA packet to the acknowledgement of the final
//! block.
//!
//! Blocks are counted internally with a 64-bit index starting at 1, so files of any size work;
//! only the wire carries the 16-bit block number, which rolls over from 65535 to 0. An incoming
//! ACK is placed relative to the window in flight: it counts only if it names a block after the
//! last one acknowledged and no later than the last one sent. Everything else (duplicates, stale
//! ACKs from an earlier window, ACKs of blocks never sent) is ignored, so a duplicate ACK never
//! triggers a retransmission on its own (no Sorcerer's Apprentice); only the retransmission
//! timer does.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::packet::{
    BLKSIZE_DEFAULT_BYTES, BLKSIZE_MAX_BYTES, BLKSIZE_MIN_BYTES, DATA_HEADER_BYTES, Packet,
    TftpOption, data_header, decode_error_leniently,
};
use super::{TftpConfig, error_reply_for};
use crate::source::{ReadAt, SourceError};

/// The smallest and largest `timeout` option values of RFC 2349, in seconds.
const TIMEOUT_OPTION_MIN_SECS: u64 = 1;
const TIMEOUT_OPTION_MAX_SECS: u64 = 255;
/// The largest retransmission timeout a session uses, whatever the configuration says, so that
/// every session ends within a bounded time after its client disappears.
const RETRANSMIT_TIMEOUT_MAX: Duration = Duration::from_secs(TIMEOUT_OPTION_MAX_SECS);
/// Decimal option values longer than this cannot be valid for any option we understand; the
/// bound keeps parsing trivially cheap.
const OPTION_VALUE_DIGITS_MAX: usize = 20;

/// How a finished session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOutcome {
    /// The client acknowledged the final block.
    Completed {
        /// Size of the file served.
        bytes: u64,
    },
    /// The client sent an ERROR packet (for example code 8 when it refuses our OACK).
    ClientError {
        /// The client's error code.
        code: u16,
        /// The client's message, decoded lossily if it was not UTF-8.
        message: String,
    },
    /// The client stopped acknowledging and every retransmission was used up.
    TimedOut,
    /// Reading the file failed mid-transfer; an ERROR packet was sent to the client and no
    /// data from the failed read was.
    ReadFailed {
        /// The failure reported by the file source.
        error: SourceError,
    },
}

/// A read transfer to one client, created by [`super::handle_request`].
///
/// Drive it with [`TftpSession::handle_datagram`] for every datagram from the session's peer
/// on the session's own port, and with [`TftpSession::handle_timeout`] once the instant from
/// [`TftpSession::poll_timeout`] has passed; after each call, send every packet returned by
/// [`TftpSession::poll_transmit`] until it returns `None`. Once [`TftpSession::outcome`] is
/// `Some`, drain `poll_transmit` one last time (a read failure leaves an ERROR packet there) and
/// drop the session.
///
/// Checking that datagrams come from the right peer and port (and answering strangers with
/// error 5, unknown transfer ID) is the caller's job, as it owns the sockets.
pub struct TftpSession<F> {
    peer: SocketAddr,
    filename: String,
    file: F,
    file_size_bytes: u64,
    blksize_bytes: u16,
    windowsize_blocks: u16,
    retransmit_timeout: Duration,
    retries_max: u32,
    /// Retransmissions since the last acknowledgement that made progress.
    retries_used: u32,
    phase: Phase,
    /// The encoded OACK, kept for retransmission; empty when no option was accepted.
    option_ack_packet: Vec<u8>,
    option_ack_pending: bool,
    /// Every block up to and including this index has been acknowledged (0: none yet).
    acknowledged_through_index: u64,
    /// The next block `poll_transmit` emits, if it is not beyond `window_end_index`.
    next_send_index: u64,
    /// The last block of the window in flight.
    window_end_index: u64,
    /// The highest block ever emitted; ACKs beyond it are ignored.
    sent_through_index: u64,
    /// The final block, shorter than the block size (possibly empty).
    last_block_index: u64,
    retransmit_deadline: Option<Instant>,
    /// One packet of `DATA_HEADER_BYTES + blksize_bytes`, allocated once and reused for every
    /// DATA packet so that a transfer does not allocate per block.
    transmit_buffer: Vec<u8>,
    /// File bytes read ahead of the blocks being sent: one read per [`READ_AHEAD_BYTES`]
    /// instead of one per block (a syscall, or a chunk-cache lookup, saved on every block of
    /// a lock-step transfer). Allocated on the first DATA block.
    read_ahead: Vec<u8>,
    /// The file offset of `read_ahead[0]`.
    read_ahead_offset_bytes: u64,
}

/// Bytes read from the file at a time (at least one block). Bounded per session, so
/// [`super::TftpConfig::sessions_max`] bounds it in total.
const READ_AHEAD_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// An OACK was sent; DATA 1 waits for ACK 0.
    AwaitingOptionAcknowledgement,
    Transferring,
    Finished(SessionOutcome),
}

/// The transfer parameters agreed from the client's options and our configuration.
struct Negotiation {
    blksize_bytes: u16,
    windowsize_blocks: u16,
    retransmit_timeout: Duration,
    /// The options to acknowledge, with their final values, in the order the client sent them.
    accepted_options: Vec<(&'static str, String)>,
}

impl<F: ReadAt> TftpSession<F> {
    /// Starts a session for an already opened, already normalised `filename`; the first packet
    /// (OACK or DATA 1) is ready in [`TftpSession::poll_transmit`].
    pub(super) fn new(
        now: Instant,
        peer: SocketAddr,
        filename: String,
        file: F,
        options: &[TftpOption<'_>],
        config: &TftpConfig,
    ) -> Self {
        let file_size_bytes = file.size_bytes();
        let negotiation = negotiate(options, config, file_size_bytes);
        let mut option_ack_packet = Vec::new();
        if !negotiation.accepted_options.is_empty() {
            let options = negotiation
                .accepted_options
                .iter()
                .map(|(name, value)| TftpOption { name, value })
                .collect();
            Packet::OptionAck { options }.encode(&mut option_ack_packet);
        }
        let blksize_bytes = negotiation.blksize_bytes;
        let mut session = Self {
            peer,
            filename,
            file,
            file_size_bytes,
            blksize_bytes,
            windowsize_blocks: negotiation.windowsize_blocks,
            retransmit_timeout: negotiation.retransmit_timeout,
            retries_max: config.retries_max,
            retries_used: 0,
            phase: Phase::Transferring,
            option_ack_pending: false,
            option_ack_packet,
            acknowledged_through_index: 0,
            next_send_index: 1,
            window_end_index: 0,
            sent_through_index: 0,
            // A file that is an exact multiple of the block size ends with an empty block, so
            // the count is always one more than the number of full blocks.
            last_block_index: file_size_bytes / u64::from(blksize_bytes) + 1,
            retransmit_deadline: None,
            transmit_buffer: vec![0; DATA_HEADER_BYTES + usize::from(blksize_bytes)],
            read_ahead: Vec::new(),
            read_ahead_offset_bytes: 0,
        };
        if session.option_ack_packet.is_empty() {
            session.start_window(now);
        } else {
            session.phase = Phase::AwaitingOptionAcknowledgement;
            session.option_ack_pending = true;
            session.arm_retransmit_timer(now);
        }
        session
    }

    /// Handles one datagram from the session's peer. Datagrams that do not decode, and packets
    /// that make no sense on a read transfer, are ignored rather than fatal: a stray or
    /// corrupted datagram should not cost the client its boot.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if matches!(self.phase, Phase::Finished(_)) {
            return;
        }
        match Packet::decode(datagram) {
            Ok(Packet::Ack { block }) => self.handle_ack(now, block),
            Ok(Packet::Error { code, message }) => self.finish(SessionOutcome::ClientError {
                code,
                message: message.to_owned(),
            }),
            Ok(other) => {
                tracing::debug!(
                    peer = %self.peer,
                    filename = %self.filename,
                    packet = other.kind_name(),
                    "ignoring a packet that has no place in a read transfer"
                );
            }
            Err(error) => {
                if let Some((code, message)) = decode_error_leniently(datagram) {
                    self.finish(SessionOutcome::ClientError { code, message });
                } else {
                    tracing::debug!(
                        peer = %self.peer,
                        filename = %self.filename,
                        %error,
                        "ignoring an undecodable datagram"
                    );
                }
            }
        }
    }

    /// Handles the retransmission timer: if `now` has reached [`TftpSession::poll_timeout`],
    /// resends the unacknowledged window (or the OACK), or ends the session as
    /// [`SessionOutcome::TimedOut`] once `retries_max` retransmissions went unanswered. Calls
    /// before the deadline do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        if self.retries_used >= self.retries_max {
            self.finish(SessionOutcome::TimedOut);
            return;
        }
        self.retries_used += 1;
        tracing::debug!(
            peer = %self.peer,
            filename = %self.filename,
            retry = self.retries_used,
            acknowledged_through_index = self.acknowledged_through_index,
            "retransmitting after a timeout"
        );
        match self.phase {
            Phase::AwaitingOptionAcknowledgement => {
                self.option_ack_pending = true;
                self.arm_retransmit_timer(now);
            }
            Phase::Transferring => self.start_window(now),
            Phase::Finished(_) => {}
        }
    }

    /// The next packet to send to the peer, if any. The slice borrows a buffer the session
    /// reuses for every DATA packet, so a transfer allocates nothing per block.
    ///
    /// Blocks are read from the file here, one at a time. If a read fails, the packet returned
    /// is an ERROR instead, and the session is finished with [`SessionOutcome::ReadFailed`].
    pub fn poll_transmit(&mut self) -> Option<&[u8]> {
        match self.phase {
            Phase::Finished(_) => None,
            Phase::AwaitingOptionAcknowledgement => {
                if !self.option_ack_pending {
                    return None;
                }
                self.option_ack_pending = false;
                Some(&self.option_ack_packet)
            }
            Phase::Transferring => {
                if self.next_send_index > self.window_end_index {
                    return None;
                }
                let block_index = self.next_send_index;
                match self.encode_data_block(block_index) {
                    Ok(packet_bytes) => {
                        self.next_send_index = block_index + 1;
                        self.sent_through_index = self.sent_through_index.max(block_index);
                        self.transmit_buffer.get(..packet_bytes)
                    }
                    Err(error) => {
                        let (code, message) = error_reply_for(&error);
                        self.transmit_buffer.clear();
                        Packet::Error { code, message }.encode(&mut self.transmit_buffer);
                        self.finish(SessionOutcome::ReadFailed { error });
                        Some(&self.transmit_buffer)
                    }
                }
            }
        }
    }

    /// When [`TftpSession::handle_timeout`] should next be called; `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Finished(_) => None,
            Phase::AwaitingOptionAcknowledgement | Phase::Transferring => self.retransmit_deadline,
        }
    }

    /// How the session ended, once it has.
    pub fn outcome(&self) -> Option<SessionOutcome> {
        match &self.phase {
            Phase::Finished(outcome) => Some(outcome.clone()),
            Phase::AwaitingOptionAcknowledgement | Phase::Transferring => None,
        }
    }

    /// The normalised path being served.
    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// The client's address and port (its transfer ID).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The negotiated block size.
    pub fn blksize_bytes(&self) -> u16 {
        self.blksize_bytes
    }

    /// The negotiated window size (1 without RFC 7440).
    pub fn windowsize_blocks(&self) -> u16 {
        self.windowsize_blocks
    }

    /// The size of the file being served.
    pub fn file_size_bytes(&self) -> u64 {
        self.file_size_bytes
    }

    fn handle_ack(&mut self, now: Instant, block: u16) {
        match self.phase {
            Phase::AwaitingOptionAcknowledgement => {
                // Anything but ACK 0 is a confused client; its timer keeps running.
                if block == 0 {
                    self.phase = Phase::Transferring;
                    self.retries_used = 0;
                    self.start_window(now);
                }
            }
            Phase::Transferring => {
                let distance_blocks =
                    block.wrapping_sub(block_number(self.acknowledged_through_index));
                if distance_blocks == 0 {
                    // A duplicate of the last acknowledgement: answering it would start the
                    // Sorcerer's Apprentice; the timer covers real loss.
                    return;
                }
                let acknowledged_index =
                    self.acknowledged_through_index + u64::from(distance_blocks);
                if acknowledged_index > self.sent_through_index {
                    // Before the window (a stale ACK, which wraps around to a large distance)
                    // or a block never sent.
                    return;
                }
                self.acknowledged_through_index = acknowledged_index;
                self.retries_used = 0;
                if acknowledged_index >= self.last_block_index {
                    self.finish(SessionOutcome::Completed {
                        bytes: self.file_size_bytes,
                    });
                } else {
                    // Whether the whole window or only part of it was acknowledged, the next
                    // window starts right after the acknowledged block (RFC 7440 section 4).
                    self.start_window(now);
                }
            }
            Phase::Finished(_) => {}
        }
    }

    /// Schedules the window after the last acknowledged block and restarts the timer.
    fn start_window(&mut self, now: Instant) {
        self.next_send_index = self.acknowledged_through_index + 1;
        self.window_end_index = (self.acknowledged_through_index
            + u64::from(self.windowsize_blocks))
        .min(self.last_block_index);
        self.arm_retransmit_timer(now);
    }

    fn arm_retransmit_timer(&mut self, now: Instant) {
        // An unrepresentable deadline (only near the end of the platform's clock) falls back to
        // `now`, which spends retries faster rather than never ending the session.
        self.retransmit_deadline = Some(now.checked_add(self.retransmit_timeout).unwrap_or(now));
    }

    fn finish(&mut self, outcome: SessionOutcome) {
        self.phase = Phase::Finished(outcome);
        self.retransmit_deadline = None;
        self.read_ahead = Vec::new();
    }

    /// Writes DATA `block_index` into the transmit buffer and returns the packet's length. A
    /// block that cannot be read in full is an error, never a short packet: a short block would
    /// tell the client the file ended there.
    fn encode_data_block(&mut self, block_index: u64) -> Result<usize, SourceError> {
        let offset_bytes = block_index
            .saturating_sub(1)
            .saturating_mul(u64::from(self.blksize_bytes));
        let remaining_bytes = self.file_size_bytes.saturating_sub(offset_bytes);
        let payload_bytes = usize::from(self.blksize_bytes)
            .min(usize::try_from(remaining_bytes).unwrap_or(usize::MAX));
        let packet = self
            .transmit_buffer
            .get_mut(..DATA_HEADER_BYTES + payload_bytes)
            .and_then(|packet| packet.split_first_chunk_mut::<DATA_HEADER_BYTES>());
        let Some((header, payload)) = packet else {
            // The buffer is sized for a full block when the session starts and only shrinks
            // once it is finished; reaching this is a bug, reported as a failed read so the
            // client hears of it.
            return Err(SourceError::Io(
                "transmit buffer smaller than a block".to_owned(),
            ));
        };
        *header = data_header(block_number(block_index));
        if !payload.is_empty() {
            let buffered_end = self.read_ahead_offset_bytes + self.read_ahead.len() as u64;
            let covered = offset_bytes >= self.read_ahead_offset_bytes
                && offset_bytes + payload.len() as u64 <= buffered_end;
            if !covered {
                // Refill from this block on (also after a window restarts further back).
                let wanted_bytes = READ_AHEAD_BYTES.max(payload.len()).min(
                    usize::try_from(self.file_size_bytes - offset_bytes).unwrap_or(usize::MAX),
                );
                self.read_ahead.resize(wanted_bytes, 0);
                let read_bytes = match self.file.read_at(offset_bytes, &mut self.read_ahead) {
                    Ok(read_bytes) => read_bytes,
                    // A bad spot further on must not cost the blocks before it: read just this
                    // block, and fail only if it is the one that cannot be read.
                    Err(_) => {
                        self.read_ahead.truncate(payload.len());
                        self.file.read_at(offset_bytes, &mut self.read_ahead)?
                    }
                };
                self.read_ahead.truncate(read_bytes);
                self.read_ahead_offset_bytes = offset_bytes;
                if read_bytes < payload.len() {
                    return Err(SourceError::Io(format!(
                        "short read at offset {offset_bytes}: {read_bytes} of {} bytes",
                        payload.len()
                    )));
                }
            }
            let start =
                usize::try_from(offset_bytes - self.read_ahead_offset_bytes).unwrap_or(usize::MAX);
            let source = self
                .read_ahead
                .get(start..start + payload.len())
                .ok_or_else(|| SourceError::Io("read-ahead buffer out of step".to_owned()))?;
            payload.copy_from_slice(source);
        }
        Ok(DATA_HEADER_BYTES + payload_bytes)
    }
}

impl<F> fmt::Debug for TftpSession<F> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TftpSession")
            .field("peer", &self.peer)
            .field("filename", &self.filename)
            .field("file_size_bytes", &self.file_size_bytes)
            .field("blksize_bytes", &self.blksize_bytes)
            .field("windowsize_blocks", &self.windowsize_blocks)
            .field("phase", &self.phase)
            .field(
                "acknowledged_through_index",
                &self.acknowledged_through_index,
            )
            .field("next_send_index", &self.next_send_index)
            .field("window_end_index", &self.window_end_index)
            .field("retries_used", &self.retries_used)
            .finish_non_exhaustive()
    }
}

/// The 16-bit wire block number of a 64-bit block index; the truncation is the rollover from
/// 65535 to 0 that large transfers rely on.
fn block_number(block_index: u64) -> u16 {
    (block_index % 65536) as u16
}

/// Applies the options we understand and ignores the rest (RFC 2347). An option with a value we
/// cannot accept is ignored like an unknown one rather than refused with error 8, so the client
/// still gets its file with the defaults.
fn negotiate(options: &[TftpOption<'_>], config: &TftpConfig, file_size_bytes: u64) -> Negotiation {
    let blksize_max_bytes = config
        .blksize_max
        .clamp(BLKSIZE_MIN_BYTES, BLKSIZE_MAX_BYTES);
    let windowsize_max_blocks = config.windowsize_max.max(1);
    let mut negotiation = Negotiation {
        blksize_bytes: BLKSIZE_DEFAULT_BYTES,
        windowsize_blocks: 1,
        retransmit_timeout: config.timeout_default.min(RETRANSMIT_TIMEOUT_MAX),
        accepted_options: Vec::new(),
    };
    for option in options {
        let Some(value) = parse_decimal(option.value) else {
            continue;
        };
        if option.name.eq_ignore_ascii_case("blksize") {
            // Values above the RFC maximum are clamped like values above our own maximum,
            // since the client only states what it can take.
            if value >= u64::from(BLKSIZE_MIN_BYTES) {
                let blksize_bytes = u16::try_from(value)
                    .unwrap_or(u16::MAX)
                    .min(blksize_max_bytes);
                negotiation.blksize_bytes = blksize_bytes;
                negotiation
                    .accepted_options
                    .push(("blksize", blksize_bytes.to_string()));
            }
        } else if option.name.eq_ignore_ascii_case("tsize") {
            // In a read request the client sends 0 and we answer with the size.
            if value == 0 {
                negotiation
                    .accepted_options
                    .push(("tsize", file_size_bytes.to_string()));
            }
        } else if option.name.eq_ignore_ascii_case("timeout") {
            if (TIMEOUT_OPTION_MIN_SECS..=TIMEOUT_OPTION_MAX_SECS).contains(&value) {
                negotiation.retransmit_timeout = Duration::from_secs(value);
                negotiation
                    .accepted_options
                    .push(("timeout", value.to_string()));
            }
        } else if option.name.eq_ignore_ascii_case("windowsize")
            && let Ok(windowsize_blocks) = u16::try_from(value)
            && windowsize_blocks >= 1
        {
            let windowsize_blocks = windowsize_blocks.min(windowsize_max_blocks);
            negotiation.windowsize_blocks = windowsize_blocks;
            negotiation
                .accepted_options
                .push(("windowsize", windowsize_blocks.to_string()));
        }
    }
    negotiation
}

fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty()
        || text.len() > OPTION_VALUE_DIGITS_MAX
        || !text.bytes().all(|byte| byte.is_ascii_digit())
    {
        return None;
    }
    text.parse().ok()
}
