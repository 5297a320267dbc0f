//! Read-only NBD server (fixed newstyle handshake) as a sans-IO state machine.
//!
//! One [`NbdConnection`] serves one TCP connection. The driver hands it the bytes it receives
//! ([`NbdConnection::handle_input`]), writes [`NbdConnection::pending_output`] to the socket and
//! reports how much went out ([`NbdConnection::consume_output`]). The connection never touches a
//! socket, a clock or a thread; exports are read only through [`BlockSource`] and [`ReadAt`].
//!
//! What it speaks: the fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT` and `NBD_OPT_STRUCTURED_REPLY`; then reads
//! (simple or structured replies), flushes (trivially successful) and disconnects.
//!
//! What it never does: write (writes, trims and write-zeroes get `EPERM`), TLS (`STARTTLS` is
//! refused by policy), oldstyle negotiation, extended headers, metadata contexts and block
//! status. Protocol violations that make the byte stream unframeable (bad magic, unknown client
//! flags, an oversized write payload, an option flood) are returned as [`NbdError`] and the
//! driver drops the connection; malformed but framed requests get protocol error replies.
//!
//! Bounds: option data ([`NbdConfig::option_data_bytes_max`]) and option count
//! ([`NbdConfig::options_max`]) per connection; request payloads
//! ([`NbdConfig::request_bytes_max`]); requests stop being processed while
//! [`NbdConfig::output_bytes_high_water`] bytes of output are pending, and
//! [`NbdConnection::wants_input`] turns false while that leaves a bounded amount of input
//! unprocessed. A write payload is discarded as it streams in, never held whole.

mod buffer;
pub mod client;
mod handshake;
mod transmission;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use crate::source::{BlockSource, ReadAt, SourceError};

use buffer::{InputBuffer, OutputBuffer};

pub use wire::{
    Command, InfoOptionData, OPTION_HEADER_BYTES, OptionDataError, OptionHeader,
    REQUEST_HEADER_BYTES, RequestHeader, STRING_BYTES_MAX, decode_info_option_data,
    decode_option_header, decode_request_header,
};

/// The default for [`NbdConfig::request_bytes_max`]: 32 MiB, the largest payload the protocol
/// says a client may always use.
pub const REQUEST_BYTES_MAX_DEFAULT: u32 = 32 * 1024 * 1024;
/// The default for [`NbdConfig::options_max`].
pub const OPTIONS_MAX_DEFAULT: u32 = 64;
/// The default for [`NbdConfig::option_data_bytes_max`]: no option this server understands
/// needs more than two protocol strings.
pub const OPTION_DATA_BYTES_MAX_DEFAULT: u32 = 64 * 1024;
/// The default for [`NbdConfig::output_bytes_high_water`]: enough queued replies to keep a
/// fast socket busy for milliseconds, while a client that never reads its replies can pin only
/// this much (plus one reply) per connection. 16 MiB cost 39 MiB of RSS under nbdcopy's four
/// connections for no measured throughput gain (BENCHMARKS.md).
pub const OUTPUT_BYTES_HIGH_WATER_DEFAULT: usize = 4 * 1024 * 1024;
/// Block size advertised as the minimum: reads are served at any byte offset.
pub const BLOCK_SIZE_MINIMUM_BYTES: u32 = 1;
/// Block size advertised as preferred.
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;
/// Unprocessed input up to this size is always accepted ([`NbdConnection::wants_input`]),
/// so a driver can read in large chunks even while replies are held back.
pub const INPUT_BYTES_HIGH_WATER_MIN: usize = 256 * 1024;
/// The largest request length that still fits a structured `OFFSET_DATA` chunk, whose 32-bit
/// length also counts the 8-byte offset.
const REQUEST_BYTES_LIMIT: u32 = u32::MAX - wire::OFFSET_DATA_OFFSET_BYTES as u32;

