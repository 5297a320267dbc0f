//! The TFTP wire format: decoding untrusted datagrams into [`Packet`]s and encoding them back.
//!
//! Decoding never panics and never allocates more than the option list of a request; every
//! malformed input gives a [`PacketError`]. The decoder is strict about what it cannot interpret
//! (missing NUL terminators, non-UTF-8 strings, dangling option names, duplicate options,
//! oversized packets) and lenient in one place only: trailing NUL bytes after the last complete
//! field of a string packet are accepted and dropped, because some boot firmware pads its
//! requests and refusing them would leave those machines unable to boot.

/// The smallest block size RFC 2348 allows.
pub const BLKSIZE_MIN_BYTES: u16 = 8;
/// The largest block size RFC 2348 allows (65535 minus IP and UDP headers).
pub const BLKSIZE_MAX_BYTES: u16 = 65464;
/// The block size of RFC 1350, used when the client negotiates none.
pub const BLKSIZE_DEFAULT_BYTES: u16 = 512;
/// Opcode plus block number in front of every DATA payload.
pub const DATA_HEADER_BYTES: usize = 4;
/// The largest DATA packet: a header and a block of the largest size.
pub const DATA_PACKET_BYTES_MAX: usize = DATA_HEADER_BYTES + BLKSIZE_MAX_BYTES as usize;
/// The largest request, option acknowledgement or error packet. RFC 2347 caps requests with
/// options at 512 bytes; the same cap bounds the other string packets, which are never longer in
/// practice.
pub const STRING_PACKET_BYTES_MAX: usize = 512;
/// The most options one request or option acknowledgement may carry. A 512-byte packet could
/// hold about a hundred one-letter options; real clients send at most five or six.
pub const OPTIONS_COUNT_MAX: usize = 32;

const OPCODE_READ_REQUEST: u16 = 1;
const OPCODE_WRITE_REQUEST: u16 = 2;
const OPCODE_DATA: u16 = 3;
const OPCODE_ACK: u16 = 4;
const OPCODE_ERROR: u16 = 5;
const OPCODE_OPTION_ACK: u16 = 6;

/// The error codes of RFC 1350 and RFC 2347, as carried in [`Packet::Error`].
pub mod error_code {
    /// Not defined; see the error message.
    pub const NOT_DEFINED: u16 = 0;
    /// File not found.
    pub const FILE_NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS_VIOLATION: u16 = 2;
    /// Disk full or allocation exceeded.
    pub const DISK_FULL: u16 = 3;
    /// Illegal TFTP operation.
    pub const ILLEGAL_OPERATION: u16 = 4;
    /// Unknown transfer ID (a datagram from the wrong port).
    pub const UNKNOWN_TRANSFER_ID: u16 = 5;
    /// File already exists.
    pub const FILE_EXISTS: u16 = 6;
    /// No such user.
    pub const NO_SUCH_USER: u16 = 7;
    /// The client refuses the options the server acknowledged (RFC 2347).
    pub const OPTION_NEGOTIATION_FAILED: u16 = 8;
}

