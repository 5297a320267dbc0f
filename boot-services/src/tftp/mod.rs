//! Read-only TFTP server (RFC 1350, 2347, 2348, 2349, 7440) as a sans-IO state machine.
//!
//! [`handle_request`] looks at a datagram that arrived on the listening port (69) and either
//! starts a [`TftpSession`], asks the caller to send an ERROR packet from the listening socket,
//! or tells it to drop the datagram. A session then serves one file to one client over the
//! client's transfer ID: the caller feeds it datagrams and timer expiries with the current time
//! and sends what [`TftpSession::poll_transmit`] returns. Nothing here opens sockets, reads a
//! clock or spawns.
//!
//! Protocol choices, each made for network boot clients:
//!
//! - Write requests are refused with error 2 (access violation): the server is read-only.
//! - `netascii` requests are served as the file's bytes, exactly as `octet`: boot files are
//!   binary, converting line ends would make `tsize` and the block boundaries depend on the
//!   content, and real clients ask for `octet`. `mail` and unknown modes get error 4.
//! - Options: `blksize` (8..=65464, larger requests clamped to [`TftpConfig::blksize_max`]),
//!   `tsize` (answered with the file size when the request carries 0), `timeout` (1..=255 s)
//!   and `windowsize` (1..=65535, clamped to [`TftpConfig::windowsize_max`]). Unknown options
//!   and values we cannot accept are ignored, never refused. If any option is accepted the
//!   session answers with an OACK and waits for ACK 0; otherwise it starts with DATA 1.
//! - Windows (RFC 7440): a window of blocks is sent at once; an ACK of any block in it slides
//!   the window to start right after that block, which resends the rest of the window if the
//!   ACK was for an earlier block than the last. Duplicate and stale ACKs are ignored; only the
//!   retransmission timer resends on its own, at most [`TftpConfig::retries_max`] times in a row
//!   before the session ends.
//! - The session ends as soon as the final (short, possibly empty) block is acknowledged; the
//!   server does not dally, since it has nothing left to say if that ACK is repeated.
//! - A retransmitted request arriving on the listening port starts a second session, as in
//!   every classic TFTP server; the client talks to the first one that answers and the other
//!   times out. Callers that want to avoid that can drop requests from a peer that already has
//!   a session.
//!
//! Bounds: at most [`TftpConfig::sessions_max`] sessions (the caller passes its count), one
//! block buffer per session, and the limits on packet sizes and option counts in [`Packet`].

mod packet;
mod session;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use packet::{
    BLKSIZE_DEFAULT_BYTES, BLKSIZE_MAX_BYTES, BLKSIZE_MIN_BYTES, DATA_HEADER_BYTES,
    DATA_PACKET_BYTES_MAX, OPTIONS_COUNT_MAX, Packet, PacketError, STRING_PACKET_BYTES_MAX,
    TftpOption, TransferMode, error_code,
};
pub use session::{SessionOutcome, TftpSession};

use crate::source::{FileSource, SourceError, normalise_path};

/// Limits and defaults of the TFTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpConfig {
    /// The largest block size granted to a client asking for `blksize`; values outside
    /// 8..=65464 are clamped into that range.
    pub blksize_max: u16,
    /// The largest window granted to a client asking for `windowsize`; 0 counts as 1.
    pub windowsize_max: u16,
    /// The retransmission timeout when the client does not send `timeout`; capped at 255 s so
    /// that abandoned sessions end in bounded time.
    pub timeout_default: Duration,
    /// How many retransmissions in a row go unanswered before a session ends as timed out.
    pub retries_max: u32,
    /// How many sessions may run at once; further requests get a "server busy" error.
    pub sessions_max: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            blksize_max: BLKSIZE_MAX_BYTES,
            windowsize_max: 64,
            timeout_default: Duration::from_secs(1),
            retries_max: 5,
            sessions_max: 1024,
        }
    }
}

/// What to do with a datagram that arrived on the listening port.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request and unpacked at once; boxing would cost an allocation per session"
)]
pub enum RequestOutcome<F> {
    /// A read request was accepted: keep the session, give it a fresh local port (its transfer
    /// ID) and send what it has in [`TftpSession::poll_transmit`] from there.
    Session(TftpSession<F>),
    /// Send this ERROR packet to the peer from the listening socket; no session was started.
    Reply(Vec<u8>),
    /// Not a request we answer (garbage, or a stray non-request packet): drop it, perhaps log.
    Ignore,
}

/// Handles one datagram from `peer` on the listening port.
///
/// `active_sessions` is how many sessions the caller is running; at
/// [`TftpConfig::sessions_max`] or more, read requests are answered with error 0 "server busy".
/// The filename goes through [`normalise_path`] before [`FileSource::open`]; a refused or
/// missing file is answered with an ERROR packet (1 for not found, 2 for access denied, 0 for
/// corrupt or unreadable data).
pub fn handle_request<S: FileSource>(
    source: &S,
    config: &TftpConfig,
    now: Instant,
    peer: SocketAddr,
    datagram: &[u8],
    active_sessions: usize,
) -> RequestOutcome<S::File> {
    let packet = match Packet::decode(datagram) {
        Ok(packet) => packet,
        // A well-formed request in a mode we do not know deserves an answer, so the client
        // stops retrying; anything else undecodable might not even be TFTP.
        Err(PacketError::UnknownTransferMode) => {
            return RequestOutcome::Reply(error_packet(
                error_code::ILLEGAL_OPERATION,
                "unsupported transfer mode",
            ));
        }
        Err(_) => return RequestOutcome::Ignore,
    };
    match packet {
        Packet::WriteRequest { .. } => RequestOutcome::Reply(error_packet(
            error_code::ACCESS_VIOLATION,
            "server is read-only",
        )),
        Packet::ReadRequest {
            filename,
            mode,
            options,
        } => {
            if mode == TransferMode::Mail {
                return RequestOutcome::Reply(error_packet(
                    error_code::ILLEGAL_OPERATION,
                    "mail mode is not supported",
                ));
            }
            if active_sessions >= config.sessions_max {
                return RequestOutcome::Reply(error_packet(error_code::NOT_DEFINED, "server busy"));
            }
            let opened = normalise_path(filename)
                .and_then(|path| source.open(&path).map(|file| (path, file)));
            match opened {
                Ok((path, file)) => RequestOutcome::Session(TftpSession::new(
                    now, peer, path, file, &options, config,
                )),
                Err(error) => {
                    let (code, message) = error_reply_for(&error);
                    RequestOutcome::Reply(error_packet(code, message))
                }
            }
        }
        Packet::Data { .. }
        | Packet::Ack { .. }
        | Packet::Error { .. }
        | Packet::OptionAck { .. } => RequestOutcome::Ignore,
    }
}

/// The TFTP error code and message for a [`SourceError`]. The message for an I/O error is
/// generic: its details (paths, device names) are for the server's log, not for the network.
fn error_reply_for(error: &SourceError) -> (u16, &'static str) {
    match error {
        SourceError::NotFound => (error_code::FILE_NOT_FOUND, "file not found"),
        SourceError::AccessDenied => (error_code::ACCESS_VIOLATION, "access violation"),
        SourceError::Corrupt => (error_code::NOT_DEFINED, "stored data is corrupt"),
        SourceError::Io(_) => (error_code::NOT_DEFINED, "i/o error"),
    }
}

fn error_packet(code: u16, message: &str) -> Vec<u8> {
    let mut datagram = Vec::new();
    Packet::Error { code, message }.encode(&mut datagram);
    datagram
}