/// Limits for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdConfig {
    /// Largest read length served and write payload accepted (larger writes close the
    /// connection); also advertised as the maximum payload size. Raised to at least
    /// [`BLOCK_SIZE_PREFERRED_BYTES`], because the protocol requires the maximum to be at least
    /// the preferred block size.
    pub request_bytes_max: u32,
    /// Options accepted per connection; one more is an [`NbdError::TooManyOptions`].
    pub options_max: u32,
    /// Largest option data buffered; larger options are discarded and answered with
    /// `NBD_REP_ERR_TOO_BIG`.
    pub option_data_bytes_max: u32,
    /// No further option or request is processed while this much output is pending.
    pub output_bytes_high_water: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            request_bytes_max: REQUEST_BYTES_MAX_DEFAULT,
            options_max: OPTIONS_MAX_DEFAULT,
            option_data_bytes_max: OPTION_DATA_BYTES_MAX_DEFAULT,
            output_bytes_high_water: OUTPUT_BYTES_HIGH_WATER_DEFAULT,
        }
    }
}

/// Why a connection must be closed. After returning one, the connection processes no more
/// input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// The client set handshake flags this server does not know; the protocol requires the
    /// server to drop the connection.
    #[error("client sent unknown handshake flags {flags:#010x}")]
    UnknownClientFlags {
        /// The client flags as received.
        flags: u32,
    },
    /// An option did not start with `IHAVEOPT`.
    #[error("option has bad magic {magic:#018x}")]
    BadOptionMagic {
        /// The magic as received.
        magic: u64,
    },
    /// A request did not start with the request magic.
    #[error("request has bad magic {magic:#010x}")]
    BadRequestMagic {
        /// The magic as received.
        magic: u32,
    },
    /// The client sent more options than [`NbdConfig::options_max`].
    #[error("client sent more than {options_max} options")]
    TooManyOptions {
        /// The configured bound.
        options_max: u32,
    },
    /// A write announced a payload larger than [`NbdConfig::request_bytes_max`].
    #[error("write payload of {length_bytes} bytes exceeds the limit of {request_bytes_max} bytes")]
    WritePayloadTooLarge {
        /// The announced payload length.
        length_bytes: u32,
        /// The configured bound.
        request_bytes_max: u32,
    },
}

impl<T: BlockSource + ?Sized> BlockSource for Arc<T> {
    type Export = T::Export;
    fn export_names(&self) -> Vec<String> {
        (**self).export_names()
    }
    fn open_export(&self, name: &str) -> Result<Self::Export, SourceError> {
        (**self).open_export(name)
    }
    fn export_description(&self, name: &str) -> Option<String> {
        (**self).export_description(name)
    }
}

impl<T: BlockSource + ?Sized> BlockSource for &T {
    type Export = T::Export;
    fn export_names(&self) -> Vec<String> {
        (**self).export_names()
    }
    fn open_export(&self, name: &str) -> Result<Self::Export, SourceError> {
        (**self).open_export(name)
    }
    fn export_description(&self, name: &str) -> Option<String> {
        (**self).export_description(name)
    }
}

/// Where the connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting sent; waiting for the 32-bit client flags.
    ClientFlags,
    /// Option haggling.
    Options,
    /// Skipping the data of an option that exceeded the data bound; it is answered with
    /// `NBD_REP_ERR_TOO_BIG` once skipped.
    DiscardOptionData { option: u32, remaining_bytes: u32 },
    /// Serving requests on the chosen export.
    Transmission,
    /// Skipping a write's payload; it is answered with `EPERM` once skipped.
    DiscardWritePayload { handle: u64, remaining_bytes: u32 },
    /// The session is over (abort, disconnect, refused export); input is ignored and the
    /// connection is closed once the output is drained.
    Closing,
    /// An [`NbdError`] ended the session; input is ignored.
    Failed,
}

/// The export chosen with `NBD_OPT_EXPORT_NAME` or `NBD_OPT_GO`.
struct OpenExport<E> {
    name: String,
    size_bytes: u64,
    reader: E,
}

/// One server-side NBD connection.
pub struct NbdConnection<S: BlockSource> {
    source: S,
    config: NbdConfig,
    phase: Phase,
    input: InputBuffer,
    output: OutputBuffer,
    /// The client negotiated `NBD_FLAG_C_NO_ZEROES`.
    client_no_zeroes: bool,
    /// The client negotiated `NBD_OPT_STRUCTURED_REPLY`.
    structured_replies: bool,
    options_received: u32,
    export: Option<OpenExport<S::Export>>,
    failure: Option<NbdError>,
}