/// Why a datagram is not a TFTP packet we can interpret.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PacketError {
    /// The datagram ends before the fixed fields of its packet type.
    #[error("packet of {length_bytes} bytes is too short")]
    TooShort {
        /// Length of the datagram.
        length_bytes: usize,
    },
    /// The datagram is longer than its packet type allows.
    #[error("packet of {length_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLong {
        /// Length of the datagram.
        length_bytes: usize,
        /// The limit for this packet type.
        limit_bytes: usize,
    },
    /// The opcode is none of the six TFTP opcodes.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    /// A string field runs to the end of the datagram without a NUL byte.
    #[error("missing nul terminator after the {field}")]
    MissingTerminator {
        /// Which field.
        field: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("the {field} is not valid utf-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// The transfer mode is none of `netascii`, `octet` or `mail`.
    #[error("unknown transfer mode")]
    UnknownTransferMode,
    /// An option has an empty name.
    #[error("option with an empty name")]
    EmptyOptionName,
    /// The packet ends after an option name, without its value.
    #[error("option without a value")]
    OptionWithoutValue,
    /// The same option (compared without case) appears twice.
    #[error("duplicate option")]
    DuplicateOption,
    /// More options than [`OPTIONS_COUNT_MAX`].
    #[error("more than {limit} options")]
    TooManyOptions {
        /// The limit, [`OPTIONS_COUNT_MAX`].
        limit: usize,
    },
    /// Bytes other than NUL padding follow the last field.
    #[error("{count} unexpected bytes after the last field")]
    TrailingBytes {
        /// How many bytes follow the last field.
        count: usize,
    },
}

/// The transfer mode of a request (RFC 1350). Names are compared without case on decoding and
/// written in lower case on encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferMode {
    /// Text with CR LF line ends.
    Netascii,
    /// Raw bytes.
    Octet,
    /// Obsolete delivery to a user; never served.
    Mail,
}

impl TransferMode {
    /// The mode's name as written on the wire.
    pub fn name(self) -> &'static str {
        match self {
            TransferMode::Netascii => "netascii",
            TransferMode::Octet => "octet",
            TransferMode::Mail => "mail",
        }
    }

    fn from_name(name: &str) -> Result<Self, PacketError> {
        [
            TransferMode::Netascii,
            TransferMode::Octet,
            TransferMode::Mail,
        ]
        .into_iter()
        .find(|mode| mode.name().eq_ignore_ascii_case(name))
        .ok_or(PacketError::UnknownTransferMode)
    }
}

/// One `name`/`value` pair of an option list (RFC 2347), as sent; names are matched without case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TftpOption<'a> {
    /// The option name, such as `blksize`.
    pub name: &'a str,
    /// The option value, such as `1468`.
    pub value: &'a str,
}

/// A TFTP packet borrowing its strings and payload from the datagram it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// RRQ: the client wants to read `filename`.
    ReadRequest {
        /// The path as the client sent it, not yet normalised.
        filename: &'a str,
        /// The transfer mode.
        mode: TransferMode,
        /// The options of RFC 2347, in the order sent.
        options: Vec<TftpOption<'a>>,
    },
    /// WRQ: the client wants to write `filename`; this server always refuses.
    WriteRequest {
        /// The path as the client sent it.
        filename: &'a str,
        /// The transfer mode.
        mode: TransferMode,
        /// The options of RFC 2347, in the order sent.
        options: Vec<TftpOption<'a>>,
    },
    /// DATA: one block of the file.
    Data {
        /// The 16-bit block number, rolling over from 65535 to 0.
        block: u16,
        /// The payload; shorter than the block size only in the final block.
        data: &'a [u8],
    },
    /// ACK: the receiver has every block up to and including `block`.
    Ack {
        /// The 16-bit block number acknowledged; 0 acknowledges an OACK.
        block: u16,
    },
    /// ERROR: the sender gives up the transfer.
    Error {
        /// One of [`error_code`].
        code: u16,
        /// A human-readable explanation.
        message: &'a str,
    },
    /// OACK: the options the server accepted (RFC 2347).
    OptionAck {
        /// The accepted options with their final values.
        options: Vec<TftpOption<'a>>,
    },
}

