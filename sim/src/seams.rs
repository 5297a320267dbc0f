//! The simulated seams that `node`'s wiring runs on here.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::SystemTime;

use boot_services::dhcp::{Destination, Transmit, decode_message};
use boot_services::source::{FileSource, MemoryFile, SourceError};
use node::seams::{Clock, DatagramSocket, DhcpLink, Network, ReceivedDatagram};

use crate::trace::Trace;

/// Wall time = the simulation's epoch plus virtual elapsed time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimClock;

impl Clock for SimClock {
    fn wall_now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + turmoil::since_epoch().unwrap_or_default()
    }
}

/// A DHCP "segment" on turmoil. turmoil has no broadcast and simulated nodes keep their host
/// address, so every reply that would be broadcast or sent to a not-yet-configured address is
/// delivered to each node of the segment on port 68; the node checks xid and chaddr as a real
/// client does.
#[derive(Debug)]
pub struct SimDhcpLink {
    socket: turmoil::net::UdpSocket,
    local_address: Ipv4Addr,
    segment: Vec<IpAddr>,
    trace: Trace,
}

impl SimDhcpLink {
    /// Binds port 67 on this host.
    pub async fn bind(
        local_address: Ipv4Addr,
        segment: Vec<IpAddr>,
        trace: Trace,
    ) -> io::Result<Self> {
        let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 67)).await?;
        Ok(Self {
            socket,
            local_address,
            segment,
            trace,
        })
    }
}

impl DhcpLink for SimDhcpLink {
    async fn receive(&self, buffer: &mut [u8]) -> io::Result<ReceivedDatagram> {
        let (length_bytes, source) = self.socket.recv_from(buffer).await?;
        let source = match source {
            SocketAddr::V4(source) => source,
            SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
        };
        Ok(ReceivedDatagram {
            length_bytes,
            source,
            local_address: self.local_address,
            local_port: 67,
            interface_index: 1,
        })
    }

    async fn send(&self, transmit: &Transmit) -> io::Result<()> {
        let summary = decode_message(&transmit.bytes)
            .map(|message| {
                format!(
                    "{:?} xid={:#x} yiaddr={}",
                    transmit.message_type,
                    message.xid(),
                    message.yiaddr()
                )
            })
            .unwrap_or_else(|_| "undecodable reply".into());
        self.trace.record(format!(
            "{} -> {:?}: {summary}",
            self.local_address, transmit.destination
        ));
        let port = match transmit.destination {
            Destination::Relay(address) => {
                self.socket
                    .send_to(&transmit.bytes, SocketAddr::V4(address))
                    .await?;
                return Ok(());
            }
            Destination::Unicast(address) => address.port(),
            Destination::Broadcast { port } | Destination::Hardware { port, .. } => port,
        };
        for node in &self.segment {
            self.socket
                .send_to(&transmit.bytes, SocketAddr::new(*node, port))
                .await?;
        }
        Ok(())
    }

    fn interface_index(&self) -> u32 {
        1
    }
}

/// turmoil's UDP sockets behind `node`'s [`Network`] seam.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurmoilNetwork;

/// A turmoil UDP socket behind [`DatagramSocket`].
#[derive(Debug)]
pub struct TurmoilSocket {
    socket: turmoil::net::UdpSocket,
    /// The peer set by `connect`: turmoil's sockets have no `send`/`recv`, so the peer is
    /// remembered here and strays are dropped as the kernel would drop them.
    connected_peer: std::sync::OnceLock<SocketAddr>,
}

impl DatagramSocket for TurmoilSocket {
    async fn receive_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buffer).await
    }
    async fn send_to(&self, bytes: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(bytes, target).await
    }
    fn local_address(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
    async fn connect(&self, peer: SocketAddr) -> io::Result<()> {
        self.socket.connect(peer).await?;
        self.connected_peer
            .set(peer)
            .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "socket already connected"))
    }
    async fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        let peer = self.connected_peer()?;
        self.socket.send_to(bytes, peer).await
    }
    async fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        let peer = self.connected_peer()?;
        loop {
            let (length, source) = self.socket.recv_from(buffer).await?;
            if source == peer {
                return Ok(length);
            }
        }
    }
}

impl TurmoilSocket {
    fn connected_peer(&self) -> io::Result<SocketAddr> {
        self.connected_peer
            .get()
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket not connected"))
    }
}

impl Network for TurmoilNetwork {
    type Socket = TurmoilSocket;
    async fn bind(&self, address: SocketAddr) -> io::Result<TurmoilSocket> {
        let socket = turmoil::net::UdpSocket::bind(address).await?;
        Ok(TurmoilSocket {
            socket,
            connected_peer: std::sync::OnceLock::new(),
        })
    }
}

/// Files held in memory: the simulated disk of a boot server.
#[derive(Debug, Clone, Default)]
pub struct MemoryFiles {
    files: Arc<BTreeMap<String, MemoryFile>>,
}

impl MemoryFiles {
    /// Serves `(path, bytes)` pairs.
    pub fn new(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self {
            files: Arc::new(
                files
                    .into_iter()
                    .map(|(path, bytes)| (path, MemoryFile::new(bytes)))
                    .collect(),
            ),
        }
    }
}

impl FileSource for MemoryFiles {
    type File = MemoryFile;
    fn open(&self, path: &str) -> Result<MemoryFile, SourceError> {
        self.files.get(path).cloned().ok_or(SourceError::NotFound)
    }
}
