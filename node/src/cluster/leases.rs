//! DHCP leases through the cluster (DESIGN 4.3): the DHCP service's lease batches are committed
//! through Raft before any ACK leaves, and every lease another server commits reaches this
//! server's lease table, so a client keeps its address whichever server answers it.
//!
//! A batch the leader cannot commit within [`COMMIT_TIMEOUT`] is answered by the minority
//! rules below, or not at all: those clients get no ACK and retry. If it commits later after
//! all, the change arrives like any other server's and the client finds its binding on its
//! next try. The state machine refuses a bind
//! of an address another client holds unexpired, whatever any server's table believed.
//!
//! Group commit: batches queue for a few commit slots, and what queued while a slot was busy
//! goes into one Raft entry, so under load the entries grow rather than their number.
//!
//! Address blocks: the dynamic ranges are cut into blocks of [`BLOCK_ADDRESSES`]; a server
//! gives new clients addresses only from blocks it holds under an unexpired block lease in the
//! cluster state, so two servers never offer one new address. It takes another block when its
//! free addresses run low and renews its blocks at half their lease. Every server ranks the
//! servers for each client by rendezvous hash and staggers its offers by rank.
//!
//! Cut off from the majority (a batch that cannot be committed), a server still answers what
//! ADR 0007 lets it: a renewal of a committed binding, with a lease ending the drift bound
//! before the committed expiry; a new client, only from a block it holds and only an address
//! with no binding at all, with a lease of at most [`MINORITY_LEASE_MAX_MS`] that ends by the
//! block's lease plus that. New grants are journaled (fsync) before the ACK, and proposed to
//! the cluster once it answers again.

// A driver: it spawns the task that waits for each batch's commit.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use boot_services::dhcp::{
    AddressRange, DhcpConfig, LeaseChange, LeaseProposal, LeaseTable, ProposalId, Rendezvous,
};
use consensus::state::{BlockId, DRIFT_BOUND_MS, LeaseOutcome, MINORITY_LEASE_MAX_MS};
use consensus::{MeshCommand, MeshResponse};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};

use consensus::store::StateHandle;

use super::member::{AppliedLeases, ClusterMember};
use crate::dhcp_service::{DhcpServiceError, LeaseEvent, LeaseStore};
use crate::journal::{FileLeaseJournal, LeaseJournal};

/// How long a batch may wait for its commit before the server acts as cut off from the
/// majority (ADR 0007's minority rules, safe also during a mere election): short enough for
/// PXE ROMs, which give up on a DISCOVER or REQUEST after 4 to 8 s.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(4);
/// The wait once a batch has already failed and none has committed since: the server knows it
/// is cut off, and every client would otherwise wait the full [`COMMIT_TIMEOUT`] for an answer
/// the minority rules give at once. Each batch still tries, so the first commit after the heal
/// ends the cut-off mode.
pub const CUT_OFF_COMMIT_TIMEOUT: Duration = Duration::from_secs(1);
/// Commits on their way at once. Batches that arrive meanwhile wait and go into the next
/// entry together (group commit): under load, entries grow instead of their number.
const COMMITS_IN_FLIGHT_MAX: usize = 8;
/// Batches waiting for a commit slot; beyond, new batches fail at once.
const BATCHES_QUEUED_MAX: usize = 4096;
/// Lease changes in one Raft entry at most.
const CHANGES_PER_ENTRY_MAX: usize = 512;
/// Outcomes waiting for the DHCP service.
const EVENTS_BUFFERED: usize = 1024;
/// Addresses in a block.
pub const BLOCK_ADDRESSES: u32 = 64;
/// How long a block lease lasts by default; it is renewed at half.
pub const BLOCK_LEASE: Duration = Duration::from_secs(600);
/// A server takes another block when fewer addresses than this are free in its blocks, or
/// fewer than it gave out in the last [`FREE_ADDRESSES_AHEAD`] at its recent rate.
const FREE_ADDRESSES_LOW: u32 = 16;
/// How far ahead of its grant rate a server keeps free addresses: a boot storm draws a block
/// of 64 in a second or two, and a block takes a commit to arrive.
const FREE_ADDRESSES_AHEAD: Duration = Duration::from_secs(4);
/// How often grants made while cut off are proposed again.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// Blocks one look asks for at most.
const BLOCKS_PER_REQUEST_MAX: usize = 32;
/// Blocks asked for and not answered yet, at most.
const BLOCKS_IN_FLIGHT_MAX: usize = 2 * BLOCKS_PER_REQUEST_MAX;
/// How long a block the leader granted is not asked for again while this server's state
/// catches up with that entry.
const GRANTED_BLOCK_APPLY_WAIT: Duration = Duration::from_secs(2);
/// The shortest time a grant rate is measured over.
const RATE_WINDOW: Duration = Duration::from_millis(200);
/// How often blocks and members are looked at.
const BLOCK_TICK: Duration = Duration::from_millis(250);
/// Offer delay per rendezvous rank.
pub const OFFER_STAGGER: Duration = Duration::from_millis(300);

/// What the lease store needs of a cluster member: `serve` gives it a [`ClusterMember`] (Raft
/// over QUIC), the simulator a member of its own transport around the same Raft node, store
/// and state machine.
pub trait LeaseCluster: Clone + Send + Sync + 'static {
    /// This server's id.
    fn server_id(&self) -> u64;
    /// The ids of every member Raft knows (voters and learners), in order.
    fn member_ids(&self) -> Vec<u64>;
    /// The applied cluster state.
    fn state(&self) -> &StateHandle;
    /// Lease changes as the state machine commits them, from now on.
    fn subscribe_leases(&self) -> broadcast::Receiver<AppliedLeases>;
    /// Commits `command` through the leader, wherever it is.
    fn propose_anywhere(
        &self,
        command: MeshCommand,
    ) -> impl std::future::Future<Output = Result<MeshResponse, String>> + Send;
    /// Unix milliseconds now, by the clock this member stamps its proposals with: block
    /// leases are compared with those stamps, so they must come from the same clock.
    fn wall_now_ms(&self) -> u64;
    /// Whether the last comparison of this server's clock with the leader's found them
    /// certainly further apart than the drift bound. Such a server's lease ends are wrong
    /// by more than ADR 0007 allows for, so it grants and renews nothing until a comparison
    /// finds it back within the bound.
    fn clock_beyond_bound(&self) -> bool;
}

