//! The boot servers' Raft cluster under the simulator: real openraft, the real redb store on
//! simulated disks, Raft messages over simulated TCP, each server's randomness seeded from the
//! run's seed. Crashing a server loses what its disk had not synced and restarts it on the
//! same disk.
//!
//! Checked after the run: every server that applied a log index applied the same command with
//! the same response there (state machine safety), and every server reached the last index
//! (the cluster healed).

// Each simulated server is driven here as `node`'s daemon drives a real one: it spawns its
// listener and watcher tasks (on its simulated host's runtime).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use boot_services::dhcp::{ClientId, LeaseChange};
use consensus::rpc::{Dialer, StreamNetworkFactory, serve_stream};
use consensus::state::{MeshCommand, Proposal};
use consensus::store::{StateHandle, open_backend};
use consensus::{MeshRaft, SeededRng, ServerNode, raft_config, with_seeded_rng};

use crate::disk::SimDisk;
use crate::{SimError, Trace};

/// Port of every server's Raft listener.
const RAFT_PORT: u16 = 7000;

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The run's seed: network latencies, election timeouts, all of it.
    pub seed: u64,
    /// Number of servers.
    pub servers: u64,
    /// Commands the leaders propose in total.
    pub commands: u64,
    /// Crash the leader once this many commands were proposed (its unsynced writes are lost),
    /// and restart it on its disk `restart_after` later.
    pub crash_leader_after_commands: Option<u64>,
    /// See `crash_leader_after_commands`.
    pub restart_after: Duration,
    /// Log entries between snapshots; a small value makes a restarted server catch up from a
    /// snapshot rather than from the log.
    pub snapshot_every: u64,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            servers: 3,
            commands: 40,
            crash_leader_after_commands: None,
            restart_after: Duration::from_secs(5),
            snapshot_every: 5000,
        }
    }
}

/// What a cluster run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReport {
    /// Hash of the whole trace.
    pub trace_hash: u64,
    /// Number of trace events.
    pub events: usize,
    /// Last applied log index per server (by entry or by snapshot).
    pub applied: BTreeMap<u64, u64>,
    /// (virtual ms, term, leader) each time some server saw a new leader.
    pub leaders: Vec<(u64, u64, u64)>,
    /// Which server was crashed, if any.
    pub crashed: Option<u64>,
    /// Per server: how many snapshots it installed from a leader (it was behind the kept log).
    pub snapshot_installs: BTreeMap<u64, u64>,
    /// Virtual time the run took.
    pub elapsed: Duration,
}

/// Shared between the simulated servers and the harness: single-threaded, deterministic.
#[derive(Debug, Default)]
struct Observed {
    /// Per server: log index -> what it applied there.
    applied: BTreeMap<u64, BTreeMap<u64, String>>,
    /// Per server: the log indexes that carried commands.
    commands: BTreeMap<u64, std::collections::BTreeSet<u64>>,
    /// The leader most recently seen by any server, with its term.
    leader: Option<(u64, u64)>,
    leaders: Vec<(u64, u64, u64)>,
    /// Commands handed to a leader so far.
    proposed: u64,
    /// Log index of every command whose commit a leader reported (a DHCP ACK would follow).
    committed: BTreeMap<u64, u64>,
    /// Per server: the last log index of each snapshot it installed.
    snapshots: BTreeMap<u64, Vec<u64>>,
    /// Per server: its last applied log index, by entry or by snapshot.
    last_applied: BTreeMap<u64, u64>,
    /// Per server: its applied state, to compare at the end.
    states: BTreeMap<u64, StateHandle>,
}

type Shared = Arc<Mutex<Observed>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Raft streams over turmoil's simulated TCP.
#[derive(Debug, Clone, Copy)]
struct TurmoilDialer;

impl Dialer for TurmoilDialer {
    type Stream = turmoil::net::TcpStream;

    async fn dial(&self, address: &str) -> std::io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(address).await
    }
}

fn server_name(id: u64) -> String {
    format!("server{id}")
}

