//! DHCPv4 server (RFC 2131/2132) for boot clients: dynamic ranges and static hosts, PXE and
//! UEFI HTTP boot by client architecture (RFC 4578), iPXE recognition, relays (giaddr and
//! option 82) and proxyDHCP.
//!
//! The core never ACKs by itself. A REQUEST that would bind an address becomes a
//! [`LeaseProposal`]; the ACK leaves [`DhcpServer::poll_transmit`] only after the caller made
//! the change durable and called [`DhcpServer::handle_lease_committed`]. Whether "durable" means
//! an fsynced local journal or a Raft commit is the caller's business, so the protocol code does
//! not change when the cluster arrives.

pub mod client;
pub mod config;
pub mod lease_table;
pub mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime};

use dhcproto::v4::{
    self, DhcpOption, DhcpOptions, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use dhcproto::{Decodable, Encodable};

pub use config::{
    AddressRange, BootConfig, DhcpConfig, DhcpMode, HostConfig, Ipv4Network, SubnetConfig,
};
pub use lease_table::{Binding, LeaseTable};
pub use record::{ClientId, LeaseChange, RecordDecodeError};

/// The DHCP server port.
pub const SERVER_PORT: u16 = 67;
/// The DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot server discovery port used by proxyDHCP (PXE spec 2.1).
pub const PXE_PORT: u16 = 4011;

/// One datagram received by the caller, with where it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The UDP payload.
    pub bytes: &'a [u8],
    /// Sender address and port (0.0.0.0:68 for most address-less clients, a relay's :67).
    pub source: SocketAddrV4,
    /// Our address on the receiving interface (IP_PKTINFO's spec_dst); the server identifier.
    pub local_address: Ipv4Addr,
    /// The port it arrived on: 67, or 4011 in proxy mode.
    pub local_port: u16,
    /// Index of the receiving interface, handed back in the reply's [`Transmit`].
    pub interface_index: u32,
}

/// Where a reply must go (RFC 2131 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To a relay agent's giaddr, port 67.
    Relay(SocketAddrV4),
    /// To a client that already has an address (renewing, INFORM, port 4011).
    Unicast(SocketAddrV4),
    /// Limited broadcast on the receiving interface.
    Broadcast {
        /// Destination port (68).
        port: u16,
    },
    /// To an address-less client by its hardware address: the caller must make the frame reach
    /// `hardware_address` without ARP (ARP cache injection or a raw socket).
    Hardware {
        /// The address just offered or acknowledged.
        address: Ipv4Addr,
        /// The client's MAC.
        hardware_address: [u8; 6],
        /// Destination port (68).
        port: u16,
    },
}

/// A reply ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The encoded DHCP message.
    pub bytes: Vec<u8>,
    /// Where to.
    pub destination: Destination,
    /// The interface the request arrived on.
    pub interface_index: u32,
    /// Source address to send from (the server identifier).
    pub source_address: Ipv4Addr,
    /// The message type, for logs and metrics.
    pub message_type: MessageType,
    /// The transaction id, for logs.
    pub xid: u32,
}

/// Identifies a proposal until its commit comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId(pub u64);

/// A lease change that must be made durable before the client is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseProposal {
    /// Hand back to [`DhcpServer::handle_lease_committed`].
    pub id: ProposalId,
    /// What to make durable.
    pub change: LeaseChange,
}

/// Why a datagram got no answer. None of these is fatal: the caller logs and goes on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DhcpDrop {
    /// Not a DHCP message.
    #[error("malformed dhcp message: {0}")]
    Malformed(String),
    /// A BOOTREPLY or a message type a server does not take.
    #[error("not a message for a server: {0}")]
    NotForServer(String),
    /// No configured subnet matches the giaddr or the receiving interface.
    #[error("no subnet for giaddr {giaddr} / local address {local_address}")]
    NoSubnet {
        /// The relay address, 0.0.0.0 when not relayed.
        giaddr: Ipv4Addr,
        /// Our address on the receiving interface.
        local_address: Ipv4Addr,
    },
    /// The dynamic ranges have no address left for a new client.
    #[error("no free address in subnet {0}")]
    PoolExhausted(Ipv4Addr),
    /// In a cluster: this server's blocks have no free address for a new client yet; the
    /// DISCOVER is kept and answered when the next block arrives (not a loss).
    #[error("no free address in this server's blocks of subnet {0} yet: waiting for a block")]
    AwaitingAddresses(Ipv4Addr),
    /// The REQUEST named another server: the client chose it.
    #[error("client chose server {0}")]
    OtherServerChosen(Ipv4Addr),
    /// Too many changes are waiting for their commit; the client will retransmit.
    #[error("commit backlog full")]
    CommitBacklogFull,
    /// proxyDHCP ignores clients that are not PXE clients, and REQUESTs on port 67.
    #[error("proxy mode ignores this message")]
    ProxyIgnored,
    /// Encoding our reply failed (a configured option too long, say).
    #[error("encoding the reply failed: {0}")]
    Encode(String),
}

impl DhcpDrop {
    /// Every kind of drop, by name (for counters), in [`DhcpDrop::kind_index`]'s order.
    pub const KINDS: [&'static str; 9] = [
        "malformed",
        "not_for_server",
        "no_subnet",
        "pool_exhausted",
        "awaiting_addresses",
        "other_server_chosen",
        "commit_backlog_full",
        "proxy_ignored",
        "encode",
    ];

    /// This drop's place in [`DhcpDrop::KINDS`].
    pub fn kind_index(&self) -> usize {
        match self {
            Self::Malformed(_) => 0,
            Self::NotForServer(_) => 1,
            Self::NoSubnet { .. } => 2,
            Self::PoolExhausted(_) => 3,
            Self::AwaitingAddresses(_) => 4,
            Self::OtherServerChosen(_) => 5,
            Self::CommitBacklogFull => 6,
            Self::ProxyIgnored => 7,
            Self::Encode(_) => 8,
        }
    }
}

/// Why a configuration cannot be served.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DhcpConfigError {
    /// A range lies outside its subnet or runs backwards.
    #[error("range {first}-{last} is not inside subnet {network}/{prefix_length}")]
    RangeOutsideSubnet {
        /// Range start.
        first: Ipv4Addr,
        /// Range end.
        last: Ipv4Addr,
        /// Subnet address.
        network: Ipv4Addr,
        /// Subnet prefix.
        prefix_length: u8,
    },
    /// Two hosts share a MAC or a fixed address.
    #[error("duplicate host entry for {0}")]
    DuplicateHost(String),
    /// A lease time that does not fit option 51.
    #[error("lease time {0:?} is out of range (1 s to about 136 years)")]
    LeaseTimeOutOfRange(Duration),
}

