//! The NBD wire format: protocol constants, the decoders for everything a client sends and the
//! encoders for the fixed-size parts of what the server sends.
//!
//! Every decoder takes untrusted bytes and returns a `Result`; "not enough bytes yet" is
//! `Ok(None)`, never an error, because TCP may split a message anywhere. Values are big-endian
//! ("network byte order") throughout, as the protocol specifies.

use super::NbdError;

/// `NBDMAGIC`, the first eight bytes the server sends.
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
pub(crate) const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every fixed-newstyle option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission-phase request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts every structured reply chunk.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags this server sends.
pub(crate) const HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub(crate) const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(crate) const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit set means the session must end.
pub(crate) const CLIENT_FLAGS_KNOWN: u32 = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;

/// Transmission flag that must always be set.
pub(crate) const TRANSMISSION_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub(crate) const TRANSMISSION_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub(crate) const TRANSMISSION_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: several connections to one export see the same data. Always true here,
/// because nothing can write.
pub(crate) const TRANSMISSION_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The transmission flags this server sends for every export.
pub(crate) const TRANSMISSION_FLAGS: u16 = TRANSMISSION_FLAG_HAS_FLAGS
    | TRANSMISSION_FLAG_READ_ONLY
    | TRANSMISSION_FLAG_SEND_FLUSH
    | TRANSMISSION_FLAG_CAN_MULTI_CONN;

pub(crate) const OPTION_EXPORT_NAME: u32 = 1;
pub(crate) const OPTION_ABORT: u32 = 2;
pub(crate) const OPTION_LIST: u32 = 3;
pub(crate) const OPTION_STARTTLS: u32 = 5;
pub(crate) const OPTION_INFO: u32 = 6;
pub(crate) const OPTION_GO: u32 = 7;
pub(crate) const OPTION_STRUCTURED_REPLY: u32 = 8;

pub(crate) const REPLY_ACK: u32 = 1;
pub(crate) const REPLY_SERVER: u32 = 2;
pub(crate) const REPLY_INFO: u32 = 3;
/// All option error replies have bit 31 set.
const REPLY_ERROR_BIT: u32 = 1 << 31;
pub(crate) const REPLY_ERROR_UNSUPPORTED: u32 = REPLY_ERROR_BIT | 1;
pub(crate) const REPLY_ERROR_POLICY: u32 = REPLY_ERROR_BIT | 2;
pub(crate) const REPLY_ERROR_INVALID: u32 = REPLY_ERROR_BIT | 3;
pub(crate) const REPLY_ERROR_UNKNOWN: u32 = REPLY_ERROR_BIT | 6;
pub(crate) const REPLY_ERROR_TOO_BIG: u32 = REPLY_ERROR_BIT | 9;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag `NBD_CMD_FLAG_FUA`.
const COMMAND_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE`.
const COMMAND_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF`.
const COMMAND_FLAG_DONT_FRAGMENT: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`.
const COMMAND_FLAG_REQUEST_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO`.
const COMMAND_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flags defined by the protocol. They are all harmless to ignore for a read-only
/// server that answers every read with one chunk, so only bits outside this set are refused.
pub(crate) const COMMAND_FLAGS_KNOWN: u16 = COMMAND_FLAG_FUA
    | COMMAND_FLAG_NO_HOLE
    | COMMAND_FLAG_DONT_FRAGMENT
    | COMMAND_FLAG_REQUEST_ONE
    | COMMAND_FLAG_FAST_ZERO;

/// Structured reply flag: this is the last chunk of the reply.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// NBD error values (they match Linux errno numbers, but are defined by the protocol).
pub(crate) const ERROR_PERMISSION: u32 = 1;
pub(crate) const ERROR_IO: u32 = 5;
pub(crate) const ERROR_INVALID: u32 = 22;

/// Bytes in the client flags field.
pub(crate) const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes in an option header (magic, option, data length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes in a request header (magic, flags, type, handle, offset, length).
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes in a simple reply header.
pub(crate) const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Bytes in a structured reply chunk header.
pub(crate) const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of the offset that precedes the data in an `NBD_REPLY_TYPE_OFFSET_DATA` chunk.
pub(crate) const OFFSET_DATA_OFFSET_BYTES: usize = 8;
/// Bytes in an option reply header.
pub(crate) const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Zero bytes that end an `NBD_OPT_EXPORT_NAME` reply unless the client negotiated NO_ZEROES.
pub(crate) const EXPORT_NAME_REPLY_ZEROES_BYTES: usize = 124;
/// The protocol's limit on any string (export names, descriptions).
pub const STRING_BYTES_MAX: usize = 4096;

/// A transmission-phase command, from the request's 16-bit type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1); followed by `length` bytes of payload.
    Write,
    /// `NBD_CMD_DISC` (2): the client is going away.
    Disconnect,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other type value.
    Unknown(u16),
}

