//! Just enough netlink for the agent: rtnetlink to bring the NIC up and give it its lease
//! (address, route), and generic netlink to hand a connected socket to the kernel's NBD client.
//!
//! Messages are built by hand because the agent needs five of them; a netlink library would
//! bring an async runtime and hundreds of message types into PID 1.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

/// Why a netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be made or used.
    #[error("netlink socket: {0}")]
    Socket(#[from] rustix::io::Errno),
    /// The kernel refused the request.
    #[error("kernel refused {request}: {errno}")]
    Refused {
        /// Which request.
        request: &'static str,
        /// What the kernel said.
        errno: rustix::io::Errno,
    },
    /// The reply did not parse.
    #[error("malformed netlink reply to {request}: {reason}")]
    Malformed {
        /// Which request.
        request: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
}

const NLMSG_HEADER_BYTES: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_REPLACE: u16 = 0x100;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_DHCP: u8 = 16;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One netlink message under construction: header, fixed part, attributes.
#[derive(Debug)]
pub struct Message {
    bytes: Vec<u8>,
    open_nests: Vec<usize>,
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}

impl Message {
    /// A request of `message_type` with `flags` (REQUEST and ACK are always set).
    pub fn new(message_type: u16, flags: u16) -> Self {
        let mut bytes = vec![0u8; NLMSG_HEADER_BYTES];
        bytes[4..6].copy_from_slice(&message_type.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Self {
            bytes,
            open_nests: Vec::new(),
        }
    }

    /// Appends raw bytes of the fixed part (padded to 4).
    pub fn fixed(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self.bytes.resize(align4(self.bytes.len()), 0);
        self
    }

    /// Appends an attribute.
    pub fn attribute(&mut self, attribute_type: u16, payload: &[u8]) -> &mut Self {
        let length = 4 + payload.len();
        self.bytes
            .extend_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_ne_bytes());
        self.bytes.extend_from_slice(&attribute_type.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.bytes.resize(align4(self.bytes.len()), 0);
        self
    }

    /// Opens a nested attribute; close it with [`Message::end_nest`].
    pub fn begin_nest(&mut self, attribute_type: u16) -> &mut Self {
        self.open_nests.push(self.bytes.len());
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes
            .extend_from_slice(&(attribute_type | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub fn end_nest(&mut self) -> &mut Self {
        if let Some(start) = self.open_nests.pop() {
            let length = u16::try_from(self.bytes.len() - start).unwrap_or(u16::MAX);
            self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        }
        self
    }

    fn finish(&mut self, sequence: u32) -> &[u8] {
        let length = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        self.bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        &self.bytes
    }
}

/// A reply message: its type and what follows the header.
#[derive(Debug)]
pub struct Reply {
    /// `nlmsg_type`.
    pub message_type: u16,
    /// The bytes after the 16-byte header.
    pub payload: Vec<u8>,
}

/// A netlink socket of one protocol.
#[derive(Debug)]
pub struct NetlinkSocket {
    socket: OwnedFd,
    sequence: u32,
}

impl NetlinkSocket {
    /// Opens a rtnetlink socket.
    pub fn route() -> Result<Self, NetlinkError> {
        // NETLINK_ROUTE is protocol 0, which rustix spells as no protocol.
        Self::open(None)
    }

    /// Opens a generic netlink socket.
    pub fn generic() -> Result<Self, NetlinkError> {
        Self::open(Some(netlink::GENERIC))
    }

    fn open(protocol: Option<rustix::net::Protocol>) -> Result<Self, NetlinkError> {
        let socket = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            rustix::net::SocketFlags::CLOEXEC,
            protocol,
        )?;
        rustix::net::bind(&socket, &SocketAddrNetlink::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 1,
        })
    }

    /// Sends `message` and collects replies until the kernel's ACK (or error).
    pub fn request(
        &mut self,
        request: &'static str,
        message: &mut Message,
    ) -> Result<Vec<Reply>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        rustix::net::sendto(
            &self.socket,
            message.finish(sequence),
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        let mut replies = Vec::new();
        let mut buffer = vec![0u8; 32 * 1024];
        // Bounded: a kernel that never ACKs would otherwise hold PID 1 forever.
        for _ in 0..64 {
            let (received, _) = rustix::net::recv(&self.socket, &mut buffer, RecvFlags::empty())?;
            let mut offset = 0;
            while offset + NLMSG_HEADER_BYTES <= received {
                let field = |at: usize| -> [u8; 4] {
                    let mut word = [0u8; 4];
                    word.copy_from_slice(&buffer[offset + at..offset + at + 4]);
                    word
                };
                let length = u32::from_ne_bytes(field(0)) as usize;
                let message_type = u16::from_ne_bytes([buffer[offset + 4], buffer[offset + 5]]);
                let reply_sequence = u32::from_ne_bytes(field(8));
                if length < NLMSG_HEADER_BYTES || offset + length > received {
                    return Err(NetlinkError::Malformed {
                        request,
                        reason: "message length out of bounds",
                    });
                }
                let payload = buffer[offset + NLMSG_HEADER_BYTES..offset + length].to_vec();
                offset += align4(length);
                if reply_sequence != sequence {
                    continue;
                }
                match message_type {
                    NLMSG_ERROR => {
                        let Some(code) = payload.get(0..4) else {
                            return Err(NetlinkError::Malformed {
                                request,
                                reason: "short error message",
                            });
                        };
                        let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Refused {
                            request,
                            errno: rustix::io::Errno::from_raw_os_error(-code),
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(Reply {
                        message_type,
                        payload,
                    }),
                }
            }
        }
        Err(NetlinkError::Malformed {
            request,
            reason: "no acknowledgement",
        })
    }
}

/// Iterates over the attributes in `bytes`: (type without flags, payload).
pub fn attributes(bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header = bytes.get(offset..offset + 4)?;
        let length = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let attribute_type = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if length < 4 {
            return None;
        }
        let payload = bytes.get(offset + 4..offset + length)?;
        offset += align4(length);
        Some((attribute_type, payload))
    })
}

/// Sets the link with `interface_index` up.
pub fn set_link_up(socket: &mut NetlinkSocket, interface_index: u32) -> Result<(), NetlinkError> {
    // struct ifinfomsg: family u8, pad u8, type u16, index i32, flags u32, change u32.
    let mut fixed = [0u8; 16];
    fixed[4..8].copy_from_slice(&interface_index.to_ne_bytes());
    fixed[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
    fixed[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
    let mut message = Message::new(RTM_NEWLINK, 0);
    message.fixed(&fixed);
    socket.request("set link up", &mut message).map(drop)
}

/// Adds `address/prefix_length` to the interface (replacing the same address if present).
pub fn add_address(
    socket: &mut NetlinkSocket,
    interface_index: u32,
    address: Ipv4Addr,
    prefix_length: u8,
) -> Result<(), NetlinkError> {
    // struct ifaddrmsg: family u8, prefixlen u8, flags u8, scope u8, index u32.
    let mut fixed = [0u8; 8];
    fixed[0] = libc::AF_INET as u8;
    fixed[1] = prefix_length;
    fixed[4..8].copy_from_slice(&interface_index.to_ne_bytes());
    let host_bits = 32u32.saturating_sub(u32::from(prefix_length));
    let mask = if host_bits >= 32 {
        0
    } else {
        u32::MAX << host_bits
    };
    let broadcast = Ipv4Addr::from(u32::from(address) | !mask);
    let mut message = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
    message
        .fixed(&fixed)
        .attribute(IFA_LOCAL, &address.octets())
        .attribute(IFA_ADDRESS, &address.octets())
        .attribute(IFA_BROADCAST, &broadcast.octets());
    socket.request("add address", &mut message).map(drop)
}

/// Adds a default route through `gateway` on the interface.
pub fn add_default_route(
    socket: &mut NetlinkSocket,
    interface_index: u32,
    gateway: Ipv4Addr,
) -> Result<(), NetlinkError> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type (u8 each), flags u32.
    let fixed = [
        libc::AF_INET as u8,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_DHCP,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ];
    let mut message = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
    message
        .fixed(&fixed)
        .attribute(RTA_GATEWAY, &gateway.octets())
        .attribute(RTA_OIF, &interface_index.to_ne_bytes());
    match socket.request("add default route", &mut message) {
        Ok(_) => Ok(()),
        // A route already there (a retry after a partial failure) is what we wanted.
        Err(NetlinkError::Refused { errno, .. }) if errno == rustix::io::Errno::EXIST => Ok(()),
        Err(error) => Err(error),
    }
}

/// The id of the generic netlink family `name` (dynamic; the kernel assigns it when the module
/// registers the family).
pub fn generic_family_id(socket: &mut NetlinkSocket, name: &str) -> Result<u16, NetlinkError> {
    let mut name_bytes = name.as_bytes().to_vec();
    name_bytes.push(0);
    let mut message = Message::new(GENL_ID_CTRL, 0);
    message
        .fixed(&[CTRL_CMD_GETFAMILY, 1, 0, 0])
        .attribute(CTRL_ATTR_FAMILY_NAME, &name_bytes);
    let replies = socket.request("resolve generic netlink family", &mut message)?;
    for reply in replies {
        let Some(attributes_bytes) = reply.payload.get(4..) else {
            continue;
        };
        for (attribute_type, payload) in attributes(attributes_bytes) {
            if attribute_type == CTRL_ATTR_FAMILY_ID && payload.len() >= 2 {
                return Ok(u16::from_ne_bytes([payload[0], payload[1]]));
            }
        }
    }
    Err(NetlinkError::Malformed {
        request: "resolve generic netlink family",
        reason: "no family id in the reply",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_carry_their_length_and_flag() {
        let mut message = Message::new(42, 0);
        message
            .fixed(&[1, 2, 3, 4])
            .begin_nest(7)
            .begin_nest(1)
            .attribute(1, &5u32.to_ne_bytes())
            .end_nest()
            .end_nest();
        let bytes = message.finish(9).to_vec();
        assert_eq!(bytes.len(), 16 + 4 + 4 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 36);
        let outer: Vec<_> = attributes(&bytes[20..]).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, 7);
        let inner: Vec<_> = attributes(outer[0].1).collect();
        assert_eq!(inner[0].0, 1);
        let innermost: Vec<_> = attributes(inner[0].1).collect();
        assert_eq!(innermost, vec![(1, &5u32.to_ne_bytes()[..])]);
    }

    #[test]
    fn truncated_attributes_end_the_iteration() {
        assert_eq!(attributes(&[8, 0, 1, 0, 1]).count(), 0);
        assert_eq!(attributes(&[2, 0, 1, 0]).count(), 0);
    }
}
