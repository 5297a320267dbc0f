//! DHCPv4 client (RFC 2131) for the bootmesh agent in a booting node's initramfs: DISCOVER,
//! OFFER, REQUEST, ACK, then renewal at T1 (unicast to the server) and rebinding at T2
//! (broadcast) until the lease expires, when it starts over.
//!
//! Sans-IO like the server: datagrams and the time go in through `handle_*`, packets come out
//! of [`DhcpClient::poll_transmit`], the next timer from [`DhcpClient::poll_timeout`]. The
//! transaction ids come from a seed the caller draws, so a run is reproducible. Retransmissions
//! back off from one second (boot networks are fast and a node waiting is a node not booting)
//! to a bounded maximum, with a bounded number of attempts per exchange.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

/// What the client says about itself and how patiently it retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpClientConfig {
    /// The interface's Ethernet address.
    pub hardware_address: [u8; 6],
    /// Option 60, so servers can tell the agent from firmware and iPXE.
    pub vendor_class: String,
    /// First retransmission interval; each retry doubles it.
    pub retransmit_initial: Duration,
    /// Largest retransmission interval.
    pub retransmit_max: Duration,
    /// DISCOVERs (or REQUESTs) sent before the exchange is given up and restarted.
    pub attempts_max: u32,
}

impl DhcpClientConfig {
    /// Defaults for a booting node with this Ethernet address.
    pub fn new(hardware_address: [u8; 6]) -> Self {
        Self {
            hardware_address,
            vendor_class: "bootmesh-agent".to_owned(),
            retransmit_initial: Duration::from_secs(1),
            retransmit_max: Duration::from_secs(8),
            attempts_max: 6,
        }
    }
}

/// A bound lease and the network settings that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpLease {
    /// Our address.
    pub address: Ipv4Addr,
    /// Prefix length from option 1 (24 if the server sent none).
    pub prefix_length: u8,
    /// Option 3.
    pub routers: Vec<Ipv4Addr>,
    /// Option 6.
    pub dns_servers: Vec<Ipv4Addr>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Option 54: the server that granted it.
    pub server_identifier: Ipv4Addr,
    /// siaddr (the next server), if set.
    pub next_server: Option<Ipv4Addr>,
    /// Option 51.
    pub lease_time: Duration,
    /// When the lease was acknowledged.
    pub acquired_at: Instant,
}

impl DhcpLease {
    fn renew_at(&self) -> Instant {
        self.acquired_at + self.lease_time / 2
    }
    fn rebind_at(&self) -> Instant {
        self.acquired_at + self.lease_time * 7 / 8
    }
    fn expires_at(&self) -> Instant {
        self.acquired_at + self.lease_time
    }
}

/// Where the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Broadcasting DISCOVERs.
    Selecting,
    /// Broadcasting a REQUEST for an offered address.
    Requesting { offered: Ipv4Addr, server: Ipv4Addr },
    /// Holding a lease; nothing to send until T1.
    Bound,
    /// Past T1: unicast REQUESTs to the server.
    Renewing,
    /// Past T2: broadcast REQUESTs to any server.
    Rebinding,
}

/// How a datagram was handled (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Not for us, or not useful now.
    Ignored(&'static str),
    /// Not a DHCP message.
    Malformed(String),
    /// An offer was taken; a REQUEST follows.
    Offered(Ipv4Addr),
    /// A lease was acknowledged (first time, or renewed).
    Bound(Ipv4Addr),
    /// The server refused; the client starts over.
    Refused,
}

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientDestination {
    /// 255.255.255.255:67, sent from 0.0.0.0:68 (or our address while rebinding).
    Broadcast,
    /// The server's address, port 67, from our bound address.
    Unicast(Ipv4Addr),
}

/// A packet to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTransmit {
    /// Where to.
    pub destination: ClientDestination,
    /// The encoded message.
    pub bytes: Vec<u8>,
}

/// The DHCP client state machine for one interface.
#[derive(Debug)]
pub struct DhcpClient {
    config: DhcpClientConfig,
    phase: Phase,
    xid: u32,
    /// xorshift state for the next transaction ids.
    random_state: u64,
    attempts: u32,
    next_send_at: Option<Instant>,
    lease: Option<DhcpLease>,
    pending: Option<ClientTransmit>,
}

/// A BOOTP header with the DHCP magic cookie and no options, built without randomness.
fn blank_message() -> Message {
    let mut header = [0u8; 241];
    header[0] = 1; // BOOTREQUEST
    header[1] = 1; // Ethernet
    header[2] = 6;
    header[236..240].copy_from_slice(&[99, 130, 83, 99]);
    header[240] = 255; // End option.
    Message::from_bytes(&header)
        .unwrap_or_else(|_| unreachable!("the blank DHCP header is well formed"))
}

