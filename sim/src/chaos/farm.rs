//! A client farm: one simulated host running hundreds of booting nodes' DHCP clients (RFC 2131
//! section 4.4: INIT, SELECTING, REQUESTING, BOUND, RENEWING, REBINDING) as plain state
//! machines on one socket, each with its own timer. Written from the RFC with dhcproto, not
//! with the server's code, so a bug both sides share cannot hide.
//!
//! Every ACK is checked the moment it arrives: the address is not held by another node, and
//! the binding it grants was committed (or journaled by a server cut off from the majority,
//! as ADR 0007 allows) before it left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};

use super::{Shared, lock};
use crate::Trace;

/// Wait for an OFFER or an ACK before sending again.
const RETRANSMIT_AFTER: Duration = Duration::from_secs(4);
/// DISCOVERs or REQUESTs before a node starts over.
const ATTEMPTS_MAX: u32 = 4;
/// A renewal or rebinding is sent again after half the time left, but not sooner than this
/// (RFC 2131 section 4.4.5).
const RENEW_RETRY_MIN: Duration = Duration::from_secs(5);
/// Slack when an ACK's lease end is compared with what was committed: the server counts whole
/// seconds, and the ACK travels a few milliseconds. A server whose clock is behind commits an
/// earlier end than its ACK's lease time gives; that is allowed up to the skew of the run.
const EXPIRY_SLACK_SECS: u64 = 2;

/// Where a node is in RFC 2131's client state diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started yet, or starting over.
    Init,
    Selecting,
    Requesting {
        offered: Ipv4Addr,
        server: Ipv4Addr,
    },
    Bound,
    Renewing,
    Rebinding,
}

/// A lease a node holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    address: Ipv4Addr,
    server: Ipv4Addr,
    renew_at: Duration,
    rebind_at: Duration,
    expires_at: Duration,
}

#[derive(Debug)]
struct Client {
    index: usize,
    mac: [u8; 6],
    phase: Phase,
    xid: u32,
    attempts: u32,
    wake_at: Duration,
    held: Option<Held>,
    /// When the first REQUEST of the exchange under way was sent: a lease runs from then
    /// (RFC 2131 section 4.4.1), not from when its ACK arrived.
    requested_at: Duration,
}