impl<S: BlockSource> fmt::Debug for NbdConnection<S> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("NbdConnection")
            .field("phase", &self.phase)
            .field("export", &self.export_name())
            .field("structured_replies", &self.structured_replies)
            .field("options_received", &self.options_received)
            .field("input_bytes", &self.input.len())
            .field("output_bytes", &self.output.pending_len())
            .field("failure", &self.failure)
            .finish()
    }
}

impl<S: BlockSource> NbdConnection<S> {
    /// A new connection serving the exports of `source`; the greeting is already queued in
    /// [`Self::pending_output`].
    pub fn new(source: S, config: NbdConfig) -> Self {
        let config = NbdConfig {
            request_bytes_max: config
                .request_bytes_max
                .clamp(BLOCK_SIZE_PREFERRED_BYTES, REQUEST_BYTES_LIMIT),
            // A high-water mark of zero would hold processing back forever.
            output_bytes_high_water: config.output_bytes_high_water.max(1),
            ..config
        };
        let mut output = OutputBuffer::default();
        output.append(&wire::greeting());
        Self {
            source,
            config,
            phase: Phase::ClientFlags,
            input: InputBuffer::default(),
            output,
            client_no_zeroes: false,
            structured_replies: false,
            options_received: 0,
            export: None,
            failure: None,
        }
    }

