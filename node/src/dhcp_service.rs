//! The DHCP wiring: links feed a bounded queue, the core handles each datagram, lease proposals
//! are made durable in batches through a [`LeaseStore`] (the local journal, or the cluster's
//! Raft log), and only then do ACKs leave. Generic over its seams, so `serve` and the simulator
//! run this same code.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::VecDeque;

use boot_services::dhcp::{
    AddressRange, Datagram, DhcpConfig, DhcpDrop, DhcpServer, LeaseChange, LeaseProposal,
    LeaseTable, ProposalId, Rendezvous,
};
use tokio::sync::mpsc;

use crate::journal::{JournalError, LeaseJournal};
use crate::seams::{Clock, DhcpLink, ReceivedDatagram};

/// Largest DHCP datagram accepted; bigger ones are truncated by the kernel and then refused by
/// the decoder.
const DATAGRAM_BYTES_MAX: usize = 1500;
/// Datagrams handled between two journal flushes: bounds the ACK latency that batching adds.
const DATAGRAMS_PER_BATCH_MAX: usize = 256;
/// How often the core's address demand goes to the lease store (besides at once when a
/// DISCOVER starts waiting for addresses).
const DEMAND_REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Counters for status and tests.
#[derive(Debug, Default)]
pub struct DhcpCounters {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Datagrams dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Datagrams that got no answer (malformed, not ours, ...).
    pub dropped_by_core: AtomicU64,
    /// The same, by the core's reason ([`DhcpDrop::KINDS`]); a DISCOVER kept for the next
    /// address block is counted here (as `awaiting_addresses`) but not above.
    pub dropped_by_reason: [AtomicU64; DhcpDrop::KINDS.len()],
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
    /// Per subnet, the addresses the DHCP core has promised or is asked for beyond the bound
    /// ones ([`DhcpServer::addresses_in_demand`]): a store that hands out addresses in blocks
    /// takes the next ones before its free count, which trails by a commit, runs out.
    fn address_demand(&mut self, _per_subnet: &[u32]) {}
    /// Whether [`LeaseStore::address_demand`] is of any use to this store (counting the demand
    /// walks the offers and pending commits).
    fn wants_address_demand(&self) -> bool {
        false
    }
    /// Why the store stopped, once `next_event` has said it will give no more.
    fn closed(&mut self) -> DhcpServiceError {
        DhcpServiceError::Store("the lease store closed".into())
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

/// Lease batches that may wait for the journal's writer; beyond them proposals fail at once
/// (no ACK, the client retries) instead of queueing without bound behind a stalled disk.
const JOURNAL_BATCHES_WAITING_MAX: usize = 1024;

/// A [`LeaseJournal`] on a thread of its own, as a [`LeaseStore`]: group commit off the DHCP
/// loop. A batch is handed over and the loop goes on at once, so a slow fsync holds back only
/// the ACKs that wait for it: OFFERs (never journaled), NAKs and the next datagrams keep
/// flowing, and every batch that arrives during one fsync is written with the next one. The
/// ACKs of a batch still leave only once its records are on disk.
///
/// The writer keeps its own copy of the bindings the journal describes, so it compacts on its
/// own, between two appends, with no batch of the loop's half in and half out (the loop's
/// table lags it by the batches in flight). That copy costs the memory of a second lease
/// table.
///
/// This is what `serve` runs on one server. The simulator keeps [`JournalStore`]: a thread
/// outside its virtual time would make its runs unrepeatable.
#[derive(Debug)]
pub struct GroupCommitStore<J> {
    /// Until `load`: then the writer thread has it.
    journal: Option<J>,
    to_writer: Option<std::sync::mpsc::SyncSender<JournalBatch>>,
    from_writer: Option<mpsc::Receiver<JournalOutcome>>,
    ready: VecDeque<LeaseEvent>,
    /// Why the writer stopped, once it has.
    failed: Option<JournalError>,
}

#[derive(Debug)]
struct JournalBatch {
    ids: Vec<ProposalId>,
    changes: Vec<LeaseChange>,
}

#[derive(Debug)]
enum JournalOutcome {
    /// Durable: these proposals.
    Committed(Vec<ProposalId>),
    /// The journal failed; nothing after this is durable.
    Failed(JournalError),
}

impl<J: LeaseJournal> GroupCommitStore<J> {
    /// Wraps `journal`; its writer starts once it is loaded.
    pub fn new(journal: J) -> Self {
        Self {
            journal: Some(journal),
            to_writer: None,
            from_writer: None,
            ready: VecDeque::new(),
            failed: None,
        }
    }

    fn take_outcome(&mut self, outcome: JournalOutcome) -> Option<LeaseEvent> {
        match outcome {
            JournalOutcome::Committed(ids) => Some(LeaseEvent::Committed(ids)),
            JournalOutcome::Failed(error) => {
                tracing::error!(%error, "lease journal append failed; stopping DHCP rather than ACK without durability");
                self.failed = Some(error);
                None
            }
        }
    }
}

impl<J: LeaseJournal> LeaseStore for GroupCommitStore<J> {
    fn load(&mut self) -> Result<Vec<LeaseChange>, DhcpServiceError> {
        let Some(mut journal) = self.journal.take() else {
            return Err(DhcpServiceError::Store(
                "the lease journal was loaded already".into(),
            ));
        };
        let changes = journal.load()?;
        let mut bindings = LeaseTable::default();
        for change in &changes {
            bindings.apply(change);
        }
        let (to_writer, batches) = std::sync::mpsc::sync_channel(JOURNAL_BATCHES_WAITING_MAX);
        let (outcomes, from_writer) = mpsc::channel(JOURNAL_BATCHES_WAITING_MAX);
        std::thread::Builder::new()
            .name("lease-journal".into())
            .spawn(move || write_batches(journal, bindings, &batches, &outcomes))
            .map_err(|error| {
                DhcpServiceError::Store(format!("start the lease journal's writer: {error}"))
            })?;
        self.to_writer = Some(to_writer);
        self.from_writer = Some(from_writer);
        Ok(changes)
    }

    fn submit(
        &mut self,
        proposals: Vec<LeaseProposal>,
        _table: &LeaseTable,
    ) -> Result<(), DhcpServiceError> {
        if let Some(error) = self.failed.take() {
            return Err(error.into());
        }
        let Some(to_writer) = &self.to_writer else {
            return Err(DhcpServiceError::Store(
                "the lease journal is not loaded".into(),
            ));
        };
        let ids: Vec<ProposalId> = proposals.iter().map(|proposal| proposal.id).collect();
        let changes: Vec<LeaseChange> = proposals
            .into_iter()
            .map(|proposal| proposal.change)
            .collect();
        match to_writer.try_send(JournalBatch { ids, changes }) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(batch)) => {
                self.ready.push_back(LeaseEvent::Failed(
                    batch.ids,
                    "the lease journal is behind by too many batches".into(),
                ));
                Ok(())
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(DhcpServiceError::Store(
                "the lease journal's writer stopped".into(),
            )),
        }
    }

    fn try_event(&mut self) -> Option<LeaseEvent> {
        if let Some(event) = self.ready.pop_front() {
            return Some(event);
        }
        let outcome = self.from_writer.as_mut()?.try_recv().ok()?;
        self.take_outcome(outcome)
    }

    async fn next_event(&mut self) -> Option<LeaseEvent> {
        if let Some(event) = self.ready.pop_front() {
            return Some(event);
        }
        if self.failed.is_some() {
            return None;
        }
        let Some(from_writer) = self.from_writer.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = from_writer.recv().await?;
        self.take_outcome(outcome)
    }

    fn closed(&mut self) -> DhcpServiceError {
        match self.failed.take() {
            Some(error) => error.into(),
            None => DhcpServiceError::Store("the lease journal's writer stopped".into()),
        }
    }
}

/// The writer thread: takes every batch waiting, appends them with one fsync, reports them
/// committed, and compacts the journal when its history has outgrown `bindings`.
fn write_batches<J: LeaseJournal>(
    mut journal: J,
    mut bindings: LeaseTable,
    batches: &std::sync::mpsc::Receiver<JournalBatch>,
    outcomes: &mpsc::Sender<JournalOutcome>,
) {
    while let Ok(first) = batches.recv() {
        let mut group = vec![first];
        while let Ok(next) = batches.try_recv() {
            group.push(next);
        }
        let changes: Vec<LeaseChange> = group
            .iter()
            .flat_map(|batch| batch.changes.iter().cloned())
            .collect();
        let outcome = match journal.append(&changes) {
            Ok(()) => {
                for change in &changes {
                    bindings.apply(change);
                }
                JournalOutcome::Committed(group.into_iter().flat_map(|batch| batch.ids).collect())
            }
            Err(error) => JournalOutcome::Failed(error),
        };
        let failed = matches!(outcome, JournalOutcome::Failed(_));
        if outcomes.blocking_send(outcome).is_err() || failed {
            return;
        }
        // After the ACKs are on their way: a compaction delays only the next batch.
        if journal.needs_compaction(bindings.binding_count())
            && let Err(error) = journal.compact(&bindings.snapshot())
        {
            let _closed = outcomes.blocking_send(JournalOutcome::Failed(error));
            return;
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
    let mut demand_reported: Option<std::time::SystemTime> = None;
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
                    return Err(store.closed());
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
        let awaiting_before = server.awaiting_addresses_count();
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
            match server.handle_datagram(now, datagram) {
                Ok(()) => {}
                // Kept, not dropped: it is answered when this server's next block arrives.
                Err(reason @ DhcpDrop::AwaitingAddresses(_)) => {
                    counters.dropped_by_reason[reason.kind_index()].fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%reason, "dhcp discover waits");
                }
                Err(reason) => {
                    counters.dropped_by_core.fetch_add(1, Ordering::Relaxed);
                    counters.dropped_by_reason[reason.kind_index()].fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%reason, "dhcp datagram dropped");
                }
            }
        }
        submit_proposals(&mut server, &mut store)?;
        // At once when a DISCOVER starts waiting for addresses, else now and then: counting
        // walks the offers and pending commits.
        let waiting_started = awaiting_before == 0 && server.awaiting_addresses_count() > 0;
        if store.wants_address_demand()
            && (waiting_started
                || demand_reported.is_none_or(|reported| {
                    // A clock stepped back counts as due.
                    now.duration_since(reported)
                        .map_or(true, |since| since >= DEMAND_REPORT_EVERY)
                }))
        {
            demand_reported = Some(now);
            store.address_demand(&server.addresses_in_demand(now));
        }
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
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let unanswered: Vec<String> = DhcpDrop::KINDS
        .iter()
        .zip(&counters.dropped_by_reason)
        .filter(|(_, count)| load(count) > 0)
        .map(|(kind, count)| format!("{kind}={}", load(count)))
        .collect();
    tracing::info!(
        received = load(&counters.received),
        queue_full = load(&counters.dropped_queue_full),
        sent = load(&counters.sent),
        committed = load(&counters.committed),
        unanswered = unanswered.join(" "),
        "dhcp service stopped"
    );
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
            let blocks = ranges.as_ref().map(Vec::len);
            let addresses: Option<u64> = ranges.as_ref().map(|ranges| {
                ranges
                    .iter()
                    .map(|range| u64::from(u32::from(range.last) - u32::from(range.first)) + 1)
                    .sum()
            });
            tracing::info!(?blocks, ?addresses, "addresses for new clients");
            tracing::debug!(?ranges, "addresses for new clients");
            server.set_allocatable(clock.wall_now(), ranges);
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

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "the tests drive the service as `serve` does, on a task of its own"
)]
mod tests {
    use std::io;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::sync::Mutex;
    use std::time::Duration;

