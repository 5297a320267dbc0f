//! Linux sockets for DHCP: one UDP socket per served interface, bound to it with
//! SO_BINDTODEVICE, and ARP cache injection so that replies reach clients that have no address
//! yet by unicast (RFC 2131 4.1), as dnsmasq does. See docs/adr/0002-dhcp-reply-delivery.md.
//!
//! This is the one module of the crate with `unsafe`: three ioctls that the standard library
//! and socket2 do not wrap. Each block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use boot_services::dhcp::{Destination, Transmit};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::seams::{DhcpLink, ReceivedDatagram};

/// `ATF_COM` from <net/if_arp.h>: the entry is complete (has a hardware address).
const ATF_COM: libc::c_int = 0x02;
/// Socket buffers sized for boot storms: a burst of DISCOVERs waits here, not on the floor.
const DHCP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A DHCP socket on one interface.
#[derive(Debug)]
pub struct InterfaceLink {
    socket: UdpSocket,
    interface_name: String,
    interface_index: u32,
    port: u16,
    address_cache: std::sync::Mutex<Option<(Ipv4Addr, std::time::Instant)>>,
}

/// How long the interface's address is cached.
const ADDRESS_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl InterfaceLink {
    /// Binds `0.0.0.0:port` on `interface_name` only.
    pub fn bind(interface_name: &str, port: u16) -> io::Result<Self> {
        let interface_index = interface_index(interface_name)?;
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        socket.set_broadcast(true)?;
        socket.bind_device(Some(interface_name.as_bytes()))?;
        // Best effort: the kernel caps these at net.core.[rw]mem_max.
        let _ = socket.set_recv_buffer_size(DHCP_SOCKET_BUFFER_BYTES);
        let _ = socket.set_send_buffer_size(DHCP_SOCKET_BUFFER_BYTES);
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        Ok(Self {
            socket,
            interface_name: interface_name.to_owned(),
            interface_index,
            port,
            address_cache: std::sync::Mutex::new(None),
        })
    }

    /// Our address on the interface, re-read at most once per [`ADDRESS_REFRESH`] so that an
    /// address changed after start is picked up without an ioctl per datagram.
    fn local_address(&self) -> Ipv4Addr {
        let now = crate::seams::monotonic_now();
        if let Ok(mut cached) = self.address_cache.lock() {
            if let Some((address, read_at)) = *cached
                && now.duration_since(read_at) < ADDRESS_REFRESH
            {
                return address;
            }
            let address =
                interface_ipv4_address(&self.interface_name).unwrap_or(Ipv4Addr::UNSPECIFIED);
            *cached = Some((address, now));
            return address;
        }
        interface_ipv4_address(&self.interface_name).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    async fn send_to(&self, bytes: &[u8], destination: SocketAddrV4) -> io::Result<()> {
        self.socket.send_to(bytes, destination).await.map(|_| ())
    }
}

impl DhcpLink for InterfaceLink {
    async fn receive(&self, buffer: &mut [u8]) -> io::Result<ReceivedDatagram> {
        let (length_bytes, source) = self.socket.recv_from(buffer).await?;
        let SocketAddr::V4(source) = source else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ipv6 source on an ipv4 socket",
            ));
        };
        let local_address = self.local_address();
        Ok(ReceivedDatagram {
            length_bytes,
            source,
            local_address,
            local_port: self.port,
            interface_index: self.interface_index,
        })
    }

    async fn send(&self, transmit: &Transmit) -> io::Result<()> {
        match transmit.destination {
            Destination::Relay(address) | Destination::Unicast(address) => {
                self.send_to(&transmit.bytes, address).await
            }
            Destination::Broadcast { port } => {
                self.send_to(
                    &transmit.bytes,
                    SocketAddrV4::new(Ipv4Addr::BROADCAST, port),
                )
                .await
            }
            Destination::Hardware {
                address,
                hardware_address,
                port,
            } => {
                match inject_arp_entry(
                    &self.socket,
                    &self.interface_name,
                    address,
                    hardware_address,
                ) {
                    Ok(()) => {
                        self.send_to(&transmit.bytes, SocketAddrV4::new(address, port))
                            .await
                    }
                    Err(error) => {
                        tracing::debug!(%error, %address, "arp injection failed; broadcasting instead");
                        self.send_to(
                            &transmit.bytes,
                            SocketAddrV4::new(Ipv4Addr::BROADCAST, port),
                        )
                        .await
                    }
                }
            }
        }
    }

    fn interface_index(&self) -> u32 {
        self.interface_index
    }
}

fn interface_name_bytes(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let mut bytes = [0 as libc::c_char; libc::IFNAMSIZ];
    for (slot, byte) in bytes.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(bytes)
}

/// The kernel's index of `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul in interface name"))?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name:?}"),
        ));
    }
    Ok(index)
}

/// The primary IPv4 address of `name`.
pub fn interface_ipv4_address(name: &str) -> io::Result<Ipv4Addr> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_name = interface_name_bytes(name)?;
    // SAFETY: SIOCGIFADDR reads ifr_name and writes ifr_ifru.ifru_addr of the ifreq we own.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFADDR, &mut request) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel stored an AF_INET sockaddr in ifru_addr; sockaddr_in has
    // the same size as sockaddr and we copy it out by value.
    let address: libc::sockaddr_in =
        unsafe { std::mem::transmute_copy(&request.ifr_ifru.ifru_addr) };
    Ok(Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)))
}

/// Tells the kernel that `address` is at `hardware_address` on `interface_name`, so a unicast
/// to a client without an address does not wait for an ARP reply it can never send.
fn inject_arp_entry(
    socket: &UdpSocket,
    interface_name: &str,
    address: Ipv4Addr,
    hardware_address: [u8; 6],
) -> io::Result<()> {
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut request: libc::arpreq = unsafe { std::mem::zeroed() };
    let protocol_address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; we copy the bytes by value.
    request.arp_pa =
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(protocol_address) };
    request.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (slot, byte) in request.arp_ha.sa_data.iter_mut().zip(hardware_address) {
        *slot = byte as libc::c_char;
    }
    request.arp_flags = ATF_COM;
    request.arp_dev = interface_name_bytes(interface_name)?;
    // SAFETY: SIOCSARP reads the arpreq we own and fully initialised above.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSARP, &request) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