impl LeaseCluster for ClusterMember {
    fn server_id(&self) -> u64 {
        self.record.server_id
    }
    fn clock_beyond_bound(&self) -> bool {
        ClusterMember::clock_beyond_bound(self)
    }
    fn member_ids(&self) -> Vec<u64> {
        ClusterMember::member_ids(self)
    }
    fn state(&self) -> &StateHandle {
        &self.state
    }
    fn subscribe_leases(&self) -> broadcast::Receiver<AppliedLeases> {
        ClusterMember::subscribe_leases(self)
    }
    async fn propose_anywhere(&self, command: MeshCommand) -> Result<MeshResponse, String> {
        ClusterMember::propose_anywhere(self, command).await
    }
    fn wall_now_ms(&self) -> u64 {
        now_ms()
    }
}

/// Deliberate bugs, for showing that the simulator's checkers catch them. Only the simulator
/// sets them, and only when built with the `sabotage` feature; `serve` never does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sabotage {
    /// Report a batch committed as soon as it is handed over, before Raft commits it.
    pub ack_before_commit: bool,
    /// Take a block as soon as its lease ran out, without waiting out the longest lease its
    /// cut-off holder may have granted from it and the drift bound (the state machine gets
    /// the same bug, or it would refuse the request).
    pub early_block_reuse: bool,
    /// Count a lease as ended an hour before it ends (as a seconds-for-minutes slip would),
    /// so the DHCP core gives a held address to another client once its blocks run short (the
    /// state machine gets the same bug, or it would refuse the bind).
    pub unexpired_address_reuse: bool,
}

/// The cluster as the DHCP service's lease store.
#[derive(Debug)]
pub struct ClusterLeaseStore<M = ClusterMember, J = FileLeaseJournal> {
    member: M,
    applied: broadcast::Receiver<AppliedLeases>,
    sender: mpsc::Sender<LeaseEvent>,
    outcomes: mpsc::Receiver<LeaseEvent>,
    /// Batches on their way to the group-commit task.
    queued: mpsc::Sender<QueuedBatch>,
    /// Every block of every dynamic range, in address order.
    blocks: Vec<AddressRange>,
    /// For each of `blocks`, the subnet it is in (its index in the configuration): a server
    /// keeps free addresses in every subnet, since a client can only take one of its own.
    block_subnets: Vec<usize>,
    /// Events made by the block tick, handed out one at a time.
    ready: VecDeque<LeaseEvent>,
    tick: tokio::time::Interval,
    /// What the DHCP core was last told.
    allocatable: Option<Vec<AddressRange>>,
    servers: Vec<u64>,
    /// What the DHCP core was last told of its rank among the servers.
    rendezvous: Option<Rendezvous>,
    /// Blocks asked for (taken or renewed) and not answered yet, by first address.
    requested: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    /// Told when a block request committed, so the core hears of the block at once.
    blocks_changed: Arc<tokio::sync::Notify>,
    /// Blocks this server was granted (by the leader's answer) that its own state may not
    /// show yet, by first address, and when: not asked for again meanwhile.
    granted_lately: Arc<Mutex<BTreeMap<Ipv4Addr, tokio::time::Instant>>>,
    /// Per subnet: addresses bound in this server's blocks when the grant rate was last
    /// measured, and when.
    last_bound: BTreeMap<usize, (u32, tokio::time::Instant)>,
    /// Per subnet: addresses given out per second, smoothed.
    grant_rates: BTreeMap<usize, f64>,
    /// Per subnet: the DHCP core's addresses in demand beyond the bound ones (offers,
    /// pending commits, DISCOVERs waiting), as last reported.
    demand: Vec<u32>,
    /// Per subnet: this server's free addresses at the last look (bound ones excepted).
    free_at_last_look: BTreeMap<usize, u32>,
    /// Grants made while cut off, not yet in the cluster state.
    minority: Arc<Mutex<J>>,
    /// A reconciliation of `minority` is on its way.
    reconciling: Arc<std::sync::atomic::AtomicBool>,
    /// When `minority` was last read for a reconciliation: once a second is enough, and the
    /// blocks are looked at four times as often.
    last_reconcile: Option<tokio::time::Instant>,
    /// New DHCP configurations (the fleet configuration changed).
    reconfigured: watch::Receiver<Option<DhcpConfig>>,
    sabotage: Sabotage,
    /// How long this server's block leases last.
    block_lease: Duration,
}

/// What one look at the cluster state found about the blocks.
#[derive(Debug, Default)]
struct BlockLook {
    /// This server's blocks.
    held: Vec<AddressRange>,
    /// This server's blocks due for renewal (or to be taken back).
    renew: Vec<AddressRange>,
    /// Per subnet, this server's free addresses.
    free: BTreeMap<usize, u32>,
    /// Per subnet, the addresses bound in this server's blocks.
    bound: BTreeMap<usize, u32>,
    /// (subnet, server) for every server with a free address of its own in that subnet.
    with_free: BTreeSet<(usize, u64)>,
    /// Indexes (into the blocks) of the blocks nobody holds, in address order.
    unowned: Vec<usize>,
}

/// What a server knows of one subnet when it decides whether to take blocks.
#[derive(Debug, Clone, Copy)]
struct BlockNeed {
    /// Free addresses in its blocks, by the committed leases.
    free: u32,
    /// Addresses in blocks asked for or granted that its state does not show yet.
    coming: u32,
    /// Addresses its DHCP core has promised or is asked for that no lease shows yet.
    in_demand: u32,
    /// Free addresses it keeps at least (its grant rate ahead, or the floor).
    free_low: u32,
    /// Blocks nobody holds.
    unowned: usize,
    /// Servers in the cluster.
    servers: usize,
}