impl<'a> Packet<'a> {
    /// Decodes one datagram. Never panics; anything malformed gives a [`PacketError`].
    pub fn decode(datagram: &'a [u8]) -> Result<Self, PacketError> {
        let length_bytes = datagram.len();
        let Some((opcode_bytes, body)) = datagram.split_first_chunk::<2>() else {
            return Err(PacketError::TooShort { length_bytes });
        };
        let opcode = u16::from_be_bytes(*opcode_bytes);
        let limit_bytes = match opcode {
            OPCODE_DATA => DATA_PACKET_BYTES_MAX,
            OPCODE_ACK => DATA_HEADER_BYTES,
            _ => STRING_PACKET_BYTES_MAX,
        };
        if length_bytes > limit_bytes {
            // Checked before the opcode is validated so that an oversized datagram with an
            // unknown opcode still reports its size, the more useful fact for a log line.
            return Err(PacketError::TooLong {
                length_bytes,
                limit_bytes,
            });
        }
        match opcode {
            OPCODE_READ_REQUEST | OPCODE_WRITE_REQUEST => {
                let mut remaining = body;
                let filename = take_string(&mut remaining, "filename")?;
                let mode = TransferMode::from_name(take_string(&mut remaining, "mode")?)?;
                let options = decode_options(remaining)?;
                Ok(if opcode == OPCODE_READ_REQUEST {
                    Packet::ReadRequest {
                        filename,
                        mode,
                        options,
                    }
                } else {
                    Packet::WriteRequest {
                        filename,
                        mode,
                        options,
                    }
                })
            }
            OPCODE_DATA => {
                let Some((block_bytes, data)) = body.split_first_chunk::<2>() else {
                    return Err(PacketError::TooShort { length_bytes });
                };
                Ok(Packet::Data {
                    block: u16::from_be_bytes(*block_bytes),
                    data,
                })
            }
            OPCODE_ACK => {
                let Some(block_bytes) = body.first_chunk::<2>() else {
                    return Err(PacketError::TooShort { length_bytes });
                };
                Ok(Packet::Ack {
                    block: u16::from_be_bytes(*block_bytes),
                })
            }
            OPCODE_ERROR => {
                let Some((code_bytes, mut remaining)) = body.split_first_chunk::<2>() else {
                    return Err(PacketError::TooShort { length_bytes });
                };
                let message = take_string(&mut remaining, "error message")?;
                expect_only_padding(remaining)?;
                Ok(Packet::Error {
                    code: u16::from_be_bytes(*code_bytes),
                    message,
                })
            }
            OPCODE_OPTION_ACK => Ok(Packet::OptionAck {
                options: decode_options(body)?,
            }),
            unknown => Err(PacketError::UnknownOpcode(unknown)),
        }
    }

    /// Appends the wire form of this packet to `output`.
    ///
    /// Strings are written as given: a string containing a NUL byte, or a packet longer than
    /// the decoder's limits, encodes to bytes that do not decode back. Packets produced by
    /// [`Packet::decode`] always round-trip.
    pub fn encode(&self, output: &mut Vec<u8>) {
        match self {
            Packet::ReadRequest {
                filename,
                mode,
                options,
            }
            | Packet::WriteRequest {
                filename,
                mode,
                options,
            } => {
                let opcode = if matches!(self, Packet::ReadRequest { .. }) {
                    OPCODE_READ_REQUEST
                } else {
                    OPCODE_WRITE_REQUEST
                };
                output.extend_from_slice(&opcode.to_be_bytes());
                put_string(output, filename);
                put_string(output, mode.name());
                put_options(output, options);
            }
            Packet::Data { block, data } => {
                output.extend_from_slice(&OPCODE_DATA.to_be_bytes());
                output.extend_from_slice(&block.to_be_bytes());
                output.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                output.extend_from_slice(&OPCODE_ACK.to_be_bytes());
                output.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                output.extend_from_slice(&OPCODE_ERROR.to_be_bytes());
                output.extend_from_slice(&code.to_be_bytes());
                put_string(output, message);
            }
            Packet::OptionAck { options } => {
                output.extend_from_slice(&OPCODE_OPTION_ACK.to_be_bytes());
                put_options(output, options);
            }
        }
    }
}

impl Packet<'_> {
    /// A short name of the packet type for log lines, which must not carry payloads.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Packet::ReadRequest { .. } => "RRQ",
            Packet::WriteRequest { .. } => "WRQ",
            Packet::Data { .. } => "DATA",
            Packet::Ack { .. } => "ACK",
            Packet::Error { .. } => "ERROR",
            Packet::OptionAck { .. } => "OACK",
        }
    }
}

