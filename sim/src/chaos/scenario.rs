//! Chaos scenario files (TOML, `engine = "chaos"`): the cluster, the nodes, the phases and
//! the faults. Unknown keys and fault kinds are refused, with their place.

use std::time::Duration;

use serde::Deserialize;

use super::{ChaosFault, ChaosSpec};

/// A chaos scenario as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChaosScenario {
    /// Always "chaos": what tells a chaos scenario from a storm scenario.
    pub engine: String,
    /// The scenario's name (reports, soak logs).
    pub name: String,
    /// Boot servers.
    #[serde(default = "default_servers")]
    pub servers: u64,
    /// Client-farm hosts the nodes are spread over.
    #[serde(default = "default_farms")]
    pub farms: usize,
    /// Booting nodes.
    pub nodes: usize,
    /// Every node starts within this many seconds.
    #[serde(default = "default_start_window")]
    pub start_window_secs: u64,
    /// Lease time the servers give.
    #[serde(default = "default_lease")]
    pub lease_secs: u64,
    /// Length of the safety phase (faults) and of the liveness phase (none).
    pub safety_secs: u64,
    /// See `safety_secs`.
    pub liveness_secs: u64,
    /// Any two servers' clocks are up to this far apart, drawn from the seed.
    #[serde(default)]
    pub skew_max_ms: u64,
    /// A skew beyond the drift bound is meant: the servers give no uniqueness promise then,
    /// and must report their clocks.
    #[serde(default)]
    pub beyond_the_drift_bound: bool,
    /// Addresses in the dynamic range (by default four for every node): a tight pool makes
    /// servers take each other's expired blocks.
    #[serde(default)]
    pub addresses: Option<u32>,
    /// How long the servers' address blocks are leased (by default as `serve` does).
    #[serde(default)]
    pub block_lease_secs: Option<u64>,
    /// How the nodes get their image: `servers` (over simulated TCP from the servers, for
    /// thousands of nodes) or `swarm` (the swarm's real QUIC code, nodes serving each other;
    /// costlier, for tens to a few hundred nodes).
    #[serde(default)]
    pub chunks: super::ChunkPath,
    /// Faults drawn from the seed, besides the listed ones.
    #[serde(default)]
    pub random_faults: usize,
    /// Listed faults.
    #[serde(default, rename = "fault")]
    pub faults: Vec<ChaosFaultEntry>,
}

fn default_servers() -> u64 {
    3
}
fn default_farms() -> usize {
    4
}
fn default_start_window() -> u64 {
    30
}
fn default_lease() -> u64 {
    120
}

/// One `[[fault]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChaosFaultEntry {
    /// kill -9 of one server, restarted on its disk `down_secs` later.
    Crash {
        server: u64,
        at_secs: u64,
        down_secs: u64,
    },
    /// kill -9 of whichever server leads then.
    CrashLeader { at_secs: u64, down_secs: u64 },
    /// The leader killed every `every_secs` from `from_secs` to `until_secs`, each time
    /// restarted `down_secs` later.
    LeaderCrashLoop {
        from_secs: u64,
        every_secs: u64,
        down_secs: u64,
        until_secs: u64,
    },
    /// One server cut off from the other servers (not from the nodes).
    Partition {
        server: u64,
        at_secs: u64,
        for_secs: u64,
    },
    /// A server serves every chunk with a flipped byte.
    CorruptChunks {
        server: u64,
        at_secs: u64,
        for_secs: u64,
    },
    /// A server's disk fails every fsync; then the server is restarted on it.
    DiskFailure {
        server: u64,
        at_secs: u64,
        for_secs: u64,
    },
    /// Server `from` cannot reach server `to`; `to` still reaches `from`.
    PartitionOneWay {
        from: u64,
        to: u64,
        at_secs: u64,
        for_secs: u64,
    },
    /// A client farm (a rack with its relay; farms count from 0) cut off from every server.
    RackCut {
        farm: usize,
        at_secs: u64,
        for_secs: u64,
    },
    /// Every link takes up to `max_ms` per message (late and out of order).
    Delay {
        max_ms: u64,
        at_secs: u64,
        for_secs: u64,
    },
    /// `percent` of the nodes' datagrams, both ways, arrive twice.
    Duplication {
        percent: u8,
        at_secs: u64,
        for_secs: u64,
    },
    /// A server's disk takes `sync_ms` for every fsync (a dying disk, or a neighbour saturating
    /// it); the server keeps running on it.
    SlowDisk {
        server: u64,
        at_secs: u64,
        for_secs: u64,
        sync_ms: u64,
    },
    /// Datagrams between nodes and servers lost.
    Loss {
        percent: u8,
        at_secs: u64,
        for_secs: u64,
    },
}