/// How many blocks to ask for now. Free by the committed leases, less the core's demand:
/// in a storm's first second the grant rate still reads zero while every free address is
/// offered and new clients wait, so the shortfall itself is asked for, not only the floor.
/// Taking ahead is fine while blocks are plenty; near the end of a pool a block held idle
/// here is one another server's clients cannot have, so then one at a time.
fn blocks_to_take(need: BlockNeed) -> usize {
    let wanted = need
        .free_low
        .saturating_add(need.in_demand)
        .saturating_sub(need.free.saturating_add(need.coming));
    if wanted == 0 || need.unowned == 0 {
        return 0;
    }
    let plenty = need.unowned / (2 * need.servers.max(1));
    (wanted.div_ceil(BLOCK_ADDRESSES) as usize)
        .min(plenty)
        .clamp(1, BLOCKS_PER_REQUEST_MAX)
}

/// The unowned blocks of `subnet` (indexes into the blocks) that the server at `place` among
/// `servers` asks for, in the order it asks: from the start of its own share of the subnet's
/// blocks, then on round the subnet. Servers that all asked for the first free block in
/// address order raced for the same blocks: one won each round and the others, refused, asked
/// again a look later, so at a fresh cluster's start the new clients ranked first on them
/// waited.
fn block_candidates<'a>(
    block_subnets: &'a [usize],
    subnet: usize,
    place: usize,
    servers: usize,
    unowned: &'a [usize],
) -> impl Iterator<Item = usize> + 'a {
    let span_first = block_subnets
        .iter()
        .position(|block_subnet| *block_subnet == subnet)
        .unwrap_or(0);
    let span_len = block_subnets[span_first..]
        .iter()
        .take_while(|block_subnet| **block_subnet == subnet)
        .count();
    let start = span_first + span_len * place / servers.max(1);
    let from_start = unowned.iter().filter(move |index| **index >= start);
    let before_start = unowned.iter().filter(move |index| **index < start);
    from_start
        .chain(before_start)
        .copied()
        .filter(move |index| block_subnets.get(*index) == Some(&subnet))
}

/// The blocks of every subnet's dynamic ranges, and the subnet of each.
pub fn blocks_of_subnets(subnet_ranges: &[Vec<AddressRange>]) -> (Vec<AddressRange>, Vec<usize>) {
    let mut blocks = Vec::new();
    let mut subnets = Vec::new();
    for (subnet, ranges) in subnet_ranges.iter().enumerate() {
        for block in blocks_of(ranges) {
            blocks.push(block);
            subnets.push(subnet);
        }
    }
    (blocks, subnets)
}

/// Cuts `ranges` into blocks of [`BLOCK_ADDRESSES`], each named by its first address.
pub fn blocks_of(ranges: &[AddressRange]) -> Vec<AddressRange> {
    let mut blocks = Vec::new();
    for range in ranges {
        let (mut first, last) = (u32::from(range.first), u32::from(range.last));
        while first <= last {
            let block_last = first.saturating_add(BLOCK_ADDRESSES - 1).min(last);
            blocks.push(AddressRange {
                first: Ipv4Addr::from(first),
                last: Ipv4Addr::from(block_last),
            });
            match block_last.checked_add(1) {
                Some(next) => first = next,
                None => break,
            }
        }
    }
    blocks
}

