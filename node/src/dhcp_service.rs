//! The DHCP wiring: links feed a bounded queue, the core handles each datagram, lease proposals
//! are made durable in batches through the journal, and only then do ACKs leave. Generic over
//! its seams, so `serve` and the simulator run this same code.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use boot_services::dhcp::{Datagram, DhcpServer, LeaseChange};
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
}

/// Why the DHCP service stopped.
#[derive(Debug, thiserror::Error)]
pub enum DhcpServiceError {
    /// The journal failed: we cannot promise durability, so we stop rather than answer.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

struct Received {
    link_index: usize,
    bytes: Vec<u8>,
    meta: ReceivedDatagram,
}

/// Replays the journal into `server`, then serves until `shutdown` resolves.
pub async fn run_dhcp<L, J, C>(
    mut server: DhcpServer,
    links: Vec<Arc<L>>,
    mut journal: J,
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
    let restored = journal.load()?;
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
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
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
        commit_proposals(&mut server, &mut journal, &clock, &counters)?;
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
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(destination = ?transmit.destination, "sent");
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

/// Makes every pending proposal durable in one journal write, then releases the replies.
fn commit_proposals<J: LeaseJournal, C: Clock>(
    server: &mut DhcpServer,
    journal: &mut J,
    clock: &C,
    counters: &DhcpCounters,
) -> Result<(), DhcpServiceError> {
    let mut proposals = Vec::new();
    while let Some(proposal) = server.poll_lease_proposal() {
        proposals.push(proposal);
    }
    if proposals.is_empty() {
        return Ok(());
    }
    let changes: Vec<LeaseChange> = proposals
        .iter()
        .map(|proposal| proposal.change.clone())
        .collect();
    if let Err(error) = journal.append(&changes) {
        for proposal in &proposals {
            server.handle_lease_commit_failed(proposal.id);
        }
        tracing::error!(%error, "lease journal append failed; stopping DHCP rather than ACK without durability");
        return Err(error.into());
    }
    let now = clock.wall_now();
    for proposal in proposals {
        tracing::debug!(change = ?proposal.change, "lease committed");
        server.handle_lease_committed(now, proposal.id);
    }
    counters
        .committed
        .fetch_add(changes.len() as u64, Ordering::Relaxed);
    if journal.needs_compaction(server.lease_table().binding_count()) {
        let live = server.lease_table().snapshot();
        journal.compact(&live)?;
    }
    Ok(())
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