impl DhcpClient {
    /// A client that starts selecting at once; `seed` (from the caller's RNG seam) picks the
    /// transaction ids.
    pub fn new(config: DhcpClientConfig, now: Instant, seed: u64) -> Self {
        let mut client = Self {
            config,
            phase: Phase::Selecting,
            xid: 0,
            random_state: seed | 1,
            attempts: 0,
            next_send_at: Some(now),
            lease: None,
            pending: None,
        };
        client.xid = client.next_xid();
        client
    }

    fn next_xid(&mut self) -> u32 {
        self.random_state ^= self.random_state << 13;
        self.random_state ^= self.random_state >> 7;
        self.random_state ^= self.random_state << 17;
        (self.random_state >> 32) as u32
    }

    /// The lease, once bound (kept while renewing and rebinding).
    pub fn lease(&self) -> Option<&DhcpLease> {
        self.lease.as_ref()
    }

    /// The next packet to send, if any.
    pub fn poll_transmit(&mut self) -> Option<ClientTransmit> {
        self.pending.take()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let lease_deadline = self.lease.as_ref().map(|lease| match self.phase {
            Phase::Bound => lease.renew_at(),
            Phase::Renewing => lease.rebind_at(),
            _ => lease.expires_at(),
        });
        match (self.next_send_at, lease_deadline) {
            (Some(send), Some(lease)) => Some(send.min(lease)),
            (send, lease) => send.or(lease),
        }
    }

    fn retransmit_interval(&self) -> Duration {
        let doublings = self.attempts.saturating_sub(1).min(16);
        self.config
            .retransmit_initial
            .saturating_mul(1u32 << doublings)
            .min(self.config.retransmit_max)
    }

    fn restart(&mut self, now: Instant) {
        self.phase = Phase::Selecting;
        self.lease = None;
        self.attempts = 0;
        self.xid = self.next_xid();
        self.next_send_at = Some(now);
    }