fn now_ms() -> u64 {
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl<M: LeaseCluster, J: LeaseJournal> ClusterLeaseStore<M, J> {
    /// The store of `member`, serving the dynamic `ranges`; grants made while cut off from
    /// the majority are journaled in `minority_journal`.
    pub fn new(
        member: M,
        subnet_ranges: &[Vec<AddressRange>],
        minority_journal: J,
        reconfigured: watch::Receiver<Option<DhcpConfig>>,
    ) -> Self {
        Self::with_sabotage(
            member,
            subnet_ranges,
            minority_journal,
            reconfigured,
            Sabotage::default(),
        )
    }

    /// [`new`](Self::new) with deliberate bugs: for the simulator's checker tests only.
    #[cfg(feature = "sabotage")]
    pub fn sabotaged(
        member: M,
        subnet_ranges: &[Vec<AddressRange>],
        minority_journal: J,
        reconfigured: watch::Receiver<Option<DhcpConfig>>,
        sabotage: Sabotage,
    ) -> Self {
        Self::with_sabotage(
            member,
            subnet_ranges,
            minority_journal,
            reconfigured,
            sabotage,
        )
    }

    fn with_sabotage(
        member: M,
        subnet_ranges: &[Vec<AddressRange>],
        minority_journal: J,
        reconfigured: watch::Receiver<Option<DhcpConfig>>,
        sabotage: Sabotage,
    ) -> Self {
        let minority_journal = Arc::new(Mutex::new(minority_journal));
        let cut_off: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (blocks, block_subnets) = blocks_of_subnets(subnet_ranges);
        let applied = member.subscribe_leases();
        let (sender, outcomes) = mpsc::channel(EVENTS_BUFFERED);
        let (queued, queue) = mpsc::channel(BATCHES_QUEUED_MAX);
        tokio::spawn(group_commits(
            queue,
            CommitContext {
                member: member.clone(),
                sender: sender.clone(),
                minority: Arc::clone(&minority_journal),
                cut_off,
                sabotage,
            },
        ));
        let mut tick = tokio::time::interval(BLOCK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            member,
            applied,
            sender,
            outcomes,
            queued,
            blocks,
            block_subnets,
            // Until it holds a block, a server gives no new client an address.
            ready: VecDeque::from([LeaseEvent::Allocatable(Some(Vec::new()))]),
            tick,
            allocatable: Some(Vec::new()),
            servers: Vec::new(),
            rendezvous: None,
            requested: Arc::default(),
            blocks_changed: Arc::default(),
            granted_lately: Arc::default(),
            last_bound: Default::default(),
            grant_rates: Default::default(),
            demand: Vec::new(),
            free_at_last_look: BTreeMap::new(),
            minority: minority_journal,
            reconciling: Arc::default(),
            last_reconcile: None,
            reconfigured,
            sabotage,
            block_lease: BLOCK_LEASE,
        }
    }

    /// Block leases of `block_lease` instead of [`BLOCK_LEASE`]: a shorter one gives a
    /// dead server's blocks back sooner, a longer one survives longer partitions.
    #[must_use]
    pub fn with_block_lease(mut self, block_lease: Duration) -> Self {
        self.block_lease = block_lease;
        self
    }

    /// Proposes the grants made while cut off, once the cluster answers again; conflicts (a
    /// majority grant of the same address meanwhile, which ADR 0007 rules out) are logged.
    fn reconcile(&self) {
        let pending = lock(&self.minority).load().unwrap_or_default();
        if pending.is_empty()
            || self
                .reconciling
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let member = self.member.clone();
        let journal = Arc::clone(&self.minority);
        let busy = Arc::clone(&self.reconciling);
        tokio::spawn(async move {
            let records = pending
                .iter()
                .map(|change| {
                    let mut record = Vec::new();
                    change.encode(&mut record);
                    record
                })
                .collect();
            let result = tokio::time::timeout(
                COMMIT_TIMEOUT,
                member.propose_anywhere(MeshCommand::Leases(records)),
            )
            .await;
            if let Ok(Ok(MeshResponse::Leases(outcomes))) = result {
                for (change, outcome) in pending.iter().zip(&outcomes) {
                    if !matches!(
                        outcome,
                        LeaseOutcome::Committed | LeaseOutcome::Superseded { .. }
                    ) {
                        tracing::error!(
                            ?change,
                            ?outcome,
                            "a grant made while cut off conflicts with the cluster"
                        );
                    }
                }
                tracing::info!(
                    grants = pending.len(),
                    "grants made while cut off are in the cluster state"
                );
                let mut journal = lock(&journal);
                // Grants journaled meanwhile stay for the next round.
                let later: Vec<LeaseChange> = journal
                    .load()
                    .unwrap_or_default()
                    .into_iter()
                    .skip(pending.len())
                    .collect();
                if let Err(error) = journal.compact(&later) {
                    tracing::error!(%error, "cannot trim the journal of grants made while cut off");
                }
            }
            busy.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// Looks at members and blocks: tells the core of changes, renews blocks at half their
    /// lease, takes another block when free addresses run low.
    fn look_at_blocks(&mut self) {
        let own = self.member.server_id();
        let servers = self.member.member_ids();
        if servers != self.servers {
            self.servers = servers;
        }
        let now = self.member.wall_now_ms();
        let now_secs = now / 1000;
        let reuse_after_ms = if self.sabotage.early_block_reuse {
            0
        } else {
            MINORITY_LEASE_MAX_MS + DRIFT_BOUND_MS
        };
        let mut look = self.member.state().read(|state| {
            let mut look = BlockLook::default();
            for (index, (block, subnet)) in self.blocks.iter().zip(&self.block_subnets).enumerate()
            {
                look.free.entry(*subnet).or_default();
                match state.blocks.get(&BlockId(block.first)) {
                    Some(lease) if lease.until > now => {
                        let size = u32::from(block.last) - u32::from(block.first) + 1;
                        let bound = state
                            .leases
                            .range(block.first..=block.last)
                            .filter(|(_, lease)| lease.expires_at_unix_secs > now_secs)
                            .take(size as usize)
                            .count() as u32;
                        let block_free = size.saturating_sub(bound);
                        if block_free > 0 {
                            look.with_free.insert((*subnet, lease.server));
                        }
                        if lease.server == own {
                            look.held.push(*block);
                            if lease.until - now < self.block_lease.as_millis() as u64 / 2 {
                                look.renew.push(*block);
                            }
                            *look.free.entry(*subnet).or_default() += block_free;
                            *look.bound.entry(*subnet).or_default() += bound;
                        }
                    }
                    // Its own block whose lease ran out while it could not commit (a
                    // partition longer than the block lease): nobody else can have granted
                    // from it, so it takes it back at once rather than leave it frozen for the
                    // longest minority lease and the drift bound.
                    Some(lease) if lease.server == own => look.renew.push(*block),
                    Some(lease) if lease.until.saturating_add(reuse_after_ms) > now => {}
                    _ => look.unowned.push(index),
                }
            }
            look
        });
        // Per subnet, the servers with no free address of their own: a new client's ranking
        // skips them (the same state gives every server the same answer, give or take the
        // entries it has not applied yet).
        let mut exhausted: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for subnet in look.free.keys() {
            let without: BTreeSet<u64> = self
                .servers
                .iter()
                .copied()
                .filter(|server| !look.with_free.contains(&(*subnet, *server)))
                .collect();
            if !without.is_empty() {
                exhausted.insert(*subnet, without);
            }
        }
        let rendezvous = Rendezvous {
            own,
            servers: self.servers.clone(),
            stagger: OFFER_STAGGER,
            exhausted,
        };
        if self.rendezvous.as_ref() != Some(&rendezvous) {
            self.rendezvous = Some(rendezvous.clone());
            self.ready
                .push_back(LeaseEvent::Rendezvous(Some(rendezvous)));
        }
        // Blocks on their way: asked for and not answered, or granted by the leader and not
        // applied here yet (unowned by this server's state until it applies that entry).
        // Neither is asked for again; both count as coming, so that a look while they travel
        // asks only for the rest of the shortfall.
        let looked_at = tokio::time::Instant::now();
        let mut coming: BTreeMap<usize, u32> = BTreeMap::new();
        let requested: BTreeSet<Ipv4Addr> = {
            let held_firsts: BTreeSet<Ipv4Addr> =
                look.held.iter().map(|block| block.first).collect();
            let mut granted_lately = lock(&self.granted_lately);
            granted_lately.retain(|first, granted_at| {
                !held_firsts.contains(first)
                    && looked_at.duration_since(*granted_at) < GRANTED_BLOCK_APPLY_WAIT
            });
            let requested = lock(&self.requested).clone();
            for first in granted_lately.keys().chain(&requested) {
                if held_firsts.contains(first) {
                    continue;
                }
                if let Ok(index) = self.blocks.binary_search_by_key(first, |block| block.first) {
                    let block = self.blocks[index];
                    *coming.entry(self.block_subnets[index]).or_default() +=
                        u32::from(block.last) - u32::from(block.first) + 1;
                }
            }
            let blocks = &self.blocks;
            look.unowned.retain(|index| {
                let first = blocks[*index].first;
                !granted_lately.contains_key(&first) && !requested.contains(&first)
            });
            requested
        };
        let (held, renew, free, bound) = (look.held, look.renew, look.free, look.bound);
        self.free_at_last_look.clone_from(&free);
        let mut unowned: BTreeMap<usize, usize> = BTreeMap::new();
        for index in &look.unowned {
            *unowned.entry(self.block_subnets[*index]).or_default() += 1;
        }
        let servers_count = self.servers.len().max(1);
        // Per subnet, the grant rate: addresses bound in this server's blocks since the last
        // measure (a new block changes the free count, not this one), over at least
        // RATE_WINDOW, since looks come as often as blocks arrive.
        let mut wanted = renew;
        for (subnet, subnet_free) in &free {
            let subnet_bound = bound.get(subnet).copied().unwrap_or(0);
            let rate = self.grant_rates.entry(*subnet).or_default();
            match self.last_bound.get(subnet) {
                Some((last_bound, last_measure)) => {
                    let elapsed = looked_at.duration_since(*last_measure);
                    if elapsed >= RATE_WINDOW {
                        let sample = f64::from(subnet_bound.saturating_sub(*last_bound))
                            / elapsed.as_secs_f64();
                        *rate = 0.5 * *rate + 0.5 * sample;
                        self.last_bound.insert(*subnet, (subnet_bound, looked_at));
                    }
                }
                None => {
                    self.last_bound.insert(*subnet, (subnet_bound, looked_at));
                }
            }
            let free_low =
                FREE_ADDRESSES_LOW.max((*rate * FREE_ADDRESSES_AHEAD.as_secs_f64()).ceil() as u32);
            let blocks = blocks_to_take(BlockNeed {
                free: *subnet_free,
                coming: coming.get(subnet).copied().unwrap_or(0),
                in_demand: self.demand.get(*subnet).copied().unwrap_or(0),
                free_low,
                unowned: unowned.get(subnet).copied().unwrap_or(0),
                servers: servers_count,
            });
            if blocks > 0 {
                let place = self
                    .servers
                    .iter()
                    .position(|server| *server == own)
                    .unwrap_or(0);
                wanted.extend(
                    block_candidates(
                        &self.block_subnets,
                        *subnet,
                        place,
                        servers_count,
                        &look.unowned,
                    )
                    .take(blocks)
                    .map(|index| self.blocks[index]),
                );
            }
        }
        if self
            .last_reconcile
            .is_none_or(|last| looked_at.duration_since(last) >= RECONCILE_EVERY)
        {
            self.last_reconcile = Some(looked_at);
            self.reconcile();
        }
        let allocatable = Some(held);
        if allocatable != self.allocatable {
            self.allocatable = allocatable.clone();
            self.ready.push_back(LeaseEvent::Allocatable(allocatable));
        }
        // A renewal already on its way is not asked for twice; new requests go out while
        // earlier ones travel (a storm outruns blocks taken one round trip at a time), up to
        // a bound.
        wanted.retain(|block| !requested.contains(&block.first));
        wanted.truncate(BLOCKS_IN_FLIGHT_MAX.saturating_sub(requested.len()));
        if wanted.is_empty() {
            return;
        }
        lock(&self.requested).extend(wanted.iter().map(|block| block.first));
        let member = self.member.clone();
        let block_lease = self.block_lease;
        let requested = Arc::clone(&self.requested);
        let blocks_changed = Arc::clone(&self.blocks_changed);
        let granted_lately = Arc::clone(&self.granted_lately);
        tokio::spawn(async move {
            // All at once: one after another, each block waits a whole commit.
            let requests = wanted.into_iter().map(|block| {
                let member = member.clone();
                let requested = Arc::clone(&requested);
                let blocks_changed = Arc::clone(&blocks_changed);
                let granted_lately = Arc::clone(&granted_lately);
                async move {
                    let until = member
                        .wall_now_ms()
                        .saturating_add(block_lease.as_millis() as u64);
                    let command = MeshCommand::LeaseBlock {
                        block: BlockId(block.first),
                        server: own,
                        until,
                    };
                    let answer = member.propose_anywhere(command).await;
                    if matches!(answer, Ok(MeshResponse::Applied)) {
                        lock(&granted_lately).insert(block.first, tokio::time::Instant::now());
                    }
                    lock(&requested).remove(&block.first);
                    match answer {
                        Ok(MeshResponse::Applied) => {
                            tracing::info!(first = %block.first, last = %block.last, "address block held");
                        }
                        Ok(other) => {
                            tracing::info!(first = %block.first, ?other, "address block not taken")
                        }
                        Err(error) => {
                            tracing::warn!(first = %block.first, %error, "address block request failed")
                        }
                    }
                    // Look again now, not at the next tick: the core hears of the block at
                    // once, and under a storm the blocks just taken may already be going.
                    blocks_changed.notify_one();
                }
            });
            futures_util::future::join_all(requests).await;
        });
    }

    fn applied_event(&mut self, received: Result<AppliedLeases, RecvError>) -> Option<LeaseEvent> {
        match received {
            Ok(AppliedLeases::Change(change)) => Some(LeaseEvent::Remote(change)),
            Ok(AppliedLeases::Replaced) => {
                Some(LeaseEvent::Resync(lease_changes_of(self.member.state())))
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "lease changes missed; reloading every lease");
                Some(LeaseEvent::Resync(lease_changes_of(self.member.state())))
            }
            Err(RecvError::Closed) => None,
        }
    }
}

fn lock<J>(journal: &Mutex<J>) -> std::sync::MutexGuard<'_, J> {
    journal.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cluster member's DHCP service, as `serve` runs it: the core's leases go through `store`,
/// and an expired binding's address waits out the drift bound before another client gets it
/// (ADR 0007).
pub async fn run_cluster_dhcp<L, M, J, C>(
    mut server: boot_services::dhcp::DhcpServer,
    links: Vec<Arc<L>>,
    store: ClusterLeaseStore<M, J>,
    clock: C,
    receive_queue_max: usize,
    counters: Arc<crate::dhcp_service::DhcpCounters>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DhcpServiceError>
where
    L: crate::seams::DhcpLink,
    M: LeaseCluster,
    J: LeaseJournal,
    C: crate::seams::Clock,
{
    server.set_reuse_grace(Duration::from_millis(DRIFT_BOUND_MS));
    #[cfg(feature = "sabotage")]
    if store.sabotage.unexpired_address_reuse {
        server.sabotage_reuse_before_expiry(Duration::from_secs(3600));
    }
    crate::dhcp_service::run_dhcp_with_store(
        server,
        links,
        store,
        clock,
        receive_queue_max,
        counters,
        shutdown,
    )
    .await
}

/// The leases of the cluster state, as lease changes (for a DHCP core to restore).
pub fn lease_changes_of(state: &StateHandle) -> Vec<LeaseChange> {
    state.read(|state| {
        let mut changes: Vec<LeaseChange> = state
            .leases
            .iter()
            .map(|(address, lease)| LeaseChange::Bind {
                client: boot_services::dhcp::ClientId(lease.client.clone()),
                hardware_address: lease.hardware_address.clone(),
                address: *address,
                expires_at_unix_secs: lease.expires_at_unix_secs,
                hostname: lease.hostname.clone(),
            })
            .collect();
        changes.extend(
            state
                .quarantine
                .iter()
                .map(|(address, until)| LeaseChange::Decline {
                    address: *address,
                    until_unix_secs: *until,
                }),
        );
        changes
    })
}

/// What a server that cannot commit may still grant (ADR 0007), decided per proposal from the
/// cluster state it last saw; new grants are journaled before they are reported.
fn minority_grants<M: LeaseCluster, J: LeaseJournal>(
    member: &M,
    blocks: &[AddressRange],
    journal: &Mutex<J>,
    proposals: &[LeaseProposal],
    reason: &str,
) -> Vec<LeaseEvent> {
    let own = member.server_id();
    let now = member.wall_now_ms();
    let now_secs = now / 1000;
    let drift_secs = DRIFT_BOUND_MS / 1000;
    let mut events = Vec::new();
    let mut failed = Vec::new();
    let mut grants = Vec::new();
    member.state().read(|state| {
        for proposal in proposals {
            let LeaseChange::Bind {
                client,
                hardware_address,
                address,
                expires_at_unix_secs,
                hostname,
            } = &proposal.change
            else {
                failed.push(proposal.id);
                continue;
            };
            match state.leases.get(address) {
                // A renewal: up to the drift bound before the committed expiry.
                Some(lease)
                    if lease.client == client.0
                        && lease.expires_at_unix_secs > now_secs + drift_secs =>
                {
                    let until =
                        (*expires_at_unix_secs).min(lease.expires_at_unix_secs - drift_secs);
                    events.push(LeaseEvent::CommittedUntil(proposal.id, until));
                }
                Some(_) => failed.push(proposal.id),
                // A new client: an address nobody was ever bound to, in a block we hold.
                None => {
                    let held_until = blocks
                        .iter()
                        .find(|block| block.first <= *address && *address <= block.last)
                        .and_then(|block| state.blocks.get(&BlockId(block.first)))
                        .filter(|lease| lease.server == own && lease.until > now)
                        .map(|lease| lease.until);
                    let quarantined = state
                        .quarantine
                        .get(address)
                        .is_some_and(|until| *until > now_secs);
                    match held_until {
                        Some(block_until) if !quarantined => {
                            let until = (*expires_at_unix_secs)
                                .min((now + MINORITY_LEASE_MAX_MS) / 1000)
                                .min((block_until + MINORITY_LEASE_MAX_MS) / 1000);
                            grants.push((
                                proposal.id,
                                until,
                                LeaseChange::Bind {
                                    client: client.clone(),
                                    hardware_address: hardware_address.clone(),
                                    address: *address,
                                    expires_at_unix_secs: until,
                                    hostname: hostname.clone(),
                                },
                            ));
                        }
                        _ => failed.push(proposal.id),
                    }
                }
            }
        }
    });
    if !grants.is_empty() {
        let changes: Vec<LeaseChange> =
            grants.iter().map(|(_, _, change)| change.clone()).collect();
        match lock(journal).append(&changes) {
            Ok(()) => {
                tracing::warn!(grants = grants.len(), %reason, "cluster unreachable: short leases granted from held blocks");
                events.extend(
                    grants
                        .iter()
                        .map(|(id, until, _)| LeaseEvent::CommittedUntil(*id, *until)),
                );
            }
            Err(error) => {
                tracing::error!(%error, "cannot journal grants made while cut off");
                failed.extend(grants.iter().map(|(id, _, _)| *id));
            }
        }
    }
    if !failed.is_empty() {
        events.push(LeaseEvent::Failed(failed, reason.to_owned()));
    }
    events
}

/// What the leader's answer to one batch means for each proposal.
/// A batch from the DHCP core, with the blocks it was made with (for the minority rules).
#[derive(Debug)]
struct QueuedBatch {
    proposals: Vec<LeaseProposal>,
    blocks: Vec<AddressRange>,
}

/// What a commit needs besides its batch.
#[derive(Debug)]
struct CommitContext<M, J> {
    member: M,
    sender: mpsc::Sender<LeaseEvent>,
    minority: Arc<Mutex<J>>,
    /// The last batch failed to commit and none has committed since.
    cut_off: Arc<std::sync::atomic::AtomicBool>,
    sabotage: Sabotage,
}

impl<M: Clone, J> Clone for CommitContext<M, J> {
    fn clone(&self) -> Self {
        Self {
            member: self.member.clone(),
            sender: self.sender.clone(),
            minority: Arc::clone(&self.minority),
            cut_off: Arc::clone(&self.cut_off),
            sabotage: self.sabotage,
        }
    }
}

/// Group commit: takes queued batches, and whatever queued behind the first while it waited
/// for a commit slot becomes one Raft entry with it. At low load an entry is one batch and
/// waits for nothing; under load entries grow, so the log and its fsyncs keep up.
async fn group_commits<M: LeaseCluster, J: LeaseJournal>(
    mut queue: mpsc::Receiver<QueuedBatch>,
    context: CommitContext<M, J>,
) {
    let slots = Arc::new(Semaphore::new(COMMITS_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let QueuedBatch {
            mut proposals,
            mut blocks,
        } = first;
        while proposals.len() < CHANGES_PER_ENTRY_MAX {
            match queue.try_recv() {
                Ok(next) => {
                    proposals.extend(next.proposals);
                    blocks = next.blocks;
                }
                Err(_) => break,
            }
        }
        let context = context.clone();
        tokio::spawn(async move {
            commit(context, proposals, blocks).await;
            drop(slot);
        });
    }
}

/// Commits one entry of lease changes and reports each change's outcome to the DHCP core;
/// cut off from the majority, answers by the minority rules instead.
async fn commit<M: LeaseCluster, J: LeaseJournal>(
    context: CommitContext<M, J>,
    proposals: Vec<LeaseProposal>,
    blocks: Vec<AddressRange>,
) {
    let CommitContext {
        member,
        sender,
        minority: journal,
        cut_off,
        sabotage,
    } = context;
    let ids: Vec<ProposalId> = proposals.iter().map(|proposal| proposal.id).collect();
    if sabotage.ack_before_commit {
        // The bug: the ACKs leave now, whatever Raft makes of the batch.
        let _ = sender.send(LeaseEvent::Committed(ids.clone())).await;
        let records = proposals
            .iter()
            .map(|proposal| {
                let mut record = Vec::new();
                proposal.change.encode(&mut record);
                record
            })
            .collect();
        let _ = member.propose_anywhere(MeshCommand::Leases(records)).await;
        return;
    }
    if member.clock_beyond_bound() {
        // A lease's end is this server's clock plus its time; off by more than the bound,
        // the cluster would free the address while the client still holds it (or the client
        // would let go early). No answer is better: the client retries, and another server
        // answers it.
        let reason = "this server's clock is beyond the drift bound from the leader's: it \
                      grants and renews nothing until its time is fixed";
        let _ = sender.send(LeaseEvent::Failed(ids, reason.into())).await;
        return;
    }
    let records = proposals
        .iter()
        .map(|proposal| {
            let mut record = Vec::new();
            proposal.change.encode(&mut record);
            record
        })
        .collect();
    let command = MeshCommand::Leases(records);
    let wait = if cut_off.load(std::sync::atomic::Ordering::Acquire) {
        CUT_OFF_COMMIT_TIMEOUT
    } else {
        COMMIT_TIMEOUT
    };
    let answer = match tokio::time::timeout(wait, member.propose_anywhere(command)).await {
        Ok(Ok(response)) => Ok(outcome_events(&ids, response)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(format!("not committed within {} ms", wait.as_millis())),
    };
    let was_cut_off = cut_off.swap(answer.is_err(), std::sync::atomic::Ordering::AcqRel);
    if was_cut_off != answer.is_err() {
        match &answer {
            Err(reason) => {
                tracing::warn!(%reason, "cut off from the cluster: answering by the minority rules")
            }
            Ok(_) => tracing::info!("commits go through again"),
        }
    }
    let events = match answer {
        Ok(events) => events,
        Err(reason) => minority_grants(&member, &blocks, &journal, &proposals, &reason),
    };
    for event in events {
        if sender.send(event).await.is_err() {
            break;
        }
    }
}

fn outcome_events(ids: &[ProposalId], response: MeshResponse) -> Vec<LeaseEvent> {
    let MeshResponse::Leases(outcomes) = response else {
        return vec![LeaseEvent::Failed(
            ids.to_vec(),
            format!("unexpected answer {response:?}"),
        )];
    };
    let mut committed = Vec::new();
    let mut events = Vec::new();
    for (id, outcome) in ids.iter().zip(outcomes) {
        match outcome {
            // The client holds the address at least as long as this proposal says.
            LeaseOutcome::Committed | LeaseOutcome::Superseded { .. } => committed.push(*id),
            LeaseOutcome::AddressHeld { until_unix_secs } => events.push(LeaseEvent::Refused(
                *id,
                format!("the address is held by another client until {until_unix_secs}"),
            )),
            LeaseOutcome::Malformed(reason) => events.push(LeaseEvent::Refused(*id, reason)),
        }
    }
    events.insert(0, LeaseEvent::Committed(committed));
    events
}

impl<M: LeaseCluster, J: LeaseJournal> LeaseStore for ClusterLeaseStore<M, J> {
    fn silenced(&self) -> Option<&'static str> {
        self.member.clock_beyond_bound().then_some(
            "this server's clock is beyond the drift bound from the leader's (ADR 0007); fix its \
             time service",
        )
    }

    fn load(&mut self) -> Result<Vec<LeaseChange>, DhcpServiceError> {
        let mut changes = lease_changes_of(self.member.state());
        // Grants this server made while cut off and has not reconciled yet are promises to
        // clients as binding as the committed ones: a server restarted before it could
        // reconcile must not offer those addresses to others. (Found by the chaos engine: a
        // server whose disk failed granted by the minority rules, was restarted, and gave the
        // same address to the next client before the grant reached the cluster.)
        changes.extend(lock(&self.minority).load()?);
        Ok(changes)
    }

    fn submit(
        &mut self,
        proposals: Vec<LeaseProposal>,
        _table: &LeaseTable,
    ) -> Result<(), DhcpServiceError> {
        let batch = QueuedBatch {
            proposals,
            blocks: self.blocks.clone(),
        };
        if let Err(refused) = self.queued.try_send(batch) {
            let ids = match refused {
                mpsc::error::TrySendError::Full(batch)
                | mpsc::error::TrySendError::Closed(batch) => {
                    batch.proposals.iter().map(|proposal| proposal.id).collect()
                }
            };
            let _ = self.sender.try_send(LeaseEvent::Failed(
                ids,
                "too many lease batches waiting for the cluster".into(),
            ));
        }
        Ok(())
    }

    fn wants_address_demand(&self) -> bool {
        true
    }

    fn address_demand(&mut self, per_subnet: &[u32]) {
        let short = per_subnet.iter().enumerate().any(|(subnet, in_demand)| {
            let free = self.free_at_last_look.get(&subnet).copied().unwrap_or(0);
            free.saturating_sub(*in_demand) < FREE_ADDRESSES_LOW
        });
        let changed = self.demand != per_subnet;
        self.demand.clear();
        self.demand.extend_from_slice(per_subnet);
        if short && changed {
            // Look now rather than at the next tick: the clients are waiting.
            self.blocks_changed.notify_one();
        }
    }

    fn try_event(&mut self) -> Option<LeaseEvent> {
        if let Some(event) = self.ready.pop_front() {
            return Some(event);
        }
        if let Ok(event) = self.outcomes.try_recv() {
            return Some(event);
        }
        match self.applied.try_recv() {
            Ok(applied) => self.applied_event(Ok(applied)),
            Err(TryRecvError::Lagged(missed)) => self.applied_event(Err(RecvError::Lagged(missed))),
            Err(TryRecvError::Empty | TryRecvError::Closed) => None,
        }
    }

    async fn next_event(&mut self) -> Option<LeaseEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            // Biased, so that one seed replays a simulated run (an unbiased select draws from
            // an unseeded RNG); the rare branches go first, so a storm's stream of outcomes
            // cannot hold back the block lease renewals of the tick.
            tokio::select! {
                biased;
                _ = self.tick.tick() => self.look_at_blocks(),
                () = self.blocks_changed.notified() => self.look_at_blocks(),
                changed = self.reconfigured.changed() => {
                    if changed.is_err() {
                        // The daemon stopped following the configuration: nothing more comes.
                        std::future::pending::<()>().await;
                    }
                    let config = self.reconfigured.borrow_and_update().clone();
                    if let Some(config) = config {
                        let subnet_ranges: Vec<Vec<AddressRange>> = config
                            .subnets
                            .iter()
                            .map(|subnet| subnet.ranges.clone())
                            .collect();
                        (self.blocks, self.block_subnets) = blocks_of_subnets(&subnet_ranges);
                        self.last_bound.clear();
                        self.grant_rates.clear();
                        self.ready.push_back(LeaseEvent::Reconfigure(Box::new(config)));
                    }
                }
                outcome = self.outcomes.recv() => return outcome,
                applied = self.applied.recv() => return self.applied_event(applied),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_asks_for_the_demand_its_committed_leases_do_not_show_yet() {
        let need = BlockNeed {
            free: 64,
            coming: 0,
            in_demand: 0,
            free_low: FREE_ADDRESSES_LOW,
            unowned: 150,
            servers: 3,
        };
        // A storm's first moment: the rate reads zero, but 64 offers are out and 200 new
        // clients wait.
        let storm = BlockNeed {
            in_demand: 264,
            ..need
        };
        let cases = [
            (need, 0, "quiet: one block's worth free, nothing asked for"),
            (
                storm,
                4,
                "the shortfall and the floor are asked for at once",
            ),
            (
                BlockNeed {
                    coming: 192,
                    ..storm
                },
                1,
                "three blocks on their way: a look meanwhile asks only for the rest",
            ),
            (
                BlockNeed {
                    coming: 256,
                    ..storm
                },
                0,
                "all of it on its way",
            ),
            (
                BlockNeed {
                    free_low: 216,
                    ..need
                },
                3,
                "the same shortfall by the rate alone",
            ),
            (
                BlockNeed {
                    unowned: 5,
                    ..storm
                },
                1,
                "near the end of the pool, one at a time",
            ),
            (
                BlockNeed {
                    unowned: 0,
                    ..storm
                },
                0,
                "none left, none asked for",
            ),
            (
                BlockNeed {
                    in_demand: 1_000_000,
                    unowned: 100_000,
                    ..need
                },
                BLOCKS_PER_REQUEST_MAX,
                "however large the demand, one look asks for a bounded number",
            ),
        ];
        for (need, blocks, why) in cases {
            assert_eq!(blocks_to_take(need), blocks, "{why}: {need:?}");
        }
    }

    #[test]
    fn servers_ask_for_blocks_from_their_own_share_of_the_subnet_then_round_it() {
        // Two subnets: 4 blocks, then 30.
        let block_subnets: Vec<usize> = [vec![0; 4], vec![1; 30]].concat();
        let all: Vec<usize> = (0..block_subnets.len()).collect();
        let asks = |place: usize, unowned: &[usize]| -> Vec<usize> {
            block_candidates(&block_subnets, 1, place, 3, unowned)
                .take(8)
                .collect()
        };
        // A fresh pool: three servers ask for three disjoint runs of blocks.
        assert_eq!(asks(0, &all), (4..12).collect::<Vec<_>>());
        assert_eq!(asks(1, &all), (14..22).collect::<Vec<_>>());
        assert_eq!(asks(2, &all), (24..32).collect::<Vec<_>>());
        // Near the end of its share, a server goes on round the subnet, never into another.
        let few: Vec<usize> = vec![0, 5, 6, 30, 33];
        assert_eq!(asks(2, &few), vec![30, 33, 5, 6]);
        assert_eq!(
            block_candidates(&block_subnets, 0, 1, 3, &few).collect::<Vec<_>>(),
            vec![0]
        );
    }

    #[test]
    fn ranges_are_cut_into_blocks_named_by_their_first_address() {
        let blocks = blocks_of(&[AddressRange {
            first: Ipv4Addr::new(10, 0, 0, 10),
            last: Ipv4Addr::new(10, 0, 0, 200),
        }]);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0].last, Ipv4Addr::new(10, 0, 0, 73));
        assert_eq!(blocks[2].first, Ipv4Addr::new(10, 0, 0, 138));
        assert_eq!(blocks[2].last, Ipv4Addr::new(10, 0, 0, 200));
    }

    #[test]
    fn a_batch_answer_splits_into_committed_and_refused_proposals() {
        let ids = [ProposalId(1), ProposalId(2), ProposalId(3)];
        let events = outcome_events(
            &ids,
            MeshResponse::Leases(vec![
                LeaseOutcome::Committed,
                LeaseOutcome::AddressHeld { until_unix_secs: 9 },
                LeaseOutcome::Committed,
            ]),
        );
        assert_eq!(
            events[0],
            LeaseEvent::Committed(vec![ProposalId(1), ProposalId(3)])
        );
        assert!(matches!(events[1], LeaseEvent::Refused(ProposalId(2), _)));
        assert!(matches!(
            outcome_events(&ids, MeshResponse::Applied)[0],
            LeaseEvent::Failed(_, _)
        ));
    }
}