/// What a farm needs to know about the servers.
#[derive(Debug, Clone)]
pub struct FarmSetup {
    /// This farm's number.
    pub farm: usize,
    /// Index of this farm's first node among all nodes.
    pub first_node: usize,
    /// Nodes on this farm.
    pub nodes: usize,
    /// Every node starts within this window from the start (a boot storm).
    pub start_window: Duration,
    /// Each server's address as its DHCP replies name it (server identifier) and its
    /// simulated host name.
    pub servers: Vec<(Ipv4Addr, String)>,
    /// The run's seed.
    pub seed: u64,
    /// Deliberate bug: keep chunks without checking them.
    pub skip_chunk_verification: bool,
    /// How nodes get their image.
    pub chunks: super::ChunkPath,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut value = *state;
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// The hardware address of node `index`.
pub fn node_mac(index: usize) -> [u8; 6] {
    let bytes = (index as u32).to_be_bytes();
    [0x52, 0x54, bytes[0], bytes[1], bytes[2], bytes[3]]
}

fn node_of_mac(mac: &[u8]) -> Option<usize> {
    let tail: [u8; 4] = mac.get(2..6)?.try_into().ok()?;
    (mac.get(..2) == Some(&[0x52, 0x54][..])).then(|| u32::from_be_bytes(tail) as usize)
}

fn elapsed() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// A REQUEST in RENEWING or REBINDING: the address in ciaddr, no server identifier.
fn renewal(xid: u32, mac: [u8; 6], held: &Held) -> Message {
    let mut request = message(MessageType::Request, xid, mac);
    request.set_flags(Flags::default());
    request.set_ciaddr(held.address);
    request
}

fn message(message_type: MessageType, xid: u32, mac: [u8; 6]) -> Message {
    let mut message = Message::default();
    message.set_xid(xid);
    message.set_chaddr(&mac);
    message.set_flags(Flags::default().set_broadcast());
    message
        .opts_mut()
        .insert(DhcpOption::MessageType(message_type));
    message
}

struct Farm {
    setup: FarmSetup,
    socket: turmoil::net::UdpSocket,
    clients: Vec<Client>,
    timers: BTreeSet<(Duration, usize)>,
    rng: u64,
    shared: Shared,
    trace: Trace,
    server_hosts: BTreeMap<Ipv4Addr, IpAddr>,
    /// Nodes whose image fetch has started (it runs until it has the image).
    booting: std::collections::BTreeSet<usize>,
    image: super::image::ChaosImage,
}

/// Runs a farm until the harness says the run is over.
pub async fn run_farm(
    setup: FarmSetup,
    shared: Shared,
    trace: Trace,
) -> Result<(), Box<dyn std::error::Error>> {
    let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68)).await?;
    let mut rng = setup.seed ^ (setup.farm as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let window_ms = u64::try_from(setup.start_window.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut clients = Vec::with_capacity(setup.nodes);
    let mut timers = BTreeSet::new();
    for offset in 0..setup.nodes {
        let index = setup.first_node + offset;
        let wake_at = Duration::from_millis(splitmix(&mut rng) % window_ms);
        timers.insert((wake_at, offset));
        lock(&shared).powered_on.insert(index, wake_at);
        clients.push(Client {
            index,
            mac: node_mac(index),
            phase: Phase::Init,
            xid: 0,
            attempts: 0,
            wake_at,
            held: None,
            requested_at: Duration::ZERO,
        });
    }
    let server_hosts = setup
        .servers
        .iter()
        .map(|(address, name)| (*address, turmoil::lookup(name.as_str())))
        .collect();
    let mut farm = Farm {
        setup,
        socket,
        clients,
        timers,
        rng,
        shared,
        trace,
        server_hosts,
        booting: std::collections::BTreeSet::new(),
        image: super::image::ChaosImage::new(),
    };
    farm.run().await
}

impl Farm {
    async fn run(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let mut buffer = vec![0u8; 1500];
        loop {
            if lock(&self.shared).finished {
                return Ok(());
            }
            // Quiet: the harness lets the servers settle before it compares them.
            let quiet = lock(&self.shared).quiet;
            let next = self.timers.first().copied();
            let sleep_for = match next {
                Some((at, _)) if !quiet => at.saturating_sub(elapsed()),
                _ => Duration::from_millis(100),
            };
            tokio::select! {
                biased;
                received = self.socket.recv_from(&mut buffer) => {
                    let (length, _) = received?;
                    if !lock(&self.shared).quiet && let Ok(reply) = Message::from_bytes(buffer.get(..length).unwrap_or_default()) {
                        self.on_reply(&reply).await?;
                        // A duplicating network delivers some replies twice.
                        if self.duplicates_now() {
                            self.trace.record(format!("farm{}: a reply arrived twice", self.setup.farm));
                            self.on_reply(&reply).await?;
                        }
                    }
                }
                () = tokio::time::sleep(sleep_for) => {
                    // Read again: the harness may have called for quiet while this slept.
                    if lock(&self.shared).quiet {
                        continue;
                    }
                    let now = elapsed();
                    while let Some(&(at, offset)) = self.timers.first() {
                        if at > now {
                            break;
                        }
                        self.timers.remove(&(at, offset));
                        self.on_timer(offset).await?;
                    }
                }
            }
        }
    }

    fn schedule(&mut self, offset: usize, at: Duration) {
        let Some(client) = self.clients.get_mut(offset) else {
            return;
        };
        self.timers.remove(&(client.wake_at, offset));
        client.wake_at = at;
        self.timers.insert((at, offset));
    }

    async fn send(&mut self, message: &Message, to: &[IpAddr]) -> std::io::Result<()> {
        let bytes = message
            .to_vec()
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        for server in to {
            self.socket
                .send_to(&bytes, SocketAddr::new(*server, 67))
                .await?;
        }
        // A duplicating network delivers some datagrams twice.
        if self.duplicates_now() {
            for server in to {
                self.socket
                    .send_to(&bytes, SocketAddr::new(*server, 67))
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether the network duplicates the datagram at hand: while the harness has set a
    /// duplication rate, a draw from the farm's seeded RNG decides. No draw without one, so
    /// runs without the fault are unchanged.
    fn duplicates_now(&mut self) -> bool {
        let percent = lock(&self.shared).duplicate_percent;
        let duplicated = percent > 0 && splitmix(&mut self.rng) % 100 < u64::from(percent);
        if duplicated {
            lock(&self.shared).duplicated += 1;
        }
        duplicated
    }

    fn all_servers(&self) -> Vec<IpAddr> {
        self.server_hosts.values().copied().collect()
    }

    async fn start_over(&mut self, offset: usize) -> std::io::Result<()> {
        let xid = splitmix(&mut self.rng) as u32;
        let Some(client) = self.clients.get_mut(offset) else {
            return Ok(());
        };
        client.phase = Phase::Selecting;
        client.xid = xid;
        client.attempts = 1;
        let discover = message(MessageType::Discover, xid, client.mac);
        self.trace
            .record(format!("node{} DISCOVER xid={xid:#x}", client.index));
        self.send(&discover, &self.all_servers()).await?;
        self.schedule(offset, elapsed() + RETRANSMIT_AFTER);
        Ok(())
    }

    async fn on_timer(&mut self, offset: usize) -> std::io::Result<()> {
        let now = elapsed();
        let Some(client) = self.clients.get(offset) else {
            return Ok(());
        };
        match (client.phase, client.held) {
            (Phase::Init, _) => self.start_over(offset).await,
            (Phase::Selecting, _) | (Phase::Requesting { .. }, _)
                if client.attempts >= ATTEMPTS_MAX =>
            {
                self.start_over(offset).await
            }
            (Phase::Selecting, _) => {
                let discover = message(MessageType::Discover, client.xid, client.mac);
                if let Some(client) = self.clients.get_mut(offset) {
                    client.attempts += 1;
                }
                lock(&self.shared).discover_retransmissions += 1;
                self.send(&discover, &self.all_servers()).await?;
                self.schedule(offset, now + RETRANSMIT_AFTER);
                Ok(())
            }
            (Phase::Requesting { offered, server }, _) => {
                let mut request = message(MessageType::Request, client.xid, client.mac);
                request
                    .opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(offered));
                request
                    .opts_mut()
                    .insert(DhcpOption::ServerIdentifier(server));
                if let Some(client) = self.clients.get_mut(offset) {
                    client.attempts += 1;
                }
                self.send(&request, &self.all_servers()).await?;
                self.schedule(offset, now + RETRANSMIT_AFTER);
                Ok(())
            }
            (Phase::Bound | Phase::Renewing | Phase::Rebinding, Some(held))
                if now >= held.expires_at =>
            {
                // The lease ran out: the node lets the address go and starts over.
                let index = client.index;
                self.trace
                    .record(format!("node{index} lease on {} expired", held.address));
                self.release_holding(index, held.address);
                if let Some(client) = self.clients.get_mut(offset) {
                    client.held = None;
                    client.phase = Phase::Init;
                }
                self.start_over(offset).await
            }
            (Phase::Bound | Phase::Renewing | Phase::Rebinding, Some(held)) => {
                let rebinding = now >= held.rebind_at;
                let xid = splitmix(&mut self.rng) as u32;
                let Some(client) = self.clients.get_mut(offset) else {
                    return Ok(());
                };
                if client.phase == Phase::Bound {
                    client.xid = xid;
                    client.requested_at = now;
                }
                client.phase = if rebinding {
                    Phase::Rebinding
                } else {
                    Phase::Renewing
                };
                let (index, client_xid) = (client.index, client.xid);
                let request = renewal(client.xid, client.mac, &held);
                let to = if rebinding {
                    self.all_servers()
                } else {
                    self.server_hosts
                        .get(&held.server)
                        .map(|host| vec![*host])
                        .unwrap_or_else(|| self.all_servers())
                };
                self.trace.record(format!(
                    "node{index} {} {} xid={client_xid:#x}",
                    if rebinding { "REBIND" } else { "RENEW" },
                    held.address
                ));
                self.send(&request, &to).await?;
                let until = if rebinding {
                    held.expires_at
                } else {
                    held.rebind_at
                };
                let retry = (until.saturating_sub(now) / 2).max(RENEW_RETRY_MIN);
                self.schedule(offset, (now + retry).min(until));
                Ok(())
            }
            (Phase::Bound | Phase::Renewing | Phase::Rebinding, None) => {
                self.start_over(offset).await
            }
        }
    }

    fn release_holding(&self, index: usize, address: Ipv4Addr) {
        let mut observed = lock(&self.shared);
        if observed
            .holdings
            .get(&address)
            .is_some_and(|(holder, _)| *holder == index)
        {
            observed.holdings.remove(&address);
        }
        observed.bound.remove(&index);
    }

    async fn on_reply(&mut self, reply: &Message) -> std::io::Result<()> {
        let Some(index) = node_of_mac(reply.chaddr()) else {
            return Ok(());
        };
        let Some(offset) = index.checked_sub(self.setup.first_node) else {
            return Ok(());
        };
        let Some(client) = self.clients.get(offset) else {
            return Ok(());
        };
        // Replies for other farms' nodes reach every farm (the simulated broadcast).
        if reply.xid() != client.xid {
            return Ok(());
        }
        let server = match reply.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(server)) => *server,
            _ => return Ok(()),
        };
        match (reply.opts().msg_type(), client.phase) {
            (Some(MessageType::Offer), Phase::Selecting) => {
                let offered = reply.yiaddr();
                let mut request = message(MessageType::Request, client.xid, client.mac);
                request
                    .opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(offered));
                request
                    .opts_mut()
                    .insert(DhcpOption::ServerIdentifier(server));
                self.trace.record(format!(
                    "node{index} REQUEST {offered} from {server} xid={:#x}",
                    client.xid
                ));
                if let Some(client) = self.clients.get_mut(offset) {
                    client.phase = Phase::Requesting { offered, server };
                    client.attempts = 1;
                    client.requested_at = elapsed();
                }
                self.send(&request, &self.all_servers()).await?;
                self.schedule(offset, elapsed() + RETRANSMIT_AFTER);
            }
            (
                Some(MessageType::Ack),
                Phase::Requesting { .. } | Phase::Renewing | Phase::Rebinding,
            ) => self.on_ack(offset, reply, server),
            (
                Some(MessageType::Nak),
                Phase::Requesting { .. } | Phase::Renewing | Phase::Rebinding,
            ) => {
                self.trace
                    .record(format!("node{index} NAK from {server}; starting over"));
                lock(&self.shared).naks += 1;
                if let Some(held) = client.held {
                    self.release_holding(index, held.address);
                }
                if let Some(client) = self.clients.get_mut(offset) {
                    client.held = None;
                    client.phase = Phase::Init;
                }
                self.schedule(offset, elapsed());
            }
            _ => {}
        }
        Ok(())
    }

    fn on_ack(&mut self, offset: usize, ack: &Message, server: Ipv4Addr) {
        let now = elapsed();
        let Some(client) = self.clients.get(offset) else {
            return;
        };
        let index = client.index;
        let address = ack.yiaddr();
        let lease = match ack.opts().get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(secs)) => Duration::from_secs(u64::from(*secs)),
            _ => {
                lock(&self.shared).violations.push(format!(
                    "node{index}: an ACK from {server} without a lease time"
                ));
                return;
            }
        };
        let previous = client.held.map(|held| held.address);
        let start = client.requested_at;
        self.trace.record(format!(
            "node{index} ACK {address} for {} s from {server}",
            lease.as_secs()
        ));
        let expires_unix = lock(&self.shared).epoch_secs + (start + lease).as_secs();
        {
            let mut observed = lock(&self.shared);
            observed.acks += 1;
            // No ACK before commit: the binding is in some server's applied state, or in the
            // journal of a server granting by the minority rules.
            let durable = observed
                .durable
                .get(&address)
                .and_then(|holders| holders.get(&client.mac.to_vec()))
                .is_some_and(|until| {
                    *until + EXPIRY_SLACK_SECS + observed.skew_tolerance_secs >= expires_unix
                });
            if !durable {
                let known = observed.durable.get(&address).cloned().unwrap_or_default();
                observed.violations.push(format!(
                    "{:.3} s: node{index} got an ACK from {server} for {address} until {expires_unix} that no server had committed or journaled (durable bindings of that address: {known:02x?})",
                    now.as_secs_f64()
                ));
            }
            // No address held by two nodes at once.
            if let Some((holder, until)) = observed.holdings.get(&address).copied()
                && holder != index
                && until > now
            {
                observed.violations.push(format!(
                    "{:.3} s: {address} ACKed to node{index} by {server} while node{holder} holds it until {:.3} s",
                    now.as_secs_f64(),
                    until.as_secs_f64()
                ));
            }
            if let Some(previous) = previous
                && previous != address
                && observed
                    .holdings
                    .get(&previous)
                    .is_some_and(|(holder, _)| *holder == index)
            {
                observed.holdings.remove(&previous);
            }
            observed.holdings.insert(address, (index, start + lease));
            observed
                .bound
                .insert(index, (address, client.mac, expires_unix));
        }
        let renew_after = match ack.opts().get(OptionCode::Renewal) {
            Some(DhcpOption::Renewal(secs)) => Duration::from_secs(u64::from(*secs)),
            _ => lease / 2,
        };
        let rebind_after = match ack.opts().get(OptionCode::Rebinding) {
            Some(DhcpOption::Rebinding(secs)) => Duration::from_secs(u64::from(*secs)),
            _ => lease * 7 / 8,
        };
        let held = Held {
            address,
            server,
            renew_at: start + renew_after,
            rebind_at: start + rebind_after,
            expires_at: start + lease,
        };
        if let Some(client) = self.clients.get_mut(offset) {
            client.held = Some(held);
            client.phase = Phase::Bound;
            client.attempts = 0;
        }
        self.schedule(offset, held.renew_at.min(held.expires_at));
        // With an address, the node fetches its image (once; the fetch retries on its own).
        if !self.booting.insert(index) {
            return;
        }
        match self.setup.chunks {
            super::ChunkPath::Servers => {
                tokio::spawn(boot(
                    index,
                    super::image::TurmoilChunkTransport {
                        servers: self
                            .setup
                            .servers
                            .iter()
                            .map(|(_, name)| name.clone())
                            .collect(),
                    },
                    self.image.clone(),
                    self.setup.skip_chunk_verification,
                    self.shared.clone(),
                    self.trace.clone(),
                ));
            }
            super::ChunkPath::Swarm => {
                let member = super::swarm::MemberSetup {
                    node: index,
                    offset,
                    farm: self.setup.farm,
                    servers: self.setup.servers.len() as u64,
                    seed: self.setup.seed,
                };
                tokio::spawn(super::swarm::boot_member(
                    member,
                    self.shared.clone(),
                    self.trace.clone(),
                ));
            }
        }
    }
}