struct PendingCommit {
    change: LeaseChange,
    reply: Option<Transmit>,
}

/// The DHCP server state machine. See the module docs for the commit contract.
pub struct DhcpServer {
    config: DhcpConfig,
    table: LeaseTable,
    hosts_by_hardware_address: BTreeMap<[u8; 6], usize>,
    fixed_addresses: BTreeSet<Ipv4Addr>,
    pending: BTreeMap<ProposalId, PendingCommit>,
    proposals: VecDeque<LeaseProposal>,
    transmits: VecDeque<Transmit>,
    next_proposal: u64,
    /// In a cluster: the only addresses this server may hand to a new client (its blocks).
    /// `None`: every address of the ranges (a single server).
    allocatable: Option<Vec<AddressRange>>,
    /// In a cluster: this server's place among the servers that hear a segment.
    rendezvous: Option<Rendezvous>,
    /// DISCOVERs this server answers only after its rendezvous stagger, in due order: the
    /// offer is made (address chosen, reply built) only when due, since a client usually
    /// takes the first-ranked server's offer and this one is never sent.
    delayed_offers: VecDeque<DelayedOffer>,
    /// In a cluster: DISCOVERs of new clients that came while this server's blocks had no
    /// free address, answered when a block arrives (oldest first, bounded by `offers_max`).
    awaiting_addresses: VecDeque<AwaitingAddress>,
}

/// How long a DISCOVER waits for this server's next address block. A block takes a commit
/// to arrive; a client's first retransmission comes about 4 s after its DISCOVER (RFC 2131
/// 4.1), so an offer within this time saves the client that wait.
pub const ADDRESS_WAIT_MAX: Duration = Duration::from_secs(2);

/// Where this server ranks among the servers of a segment, per client (DESIGN 4.3): every
/// server computes the same order, rank `r` offers after `r` x `stagger`, so clients usually
/// take the first server's offer and the others' offers are not needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// This server's id.
    pub own: u64,
    /// Every server of the segment (this one included).
    pub servers: Vec<u64>,
    /// Delay per rank.
    pub stagger: Duration,
    /// Per subnet (its index in the configuration): the servers that, as far as the cluster
    /// state shows, have no free address of their own there. A new client's ranking skips
    /// them, so that it is not kept waiting a stagger for a server that cannot offer. Two
    /// servers whose views differ for a moment both offer at once, or one offers a stagger
    /// late: the client takes one offer, and the other lapses.
    pub exhausted: BTreeMap<usize, BTreeSet<u64>>,
}

impl Rendezvous {
    /// This server's rank for `client`: 0 offers at once. A client that already has an
    /// address (`new_in_subnet` is `None`) can be offered it by any server; a new one
    /// (`Some(subnet)`) only by a server with a free address in that subnet, so the servers
    /// known to have none are left out of its ranking.
    pub fn rank(&self, client: &ClientId, new_in_subnet: Option<usize>) -> usize {
        let skipped = new_in_subnet.and_then(|subnet| self.exhausted.get(&subnet));
        let own_score = rendezvous_score(client, self.own);
        self.servers
            .iter()
            .filter(|server| **server != self.own)
            .filter(|server| skipped.is_none_or(|skipped| !skipped.contains(*server)))
            .filter(|server| {
                let score = rendezvous_score(client, **server);
                score > own_score || (score == own_score && **server < self.own)
            })
            .count()
    }
}

/// Highest-random-weight score of `server` for `client`: FNV-1a over the client id, mixed
/// with the server id by splitmix64. Stable across processes and versions (it is part of the
/// protocol between servers).
pub fn rendezvous_score(client: &ClientId, server: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in &client.0 {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut mixed = hash ^ server.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// Whether a DISCOVER still goes through the rendezvous ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ranked {
    /// Just arrived: a later-ranked server holds it back by its stagger.
    New,
    /// Its stagger has passed (or it waited for addresses): offered now.
    Due,
}

/// A DISCOVER kept to be answered later: the datagram as it came.
#[derive(Debug, Clone)]
struct KeptDiscover {
    client: ClientId,
    bytes: Vec<u8>,
    source: SocketAddrV4,
    local_address: Ipv4Addr,
    local_port: u16,
    interface_index: u32,
}

impl KeptDiscover {
    fn new(context: &RequestContext, datagram: &Datagram<'_>) -> Self {
        Self {
            client: context.client.clone(),
            bytes: datagram.bytes.to_vec(),
            source: datagram.source,
            local_address: datagram.local_address,
            local_port: datagram.local_port,
            interface_index: datagram.interface_index,
        }
    }

    fn datagram(&self) -> Datagram<'_> {
        Datagram {
            bytes: &self.bytes,
            source: self.source,
            local_address: self.local_address,
            local_port: self.local_port,
            interface_index: self.interface_index,
        }
    }
}

/// A DISCOVER waiting for an address block, until `until`.
#[derive(Debug, Clone)]
struct AwaitingAddress {
    until: SystemTime,
    subnet_index: usize,
    discover: KeptDiscover,
}

/// A DISCOVER waiting for its rendezvous stagger, until `due`.
#[derive(Debug, Clone)]
struct DelayedOffer {
    due: SystemTime,
    discover: KeptDiscover,
}

impl std::fmt::Debug for DhcpServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DhcpServer")
            .field("mode", &self.config.mode)
            .field("bindings", &self.table.binding_count())
            .field("reservations", &self.table.reservation_count())
            .field("pending_commits", &self.pending.len())
            .finish()
    }
}

/// How the requesting client boots, from options 60, 77, 93 and 175.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientKind {
    /// An ordinary DHCP client: no boot file.
    Plain,
    /// A PXE ROM or UEFI PXE with this architecture (RFC 4578 option 93).
    Pxe { architecture: u16 },
    /// A UEFI HTTP-boot client with this architecture.
    HttpBoot { architecture: u16 },
    /// iPXE itself: hand it the boot script, never iPXE again.
    Ipxe,
}