/// The per-server, per-incarnation seed: distinct streams, all from the run's seed.
fn server_seed(seed: u64, id: u64, incarnation: u64) -> u64 {
    seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ incarnation.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

/// The `index`-th command of a run: a DHCP bind for client `index`, and every tenth a catalog
/// entry, so both lease rows and other rows go through the store.
fn command(index: u64, now_ms: u64) -> MeshCommand {
    if index % 10 == 9 {
        return MeshCommand::TagImage {
            reference: format!("image:v{index}"),
            manifest: format!("{index:064x}"),
            size_bytes: index * 1000,
        };
    }
    let mut record = Vec::new();
    LeaseChange::Bind {
        client: ClientId(index.to_be_bytes().to_vec()),
        hardware_address: vec![0x52, 0x54, 0, 0, (index >> 8) as u8, index as u8],
        address: std::net::Ipv4Addr::new(10, 0, (index / 250) as u8, (index % 250 + 1) as u8),
        expires_at_unix_secs: now_ms / 1000 + 600,
        hostname: None,
    }
    .encode(&mut record);
    MeshCommand::Leases(vec![record])
}

fn now_ms() -> u64 {
    let since_epoch = turmoil::since_epoch().unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

async fn run_server(
    id: u64,
    servers: u64,
    commands: u64,
    snapshot_every: u64,
    disk: SimDisk,
    trace: Trace,
    shared: Shared,
) -> Result<(), Box<dyn std::error::Error>> {
    let (log, mut state_machine) = open_backend(disk.attach())?;
    lock(&shared).states.insert(id, state_machine.state());
    {
        let trace = trace.clone();
        let shared = Arc::clone(&shared);
        state_machine.observe_snapshot_installs(Arc::new(move |last_log_id| {
            let index = last_log_id.map_or(0, |log_id| log_id.index);
            trace.record(format!(
                "{} installed a snapshot up to {index}",
                server_name(id)
            ));
            let mut observed = lock(&shared);
            observed.snapshots.entry(id).or_default().push(index);
            observed.last_applied.insert(id, index);
        }));
    }
    {
        let trace = trace.clone();
        let shared = Arc::clone(&shared);
        state_machine.observe_applies(Arc::new(move |log_id, applied| {
            let response = applied.map(|(_, response)| response);
            let what = format!("{log_id} {response:?}");
            trace.record(format!("{} applied {what}", server_name(id)));
            let mut observed = lock(&shared);
            observed.last_applied.insert(id, log_id.index);
            observed
                .applied
                .entry(id)
                .or_default()
                .insert(log_id.index, what);
            if response.is_some() {
                observed
                    .commands
                    .entry(id)
                    .or_default()
                    .insert(log_id.index);
            }
        }));
    }
    let config = Arc::new(raft_config("sim", snapshot_every, snapshot_every / 5).validate()?);
    let raft = MeshRaft::new(
        id,
        config,
        StreamNetworkFactory::new(id, TurmoilDialer),
        log,
        state_machine,
    )
    .await?;
    let listener =
        turmoil::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, RAFT_PORT)).await?;
    {
        let raft = raft.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_stream(raft.clone(), stream));
            }
        });
    }
    if id == 1 && !raft.is_initialized().await? {
        let members: BTreeMap<u64, ServerNode> = (1..=servers)
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
                    if observed
                        .leader
                        .is_none_or(|(known_term, _)| known_term < term)
                    {
                        observed.leader = Some((term, leader));
                        let at =
                            u64::try_from(turmoil::sim_elapsed().unwrap_or_default().as_millis())
                                .unwrap_or(u64::MAX);
                        observed.leaders.push((at, term, leader));
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    // The leader proposes the run's commands, one at a time, as a DHCP core would propose
    // leases: whoever leads takes the next one.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if raft.current_leader().await != Some(id) {
            continue;
        }
        let index = {
            let mut observed = lock(&shared);
            if observed.proposed >= commands {
                continue;
            }
            observed.proposed += 1;
            observed.proposed - 1
        };
        let at = now_ms();
        let proposal = Proposal {
            at,
            command: command(index, at),
        };
        match raft.client_write(proposal).await {
            Ok(response) => {
                trace.record(format!(
                    "{} committed command {index} at {}",
                    server_name(id),
                    response.log_id
                ));
                lock(&shared).committed.insert(index, response.log_id.index);
            }
            Err(error) => trace.record(format!(
                "{} could not commit command {index}: {error}",
                server_name(id)
            )),
        }
    }
}