/// Writes the header of a DATA packet for `block` into the first four bytes of a packet buffer.
pub(crate) fn data_header(block: u16) -> [u8; DATA_HEADER_BYTES] {
    let [opcode_high, opcode_low] = OPCODE_DATA.to_be_bytes();
    let [block_high, block_low] = block.to_be_bytes();
    [opcode_high, opcode_low, block_high, block_low]
}

/// Reads the code and a lossy message from a datagram that starts like an ERROR packet but does
/// not decode (no terminator, Latin-1 text, too long). A client's error ends its session even
/// when it is malformed: waiting out the retries for a client that has said it gave up helps
/// nobody.
pub(crate) fn decode_error_leniently(datagram: &[u8]) -> Option<(u16, String)> {
    let (opcode_bytes, body) = datagram.split_first_chunk::<2>()?;
    if u16::from_be_bytes(*opcode_bytes) != OPCODE_ERROR {
        return None;
    }
    let (code_bytes, message_bytes) = body.split_first_chunk::<2>()?;
    let message_bytes = message_bytes
        .split(|byte| *byte == 0)
        .next()
        .unwrap_or_default();
    let message_bytes = message_bytes
        .get(..STRING_PACKET_BYTES_MAX)
        .unwrap_or(message_bytes);
    Some((
        u16::from_be_bytes(*code_bytes),
        String::from_utf8_lossy(message_bytes).into_owned(),
    ))
}

/// Splits one NUL-terminated UTF-8 string off the front of `remaining`.
fn take_string<'a>(remaining: &mut &'a [u8], field: &'static str) -> Result<&'a str, PacketError> {
    let bytes = *remaining;
    let terminator_position = bytes
        .iter()
        .position(|byte| *byte == 0)
        .ok_or(PacketError::MissingTerminator { field })?;
    let (text, terminator_and_rest) = bytes
        .split_at_checked(terminator_position)
        .ok_or(PacketError::MissingTerminator { field })?;
    *remaining = terminator_and_rest.get(1..).unwrap_or_default();
    std::str::from_utf8(text).map_err(|_| PacketError::NotUtf8 { field })
}

fn expect_only_padding(remaining: &[u8]) -> Result<(), PacketError> {
    if remaining.iter().all(|byte| *byte == 0) {
        Ok(())
    } else {
        Err(PacketError::TrailingBytes {
            count: remaining.len(),
        })
    }
}

fn decode_options(mut remaining: &[u8]) -> Result<Vec<TftpOption<'_>>, PacketError> {
    let mut options = Vec::new();
    // Bounded by OPTIONS_COUNT_MAX, and each pass consumes at least one byte.
    while !remaining.iter().all(|byte| *byte == 0) {
        if options.len() >= OPTIONS_COUNT_MAX {
            return Err(PacketError::TooManyOptions {
                limit: OPTIONS_COUNT_MAX,
            });
        }
        let name = take_string(&mut remaining, "option name")?;
        if name.is_empty() {
            return Err(PacketError::EmptyOptionName);
        }
        if remaining.is_empty() {
            return Err(PacketError::OptionWithoutValue);
        }
        let value = take_string(&mut remaining, "option value")?;
        if options
            .iter()
            .any(|option: &TftpOption<'_>| option.name.eq_ignore_ascii_case(name))
        {
            return Err(PacketError::DuplicateOption);
        }
        options.push(TftpOption { name, value });
    }
    Ok(options)
}

fn put_string(output: &mut Vec<u8>, text: &str) {
    output.extend_from_slice(text.as_bytes());
    output.push(0);
}

fn put_options(output: &mut Vec<u8>, options: &[TftpOption<'_>]) {
    for option in options {
        put_string(output, option.name);
        put_string(output, option.value);
    }
}
