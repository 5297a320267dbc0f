//! The chaos engine: the real boot servers under faults, with hundreds or thousands of booting
//! nodes, on turmoil's simulated network and clock. One seed replays a whole run.
//!
//! Each simulated server runs what `bootmesh serve` runs for DHCP in a cluster: openraft on the
//! redb store over a simulated disk, the state machine, the cluster lease store
//! (`node::cluster::leases`, with its address blocks, group commit and minority rules) and the
//! DHCP service (`run_cluster_dhcp`). Only the transport between servers differs: Raft and
//! forwarded proposals go over simulated TCP instead of QUIC ([`member`]). The booting nodes
//! are DHCP client state machines, hundreds to a client-farm host ([`farm`]).
//!
//! A run has two phases. In the safety phase the harness injects faults (crashes of servers
//! or of the leader, partitions, loss, clock skew within the drift bound) and every ACK is
//! checked as it arrives: its address is held by no other node, and its binding was committed
//! or journaled before it left. In the liveness phase the faults stop, and every node must hold
//! a lease, every server must converge on one state, and that state must hold every node's
//! lease: no committed lease was lost.

// Each simulated server is driven here as `node`'s daemon drives a real one: it spawns its
// listeners and watchers on its simulated host's runtime.
#![allow(clippy::disallowed_methods)]

pub mod farm;
pub mod image;
pub mod member;
pub mod scenario;
pub mod swarm;

pub use scenario::{ChaosScenario, ChaosScenarioError, is_chaos_scenario};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use boot_services::dhcp::{
    AddressRange, DhcpConfig, DhcpServer, Ipv4Network, LeaseChange, SubnetConfig,
};
use consensus::store::{StateHandle, open_backend_with_latency};
use consensus::{MeshRaft, SeededRng, ServerNode, raft_config, with_seeded_rng};
use node::cluster::leases::{ClusterLeaseStore, Sabotage, run_cluster_dhcp};
use node::cluster::member::{applied_lease_feed, committed_lease_changes};
use node::dhcp_service::DhcpCounters;
use node::journal::{JournalError, LeaseJournal, MemoryLeaseJournal};
use node::seams::Clock;

use crate::disk::SimDisk;
use crate::{SimDhcpLink, SimError, Trace};
use member::{RAFT_PORT, SimMember, TurmoilDialer, server_name};

/// The simulation's epoch, in Unix seconds.
const EPOCH_SECS: u64 = 1_800_000_000;

/// A fault the harness injects during the safety phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChaosFault {
    /// kill -9 of a server: what its disk had not synced is lost; it restarts `down_for` later
    /// on the same disk.
    Crash { server: u64, down_for: Duration },
    /// The same, to whichever server leads at that moment.
    CrashLeader { down_for: Duration },
    /// A server cut off from the other servers (not from the nodes) for `for_`.
    Partition { server: u64, for_: Duration },
    /// Datagrams between the nodes and the servers lost at `rate` for `for_`.
    Loss { rate_percent: u8, for_: Duration },
    /// A server serves every image chunk with a flipped byte for `for_` (a rotting disk).
    CorruptChunks { server: u64, for_: Duration },
    /// A server's disk fails every fsync for `for_`; then the server is restarted on it (the
    /// operator's answer to a failed fsync: what the process wrote since cannot be trusted).
    DiskFailure { server: u64, for_: Duration },
    /// Server `from` cannot reach server `to` for `for_`; `to` still reaches `from`.
    OneWayPartition { from: u64, to: u64, for_: Duration },
    /// A client farm (a rack with its relay) cut off from every server for `for_`.
    FarmCut { farm: usize, for_: Duration },
    /// Every link (nodes to servers and between servers) takes up to `max` per message for
    /// `for_`, so messages arrive late and out of order.
    Delay { max: Duration, for_: Duration },
    /// The nodes' network delivers `percent` of the datagrams, both ways, twice for `for_`.
    Duplication { percent: u8, for_: Duration },
    /// A server's disk takes `sync` for every fsync for `for_`; the server keeps running.
    SlowDisk {
        server: u64,
        sync: Duration,
        for_: Duration,
    },
}

/// How the nodes get their image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkPath {
    /// From the servers, one simulated TCP connection per chunk, with the agent's fetch: cheap
    /// enough for thousands of nodes.
    #[default]
    Servers,
    /// Over the swarm's real QUIC code, quinn inside turmoil: every server seeds and tracks,
    /// every node is a member that fetches from servers and nodes and serves what it holds
    /// (the smaller profile, [`swarm`]).
    Swarm,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    /// The run's seed.
    pub seed: u64,
    /// Boot servers.
    pub servers: u64,
    /// Client-farm hosts.
    pub farms: usize,
    /// Booting nodes in all.
    pub nodes: usize,
    /// Every node starts within this window.
    pub start_window: Duration,
    /// Lease time the servers give.
    pub lease: Duration,
    /// Length of the safety phase, with faults.
    pub safety: Duration,
    /// Length of the liveness phase, without faults, by whose end every node must hold a lease.
    pub liveness: Duration,
    /// Faults, each at a virtual time within the safety phase.
    pub faults: Vec<(Duration, ChaosFault)>,
    /// Any two servers' clocks are up to this far apart (each is within half of it of true
    /// time, drawn from the seed). Beyond the drift bound the servers must notice.
    pub skew_max: Duration,
    /// Deliberate bugs in the servers, to show the checkers catch them.
    pub sabotage: Sabotage,
    /// Addresses in the dynamic range; by default four for every node.
    pub addresses: Option<u32>,
    /// How long the servers' address blocks are leased (`serve`: ten minutes).
    pub block_lease: Duration,
    /// Deliberate bug in the nodes: keep chunks without checking them against the manifest.
    pub skip_chunk_verification: bool,
    /// How the nodes get their image.
    pub chunks: ChunkPath,
}

impl Default for ChaosSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            servers: 3,
            farms: 2,
            nodes: 100,
            start_window: Duration::from_secs(10),
            lease: Duration::from_secs(120),
            safety: Duration::from_secs(60),
            liveness: Duration::from_secs(60),
            faults: Vec::new(),
            skew_max: Duration::ZERO,
            sabotage: Sabotage::default(),
            addresses: None,
            block_lease: node::cluster::leases::BLOCK_LEASE,
            skip_chunk_verification: false,
            chunks: ChunkPath::Servers,
        }
    }
}

