//! The messages two peers exchange about one image, and their framing on a QUIC stream.
//!
//! A frame is a big-endian `u32` length (of what follows), a kind byte and the body. Every
//! field has a bound that [`decode_frame`] checks before it allocates, and a frame that breaks
//! one is an error for that stream only: the driver logs it and closes the stream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use super::bitfield::{Bitfield, BitfieldError};
use super::tracker::{NEIGHBOURS_MAX, RACK_NAME_MAX};
use crate::ContentHash;

/// The largest chunk a peer sends (the chunker's maximum).
pub const CHUNK_BYTES_MAX: usize = 1024 * 1024;
/// The largest frame: a chunk and its header. A 2^20-chunk bitfield (128 KiB) fits too.
pub const FRAME_BYTES_MAX: usize = CHUNK_BYTES_MAX + 64;
/// The most chunks an image may have (a bitfield of this many is 128 KiB).
pub const CHUNKS_MAX: u32 = 1 << 20;
/// The most alternatives a busy peer names.
pub const ALTERNATIVES_MAX: usize = 16;

/// How urgent a request is; a busy uploader serves the more urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Filling the rest of the image in the background.
    Background = 0,
    /// A chunk a first boot reads early (the recorded read trace).
    BootTrace = 1,
    /// A chunk a running node is blocked on right now.
    OnDemand = 2,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens the exchange about the image whose manifest is `manifest`.
    Hello {
        /// The manifest's hash.
        manifest: ContentHash,
        /// Chunks in the image.
        chunk_count: u32,
    },
    /// Every chunk the sender holds.
    Have(Bitfield),
    /// The sender now holds chunk `index` too.
    HaveChunk {
        /// The chunk.
        index: u32,
    },
    /// Asks for chunk `index`.
    Request {
        /// The chunk.
        index: u32,
        /// How urgent.
        priority: Priority,
    },
    /// Chunk `index`'s bytes (untrusted until verified against the manifest).
    Data {
        /// The chunk.
        index: u32,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The request for chunk `index` is no longer needed.
    Cancel {
        /// The chunk.
        index: u32,
    },
    /// The sender will not serve chunk `index` now; ask again after `retry_after_ms`, or ask
    /// one of `alternatives`.
    Busy {
        /// The chunk.
        index: u32,
        /// When to ask this peer again.
        retry_after_ms: u32,
        /// Peers that may have it.
        alternatives: Vec<SocketAddr>,
    },
    /// The sender does not hold chunk `index`.
    NotHere {
        /// The chunk.
        index: u32,
    },
    /// To a tracker: the sender is a member of `manifest`'s swarm (the first message of a
    /// tracker session, and again on every re-announce).
    Announce {
        /// The image.
        manifest: ContentHash,
        /// The rack the sender believes it is in (a server's subnet map takes precedence);
        /// empty when unknown.
        rack: String,
        /// The sender holds every chunk.
        complete: bool,
    },
    /// From a tracker: members to peer with, those in the announcer's rack apart.
    Neighbours {
        /// Members in the announcer's rack.
        same_rack: Vec<SocketAddr>,
        /// Members elsewhere (or of unknown rack).
        elsewhere: Vec<SocketAddr>,
    },
    /// To a tracker, from a server writing a boot script: up to `wanted` complete members of
    /// `manifest`'s swarm in the rack of the node booting at `client`, which may serve it the
    /// image's firmware-stage files (ADR 0016). The only message of its session.
    FirmwarePeersWanted {
        /// The image.
        manifest: ContentHash,
        /// The booting node's address.
        client: IpAddr,
        /// At most [`FIRMWARE_PEERS_MAX`].
        wanted: u8,
    },
    /// From a tracker: the answer to [`Message::FirmwarePeersWanted`], the members' chunk
    /// endpoints (none when the node's rack is unknown or holds no complete member).
    FirmwarePeers {
        /// The members, at most [`FIRMWARE_PEERS_MAX`].
        peers: Vec<SocketAddr>,
    },
}

/// The most members one [`Message::FirmwarePeersWanted`] asks for.
pub const FIRMWARE_PEERS_MAX: usize = 16;

