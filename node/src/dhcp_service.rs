//! The DHCP wiring: links feed a bounded queue, the core handles each datagram, lease proposals
//! are made durable in batches through a [`LeaseStore`] (the local journal, or the cluster's
//! Raft log), and only then do ACKs leave. Generic over its seams, so `serve` and the simulator
//! run this same code.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::VecDeque;

use boot_services::dhcp::{
    AddressRange, Datagram, DhcpConfig, DhcpServer, LeaseChange, LeaseProposal, LeaseTable,
    ProposalId, Rendezvous,
};
use tokio::sync::mpsc;

use crate::journal::{JournalError, LeaseJournal};
use crate::seams::{Clock, DhcpLink, ReceivedDatagram};

/// Largest DHCP datagram accepted; bigger ones are truncated by the kernel and then refused by
/// the decoder.
const DATAGRAM_BYTES_MAX: usize = 1500;
/// Datagrams handled between two journal flushes: bounds the ACK latency that batching adds.
const DATAGRAMS_PER_BATCH_MAX: usize = 256;

/// Counters for status and tests.
#[derive(Debug, Default)]
pub struct DhcpCounters {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Datagrams dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Datagrams that got no answer (malformed, not ours, ...).
    pub dropped_by_core: AtomicU64,
    /// Replies sent.
    pub sent: AtomicU64,
    /// Lease changes committed.
    pub committed: AtomicU64,
    /// Replies sent, by type: OFFER, ACK, NAK, anything else (proxyDHCP, INFORM answers).
    pub sent_by_type: [AtomicU64; 4],
    /// Where ACKs of new bindings are recorded as the first stage of a node's boot.
    pub boots: Option<Arc<crate::boots::BootRecorder>>,
}