    use boot_services::dhcp::{DhcpConfig, Ipv4Network, SubnetConfig, Transmit};
    use dhcproto::v4::{DhcpOption, Message, MessageType};
    use dhcproto::{Decodable, Decoder, Encodable, Encoder};

    use super::*;
    use crate::seams::SystemClock;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    /// A link the test feeds and whose replies it reads.
    struct ChannelLink {
        inbound: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
        outbound: mpsc::UnboundedSender<Transmit>,
    }

    impl DhcpLink for ChannelLink {
        async fn receive(&self, buffer: &mut [u8]) -> io::Result<ReceivedDatagram> {
            let bytes = self.inbound.lock().await.recv().await;
            let bytes = bytes.ok_or_else(|| io::Error::other("the test is over"))?;
            buffer[..bytes.len()].copy_from_slice(&bytes);
            Ok(ReceivedDatagram {
                length_bytes: bytes.len(),
                source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                local_address: SERVER,
                local_port: 67,
                interface_index: 1,
            })
        }

        async fn send(&self, transmit: &Transmit) -> io::Result<()> {
            self.outbound
                .send(transmit.clone())
                .map_err(|_| io::Error::other("the test is over"))
        }

        fn interface_index(&self) -> u32 {
            1
        }
    }

    /// A journal whose every append tells the test how many records it holds and then waits
    /// until the test lets it return: an fsync that takes as long as the test wants.
    struct StallingJournal {
        appended: mpsc::UnboundedSender<usize>,
        release: std::sync::mpsc::Receiver<()>,
        records: Arc<Mutex<Vec<LeaseChange>>>,
    }