/// Why a chaos scenario cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ChaosScenarioError {
    /// Not TOML, or not this schema.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// Read, but makes no sense.
    #[error("{0}")]
    Invalid(String),
}

/// Whether `text` is a chaos scenario (it says `engine = "chaos"`) rather than a storm one.
pub fn is_chaos_scenario(text: &str) -> bool {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|table| table.get("engine").cloned())
        .is_some_and(|engine| engine.as_str() == Some("chaos"))
}

impl ChaosScenario {
    /// Reads and checks a scenario.
    pub fn from_toml(text: &str) -> Result<Self, ChaosScenarioError> {
        let scenario: Self = toml::from_str(text)?;
        let invalid = |reason: String| Err(ChaosScenarioError::Invalid(reason));
        if scenario.engine != "chaos" {
            return invalid(format!("engine: {:?} is not \"chaos\"", scenario.engine));
        }
        if !(1..=9).contains(&scenario.servers) {
            return invalid(format!("servers: {} is not 1 to 9", scenario.servers));
        }
        if scenario.nodes == 0 || scenario.farms == 0 {
            return invalid("nodes and farms: at least one each".into());
        }
        if scenario.block_lease_secs.is_some_and(|secs| secs < 20) {
            return invalid("block_lease_secs: at least 20".into());
        }
        if scenario.lease_secs < 20 {
            return invalid(format!("lease_secs: {} is under 20", scenario.lease_secs));
        }
        if scenario.skew_max_ms > consensus::state::DRIFT_BOUND_MS
            && !scenario.beyond_the_drift_bound
        {
            return invalid(format!(
                "skew_max_ms: {} is beyond the drift bound of {} ms, under which alone the servers promise unique addresses; say beyond_the_drift_bound = true to run it and see the servers notice",
                scenario.skew_max_ms,
                consensus::state::DRIFT_BOUND_MS
            ));
        }
        for (number, fault) in scenario.faults.iter().enumerate() {
            let place = format!("fault {}", number + 1);
            match fault {
                ChaosFaultEntry::Crash { server, .. }
                | ChaosFaultEntry::Partition { server, .. }
                | ChaosFaultEntry::CorruptChunks { server, .. }
                | ChaosFaultEntry::DiskFailure { server, .. }
                | ChaosFaultEntry::SlowDisk { server, .. }
                    if *server == 0 || *server > scenario.servers =>
                {
                    return invalid(format!(
                        "{place}: server {server} is not one of 1 to {}",
                        scenario.servers
                    ));
                }
                ChaosFaultEntry::LeaderCrashLoop { every_secs: 0, .. } => {
                    return invalid(format!("{place}: every_secs must be at least 1"));
                }
                ChaosFaultEntry::Loss { percent, .. } if *percent > 100 => {
                    return invalid(format!("{place}: percent {percent} is over 100"));
                }
                ChaosFaultEntry::PartitionOneWay { from, to, .. }
                    if from == to
                        || !(1..=scenario.servers).contains(from)
                        || !(1..=scenario.servers).contains(to) =>
                {
                    return invalid(format!(
                        "{place}: from {from} and to {to} must be two of the servers 1 to {}",
                        scenario.servers
                    ));
                }
                ChaosFaultEntry::RackCut { farm, .. } if *farm >= scenario.farms => {
                    return invalid(format!(
                        "{place}: farm {farm} is not one of 0 to {}",
                        scenario.farms - 1
                    ));
                }
                ChaosFaultEntry::Delay { max_ms, .. } if !(1..=10_000).contains(max_ms) => {
                    return invalid(format!("{place}: max_ms {max_ms} is not 1 to 10000"));
                }
                ChaosFaultEntry::Duplication { percent, .. } if *percent > 100 => {
                    return invalid(format!("{place}: percent {percent} is over 100"));
                }
                ChaosFaultEntry::SlowDisk { sync_ms, .. } if !(1..=60_000).contains(sync_ms) => {
                    return invalid(format!("{place}: sync_ms {sync_ms} is not 1 to 60000"));
                }
                _ => {}
            }
        }
        Ok(scenario)
    }