impl DhcpCounters {
    /// The reply types `sent_by_type` counts, in its order.
    pub const REPLY_TYPES: [&'static str; 4] = ["offer", "ack", "nak", "other"];

    fn count_sent(&self, message_type: dhcproto::v4::MessageType) {
        let index = match message_type {
            dhcproto::v4::MessageType::Offer => 0,
            dhcproto::v4::MessageType::Ack => 1,
            dhcproto::v4::MessageType::Nak => 2,
            _ => 3,
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.sent_by_type[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the DHCP service stopped.
#[derive(Debug, thiserror::Error)]
pub enum DhcpServiceError {
    /// The journal failed: we cannot promise durability, so we stop rather than answer.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The lease store is gone (the cluster member stopped).
    #[error("lease store: {0}")]
    Store(String),
}

/// What became of submitted lease proposals, or what another server committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Durable: release their replies.
    Committed(Vec<ProposalId>),
    /// Durable with an earlier expiry than proposed (Unix seconds): reply with the shorter
    /// lease.
    CommittedUntil(ProposalId, u64),
    /// Refused by the replicated state (another client holds the address): no reply; the
    /// client starts over.
    Refused(ProposalId, String),
    /// Not committed now (no leader, a timeout): no reply; the client retries.
    Failed(Vec<ProposalId>, String),
    /// A change another server committed: the lease table learns of it.
    Remote(LeaseChange),
    /// Reload every lease from the store (the event stream lost events).
    Resync(Vec<LeaseChange>),
    /// The addresses this server may give new clients changed (its blocks, in a cluster).
    Allocatable(Option<Vec<AddressRange>>),
    /// The servers of the segment changed: this server's rank order.
    Rendezvous(Option<Rendezvous>),
    /// The fleet configuration changed: subnets, hosts, boot files.
    Reconfigure(Box<DhcpConfig>),
}

/// Where lease changes become durable before an ACK leaves.
pub trait LeaseStore: Send + 'static {
    /// The changes recorded so far, oldest first, restored into the core at start.
    fn load(&mut self) -> Result<Vec<LeaseChange>, DhcpServiceError>;
    /// Hands over a batch of proposals. `Err` is fatal: durability cannot be promised.
    fn submit(
        &mut self,
        proposals: Vec<LeaseProposal>,
        table: &LeaseTable,
    ) -> Result<(), DhcpServiceError>;
    /// An event that is ready now, if any.
    fn try_event(&mut self) -> Option<LeaseEvent>;
    /// Waits for the next event; `None` when no more will come.
    fn next_event(&mut self) -> impl Future<Output = Option<LeaseEvent>> + Send;
    /// Why this server must not answer DHCP at all now, if it must not: its answers would be
    /// wrong (a cluster member whose clock is beyond the drift bound), and the client is
    /// better served by another server than by an OFFER nobody will ACK.
    fn silenced(&self) -> Option<&'static str> {
        None
    }
}

/// A [`LeaseJournal`] as a [`LeaseStore`]: a batch is durable when `append` returns.
#[derive(Debug)]
pub struct JournalStore<J> {
    journal: J,
    ready: VecDeque<LeaseEvent>,
}

impl<J: LeaseJournal> JournalStore<J> {
    /// Wraps `journal`.
    pub fn new(journal: J) -> Self {
        Self {
            journal,
            ready: VecDeque::new(),
        }
    }
}

impl<J: LeaseJournal> LeaseStore for JournalStore<J> {
    fn load(&mut self) -> Result<Vec<LeaseChange>, DhcpServiceError> {
        Ok(self.journal.load()?)
    }

    fn submit(
        &mut self,
        proposals: Vec<LeaseProposal>,
        table: &LeaseTable,
    ) -> Result<(), DhcpServiceError> {
        let changes: Vec<LeaseChange> = proposals
            .iter()
            .map(|proposal| proposal.change.clone())
            .collect();
        let ids = proposals.iter().map(|proposal| proposal.id).collect();
        if let Err(error) = self.journal.append(&changes) {
            tracing::error!(%error, "lease journal append failed; stopping DHCP rather than ACK without durability");
            return Err(error.into());
        }
        self.ready.push_back(LeaseEvent::Committed(ids));
        // The table does not hold this batch yet: it is applied when the ACKs are released.
        if self
            .journal
            .needs_compaction(table.binding_count() + changes.len())
        {
            let mut live = table.snapshot();
            live.extend(changes);
            self.journal.compact(&live)?;
        }
        Ok(())
    }

    fn try_event(&mut self) -> Option<LeaseEvent> {
        self.ready.pop_front()
    }

    async fn next_event(&mut self) -> Option<LeaseEvent> {
        match self.ready.pop_front() {
            Some(event) => Some(event),
            // Every event of a journal is ready at once; none will come later.
            None => std::future::pending().await,
        }
    }
}

struct Received {
    link_index: usize,
    bytes: Vec<u8>,
    meta: ReceivedDatagram,
}

/// Replays the journal into `server`, then serves until `shutdown` resolves.
pub async fn run_dhcp<L, J, C>(
    server: DhcpServer,
    links: Vec<Arc<L>>,
    journal: J,
    clock: C,
    receive_queue_max: usize,
    counters: Arc<DhcpCounters>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DhcpServiceError>
where
    L: DhcpLink,
    J: LeaseJournal,
    C: Clock,
{
    run_dhcp_with_store(
        server,
        links,
        JournalStore::new(journal),
        clock,
        receive_queue_max,
        counters,
        shutdown,
    )
    .await
}

/// Restores the leases of `store` into `server`, then serves until `shutdown` resolves.
pub async fn run_dhcp_with_store<L, S, C>(
    mut server: DhcpServer,
    links: Vec<Arc<L>>,
    mut store: S,
    clock: C,
    receive_queue_max: usize,
    counters: Arc<DhcpCounters>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DhcpServiceError>
where
    L: DhcpLink,
    S: LeaseStore,
    C: Clock,
{
    let restored = store.load()?;
    for change in &restored {
        server.restore(change);
    }
    tracing::info!(
        records = restored.len(),
        bindings = server.lease_table().binding_count(),
        "lease journal replayed"
    );

    let (sender, mut receiver) = mpsc::channel::<Received>(receive_queue_max.max(1));
    let mut readers = tokio::task::JoinSet::new();
    for (link_index, link) in links.iter().enumerate() {
        let link = Arc::clone(link);
        let sender = sender.clone();
        let counters = Arc::clone(&counters);
        readers.spawn(async move { read_link(link_index, link, sender, counters).await });
    }
    drop(sender);

    tokio::pin!(shutdown);
    let mut batch = Vec::with_capacity(DATAGRAMS_PER_BATCH_MAX);
    let mut silenced = false;
    loop {
        // Offers held back by the rendezvous stagger are due then.
        let offer_delay = server.poll_timeout().map(|due| {
            due.duration_since(clock.wall_now())
                .unwrap_or(std::time::Duration::ZERO)
        });
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = sleep_for(offer_delay) => {
                server.handle_timeout(clock.wall_now());
            }
            event = store.next_event() => {
                let Some(event) = event else {
                    return Err(DhcpServiceError::Store("the lease store closed".into()));
                };
                handle_lease_event(&mut server, event, &clock, &counters);
            }
            received = receiver.recv() => {
                let Some(received) = received else { break };
                batch.push(received);
            }
        }
        while batch.len() < DATAGRAMS_PER_BATCH_MAX {
            match receiver.try_recv() {
                Ok(received) => batch.push(received),
                Err(_) => break,
            }
        }
        match store.silenced() {
            Some(reason) => {
                if !silenced {
                    tracing::error!(reason, "answering no DHCP: other servers answer");
                    silenced = true;
                }
                counters.dropped_by_core.fetch_add(
                    u64::try_from(batch.len()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                batch.clear();
            }
            None if silenced => {
                tracing::info!("answering DHCP again");
                silenced = false;
            }
            None => {}
        }
        let now = clock.wall_now();
        for received in batch.drain(..) {
            let meta = received.meta;
            let datagram = Datagram {
                bytes: &received.bytes,
                source: meta.source,
                local_address: meta.local_address,
                local_port: meta.local_port,
                interface_index: meta.interface_index,
            };
            let span = tracing::debug_span!("dhcp_request", source = %meta.source, link = received.link_index);
            let _entered = span.enter();
            if let Err(reason) = server.handle_datagram(now, datagram) {
                counters.dropped_by_core.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%reason, "dhcp datagram dropped");
            }
        }
        submit_proposals(&mut server, &mut store)?;
        while let Some(event) = store.try_event() {
            handle_lease_event(&mut server, event, &clock, &counters);
        }
        while let Some(transmit) = server.poll_transmit() {
            let span = tracing::debug_span!("dhcp_reply", xid = format_args!("{:#010x}", transmit.xid), kind = ?transmit.message_type);
            let _entered = span.enter();
            let link = links
                .iter()
                .find(|link| link.interface_index() == transmit.interface_index)
                .or_else(|| links.first());
            let Some(link) = link else { continue };
            match link.send(&transmit).await {
                Ok(()) => {
                    counters.count_sent(transmit.message_type);
                    tracing::debug!(destination = ?transmit.destination, "sent");
                    if let Some(boots) = &counters.boots {
                        record_new_binding(boots, clock.wall_now(), &transmit);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, destination = ?transmit.destination, "dhcp send failed")
                }
            }
        }
    }
    readers.abort_all();
    Ok(())
}

/// Records an ACK that binds a client anew (the firmware's, iPXE's or the agent's exchange;
/// not a renewal) as a boot stage. Read from the reply's fixed header, not decoded: this runs
/// once per ACK on the reply path.
fn record_new_binding(
    boots: &crate::boots::BootRecorder,
    now: std::time::SystemTime,
    transmit: &boot_services::dhcp::Transmit,
) {
    if transmit.message_type != dhcproto::v4::MessageType::Ack {
        return;
    }
    if let Some((mac, address)) = crate::timeline::new_binding_of_ack(&transmit.bytes) {
        boots.observe(now, &mac, crate::timeline::Observation::DhcpAck { address });
    }
}

/// Sleeps for `delay`, or forever when there is none.
async fn sleep_for(delay: Option<std::time::Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

/// Hands every pending proposal to the store as one batch.
fn submit_proposals<S: LeaseStore>(
    server: &mut DhcpServer,
    store: &mut S,
) -> Result<(), DhcpServiceError> {
    let mut proposals = Vec::new();
    while let Some(proposal) = server.poll_lease_proposal() {
        proposals.push(proposal);
    }
    if proposals.is_empty() {
        return Ok(());
    }
    let ids: Vec<ProposalId> = proposals.iter().map(|proposal| proposal.id).collect();
    if let Err(error) = store.submit(proposals, server.lease_table()) {
        for id in ids {
            server.handle_lease_commit_failed(id);
        }
        return Err(error);
    }
    Ok(())
}

fn handle_lease_event<C: Clock>(
    server: &mut DhcpServer,
    event: LeaseEvent,
    clock: &C,
    counters: &DhcpCounters,
) {
    match event {
        LeaseEvent::Committed(ids) => {
            let now = clock.wall_now();
            counters
                .committed
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            for id in ids {
                server.handle_lease_committed(now, id);
            }
        }
        LeaseEvent::CommittedUntil(id, expires_at_unix_secs) => {
            counters.committed.fetch_add(1, Ordering::Relaxed);
            server.handle_lease_committed_until(clock.wall_now(), id, expires_at_unix_secs);
        }
        LeaseEvent::Refused(id, reason) => {
            tracing::info!(%reason, "lease refused by the cluster; no ACK");
            server.handle_lease_commit_failed(id);
        }
        LeaseEvent::Failed(ids, reason) => {
            tracing::warn!(%reason, proposals = ids.len(), "leases not committed; no ACK, clients retry");
            for id in ids {
                server.handle_lease_commit_failed(id);
            }
        }
        LeaseEvent::Remote(change) => server.restore(&change),
        LeaseEvent::Resync(changes) => {
            for change in &changes {
                server.restore(change);
            }
        }
        LeaseEvent::Allocatable(ranges) => {
            tracing::info!(?ranges, "addresses for new clients");
            server.set_allocatable(ranges);
        }
        LeaseEvent::Reconfigure(config) => match server.reconfigure(*config) {
            Ok(()) => tracing::info!("dhcp reconfigured"),
            Err(error) => {
                tracing::error!(%error, "dhcp configuration refused; keeping the previous one")
            }
        },
        LeaseEvent::Rendezvous(rendezvous) => {
            tracing::info!(?rendezvous, "dhcp rank order");
            server.set_rendezvous(rendezvous);
        }
    }
}

async fn read_link<L: DhcpLink>(
    link_index: usize,
    link: Arc<L>,
    sender: mpsc::Sender<Received>,
    counters: Arc<DhcpCounters>,
) {
    let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        match link.receive(&mut buffer).await {
            Ok(meta) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                let bytes = buffer.get(..meta.length_bytes).unwrap_or_default().to_vec();
                if sender
                    .try_send(Received {
                        link_index,
                        bytes,
                        meta,
                    })
                    .is_err()
                {
                    if sender.is_closed() {
                        return;
                    }
                    counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => {
                tracing::warn!(%error, link = link_index, "dhcp receive failed");
                // Avoid a hot loop on a persistent error (interface gone).
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
