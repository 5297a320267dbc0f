//! The agent's network bring-up: find the NIC that booted, wait for its link, get a lease with
//! the project's own DHCP client (the sans-IO `DhcpClient`, driven here by a blocking loop), and
//! configure the address and default route through rtnetlink.

// The agent is a driver at the edge: it feeds the real clock to the sans-IO DHCP client.
#![allow(clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use boot_services::dhcp::client::{
    ClientDestination, ClientEvent, DhcpClient, DhcpClientConfig, DhcpLease,
};
use boot_services::dhcp::format_mac;

use super::netlink::{self, NetlinkError, NetlinkSocket};

/// Why the network could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No NIC matches.
    #[error("no network interface {0}")]
    NoInterface(String),
    /// The link never came up.
    #[error("{interface}: no carrier after {waited:?}")]
    NoCarrier {
        /// The interface.
        interface: String,
        /// How long we waited.
        waited: Duration,
    },
    /// No lease.
    #[error("{interface}: no DHCP lease after {waited:?}")]
    NoLease {
        /// The interface.
        interface: String,
        /// How long we tried.
        waited: Duration,
    },
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// rtnetlink refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// A NIC of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `eth0`, `ens3`.
    pub name: String,
    /// Kernel index.
    pub index: u32,
    /// MAC address.
    pub mac: [u8; 6],
}

/// How long to wait for a carrier: virtio is instant, real switches with spanning tree take
/// up to 30 s.
const CARRIER_WAIT: Duration = Duration::from_secs(45);

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

/// The Ethernet NICs under `/sys/class/net`, in name order.
pub fn interfaces() -> Vec<Interface> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let directory = entry.path();
        // type 1 = ARPHRD_ETHER; skips lo, tunnels, and the like.
        if read_trimmed(&directory.join("type")).as_deref() != Some("1") {
            continue;
        }
        let Some(mac) = read_trimmed(&directory.join("address"))
            .and_then(|text| crate::config::parse_mac(&text).ok())
        else {
            continue;
        };
        let Some(index) =
            read_trimmed(&directory.join("ifindex")).and_then(|text| text.parse().ok())
        else {
            continue;
        };
        found.push(Interface { name, index, mac });
    }
    found.sort_by(|left, right| left.name.cmp(&right.name));
    found
}