/// Pause between boot rounds of a node whose fetch failed everywhere.
const BOOT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A node fetches its image with the agent's fetch, into a sink that checks every chunk,
/// round after round until it has it.
async fn boot(
    node: usize,
    transport: super::image::TurmoilChunkTransport,
    image: super::image::ChaosImage,
    skip_chunk_verification: bool,
    shared: Shared,
    trace: Trace,
) {
    let first_source = node % transport.servers.len().max(1);
    // Nodes start their fetch from different servers, as the agent spreads chunks by index.
    let mut transport = transport;
    transport.servers.rotate_left(first_source);
    loop {
        if lock(&shared).finished {
            return;
        }
        let sink = super::image::CheckedSink {
            node,
            image: image.clone(),
            shared: shared.clone(),
            trace: trace.clone(),
        };
        let result = if skip_chunk_verification {
            node::agent::fetch::fetch_part_unverified(&transport, &image.part, &sink, |_| {}).await
        } else {
            node::agent::fetch::fetch_part_into(&transport, &image.part, &sink, |_| {}).await
        };
        match result {
            Ok(summary) => {
                trace.record(format!(
                    "node{node} booted: {} chunks, {} refused",
                    summary.chunks, summary.chunks_rejected
                ));
                let mut observed = lock(&shared);
                observed.booted.insert(node);
                observed
                    .booted_at
                    .insert(node, turmoil::sim_elapsed().unwrap_or_default());
                observed.chunks_rejected += summary.chunks_rejected as u64;
                return;
            }
            Err(error) => {
                trace.record(format!("node{node} boot round failed: {error}"));
                tokio::time::sleep(BOOT_RETRY_AFTER).await;
            }
        }
    }
}
