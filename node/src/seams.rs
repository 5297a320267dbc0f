//! The seams through which the service wiring reaches the outside world: wall-clock time, the
//! DHCP links, OS randomness and (in `journal`) storage. `serve` plugs in the real ones; the
//! simulator plugs in simulated ones and runs the very same wiring.
//!
//! Monotonic time and timers come from `tokio::time`, which the simulator already virtualises,
//! so they need no seam of their own.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::SystemTime;

use boot_services::dhcp::Transmit;

/// Wall-clock time, for lease expiry (leases outlive restarts, so they need a calendar).
pub trait Clock: Clone + Send + Sync + 'static {
    /// The current time.
    fn wall_now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // This is the seam: the one place that reads the clock.
    fn wall_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Where a DHCP datagram came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedDatagram {
    /// Payload length in the caller's buffer.
    pub length_bytes: usize,
    /// Sender.
    pub source: SocketAddrV4,
    /// Our address on the interface it came in on.
    pub local_address: Ipv4Addr,
    /// The port it came in on.
    pub local_port: u16,
    /// The interface it came in on.
    pub interface_index: u32,
}

/// One DHCP listening socket: on an interface (and port) of ours.
pub trait DhcpLink: Send + Sync + 'static {
    /// Receives one datagram into `buffer`.
    fn receive(
        &self,
        buffer: &mut [u8],
    ) -> impl Future<Output = io::Result<ReceivedDatagram>> + Send;
    /// Sends a reply that the DHCP core produced for a datagram received on this link.
    fn send(&self, transmit: &Transmit) -> impl Future<Output = io::Result<()>> + Send;
    /// The interface this link serves.
    fn interface_index(&self) -> u32;
}

/// The monotonic clock for protocol timers. Under the simulator `tokio::time` is virtual, so
/// this is deterministic there.
#[allow(clippy::disallowed_methods)] // The seam for monotonic time.
pub fn monotonic_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Random bytes from the operating system, for credentials (boot tokens). Not a seeded RNG on
/// purpose: a token must be unpredictable, and no simulated run depends on one.
pub fn os_random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)?;
    Ok(bytes)
}

/// A UDP socket (real or simulated).
pub trait DatagramSocket: Send + Sync + 'static {
    /// Receives one datagram.
    fn receive_from(
        &self,
        buffer: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, std::net::SocketAddr)>> + Send;
    /// Sends one datagram.
    fn send_to(
        &self,
        bytes: &[u8],
        target: std::net::SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send;
    /// The bound address.
    fn local_address(&self) -> io::Result<std::net::SocketAddr>;
    /// Restricts the socket to `peer`: from then on only its datagrams arrive, and
    /// [`send`](Self::send) / [`receive`](Self::receive) talk to it without naming it (which
    /// spares the kernel a route lookup per datagram).
    fn connect(&self, peer: std::net::SocketAddr) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends one datagram to the connected peer.
    fn send(&self, bytes: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Receives one datagram from the connected peer.
    fn receive(&self, buffer: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

/// Binds UDP sockets (real or simulated).
pub trait Network: Clone + Send + Sync + 'static {
    /// The socket type.
    type Socket: DatagramSocket;
    /// Binds a socket to `address` (port 0: any free port).
    fn bind(
        &self,
        address: std::net::SocketAddr,
    ) -> impl Future<Output = io::Result<Self::Socket>> + Send;
}

/// The host's network stack through tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioNetwork;

impl DatagramSocket for tokio::net::UdpSocket {
    async fn receive_from(&self, buffer: &mut [u8]) -> io::Result<(usize, std::net::SocketAddr)> {
        self.recv_from(buffer).await
    }
    async fn send_to(&self, bytes: &[u8], target: std::net::SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::send_to(self, bytes, target).await
    }
    fn local_address(&self) -> io::Result<std::net::SocketAddr> {
        self.local_addr()
    }
    async fn connect(&self, peer: std::net::SocketAddr) -> io::Result<()> {
        tokio::net::UdpSocket::connect(self, peer).await
    }
    async fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        tokio::net::UdpSocket::send(self, bytes).await
    }
    async fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        self.recv(buffer).await
    }
}

impl Network for TokioNetwork {
    type Socket = tokio::net::UdpSocket;
    async fn bind(&self, address: std::net::SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        tokio::net::UdpSocket::bind(address).await
    }
}