    /// The run of this scenario with `seed`.
    pub fn spec(&self, seed: u64) -> ChaosSpec {
        let secs = Duration::from_secs;
        let mut faults = Vec::new();
        for fault in &self.faults {
            match *fault {
                ChaosFaultEntry::Crash {
                    server,
                    at_secs,
                    down_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::Crash {
                        server,
                        down_for: secs(down_secs),
                    },
                )),
                ChaosFaultEntry::CrashLeader { at_secs, down_secs } => faults.push((
                    secs(at_secs),
                    ChaosFault::CrashLeader {
                        down_for: secs(down_secs),
                    },
                )),
                ChaosFaultEntry::LeaderCrashLoop {
                    from_secs,
                    every_secs,
                    down_secs,
                    until_secs,
                } => {
                    let mut at = from_secs;
                    while at < until_secs {
                        faults.push((
                            secs(at),
                            ChaosFault::CrashLeader {
                                down_for: secs(down_secs),
                            },
                        ));
                        at += every_secs;
                    }
                }
                ChaosFaultEntry::Partition {
                    server,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::Partition {
                        server,
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::CorruptChunks {
                    server,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::CorruptChunks {
                        server,
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::DiskFailure {
                    server,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::DiskFailure {
                        server,
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::PartitionOneWay {
                    from,
                    to,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::OneWayPartition {
                        from,
                        to,
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::RackCut {
                    farm,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::FarmCut {
                        farm,
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::Delay {
                    max_ms,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::Delay {
                        max: Duration::from_millis(max_ms),
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::Duplication {
                    percent,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::Duplication {
                        percent,
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::SlowDisk {
                    server,
                    at_secs,
                    for_secs,
                    sync_ms,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::SlowDisk {
                        server,
                        sync: Duration::from_millis(sync_ms),
                        for_: secs(for_secs),
                    },
                )),
                ChaosFaultEntry::Loss {
                    percent,
                    at_secs,
                    for_secs,
                } => faults.push((
                    secs(at_secs),
                    ChaosFault::Loss {
                        rate_percent: percent,
                        for_: secs(for_secs),
                    },
                )),
            }
        }
        ChaosSpec {
            seed,
            servers: self.servers,
            farms: self.farms,
            nodes: self.nodes,
            start_window: secs(self.start_window_secs),
            lease: secs(self.lease_secs),
            safety: secs(self.safety_secs),
            liveness: secs(self.liveness_secs),
            faults,
            skew_max: Duration::from_millis(self.skew_max_ms),
            sabotage: Default::default(),
            addresses: self.addresses,
            block_lease: self
                .block_lease_secs
                .map_or(node::cluster::leases::BLOCK_LEASE, secs),
            skip_chunk_verification: false,
            chunks: self.chunks,
        }
        .with_random_faults(self.random_faults)
    }
}