impl ChaosSpec {
    /// `count` faults drawn from the seed, spread over the safety phase, of every kind the
    /// engine has: crashes of a server or of the leader, partitions of one server (both ways
    /// or one way), a farm cut off, failing, slow and rotting disks, bursts of loss, delay and
    /// duplication.
    pub fn with_random_faults(mut self, count: usize) -> Self {
        let mut rng = self.seed ^ 0xA076_1D64_78BD_642F;
        let safety_ms = u64::try_from(self.safety.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..count {
            let at = Duration::from_millis(farm_random(&mut rng) % safety_ms.max(1));
            let lasting = Duration::from_millis(2_000 + farm_random(&mut rng) % 13_000);
            let server = 1 + farm_random(&mut rng) % self.servers.max(1);
            let fault = match farm_random(&mut rng) % 11 {
                0 => ChaosFault::Crash {
                    server,
                    down_for: lasting,
                },
                1 => ChaosFault::CrashLeader { down_for: lasting },
                2 => ChaosFault::Partition {
                    server,
                    for_: lasting,
                },
                3 => ChaosFault::DiskFailure {
                    server,
                    for_: lasting,
                },
                4 => ChaosFault::CorruptChunks {
                    server,
                    for_: lasting,
                },
                6 if self.servers > 1 => ChaosFault::OneWayPartition {
                    from: server,
                    // Any other server.
                    to: 1 + (server + farm_random(&mut rng) % (self.servers - 1)) % self.servers,
                    for_: lasting,
                },
                7 => ChaosFault::FarmCut {
                    farm: (farm_random(&mut rng) % self.farms.max(1) as u64) as usize,
                    for_: lasting,
                },
                8 => ChaosFault::Delay {
                    max: Duration::from_millis(20 + farm_random(&mut rng) % 480),
                    for_: lasting,
                },
                9 => ChaosFault::Duplication {
                    percent: 5 + (farm_random(&mut rng) % 26) as u8,
                    for_: lasting,
                },
                10 => ChaosFault::SlowDisk {
                    server,
                    sync: Duration::from_millis(50 + farm_random(&mut rng) % 2_450),
                    for_: lasting,
                },
                _ => ChaosFault::Loss {
                    rate_percent: 5 + (farm_random(&mut rng) % 25) as u8,
                    for_: lasting,
                },
            };
            self.faults.push((at, fault));
        }
        self.faults.sort_by_key(|(at, _)| *at);
        self
    }
}

fn farm_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut value = *state;
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// What a chaos run did.
#[derive(Debug, Clone, PartialEq)]
pub struct ChaosReport {
    /// Hash of the whole trace.
    pub trace_hash: u64,
    /// Trace events.
    pub events: usize,
    /// ACKs the nodes received, and NAKs.
    pub acks: u64,
    /// See `acks`.
    pub naks: u64,
    /// The faults as injected, with their virtual times.
    pub faults: Vec<String>,
    /// From the end of the faults until every node held a lease and its image.
    pub healed_after: Option<Duration>,
    /// Nodes that fetched their whole image, every chunk checked.
    pub booted: usize,
    /// Chunks the nodes refused because their bytes did not match the manifest.
    pub chunks_rejected: u64,
    /// The servers' reports of a clock beyond the drift bound from the leader's (the first
    /// of each server's, and how many there were in all).
    pub clock_alarms: Vec<String>,
    /// Leases in the converged state at the end.
    pub leases: usize,
    /// Leases granted by servers cut off from the majority (ADR 0007's minority rules).
    pub minority_grants: u64,
    /// Raft log entries every server applied by the end.
    pub log_entries: u64,
    /// fsyncs the servers' disks synced, and refused while failing.
    pub syncs: u64,
    /// See `syncs`.
    pub failed_syncs: u64,
    /// fsyncs done while a disk was slow, and the virtual time they cost.
    pub slow_syncs: u64,
    /// See `slow_syncs`.
    pub slow_sync_time: Duration,
    /// Datagrams between nodes and servers that the network delivered twice.
    pub duplicated: u64,
    /// DISCOVERs the nodes sent again because no offer came within their retransmission
    /// time (4 s, as PXE ROMs wait).
    pub discover_retransmissions: u64,
    /// Virtual time the run took.
    pub elapsed: Duration,
    /// Per booted node, seconds from its power-on until it held its whole image.
    pub boot_seconds: Vec<f64>,
    /// Image bytes each server sent (by server id), refused ones included.
    pub bytes_by_server: BTreeMap<u64, u64>,
    /// Image bytes the nodes had from other nodes (the swarm profile; none otherwise).
    pub bytes_from_nodes: u64,
}

/// Shared between the simulated hosts and the harness. turmoil runs every host on one thread,
/// one at a time, so this is deterministic.
#[derive(Debug, Default)]
pub struct Observed {
    epoch_secs: u64,
    /// The run's largest clock skew, in whole seconds rounded up: a server that is behind
    /// commits lease ends that much earlier than its nodes count them.
    skew_tolerance_secs: u64,
    /// Per address: the hardware addresses it was durably bound to (committed by some server,
    /// or journaled by a server granting by the minority rules), with the latest expiry.
    durable: BTreeMap<Ipv4Addr, BTreeMap<Vec<u8>, u64>>,
    /// Per address: the node that holds it, by the nodes' own reckoning, and until when.
    holdings: BTreeMap<Ipv4Addr, (usize, Duration)>,
    /// Per node holding a lease: address, hardware address, Unix expiry.
    bound: BTreeMap<usize, (Ipv4Addr, [u8; 6], u64)>,
    /// Broken invariants, in order.
    violations: Vec<String>,
    acks: u64,
    naks: u64,
    minority_grants: u64,
    /// Nodes that hold their whole image.
    booted: std::collections::BTreeSet<usize>,
    chunks_rejected: u64,
    /// Servers that serve corrupted chunks now.
    corrupt_servers: std::collections::BTreeSet<u64>,
    /// Clock readings certainly beyond the drift bound, as the servers reported them.
    clock_alarms: Vec<String>,
    /// Per server: the applied state of its latest incarnation, and its last applied index.
    states: BTreeMap<u64, StateHandle>,
    last_applied: BTreeMap<u64, u64>,
    /// The leader most recently seen by any server, with its term.
    leader: Option<(u64, u64)>,
    /// The farms stop sending: the servers settle before they are compared.
    quiet: bool,
    /// The run is over: the farms return.
    finished: bool,
    /// Per node: when it powered on, and when it held its whole image (virtual time).
    powered_on: BTreeMap<usize, Duration>,
    booted_at: BTreeMap<usize, Duration>,
    /// Image bytes each server sent, by server id.
    bytes_served: BTreeMap<u64, u64>,
    /// Image bytes the nodes had from other nodes.
    bytes_from_nodes: u64,
    /// While above zero, the farms' network delivers this share of datagrams twice.
    duplicate_percent: u8,
    /// Datagrams the network delivered twice.
    duplicated: u64,
    /// DISCOVERs the nodes sent again because no offer came in time.
    discover_retransmissions: u64,
}

/// The shared observations.
pub type Shared = Arc<Mutex<Observed>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn record_durable(shared: &Shared, change: &LeaseChange) {
    if let LeaseChange::Bind {
        hardware_address,
        address,
        expires_at_unix_secs,
        ..
    } = change
    {
        let mut observed = lock(shared);
        let until = observed
            .durable
            .entry(*address)
            .or_default()
            .entry(hardware_address.clone())
            .or_default();
        *until = (*until).max(*expires_at_unix_secs);
    }
}

/// A server's clock: the simulation's, shifted by a constant skew.
#[derive(Debug, Clone, Copy, Default)]
pub struct SkewedClock {
    /// Milliseconds ahead (positive) or behind (negative).
    pub skew_ms: i64,
}

impl Clock for SkewedClock {
    fn wall_now(&self) -> SystemTime {
        let now = SystemTime::UNIX_EPOCH + turmoil::since_epoch().unwrap_or_default();
        let skew = Duration::from_millis(self.skew_ms.unsigned_abs());
        if self.skew_ms >= 0 {
            now + skew
        } else {
            now.checked_sub(skew).unwrap_or(now)
        }
    }
}

/// The journal of grants made while cut off (fsynced before the ACK in `serve`, so it survives
/// a crash here too), which also tells the checker what was journaled.
#[derive(Debug, Clone)]
struct ObservedJournal {
    journal: MemoryLeaseJournal,
    shared: Shared,
}

impl LeaseJournal for ObservedJournal {
    fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError> {
        self.journal.load()
    }
    fn append(&mut self, changes: &[LeaseChange]) -> Result<(), JournalError> {
        self.journal.append(changes)?;
        lock(&self.shared).minority_grants += changes.len() as u64;
        for change in changes {
            record_durable(&self.shared, change);
        }
        Ok(())
    }
    fn needs_compaction(&self, live_bindings: usize) -> bool {
        self.journal.needs_compaction(live_bindings)
    }
    fn compact(&mut self, live: &[LeaseChange]) -> Result<(), JournalError> {
        self.journal.compact(live)
    }
}

/// The per-server, per-incarnation seed.
fn server_seed(seed: u64, id: u64, incarnation: u64) -> u64 {
    seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ incarnation.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

/// The address server `id` answers DHCP from (its server identifier).
fn server_address(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, u8::try_from(id).unwrap_or(u8::MAX))
}

fn dhcp_config(spec: &ChaosSpec) -> DhcpConfig {
    // Four addresses for every node, so that blocks held by servers that died leave enough.
    let wanted = spec
        .addresses
        .unwrap_or_else(|| u32::try_from(spec.nodes.max(64) * 4).unwrap_or(u32::MAX))
        .max(1);
    let first = u32::from(Ipv4Addr::new(10, 77, 1, 0));
    DhcpConfig {
        subnets: vec![SubnetConfig {
            network: Ipv4Network {
                address: Ipv4Addr::new(10, 77, 0, 0),
                prefix_length: 16,
            },
            ranges: vec![AddressRange {
                first: Ipv4Addr::from(first),
                last: Ipv4Addr::from(first + wanted.min(60_000) - 1),
            }],
            routers: vec![],
            dns_servers: vec![],
            domain_name: None,
            lease_time: spec.lease,
            next_server: None,
        }],
        ..DhcpConfig::default()
    }
}

struct ServerContext {
    id: u64,
    /// How often this server has started (1 at first).
    incarnation: u64,
    spec: ChaosSpec,
    disk: SimDisk,
    journal: MemoryLeaseJournal,
    farms: Vec<String>,
    skew: SkewedClock,
    trace: Trace,
    shared: Shared,
}

async fn run_server(context: ServerContext) -> Result<(), Box<dyn std::error::Error>> {
    let ServerContext {
        id,
        incarnation,
        spec,
        disk,
        journal,
        farms,
        skew,
        trace,
        shared,
    } = context;
    let (log, mut state_machine) =
        open_backend_with_latency(disk.attach(), Arc::new(disk.clone()))?;
    state_machine.sabotage(consensus::state::StateSabotage {
        early_block_reassignment: spec.sabotage.early_block_reuse,
        unexpired_address_reuse: spec.sabotage.unexpired_address_reuse,
    });
    let applied = applied_lease_feed(&mut state_machine);
    {
        let trace = trace.clone();
        let shared = Arc::clone(&shared);
        state_machine.observe_applies(Arc::new(move |log_id, applied| {
            lock(&shared).last_applied.insert(id, log_id.index);
            if let Some((proposal, response)) = applied {
                let changes = committed_lease_changes(proposal, response);
                trace.record(format!(
                    "{} applied {log_id}: {} lease changes",
                    server_name(id),
                    changes.len()
                ));
                for change in &changes {
                    record_durable(&shared, change);
                }
            }
        }));
    }
    {
        let trace = trace.clone();
        let shared = Arc::clone(&shared);
        state_machine.observe_snapshot_installs(Arc::new(move |last_log_id| {
            let index = last_log_id.map_or(0, |log_id| log_id.index);
            trace.record(format!(
                "{} installed a snapshot up to {index}",
                server_name(id)
            ));
            lock(&shared).last_applied.insert(id, index);
        }));
    }
    let state = state_machine.state();
    lock(&shared).states.insert(id, state.clone());
    let config = Arc::new(raft_config("chaos", 2_000, 500).validate()?);
    let raft = MeshRaft::new(
        id,
        config,
        consensus::rpc::StreamNetworkFactory::new(id, TurmoilDialer),
        log,
        state_machine,
    )
    .await?;
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, RAFT_PORT)).await?;
    {
        let raft = raft.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(consensus::rpc::serve_stream(raft.clone(), stream));
            }
        });
    }
    if id == 1 && !raft.is_initialized().await? {
        let members: BTreeMap<u64, ServerNode> = (1..=spec.servers)
            .map(|member| {
                (
                    member,
                    ServerNode {
                        address: format!("{}:{RAFT_PORT}", server_name(member)),
                    },
                )
            })
            .collect();
        raft.initialize(members).await?;
        trace.record("server1 initialized the cluster");
    }
    {
        let raft = raft.clone();
        let trace = trace.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut metrics = raft.metrics();
            let mut seen = None;
            loop {
                let (term, leader) = {
                    let current = metrics.borrow_and_update();
                    (current.current_term, current.current_leader)
                };
                if let Some(leader) = leader
                    && seen != Some((term, leader))
                {
                    seen = Some((term, leader));
                    trace.record(format!(
                        "{} sees leader {leader} in term {term}",
                        server_name(id)
                    ));
                    let mut observed = lock(&shared);
                    if observed.leader.is_none_or(|(known, _)| known <= term) {
                        observed.leader = Some((term, leader));
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let clock_observer: member::ClockObserver = {
        let (shared, trace) = (Arc::clone(&shared), trace.clone());
        Arc::new(move |reading: consensus::clock::ClockReading| {
            if reading.certainly_beyond(consensus::state::DRIFT_BOUND_MS) {
                let alarm = format!(
                    "{} sees the leader's clock {:+} ms (± {} ms) from its own",
                    server_name(id),
                    reading.offset_ms,
                    reading.uncertainty_ms
                );
                trace.record(format!("{alarm}: beyond the drift bound"));
                lock(&shared).clock_alarms.push(alarm);
            }
        })
    };
    let member = SimMember::new(id, raft, state, applied, skew, Some(clock_observer));
    tokio::spawn(member.clone().serve_forwarded());
    match spec.chunks {
        ChunkPath::Servers => {
            tokio::spawn(image::serve_chunks(
                id,
                image::ChaosImage::new(),
                Arc::clone(&shared),
            ));
        }
        ChunkPath::Swarm => {
            swarm::serve_image(
                id,
                spec.servers,
                server_seed(spec.seed, id, incarnation),
                Arc::clone(&shared),
            )
            .await?;
        }
    }

    let segment = farms
        .iter()
        .map(|farm| turmoil::lookup(farm.as_str()))
        .collect();
    let link = Arc::new(SimDhcpLink::bind(server_address(id), segment, trace.clone()).await?);
    let dhcp_config = dhcp_config(&spec);
    let ranges: Vec<Vec<AddressRange>> = dhcp_config
        .subnets
        .iter()
        .map(|subnet| subnet.ranges.clone())
        .collect();
    let server = DhcpServer::new(dhcp_config)?;
    let journal = ObservedJournal {
        journal,
        shared: Arc::clone(&shared),
    };
    let (_keep, reconfigured) = tokio::sync::watch::channel(None);
    let store = if spec.sabotage == Sabotage::default() {
        ClusterLeaseStore::new(member, &ranges, journal, reconfigured)
    } else {
        ClusterLeaseStore::sabotaged(member, &ranges, journal, reconfigured, spec.sabotage)
    }
    .with_block_lease(spec.block_lease);
    run_cluster_dhcp(
        server,
        vec![link],
        store,
        skew,
        4096,
        Arc::new(DhcpCounters::default()),
        std::future::pending::<()>(),
    )
    .await?;
    Ok(())
}

/// A fault in force, to be undone at `until`.
#[derive(Debug)]
enum Undo {
    Restart(u64),
    /// The failing disk is replaced and the server restarted on what it holds.
    RestartOnRepairedDisk(u64),
    /// The server serves sound chunks again.
    Uncorrupt(u64),
    Heal(u64),
    Lossless,
    /// The slow disk syncs at full speed again.
    Speed(u64),
    /// The one-way cut from the first server to the second ends.
    HealOneWay(u64, u64),
    /// The farm reaches the servers again.
    Reconnect(usize),
    /// Links take their usual time again.
    Punctual,
    /// Datagrams arrive once again.
    Unduplicated,
}

/// The most a message takes on a link without a delay fault.
const MAX_MESSAGE_LATENCY: Duration = Duration::from_millis(10);

/// Sets the most a message may take on every link between nodes and servers and between
/// servers.
fn set_max_latency(
    simulation: &turmoil::Sim<'_>,
    farms: &[String],
    servers: &[String],
    max: Duration,
) {
    for server in servers {
        for farm in farms {
            simulation.set_link_max_message_latency(farm.as_str(), server.as_str(), max);
        }
        for other in servers.iter().filter(|other| *other != server) {
            simulation.set_link_max_message_latency(server.as_str(), other.as_str(), max);
        }
    }
}

/// Runs `spec` and checks every invariant.
pub fn run_chaos(spec: &ChaosSpec) -> Result<ChaosReport, SimError> {
    if spec.chunks == ChunkPath::Swarm {
        if spec.skip_chunk_verification {
            return Err(SimError::Invariant(
                "the skip-chunk-verification sabotage breaks the agent's fetch from the servers; the swarm's fetch has no such switch: run it with chunks = \"servers\"".into(),
            ));
        }
        if spec.nodes.div_ceil(spec.farms.max(1)) > swarm::NODES_PER_FARM_MAX {
            return Err(SimError::Invariant(format!(
                "the swarm profile gives every node a port of its farm: at most {} nodes per farm",
                swarm::NODES_PER_FARM_MAX
            )));
        }
    }
    let trace = Trace::default();
    let shared: Shared = Arc::new(Mutex::new(Observed {
        epoch_secs: EPOCH_SECS,
        skew_tolerance_secs: spec.skew_max.as_millis().div_ceil(1000) as u64,
        ..Observed::default()
    }));
    let run_for = spec.safety + spec.liveness;
    let mut simulation = turmoil::Builder::new()
        .rng_seed(spec.seed)
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(MAX_MESSAGE_LATENCY)
        .simulation_duration(run_for + Duration::from_secs(120))
        .udp_capacity(16_384)
        // turmoil panics when a listener's backlog overflows (a kernel would drop the SYN);
        // a thousand nodes fetching chunks at once need a deep one.
        .tcp_capacity(65_536)
        .build();
    let farms: Vec<String> = (0..spec.farms.max(1))
        .map(|farm| format!("farm{farm}"))
        .collect();
    let mut skew_rng = spec.seed ^ 0x5851_F42D_4C95_7F2D;
    let skew_max_ms = u64::try_from(spec.skew_max.as_millis()).unwrap_or(0);
    let disks: BTreeMap<u64, SimDisk> = (1..=spec.servers).map(|id| (id, SimDisk::new())).collect();
    for (&id, disk) in &disks {
        // Within ±skew_max/2 of true time: any two servers are at most skew_max apart, which
        // is what the drift bound bounds (ADR 0007).
        let skew_ms = if skew_max_ms == 0 {
            0
        } else {
            let magnitude = farm_random(&mut skew_rng) % (skew_max_ms + 1);
            i64::try_from(magnitude).unwrap_or(0) - i64::try_from(skew_max_ms / 2).unwrap_or(0)
        };
        trace.record_at(
            Duration::ZERO,
            format!("{} skew {skew_ms} ms", server_name(id)),
        );
        let journal = MemoryLeaseJournal::default();
        let incarnations = Arc::new(Mutex::new(0u64));
        let (disk, trace, shared, spec, farms) = (
            disk.clone(),
            trace.clone(),
            Arc::clone(&shared),
            spec.clone(),
            farms.clone(),
        );
        simulation.host(server_name(id).as_str(), move || {
            let incarnation = {
                let mut count = incarnations.lock().unwrap_or_else(PoisonError::into_inner);
                *count += 1;
                *count
            };
            let rng = SeededRng::new(server_seed(spec.seed, id, incarnation));
            let server = run_server(ServerContext {
                id,
                incarnation,
                spec: spec.clone(),
                disk: disk.clone(),
                journal: journal.clone(),
                farms: farms.clone(),
                skew: SkewedClock { skew_ms },
                trace: trace.clone(),
                shared: Arc::clone(&shared),
            });
            async move {
                with_seeded_rng(rng, server)
                    .await
                    .map_err(|error| -> Box<dyn std::error::Error> { error.to_string().into() })
            }
        });
    }
    let per_farm = spec.nodes.div_ceil(farms.len());
    let servers: Vec<(Ipv4Addr, String)> = (1..=spec.servers)
        .map(|id| (server_address(id), server_name(id)))
        .collect();
    for (farm, name) in farms.iter().enumerate() {
        let first_node = farm * per_farm;
        let nodes = per_farm.min(spec.nodes.saturating_sub(first_node));
        let setup = farm::FarmSetup {
            farm,
            first_node,
            nodes,
            start_window: spec.start_window,
            servers: servers.clone(),
            seed: spec.seed,
            skip_chunk_verification: spec.skip_chunk_verification,
            chunks: spec.chunks,
        };
        let (shared, trace) = (Arc::clone(&shared), trace.clone());
        simulation.client(name.as_str(), farm::run_farm(setup, shared, trace));
    }

    let mut faults = spec.faults.iter().peekable();
    let mut tear_rng = spec.seed ^ 0x2545_F491_4F6C_DD1D;
    let mut undo: Vec<(Duration, Undo)> = Vec::new();
    let mut injected = Vec::new();
    let mut all_bound_at: Option<Duration> = None;
    let mut settled_since: Option<(Duration, Vec<u64>)> = None;
    let mut converged: Option<usize> = None;
    let server_names: Vec<String> = (1..=spec.servers).map(server_name).collect();
    let hosts = Hosts {
        servers: server_names.clone(),
        farms: farms.clone(),
    };
    loop {
        let finished = simulation
            .step()
            .map_err(|error| SimError::Turmoil(error.to_string()))?;
        if finished {
            break;
        }
        let now = simulation.elapsed();
        // Faults that end now.
        let mut index = 0;
        while index < undo.len() {
            if undo.get(index).is_some_and(|(until, _)| *until <= now) {
                let (_, what) = undo.swap_remove(index);
                match what {
                    Undo::Uncorrupt(server) => {
                        lock(&shared).corrupt_servers.remove(&server);
                        trace.record_at(
                            now,
                            format!("harness: {} serves sound chunks", server_name(server)),
                        );
                    }
                    Undo::RestartOnRepairedDisk(server) => {
                        if let Some(disk) = disks.get(&server) {
                            disk.crash_torn(|| farm_random(&mut tear_rng));
                            disk.repair();
                        }
                        simulation.bounce(server_name(server).as_str());
                        trace.record_at(
                            now,
                            format!(
                                "harness restarted {} on a repaired disk",
                                server_name(server)
                            ),
                        );
                    }
                    Undo::Restart(server) => {
                        simulation.bounce(server_name(server).as_str());
                        trace.record_at(now, format!("harness restarted {}", server_name(server)));
                    }
                    Undo::Heal(server) => {
                        let others: Vec<&str> = server_names
                            .iter()
                            .filter(|name| **name != server_name(server))
                            .map(String::as_str)
                            .collect();
                        for other in others {
                            simulation.repair(server_name(server).as_str(), other);
                        }
                        trace.record_at(now, format!("harness healed {}", server_name(server)));
                    }
                    Undo::Speed(server) => {
                        if let Some(disk) = disks.get(&server) {
                            disk.restore_speed();
                        }
                        trace.record_at(
                            now,
                            format!("harness: {}'s disk is fast again", server_name(server)),
                        );
                    }
                    Undo::HealOneWay(from, to) => {
                        simulation
                            .repair_oneway(server_name(from).as_str(), server_name(to).as_str());
                        trace.record_at(
                            now,
                            format!(
                                "harness: {} reaches {} again",
                                server_name(from),
                                server_name(to)
                            ),
                        );
                    }
                    Undo::Reconnect(farm) => {
                        if let Some(farm_name) = farms.get(farm) {
                            for server in &server_names {
                                simulation.repair(farm_name.as_str(), server.as_str());
                            }
                        }
                        trace.record_at(now, format!("harness: farm{farm} reconnected"));
                    }
                    Undo::Punctual => {
                        set_max_latency(&simulation, &farms, &server_names, MAX_MESSAGE_LATENCY);
                        trace.record_at(now, "harness: delays end");
                    }
                    Undo::Unduplicated => {
                        lock(&shared).duplicate_percent = 0;
                        trace.record_at(now, "harness: duplication ends");
                    }
                    Undo::Lossless => {
                        for farm in &farms {
                            for server in &server_names {
                                simulation.set_link_fail_rate(farm.as_str(), server.as_str(), 0.0);
                            }
                        }
                        trace.record_at(now, "harness: loss ends");
                    }
                }
            } else {
                index += 1;
            }
        }
        // Faults that start now, in the safety phase only.
        while let Some((at, fault)) = faults.peek() {
            if *at > now || now >= spec.safety {
                break;
            }
            faults.next();
            let until_cap = |lasting: Duration| (now + lasting).min(spec.safety);
            let described = match fault {
                ChaosFault::Crash { server, down_for } => crash(
                    &mut simulation,
                    &disks,
                    &hosts,
                    &mut undo,
                    &mut tear_rng,
                    *server,
                    until_cap(*down_for),
                ),
                ChaosFault::CrashLeader { down_for } => {
                    let leader = lock(&shared).leader.map(|(_, leader)| leader);
                    match leader {
                        Some(leader) => crash(
                            &mut simulation,
                            &disks,
                    &hosts,
                            &mut undo,
                            &mut tear_rng,
                            leader,
                            until_cap(*down_for),
                        ),
                        None => None,
                    }
                }
                ChaosFault::CorruptChunks { server, for_ } => {
                    if lock(&shared).corrupt_servers.insert(*server) {
                        undo.push((until_cap(*for_), Undo::Uncorrupt(*server)));
                        Some(format!("{} serves corrupted chunks", server_name(*server)))
                    } else {
                        None
                    }
                }
                ChaosFault::DiskFailure { server, for_ } => {
                    if undo.iter().any(|(_, what)| {
                        matches!(what, Undo::Restart(down) | Undo::RestartOnRepairedDisk(down) if down == server)
                    }) {
                        None
                    } else {
                        disks.get(server).map(|disk| {
                            disk.fail_syncs();
                            undo.push((until_cap(*for_), Undo::RestartOnRepairedDisk(*server)));
                            format!("{}'s disk fails every fsync", server_name(*server))
                        })
                    }
                }
                ChaosFault::OneWayPartition { from, to, for_ } => {
                    if from == to || !disks.contains_key(from) || !disks.contains_key(to) {
                        None
                    } else {
                        simulation.partition_oneway(server_name(*from).as_str(), server_name(*to).as_str());
                        undo.push((until_cap(*for_), Undo::HealOneWay(*from, *to)));
                        Some(format!("{} cannot reach {} (one way)", server_name(*from), server_name(*to)))
                    }
                }
                ChaosFault::FarmCut { farm, for_ } => farms.get(*farm).map(|farm_name| {
                    for server in &server_names {
                        simulation.partition(farm_name.as_str(), server.as_str());
                    }
                    undo.push((until_cap(*for_), Undo::Reconnect(*farm)));
                    format!("farm{farm} (a rack and its relay) cut off from every server")
                }),
                ChaosFault::Delay { max, for_ } => {
                    set_max_latency(&simulation, &farms, &server_names, *max);
                    undo.push((until_cap(*for_), Undo::Punctual));
                    Some(format!("every link takes up to {} ms per message", max.as_millis()))
                }
                ChaosFault::Duplication { percent, for_ } => {
                    lock(&shared).duplicate_percent = (*percent).min(100);
                    undo.push((until_cap(*for_), Undo::Unduplicated));
                    Some(format!("{percent} % of the nodes' datagrams arrive twice"))
                }
                ChaosFault::SlowDisk { server, sync, for_ } => {
                        disks.get(server).map(|disk| {
                            disk.slow_syncs(*sync);
                            undo.push((until_cap(*for_), Undo::Speed(*server)));
                            format!(
                                "{}'s disk takes {} ms for every fsync",
                                server_name(*server),
                                sync.as_millis()
                            )
                        })
                }
                ChaosFault::Partition { server, for_ } => {
                    if undo.iter().any(|(_, what)| matches!(what, Undo::Restart(down) | Undo::RestartOnRepairedDisk(down) | Undo::Heal(down) if down == server)) {
                        None
                    } else {
                        for other in server_names.iter().filter(|name| **name != server_name(*server)) {
                            simulation.partition(server_name(*server).as_str(), other.as_str());
                        }
                        undo.push((until_cap(*for_), Undo::Heal(*server)));
                        Some(format!("partitioned {} from the other servers", server_name(*server)))
                    }
                }
                ChaosFault::Loss { rate_percent, for_ } => {
                    for farm in &farms {
                        for server in &server_names {
                            simulation.set_link_fail_rate(
                                farm.as_str(),
                                server.as_str(),
                                f64::from(*rate_percent) / 100.0,
                            );
                        }
                    }
                    undo.push((until_cap(*for_), Undo::Lossless));
                    Some(format!("{rate_percent} % loss between nodes and servers"))
                }
            };
            if let Some(described) = described {
                trace.record_at(now, format!("harness: {described}"));
                injected.push(format!("{:.3} s {described}", now.as_secs_f64()));
            }
        }
        let mut observed = lock(&shared);
        if let Some(violation) = observed.violations.first() {
            let violation = violation.clone();
            drop(observed);
            return Err(SimError::Invariant(with_context(&violation, &trace)));
        }
        if now < spec.safety {
            continue;
        }
        if all_bound_at.is_none()
            && observed.bound.len() == spec.nodes
            && observed.booted.len() == spec.nodes
        {
            all_bound_at = Some(now);
        }
        if now < run_for {
            continue;
        }
        // The liveness phase is over.
        if all_bound_at.is_none() {
            let missing: Vec<String> = (0..spec.nodes)
                .filter(|node| {
                    !observed.bound.contains_key(node) || !observed.booted.contains(node)
                })
                .map(|node| format!("node{node}"))
                .collect();
            let violation = format!(
                "{} nodes held no lease or no image {} s after the faults ended: {}",
                missing.len(),
                spec.liveness.as_secs(),
                missing
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            drop(observed);
            return Err(SimError::Invariant(with_context(&violation, &trace)));
        }
        observed.quiet = true;
        // Settled: every server applied the same index, and it stayed so for two seconds.
        let applied: Vec<u64> = (1..=spec.servers)
            .map(|id| observed.last_applied.get(&id).copied().unwrap_or(0))
            .collect();
        let same = applied.windows(2).all(|pair| pair.first() == pair.get(1));

        match &settled_since {
            Some((since, seen)) if same && *seen == applied => {
                if now >= *since + Duration::from_secs(2) && converged.is_none() {
                    // Compared now, while every server is at one index: the servers run on
                    // until the farms have stopped.
                    converged = Some(check_converged(&observed)?);
                    observed.finished = true;
                }
            }
            _ if same => settled_since = Some((now, applied.clone())),
            _ => settled_since = None,
        }
        if now > run_for + Duration::from_secs(60) {
            return Err(SimError::Invariant(format!(
                "the servers did not converge within 60 s after the run: applied {applied:?}"
            )));
        }
    }
    let observed = lock(&shared);
    let Some(leases) = converged else {
        return Err(SimError::Invariant(
            "the run ended before the servers settled".into(),
        ));
    };
    Ok(ChaosReport {
        trace_hash: trace.hash(),
        events: trace.len(),
        acks: observed.acks,
        naks: observed.naks,
        faults: injected,
        healed_after: all_bound_at.map(|at| at.saturating_sub(spec.safety)),
        booted: observed.booted.len(),
        chunks_rejected: observed.chunks_rejected,
        clock_alarms: observed.clock_alarms.clone(),
        leases,
        minority_grants: observed.minority_grants,
        log_entries: observed.last_applied.values().copied().min().unwrap_or(0),
        syncs: disks.values().map(SimDisk::syncs).sum(),
        failed_syncs: disks.values().map(SimDisk::failed_syncs).sum(),
        duplicated: observed.duplicated,
        discover_retransmissions: observed.discover_retransmissions,
        slow_syncs: disks.values().map(|disk| disk.slow_sync_time().0).sum(),
        slow_sync_time: disks.values().map(|disk| disk.slow_sync_time().1).sum(),
        elapsed: simulation.elapsed(),
        boot_seconds: observed
            .booted_at
            .iter()
            .map(|(node, at)| {
                let powered_on = observed.powered_on.get(node).copied().unwrap_or_default();
                at.saturating_sub(powered_on).as_secs_f64()
            })
            .collect(),
        bytes_by_server: (1..=spec.servers)
            .map(|id| (id, observed.bytes_served.get(&id).copied().unwrap_or(0)))
            .collect(),
        bytes_from_nodes: observed.bytes_from_nodes,
    })
}

impl ChaosReport {
    /// This run as one curve (boot times) and one bar (bytes by server) of a picture whose
    /// sources are [`ChaosReport::plot_sources`].
    pub fn plot_run(&self, label: &str) -> crate::plot::PlotRun {
        crate::plot::PlotRun {
            label: label.to_owned(),
            boot_seconds: self.boot_seconds.clone(),
            bytes_by_source: self
                .bytes_by_server
                .values()
                .map(|bytes| *bytes as f64)
                .chain((self.bytes_from_nodes > 0).then_some(self.bytes_from_nodes as f64))
                .collect(),
        }
    }

    /// The byte sources of [`ChaosReport::plot_run`]: the servers, and the nodes when they
    /// served each other (the swarm profile).
    pub fn plot_sources(&self) -> Vec<String> {
        self.bytes_by_server
            .keys()
            .map(|id| format!("from {}", server_name(*id)))
            .chain((self.bytes_from_nodes > 0).then(|| "from nodes".to_owned()))
            .collect()
    }

    /// The picture of this run: the boot-time CDF and the image bytes each server sent.
    pub fn svg(&self, title: &str) -> String {
        crate::plot::boot_svg(&crate::plot::BootPlot {
            title: title.to_owned(),
            sources: self.plot_sources(),
            runs: vec![self.plot_run("chaos")],
        })
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut text = String::new();
        text.push_str(&format!(
            "faults injected: {}\n",
            if self.faults.is_empty() {
                "none".to_owned()
            } else {
                self.faults.len().to_string()
            }
        ));
        for fault in &self.faults {
            text.push_str(&format!("  {fault}\n"));
        }
        text.push_str(&format!(
            "ACKs {}, NAKs {}, granted while cut off {}; {} log entries, {} fsyncs ({} refused by failing disks); {} leases at the end, on every server alike\n",
            self.acks,
            self.naks,
            self.minority_grants,
            self.log_entries,
            self.syncs,
            self.failed_syncs,
            self.leases
        ));
        match self.healed_after {
            Some(after) if after.is_zero() => {
                text.push_str("every node held a lease and its image when the faults ended\n");
            }
            Some(after) => text.push_str(&format!(
                "every node held a lease and its image {:.2} s after the faults ended\n",
                after.as_secs_f64()
            )),
            None => {}
        }
        if self.duplicated > 0 {
            text.push_str(&format!(
                "{} datagrams between nodes and servers arrived twice\n",
                self.duplicated
            ));
        }
        if self.discover_retransmissions > 0 {
            text.push_str(&format!(
                "{} DISCOVERs sent again for want of an offer\n",
                self.discover_retransmissions
            ));
        }
        if self.slow_syncs > 0 {
            text.push_str(&format!(
                "{} fsyncs on slow disks took {:.1} s of virtual time\n",
                self.slow_syncs,
                self.slow_sync_time.as_secs_f64()
            ));
        }
        if !self.boot_seconds.is_empty() {
            let [p50, p99, max] = crate::plot::percentiles(&self.boot_seconds);
            let served: Vec<String> = self
                .bytes_by_server
                .iter()
                .map(|(id, bytes)| {
                    format!("{} {:.1} MiB", server_name(*id), *bytes as f64 / 1048576.0)
                })
                .collect();
            text.push_str(&format!(
                "boot (power-on to image held): p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s; image bytes sent: {}\n",
                served.join(", ")
            ));
            if self.bytes_from_nodes > 0 {
                let from_servers: u64 = self.bytes_by_server.values().sum();
                text.push_str(&format!(
                    "nodes had {:.2} MiB of their image from other nodes, the servers sent {:.2} MiB\n",
                    self.bytes_from_nodes as f64 / 1048576.0,
                    from_servers as f64 / 1048576.0
                ));
            }
        }
        if self.clock_alarms.is_empty() {
            text.push_str("no server saw its clock beyond the drift bound from the leader's\n");
        } else {
            text.push_str(&format!(
                "{} times a server saw its clock beyond the drift bound from the leader's, first: {}\n",
                self.clock_alarms.len(),
                self.clock_alarms.first().map_or("", String::as_str)
            ));
        }
        text.push_str(&format!(
            "{} nodes booted their image, {} chunks refused for wrong bytes\ninvariants held: no address held by two nodes, no ACK before its commit, no committed lease lost, no chunk kept with wrong bytes, one state on every server\n{:.1} s of virtual time, {} trace events, trace hash {:016x}\n",
            self.booted,
            self.chunks_rejected,
            self.elapsed.as_secs_f64(),
            self.events,
            self.trace_hash
        ));
        text
    }
}

/// `violation`, followed by the last trace events that name what it names (nodes, addresses,
/// servers), so that a failing seed explains itself.
fn with_context(violation: &str, trace: &Trace) -> String {
    let names: Vec<&str> = violation
        .split(|character: char| character.is_whitespace() || character == ':')
        .filter(|word| {
            word.starts_with("node")
                || (word.starts_with("10.77.") && !word.starts_with("10.77.0."))
        })
        .collect();
    let events = trace.events();
    let related: Vec<&String> = events
        .iter()
        .filter(|event| {
            names.iter().any(|name| {
                event
                    .split(|character: char| character.is_whitespace() || character == ':')
                    .any(|word| word == *name)
            }) || event.contains("harness")
        })
        .collect();
    let tail = related.len().saturating_sub(40);
    let mut text = violation.to_owned();
    text.push_str("\nthe last trace events about it:");
    for event in related.iter().skip(tail) {
        text.push_str("\n  ");
        text.push_str(event);
    }
    text
}

fn crash(
    simulation: &mut turmoil::Sim<'_>,
    disks: &BTreeMap<u64, SimDisk>,
    hosts: &Hosts,
    undo: &mut Vec<(Duration, Undo)>,
    tear_rng: &mut u64,
    server: u64,
    until: Duration,
) -> Option<String> {
    if undo.iter().any(|(_, what)| {
        matches!(what, Undo::Restart(down) | Undo::RestartOnRepairedDisk(down) if *down == server)
    }) {
        return None;
    }
    // The disk first: whatever the dying process writes from here is lost, and what it had
    // written but not synced survives torn.
    disks.get(&server)?.crash_torn(|| farm_random(tear_rng));
    // The machine loses its power: nothing leaves it from the moment of the crash. turmoil
    // crashes a host by dropping its runtime, and each TCP stream dropped sends its peer a FIN
    // or a RST; the runtime drops its tasks in an order set by tokio's process-wide task ids,
    // so those segments left in an order that depended on what the process had run before
    // (a second run of a seed in one process went differently from the first). So the
    // host's links out are cut while it is torn down, and the ones no fault holds cut are
    // mended after it. Its peers learn of the crash by their timeouts, as after a power loss.
    let crashed = server_name(server);
    let open: Vec<&str> = hosts
        .names()
        .filter(|other| *other != crashed && !cut_from(undo, hosts, server, other))
        .collect();
    for other in &open {
        simulation.partition_oneway(crashed.as_str(), *other);
    }
    simulation.crash(crashed.as_str());
    for other in &open {
        simulation.repair_oneway(crashed.as_str(), *other);
    }
    undo.push((until, Undo::Restart(server)));
    Some(format!("crashed {}", server_name(server)))
}

/// The run's hosts by name: the servers, and the client farms.
struct Hosts {
    servers: Vec<String>,
    farms: Vec<String>,
}

impl Hosts {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.servers.iter().chain(&self.farms).map(String::as_str)
    }
}

/// Whether a fault in force cuts the link from `server` to the host named `other`.
fn cut_from(undo: &[(Duration, Undo)], hosts: &Hosts, server: u64, other: &str) -> bool {
    let is_server = |id: u64| server_name(id) == other;
    let other_is_server = hosts.servers.iter().any(|name| name == other);
    undo.iter().any(|(_, what)| match what {
        // A partitioned server is cut off from every other server, both ways.
        Undo::Heal(cut) => other_is_server && (*cut == server || is_server(*cut)),
        Undo::HealOneWay(from, to) => *from == server && is_server(*to),
        Undo::Reconnect(farm) => hosts.farms.get(*farm).is_some_and(|name| name == other),
        _ => false,
    })
}

/// At the end: every server holds one state, and it holds every node's lease.
fn check_converged(observed: &Observed) -> Result<usize, SimError> {
    let mut states = observed
        .states
        .iter()
        .map(|(id, handle)| (*id, handle.read(Clone::clone)));
    let Some((first_id, first)) = states.next() else {
        return Ok(0);
    };
    for (id, state) in states {
        if state != first {
            let parts = [
                ("leases", state.leases != first.leases),
                ("quarantine", state.quarantine != first.quarantine),
                ("blocks", state.blocks != first.blocks),
                ("config", state.config != first.config),
                ("catalog", state.catalog != first.catalog),
                ("members", state.members != first.members),
            ];
            let differing: Vec<&str> = parts
                .iter()
                .filter(|(_, differs)| *differs)
                .map(|(name, _)| *name)
                .collect();
            let leases: Vec<String> = first
                .leases
                .iter()
                .filter(|(address, lease)| state.leases.get(address) != Some(lease))
                .take(3)
                .map(|(address, lease)| {
                    format!("{address}: {lease:?} vs {:?}", state.leases.get(address))
                })
                .collect();
            return Err(SimError::Invariant(format!(
                "server{first_id} and server{id} ended with different states (in {differing:?}; {leases:?})"
            )));
        }
    }
    for (node, (address, mac, expires)) in &observed.bound {
        match first.leases.get(address) {
            Some(lease)
                if lease.hardware_address == mac.to_vec()
                    && lease.expires_at_unix_secs + 2 + observed.skew_tolerance_secs
                        >= *expires => {}
            Some(lease) => {
                return Err(SimError::Invariant(format!(
                    "node{node} holds {address} until {expires}, but the cluster has it bound to {:02x?} until {}",
                    lease.hardware_address, lease.expires_at_unix_secs
                )));
            }
            None => {
                return Err(SimError::Invariant(format!(
                    "node{node} holds {address} until {expires}, but no server has that lease: a committed lease was lost"
                )));
            }
        }
    }
    Ok(first.leases.len())
}