impl Command {
    /// The command named by a request's type field.
    pub fn from_type(command_type: u16) -> Self {
        match command_type {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disconnect,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The type field that names this command.
    pub fn to_type(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disconnect => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::Cache => 5,
            Self::WriteZeroes => 6,
            Self::BlockStatus => 7,
            Self::Unknown(other) => other,
        }
    }
}

/// A transmission-phase request header (the payload of a write is not part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub command_flags: u16,
    /// What the client asks for.
    pub command: Command,
    /// Opaque value the reply must echo.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset_bytes: u64,
    /// Length of the range; for a write, also the length of the payload that follows.
    pub length_bytes: u32,
}

impl RequestHeader {
    /// Encodes the header as a client would send it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut bytes = [0u8; REQUEST_HEADER_BYTES];
        let mut writer = ArrayWriter::new(&mut bytes);
        writer.put(&REQUEST_MAGIC.to_be_bytes());
        writer.put(&self.command_flags.to_be_bytes());
        writer.put(&self.command.to_type().to_be_bytes());
        writer.put(&self.handle.to_be_bytes());
        writer.put(&self.offset_bytes.to_be_bytes());
        writer.put(&self.length_bytes.to_be_bytes());
        bytes
    }
}

/// A handshake-phase option header; `data_length_bytes` of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub data_length_bytes: u32,
}

impl OptionHeader {
    /// Encodes the header as a client would send it.
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut bytes = [0u8; OPTION_HEADER_BYTES];
        let mut writer = ArrayWriter::new(&mut bytes);
        writer.put(&OPTION_MAGIC.to_be_bytes());
        writer.put(&self.option.to_be_bytes());
        writer.put(&self.data_length_bytes.to_be_bytes());
        bytes
    }
}

/// Decodes a request header from the start of `input`.
///
/// Returns `Ok(None)` while fewer than [`REQUEST_HEADER_BYTES`] bytes are available and an error
/// if the magic is wrong (the stream can then no longer be framed).
pub fn decode_request_header(input: &[u8]) -> Result<Option<RequestHeader>, NbdError> {
    let mut reader = Reader::new(input);
    let (Some(magic), Some(command_flags), Some(command_type)) =
        (reader.u32(), reader.u16(), reader.u16())
    else {
        return Ok(None);
    };
    let (Some(handle), Some(offset_bytes), Some(length_bytes)) =
        (reader.u64(), reader.u64(), reader.u32())
    else {
        return Ok(None);
    };
    if magic != REQUEST_MAGIC {
        return Err(NbdError::BadRequestMagic { magic });
    }
    Ok(Some(RequestHeader {
        command_flags,
        command: Command::from_type(command_type),
        handle,
        offset_bytes,
        length_bytes,
    }))
}

/// Decodes an option header from the start of `input`.
///
/// Returns `Ok(None)` while fewer than [`OPTION_HEADER_BYTES`] bytes are available and an error
/// if the magic is not `IHAVEOPT`.
pub fn decode_option_header(input: &[u8]) -> Result<Option<OptionHeader>, NbdError> {
    let mut reader = Reader::new(input);
    let (Some(magic), Some(option), Some(data_length_bytes)) =
        (reader.u64(), reader.u32(), reader.u32())
    else {
        return Ok(None);
    };
    if magic != OPTION_MAGIC {
        return Err(NbdError::BadOptionMagic { magic });
    }
    Ok(Some(OptionHeader {
        option,
        data_length_bytes,
    }))
}

/// Why the data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option is malformed. The server answers
/// these with `NBD_REP_ERR_INVALID`; the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    /// Fewer bytes than the fixed fields need.
    #[error("option data is too short")]
    TooShort,
    /// The name length or information request count does not match the data length.
    #[error("option data length does not match its contents")]
    LengthMismatch,
    /// The export name is longer than the protocol allows.
    #[error("export name is longer than {STRING_BYTES_MAX} bytes")]
    NameTooLong,
    /// The export name is not UTF-8.
    #[error("export name is not valid utf-8")]
    NameNotUtf8,
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option: an export name and the information
/// types the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoOptionData<'data> {
    /// The export the client asks about; empty means the default export.
    pub export_name: &'data str,
    /// The information requests, two bytes each (already checked to be whole).
    information_request_bytes: &'data [u8],
}

impl<'data> InfoOptionData<'data> {
    /// The requested information types (`NBD_INFO_*`), in the order sent.
    pub fn information_requests(&self) -> impl Iterator<Item = u16> + 'data {
        self.information_request_bytes
            .chunks_exact(2)
            .filter_map(|pair| <[u8; 2]>::try_from(pair).ok().map(u16::from_be_bytes))
    }
}