/// Runs a cluster of `spec.servers` until every command is applied on every server.
pub fn run_cluster(spec: &ClusterSpec) -> Result<ClusterReport, SimError> {
    let trace = Trace::default();
    let shared: Shared = Arc::default();
    let mut simulation = turmoil::Builder::new()
        .rng_seed(spec.seed)
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(10))
        .simulation_duration(Duration::from_secs(600))
        .build();
    let disks: BTreeMap<u64, SimDisk> = (1..=spec.servers).map(|id| (id, SimDisk::new())).collect();
    for (&id, disk) in &disks {
        let disk = disk.clone();
        let trace = trace.clone();
        let shared = Arc::clone(&shared);
        let (seed, servers, commands, snapshot_every) =
            (spec.seed, spec.servers, spec.commands, spec.snapshot_every);
        let incarnations = Arc::new(Mutex::new(0u64));
        simulation.host(server_name(id).as_str(), move || {
            let incarnation = {
                let mut count = incarnations.lock().unwrap_or_else(PoisonError::into_inner);
                *count += 1;
                *count
            };
            let rng = SeededRng::new(server_seed(seed, id, incarnation));
            let server = run_server(
                id,
                servers,
                commands,
                snapshot_every,
                disk.clone(),
                trace.clone(),
                Arc::clone(&shared),
            );
            async move {
                with_seeded_rng(rng, server)
                    .await
                    .map_err(|error| -> Box<dyn std::error::Error> { error.to_string().into() })
            }
        });
    }

    // The harness: waits until all servers applied every command; it crashes and restarts the
    // leader between steps.
    let mut crashed: Option<(u64, Duration)> = None;
    let mut restarted = false;
    simulation.client("harness", {
        let shared = Arc::clone(&shared);
        let commands = spec.commands;
        let servers = spec.servers;
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let observed = lock(&shared);
                // Some server applied every command entry by entry (a server that installed
                // a snapshot applied the earlier ones all at once), and all are at one index.
                let applied_commands = observed
                    .commands
                    .values()
                    .map(|commands| commands.len() as u64)
                    .max()
                    .unwrap_or(0);
                let last: Vec<u64> = observed.last_applied.values().copied().collect();
                if observed.last_applied.len() as u64 == servers
                    && applied_commands >= commands
                    && last.windows(2).all(|pair| pair[0] == pair[1])
                {
                    return Ok(());
                }
            }
        }
    });
    loop {
        let finished = simulation
            .step()
            .map_err(|error| SimError::Turmoil(error.to_string()))?;
        if finished {
            break;
        }
        let elapsed = simulation.elapsed();
        let Some(crash_after) = spec.crash_leader_after_commands else {
            continue;
        };
        if crashed.is_none() {
            let (proposed, leader) = {
                let observed = lock(&shared);
                (observed.proposed, observed.leader.map(|(_, leader)| leader))
            };
            if proposed >= crash_after
                && let Some(leader) = leader
            {
                // The disk first: whatever the dying process writes from here is lost.
                if let Some(disk) = disks.get(&leader) {
                    disk.crash();
                }
                simulation.crash(server_name(leader).as_str());
                trace.record_at(elapsed, format!("harness crashed {}", server_name(leader)));
                crashed = Some((leader, elapsed));
            }
        } else if let Some((leader, at)) = crashed
            && !restarted
            && elapsed >= at + spec.restart_after
        {
            simulation.bounce(server_name(leader).as_str());
            trace.record_at(
                elapsed,
                format!("harness restarted {}", server_name(leader)),
            );
            restarted = true;
        }
    }

    let observed = lock(&shared);
    check_applied_logs_agree(&observed.applied)?;
    check_commits_survive(&observed)?;
    check_states_agree(&observed)?;
    Ok(ClusterReport {
        trace_hash: trace.hash(),
        events: trace.len(),
        applied: observed.last_applied.clone(),
        leaders: observed.leaders.clone(),
        crashed: crashed.map(|(leader, _)| leader),
        snapshot_installs: observed
            .snapshots
            .iter()
            .map(|(id, installs)| (*id, installs.len() as u64))
            .collect(),
        elapsed: simulation.elapsed(),
    })
}

/// Durability: every command reported committed was applied, as a command, by every server,
/// or arrived there inside a snapshot that covers its log index.
fn check_commits_survive(observed: &Observed) -> Result<(), SimError> {
    for (command, log_index) in &observed.committed {
        for (server, commands) in &observed.commands {
            let in_snapshot = observed
                .snapshots
                .get(server)
                .is_some_and(|installs| installs.iter().any(|last| last >= log_index));
            if !commands.contains(log_index) && !in_snapshot {
                return Err(SimError::Invariant(format!(
                    "command {command} was committed at log index {log_index}, but server{server} never applied it"
                )));
            }
        }
    }
    Ok(())
}

/// Convergence: at the end every server holds the same state (leases, blocks, catalog,
/// members), however it got there.
fn check_states_agree(observed: &Observed) -> Result<(), SimError> {
    let mut states = observed
        .states
        .iter()
        .map(|(id, handle)| (*id, handle.read(Clone::clone)));
    let Some((first_id, first)) = states.next() else {
        return Ok(());
    };
    for (id, state) in states {
        if state != first {
            return Err(SimError::Invariant(format!(
                "server{first_id} and server{id} ended with different states"
            )));
        }
    }
    Ok(())
}

/// State machine safety: no two servers applied different things at one log index.
fn check_applied_logs_agree(
    applied: &BTreeMap<u64, BTreeMap<u64, String>>,
) -> Result<(), SimError> {
    let mut by_index: BTreeMap<u64, (u64, &String)> = BTreeMap::new();
    for (server, entries) in applied {
        for (index, what) in entries {
            match by_index.get(index) {
                Some((first_server, first)) if *first != what => {
                    return Err(SimError::Invariant(format!(
                        "log index {index}: server{first_server} applied {first}, server{server} applied {what}"
                    )));
                }
                Some(_) => {}
                None => {
                    by_index.insert(*index, (*server, what));
                }
            }
        }
    }
    Ok(())
}