/// The NIC with `mac`, waiting a little for its driver to register it.
pub fn find_interface(mac: Option<[u8; 6]>) -> Result<Interface, NetworkError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = interfaces();
        let found = match mac {
            Some(mac) => all.into_iter().find(|interface| interface.mac == mac),
            None => all.into_iter().next(),
        };
        if let Some(interface) = found {
            return Ok(interface);
        }
        if Instant::now() >= deadline {
            return Err(NetworkError::NoInterface(
                mac.map(|mac| format_mac(&mac))
                    .unwrap_or_else(|| "with an Ethernet address".into()),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets the link up and waits for its carrier.
pub fn bring_up(interface: &Interface) -> Result<(), NetworkError> {
    let mut route = NetlinkSocket::route()?;
    netlink::set_link_up(&mut route, interface.index)?;
    tracing::debug!(interface = %interface.name, "link set up; waiting for carrier");
    let carrier = Path::new("/sys/class/net")
        .join(&interface.name)
        .join("carrier");
    let started = Instant::now();
    while started.elapsed() < CARRIER_WAIT {
        if read_trimmed(&carrier).as_deref() == Some("1") {
            tracing::debug!(interface = %interface.name, waited = ?started.elapsed(), "carrier");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(NetworkError::NoCarrier {
        interface: interface.name.clone(),
        waited: CARRIER_WAIT,
    })
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |source| NetworkError::Io { what, source }
}

/// How long one DHCP attempt runs before the agent reports and starts over.
const LEASE_WAIT: Duration = Duration::from_secs(60);

/// The DHCP client of a node and its socket, kept for as long as the node runs: after the
/// switch to the image, the agent's companion process renews the lease at T1, rebinds at T2,
/// and starts over if it is lost, because on a diskless node nothing else will (the image's
/// own DHCP clients are masked by default, and an expired lease is an address the server may
/// give to another node).
#[derive(Debug)]
pub struct LeaseKeeper {
    interface: Interface,
    socket: UdpSocket,
    client: DhcpClient,
    buffer: Vec<u8>,
}

impl LeaseKeeper {
    fn new(interface: &Interface, seed: u64) -> Result<Self, NetworkError> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(io("dhcp socket"))?;
        socket.set_reuse_address(true).map_err(io("SO_REUSEADDR"))?;
        socket.set_broadcast(true).map_err(io("SO_BROADCAST"))?;
        // Without an address there is no route; binding to the device makes broadcasts leave
        // through this NIC and only its replies come back.
        socket
            .bind_device(Some(interface.name.as_bytes()))
            .map_err(io("SO_BINDTODEVICE"))?;
        socket
            .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())
            .map_err(io("bind 0.0.0.0:68"))?;
        tracing::debug!(interface = %interface.name, "dhcp socket bound to port 68");
        let mut config = DhcpClientConfig::new(interface.mac);
        config.vendor_class = "bootmesh-agent".into();
        Ok(Self {
            interface: interface.clone(),
            socket: socket.into(),
            client: DhcpClient::new(config, Instant::now(), seed),
            buffer: vec![0u8; 1500],
        })
    }

    /// Sends what the client wants sent, then waits for one datagram or the client's next
    /// timer, whichever comes first.
    fn step(&mut self) -> Result<Option<ClientEvent>, NetworkError> {
        while let Some(transmit) = self.client.poll_transmit() {
            let destination = match transmit.destination {
                ClientDestination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
                ClientDestination::Unicast(server) => SocketAddrV4::new(server, 67),
            };
            tracing::debug!(%destination, bytes = transmit.bytes.len(), "dhcp send");
            if let Err(error) = self.socket.send_to(&transmit.bytes, destination) {
                tracing::warn!(%error, "dhcp send failed; retrying on the next timeout");
            }
        }
        let now = Instant::now();
        let wait = self
            .client
            .poll_timeout()
            .map(|deadline| deadline.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(3600));
        self.socket
            .set_read_timeout(Some(wait))
            .map_err(io("dhcp read timeout"))?;
        match self.socket.recv_from(&mut self.buffer) {
            Ok((length, _)) => {
                let bytes = self.buffer.get(..length).unwrap_or_default();
                Ok(Some(self.client.handle_datagram(Instant::now(), bytes)))
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.client.handle_timeout(Instant::now());
                Ok(None)
            }
            Err(error) => Err(io("dhcp receive")(error)),
        }
    }

    /// Keeps the lease for as long as the process runs. Returns only if the socket fails.
    pub fn keep(mut self) -> NetworkError {
        loop {
            match self.step() {
                Ok(Some(ClientEvent::Bound(address))) => {
                    let Some(lease) = self.client.lease().cloned() else {
                        continue;
                    };
                    match configure(&self.interface, &lease) {
                        Ok(()) => tracing::info!(
                            %address,
                            lease_secs = lease.lease_time.as_secs(),
                            "dhcp lease renewed"
                        ),
                        Err(error) => tracing::error!(%error, "renewed lease not applied"),
                    }
                }
                Ok(Some(ClientEvent::Refused)) => tracing::error!(
                    interface = %self.interface.name,
                    "DHCP LEASE LOST: the server refused the renewal; asking for a new one"
                ),
                Ok(_) => {}
                Err(error) => return error,
            }
        }
    }
}

/// Runs DHCP on `interface` until a lease is bound, then configures it; returns the lease and
/// the client that keeps it.
pub fn acquire_lease(
    interface: &Interface,
    seed: u64,
) -> Result<(DhcpLease, LeaseKeeper), NetworkError> {
    let mut keeper = LeaseKeeper::new(interface, seed)?;
    let started = Instant::now();
    loop {
        match keeper.step()? {
            Some(ClientEvent::Offered(address)) => tracing::info!(%address, "dhcp offer"),
            Some(ClientEvent::Bound(address)) => tracing::info!(%address, "dhcp bound"),
            Some(ClientEvent::Refused) => tracing::warn!("dhcp server refused; starting over"),
            Some(ClientEvent::Malformed(reason)) => tracing::debug!(%reason, "not a dhcp reply"),
            Some(ClientEvent::Ignored(_)) | None => {}
        }
        if let Some(lease) = keeper.client.lease().cloned() {
            configure(interface, &lease)?;
            return Ok((lease, keeper));
        }
        if started.elapsed() > LEASE_WAIT {
            return Err(NetworkError::NoLease {
                interface: interface.name.clone(),
                waited: LEASE_WAIT,
            });
        }
    }
}

fn configure(interface: &Interface, lease: &DhcpLease) -> Result<(), NetworkError> {
    let mut route = NetlinkSocket::route()?;
    netlink::add_address(
        &mut route,
        interface.index,
        lease.address,
        lease.prefix_length,
    )?;
    if let Some(router) = lease.routers.first() {
        netlink::add_default_route(&mut route, interface.index, *router)?;
    }
    tracing::info!(
        interface = %interface.name,
        address = %lease.address,
        prefix_length = lease.prefix_length,
        router = ?lease.routers.first(),
        server = %lease.server_identifier,
        lease_secs = lease.lease_time.as_secs(),
        "network configured"
    );
    Ok(())
}
