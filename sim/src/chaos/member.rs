//! A cluster member as the chaos engine runs it: the real Raft node, store and state machine,
//! with Raft and forwarded proposals over turmoil's simulated TCP instead of QUIC. It is the
//! [`LeaseCluster`] the real lease store and DHCP service run on.
//!
//! What differs from `node`'s `ClusterMember` is the transport only: no TLS, no join protocol,
//! no admin requests besides forwarding a proposal to the leader. Forwarding follows the same
//! rules (a few attempts while leadership moves, a timeout per attempt).

// A driver: it spawns the listener of forwarded proposals on its simulated host.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use consensus::clock::ClockReading;
use consensus::openraft::error::{ClientWriteError, RaftError};
use consensus::rpc::{Dialer, read_frame, write_frame};
use consensus::store::StateHandle;
use consensus::{MeshCommand, MeshRaft, MeshResponse, Proposal};
use node::cluster::leases::LeaseCluster;
use node::cluster::member::AppliedLeases;
use node::seams::Clock;
use tokio::sync::broadcast;

use super::SkewedClock;

/// Port of every server's Raft listener.
pub const RAFT_PORT: u16 = 7000;
/// Port on which a leader takes proposals forwarded by the other servers.
pub const FORWARD_PORT: u16 = 7001;
/// As `node`'s member: attempts while leadership moves, the wait per attempt and between.
const FORWARD_ATTEMPTS_MAX: usize = 5;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
const FORWARD_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Raft streams over turmoil's simulated TCP.
#[derive(Debug, Clone, Copy)]
pub struct TurmoilDialer;

impl Dialer for TurmoilDialer {
    type Stream = turmoil::net::TcpStream;

    async fn dial(&self, address: &str) -> std::io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(address).await
    }
}

/// The simulated host name of server `id`.
pub fn server_name(id: u64) -> String {
    format!("server{id}")
}

/// What a server asks the leader.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum ForwardRequest {
    /// Commit this.
    Propose(MeshCommand),
}

/// A leader's answer. A commit carries the leader's clock when it answered: the forwarding
/// server measures its clock against the leader's with every forwarded proposal (in `serve`,
/// a member asks the leader's time every `CLOCK_CHECK_EVERY` instead).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum ForwardReply {
    Proposed(MeshResponse, u64),
    NotLeader,
    Failed(String),
}

/// One simulated server's cluster member.
#[derive(Clone)]
pub struct SimMember {
    id: u64,
    raft: MeshRaft,
    state: StateHandle,
    applied: broadcast::Sender<AppliedLeases>,
    clock: SkewedClock,
    clock_observer: Option<ClockObserver>,
    /// The last measurement of this server's clock against the leader's.
    last_clock_reading: std::sync::Arc<std::sync::Mutex<Option<ClockReading>>>,
}

/// Told of every measurement of this server's clock against the leader's.
pub type ClockObserver = std::sync::Arc<dyn Fn(ClockReading) + Send + Sync>;

impl std::fmt::Debug for SimMember {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SimMember")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SimMember {
    /// The member of server `id`.
    pub fn new(
        id: u64,
        raft: MeshRaft,
        state: StateHandle,
        applied: broadcast::Sender<AppliedLeases>,
        clock: SkewedClock,
        clock_observer: Option<ClockObserver>,
    ) -> Self {
        Self {
            id,
            raft,
            state,
            applied,
            clock,
            clock_observer,
            last_clock_reading: std::sync::Arc::default(),
        }
    }

    /// Serves proposals forwarded by the other servers until the host dies.
    pub async fn serve_forwarded(self) -> std::io::Result<()> {
        let listener =
            turmoil::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, FORWARD_PORT))
                .await?;
        loop {
            let (mut stream, _) = listener.accept().await?;
            let member = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = read_frame::<_, ForwardRequest>(&mut stream).await {
                    let reply = match request {
                        ForwardRequest::Propose(command) => match member.propose(command).await {
                            Ok(response) => ForwardReply::Proposed(response, member.wall_now_ms()),
                            Err(None) => ForwardReply::NotLeader,
                            Err(Some(error)) => ForwardReply::Failed(error),
                        },
                    };
                    if write_frame(&mut stream, &reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// Commits `command` here; `Err(None)` when this member is not the leader.
    async fn propose(&self, command: MeshCommand) -> Result<MeshResponse, Option<String>> {
        let proposal = Proposal {
            at: self.wall_now_ms(),
            command,
        };
        match self.raft.client_write(proposal).await {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(None),
            Err(error) => Err(Some(error.to_string())),
        }
    }

    async fn forward(&self, leader: u64, request: &ForwardRequest) -> Result<ForwardReply, String> {
        let address = format!("{}:{FORWARD_PORT}", server_name(leader));
        let mut stream = turmoil::net::TcpStream::connect(address.as_str())
            .await
            .map_err(|error| error.to_string())?;
        write_frame(&mut stream, request)
            .await
            .map_err(|error| error.to_string())?;
        match read_frame(&mut stream).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err("closed without an answer".into()),
            Err(error) => Err(error.to_string()),
        }
    }
}

impl LeaseCluster for SimMember {
    fn server_id(&self) -> u64 {
        self.id
    }

    fn member_ids(&self) -> Vec<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    fn state(&self) -> &StateHandle {
        &self.state
    }

    fn subscribe_leases(&self) -> broadcast::Receiver<AppliedLeases> {
        self.applied.subscribe()
    }

    async fn propose_anywhere(&self, command: MeshCommand) -> Result<MeshResponse, String> {
        let mut last_error = String::from("no leader");
        for attempt in 0..FORWARD_ATTEMPTS_MAX {
            if attempt > 0 {
                tokio::time::sleep(FORWARD_RETRY_DELAY).await;
            }
            match self.propose(command.clone()).await {
                Ok(response) => return Ok(response),
                Err(Some(error)) => return Err(error),
                Err(None) => {}
            }
            let Some(leader) = self.raft.metrics().borrow().current_leader else {
                continue;
            };
            if leader == self.id {
                continue;
            }
            let request = ForwardRequest::Propose(command.clone());
            let sent_ms = self.wall_now_ms();
            match tokio::time::timeout(FORWARD_TIMEOUT, self.forward(leader, &request)).await {
                Ok(Ok(ForwardReply::Proposed(response, leader_ms))) => {
                    let reading =
                        ClockReading::from_exchange(sent_ms, leader_ms, self.wall_now_ms());
                    *self
                        .last_clock_reading
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reading);
                    if let Some(observe) = &self.clock_observer {
                        observe(reading);
                    }
                    return Ok(response);
                }
                Ok(Ok(ForwardReply::NotLeader)) => last_error = "leadership moved".into(),
                Ok(Ok(ForwardReply::Failed(error))) => return Err(error),
                Ok(Err(error)) => last_error = error,
                Err(_) => last_error = format!("server{leader} did not answer in time"),
            }
        }
        Err(last_error)
    }

    fn clock_beyond_bound(&self) -> bool {
        self.last_clock_reading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|reading| reading.certainly_beyond(consensus::state::DRIFT_BOUND_MS))
    }

    fn wall_now_ms(&self) -> u64 {
        let since_epoch = self
            .clock
            .wall_now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
    }
}