    impl LeaseJournal for StallingJournal {
        fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError> {
            Ok(Vec::new())
        }
        fn append(&mut self, changes: &[LeaseChange]) -> Result<(), JournalError> {
            let _test_over = self.appended.send(changes.len());
            let _test_over = self.release.recv();
            self.records.lock().unwrap().extend_from_slice(changes);
            Ok(())
        }
        fn needs_compaction(&self, _live_bindings: usize) -> bool {
            false
        }
        fn compact(&mut self, _live: &[LeaseChange]) -> Result<(), JournalError> {
            Ok(())
        }
    }

    fn config() -> DhcpConfig {
        DhcpConfig {
            subnets: vec![SubnetConfig {
                network: Ipv4Network {
                    address: Ipv4Addr::new(10, 0, 0, 0),
                    prefix_length: 24,
                },
                ranges: vec![AddressRange {
                    first: Ipv4Addr::new(10, 0, 0, 100),
                    last: Ipv4Addr::new(10, 0, 0, 199),
                }],
                routers: vec![SERVER],
                dns_servers: vec![],
                domain_name: None,
                lease_time: Duration::from_secs(3600),
                next_server: None,
            }],
            ..DhcpConfig::default()
        }
    }

    fn message(kind: MessageType, client: u8, xid: u32, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let hardware = [0x52, 0x54, 0, 0, 0, client];
        let unspecified = Ipv4Addr::UNSPECIFIED;
        let mut message = Message::new_with_id(
            xid,
            unspecified,
            unspecified,
            unspecified,
            unspecified,
            &hardware,
        );
        message.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(address) = requested {
            message
                .opts_mut()
                .insert(DhcpOption::RequestedIpAddress(address));
            message
                .opts_mut()
                .insert(DhcpOption::ServerIdentifier(SERVER));
        }
        let mut bytes = Vec::new();
        message.encode(&mut Encoder::new(&mut bytes)).unwrap();
        bytes
    }

