//! The boot servers' replicated state on Raft: DHCP leases, address blocks, the fleet
//! configuration, the image catalog and the members.
//!
//! - [`state`]: `MeshState` and its pure `apply`.
//! - [`store`]: log, vote and state machine in one redb database per server.
//! - [`runtime`]: the async runtime openraft runs on, with per-server seeded randomness so the
//!   simulator replays a run from its seed.
//! - [`rpc`]: Raft's messages over any byte stream (QUIC between servers, simulated TCP in the
//!   simulator).

pub mod clock;
pub mod rpc;
pub mod runtime;
pub mod state;
pub mod store;

use std::io::Cursor;

/// The Raft library, for drivers that need its request and error types.
pub use openraft;

use serde::{Deserialize, Serialize};

pub use runtime::{MeshRuntime, SeededRng, with_seeded_rng};
pub use state::{MeshCommand, MeshResponse, MeshState, Proposal};

/// A cluster member as Raft's membership names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerNode {
    /// Where its cluster endpoint listens (`address:port`).
    pub address: String,
}

impl std::fmt::Display for ServerNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.address)
    }
}

openraft::declare_raft_types!(
    /// The type configuration of the bootmesh cluster.
    pub MeshTypeConfig:
        D = Proposal,
        R = MeshResponse,
        NodeId = u64,
        Node = ServerNode,
        Entry = openraft::Entry<MeshTypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = MeshRuntime,
);

/// A bootmesh Raft handle.
pub type MeshRaft = openraft::Raft<MeshTypeConfig>;

/// Raft timing for shared, slow machines: elections take at least a second, so a loaded
/// two-core machine (a boot storm, a CI run) does not depose a healthy leader.
///
/// A snapshot is taken every `snapshot_every` entries, and `log_kept_after_snapshot` entries
/// stay behind it for followers that are only a little behind.
pub fn raft_config(
    cluster_name: &str,
    snapshot_every: u64,
    log_kept_after_snapshot: u64,
) -> openraft::Config {
    openraft::Config {
        cluster_name: cluster_name.to_owned(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: log_kept_after_snapshot,
        ..openraft::Config::default()
    }
}