/// A frame that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix exceeds [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// The frame ended before its fields did.
    #[error("{0} is truncated")]
    Truncated(&'static str),
    /// Bytes were left after the last field.
    #[error("{kind} has {extra} bytes after its fields")]
    TrailingBytes {
        /// Which message.
        kind: &'static str,
        /// How many.
        extra: usize,
    },
    /// An unknown kind byte.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A field value out of range.
    #[error("{0}")]
    OutOfRange(String),
    /// A bitfield that does not fit its length.
    #[error(transparent)]
    Bitfield(#[from] BitfieldError),
}

const HELLO: u8 = 1;
const HAVE: u8 = 2;
const HAVE_CHUNK: u8 = 3;
const REQUEST: u8 = 4;
const DATA: u8 = 5;
const CANCEL: u8 = 6;
const BUSY: u8 = 7;
const NOT_HERE: u8 = 8;
const ANNOUNCE: u8 = 9;
const NEIGHBOURS: u8 = 10;
const FIRMWARE_PEERS_WANTED: u8 = 11;
const FIRMWARE_PEERS: u8 = 12;

impl Message {
    /// Appends the frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Self::Hello {
                manifest,
                chunk_count,
            } => {
                out.push(HELLO);
                out.extend_from_slice(&manifest.0);
                out.extend_from_slice(&chunk_count.to_be_bytes());
            }
            Self::Have(bitfield) => {
                out.push(HAVE);
                out.extend_from_slice(&bitfield.len().to_be_bytes());
                out.extend_from_slice(&bitfield.to_bytes());
            }
            Self::HaveChunk { index } => {
                out.push(HAVE_CHUNK);
                out.extend_from_slice(&index.to_be_bytes());
            }
            Self::Request { index, priority } => {
                out.push(REQUEST);
                out.extend_from_slice(&index.to_be_bytes());
                out.push(*priority as u8);
            }
            Self::Data { index, bytes } => {
                out.push(DATA);
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Self::Cancel { index } => {
                out.push(CANCEL);
                out.extend_from_slice(&index.to_be_bytes());
            }
            Self::Busy {
                index,
                retry_after_ms,
                alternatives,
            } => {
                out.push(BUSY);
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&retry_after_ms.to_be_bytes());
                encode_addresses(
                    &alternatives[..alternatives.len().min(ALTERNATIVES_MAX)],
                    out,
                );
            }
            Self::NotHere { index } => {
                out.push(NOT_HERE);
                out.extend_from_slice(&index.to_be_bytes());
            }
            Self::Announce {
                manifest,
                rack,
                complete,
            } => {
                out.push(ANNOUNCE);
                out.extend_from_slice(&manifest.0);
                out.push(u8::from(*complete));
                // An overlong name is cut at a character boundary rather than refused: the
                // rack is a hint, and the server's subnet map comes first anyway.
                let mut end = rack.len().min(RACK_NAME_MAX);
                while !rack.is_char_boundary(end) {
                    end -= 1;
                }
                out.push(end as u8);
                out.extend_from_slice(&rack.as_bytes()[..end]);
            }
            Self::Neighbours {
                same_rack,
                elsewhere,
            } => {
                out.push(NEIGHBOURS);
                let same_rack = &same_rack[..same_rack.len().min(NEIGHBOURS_MAX)];
                encode_addresses(same_rack, out);
                let room = NEIGHBOURS_MAX - same_rack.len();
                encode_addresses(&elsewhere[..elsewhere.len().min(room)], out);
            }
            Self::FirmwarePeersWanted {
                manifest,
                client,
                wanted,
            } => {
                out.push(FIRMWARE_PEERS_WANTED);
                out.extend_from_slice(&manifest.0);
                encode_ip(*client, out);
                out.push((*wanted).min(FIRMWARE_PEERS_MAX as u8));
            }
            Self::FirmwarePeers { peers } => {
                out.push(FIRMWARE_PEERS);
                encode_addresses(&peers[..peers.len().min(FIRMWARE_PEERS_MAX)], out);
            }
        }
        let length = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&length.to_be_bytes());
    }

    /// Which message, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Have(_) => "have",
            Self::HaveChunk { .. } => "have-chunk",
            Self::Request { .. } => "request",
            Self::Data { .. } => "data",
            Self::Cancel { .. } => "cancel",
            Self::Busy { .. } => "busy",
            Self::NotHere { .. } => "not-here",
            Self::Announce { .. } => "announce",
            Self::Neighbours { .. } => "neighbours",
            Self::FirmwarePeersWanted { .. } => "firmware-peers-wanted",
            Self::FirmwarePeers { .. } => "firmware-peers",
        }
    }
}