    async fn reply(
        outbound: &mut mpsc::UnboundedReceiver<Transmit>,
    ) -> (MessageType, u32, Ipv4Addr) {
        let transmit = outbound.recv().await.unwrap();
        let message = Message::decode(&mut Decoder::new(&transmit.bytes)).unwrap();
        (transmit.message_type, transmit.xid, message.yiaddr())
    }

    #[tokio::test]
    async fn offers_keep_flowing_while_the_journal_syncs_and_requests_that_wait_share_one_append() {
        let (inbound, inbound_receiver) = mpsc::channel(64);
        let (outbound_sender, mut outbound) = mpsc::unbounded_channel();
        let link = Arc::new(ChannelLink {
            inbound: tokio::sync::Mutex::new(inbound_receiver),
            outbound: outbound_sender,
        });
        let (appended_sender, mut appended) = mpsc::unbounded_channel();
        let (release, release_receiver) = std::sync::mpsc::channel();
        let records = Arc::new(Mutex::new(Vec::new()));
        let journal = StallingJournal {
            appended: appended_sender,
            release: release_receiver,
            records: Arc::clone(&records),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = tokio::spawn(run_dhcp_with_store(
            DhcpServer::new(config()).unwrap(),
            vec![link],
            GroupCommitStore::new(journal),
            SystemClock,
            64,
            Arc::new(DhcpCounters::default()),
            async {
                let _ = stopped.await;
            },
        ));

        // Client 1 is offered an address and asks for it: the journal starts its sync.
        inbound
            .send(message(MessageType::Discover, 1, 1, None))
            .await
            .unwrap();
        let (kind, xid, first) = reply(&mut outbound).await;
        assert_eq!((kind, xid), (MessageType::Offer, 1));
        inbound
            .send(message(MessageType::Request, 1, 2, Some(first)))
            .await
            .unwrap();
        assert_eq!(appended.recv().await, Some(1));

        // While it syncs, clients 2 and 3 are offered addresses and ask for them, and client
        // 4 is offered one after them: the loop has handled both requests by then.
        let mut offered = Vec::new();
        for (client, xid) in [(2, 3), (3, 5)] {
            inbound
                .send(message(MessageType::Discover, client, xid, None))
                .await
                .unwrap();
            let (kind, answered, address) = reply(&mut outbound).await;
            assert_eq!((kind, answered), (MessageType::Offer, xid));
            inbound
                .send(message(
                    MessageType::Request,
                    client,
                    xid + 1,
                    Some(address),
                ))
                .await
                .unwrap();
            offered.push(address);
        }
        inbound
            .send(message(MessageType::Discover, 4, 7, None))
            .await
            .unwrap();
        assert_eq!(reply(&mut outbound).await.1, 7);
        // No ACK can have left: none of the requests is on disk yet.
        assert!(outbound.try_recv().is_err());
        assert!(records.lock().unwrap().is_empty());

        // The first sync returns: client 1's ACK. Both requests that waited go in the next
        // append, together.
        release.send(()).unwrap();
        assert_eq!(reply(&mut outbound).await, (MessageType::Ack, 2, first));
        assert_eq!(appended.recv().await, Some(2));
        assert!(outbound.try_recv().is_err());
        release.send(()).unwrap();
        let mut acks = vec![reply(&mut outbound).await, reply(&mut outbound).await];
        acks.sort_by_key(|ack| ack.1);
        assert_eq!(
            acks,
            vec![
                (MessageType::Ack, 4, offered[0]),
                (MessageType::Ack, 6, offered[1])
            ]
        );
        assert_eq!(records.lock().unwrap().len(), 3);

        stop.send(()).unwrap();
        service.await.unwrap().unwrap();
    }

    /// An in-memory journal that wants compacting once it holds more than two records beyond
    /// the live bindings.
    struct ShortJournal(Arc<Mutex<Vec<LeaseChange>>>);

    impl LeaseJournal for ShortJournal {
        fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn append(&mut self, changes: &[LeaseChange]) -> Result<(), JournalError> {
            self.0.lock().unwrap().extend_from_slice(changes);
            Ok(())
        }
        fn needs_compaction(&self, live_bindings: usize) -> bool {
            self.0.lock().unwrap().len() > live_bindings + 2
        }
        fn compact(&mut self, live: &[LeaseChange]) -> Result<(), JournalError> {
            *self.0.lock().unwrap() = live.to_vec();
            Ok(())
        }
    }

    fn bind(client: u8, expires_at_unix_secs: u64) -> LeaseChange {
        LeaseChange::Bind {
            client: boot_services::dhcp::ClientId(vec![1, client]),
            hardware_address: vec![0x52, 0x54, 0, 0, 0, client],
            address: Ipv4Addr::new(10, 0, 0, 100 + client),
            expires_at_unix_secs,
            hostname: None,
        }
    }

    #[tokio::test]
    async fn the_writer_compacts_the_journal_to_the_bindings_it_describes() {
        let history = Arc::new(Mutex::new(vec![bind(1, 1000)]));
        let mut store = GroupCommitStore::new(ShortJournal(Arc::clone(&history)));
        assert_eq!(store.load().unwrap(), vec![bind(1, 1000)]);
        let table = LeaseTable::default();
        // Renewals of two clients: the history grows, the bindings stay two.
        let mut expected_ids = Vec::new();
        for (id, (client, expiry)) in [(2, 1000), (1, 2000), (2, 2000), (1, 3000), (2, 3000)]
            .into_iter()
            .enumerate()
        {
            let id = ProposalId(id as u64);
            store
                .submit(
                    vec![LeaseProposal {
                        id,
                        change: bind(client, expiry),
                    }],
                    &table,
                )
                .unwrap();
            expected_ids.push(id);
        }
        let mut committed = Vec::new();
        while committed.len() < expected_ids.len() {
            let event = store.next_event().await;
            let Some(LeaseEvent::Committed(ids)) = event else {
                unreachable!("only commits were expected, got {event:?}");
            };
            committed.extend(ids);
        }
        assert_eq!(committed, expected_ids);
        // The writer compacts after it has reported a group, before it takes the next: one
        // more batch, once committed, finds the compaction done.
        store
            .submit(
                vec![LeaseProposal {
                    id: ProposalId(9),
                    change: bind(1, 4000),
                }],
                &table,
            )
            .unwrap();
        assert_eq!(
            store.next_event().await,
            Some(LeaseEvent::Committed(vec![ProposalId(9)]))
        );
        // However the batches were grouped, six renewals of two clients ended in no more than
        // four records, and replaying them gives each client its last lease.
        let kept = history.lock().unwrap().clone();
        assert!(kept.len() <= 4, "{kept:?}");
        let mut replayed = LeaseTable::default();
        for change in &kept {
            replayed.apply(change);
        }
        assert_eq!(replayed.snapshot(), vec![bind(1, 4000), bind(2, 3000)]);
    }

    /// A journal that fails its first append, as a disk that went read-only.
    struct FailingJournal;

    impl LeaseJournal for FailingJournal {
        fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError> {
            Ok(Vec::new())
        }
        fn append(&mut self, _changes: &[LeaseChange]) -> Result<(), JournalError> {
            Err(JournalError::Io {
                path: "leases.journal".into(),
                source: io::Error::other("read-only file system"),
            })
        }
        fn needs_compaction(&self, _live_bindings: usize) -> bool {
            false
        }
        fn compact(&mut self, _live: &[LeaseChange]) -> Result<(), JournalError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failed_append_stops_the_service_with_the_journals_error_and_no_ack() {
        let (inbound, inbound_receiver) = mpsc::channel(64);
        let (outbound_sender, mut outbound) = mpsc::unbounded_channel();
        let link = Arc::new(ChannelLink {
            inbound: tokio::sync::Mutex::new(inbound_receiver),
            outbound: outbound_sender,
        });
        let service = tokio::spawn(run_dhcp_with_store(
            DhcpServer::new(config()).unwrap(),
            vec![link],
            GroupCommitStore::new(FailingJournal),
            SystemClock,
            64,
            Arc::new(DhcpCounters::default()),
            std::future::pending(),
        ));
        inbound
            .send(message(MessageType::Discover, 1, 1, None))
            .await
            .unwrap();
        let (_, _, offered) = reply(&mut outbound).await;
        inbound
            .send(message(MessageType::Request, 1, 2, Some(offered)))
            .await
            .unwrap();
        let stopped = service.await.unwrap();
        assert!(
            matches!(&stopped, Err(DhcpServiceError::Journal(_))),
            "{stopped:?}"
        );
        assert!(
            stopped
                .unwrap_err()
                .to_string()
                .contains("read-only file system")
        );
        while let Ok(transmit) = outbound.try_recv() {
            assert_ne!(transmit.message_type, MessageType::Ack);
        }
    }
}