/// Decodes the data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option:
/// name length (32 bits), name, request count (16 bits), requests (16 bits each).
pub fn decode_info_option_data(data: &[u8]) -> Result<InfoOptionData<'_>, OptionDataError> {
    let mut reader = Reader::new(data);
    let name_length_bytes = reader.u32().ok_or(OptionDataError::TooShort)?;
    let name_length_bytes =
        usize::try_from(name_length_bytes).map_err(|_| OptionDataError::LengthMismatch)?;
    let name_bytes = reader
        .take(name_length_bytes)
        .ok_or(OptionDataError::LengthMismatch)?;
    let request_count = reader.u16().ok_or(OptionDataError::LengthMismatch)?;
    let information_request_bytes = reader
        .take(usize::from(request_count) * 2)
        .ok_or(OptionDataError::LengthMismatch)?;
    if !reader.is_empty() {
        return Err(OptionDataError::LengthMismatch);
    }
    if name_bytes.len() > STRING_BYTES_MAX {
        return Err(OptionDataError::NameTooLong);
    }
    let export_name = std::str::from_utf8(name_bytes).map_err(|_| OptionDataError::NameNotUtf8)?;
    Ok(InfoOptionData {
        export_name,
        information_request_bytes,
    })
}

/// The greeting the server sends as soon as the connection opens.
pub(crate) fn greeting() -> [u8; 18] {
    let mut bytes = [0u8; 18];
    let mut writer = ArrayWriter::new(&mut bytes);
    writer.put(&NBD_MAGIC.to_be_bytes());
    writer.put(&OPTION_MAGIC.to_be_bytes());
    writer.put(&HANDSHAKE_FLAGS.to_be_bytes());
    bytes
}

/// The header of an option reply carrying `length_bytes` of reply data.
pub(crate) fn option_reply_header(
    option: u32,
    reply_type: u32,
    length_bytes: u32,
) -> [u8; OPTION_REPLY_HEADER_BYTES] {
    let mut bytes = [0u8; OPTION_REPLY_HEADER_BYTES];
    let mut writer = ArrayWriter::new(&mut bytes);
    writer.put(&OPTION_REPLY_MAGIC.to_be_bytes());
    writer.put(&option.to_be_bytes());
    writer.put(&reply_type.to_be_bytes());
    writer.put(&length_bytes.to_be_bytes());
    bytes
}

/// The header of a simple reply; for a successful read, the data follows.
pub(crate) fn simple_reply_header(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut bytes = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    let mut writer = ArrayWriter::new(&mut bytes);
    writer.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    writer.put(&error.to_be_bytes());
    writer.put(&handle.to_be_bytes());
    bytes
}

/// The header of a structured reply chunk carrying `length_bytes` of payload.
pub(crate) fn structured_reply_header(
    flags: u16,
    reply_type: u16,
    handle: u64,
    length_bytes: u32,
) -> [u8; STRUCTURED_REPLY_HEADER_BYTES] {
    let mut bytes = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
    let mut writer = ArrayWriter::new(&mut bytes);
    writer.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    writer.put(&flags.to_be_bytes());
    writer.put(&reply_type.to_be_bytes());
    writer.put(&handle.to_be_bytes());
    writer.put(&length_bytes.to_be_bytes());
    bytes
}

/// Reads big-endian fields from the front of a byte slice without ever panicking.
struct Reader<'data> {
    remaining: &'data [u8],
}

impl<'data> Reader<'data> {
    fn new(remaining: &'data [u8]) -> Self {
        Self { remaining }
    }

    fn is_empty(&self) -> bool {
        self.remaining.is_empty()
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.remaining.split_first_chunk::<N>()?;
        self.remaining = rest;
        Some(*head)
    }

    fn take(&mut self, count_bytes: usize) -> Option<&'data [u8]> {
        let (head, rest) = self.remaining.split_at_checked(count_bytes)?;
        self.remaining = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Fills a fixed-size array front to back. Every caller writes exactly the array's length, so
/// the silent truncation in `put` never happens; it only keeps this code free of panics.
struct ArrayWriter<'buffer> {
    remaining: &'buffer mut [u8],
}

impl<'buffer> ArrayWriter<'buffer> {
    fn new(buffer: &'buffer mut [u8]) -> Self {
        Self { remaining: buffer }
    }

    fn put(&mut self, field: &[u8]) {
        let remaining = std::mem::take(&mut self.remaining);
        let count = field.len().min(remaining.len());
        let (head, rest) = remaining.split_at_mut(count);
        head.copy_from_slice(field.get(..count).unwrap_or_default());
        self.remaining = rest;
    }
}
