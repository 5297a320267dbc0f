//! `nbd` root mode: the agent negotiates an export with a server itself (fixed newstyle,
//! `NBD_OPT_GO`) and hands the connected socket to the kernel's NBD client over generic
//! netlink. The kernel then owns the connection: no process has to outlive `switch_root` to
//! keep the root readable, unlike the `NBD_DO_IT` ioctl path. A `lazy` root uses the same
//! handshake and attach over a socket pair with its own server ([`negotiate_on`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use boot_services::nbd::client::NbdClientHandshake;

use super::devices::BlockDevice;
use super::netlink::{self, Message, NetlinkError, NetlinkSocket};

/// Why the NBD root could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection or handshake failed.
    #[error("nbd {server}: {reason}")]
    Handshake {
        /// The server (an address, or which local server).
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// The kernel refused the device.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// An export negotiated and ready for the kernel.
#[derive(Debug)]
pub struct NegotiatedExport {
    /// The connected socket, in transmission phase.
    pub socket: OwnedFd,
    /// Export size.
    pub size_bytes: u64,
    /// Transmission flags (read-only, multi-conn, ...).
    pub transmission_flags: u16,
}

/// Connects to `server` and negotiates `export_name` (the sans-IO handshake of
/// `boot_services::nbd::client`, driven over a blocking socket with timeouts).
pub fn negotiate(server: SocketAddr, export_name: &str) -> Result<NegotiatedExport, NbdError> {
    let socket = TcpStream::connect_timeout(&server, Duration::from_secs(5)).map_err(|error| {
        NbdError::Handshake {
            server: server.to_string(),
            reason: format!("connect: {error}"),
        }
    })?;
    let _ = socket.set_nodelay(true);
    negotiate_over(
        socket,
        export_name,
        &server.to_string(),
        Duration::from_secs(10),
    )
}

/// As [`negotiate`], over a connected local socket (a `lazy` root's own server, named
/// `server` in errors).
pub fn negotiate_on(
    socket: std::os::unix::net::UnixStream,
    export_name: &str,
    server: &str,
) -> Result<NegotiatedExport, NbdError> {
    negotiate_over(socket, export_name, server, Duration::from_secs(30))
}

/// A connected stream a handshake can run on, its reads bounded by a timeout.
trait HandshakeStream: Read + Write + Into<OwnedFd> {
    fn set_handshake_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl HandshakeStream for TcpStream {
    fn set_handshake_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl HandshakeStream for std::os::unix::net::UnixStream {
    fn set_handshake_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// The handshake on `socket` with each read bounded by `timeout`; the socket is left without
/// a timeout, for the kernel.
fn negotiate_over<S: HandshakeStream>(
    socket: S,
    export_name: &str,
    server: &str,
    timeout: Duration,
) -> Result<NegotiatedExport, NbdError> {
    let fail = |reason: String| NbdError::Handshake {
        server: server.to_owned(),
        reason,
    };
    socket
        .set_handshake_timeout(Some(timeout))
        .map_err(|error| fail(format!("timeout: {error}")))?;
    let (socket, size_bytes, transmission_flags) = handshake(socket, export_name).map_err(fail)?;
    socket
        .set_handshake_timeout(None)
        .map_err(|error| fail(format!("timeout: {error}")))?;
    Ok(NegotiatedExport {
        socket: socket.into(),
        size_bytes,
        transmission_flags,
    })
}

/// The client handshake over `socket`: the socket back, the export's size and flags.
fn handshake<S: Read + Write>(mut socket: S, export_name: &str) -> Result<(S, u64, u16), String> {
    let mut handshake = NbdClientHandshake::new(export_name).map_err(|error| error.to_string())?;
    let mut buffer = [0u8; 4096];
    while handshake.wants_input() {
        let received = socket
            .read(&mut buffer)
            .map_err(|error| format!("handshake: {error}"))?;
        if received == 0 {
            return Err("server closed the connection during the handshake".into());
        }
        handshake
            .handle_input(&buffer[..received])
            .map_err(|error| error.to_string())?;
        if let Some(output) = handshake.poll_output() {
            socket
                .write_all(&output)
                .map_err(|error| format!("handshake: {error}"))?;
        }
    }
    let export = handshake
        .outcome()
        .ok_or("handshake ended without an export")?;
    Ok((socket, export.size_bytes, export.transmission_flags))
}

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
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

/// Tells the kernel to drop `device`'s connection: requests in flight and later ones fail,
/// and the device is free for another connect.
pub fn disconnect(device: &BlockDevice) -> Result<(), NbdError> {
    let index: u32 = device
        .path
        .to_str()
        .and_then(|path| path.strip_prefix("/dev/nbd"))
        .and_then(|index| index.parse().ok())
        .ok_or(NetlinkError::Malformed {
            request: "nbd disconnect",
            reason: "not an NBD device path",
        })?;
    let mut generic = NetlinkSocket::generic()?;
    let family = netlink::generic_family_id(&mut generic, "nbd")?;
    let mut message = Message::new(family, 0);
    message
        .fixed(&[NBD_CMD_DISCONNECT, 1, 0, 0])
        .attribute(NBD_ATTR_INDEX, &index.to_ne_bytes());
    generic.request("nbd disconnect", &mut message)?;
    Ok(())
}

/// Hands `export`'s socket to the kernel and returns the `/dev/nbdN` it made. The kernel keeps
/// the socket after this process closes its copy. Requests time out after `timeout_secs`
/// (a server across the network), or never (`None`: a `lazy` root's own server, which bounds
/// its waits itself).
pub fn attach(
    export: &NegotiatedExport,
    timeout_secs: Option<u64>,
) -> Result<BlockDevice, NbdError> {
    let mut generic = NetlinkSocket::generic()?;
    let family = netlink::generic_family_id(&mut generic, "nbd")?;
    let fd = u32::try_from(export.socket.as_raw_fd()).unwrap_or(u32::MAX);
    let mut message = Message::new(family, 0);
    message
        .fixed(&[NBD_CMD_CONNECT, 1, 0, 0])
        .attribute(NBD_ATTR_SIZE_BYTES, &export.size_bytes.to_ne_bytes())
        .attribute(NBD_ATTR_BLOCK_SIZE_BYTES, &4096u64.to_ne_bytes());
    if let Some(timeout_secs) = timeout_secs {
        // Requests wait this long on a dead server before failing, and as long again for a
        // reconnect (`NBD_CMD_RECONFIGURE`) before giving up. Without one the kernel waits
        // for as long as the server takes (it warns of stuck requests meanwhile).
        message
            .attribute(NBD_ATTR_TIMEOUT, &timeout_secs.to_ne_bytes())
            .attribute(NBD_ATTR_DEAD_CONN_TIMEOUT, &timeout_secs.to_ne_bytes());
    }
    message
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