    /// Time passed: send, resend, renew, rebind or start over, as the timers say.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(lease) = &self.lease {
            if now >= lease.expires_at() {
                self.restart(now);
            } else if self.phase == Phase::Bound && now >= lease.renew_at() {
                self.phase = Phase::Renewing;
                self.attempts = 0;
                self.next_send_at = Some(now);
            } else if self.phase == Phase::Renewing && now >= lease.rebind_at() {
                self.phase = Phase::Rebinding;
                self.attempts = 0;
                self.next_send_at = Some(now);
            }
        }
        let Some(send_at) = self.next_send_at else {
            return;
        };
        if now < send_at {
            return;
        }
        if self.attempts >= self.config.attempts_max {
            match self.phase {
                // Nobody answered: a fresh exchange with a new id.
                Phase::Selecting | Phase::Requesting { .. } => {
                    self.restart(now);
                }
                // Keep trying until T2 or expiry moves us on.
                Phase::Renewing | Phase::Rebinding => self.attempts = 0,
                Phase::Bound => {}
            }
        }
        self.attempts += 1;
        self.pending = self.build_transmit();
        self.next_send_at = Some(now + self.retransmit_interval());
    }

    fn base_message(&self, message_type: MessageType, client_address: Ipv4Addr) -> Message {
        // Decoded from a blank header rather than made with dhcproto's constructors: those draw
        // a random xid from the thread RNG, and getrandom(2) blocks in a freshly booted machine
        // until the kernel's entropy pool is ready, which under emulation takes minutes. A
        // sans-IO core must not reach for randomness of its own anyway.
        let mut message = blank_message();
        message.set_xid(self.xid);
        message.set_ciaddr(client_address);
        message.set_chaddr(&self.config.hardware_address);
        message.set_opcode(Opcode::BootRequest);
        message.set_htype(HType::Eth);
        if client_address.is_unspecified() {
            // No address yet: replies must be broadcast.
            message.set_flags(Flags::default().set_broadcast());
        }
        let options = message.opts_mut();
        options.insert(DhcpOption::MessageType(message_type));
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&self.config.hardware_address);
        options.insert(DhcpOption::ClientIdentifier(client_id));
        options.insert(DhcpOption::ClassIdentifier(
            self.config.vendor_class.as_bytes().to_vec(),
        ));
        options.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::Hostname,
            OptionCode::DomainName,
            OptionCode::AddressLeaseTime,
        ]));
        message
    }

    fn build_transmit(&self) -> Option<ClientTransmit> {
        let (message, destination) = match &self.phase {
            Phase::Selecting => (
                self.base_message(MessageType::Discover, Ipv4Addr::UNSPECIFIED),
                ClientDestination::Broadcast,
            ),
            Phase::Requesting { offered, server } => {
                let mut message = self.base_message(MessageType::Request, Ipv4Addr::UNSPECIFIED);
                message
                    .opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(*offered));
                message
                    .opts_mut()
                    .insert(DhcpOption::ServerIdentifier(*server));
                (message, ClientDestination::Broadcast)
            }
            Phase::Renewing => {
                let lease = self.lease.as_ref()?;
                (
                    self.base_message(MessageType::Request, lease.address),
                    ClientDestination::Unicast(lease.server_identifier),
                )
            }
            Phase::Rebinding => {
                let lease = self.lease.as_ref()?;
                (
                    self.base_message(MessageType::Request, lease.address),
                    ClientDestination::Broadcast,
                )
            }
            Phase::Bound => return None,
        };
        let bytes = message.to_vec().ok()?;
        Some(ClientTransmit { destination, bytes })
    }

    /// A datagram arrived on port 68.
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) -> ClientEvent {
        let message = match Message::from_bytes(bytes) {
            Ok(message) => message,
            Err(error) => return ClientEvent::Malformed(error.to_string()),
        };
        if message.opcode() != Opcode::BootReply {
            return ClientEvent::Ignored("not a reply");
        }
        if message.xid() != self.xid {
            return ClientEvent::Ignored("another transaction");
        }
        // hlen comes off the wire; dhcproto's `chaddr()` slices by it and panics beyond 16.
        if message.hlen() != 6 {
            return ClientEvent::Ignored("another client");
        }
        if message.chaddr() != self.config.hardware_address.as_slice() {
            return ClientEvent::Ignored("another client");
        }
        let Some(DhcpOption::MessageType(message_type)) =
            message.opts().get(OptionCode::MessageType)
        else {
            return ClientEvent::Ignored("no message type");
        };
        let server = match message.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(server)) => *server,
            _ => return ClientEvent::Ignored("no server identifier"),
        };
        match (message_type, &self.phase) {
            (MessageType::Offer, Phase::Selecting) => {
                let offered = message.yiaddr();
                if offered.is_unspecified() || offered.is_broadcast() || offered.is_multicast() {
                    return ClientEvent::Ignored("offer without a usable address");
                }
                self.phase = Phase::Requesting { offered, server };
                self.attempts = 0;
                self.next_send_at = Some(now);
                self.handle_timeout(now);
                ClientEvent::Offered(offered)
            }
            (MessageType::Ack, Phase::Requesting { offered, .. })
                if message.yiaddr() == *offered =>
            {
                self.bind(now, &message, server)
            }
            (MessageType::Ack, Phase::Renewing | Phase::Rebinding) => match &self.lease {
                Some(lease) if lease.address == message.yiaddr() => {
                    self.bind(now, &message, server)
                }
                _ => ClientEvent::Ignored("ACK for another address"),
            },
            (MessageType::Nak, Phase::Requesting { .. } | Phase::Renewing | Phase::Rebinding) => {
                self.restart(now);
                ClientEvent::Refused
            }
            _ => ClientEvent::Ignored("not expected now"),
        }
    }

    fn bind(&mut self, now: Instant, message: &Message, server: Ipv4Addr) -> ClientEvent {
        let options = message.opts();
        let prefix_length = match options.get(OptionCode::SubnetMask) {
            Some(DhcpOption::SubnetMask(mask)) => u32::from(*mask).count_ones() as u8,
            _ => 24,
        };
        let routers = match options.get(OptionCode::Router) {
            Some(DhcpOption::Router(routers)) => routers.clone(),
            _ => Vec::new(),
        };
        let dns_servers = match options.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(servers)) => servers.clone(),
            _ => Vec::new(),
        };
        let hostname = match options.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(name)) => Some(name.clone()),
            _ => None,
        };
        // No lease time means "infinite" in practice; a day keeps the renewal logic simple.
        let lease_time = match options.get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(seconds)) => Duration::from_secs(u64::from(*seconds)),
            _ => Duration::from_secs(86_400),
        }
        .max(Duration::from_secs(10));
        let next_server = Some(message.siaddr()).filter(|address| !address.is_unspecified());
        let address = message.yiaddr();
        self.lease = Some(DhcpLease {
            address,
            prefix_length,
            routers,
            dns_servers,
            hostname,
            server_identifier: server,
            next_server,
            lease_time,
            acquired_at: now,
        });
        self.phase = Phase::Bound;
        self.attempts = 0;
        self.next_send_at = None;
        self.pending = None;
        ClientEvent::Bound(address)
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