const ARCHITECTURE_BIOS: u16 = 0;
const ARCHITECTURE_EFI_X64: u16 = 7;
const ARCHITECTURE_EFI_BC: u16 = 9;
const ARCHITECTURE_EFI_ARM64: u16 = 11;
const ARCHITECTURE_EFI_X64_HTTP: u16 = 16;
const ARCHITECTURE_EFI_ARM64_HTTP: u16 = 19;
/// iPXE's encapsulated options (feature indicators) come in option 175.
const OPTION_IPXE_ENCAPSULATED: u8 = 175;
/// Size of the BOOTP chaddr field; `hlen` can claim more, but no more exists.
const CHADDR_BYTES: usize = 16;

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl DhcpServer {
    /// Replaces the configuration (subnets, hosts, boot files, bounds) and keeps the lease
    /// table, pending commits and queued replies: a fleet configuration change takes effect
    /// for the next message. On `Err` nothing changed.
    pub fn reconfigure(&mut self, config: DhcpConfig) -> Result<(), DhcpConfigError> {
        let fresh = Self::new(config)?;
        self.config = fresh.config;
        self.hosts_by_hardware_address = fresh.hosts_by_hardware_address;
        self.fixed_addresses = fresh.fixed_addresses;
        Ok(())
    }

    /// Validates `config` and builds an empty server.
    pub fn new(config: DhcpConfig) -> Result<Self, DhcpConfigError> {
        for subnet in &config.subnets {
            for range in &subnet.ranges {
                if range.first > range.last
                    || !subnet.network.contains(range.first)
                    || !subnet.network.contains(range.last)
                {
                    return Err(DhcpConfigError::RangeOutsideSubnet {
                        first: range.first,
                        last: range.last,
                        network: subnet.network.address,
                        prefix_length: subnet.network.prefix_length,
                    });
                }
            }
            if subnet.lease_time.as_secs() == 0 || subnet.lease_time.as_secs() > u64::from(u32::MAX)
            {
                return Err(DhcpConfigError::LeaseTimeOutOfRange(subnet.lease_time));
            }
        }
        let mut hosts_by_hardware_address = BTreeMap::new();
        let mut fixed_addresses = BTreeSet::new();
        for (index, host) in config.hosts.iter().enumerate() {
            if hosts_by_hardware_address
                .insert(host.hardware_address, index)
                .is_some()
            {
                return Err(DhcpConfigError::DuplicateHost(format_mac(
                    &host.hardware_address,
                )));
            }
            if let Some(address) = host.address
                && !fixed_addresses.insert(address)
            {
                return Err(DhcpConfigError::DuplicateHost(address.to_string()));
            }
        }
        Ok(Self {
            config,
            table: LeaseTable::default(),
            hosts_by_hardware_address,
            fixed_addresses,
            pending: BTreeMap::new(),
            proposals: VecDeque::new(),
            transmits: VecDeque::new(),
            next_proposal: 0,
            allocatable: None,
            rendezvous: None,
            delayed_offers: VecDeque::new(),
            awaiting_addresses: VecDeque::new(),
        })
    }

    /// Restricts new clients' addresses to `ranges` (the blocks this server holds in a
    /// cluster); `None` lifts the restriction. A client with a binding keeps its address
    /// whatever block it is in. DISCOVERs that waited for addresses are answered now if the
    /// new ranges have some for them.
    pub fn set_allocatable(&mut self, now: SystemTime, ranges: Option<Vec<AddressRange>>) {
        self.allocatable = ranges;
        let awaiting = std::mem::take(&mut self.awaiting_addresses);
        for waiting in awaiting {
            if waiting.until <= now {
                continue;
            }
            // Still no address: it waits on (until its own deadline). Any other drop is the
            // one the DISCOVER would have had on arrival.
            let _ = self.handle_kept_discover(now, waiting.until, &waiting.discover);
        }
    }

    /// DISCOVERs waiting for this server's next address block.
    pub fn awaiting_addresses_count(&self) -> usize {
        self.awaiting_addresses.len()
    }

    /// Per subnet (in configuration order), the addresses this server has promised that no
    /// binding shows yet, and the new clients waiting for one: offers' reservations and leases
    /// on their way to a commit, for addresses not bound here, and DISCOVERs kept for the next
    /// block. A cluster server counts its free addresses from committed leases, which trail a
    /// storm by an exchange and a commit; this is the demand they do not show yet.
    pub fn addresses_in_demand(&self, now: SystemTime) -> Vec<u32> {
        let now_unix_secs = unix_secs(now);
        let mut demand = vec![0_u32; self.config.subnets.len()];
        let subnets = &self.config.subnets;
        // Addresses come in runs of one subnet: its index is tried first.
        let mut last_subnet = 0;
        let mut count = |address: Ipv4Addr| {
            let hit = subnets
                .get(last_subnet)
                .is_some_and(|subnet| subnet.network.contains(address));
            let index = if hit {
                Some(last_subnet)
            } else {
                subnets
                    .iter()
                    .position(|subnet| subnet.network.contains(address))
            };
            if let Some(index) = index {
                last_subnet = index;
                demand[index] = demand[index].saturating_add(1);
            }
        };
        for address in self.table.reserved_unbound(now_unix_secs) {
            count(address);
        }
        for pending in self.pending.values() {
            if let LeaseChange::Bind { address, .. } = &pending.change
                && self.table.binding(*address).is_none()
                && !self.table.is_reserved(*address, now_unix_secs)
            {
                count(*address);
            }
        }
        for waiting in &self.awaiting_addresses {
            if waiting.until > now
                && let Some(slot) = demand.get_mut(waiting.subnet_index)
            {
                *slot = slot.saturating_add(1);
            }
        }
        demand
    }

    /// Keeps an address from other clients for `grace` after its binding expired: in a cluster,
    /// the clock drift bound between servers (ADR 0007).
    pub fn set_reuse_grace(&mut self, grace: Duration) {
        self.table.set_reuse_grace(grace.as_secs());
    }

    /// Switches on a deliberate bug: bindings count as ended `early` before they end, so a
    /// held address can go to a second client. For the simulator's checker tests only.
    #[cfg(feature = "sabotage")]
    pub fn sabotage_reuse_before_expiry(&mut self, early: Duration) {
        self.table.sabotage_reuse_before_expiry(early.as_secs());
    }

    /// Sets (or clears) this server's rank order among the servers of its segments.
    pub fn set_rendezvous(&mut self, rendezvous: Option<Rendezvous>) {
        self.rendezvous = rendezvous;
    }

    /// When the next delayed offer is due.
    pub fn poll_timeout(&self) -> Option<SystemTime> {
        self.delayed_offers.front().map(|delayed| delayed.due)
    }

    /// Makes the offers whose stagger delay has passed.
    pub fn handle_timeout(&mut self, now: SystemTime) {
        while let Some(delayed) = self.delayed_offers.front() {
            if delayed.due > now {
                break;
            }
            if let Some(delayed) = self.delayed_offers.pop_front() {
                // A drop here is the one the DISCOVER would have had on arrival.
                let _ = self.handle_kept_discover(now, now + ADDRESS_WAIT_MAX, &delayed.discover);
            }
        }
    }

    /// The ranges a new client's address may come from on `subnet`.
    fn allocatable_ranges(&self, subnet: &SubnetConfig) -> Vec<AddressRange> {
        match &self.allocatable {
            None => subnet.ranges.clone(),
            Some(blocks) => subnet
                .ranges
                .iter()
                .flat_map(|range| {
                    blocks.iter().filter_map(move |block| {
                        let first = range.first.max(block.first);
                        let last = range.last.min(block.last);
                        (first <= last).then_some(AddressRange { first, last })
                    })
                })
                .collect(),
        }
    }

    /// Replays a change that was made durable before (journal or snapshot replay at start).
    pub fn restore(&mut self, change: &LeaseChange) {
        self.table.apply(change);
    }

    /// The lease table, for status output.
    pub fn lease_table(&self) -> &LeaseTable {
        &self.table
    }

    /// Number of proposals waiting for their commit.
    pub fn pending_commit_count(&self) -> usize {
        self.pending.len()
    }

    /// The next reply to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next lease change to make durable.
    pub fn poll_lease_proposal(&mut self) -> Option<LeaseProposal> {
        self.proposals.pop_front()
    }

    /// The change `id` is durable: apply it and release its reply.
    pub fn handle_lease_committed(&mut self, _now: SystemTime, id: ProposalId) {
        if let Some(pending) = self.pending.remove(&id) {
            self.table.apply(&pending.change);
            if let Some(reply) = pending.reply {
                self.transmits.push_back(reply);
            }
        }
    }

    /// The change `id` was made durable with an earlier expiry than proposed (a server cut off
    /// from its cluster may grant only short leases, ADR 0007): the reply carries the shorter
    /// lease, and T1/T2 scaled to it.
    pub fn handle_lease_committed_until(
        &mut self,
        now: SystemTime,
        id: ProposalId,
        expires_at_unix_secs: u64,
    ) {
        let Some(mut pending) = self.pending.remove(&id) else {
            return;
        };
        if let LeaseChange::Bind {
            expires_at_unix_secs: expiry,
            ..
        } = &mut pending.change
        {
            *expiry = (*expiry).min(expires_at_unix_secs);
        }
        let lease_secs =
            u32::try_from(expires_at_unix_secs.saturating_sub(unix_secs(now))).unwrap_or(u32::MAX);
        self.table.apply(&pending.change);
        let Some(mut reply) = pending.reply else {
            return;
        };
        // A reply we built ourselves decodes; if it ever did not, sending nothing is safe.
        let Ok(mut message) = Message::from_bytes(&reply.bytes) else {
            return;
        };
        let options = message.opts_mut();
        if options.get(OptionCode::AddressLeaseTime).is_some() {
            options.insert(DhcpOption::AddressLeaseTime(lease_secs));
            options.insert(DhcpOption::Renewal(lease_secs / 2));
            options.insert(DhcpOption::Rebinding(lease_secs / 8 * 7));
        }
        let Ok(bytes) = message.to_vec() else {
            return;
        };
        reply.bytes = bytes;
        self.transmits.push_back(reply);
    }

    /// The change `id` could not be made durable: the client gets no answer and retries.
    pub fn handle_lease_commit_failed(&mut self, id: ProposalId) {
        self.pending.remove(&id);
    }

    /// Handles one received datagram. `Err` says why it got no answer (for the log).
    pub fn handle_datagram(
        &mut self,
        now: SystemTime,
        datagram: Datagram<'_>,
    ) -> Result<(), DhcpDrop> {
        let now_unix_secs = unix_secs(now);
        self.table.expire(now_unix_secs);
        let request = Message::from_bytes(datagram.bytes)
            .map_err(|error| DhcpDrop::Malformed(error.to_string()))?;
        // chaddr is 16 bytes; dhcproto's `chaddr()` slices it by hlen and panics beyond that.
        if usize::from(request.hlen()) > CHADDR_BYTES {
            return Err(DhcpDrop::Malformed(format!(
                "hardware address length {} is over {CHADDR_BYTES}",
                request.hlen()
            )));
        }
        if request.opcode() != Opcode::BootRequest {
            return Err(DhcpDrop::NotForServer("bootreply".into()));
        }
        let message_type = request
            .opts()
            .msg_type()
            .ok_or_else(|| DhcpDrop::Malformed("no message type (bootp is not served)".into()))?;
        let context = RequestContext::new(&request, &datagram);
        if self.config.mode == DhcpMode::Proxy {
            return self.handle_proxy(&request, &datagram, &context, message_type);
        }
        let subnet_index = self.subnet_index(&request, &datagram)?;
        match message_type {
            MessageType::Discover => self.handle_discover(
                now,
                now + ADDRESS_WAIT_MAX,
                Ranked::New,
                &request,
                &datagram,
                &context,
                subnet_index,
            ),
            MessageType::Request => {
                self.handle_request(now_unix_secs, &request, &datagram, &context, subnet_index)
            }
            MessageType::Decline => {
                self.handle_decline(now_unix_secs, &request, &datagram, &context, subnet_index)
            }
            MessageType::Release => {
                self.handle_release(now_unix_secs, &request, &datagram, &context)
            }
            MessageType::Inform => self.handle_inform(&request, &datagram, &context, subnet_index),
            other => Err(DhcpDrop::NotForServer(format!("{other:?}"))),
        }
    }

    fn subnet_index(&self, request: &Message, datagram: &Datagram<'_>) -> Result<usize, DhcpDrop> {
        let giaddr = request.giaddr();
        let found = if !giaddr.is_unspecified() {
            self.config
                .subnets
                .iter()
                .position(|subnet| subnet.network.contains(giaddr))
        } else {
            self.config
                .subnets
                .iter()
                .position(|subnet| subnet.network.contains(datagram.local_address))
                .or_else(|| {
                    // Without packet info (or in a simulation) a single subnet is unambiguous.
                    (self.config.subnets.len() == 1 && datagram.local_address.is_unspecified())
                        .then_some(0)
                })
        };
        found.ok_or(DhcpDrop::NoSubnet {
            giaddr,
            local_address: datagram.local_address,
        })
    }

    fn host_for(&self, context: &RequestContext) -> Option<&HostConfig> {
        let hardware_address = context.ethernet_address?;
        self.hosts_by_hardware_address
            .get(&hardware_address)
            .and_then(|index| self.config.hosts.get(*index))
    }

    /// The address a static host must have on this subnet, if it has one here.
    fn fixed_address_for(
        &self,
        context: &RequestContext,
        subnet: &SubnetConfig,
    ) -> Option<Ipv4Addr> {
        self.host_for(context)
            .and_then(|host| host.address)
            .filter(|address| subnet.network.contains(*address))
    }

    /// A kept DISCOVER (its stagger passed, or it waited for addresses), offered to now; it
    /// may wait for addresses until `wait_until`.
    fn handle_kept_discover(
        &mut self,
        now: SystemTime,
        wait_until: SystemTime,
        kept: &KeptDiscover,
    ) -> Result<(), DhcpDrop> {
        let datagram = kept.datagram();
        let request = Message::from_bytes(datagram.bytes)
            .map_err(|error| DhcpDrop::Malformed(error.to_string()))?;
        let context = RequestContext::new(&request, &datagram);
        let subnet_index = self.subnet_index(&request, &datagram)?;
        self.handle_discover(
            now,
            wait_until,
            Ranked::Due,
            &request,
            &datagram,
            &context,
            subnet_index,
        )
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one DISCOVER's facts, each needed; a struct would only rename them"
    )]
    fn handle_discover(
        &mut self,
        now: SystemTime,
        wait_until: SystemTime,
        ranked: Ranked,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        subnet_index: usize,
    ) -> Result<(), DhcpDrop> {
        let now_unix_secs = unix_secs(now);
        let subnet = self.subnet(subnet_index)?.clone();
        let server_identifier = datagram.local_address;
        let fixed = self.fixed_address_for(context, &subnet);
        if ranked == Ranked::New
            && let Some(rendezvous) = &self.rendezvous
            && !rendezvous.stagger.is_zero()
        {
            let known = self
                .table
                .address_of(&context.client)
                .is_some_and(|address| subnet.network.contains(address));
            let new_in_subnet = (fixed.is_none() && !known).then_some(subnet_index);
            let rank = rendezvous.rank(&context.client, new_in_subnet);
            if rank > 0 {
                // A later-ranked server answers only if the earlier ones stay silent; a
                // client that retransmits its DISCOVER gets one offer per server, not one
                // per retry.
                let due = now
                    + rendezvous
                        .stagger
                        .saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX));
                self.delay_offer(due, context, datagram);
                return Ok(());
            }
        }
        let address = if let Some(fixed) = fixed {
            fixed
        } else {
            let chosen = self.choose_dynamic_address(
                now_unix_secs,
                request,
                context,
                &subnet,
                server_identifier,
            );
            match chosen {
                Ok(address) => address,
                Err(DhcpDrop::PoolExhausted(network))
                    if self.allocatable.is_some() && wait_until > now =>
                {
                    // In a cluster the pool may be far from empty: this server's blocks are
                    // (a storm's first second outruns the blocks a server holds). The next
                    // block is on its way; the client is answered when it arrives.
                    self.await_addresses(wait_until, subnet_index, context, datagram);
                    return Err(DhcpDrop::AwaitingAddresses(network));
                }
                Err(drop) => return Err(drop),
            }
        };
        self.hold_address(address, &context.client, now_unix_secs);
        let reply = self.build_reply(
            request,
            datagram,
            context,
            &subnet,
            MessageType::Offer,
            Some(address),
        )?;
        self.transmits.push_back(reply);
        Ok(())
    }

    /// Keeps a DISCOVER until its stagger delay passes (one per client, the newest).
    fn delay_offer(&mut self, due: SystemTime, context: &RequestContext, datagram: &Datagram<'_>) {
        self.delayed_offers
            .retain(|delayed| delayed.discover.client != context.client);
        if self.delayed_offers.len() >= self.config.offers_max.max(1) {
            self.delayed_offers.pop_front();
        }
        let position = self
            .delayed_offers
            .iter()
            .position(|delayed| delayed.due > due)
            .unwrap_or(self.delayed_offers.len());
        self.delayed_offers.insert(
            position,
            DelayedOffer {
                due,
                discover: KeptDiscover::new(context, datagram),
            },
        );
    }

    /// Keeps a DISCOVER until an address block arrives (one per client, the newest).
    fn await_addresses(
        &mut self,
        until: SystemTime,
        subnet_index: usize,
        context: &RequestContext,
        datagram: &Datagram<'_>,
    ) {
        self.awaiting_addresses
            .retain(|waiting| waiting.discover.client != context.client);
        if self.awaiting_addresses.len() >= self.config.offers_max.max(1) {
            self.awaiting_addresses.pop_front();
        }
        self.awaiting_addresses.push_back(AwaitingAddress {
            until,
            subnet_index,
            discover: KeptDiscover::new(context, datagram),
        });
    }

    fn choose_dynamic_address(
        &mut self,
        now_unix_secs: u64,
        request: &Message,
        context: &RequestContext,
        subnet: &SubnetConfig,
        server_identifier: Ipv4Addr,
    ) -> Result<Ipv4Addr, DhcpDrop> {
        let fixed_addresses = &self.fixed_addresses;
        let excluded = |address| is_excluded(subnet, server_identifier, fixed_addresses, address);
        let usable = |table: &LeaseTable, address: Ipv4Addr| {
            subnet
                .ranges
                .iter()
                .any(|range| range.first <= address && address <= range.last)
                && !excluded(address)
                && table.is_available_to(address, &context.client, now_unix_secs)
        };
        // 1. The client's own binding, expired or not: a node keeps its address.
        if let Some(address) = self.table.address_of(&context.client)
            && usable(&self.table, address)
        {
            return Ok(address);
        }
        // 2. What we offered it a moment ago.
        if let Some(address) = self.table.reservation_of(&context.client, now_unix_secs)
            && usable(&self.table, address)
        {
            return Ok(address);
        }
        let allocatable = self.allocatable_ranges(subnet);
        let in_own_blocks = |address: Ipv4Addr| {
            allocatable
                .iter()
                .any(|range| range.first <= address && address <= range.last)
        };
        // 3. What it asks for, if free (and ours to give, in a cluster).
        if let Some(DhcpOption::RequestedIpAddress(address)) =
            request.opts().get(OptionCode::RequestedIpAddress)
            && usable(&self.table, *address)
            && in_own_blocks(*address)
            && self
                .table
                .binding(*address)
                .is_none_or(|binding| binding.client == context.client)
        {
            return Ok(*address);
        }
        // 4. A fresh one (from this server's blocks, in a cluster).
        self.table
            .allocate(&allocatable, &context.client, now_unix_secs, &excluded)
            .ok_or(DhcpDrop::PoolExhausted(subnet.network.address))
    }

    fn handle_request(
        &mut self,
        now_unix_secs: u64,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        subnet_index: usize,
    ) -> Result<(), DhcpDrop> {
        let subnet = self.subnet(subnet_index)?.clone();
        let server_identifier = datagram.local_address;
        let requested = match request.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(address)) => Some(*address),
            _ => None,
        };
        let named_server = match request.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(address)) => Some(*address),
            _ => None,
        };
        if let Some(named) = named_server
            && named != server_identifier
            && !server_identifier.is_unspecified()
        {
            // SELECTING another server's offer: let our reservation and offer go.
            self.table.drop_reservation_of(&context.client);
            self.delayed_offers
                .retain(|delayed| delayed.discover.client != context.client);
            self.awaiting_addresses
                .retain(|waiting| waiting.discover.client != context.client);
            return Err(DhcpDrop::OtherServerChosen(named));
        }
        let wanted = match (requested, request.ciaddr()) {
            (Some(address), _) => address,
            (None, ciaddr) if !ciaddr.is_unspecified() => ciaddr,
            _ => return Err(DhcpDrop::Malformed("request names no address".into())),
        };
        let acceptable =
            self.is_acceptable(now_unix_secs, context, &subnet, server_identifier, wanted);
        if !acceptable {
            let nak = self.build_nak(request, datagram, context)?;
            self.transmits.push_back(nak);
            return Ok(());
        }
        if self.pending.len() >= self.config.pending_commits_max {
            return Err(DhcpDrop::CommitBacklogFull);
        }
        // Hold the address while the commit is in flight, so no other client is offered it.
        self.hold_address(wanted, &context.client, now_unix_secs);
        let reply = self.build_reply(
            request,
            datagram,
            context,
            &subnet,
            MessageType::Ack,
            Some(wanted),
        )?;
        let change = LeaseChange::Bind {
            client: context.client.clone(),
            hardware_address: request.chaddr().to_vec(),
            address: wanted,
            expires_at_unix_secs: now_unix_secs.saturating_add(subnet.lease_time.as_secs()),
            hostname: self.hostname_for(request, context),
        };
        self.propose(change, Some(reply));
        Ok(())
    }

    fn is_acceptable(
        &self,
        now_unix_secs: u64,
        context: &RequestContext,
        subnet: &SubnetConfig,
        server_identifier: Ipv4Addr,
        wanted: Ipv4Addr,
    ) -> bool {
        if !subnet.network.contains(wanted) {
            return false;
        }
        if let Some(fixed) = self.fixed_address_for(context, subnet) {
            return wanted == fixed
                && self
                    .table
                    .is_available_to(wanted, &context.client, now_unix_secs);
        }
        let excluded =
            |address| is_excluded(subnet, server_identifier, &self.fixed_addresses, address);
        let in_range = subnet
            .ranges
            .iter()
            .any(|range| range.first <= wanted && wanted <= range.last);
        in_range
            && !excluded(wanted)
            && self
                .table
                .is_available_to(wanted, &context.client, now_unix_secs)
    }

    fn handle_decline(
        &mut self,
        now_unix_secs: u64,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        subnet_index: usize,
    ) -> Result<(), DhcpDrop> {
        let subnet = self.subnet(subnet_index)?;
        let Some(DhcpOption::RequestedIpAddress(address)) =
            request.opts().get(OptionCode::RequestedIpAddress)
        else {
            return Err(DhcpDrop::Malformed(
                "decline without requested address".into(),
            ));
        };
        let address = *address;
        if !subnet.network.contains(address) || self.is_other_server(request, datagram) {
            return Err(DhcpDrop::NotForServer(
                "decline for another server or subnet".into(),
            ));
        }
        // Only the holder may decline a bound address; anyone may report an unbound one in use.
        if self
            .table
            .binding(address)
            .is_some_and(|binding| binding.client != context.client)
        {
            return Err(DhcpDrop::NotForServer(
                "decline of an address bound to another client".into(),
            ));
        }
        if self.pending.len() >= self.config.pending_commits_max {
            return Err(DhcpDrop::CommitBacklogFull);
        }
        self.table.drop_reservation_of(&context.client);
        let until_unix_secs =
            now_unix_secs.saturating_add(self.config.decline_quarantine.as_secs());
        self.propose(
            LeaseChange::Decline {
                address,
                until_unix_secs,
            },
            None,
        );
        Ok(())
    }

    fn handle_release(
        &mut self,
        now_unix_secs: u64,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
    ) -> Result<(), DhcpDrop> {
        let address = request.ciaddr();
        if self.is_other_server(request, datagram) {
            return Err(DhcpDrop::NotForServer("release for another server".into()));
        }
        let holds = self
            .table
            .binding(address)
            .is_some_and(|binding| binding.client == context.client);
        if !holds {
            return Err(DhcpDrop::NotForServer(
                "release of an address the client does not hold".into(),
            ));
        }
        if self.pending.len() >= self.config.pending_commits_max {
            return Err(DhcpDrop::CommitBacklogFull);
        }
        self.propose(
            LeaseChange::Release {
                client: context.client.clone(),
                address,
                at_unix_secs: now_unix_secs,
            },
            None,
        );
        Ok(())
    }

    fn handle_inform(
        &mut self,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        subnet_index: usize,
    ) -> Result<(), DhcpDrop> {
        let subnet = self.subnet(subnet_index)?.clone();
        let reply =
            self.build_reply(request, datagram, context, &subnet, MessageType::Ack, None)?;
        self.transmits.push_back(reply);
        Ok(())
    }

    /// proxyDHCP: answer PXE clients with boot information only (PXE spec 2.1, 2.2.5).
    fn handle_proxy(
        &mut self,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        message_type: MessageType,
    ) -> Result<(), DhcpDrop> {
        if context.kind == ClientKind::Plain || !context.vendor_class_pxe {
            return Err(DhcpDrop::ProxyIgnored);
        }
        let answers = match (datagram.local_port, message_type) {
            (SERVER_PORT, MessageType::Discover) => Some(MessageType::Offer),
            (PXE_PORT, MessageType::Request | MessageType::Inform) => Some(MessageType::Ack),
            _ => None,
        };
        let Some(reply_type) = answers else {
            return Err(DhcpDrop::ProxyIgnored);
        };
        // The subnet only supplies next-server here; without one, boot from where we were asked.
        let subnet = self
            .subnet_index(request, datagram)
            .ok()
            .and_then(|index| self.config.subnets.get(index).cloned());
        let mut reply = self.build_reply_message(
            request,
            datagram,
            context,
            subnet.as_ref(),
            reply_type,
            None,
        );
        reply.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        let options = reply.opts_mut();
        for code in [
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::BroadcastAddr,
            OptionCode::AddressLeaseTime,
            OptionCode::Renewal,
            OptionCode::Rebinding,
            OptionCode::Hostname,
        ] {
            options.remove(code);
        }
        options.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        // PXE_DISCOVERY_CONTROL = 8: boot the file named in this packet, no menu, no discovery.
        options.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        let destination = if datagram.local_port == PXE_PORT {
            Destination::Unicast(datagram.source)
        } else if !request.giaddr().is_unspecified() {
            Destination::Relay(SocketAddrV4::new(request.giaddr(), SERVER_PORT))
        } else {
            Destination::Broadcast { port: CLIENT_PORT }
        };
        let bytes = reply
            .to_vec()
            .map_err(|error| DhcpDrop::Encode(error.to_string()))?;
        self.transmits.push_back(Transmit {
            bytes,
            destination,
            interface_index: datagram.interface_index,
            source_address: datagram.local_address,
            message_type: reply_type,
            xid: request.xid(),
        });
        Ok(())
    }

    fn is_other_server(&self, request: &Message, datagram: &Datagram<'_>) -> bool {
        matches!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(DhcpOption::ServerIdentifier(named))
                if *named != datagram.local_address && !datagram.local_address.is_unspecified()
        )
    }

    fn subnet(&self, index: usize) -> Result<&SubnetConfig, DhcpDrop> {
        self.config.subnets.get(index).ok_or(DhcpDrop::NoSubnet {
            giaddr: Ipv4Addr::UNSPECIFIED,
            local_address: Ipv4Addr::UNSPECIFIED,
        })
    }

    /// Reserves `address` for `client` for the offer hold time.
    fn hold_address(&mut self, address: Ipv4Addr, client: &ClientId, now_unix_secs: u64) {
        let until = now_unix_secs.saturating_add(self.config.offer_hold.as_secs().max(1));
        self.table
            .reserve(address, client, until, self.config.offers_max);
    }

    fn propose(&mut self, change: LeaseChange, reply: Option<Transmit>) {
        self.next_proposal += 1;
        let id = ProposalId(self.next_proposal);
        self.proposals.push_back(LeaseProposal {
            id,
            change: change.clone(),
        });
        self.pending.insert(id, PendingCommit { change, reply });
    }

    fn hostname_for(&self, request: &Message, context: &RequestContext) -> Option<String> {
        if let Some(hostname) = self
            .host_for(context)
            .and_then(|host| host.hostname.clone())
        {
            return Some(hostname);
        }
        match request.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(name)) if name.len() <= record::FIELD_BYTES_MAX => {
                Some(name.clone())
            }
            _ => None,
        }
    }

    fn build_nak(
        &self,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
    ) -> Result<Transmit, DhcpDrop> {
        let mut reply = request.clone();
        reply.set_opcode(Opcode::BootReply);
        reply.set_secs(0);
        reply.set_ciaddr(Ipv4Addr::UNSPECIFIED);
        reply.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        reply.set_siaddr(Ipv4Addr::UNSPECIFIED);
        reply.clear_fname();
        reply.clear_sname();
        let mut options = DhcpOptions::new();
        options.insert(DhcpOption::MessageType(MessageType::Nak));
        options.insert(DhcpOption::ServerIdentifier(datagram.local_address));
        options.insert(DhcpOption::Message("address not available".into()));
        if let Some(relay) = context.relay_information.clone() {
            options.insert(relay);
        }
        reply.set_opts(options);
        let destination = if request.giaddr().is_unspecified() {
            Destination::Broadcast { port: CLIENT_PORT }
        } else {
            reply.set_flags(Flags::default().set_broadcast());
            Destination::Relay(SocketAddrV4::new(request.giaddr(), SERVER_PORT))
        };
        let bytes = reply
            .to_vec()
            .map_err(|error| DhcpDrop::Encode(error.to_string()))?;
        Ok(Transmit {
            bytes,
            destination,
            interface_index: datagram.interface_index,
            source_address: datagram.local_address,
            message_type: MessageType::Nak,
            xid: request.xid(),
        })
    }

    fn build_reply(
        &self,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        subnet: &SubnetConfig,
        message_type: MessageType,
        address: Option<Ipv4Addr>,
    ) -> Result<Transmit, DhcpDrop> {
        let reply = self.build_reply_message(
            request,
            datagram,
            context,
            Some(subnet),
            message_type,
            address,
        );
        let destination = reply_destination(request, address);
        let bytes = reply
            .to_vec()
            .map_err(|error| DhcpDrop::Encode(error.to_string()))?;
        Ok(Transmit {
            bytes,
            destination,
            interface_index: datagram.interface_index,
            source_address: datagram.local_address,
            message_type,
            xid: request.xid(),
        })
    }

    fn build_reply_message(
        &self,
        request: &Message,
        datagram: &Datagram<'_>,
        context: &RequestContext,
        subnet: Option<&SubnetConfig>,
        message_type: MessageType,
        address: Option<Ipv4Addr>,
    ) -> Message {
        // Built from a clone of the request: xid, flags, giaddr, hops and chaddr carry over as
        // RFC 2131 table 3 wants, and no randomness is drawn (dhcproto's constructors do).
        let mut reply = request.clone();
        reply.set_opcode(Opcode::BootReply);
        reply.set_secs(0);
        if message_type == MessageType::Offer {
            reply.set_ciaddr(Ipv4Addr::UNSPECIFIED);
        }
        reply.set_yiaddr(address.unwrap_or(Ipv4Addr::UNSPECIFIED));
        reply.clear_fname();
        reply.clear_sname();
        let next_server = subnet
            .and_then(|subnet| subnet.next_server)
            .unwrap_or(datagram.local_address);
        reply.set_siaddr(Ipv4Addr::UNSPECIFIED);

        let mut options = DhcpOptions::new();
        options.insert(DhcpOption::MessageType(message_type));
        options.insert(DhcpOption::ServerIdentifier(datagram.local_address));
        if let Some(subnet) = subnet {
            options.insert(DhcpOption::SubnetMask(subnet.network.mask()));
            options.insert(DhcpOption::BroadcastAddr(subnet.network.broadcast()));
            if !subnet.routers.is_empty() {
                options.insert(DhcpOption::Router(subnet.routers.clone()));
            }
            if !subnet.dns_servers.is_empty() {
                options.insert(DhcpOption::DomainNameServer(subnet.dns_servers.clone()));
            }
            if let Some(domain) = &subnet.domain_name {
                options.insert(DhcpOption::DomainName(domain.clone()));
            }
            if address.is_some() {
                let lease_secs = u32::try_from(subnet.lease_time.as_secs()).unwrap_or(u32::MAX);
                options.insert(DhcpOption::AddressLeaseTime(lease_secs));
                options.insert(DhcpOption::Renewal(lease_secs / 2));
                options.insert(DhcpOption::Rebinding(lease_secs / 8 * 7));
            }
        }
        if let Some(hostname) = self
            .host_for(context)
            .and_then(|host| host.hostname.clone())
        {
            options.insert(DhcpOption::Hostname(hostname));
        }
        if let Some(boot_file) = self.boot_file_for(context, next_server) {
            reply.set_siaddr(next_server);
            // The fixed `file` field holds 127 bytes and a NUL; longer names go in option 67 only.
            if boot_file.len() < 128 {
                reply.set_fname_str(&boot_file);
            }
            options.insert(DhcpOption::BootfileName(boot_file.into_bytes()));
            options.insert(DhcpOption::TFTPServerName(
                next_server.to_string().into_bytes(),
            ));
            if let ClientKind::HttpBoot { .. } = context.kind {
                // UEFI HTTP boot only accepts offers that say HTTPClient (UEFI spec 24.7).
                options.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
            }
        }
        if let Some(uuid) = context.machine_identifier.clone() {
            options.insert(DhcpOption::ClientMachineIdentifier(uuid));
        }
        if let Some(relay) = context.relay_information.clone() {
            options.insert(relay);
        }
        reply.set_opts(options);
        reply
    }

    fn boot_file_for(&self, context: &RequestContext, next_server: Ipv4Addr) -> Option<String> {
        let boot = &self.config.boot;
        let http_base = if boot.http_port == 80 {
            format!("http://{next_server}")
        } else {
            format!("http://{next_server}:{}", boot.http_port)
        };
        match context.kind {
            ClientKind::Plain => None,
            ClientKind::Ipxe => {
                let mac = context.ethernet_address.map(|mac| format_mac(&mac))?;
                Some(format!("{http_base}/boot/{mac}.ipxe"))
            }
            ClientKind::Pxe { architecture } => match architecture {
                ARCHITECTURE_BIOS => Some(boot.bios_file.clone()),
                ARCHITECTURE_EFI_X64 | ARCHITECTURE_EFI_BC => Some(boot.uefi_x64_file.clone()),
                ARCHITECTURE_EFI_ARM64 => Some(boot.uefi_arm64_file.clone()),
                _ => None,
            },
            ClientKind::HttpBoot { architecture } => {
                let file = if architecture == ARCHITECTURE_EFI_ARM64_HTTP {
                    &boot.uefi_arm64_file
                } else {
                    &boot.uefi_x64_file
                };
                Some(format!("{http_base}/{file}"))
            }
        }
    }
}

