//! A running cluster member: the Raft node on its redb store, its QUIC endpoint serving Raft,
//! admin and join streams, and the leader's duties (recording its own membership when it
//! founded the cluster, promoting caught-up learners to voters).
//!
//! A connection for Raft or admin must present a certificate of the cluster CA whose server
//! id is in the current membership; anything else is refused and logged. Only the join
//! protocol is open to a server without a certificate, and it only redeems a token.

// A driver: it spawns its connection tasks and stamps proposals with the wall clock.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use boot_services::dhcp::LeaseChange;

use consensus::openraft::ChangeMembers;
use consensus::openraft::error::{ClientWriteError, RaftError};
use consensus::rpc::{StreamNetworkFactory, read_frame, serve_stream, write_frame};
use consensus::state::{LeaseOutcome, Member, MeshCommand, Proposal};
use consensus::store::{StateHandle, StoreError, open_file};
use consensus::{MeshRaft, MeshResponse, ServerNode, raft_config};
use quinn::{Connection, Endpoint};
use tokio::sync::{Semaphore, broadcast};

use super::ClusterError;
use super::admin::{
    AdminReply, AdminRequest, ClusterStatus, JoinReply, JoinRequest, LeaseView, MemberStatus,
};
use super::files::{ClusterFiles, IdentityRecord};
use super::pki::{ClusterCa, JoinToken};
use super::transport::{
    ALPN_ADMIN, ALPN_CHUNKS, ALPN_JOIN, ALPN_RAFT, QuicDialer, bind_server, connect,
    member_client_config, open_stream, peer_server_id, protocol,
};

/// Connections served at once; more are refused.
const CONNECTIONS_MAX: usize = 256;
/// Streams served at once per connection.
const STREAMS_PER_CONNECTION_MAX: usize = 64;
/// A learner is promoted once it is this close to the leader's last log index.
const PROMOTION_LAG_MAX: u64 = 100;
/// How often the leader looks for learners to promote.
const DUTY_INTERVAL: Duration = Duration::from_secs(2);
/// Longest join token lifetime.
const TOKEN_TTL_MAX_SECS: u64 = 7 * 24 * 3600;
/// Lease changes buffered for a slow DHCP service before it must reload them all.
const APPLIED_LEASES_BUFFERED: usize = 65_536;
/// Attempts to reach the leader with a proposal while leadership moves.
const FORWARD_ATTEMPTS_MAX: usize = 5;
/// How long a forwarded proposal may take before the leader is given up on.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between those attempts (an election takes a second or two).
const FORWARD_RETRY_DELAY: Duration = Duration::from_millis(500);
/// How often a member measures its clock against the leader's.
pub const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(10);

/// The lease changes of `proposal` that the state machine committed.
pub fn committed_lease_changes(proposal: &Proposal, response: &MeshResponse) -> Vec<LeaseChange> {
    let (MeshCommand::Leases(records), MeshResponse::Leases(outcomes)) =
        (&proposal.command, response)
    else {
        return Vec::new();
    };
    records
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| **outcome == LeaseOutcome::Committed)
        .filter_map(|(record, _)| LeaseChange::decode(record).ok())
        .collect()
}

/// What the state machine did to the leases, in log order.
#[derive(Debug, Clone)]
pub enum AppliedLeases {
    /// One committed lease change, from any server.
    Change(LeaseChange),
    /// A snapshot from the leader replaced every lease at once (this server was too far
    /// behind for the log): whoever mirrors the leases reloads them all.
    Replaced,
}

/// Feeds every lease change `state_machine` commits, and every snapshot that replaces its
/// leases, to the returned sender's subscribers (the DHCP service mirrors them).
pub fn applied_lease_feed(
    state_machine: &mut consensus::store::StateMachineStore,
) -> broadcast::Sender<AppliedLeases> {
    let (applied_leases, _) = broadcast::channel(APPLIED_LEASES_BUFFERED);
    {
        let applied_leases = applied_leases.clone();
        state_machine.observe_applies(Arc::new(move |_, applied| {
            if let Some((proposal, response)) = applied {
                for change in committed_lease_changes(proposal, response) {
                    // Nobody listening (no DHCP service) is fine.
                    let _ = applied_leases.send(AppliedLeases::Change(change));
                }
            }
        }));
    }
    {
        let applied_leases = applied_leases.clone();
        state_machine.observe_snapshot_installs(Arc::new(move |last_log_id| {
            tracing::info!(last_log_id = ?last_log_id, "state replaced by a snapshot from the leader");
            let _ = applied_leases.send(AppliedLeases::Replaced);
        }));
    }
    applied_leases
}

