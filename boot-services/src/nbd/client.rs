//! The client side of the NBD handshake (fixed newstyle, `NBD_OPT_GO`), sans-IO: what a node's
//! agent speaks to a server before it hands the socket to the kernel's NBD client. Bytes from
//! the server come in through [`NbdClientHandshake::handle_input`]; bytes to send come out of
//! [`NbdClientHandshake::poll_output`]. Simple replies only: the kernel speaks nothing else, so
//! structured replies are never negotiated.

/// `NBDMAGIC`.
const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERROR_BIT: u32 = 0x8000_0000;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
const GREETING_BYTES: usize = 18;
const REPLY_HEADER_BYTES: usize = 20;
/// Longest export name sent (the protocol's own limit is 4096).
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;
/// Replies to GO that are accepted before the server is judged to be streaming nonsense.
pub const OPTION_REPLIES_MAX: usize = 32;
/// Longest option reply payload accepted.
pub const OPTION_REPLY_BYTES_MAX: usize = 64 * 1024;

/// Why the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdClientError {
    /// The server's greeting is not newstyle NBD.
    #[error("not a newstyle NBD server")]
    NotNewstyle,
    /// The server does not speak fixed newstyle (needed for options with replies).
    #[error("server does not speak fixed newstyle")]
    NotFixedNewstyle,
    /// An option reply with the wrong magic or an oversized payload.
    #[error("malformed option reply: {0}")]
    MalformedReply(&'static str),
    /// The server refused the export.
    #[error("export refused (error {code:#x}): {message}")]
    Refused {
        /// The NBD_REP_ERR_* code.
        code: u32,
        /// The server's message, printable characters only.
        message: String,
    },
    /// More replies than any server sends to one GO.
    #[error("too many option replies")]
    TooManyReplies,
    /// The export name cannot be sent.
    #[error("export name longer than {EXPORT_NAME_BYTES_MAX} bytes")]
    NameTooLong,
    /// Input after the handshake ended (or after it failed).
    #[error("the handshake is over")]
    Finished,
}

/// What the server agreed to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiatedExport {
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Transmission flags (read-only, multi-connection, ...), for the kernel.
    pub transmission_flags: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitGreeting,
    AwaitReplies,
    Done,
    Failed,
}

/// One client handshake.
#[derive(Debug)]
pub struct NbdClientHandshake {
    export_name: Vec<u8>,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    replies: usize,
    export: Option<NegotiatedExport>,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

impl NbdClientHandshake {
    /// A handshake that asks for `export_name`.
    pub fn new(export_name: &str) -> Result<Self, NbdClientError> {
        if export_name.len() > EXPORT_NAME_BYTES_MAX {
            return Err(NbdClientError::NameTooLong);
        }
        Ok(Self {
            export_name: export_name.as_bytes().to_vec(),
            phase: Phase::AwaitGreeting,
            input: Vec::new(),
            output: Vec::new(),
            replies: 0,
            export: None,
        })
    }

    /// Whether more input from the server is needed.
    pub fn wants_input(&self) -> bool {
        matches!(self.phase, Phase::AwaitGreeting | Phase::AwaitReplies)
    }

    /// The negotiated export, once the server acknowledged GO.
    pub fn outcome(&self) -> Option<NegotiatedExport> {
        match self.phase {
            Phase::Done => self.export,
            _ => None,
        }
    }