/// Addresses never handed out dynamically: the subnet's own and broadcast addresses, routers,
/// our own addresses, and every static host's fixed address.
fn is_excluded(
    subnet: &SubnetConfig,
    server_identifier: Ipv4Addr,
    fixed_addresses: &BTreeSet<Ipv4Addr>,
    address: Ipv4Addr,
) -> bool {
    address == subnet.network.address
        || address == subnet.network.broadcast()
        || address == server_identifier
        || subnet.next_server == Some(address)
        || subnet.routers.contains(&address)
        || fixed_addresses.contains(&address)
}

/// RFC 2131 4.1: relay first, then a client that has an address, then broadcast when the
/// client asks for it or cannot be reached otherwise, else unicast to its hardware address.
fn reply_destination(request: &Message, address: Option<Ipv4Addr>) -> Destination {
    if !request.giaddr().is_unspecified() {
        return Destination::Relay(SocketAddrV4::new(request.giaddr(), SERVER_PORT));
    }
    if !request.ciaddr().is_unspecified() {
        return Destination::Unicast(SocketAddrV4::new(request.ciaddr(), CLIENT_PORT));
    }
    let ethernet = request.htype() == HType::Eth && request.hlen() == 6;
    match (address, request.flags().broadcast(), ethernet) {
        (Some(address), false, true) => {
            let mut hardware_address = [0u8; 6];
            hardware_address.copy_from_slice(request.chaddr().get(..6).unwrap_or(&[0; 6]));
            Destination::Hardware {
                address,
                hardware_address,
                port: CLIENT_PORT,
            }
        }
        _ => Destination::Broadcast { port: CLIENT_PORT },
    }
}