/// A count byte and each address as its IP (see [`encode_ip`]) and port.
fn encode_addresses(addresses: &[SocketAddr], out: &mut Vec<u8>) {
    out.push(addresses.len() as u8);
    for address in addresses {
        encode_ip(address.ip(), out);
        out.extend_from_slice(&address.port().to_be_bytes());
    }
}

/// The family (4 or 6) and the octets.
fn encode_ip(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
}

/// The first bytes of a `Data` frame for chunk `index` of `length` bytes, so that a sender
/// can write them and then the chunk's bytes as they are, without copying them into a frame.
pub fn data_frame_header(index: u32, length: usize) -> [u8; 9] {
    let frame_length = u32::try_from(length + 5).unwrap_or(u32::MAX);
    let mut header = [0u8; 9];
    header[..4].copy_from_slice(&frame_length.to_be_bytes());
    header[4] = DATA;
    header[5..].copy_from_slice(&index.to_be_bytes());
    header
}

/// Where a chunk's bytes lie in `frame` when it is exactly one `Data` frame: its index and
/// the range of its bytes, which a fetcher verifies and stores in place instead of copying
/// them into a [`Message::Data`]. `Ok(None)` for anything else (another kind, a frame not
/// whole, or more than one), which [`decode_frame`] then decodes or refuses. A `Data` frame
/// is refused here exactly as [`decode_frame`] refuses it.
pub fn data_frame_payload(frame: &[u8]) -> Result<Option<(u32, Range<usize>)>, WireError> {
    let (Some(prefix), Some(&DATA)) = (frame.get(..4), frame.get(4)) else {
        return Ok(None);
    };
    let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(WireError::TooLong(length));
    }
    if frame.len() != 4 + length {
        return Ok(None);
    }
    let mut fields = Fields {
        bytes: &frame[5..],
        kind: "data",
    };
    let (index, _bytes) = fields.data()?;
    Ok(Some((index, 9..frame.len())))
}

/// Takes one frame off the front of `buffer`: `Ok(None)` until a whole frame is there, then
/// the message and how many bytes it took.
pub fn decode_frame(buffer: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    let Some(prefix) = buffer.get(..4) else {
        return Ok(None);
    };
    let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(WireError::TooLong(length));
    }
    let Some(body) = buffer.get(4..4 + length) else {
        return Ok(None);
    };
    decode_body(body).map(|message| Some((message, 4 + length)))
}

/// Reads fields off a frame body, front to back.
struct Fields<'a> {
    bytes: &'a [u8],
    kind: &'static str,
}

