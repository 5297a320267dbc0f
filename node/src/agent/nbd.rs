//! `nbd` root mode: the agent negotiates an export with a server itself (fixed newstyle,
//! `NBD_OPT_GO`) and hands the connected socket to the kernel's NBD client over generic
//! netlink. The kernel then owns the connection: no process has to outlive `switch_root` to
//! keep the root readable, unlike the `NBD_DO_IT` ioctl path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::devices::BlockDevice;
use super::netlink::{self, Message, NetlinkError, NetlinkSocket};

/// Why the NBD root could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The TCP connection or handshake failed.
    #[error("nbd {server}: {reason}")]
    Handshake {
        /// The server.
        server: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The kernel refused the device.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
/// Replies to one option are bounded: a server that streams INFO forever is refused.
const OPTION_REPLIES_MAX: usize = 32;
const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

/// An export negotiated and ready for the kernel.
#[derive(Debug)]
pub struct NegotiatedExport {
    /// The connected socket, in transmission phase.
    pub socket: TcpStream,
    /// Export size.
    pub size_bytes: u64,
    /// Transmission flags (read-only, multi-conn, ...).
    pub transmission_flags: u16,
}

fn read_exact<const N: usize>(socket: &mut TcpStream) -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    socket.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Connects to `server` and negotiates `export_name` with `NBD_OPT_GO`. Simple replies only:
/// the kernel's client does not speak structured replies.
pub fn negotiate(server: SocketAddr, export_name: &str) -> Result<NegotiatedExport, NbdError> {
    let fail = |reason: String| NbdError::Handshake { server, reason };
    let mut socket = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .map_err(|error| fail(format!("connect: {error}")))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|error| fail(format!("timeout: {error}")))?;
    let _ = socket.set_nodelay(true);
    let io = |error: std::io::Error| fail(format!("handshake: {error}"));

    let magic = u64::from_be_bytes(read_exact::<8>(&mut socket).map_err(io)?);
    let option_magic = u64::from_be_bytes(read_exact::<8>(&mut socket).map_err(io)?);
    if magic != NBD_MAGIC || option_magic != IHAVEOPT {
        return Err(fail("not a newstyle NBD server".into()));
    }
    let handshake_flags = u16::from_be_bytes(read_exact::<2>(&mut socket).map_err(io)?);
    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(fail("server does not speak fixed newstyle".into()));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (handshake_flags & FLAG_NO_ZEROES));
    socket.write_all(&client_flags.to_be_bytes()).map_err(io)?;

    let name = export_name.as_bytes();
    let mut data = Vec::with_capacity(8 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut option = Vec::with_capacity(16 + data.len());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&(data.len() as u32).to_be_bytes());
    option.extend_from_slice(&data);
    socket.write_all(&option).map_err(io)?;

    let mut export = None;
    for _ in 0..OPTION_REPLIES_MAX {
        let magic = u64::from_be_bytes(read_exact::<8>(&mut socket).map_err(io)?);
        let _option = u32::from_be_bytes(read_exact::<4>(&mut socket).map_err(io)?);
        let reply_type = u32::from_be_bytes(read_exact::<4>(&mut socket).map_err(io)?);
        let length = u32::from_be_bytes(read_exact::<4>(&mut socket).map_err(io)?);
        if magic != REPLY_MAGIC || length > OPTION_REPLY_BYTES_MAX {
            return Err(fail("malformed option reply".into()));
        }
        let mut payload = vec![0u8; length as usize];
        socket.read_exact(&mut payload).map_err(io)?;
        if reply_type & 0x8000_0000 != 0 {
            let message = String::from_utf8_lossy(&payload).into_owned();
            return Err(fail(format!(
                "export {export_name:?} refused (error {reply_type:#x}): {message}"
            )));
        }
        match reply_type {
            REP_INFO if payload.len() >= 12 => {
                let info = u16::from_be_bytes([payload[0], payload[1]]);
                if info == INFO_EXPORT {
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&payload[2..10]);
                    export = Some((
                        u64::from_be_bytes(size),
                        u16::from_be_bytes([payload[10], payload[11]]),
                    ));
                }
            }
            REP_ACK => {
                let Some((size_bytes, transmission_flags)) = export else {
                    return Err(fail("GO acknowledged without export information".into()));
                };
                socket
                    .set_read_timeout(None)
                    .map_err(|error| fail(format!("timeout: {error}")))?;
                return Ok(NegotiatedExport {
                    socket,
                    size_bytes,
                    transmission_flags,
                });
            }
            _ => {}
        }
    }
    Err(fail("too many option replies".into()))
}

const NBD_CMD_CONNECT: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_MAJOR: u32 = 43;

/// Hands `export`'s socket to the kernel and returns the `/dev/nbdN` it made. The kernel keeps
/// the socket after this process closes its copy.
pub fn attach(export: &NegotiatedExport) -> Result<BlockDevice, NbdError> {
    let mut generic = NetlinkSocket::generic()?;
    let family = netlink::generic_family_id(&mut generic, "nbd")?;
    let fd = u32::try_from(export.socket.as_raw_fd()).unwrap_or(u32::MAX);
    let mut message = Message::new(family, 0);
    message
        .fixed(&[NBD_CMD_CONNECT, 1, 0, 0])
        .attribute(NBD_ATTR_SIZE_BYTES, &export.size_bytes.to_ne_bytes())
        .attribute(NBD_ATTR_BLOCK_SIZE_BYTES, &4096u64.to_ne_bytes())
        // Requests wait this long on a dead server before failing, and as long again for a
        // reconnect (`NBD_CMD_RECONFIGURE`) before giving up.
        .attribute(NBD_ATTR_TIMEOUT, &30u64.to_ne_bytes())
        .attribute(NBD_ATTR_DEAD_CONN_TIMEOUT, &30u64.to_ne_bytes())
        .attribute(
            NBD_ATTR_SERVER_FLAGS,
            &u64::from(export.transmission_flags).to_ne_bytes(),
        )
        .begin_nest(NBD_ATTR_SOCKETS)
        .begin_nest(NBD_SOCK_ITEM)
        .attribute(NBD_SOCK_FD, &fd.to_ne_bytes())
        .end_nest()
        .end_nest();
    let replies = generic.request("nbd connect", &mut message)?;
    let mut index = None;
    for reply in &replies {
        let Some(attributes) = reply.payload.get(4..) else {
            continue;
        };
        for (attribute_type, payload) in netlink::attributes(attributes) {
            if attribute_type == NBD_ATTR_INDEX && payload.len() >= 4 {
                index = Some(u32::from_ne_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]));
            }
        }
    }
    let index = index.ok_or(NetlinkError::Malformed {
        request: "nbd connect",
        reason: "no device index in the reply",
    })?;
    // The minor depends on the module's max_part; sysfs says which it is.
    let (major, minor) = std::fs::read_to_string(format!("/sys/block/nbd{index}/dev"))
        .ok()
        .and_then(|text| {
            let (major, minor) = text.trim().split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .unwrap_or((NBD_MAJOR, index));
    Ok(BlockDevice {
        path: format!("/dev/nbd{index}").into(),
        major,
        minor,
    })
}