    /// Bytes to send to the server, if any.
    pub fn poll_output(&mut self) -> Option<Vec<u8>> {
        if self.output.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.output))
        }
    }

    /// Bytes received from the server, in any pieces.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), NbdClientError> {
        if !self.wants_input() {
            return Err(NbdClientError::Finished);
        }
        self.input.extend_from_slice(bytes);
        let result = self.advance();
        if result.is_err() {
            self.phase = Phase::Failed;
            self.input.clear();
        }
        result
    }

    fn advance(&mut self) -> Result<(), NbdClientError> {
        loop {
            match self.phase {
                Phase::AwaitGreeting => {
                    if self.input.len() < GREETING_BYTES {
                        return Ok(());
                    }
                    if u64_at(&self.input, 0) != NBD_MAGIC || u64_at(&self.input, 8) != IHAVEOPT {
                        return Err(NbdClientError::NotNewstyle);
                    }
                    let handshake_flags = u16_at(&self.input, 16);
                    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(NbdClientError::NotFixedNewstyle);
                    }
                    self.input.drain(..GREETING_BYTES);
                    let client_flags =
                        u32::from(FLAG_FIXED_NEWSTYLE | (handshake_flags & FLAG_NO_ZEROES));
                    self.output.extend_from_slice(&client_flags.to_be_bytes());
                    let name_length = self.export_name.len() as u32;
                    let data_length = 4 + name_length + 2 + 2;
                    self.output.extend_from_slice(&IHAVEOPT.to_be_bytes());
                    self.output.extend_from_slice(&OPT_GO.to_be_bytes());
                    self.output.extend_from_slice(&data_length.to_be_bytes());
                    self.output.extend_from_slice(&name_length.to_be_bytes());
                    self.output.extend_from_slice(&self.export_name);
                    self.output.extend_from_slice(&1u16.to_be_bytes());
                    self.output
                        .extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    self.phase = Phase::AwaitReplies;
                }
                Phase::AwaitReplies => {
                    if self.input.len() < REPLY_HEADER_BYTES {
                        return Ok(());
                    }
                    if u64_at(&self.input, 0) != REPLY_MAGIC {
                        return Err(NbdClientError::MalformedReply("wrong magic"));
                    }
                    let reply_type = u32_at(&self.input, 12);
                    let length = u32_at(&self.input, 16) as usize;
                    if length > OPTION_REPLY_BYTES_MAX {
                        return Err(NbdClientError::MalformedReply("payload too long"));
                    }
                    if self.input.len() < REPLY_HEADER_BYTES + length {
                        return Ok(());
                    }
                    self.replies += 1;
                    if self.replies > OPTION_REPLIES_MAX {
                        return Err(NbdClientError::TooManyReplies);
                    }
                    let payload: Vec<u8> = self
                        .input
                        .drain(..REPLY_HEADER_BYTES + length)
                        .skip(REPLY_HEADER_BYTES)
                        .collect();
                    if reply_type & REP_ERROR_BIT != 0 {
                        let message = String::from_utf8_lossy(&payload)
                            .chars()
                            .filter(|character| !character.is_control())
                            .take(200)
                            .collect();
                        return Err(NbdClientError::Refused {
                            code: reply_type,
                            message,
                        });
                    }
                    match reply_type {
                        REP_INFO if payload.len() >= 12 && u16_at(&payload, 0) == INFO_EXPORT => {
                            self.export = Some(NegotiatedExport {
                                size_bytes: u64_at(&payload, 2),
                                transmission_flags: u16_at(&payload, 10),
                            });
                        }
                        REP_ACK => {
                            if self.export.is_none() {
                                return Err(NbdClientError::MalformedReply(
                                    "GO acknowledged without export information",
                                ));
                            }
                            self.phase = Phase::Done;
                            return Ok(());
                        }
                        // Other information (block sizes, names) is not needed by the kernel.
                        _ => {}
                    }
                }
                Phase::Done | Phase::Failed => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(reply_type: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = REPLY_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&OPT_GO.to_be_bytes());
        bytes.extend_from_slice(&reply_type.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn greeting() -> Vec<u8> {
        let mut bytes = NBD_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        bytes
    }

    #[test]
    fn go_is_negotiated_byte_by_byte() {
        let mut handshake = NbdClientHandshake::new("root").unwrap();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&0x0103u16.to_be_bytes());
        let mut server = greeting();
        server.extend(reply(REP_INFO, &info));
        server.extend(reply(
            REP_INFO,
            &[0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 0, 0],
        ));
        server.extend(reply(REP_ACK, &[]));
        for byte in &server {
            handshake.handle_input(&[*byte]).unwrap();
        }
        let sent = handshake.poll_output().unwrap();
        assert_eq!(&sent[..4], &3u32.to_be_bytes());
        assert_eq!(u32_at(&sent, 12), OPT_GO);
        assert_eq!(&sent[20..24], &4u32.to_be_bytes());
        assert_eq!(&sent[24..28], b"root");
        assert_eq!(
            handshake.outcome(),
            Some(NegotiatedExport {
                size_bytes: 1 << 30,
                transmission_flags: 0x0103
            })
        );
        assert_eq!(handshake.handle_input(&[0]), Err(NbdClientError::Finished));
    }

    #[test]
    fn refusals_and_garbage_end_the_handshake() {
        let mut handshake = NbdClientHandshake::new("missing").unwrap();
        let mut server = greeting();
        server.extend(reply(REP_ERROR_BIT | 6, b"no such export\n\x1b[2J"));
        let error = handshake.handle_input(&server).unwrap_err();
        assert_eq!(
            error,
            NbdClientError::Refused {
                code: REP_ERROR_BIT | 6,
                message: "no such export[2J".into()
            }
        );
        assert!(!handshake.wants_input());

        let mut handshake = NbdClientHandshake::new("x").unwrap();
        assert_eq!(
            handshake.handle_input(b"HTTP/1.1 200 OK\r\n\r\n"),
            Err(NbdClientError::NotNewstyle)
        );
        let mut handshake = NbdClientHandshake::new("x").unwrap();
        let mut server = greeting();
        server.extend(reply(REP_ACK, &[]));
        assert!(matches!(
            handshake.handle_input(&server),
            Err(NbdClientError::MalformedReply(_))
        ));
        let mut handshake = NbdClientHandshake::new("x").unwrap();
        let mut server = greeting();
        for _ in 0..=OPTION_REPLIES_MAX {
            server.extend(reply(REP_INFO, &[0, 9]));
        }
        assert_eq!(
            handshake.handle_input(&server),
            Err(NbdClientError::TooManyReplies)
        );
    }
}
