//! Lease changes: what the DHCP core asks to be made durable before it answers, and their
//! binary encoding for journals. The encoding is versioned by a leading tag byte and every field
//! is length-checked on decode, because a journal on disk is untrusted input after a crash.

use std::net::Ipv4Addr;

/// The client's identity: option 61 when the client sends one, else hardware type + chaddr
/// (RFC 2132 9.14), so a client keeps its lease across NICs only if it says so itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub Vec<u8>);

/// Most bytes a client id, hardware address or hostname may take in a record.
pub const FIELD_BYTES_MAX: usize = 255;

/// A change to the lease table that must be durable before the client hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// `client` holds `address` until `expires_at_unix_secs`.
    Bind {
        /// Who holds it.
        client: ClientId,
        /// Hardware address (chaddr, up to 16 bytes).
        hardware_address: Vec<u8>,
        /// The leased address.
        address: Ipv4Addr,
        /// Expiry, seconds since the Unix epoch.
        expires_at_unix_secs: u64,
        /// The hostname we gave or the client told us.
        hostname: Option<String>,
    },
    /// The client gave the address back; the binding is kept (expired) so that the same client
    /// gets the same address next time while nobody else needs it.
    Release {
        /// Who released it.
        client: ClientId,
        /// The released address.
        address: Ipv4Addr,
        /// When, seconds since the Unix epoch.
        at_unix_secs: u64,
    },
    /// The client found the address in use (DECLINE); nobody gets it until the quarantine ends.
    Decline {
        /// The declined address.
        address: Ipv4Addr,
        /// End of quarantine, seconds since the Unix epoch.
        until_unix_secs: u64,
    },
}

/// Why a stored lease record could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RecordDecodeError {
    /// The record ends before its fields do.
    #[error("record truncated")]
    Truncated,
    /// Unknown leading tag.
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    /// A hostname that is not UTF-8.
    #[error("hostname is not utf-8")]
    HostnameNotUtf8,
    /// Bytes left over after the record.
    #[error("{0} trailing bytes after record")]
    TrailingBytes(usize),
}

const TAG_BIND: u8 = 1;
const TAG_RELEASE: u8 = 2;
const TAG_DECLINE: u8 = 3;

impl LeaseChange {
    /// The address the change concerns.
    pub fn address(&self) -> Ipv4Addr {
        match self {
            Self::Bind { address, .. }
            | Self::Release { address, .. }
            | Self::Decline { address, .. } => *address,
        }
    }

    /// Appends the encoding of this change to `output`. Fields longer than
    /// [`FIELD_BYTES_MAX`] are cut, which the core never produces.
    pub fn encode(&self, output: &mut Vec<u8>) {
        match self {
            Self::Bind {
                client,
                hardware_address,
                address,
                expires_at_unix_secs,
                hostname,
            } => {
                output.push(TAG_BIND);
                put_field(output, &client.0);
                put_field(output, hardware_address);
                output.extend_from_slice(&address.octets());
                output.extend_from_slice(&expires_at_unix_secs.to_be_bytes());
                put_field(output, hostname.as_deref().unwrap_or_default().as_bytes());
            }
            Self::Release {
                client,
                address,
                at_unix_secs,
            } => {
                output.push(TAG_RELEASE);
                put_field(output, &client.0);
                output.extend_from_slice(&address.octets());
                output.extend_from_slice(&at_unix_secs.to_be_bytes());
            }
            Self::Decline {
                address,
                until_unix_secs,
            } => {
                output.push(TAG_DECLINE);
                output.extend_from_slice(&address.octets());
                output.extend_from_slice(&until_unix_secs.to_be_bytes());
            }
        }
    }

    /// Decodes exactly one record from `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordDecodeError> {
        let mut reader = Reader { bytes };
        let change = match reader.byte()? {
            TAG_BIND => {
                let client = ClientId(reader.field()?.to_vec());
                let hardware_address = reader.field()?.to_vec();
                let address = reader.address()?;
                let expires_at_unix_secs = reader.u64()?;
                let hostname_bytes = reader.field()?;
                let hostname = if hostname_bytes.is_empty() {
                    None
                } else {
                    Some(
                        std::str::from_utf8(hostname_bytes)
                            .map_err(|_| RecordDecodeError::HostnameNotUtf8)?
                            .to_owned(),
                    )
                };
                Self::Bind {
                    client,
                    hardware_address,
                    address,
                    expires_at_unix_secs,
                    hostname,
                }
            }
            TAG_RELEASE => Self::Release {
                client: ClientId(reader.field()?.to_vec()),
                address: reader.address()?,
                at_unix_secs: reader.u64()?,
            },
            TAG_DECLINE => Self::Decline {
                address: reader.address()?,
                until_unix_secs: reader.u64()?,
            },
            other => return Err(RecordDecodeError::UnknownTag(other)),
        };
        if !reader.bytes.is_empty() {
            return Err(RecordDecodeError::TrailingBytes(reader.bytes.len()));
        }
        Ok(change)
    }
}

fn put_field(output: &mut Vec<u8>, field: &[u8]) {
    let length = field.len().min(FIELD_BYTES_MAX);
    output.push(length as u8);
    output.extend_from_slice(&field[..length]);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], RecordDecodeError> {
        if self.bytes.len() < count {
            return Err(RecordDecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, RecordDecodeError> {
        Ok(self.take(1)?[0])
    }
    fn field(&mut self) -> Result<&'a [u8], RecordDecodeError> {
        let length = self.byte()?;
        self.take(usize::from(length))
    }
    fn address(&mut self) -> Result<Ipv4Addr, RecordDecodeError> {
        let octets = self.take(4)?;
        Ok(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    }
    fn u64(&mut self) -> Result<u64, RecordDecodeError> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(array))
    }
}