    /// Takes bytes received from the client and processes as much as possible; an incomplete
    /// message is kept until the rest arrives.
    ///
    /// An error means the connection must be closed; once one was returned, every later call
    /// returns it again.
    pub fn handle_input(&mut self, input: &[u8]) -> Result<(), NbdError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if self.input.is_empty() {
            // The common case: work straight from the caller's bytes and keep only the tail of
            // an incomplete message (or what the high-water mark holds back).
            let consumed_bytes = self.process(input).map_err(|error| self.fail(error))?;
            if !self.is_finished() {
                self.input
                    .append(input.get(consumed_bytes..).unwrap_or_default());
            }
            Ok(())
        } else {
            self.input.append(input);
            self.process_buffered()
        }
    }

    /// The bytes to send to the client, oldest first.
    pub fn pending_output(&self) -> &[u8] {
        self.output.pending()
    }

    /// Records that the driver sent the first `count_bytes` of [`Self::pending_output`], then
    /// processes input that the high-water mark held back.
    ///
    /// That processing can find a protocol error; the connection then stops (see
    /// [`Self::error`], [`Self::is_closed`]) and the next [`Self::handle_input`] returns it.
    pub fn consume_output(&mut self, count_bytes: usize) {
        self.output.consume(count_bytes);
        if self.failure.is_none() && !self.input.is_empty() {
            // The error is kept in `self.failure`; `handle_input` and `error` report it.
            let _ = self.process_buffered();
        }
    }

    /// Whether the driver should read more from the socket: false once the session is over,
    /// or while the unprocessed input exceeds its bound because output is backed up.
    pub fn wants_input(&self) -> bool {
        !self.is_finished() && self.input.len() < self.input_bytes_high_water()
    }

    /// Whether the driver should close the connection: the session ended (abort, disconnect,
    /// refused export or an [`NbdError`]) and all output has been consumed.
    pub fn is_closed(&self) -> bool {
        self.is_finished() && self.output.pending_len() == 0
    }

    /// The export being served, once the handshake chose one.
    pub fn export_name(&self) -> Option<&str> {
        self.export.as_ref().map(|export| export.name.as_str())
    }

    /// The error that stopped this connection, if any.
    pub fn error(&self) -> Option<&NbdError> {
        self.failure.as_ref()
    }

    fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Closing | Phase::Failed)
    }

    /// Enough to hold any single incomplete message, so a stalled message can always complete.
    fn input_bytes_high_water(&self) -> usize {
        let option_bytes_max = usize::try_from(self.config.option_data_bytes_max)
            .unwrap_or(usize::MAX)
            .saturating_add(OPTION_HEADER_BYTES);
        INPUT_BYTES_HIGH_WATER_MIN.max(option_bytes_max)
    }

    /// Whether enough output is pending that new messages must wait.
    fn output_held(&self) -> bool {
        self.output.pending_len() >= self.config.output_bytes_high_water
    }

    fn fail(&mut self, error: NbdError) -> NbdError {
        tracing::debug!(%error, "nbd connection failed");
        self.phase = Phase::Failed;
        self.failure = Some(error.clone());
        self.input.clear();
        error
    }

    fn process_buffered(&mut self) -> Result<(), NbdError> {
        // Taken out so the bytes can be read while `self` changes; put back below.
        let mut input = std::mem::take(&mut self.input);
        let result = self.process(input.unprocessed());
        match result {
            Ok(consumed_bytes) => {
                input.consume(consumed_bytes);
                if self.is_finished() {
                    input.clear();
                }
                self.input = input;
                Ok(())
            }
            Err(error) => {
                input.clear();
                self.input = input;
                Err(self.fail(error))
            }
        }
    }

    /// Processes whole messages from the front of `available`; returns how many bytes were used.
    fn process(&mut self, available: &[u8]) -> Result<usize, NbdError> {
        let mut consumed_bytes = 0;
        while let Some(remaining) = available.get(consumed_bytes..) {
            let step_bytes = self.step(remaining)?;
            if step_bytes == 0 {
                break;
            }
            assert!(
                step_bytes <= remaining.len(),
                "a step consumed bytes it was not given"
            );
            consumed_bytes += step_bytes;
        }
        Ok(consumed_bytes)
    }

    /// Handles at most one message (or one piece of a payload being skipped) from the front of
    /// `remaining`. Returns the bytes used; zero means "stop": the message is incomplete, the
    /// output is backed up, or there is nothing left to do.
    fn step(&mut self, remaining: &[u8]) -> Result<usize, NbdError> {
        match self.phase {
            Phase::ClientFlags => {
                let Some(flags) = remaining.first_chunk::<{ wire::CLIENT_FLAGS_BYTES }>() else {
                    return Ok(0);
                };
                self.handle_client_flags(u32::from_be_bytes(*flags))?;
                Ok(wire::CLIENT_FLAGS_BYTES)
            }
            Phase::Options => {
                if self.output_held() {
                    return Ok(0);
                }
                self.step_option(remaining)
            }
            Phase::DiscardOptionData {
                option,
                remaining_bytes,
            } => {
                let (discarded_bytes, left_bytes) = discard(remaining, remaining_bytes);
                if left_bytes == 0 {
                    self.phase = Phase::Options;
                    self.reply_option_too_big(option);
                } else {
                    self.phase = Phase::DiscardOptionData {
                        option,
                        remaining_bytes: left_bytes,
                    };
                }
                Ok(discarded_bytes)
            }
            Phase::Transmission => {
                if self.output_held() {
                    return Ok(0);
                }
                let Some(request) = decode_request_header(remaining)? else {
                    return Ok(0);
                };
                self.handle_request(&request)?;
                Ok(REQUEST_HEADER_BYTES)
            }
            Phase::DiscardWritePayload {
                handle,
                remaining_bytes,
            } => {
                let (discarded_bytes, left_bytes) = discard(remaining, remaining_bytes);
                if left_bytes == 0 {
                    self.phase = Phase::Transmission;
                    self.reply_write_refused(handle);
                } else {
                    self.phase = Phase::DiscardWritePayload {
                        handle,
                        remaining_bytes: left_bytes,
                    };
                }
                Ok(discarded_bytes)
            }
            // Anything after the end of the session is dropped unread.
            Phase::Closing | Phase::Failed => Ok(remaining.len()),
        }
    }

    /// Opens `name` and notes its size.
    fn open_export(&self, name: &str) -> Result<OpenExport<S::Export>, SourceError> {
        let reader = self.source.open_export(name)?;
        Ok(OpenExport {
            name: name.to_owned(),
            size_bytes: reader.size_bytes(),
            reader,
        })
    }
}

/// Skips up to `remaining_bytes` of `available`; returns (bytes skipped, bytes still to skip).
fn discard(available: &[u8], remaining_bytes: u32) -> (usize, u32) {
    let discarded_bytes = available
        .len()
        .min(usize::try_from(remaining_bytes).unwrap_or(usize::MAX));
    let discarded = u32::try_from(discarded_bytes).unwrap_or(remaining_bytes);
    (discarded_bytes, remaining_bytes - discarded)
}