impl<'a> Fields<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < count {
            return Err(WireError::Truncated(self.kind));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn index(&mut self) -> Result<u32, WireError> {
        let index = self.u32()?;
        if index >= CHUNKS_MAX {
            return Err(WireError::OutOfRange(format!(
                "{}: chunk index {index} beyond {CHUNKS_MAX}",
                self.kind
            )));
        }
        Ok(index)
    }

    /// A count byte (at most `most`) and that many addresses.
    fn addresses(&mut self, most: usize) -> Result<Vec<SocketAddr>, WireError> {
        let count = usize::from(self.u8()?);
        if count > most {
            return Err(WireError::OutOfRange(format!(
                "{}: {count} addresses, more than {most}",
                self.kind
            )));
        }
        let mut addresses = Vec::with_capacity(count);
        for _ in 0..count {
            let ip = self.ip()?;
            addresses.push(SocketAddr::new(ip, self.u16()?));
        }
        Ok(addresses)
    }

    /// A family byte (4 or 6) and the octets.
    fn ip(&mut self) -> Result<IpAddr, WireError> {
        Ok(match self.u8()? {
            4 => {
                let octets = self.take(4)?;
                IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
            }
            6 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            other => {
                return Err(WireError::OutOfRange(format!(
                    "{}: unknown address family {other}",
                    self.kind
                )));
            }
        })
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// A `Data` body: the chunk's index and its bytes, at most a chunk.
    fn data(&mut self) -> Result<(u32, &'a [u8]), WireError> {
        let index = self.index()?;
        let bytes = self.rest();
        if bytes.len() > CHUNK_BYTES_MAX {
            return Err(WireError::OutOfRange(format!(
                "data: {} bytes, more than a chunk",
                bytes.len()
            )));
        }
        Ok((index, bytes))
    }

    fn end(self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                kind: self.kind,
                extra: self.bytes.len(),
            })
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    let Some((&kind, rest)) = body.split_first() else {
        return Err(WireError::Truncated("frame"));
    };
    let name = match kind {
        HELLO => "hello",
        HAVE => "have",
        HAVE_CHUNK => "have-chunk",
        REQUEST => "request",
        DATA => "data",
        CANCEL => "cancel",
        BUSY => "busy",
        NOT_HERE => "not-here",
        ANNOUNCE => "announce",
        NEIGHBOURS => "neighbours",
        FIRMWARE_PEERS_WANTED => "firmware-peers-wanted",
        FIRMWARE_PEERS => "firmware-peers",
        other => return Err(WireError::UnknownKind(other)),
    };
    let mut fields = Fields {
        bytes: rest,
        kind: name,
    };
    let message = match kind {
        HELLO => {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(fields.take(32)?);
            let chunk_count = fields.u32()?;
            if chunk_count > CHUNKS_MAX {
                return Err(WireError::OutOfRange(format!(
                    "hello: {chunk_count} chunks, more than {CHUNKS_MAX}"
                )));
            }
            Message::Hello {
                manifest: ContentHash(hash),
                chunk_count,
            }
        }
        HAVE => {
            let length = fields.u32()?;
            if length > CHUNKS_MAX {
                return Err(WireError::OutOfRange(format!(
                    "have: {length} chunks, more than {CHUNKS_MAX}"
                )));
            }
            Message::Have(Bitfield::from_bytes(length, fields.rest())?)
        }
        HAVE_CHUNK => Message::HaveChunk {
            index: fields.index()?,
        },
        REQUEST => {
            let index = fields.index()?;
            let priority = match fields.u8()? {
                0 => Priority::Background,
                1 => Priority::BootTrace,
                2 => Priority::OnDemand,
                other => {
                    return Err(WireError::OutOfRange(format!(
                        "request: unknown priority {other}"
                    )));
                }
            };
            Message::Request { index, priority }
        }
        DATA => {
            let (index, bytes) = fields.data()?;
            Message::Data {
                index,
                bytes: bytes.to_vec(),
            }
        }
        CANCEL => Message::Cancel {
            index: fields.index()?,
        },
        BUSY => {
            let index = fields.index()?;
            let retry_after_ms = fields.u32()?;
            let alternatives = fields.addresses(ALTERNATIVES_MAX)?;
            Message::Busy {
                index,
                retry_after_ms,
                alternatives,
            }
        }
        NOT_HERE => Message::NotHere {
            index: fields.index()?,
        },
        ANNOUNCE => {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(fields.take(32)?);
            let complete = match fields.u8()? {
                0 => false,
                1 => true,
                other => {
                    return Err(WireError::OutOfRange(format!(
                        "announce: complete flag {other}"
                    )));
                }
            };
            let length = usize::from(fields.u8()?);
            if length > RACK_NAME_MAX {
                return Err(WireError::OutOfRange(format!(
                    "announce: rack name of {length} bytes, more than {RACK_NAME_MAX}"
                )));
            }
            let rack = std::str::from_utf8(fields.take(length)?)
                .map_err(|_| WireError::OutOfRange("announce: rack name is not UTF-8".into()))?
                .to_owned();
            Message::Announce {
                manifest: ContentHash(hash),
                rack,
                complete,
            }
        }
        NEIGHBOURS => {
            let same_rack = fields.addresses(NEIGHBOURS_MAX)?;
            let elsewhere = fields.addresses(NEIGHBOURS_MAX - same_rack.len())?;
            Message::Neighbours {
                same_rack,
                elsewhere,
            }
        }
        FIRMWARE_PEERS_WANTED => {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(fields.take(32)?);
            let client = fields.ip()?;
            let wanted = fields.u8()?;
            if usize::from(wanted) > FIRMWARE_PEERS_MAX {
                return Err(WireError::OutOfRange(format!(
                    "firmware-peers-wanted: {wanted} peers, more than {FIRMWARE_PEERS_MAX}"
                )));
            }
            Message::FirmwarePeersWanted {
                manifest: ContentHash(hash),
                client,
                wanted,
            }
        }
        FIRMWARE_PEERS => Message::FirmwarePeers {
            peers: fields.addresses(FIRMWARE_PEERS_MAX)?,
        },
        other => return Err(WireError::UnknownKind(other)),
    };
    fields.end()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Message> {
        let mut have = Bitfield::empty(100);
        have.insert(3);
        have.insert(99);
        vec![
            Message::Hello {
                manifest: ContentHash::of(b"manifest"),
                chunk_count: 100,
            },
            Message::Have(have),
            Message::HaveChunk { index: 7 },
            Message::Request {
                index: 8,
                priority: Priority::BootTrace,
            },
            Message::Data {
                index: 9,
                bytes: vec![1, 2, 3],
            },
            Message::Cancel { index: 10 },
            Message::Busy {
                index: 11,
                retry_after_ms: 250,
                alternatives: vec![
                    "10.0.0.7:7100".parse().unwrap(),
                    "[fd00::7]:7100".parse().unwrap(),
                ],
            },
            Message::NotHere { index: 12 },
            Message::Announce {
                manifest: ContentHash::of(b"manifest"),
                rack: "r7".into(),
                complete: true,
            },
            Message::Neighbours {
                same_rack: vec!["10.0.0.8:7200".parse().unwrap()],
                elsewhere: vec![
                    "10.0.1.8:7200".parse().unwrap(),
                    "[fd00::8]:7200".parse().unwrap(),
                ],
            },
            Message::FirmwarePeersWanted {
                manifest: ContentHash::of(b"manifest"),
                client: "10.0.2.9".parse().unwrap(),
                wanted: 2,
            },
            Message::FirmwarePeersWanted {
                manifest: ContentHash::of(b"manifest"),
                client: "fd00::9".parse().unwrap(),
                wanted: 16,
            },
            Message::FirmwarePeers {
                peers: vec![
                    "10.0.2.8:7200".parse().unwrap(),
                    "[fd00::8]:7200".parse().unwrap(),
                ],
            },
            Message::FirmwarePeers { peers: Vec::new() },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_stream_of_frames() {
        let mut stream = Vec::new();
        for message in every_kind() {
            message.encode(&mut stream);
        }
        let mut offset = 0;
        let mut decoded = Vec::new();
        // Byte by byte at first: a partial frame is "not yet", never an error.
        for end in 0..4 {
            assert_eq!(decode_frame(&stream[..end]), Ok(None));
        }
        while let Some((message, used)) = decode_frame(&stream[offset..]).unwrap() {
            decoded.push(message);
            offset += used;
        }
        assert_eq!(offset, stream.len());
        assert_eq!(decoded, every_kind());
    }

    #[test]
    fn a_data_frame_is_found_in_place_and_refused_as_decode_frame_refuses_it() {
        let mut frame = Vec::new();
        let data = Message::Data {
            index: 9,
            bytes: vec![1, 2, 3],
        };
        data.encode(&mut frame);
        assert_eq!(data_frame_payload(&frame), Ok(Some((9, 9..12))));
        assert_eq!(&frame[9..12], &[1, 2, 3]);
        // Not whole, more than one frame, or another kind: left to `decode_frame`.
        assert_eq!(data_frame_payload(&frame[..11]), Ok(None));
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        assert_eq!(data_frame_payload(&two), Ok(None));
        let mut not_here = Vec::new();
        Message::NotHere { index: 9 }.encode(&mut not_here);
        assert_eq!(data_frame_payload(&not_here), Ok(None));
        // The bounds `decode_frame` checks, with the same errors.
        for bad in [
            vec![0, 0, 0, 3, DATA, 0, 0],
            vec![0, 0, 0, 5, DATA, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert_eq!(
                data_frame_payload(&bad).map(|_| ()),
                decode_frame(&bad).map(|_| ())
            );
            assert!(data_frame_payload(&bad).is_err());
        }
        let mut huge = u32::try_from(FRAME_BYTES_MAX + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        huge.push(DATA);
        assert!(matches!(
            data_frame_payload(&huge),
            Err(WireError::TooLong(_))
        ));
    }

    #[test]
    fn frames_that_break_a_bound_are_refused() {
        let frame = |body: &[u8]| {
            let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
            bytes.extend_from_slice(body);
            bytes
        };
        let too_long = u32::try_from(FRAME_BYTES_MAX + 1).unwrap().to_be_bytes();
        assert!(matches!(
            decode_frame(&too_long),
            Err(WireError::TooLong(_))
        ));
        assert!(matches!(
            decode_frame(&frame(&[99])),
            Err(WireError::UnknownKind(99))
        ));
        assert!(matches!(
            decode_frame(&frame(&[REQUEST, 0, 0, 0, 1])),
            Err(WireError::Truncated("request"))
        ));
        assert!(matches!(
            decode_frame(&frame(&[REQUEST, 0, 0, 0, 1, 9])),
            Err(WireError::OutOfRange(_))
        ));
        assert!(matches!(
            decode_frame(&frame(&[CANCEL, 0, 0, 0, 1, 0])),
            Err(WireError::TrailingBytes { .. })
        ));
        assert!(matches!(
            decode_frame(&frame(&[CANCEL, 0xff, 0xff, 0xff, 0xff])),
            Err(WireError::OutOfRange(_))
        ));
        assert!(matches!(
            decode_frame(&frame(&[BUSY, 0, 0, 0, 1, 0, 0, 0, 0, 17])),
            Err(WireError::OutOfRange(_))
        ));
        let mut announce = vec![ANNOUNCE];
        announce.extend_from_slice(&[0; 32]);
        announce.extend_from_slice(&[2, 0]);
        assert!(matches!(
            decode_frame(&frame(&announce)),
            Err(WireError::OutOfRange(_))
        ));
        announce[33] = 0;
        announce[34] = 65;
        assert!(matches!(
            decode_frame(&frame(&announce)),
            Err(WireError::OutOfRange(_))
        ));
        announce[34] = 2;
        announce.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(
            decode_frame(&frame(&announce)),
            Err(WireError::OutOfRange(_))
        ));
        assert!(matches!(
            decode_frame(&frame(&[NEIGHBOURS, 17])),
            Err(WireError::OutOfRange(_))
        ));
        // Sixteen in the rack leave no room for any elsewhere.
        let mut full = vec![NEIGHBOURS, 16];
        for host in 0..16 {
            full.extend_from_slice(&[4, 10, 0, 0, host, 0x1c, 0x20]);
        }
        full.extend_from_slice(&[1, 4, 10, 0, 1, 1, 0x1c, 0x20]);
        assert!(matches!(
            decode_frame(&frame(&full)),
            Err(WireError::OutOfRange(_))
        ));
        let mut wanted = vec![FIRMWARE_PEERS_WANTED];
        wanted.extend_from_slice(&[0; 32]);
        wanted.extend_from_slice(&[4, 10, 0, 0, 9, 17]);
        assert!(matches!(
            decode_frame(&frame(&wanted)),
            Err(WireError::OutOfRange(_))
        ));
        wanted[38] = 2;
        wanted[33] = 5;
        assert!(matches!(
            decode_frame(&frame(&wanted)),
            Err(WireError::OutOfRange(_))
        ));
        assert!(matches!(
            decode_frame(&frame(&[FIRMWARE_PEERS, 17])),
            Err(WireError::OutOfRange(_))
        ));
        assert!(matches!(
            decode_frame(&frame(&[HAVE, 0, 0, 0, 9, 0x00, 0xff])),
            Err(WireError::Bitfield(BitfieldError::TrailingBits { .. }))
        ));
    }

    #[test]
    fn a_data_frame_written_as_header_and_bytes_decodes_like_an_encoded_one() {
        let bytes = vec![7u8; 1000];
        let mut encoded = Vec::new();
        Message::Data {
            index: 42,
            bytes: bytes.clone(),
        }
        .encode(&mut encoded);
        let mut written = data_frame_header(42, bytes.len()).to_vec();
        written.extend_from_slice(&bytes);
        assert_eq!(written, encoded);
    }
}