/// Formats a MAC the way boot URLs and logs spell it: `52-54-00-12-34-56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join("-")
}

/// What the server reads from a request once.
struct RequestContext {
    client: ClientId,
    ethernet_address: Option<[u8; 6]>,
    kind: ClientKind,
    vendor_class_pxe: bool,
    machine_identifier: Option<Vec<u8>>,
    relay_information: Option<DhcpOption>,
}

impl RequestContext {
    fn new(request: &Message, _datagram: &Datagram<'_>) -> Self {
        let options = request.opts();
        let client = match options.get(OptionCode::ClientIdentifier) {
            Some(DhcpOption::ClientIdentifier(id)) if !id.is_empty() => ClientId(id.clone()),
            _ => {
                let mut id = vec![u8::from(request.htype())];
                id.extend_from_slice(request.chaddr());
                ClientId(id)
            }
        };
        let ethernet_address = (request.htype() == HType::Eth && request.hlen() == 6)
            .then(|| request.chaddr().get(..6))
            .flatten()
            .and_then(|bytes| <[u8; 6]>::try_from(bytes).ok());
        let vendor_class = match options.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(class)) => class.clone(),
            _ => Vec::new(),
        };
        let vendor_class_pxe = vendor_class.starts_with(b"PXEClient");
        let vendor_class_http = vendor_class.starts_with(b"HTTPClient");
        let is_ipxe = matches!(
            options.get(OptionCode::UserClass),
            Some(DhcpOption::UserClass(class)) if class.windows(4).any(|window| window == b"iPXE")
        ) || options
            .get(OptionCode::Unknown(OPTION_IPXE_ENCAPSULATED))
            .is_some();
        let architecture = match options.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(architecture)) => {
                Some(u16::from(*architecture))
            }
            _ => None,
        };
        let kind = if is_ipxe {
            ClientKind::Ipxe
        } else if vendor_class_http
            || matches!(
                architecture,
                Some(ARCHITECTURE_EFI_X64_HTTP | ARCHITECTURE_EFI_ARM64_HTTP)
            )
        {
            ClientKind::HttpBoot {
                architecture: architecture.unwrap_or(ARCHITECTURE_EFI_X64_HTTP),
            }
        } else if vendor_class_pxe || architecture.is_some() {
            ClientKind::Pxe {
                architecture: architecture.unwrap_or(ARCHITECTURE_BIOS),
            }
        } else {
            ClientKind::Plain
        };
        let machine_identifier = match options.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(uuid)) => Some(uuid.clone()),
            _ => None,
        };
        let relay_information = options.get(OptionCode::RelayAgentInformation).cloned();
        Self {
            client,
            ethernet_address,
            kind,
            vendor_class_pxe: vendor_class_pxe || vendor_class_http,
            machine_identifier,
            relay_information,
        }
    }
}

/// Decodes a DHCP message; used by the fuzz target and by tools that inspect traffic.
pub fn decode_message(bytes: &[u8]) -> Result<v4::Message, DhcpDrop> {
    Message::from_bytes(bytes).map_err(|error| DhcpDrop::Malformed(error.to_string()))
}