/// A running member.
#[derive(Clone)]
pub struct ClusterMember {
    /// The Raft node.
    pub raft: MeshRaft,
    /// The applied state.
    pub state: StateHandle,
    /// Who this server is.
    pub record: IdentityRecord,
    ca: Arc<ClusterCa>,
    endpoint: Endpoint,
    /// Every lease change the state machine committed, from any server, in log order.
    applied_leases: broadcast::Sender<AppliedLeases>,
    /// Admin connections to other members (requests forwarded to the leader).
    admin_config: quinn::ClientConfig,
    admin_connections: Arc<Mutex<BTreeMap<SocketAddr, Connection>>>,
    /// The swarm member that serves image chunks on this endpoint, once the daemon has
    /// started it; until then chunk connections are refused.
    swarm: Arc<std::sync::OnceLock<Arc<crate::swarm::SwarmNode>>>,
    /// The last measurement of the leader's clock against this member's.
    clock_to_leader: Arc<Mutex<Option<consensus::clock::ClockReading>>>,
    /// The boots this server took part in, once the daemon has started its services; until
    /// then other members hear of none.
    boots: Arc<std::sync::OnceLock<Arc<crate::boots::BootRecorder>>>,
    /// This server's image store, whose manifests other members may ask for.
    images: Arc<std::sync::OnceLock<Arc<transfer::ChunkStore>>>,
    /// Groups whose promoted image this server does not boot yet (the catalog follower's
    /// count, for `/metrics`).
    catalog_groups_behind: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for ClusterMember {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClusterMember")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Unix milliseconds now (a cluster command's time stamp).
fn now_ms() -> u64 {
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl ClusterMember {
    /// Loads the identity in `files`, opens the store, binds the endpoint and starts Raft.
    pub async fn start(
        files: &ClusterFiles,
        settings: &crate::config::ClusterSection,
    ) -> Result<Self, ClusterError> {
        let loaded = files.load()?;
        let (log, mut state_machine) =
            open_file(&files.raft_store()).map_err(|error| match error {
                StoreError::Missing { .. } | StoreError::Damaged { .. } => {
                    ClusterError::StoreLost {
                        error,
                        server_id: loaded.record.server_id,
                        directory: files.directory().to_owned(),
                    }
                }
                other => other.into(),
            })?;
        let state = state_machine.state();
        let applied_leases = applied_lease_feed(&mut state_machine);
        let endpoint = bind_server(loaded.record.address, &loaded.identity)?;
        let dialer = QuicDialer::new(endpoint.clone(), &loaded.identity)?;
        let config = raft_config(
            &loaded.record.cluster_name,
            settings.snapshot_every,
            settings.log_kept_after_snapshot,
        )
        .validate()
        .map_err(|error| ClusterError::Raft(error.to_string()))?;
        let raft = MeshRaft::new(
            loaded.record.server_id,
            Arc::new(config),
            StreamNetworkFactory::new(loaded.record.server_id, dialer),
            log,
            state_machine,
        )
        .await
        .map_err(|error| ClusterError::Raft(error.to_string()))?;
        let admin_config = member_client_config(&loaded.identity, ALPN_ADMIN)?;
        let member = Self {
            raft,
            state,
            record: loaded.record,
            ca: Arc::new(loaded.ca),
            endpoint,
            applied_leases,
            admin_config,
            admin_connections: Arc::default(),
            swarm: Arc::default(),
            clock_to_leader: Arc::default(),
            boots: Arc::default(),
            images: Arc::default(),
            catalog_groups_behind: Arc::default(),
        };
        if member.record.bootstrap
            && !member
                .raft
                .is_initialized()
                .await
                .map_err(|error| ClusterError::Raft(error.to_string()))?
        {
            let founders = BTreeMap::from([(
                member.record.server_id,
                ServerNode {
                    address: member.record.address.to_string(),
                },
            )]);
            member
                .raft
                .initialize(founders)
                .await
                .map_err(|error| ClusterError::Raft(error.to_string()))?;
            tracing::info!(server_id = member.record.server_id, "cluster founded");
        }
        tracing::info!(
            server_id = member.record.server_id,
            address = %member.record.address,
            "cluster member started"
        );
        Ok(member)
    }

    /// The member's QUIC endpoint (a swarm member shares it for chunk connections).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Hands chunk connections (ALPN `bootmesh-chunks/1`) to `swarm` from now on. Only the
    /// first call counts.
    pub fn attach_swarm(&self, swarm: Arc<crate::swarm::SwarmNode>) {
        let _attached_before = self.swarm.set(swarm);
    }

    /// Answers other members' questions about boots from `boots`.
    pub fn attach_boots(&self, boots: Arc<crate::boots::BootRecorder>) {
        let _attached_before = self.boots.set(boots);
    }

    /// Groups whose promoted image this server does not boot yet.
    pub fn catalog_groups_behind(&self) -> u64 {
        self.catalog_groups_behind
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records how many groups this server's catalog is behind the cluster's.
    pub fn set_catalog_groups_behind(&self, groups: u64) {
        self.catalog_groups_behind
            .store(groups, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets other members ask for the manifests in `store`.
    pub fn attach_images(&self, store: Arc<transfer::ChunkStore>) {
        let _attached_before = self.images.set(store);
    }

    /// The cluster addresses of every other member Raft knows, voters and learners.
    pub fn other_member_addresses(&self) -> Vec<SocketAddr> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .nodes()
            .filter(|(id, _)| **id != self.record.server_id)
            .filter_map(|(_, node)| node.address.parse().ok())
            .collect()
    }

    /// The manifest `hash` from the first other member whose store holds it; the bytes are
    /// checked against the hash, so a member cannot hand over another image.
    pub async fn manifest_from_other_members(
        &self,
        hash: transfer::ContentHash,
    ) -> Result<transfer::Manifest, String> {
        let mut reasons = Vec::new();
        for address in self.other_member_addresses() {
            let request = AdminRequest::Manifest {
                hash: hash.to_hex(),
            };
            let answer =
                tokio::time::timeout(FORWARD_TIMEOUT, self.forward(address, &request)).await;
            let reason = match answer {
                Ok(Ok(AdminReply::Manifest(bytes))) => {
                    match transfer::Manifest::decode_expecting(&bytes, hash) {
                        Ok(manifest) => return Ok(manifest),
                        Err(error) => format!("{address}: a manifest that fails its hash: {error}"),
                    }
                }
                Ok(Ok(AdminReply::Failed(reason))) => format!("{address}: {reason}"),
                Ok(Ok(other)) => format!("{address}: unexpected answer {other:?}"),
                Ok(Err(error)) => format!("{address}: {error}"),
                Err(_) => {
                    self.admin_connections
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&address);
                    format!(
                        "{address}: no answer within {} s",
                        FORWARD_TIMEOUT.as_secs()
                    )
                }
            };
            reasons.push(reason);
        }
        if reasons.is_empty() {
            reasons.push("no other member".into());
        }
        Err(format!(
            "no member handed over manifest {hash}: {}",
            reasons.join("; ")
        ))
    }

    /// Every other member's part of the boots it took part in, asked at once; a member that
    /// does not answer within [`FORWARD_TIMEOUT`] is reported, not waited for.
    pub async fn boot_timelines_of_other_members(
        &self,
    ) -> Vec<(
        SocketAddr,
        Result<Vec<crate::timeline::NodeTimeline>, String>,
    )> {
        let others = self.other_member_addresses();
        let asks = others.into_iter().map(|address| async move {
            let answer = match tokio::time::timeout(
                FORWARD_TIMEOUT,
                self.forward(address, &AdminRequest::BootTimelines),
            )
            .await
            {
                Ok(Ok(AdminReply::BootTimelines(timelines))) => Ok(timelines),
                Ok(Ok(other)) => Err(format!("unexpected answer: {other:?}")),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => {
                    // Dial afresh next time rather than wait on a dead member's connection.
                    self.admin_connections
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&address);
                    Err(format!("no answer within {} s", FORWARD_TIMEOUT.as_secs()))
                }
            };
            (address, answer)
        });
        futures_util::future::join_all(asks).await
    }

    /// Serves until `shutdown` resolves, then stops Raft and closes the endpoint.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ClusterError> {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().accept_connections());
        tasks.spawn(self.clone().leader_duties());
        tasks.spawn(self.clone().watch_clock());
        shutdown.await;
        tasks.abort_all();
        self.endpoint.close(0u32.into(), b"shutting down");
        self.raft
            .shutdown()
            .await
            .map_err(|error| ClusterError::Raft(error.to_string()))?;
        Ok(())
    }

    async fn accept_connections(self) {
        let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        // Chunk connections (one per fetching node, thousands in a boot storm) have slots of
        // their own, so that they can never crowd out Raft and admin connections.
        let chunk_slots = Arc::new(Semaphore::new(crate::swarm::PEERINGS_MAX));
        while let Some(incoming) = self.endpoint.accept().await {
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(remote = %incoming.remote_address(), "cluster connection refused: too many");
                incoming.refuse();
                continue;
            };
            let member = self.clone();
            let chunk_slots = Arc::clone(&chunk_slots);
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(connection) if protocol(&connection).as_deref() == Some(ALPN_CHUNKS) => {
                        drop(permit);
                        member
                            .serve_chunk_connection(connection, &chunk_slots)
                            .await;
                        return;
                    }
                    Ok(connection) => member.serve_connection(connection).await,
                    Err(error) => {
                        tracing::info!(%remote, %error, "cluster handshake failed");
                    }
                }
                drop(permit);
            });
        }
    }

    /// Whether `server_id` may talk Raft and admin to this member: it is in the membership
    /// this member knows, or this member knows none yet (a joiner waiting for the leader's
    /// first message, holding nothing; the CA vouched for the peer).
    fn accepts_peer(&self, server_id: u64) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let mut nodes = metrics.membership_config.nodes().peekable();
        nodes.peek().is_none() || nodes.any(|(id, _)| *id == server_id)
    }

    async fn serve_chunk_connection(self, connection: Connection, slots: &Arc<Semaphore>) {
        let Ok(_slot) = Arc::clone(slots).try_acquire_owned() else {
            tracing::warn!(remote = %connection.remote_address(), "chunk connection refused: too many");
            connection.close(crate::swarm::CLOSE_BUSY.into(), b"too many peers");
            return;
        };
        match self.swarm.get() {
            Some(swarm) => Arc::clone(swarm).serve_connection(connection).await,
            None => connection.close(crate::swarm::CLOSE_UNKNOWN_IMAGE.into(), b"no swarm here"),
        }
    }

    async fn serve_connection(self, connection: Connection) {
        let remote = connection.remote_address();
        let protocol = protocol(&connection).unwrap_or_default();
        let peer = peer_server_id(&connection);
        let span = tracing::info_span!(
            "cluster connection",
            %remote,
            protocol = %String::from_utf8_lossy(&protocol),
            peer = ?peer
        );
        let _entered = span.enter();
        if protocol == ALPN_JOIN {
            drop(_entered);
            self.serve_streams(connection, Stream::Join).await;
            return;
        }
        match peer {
            Some(server_id) if self.accepts_peer(server_id) => {}
            Some(server_id) => {
                tracing::warn!(server_id, "cluster peer refused: not a member");
                connection.close(1u32.into(), b"not a member");
                return;
            }
            None => {
                tracing::warn!("cluster peer refused: no certificate of this cluster");
                connection.close(1u32.into(), b"certificate required");
                return;
            }
        }
        drop(_entered);
        if protocol == ALPN_RAFT {
            self.serve_streams(connection, Stream::Raft).await;
        } else if protocol == ALPN_ADMIN {
            self.serve_streams(connection, Stream::Admin).await;
        } else {
            connection.close(2u32.into(), b"unknown protocol");
        }
    }

    async fn serve_streams(self, connection: Connection, kind: Stream) {
        let slots = Arc::new(Semaphore::new(STREAMS_PER_CONNECTION_MAX));
        loop {
            let Ok((send, receive)) = connection.accept_bi().await else {
                return;
            };
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let stream = tokio::io::join(receive, send);
            let member = self.clone();
            tokio::spawn(async move {
                match kind {
                    Stream::Raft => serve_stream(member.raft.clone(), stream).await,
                    Stream::Admin => member.serve_request(stream, Self::admin).await,
                    Stream::Join => member.serve_request(stream, Self::join).await,
                }
                drop(permit);
            });
        }
    }

    async fn serve_request<Request, Reply, Handler, Answer>(
        self,
        mut stream: super::transport::QuicStream,
        handler: Handler,
    ) where
        Request: serde::de::DeserializeOwned + std::fmt::Debug,
        Reply: serde::Serialize,
        Handler: FnOnce(Self, Request) -> Answer,
        Answer: Future<Output = Reply>,
    {
        let request: Request = match read_frame(&mut stream).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "cluster request dropped: bad frame");
                return;
            }
        };
        let reply = handler(self, request).await;
        if let Err(error) = write_frame(&mut stream, &reply).await {
            tracing::info!(%error, "cluster reply not delivered");
        }
    }

    fn leader_address(&self) -> Option<SocketAddr> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .and_then(|(_, node)| node.address.parse().ok())
    }

    /// Measures this member's clock against the leader's every [`CLOCK_CHECK_EVERY`]. Address
    /// uniqueness across servers holds only while clocks are within the drift bound (ADR
    /// 0007): a clock certainly beyond it is reported as an error, and in `cluster status`.
    async fn watch_clock(self) {
        let mut interval = tokio::time::interval(CLOCK_CHECK_EVERY);
        let mut beyond = false;
        loop {
            interval.tick().await;
            let leader = self.raft.metrics().borrow().current_leader;
            let Some(address) = self
                .leader_address()
                .filter(|_| leader.is_some_and(|leader| leader != self.record.server_id))
            else {
                continue;
            };
            let sent_ms = now_ms();
            let answer =
                tokio::time::timeout(FORWARD_TIMEOUT, self.forward(address, &AdminRequest::Time))
                    .await;
            let received_ms = now_ms();
            let Ok(Ok(AdminReply::Time { unix_ms })) = answer else {
                continue;
            };
            let reading =
                consensus::clock::ClockReading::from_exchange(sent_ms, unix_ms, received_ms);
            *self
                .clock_to_leader
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(reading);
            let now_beyond = reading.certainly_beyond(consensus::state::DRIFT_BOUND_MS);
            if now_beyond {
                tracing::error!(
                    offset_ms = reading.offset_ms,
                    uncertainty_ms = reading.uncertainty_ms,
                    bound_ms = consensus::state::DRIFT_BOUND_MS,
                    "this server's clock and the leader's are further apart than the drift \
                     bound: it grants and renews no lease until they are within it again; fix \
                     the time service"
                );
            } else if beyond {
                tracing::info!(
                    offset_ms = reading.offset_ms,
                    "this server's clock is within the drift bound of the leader's again"
                );
            }
            beyond = now_beyond;
        }
    }

    /// Whether the last comparison with the leader's clock found this server's certainly
    /// further away than the drift bound (see [`Self::watch_clock`]).
    pub fn clock_beyond_bound(&self) -> bool {
        self.clock_to_leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|reading| reading.certainly_beyond(consensus::state::DRIFT_BOUND_MS))
    }

    /// The ids of every member Raft knows (voters and learners), in order.
    pub fn member_ids(&self) -> Vec<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// Lease changes as the state machine commits them, from now on.
    pub fn subscribe_leases(&self) -> broadcast::Receiver<AppliedLeases> {
        self.applied_leases.subscribe()
    }

    /// Commits `command` through the leader, wherever it is: here, or forwarded over the admin
    /// protocol. Retries while leadership moves, a few times.
    pub async fn propose_anywhere(&self, command: MeshCommand) -> Result<MeshResponse, String> {
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
            let Some(leader) = self.leader_address() else {
                continue;
            };
            let forwarded = tokio::time::timeout(
                FORWARD_TIMEOUT,
                self.forward(leader, &AdminRequest::Propose(command.clone())),
            )
            .await
            .unwrap_or_else(|_| {
                // A leader that died keeps its connection open until the idle timeout: do
                // not wait for that, dial afresh next time.
                self.admin_connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&leader);
                Err(ClusterError::Transport(format!(
                    "the leader at {leader} did not answer within {} s",
                    FORWARD_TIMEOUT.as_secs()
                )))
            });
            match forwarded {
                Ok(AdminReply::Proposed(response)) => return Ok(response),
                Ok(AdminReply::NotLeader { .. }) => last_error = "leadership moved".into(),
                Ok(AdminReply::Failed(error)) => return Err(error),
                Ok(other) => return Err(format!("unexpected answer: {other:?}")),
                Err(error) => last_error = error.to_string(),
            }
        }
        Err(last_error)
    }

    /// Sends an admin request to another member, on a connection kept for the next one.
    async fn forward(
        &self,
        member: SocketAddr,
        request: &AdminRequest,
    ) -> Result<AdminReply, ClusterError> {
        let cached = {
            let connections = self
                .admin_connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            connections
                .get(&member)
                .filter(|connection| connection.close_reason().is_none())
                .cloned()
        };
        let connection = match cached {
            Some(connection) => connection,
            None => {
                let connection = connect(&self.endpoint, self.admin_config.clone(), member).await?;
                self.admin_connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(member, connection.clone());
                connection
            }
        };
        let mut stream = open_stream(&connection).await?;
        write_frame(&mut stream, request)
            .await
            .map_err(|error| ClusterError::Transport(error.to_string()))?;
        match read_frame(&mut stream).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(ClusterError::Transport("closed without an answer".into())),
            Err(error) => Err(ClusterError::Transport(error.to_string())),
        }
    }

    /// Commits `command`; `Err(None)` when this member is not the leader.
    async fn propose(&self, command: MeshCommand) -> Result<MeshResponse, Option<String>> {
        let proposal = Proposal {
            at: now_ms(),
            command,
        };
        match self.raft.client_write(proposal).await {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(None),
            Err(error) => Err(Some(error.to_string())),
        }
    }

    async fn admin(self, request: AdminRequest) -> AdminReply {
        // Forwarded lease batches arrive hundreds of times a second in a boot storm, and
        // status is polled: those are debug; what an operator did is info.
        match &request {
            AdminRequest::Propose(_)
            | AdminRequest::Status
            | AdminRequest::Leases
            | AdminRequest::BootTimelines
            | AdminRequest::Manifest { .. }
            | AdminRequest::Time => {
                tracing::debug!(?request, "admin request");
            }
            _ => tracing::info!(?request, "admin request"),
        }
        match request {
            AdminRequest::Status => AdminReply::Status(self.status()),
            AdminRequest::Time => AdminReply::Time { unix_ms: now_ms() },
            AdminRequest::BootTimelines => AdminReply::BootTimelines(
                self.boots
                    .get()
                    .map(|boots| boots.snapshot())
                    .unwrap_or_default(),
            ),
            AdminRequest::Leases => AdminReply::Leases(self.lease_views()),
            AdminRequest::Manifest { hash } => {
                let Some(store) = self.images.get().cloned() else {
                    return AdminReply::Failed("this server has no image store".into());
                };
                let Ok(hash) = hash.parse::<transfer::ContentHash>() else {
                    return AdminReply::Failed(format!("{hash:?} is not a manifest hash"));
                };
                match tokio::task::spawn_blocking(move || store.manifest_bytes(&hash)).await {
                    Ok(Ok(bytes)) => AdminReply::Manifest(bytes),
                    Ok(Err(error)) => AdminReply::Failed(error.to_string()),
                    Err(error) => AdminReply::Failed(error.to_string()),
                }
            }
            AdminRequest::ConfigShow => {
                let config = self.state.read(|state| state.config.clone());
                AdminReply::Config {
                    version: config.version,
                    document: config.document,
                }
            }
            AdminRequest::ConfigApply {
                expected_version,
                document,
            } => {
                // Checked here too: whatever the CLI's version, nothing unusable is committed.
                if let Err(error) = crate::config::FleetConfig::parse(
                    &document,
                    std::path::Path::new("fleet configuration"),
                ) {
                    return AdminReply::Failed(error.to_string());
                }
                match self
                    .propose(MeshCommand::SetConfig {
                        expected_version,
                        document: document.clone(),
                    })
                    .await
                {
                    Ok(MeshResponse::Applied) => AdminReply::Config {
                        version: expected_version + 1,
                        document,
                    },
                    Ok(MeshResponse::Refused(reason)) => AdminReply::Failed(reason),
                    Ok(other) => AdminReply::Failed(format!("{other:?}")),
                    Err(None) => AdminReply::NotLeader {
                        leader: self.leader_address(),
                    },
                    Err(Some(error)) => AdminReply::Failed(error),
                }
            }
            AdminRequest::Propose(command) => match self.propose(command).await {
                Ok(response) => AdminReply::Proposed(response),
                Err(None) => AdminReply::NotLeader {
                    leader: self.leader_address(),
                },
                Err(Some(error)) => AdminReply::Failed(error),
            },
            AdminRequest::CreateToken { ttl_secs } => {
                let ttl_secs = ttl_secs.clamp(1, TOKEN_TTL_MAX_SECS);
                let token = match JoinToken::generate(self.ca.fingerprint()) {
                    Ok(token) => token,
                    Err(error) => return AdminReply::Failed(error.to_string()),
                };
                let expires_at = now_ms().saturating_add(ttl_secs * 1000);
                match self
                    .propose(MeshCommand::CreateJoinToken {
                        secret_hash: token.secret_hash(),
                        expires_at,
                    })
                    .await
                {
                    Ok(MeshResponse::Applied) => AdminReply::Token {
                        token: token.encode(),
                        expires_at,
                    },
                    Ok(other) => AdminReply::Failed(format!("{other:?}")),
                    Err(None) => AdminReply::NotLeader {
                        leader: self.leader_address(),
                    },
                    Err(Some(error)) => AdminReply::Failed(error),
                }
            }
            AdminRequest::RemoveMember { server_id } => {
                if server_id == self.record.server_id {
                    return AdminReply::Failed(
                        "a leader does not remove itself: ask another member".into(),
                    );
                }
                match self.propose(MeshCommand::RemoveMember(server_id)).await {
                    Ok(_) => {}
                    Err(None) => {
                        return AdminReply::NotLeader {
                            leader: self.leader_address(),
                        };
                    }
                    Err(Some(error)) => return AdminReply::Failed(error),
                }
                let ids = BTreeSet::from([server_id]);
                let voter = {
                    let metrics = self.raft.metrics();
                    let metrics = metrics.borrow();
                    metrics
                        .membership_config
                        .membership()
                        .voter_ids()
                        .any(|id| id == server_id)
                };
                let change = if voter {
                    ChangeMembers::RemoveVoters(ids)
                } else {
                    ChangeMembers::RemoveNodes(ids)
                };
                match self.raft.change_membership(change, false).await {
                    Ok(_) => AdminReply::Removed { server_id },
                    Err(error) => AdminReply::Failed(error.to_string()),
                }
            }
        }
    }

    fn lease_views(&self) -> Vec<LeaseView> {
        self.state.read(|state| {
            state
                .leases
                .iter()
                .map(|(address, lease)| LeaseView {
                    address: *address,
                    hardware_address: lease
                        .hardware_address
                        .iter()
                        .map(|byte| format!("{byte:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                    client: lease
                        .client
                        .iter()
                        .map(|byte| format!("{byte:02x}"))
                        .collect(),
                    expires_at_unix_secs: lease.expires_at_unix_secs,
                    hostname: lease.hostname.clone(),
                })
                .collect()
        })
    }

    /// This member's view of the cluster: role, term, leader, log, members with their racks.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = metrics
            .membership_config
            .nodes()
            .map(|(id, node)| MemberStatus {
                server_id: *id,
                address: node.address.clone(),
                rack: self
                    .state
                    .read(|state| state.members.get(id).map(|member| member.rack.clone())),
                voter: voters.contains(id),
                matched: metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(id).cloned().flatten())
                    .map(|log_id| log_id.index)
                    .or_else(|| {
                        (*id == metrics.id)
                            .then_some(metrics.last_log_index)
                            .flatten()
                    }),
            })
            .collect();
        ClusterStatus {
            server_id: self.record.server_id,
            cluster_name: self.record.cluster_name.clone(),
            role: format!("{:?}", metrics.state),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            last_applied: metrics.last_applied.map(|log_id| log_id.index),
            members,
            clock_offset_to_leader_ms: (metrics.current_leader != Some(self.record.server_id))
                .then(|| {
                    self.clock_to_leader
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .map(|reading| reading.offset_ms)
                })
                .flatten(),
        }
    }

    async fn join(self, request: JoinRequest) -> JoinReply {
        let span = tracing::info_span!("join", address = %request.address, rack = %request.rack);
        let _entered = span.enter();
        let token = match JoinToken::parse(&request.token) {
            Ok(token) => token,
            Err(error) => {
                tracing::warn!(%error, "join refused: malformed token");
                return JoinReply::Refused(format!("malformed token: {error}"));
            }
        };
        if token.ca != self.ca.fingerprint() {
            tracing::warn!("join refused: token of another cluster");
            return JoinReply::Refused("the token is for another cluster".into());
        }
        if request.address.ip().is_unspecified() || request.address.port() == 0 {
            return JoinReply::Refused("the joiner's address must be an IP and a port".into());
        }
        drop(_entered);
        // Ids come from the recorded members: this member's own record must be in before a
        // joiner gets the next id (a founder that just started may not have written it yet).
        if let Err(reply) = self.record_self().await {
            return reply;
        }
        let member = Member {
            id: 0,
            address: request.address.to_string(),
            rack: request.rack.clone(),
        };
        let server_id = match self
            .propose(MeshCommand::RedeemJoinToken {
                secret_hash: token.secret_hash(),
                member,
            })
            .await
        {
            Ok(MeshResponse::Joined { server_id }) => server_id,
            Ok(MeshResponse::Refused(reason)) => {
                tracing::warn!(%reason, "join refused");
                return JoinReply::Refused(reason);
            }
            Ok(other) => return JoinReply::Refused(format!("{other:?}")),
            Err(None) => {
                return JoinReply::NotLeader {
                    leader: self.leader_address(),
                };
            }
            Err(Some(error)) => return JoinReply::Refused(error),
        };
        let certificate = match self
            .ca
            .issue_server_certificate(server_id, &request.subject_public_key_info)
        {
            Ok(certificate) => certificate,
            Err(error) => return JoinReply::Refused(format!("certificate: {error}")),
        };
        let node = ServerNode {
            address: request.address.to_string(),
        };
        if let Err(error) = self.raft.add_learner(server_id, node, false).await {
            return JoinReply::Refused(format!("adding the learner: {error}"));
        }
        tracing::info!(server_id, address = %request.address, "server joined as a learner");
        JoinReply::Admitted {
            server_id,
            cluster_name: self.record.cluster_name.clone(),
            certificate: certificate.to_vec(),
            ca_key_pem: self.ca.key_pem(),
        }
    }

    /// Makes sure the cluster state has this member's own record (address, rack).
    async fn record_self(&self) -> Result<(), JoinReply> {
        let own = Member {
            id: self.record.server_id,
            address: self.record.address.to_string(),
            rack: self.record.rack.clone(),
        };
        if self
            .state
            .read(|state| state.members.get(&own.id) == Some(&own))
        {
            return Ok(());
        }
        match self.propose(MeshCommand::UpsertMember(own)).await {
            Ok(_) => Ok(()),
            Err(None) => Err(JoinReply::NotLeader {
                leader: self.leader_address(),
            }),
            Err(Some(error)) => Err(JoinReply::Refused(error)),
        }
    }

    /// On the leader: records the founder's own member entry, and promotes learners that are
    /// members of the cluster state and have caught up.
    async fn leader_duties(self) {
        let mut interval = tokio::time::interval(DUTY_INTERVAL);
        loop {
            interval.tick().await;
            let metrics = self.raft.metrics().borrow().clone();
            if metrics.current_leader != Some(self.record.server_id) {
                continue;
            }
            let own = Member {
                id: self.record.server_id,
                address: self.record.address.to_string(),
                rack: self.record.rack.clone(),
            };
            let recorded = self
                .state
                .read(|state| state.members.get(&own.id) == Some(&own));
            if !recorded
                && let Err(Some(error)) = self.propose(MeshCommand::UpsertMember(own)).await
            {
                tracing::warn!(%error, "could not record this server as a member");
            }
            let last = metrics.last_log_index.unwrap_or(0);
            let learners: Vec<u64> = metrics
                .membership_config
                .membership()
                .learner_ids()
                .collect();
            for learner in learners {
                let known = self
                    .state
                    .read(|state| state.members.contains_key(&learner));
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(&learner).cloned().flatten())
                    .map(|log_id| log_id.index);
                let caught_up = matched.is_some_and(|matched| matched + PROMOTION_LAG_MAX >= last);
                if known && caught_up {
                    match self
                        .raft
                        .change_membership(
                            ChangeMembers::AddVoterIds(BTreeSet::from([learner])),
                            false,
                        )
                        .await
                    {
                        Ok(_) => tracing::info!(server_id = learner, "learner promoted to voter"),
                        Err(error) => {
                            tracing::warn!(server_id = learner, %error, "promotion failed")
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Raft,
    Admin,
    Join,
}
