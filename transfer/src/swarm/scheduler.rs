//! What to ask whom (DESIGN 5.3): boot-critical chunks first in their order, then the rarest
//! among the peers this node knows, a bound on requests in flight per peer, a bounded endgame
//! that asks a second peer for the last chunks and cancels the loser, a pause for a peer that
//! let a request time out, and a ban for a peer that sent a chunk whose hash was wrong.
//!
//! Sans-IO: the driver reports what happened (`handle_*`, each with the time), carries out the
//! actions it polls, and wakes the scheduler at `poll_timeout`. The driver verifies every chunk
//! against the manifest and says which way it went; the scheduler never sees bytes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::bitfield::Bitfield;
use super::wire::Priority;

/// A peer, as the driver numbers them.
pub type PeerId = u64;

/// Bounds and pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests one peer may have outstanding: enough that one fast peer's link stays busy
    /// while each chunk is read, verified and stored at either end.
    pub requests_per_peer: usize,
    /// How long a request may go without its peer answering anything (this request or
    /// another) before the peer is paused: a busy seed that keeps sending is slow, not stuck.
    pub request_timeout: Duration,
    /// How long a paused peer is left alone.
    pub pause_after_timeout: Duration,
    /// Peers asked for one chunk at once in the endgame (the first ask included).
    pub endgame_copies_max: usize,
    /// Peers known at once.
    pub peers_max: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            requests_per_peer: 8,
            request_timeout: Duration::from_secs(5),
            pause_after_timeout: Duration::from_secs(10),
            endgame_copies_max: 2,
            peers_max: 64,
        }
    }
}

/// How a chunk a peer sent turned out against the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkArrival {
    /// Its hash and length match: stored.
    Verified,
    /// It is not what the manifest names.
    Corrupt,
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAction {
    /// Ask `peer` for chunk `index`.
    Request {
        /// Whom.
        peer: PeerId,
        /// Which chunk.
        index: u32,
        /// How urgent.
        priority: Priority,
    },
    /// Tell `peer` the request for `index` is no longer needed.
    Cancel {
        /// Whom.
        peer: PeerId,
        /// Which chunk.
        index: u32,
    },
    /// Drop `peer` for good and report it: it sent a chunk whose hash was wrong.
    Ban {
        /// Whom.
        peer: PeerId,
        /// The chunk it got wrong.
        index: u32,
    },
    /// Every chunk is held (reported once).
    Complete,
}

/// Input the scheduler refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// A bitfield for another image size.
    #[error("a bitfield of {actual} chunks for an image of {expected}")]
    BitfieldLength {
        /// Chunks in the image.
        expected: u32,
        /// Chunks in the bitfield.
        actual: u32,
    },
    /// A chunk index past the end of the image.
    #[error("chunk {index} is past the image's {count} chunks")]
    IndexOutOfRange {
        /// The index.
        index: u32,
        /// Chunks in the image.
        count: u32,
    },
    /// The peer was banned.
    #[error("peer {0} is banned")]
    Banned(PeerId),
    /// [`SchedulerConfig::peers_max`] peers are known already.
    #[error("{0} peers known already")]
    TooManyPeers(usize),
}

#[derive(Debug)]
struct Peer {
    have: Bitfield,
    /// It held the whole image when it came (a server, or a node that finished earlier).
    seed: bool,
    /// The tracker placed it in this node's rack.
    same_rack: bool,
    /// Orders the seeds alike on every fetcher (from the seed's address): seed r of k is
    /// asked first for the chunks j with j mod k = r, so that several seeds split the first
    /// copies of an image instead of each sending the same chunks.
    order_key: u64,
    /// Chunks asked of it, with when.
    asked: BTreeMap<u32, Instant>,
    /// Chunks it declined for now ("busy, others have it"), and until when.
    declined_until: BTreeMap<u32, Instant>,
    /// The keys of `declined_until`, for a search that tests every chunk.
    declined: Bitfield,
    /// The earliest of `declined_until`'s times: the next time a decline lapses. Kept so that
    /// neither the wake-up time nor a timeout pass walks every decline of every peer (a fetch
    /// asks for its wake-up after every event).
    declined_next: Option<Instant>,
    paused_until: Option<Instant>,
    /// When it last answered a request (a chunk, "busy", "not here", a decline).
    last_answer: Option<Instant>,
    /// The scheduler's generation when a search found nothing to ask it for: until something
    /// changes that could make a chunk wanted from it, it is not searched again (the search
    /// is linear in the image's chunks, and most events change nothing for most peers).
    idle_at: Option<u64>,
}

/// One node's fetch of one image.
#[derive(Debug)]
pub struct FetchScheduler {
    config: SchedulerConfig,
    held: Bitfield,
    /// Boot-critical chunks, in the order a boot needs them.
    critical_order: Vec<u32>,
    critical: Bitfield,
    /// Chunks a reader is blocked on now (lazy mode), first come first.
    demanded: VecDeque<u32>,
    /// Per chunk: how many known peers hold it.
    availability: Vec<u32>,
    /// Per chunk: how many known peers that are not seeds (fetchers like this one) hold it.
    /// A seed is asked only for chunks no fetcher holds: every copy a seed uploads is then a
    /// new one in the swarm, and the rest spreads among the fetchers, so a boot storm costs
    /// the seeds about one copy of the image instead of one per node.
    held_by_fetchers: Vec<u32>,
    /// Per chunk: how many fetchers in this node's rack hold it. A fetcher in another rack
    /// is asked only for chunks none of them holds, the same rule one level up: each chunk
    /// crosses into a rack about once, and the rack shares it on its own links instead of
    /// the uplinks. Without racks (nobody placed) it is always 0 and changes nothing.
    held_in_rack: Vec<u32>,
    /// Per chunk in flight: the peers asked.
    in_flight: BTreeMap<u32, BTreeSet<PeerId>>,
    /// The keys of `in_flight`, for a search that tests every chunk.
    in_flight_bits: Bitfield,
    peers: BTreeMap<PeerId, Peer>,
    banned: BTreeSet<PeerId>,
    /// Mixes rarest-first ties, so fetchers started together spread over the chunks.
    tie_break: u64,
    actions: VecDeque<FetchAction>,
    complete_reported: bool,
    /// Bumped by every event that can make a chunk wanted from any peer (see `Peer::idle_at`).
    generation: u64,
}

/// A seed's key among the seeds ([`FetchScheduler::handle_peer_order_key`]): derived from the
/// address it is reached at, so every fetcher that reaches it there orders the seeds alike.
pub fn seed_order_key(address: std::net::SocketAddr) -> u64 {
    let hash = crate::ContentHash::of(address.to_string().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

/// A 64-bit mix (splitmix64's finaliser): a fixed permutation, no randomness.
fn mix(value: u64) -> u64 {
    let mut mixed = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mixed ^ (mixed >> 31)
}

impl FetchScheduler {
    /// A fetch of an image of `held.len()` chunks, of which `held` are here already;
    /// `boot_critical` first, in that order; `tie_break` from the driver's seeded randomness.
    pub fn new(
        config: SchedulerConfig,
        held: Bitfield,
        boot_critical: &[u32],
        tie_break: u64,
    ) -> Result<Self, SchedulerError> {
        let count = held.len();
        let mut critical = Bitfield::empty(count);
        let mut critical_order = Vec::new();
        for &index in boot_critical {
            if index >= count {
                return Err(SchedulerError::IndexOutOfRange { index, count });
            }
            if critical.insert(index) {
                critical_order.push(index);
            }
        }
        let mut scheduler = Self {
            config,
            availability: vec![0; count as usize],
            held_by_fetchers: vec![0; count as usize],
            held_in_rack: vec![0; count as usize],
            held,
            critical_order,
            critical,
            demanded: VecDeque::new(),
            in_flight: BTreeMap::new(),
            in_flight_bits: Bitfield::empty(count),
            peers: BTreeMap::new(),
            banned: BTreeSet::new(),
            tie_break,
            actions: VecDeque::new(),
            complete_reported: false,
            generation: 0,
        };
        scheduler.check_complete();
        Ok(scheduler)
    }

    /// The chunks held.
    pub fn held(&self) -> &Bitfield {
        &self.held
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.held.is_complete()
    }

    /// Requests outstanding, all peers together.
    pub fn requests_in_flight(&self) -> usize {
        self.peers.values().map(|peer| peer.asked.len()).sum()
    }

    fn check_index(&self, index: u32) -> Result<(), SchedulerError> {
        if index >= self.held.len() {
            return Err(SchedulerError::IndexOutOfRange {
                index,
                count: self.held.len(),
            });
        }
        Ok(())
    }

    /// `peer` holds `have` (its first HAVE, or a new one replacing it).
    pub fn handle_peer(
        &mut self,
        now: Instant,
        peer: PeerId,
        have: Bitfield,
    ) -> Result<(), SchedulerError> {
        self.generation += 1;
        if self.banned.contains(&peer) {
            return Err(SchedulerError::Banned(peer));
        }
        if have.len() != self.held.len() {
            return Err(SchedulerError::BitfieldLength {
                expected: self.held.len(),
                actual: have.len(),
            });
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.config.peers_max {
            return Err(SchedulerError::TooManyPeers(self.peers.len()));
        }
        let (seed, same_rack) = match self.peers.get(&peer) {
            Some(known) => (known.seed, known.same_rack),
            None => (have.is_complete(), false),
        };
        for index in have.iter() {
            self.count_holder(index, seed, same_rack, true);
        }
        match self.peers.get_mut(&peer) {
            Some(known) => {
                let old = std::mem::replace(&mut known.have, have);
                for index in old.iter() {
                    self.count_holder(index, seed, same_rack, false);
                }
            }
            None => {
                self.peers.insert(
                    peer,
                    Peer {
                        have,
                        seed,
                        same_rack,
                        order_key: mix(peer),
                        asked: BTreeMap::new(),
                        declined_until: BTreeMap::new(),
                        declined: Bitfield::empty(self.held.len()),
                        declined_next: None,
                        paused_until: None,
                        last_answer: None,
                        idle_at: None,
                    },
                );
            }
        }
        self.schedule(now);
        Ok(())
    }

    /// `peer` now holds chunk `index` too.
    pub fn handle_have_chunk(
        &mut self,
        now: Instant,
        peer: PeerId,
        index: u32,
    ) -> Result<(), SchedulerError> {
        self.check_index(index)?;
        if let Some(known) = self.peers.get_mut(&peer)
            && known.have.insert(index)
        {
            // More holders of one chunk make nothing wanted from another peer; only this one
            // may now have something to ask for.
            known.idle_at = None;
            let (seed, same_rack) = (known.seed, known.same_rack);
            self.count_holder(index, seed, same_rack, true);
            self.schedule(now);
        }
        Ok(())
    }

    /// The tracker placed `peer` in this node's rack (`same_rack`) or not. Peers start out
    /// placed elsewhere.
    pub fn handle_peer_place(&mut self, now: Instant, peer: PeerId, same_rack: bool) {
        self.generation += 1;
        let Some(known) = self.peers.get_mut(&peer) else {
            return;
        };
        if known.same_rack == same_rack {
            return;
        }
        known.same_rack = same_rack;
        let (seed, have) = (known.seed, known.have.clone());
        for index in have.iter() {
            self.count_holder(index, seed, !same_rack, false);
            self.count_holder(index, seed, same_rack, true);
        }
        self.schedule(now);
    }

    /// `peer`'s place among the seeds: the same key for the same seed on every fetcher (a
    /// hash of its address). Until told, a seed's key is derived from its local id.
    pub fn handle_peer_order_key(&mut self, now: Instant, peer: PeerId, key: u64) {
        if let Some(known) = self.peers.get_mut(&peer)
            && known.order_key != key
        {
            known.order_key = key;
            self.generation += 1;
            self.schedule(now);
        }
    }

    /// Counts a holder of chunk `index` in (`add`) or out.
    fn count_holder(&mut self, index: u32, seed: bool, same_rack: bool, add: bool) {
        let index = index as usize;
        let step = |counter: &mut u32| {
            if add {
                *counter += 1;
            } else {
                *counter -= 1;
            }
        };
        step(&mut self.availability[index]);
        if !seed {
            step(&mut self.held_by_fetchers[index]);
            if same_rack {
                step(&mut self.held_in_rack[index]);
            }
        }
    }

    /// `peer` is gone (its connection closed): what was asked of it is asked elsewhere.
    pub fn handle_peer_gone(&mut self, now: Instant, peer: PeerId) {
        self.generation += 1;
        self.forget_peer(peer);
        self.schedule(now);
    }

    fn forget_peer(&mut self, peer: PeerId) {
        let Some(gone) = self.peers.remove(&peer) else {
            return;
        };
        for index in gone.have.iter() {
            self.count_holder(index, gone.seed, gone.same_rack, false);
        }
        for index in gone.asked.keys() {
            self.drop_request(*index, peer);
        }
    }

    fn drop_request(&mut self, index: u32, peer: PeerId) {
        if let Some(asked) = self.in_flight.get_mut(&index) {
            asked.remove(&peer);
            if asked.is_empty() {
                self.in_flight.remove(&index);
                self.in_flight_bits.remove(index);
            }
        }
    }

    /// A reader is blocked on chunk `index` (lazy mode): it goes before everything else.
    pub fn handle_demand(&mut self, now: Instant, index: u32) -> Result<(), SchedulerError> {
        self.check_index(index)?;
        self.generation += 1;
        if !self.held.contains(index) && !self.demanded.contains(&index) {
            self.demanded.push_back(index);
            self.schedule(now);
        }
        Ok(())
    }

    /// `peer` sent chunk `index`, and the driver checked it.
    pub fn handle_chunk(
        &mut self,
        now: Instant,
        peer: PeerId,
        index: u32,
        arrival: ChunkArrival,
    ) -> Result<(), SchedulerError> {
        self.check_index(index)?;
        if let Some(known) = self.peers.get_mut(&peer) {
            known.asked.remove(&index);
            known.last_answer = Some(now);
        }
        self.drop_request(index, peer);
        match arrival {
            ChunkArrival::Verified => {
                if self.held.insert(index) {
                    self.demanded.retain(|demanded| *demanded != index);
                    // The endgame's other copies are not needed any more.
                    self.in_flight_bits.remove(index);
                    if let Some(others) = self.in_flight.remove(&index) {
                        for other in others {
                            if let Some(known) = self.peers.get_mut(&other) {
                                known.asked.remove(&index);
                            }
                            self.actions
                                .push_back(FetchAction::Cancel { peer: other, index });
                        }
                    }
                    self.check_complete();
                }
            }
            ChunkArrival::Corrupt => {
                self.generation += 1;
                self.forget_peer(peer);
                self.banned.insert(peer);
                self.actions.push_back(FetchAction::Ban { peer, index });
            }
        }
        self.schedule(now);
        Ok(())
    }

    /// `peer` answered the request for `index` with "busy" or "not here": it is paused for
    /// `retry_after` (busy), or marked as not holding the chunk (not here).
    pub fn handle_refused(
        &mut self,
        now: Instant,
        peer: PeerId,
        index: u32,
        retry_after: Option<Duration>,
    ) -> Result<(), SchedulerError> {
        self.check_index(index)?;
        if let Some(known) = self.peers.get_mut(&peer) {
            known.asked.remove(&index);
            known.last_answer = Some(now);
            match retry_after {
                Some(pause) => known.paused_until = Some(now + pause),
                None => {
                    if known.have.remove(index) {
                        let (seed, same_rack) = (known.seed, known.same_rack);
                        self.count_holder(index, seed, same_rack, false);
                    }
                }
            }
        }
        self.drop_request(index, peer);
        self.chunk_freed(index);
        self.schedule(now);
        Ok(())
    }

    /// `peer` declined chunk `index` for now and named others that have it (a seed that sent
    /// it to someone a moment ago): `peer` is not asked for that chunk again before
    /// `retry_after` has passed, but stays in use for the others.
    pub fn handle_declined(
        &mut self,
        now: Instant,
        peer: PeerId,
        index: u32,
        retry_after: Duration,
    ) -> Result<(), SchedulerError> {
        self.check_index(index)?;
        if let Some(known) = self.peers.get_mut(&peer) {
            known.asked.remove(&index);
            known.last_answer = Some(now);
            let until = now + retry_after;
            let replaced = known.declined_until.insert(index, until);
            known.declined.insert(index);
            known.declined_next = if replaced.is_some() && replaced == known.declined_next {
                // The earliest decline was moved: find the earliest again.
                known.declined_until.values().min().copied()
            } else {
                Some(known.declined_next.map_or(until, |next| next.min(until)))
            };
        }
        self.drop_request(index, peer);
        self.chunk_freed(index);
        self.schedule(now);
        Ok(())
    }

    /// Time passed: requests older than the timeout are cancelled, their peers paused.
    pub fn handle_timeout(&mut self, now: Instant) {
        let timeout = self.config.request_timeout;
        let mut late: Vec<(PeerId, Vec<u32>)> = Vec::new();
        for (id, peer) in &mut self.peers {
            if peer.paused_until.is_some_and(|until| until <= now) {
                peer.paused_until = None;
                peer.idle_at = None;
            }
            if peer.declined_next.is_some_and(|next| next <= now) {
                let bits = &mut peer.declined;
                peer.declined_until.retain(|index, until| {
                    let keep = *until > now;
                    if !keep {
                        bits.remove(*index);
                    }
                    keep
                });
                peer.declined_next = peer.declined_until.values().min().copied();
                // A chunk it declined may be asked of it again.
                peer.idle_at = None;
            }
            let last_answer = peer.last_answer;
            let expired: Vec<u32> = peer
                .asked
                .iter()
                .filter(|(_, asked_at)| {
                    let since = last_answer.map_or(**asked_at, |answer| answer.max(**asked_at));
                    now.saturating_duration_since(since) >= timeout
                })
                .map(|(index, _)| *index)
                .collect();
            if !expired.is_empty() {
                peer.paused_until = Some(now + self.config.pause_after_timeout);
                // Everything it holds for us goes elsewhere: it is slow or gone.
                late.push((*id, peer.asked.keys().copied().collect()));
                peer.asked.clear();
            }
        }
        for (peer, indexes) in late {
            for index in indexes {
                self.drop_request(index, peer);
                self.chunk_freed(index);
                self.actions.push_back(FetchAction::Cancel { peer, index });
            }
        }
        self.schedule(now);
    }

    /// Chunk `index` is no longer asked of some peer (or one fewer peer holds it): a peer
    /// found idle may now be asked for it.
    fn chunk_freed(&mut self, index: u32) {
        for peer in self.peers.values_mut() {
            if peer.idle_at.is_some() && peer.have.contains(index) {
                peer.idle_at = None;
            }
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A request times out a timeout after the later of its asking and the peer's last
        // answer; the earliest of a peer's is that of its oldest request.
        let deadlines = self.peers.values().flat_map(|peer| {
            let oldest_request = peer.asked.values().min().map(|asked_at| {
                peer.last_answer
                    .map_or(*asked_at, |answer| answer.max(*asked_at))
                    + self.config.request_timeout
            });
            [oldest_request, peer.paused_until, peer.declined_next]
                .into_iter()
                .flatten()
        });
        deadlines.min()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<FetchAction> {
        self.actions.pop_front()
    }

    fn check_complete(&mut self) {
        if self.held.is_complete() && !self.complete_reported {
            self.complete_reported = true;
            self.actions.push_back(FetchAction::Complete);
        }
    }

    /// Fills every usable peer's request slots.
    fn schedule(&mut self, now: Instant) {
        if self.held.is_complete() {
            return;
        }
        let endgame_before = self.unasked() == 0;
        self.schedule_pass(now);
        // Requests made in this pass may have asked for the last unasked chunks: the endgame
        // begins, and peers found idle before it may now take second copies.
        if !endgame_before && self.unasked() == 0 {
            self.generation += 1;
            self.schedule_pass(now);
        }
    }

    /// Chunks neither held nor asked for anywhere.
    fn unasked(&self) -> u32 {
        self.held.len() - self.held.count() - self.in_flight.len() as u32
    }

    fn schedule_pass(&mut self, now: Instant) {
        let mut seed_keys: Vec<u64> = self
            .peers
            .values()
            .filter(|peer| peer.seed)
            .map(|peer| peer.order_key)
            .collect();
        seed_keys.sort_unstable();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            while let Some(peer) = self.peers.get(&id) {
                if peer.asked.len() >= self.config.requests_per_peer
                    || peer.paused_until.is_some_and(|until| until > now)
                    || peer.idle_at == Some(self.generation)
                {
                    break;
                }
                let Some((index, priority)) = self.pick_for(id, now, &seed_keys) else {
                    let generation = self.generation;
                    if let Some(peer) = self.peers.get_mut(&id) {
                        peer.idle_at = Some(generation);
                    }
                    break;
                };
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.asked.insert(index, now);
                }
                self.in_flight.entry(index).or_default().insert(id);
                self.in_flight_bits.insert(index);
                self.actions.push_back(FetchAction::Request {
                    peer: id,
                    index,
                    priority,
                });
            }
        }
    }

    /// The chunks `peer` could be asked for now, ascending: it holds them, this node does
    /// not, none is in flight, and any decline of it has lapsed (what `pick_for`'s `wanted`
    /// says of one chunk, for 64 at a time: the search runs for every peer after every event).
    fn wanted_of<'a>(&'a self, peer: &'a Peer, now: Instant) -> impl Iterator<Item = u32> + 'a {
        let held = self.held.words();
        let in_flight = self.in_flight_bits.words();
        let declined = peer.declined.words();
        peer.have
            .words()
            .iter()
            .enumerate()
            .flat_map(move |(word, have)| {
                let at = |bits: &[u64]| bits.get(word).copied().unwrap_or(0);
                let mut bits = have & !at(held) & !at(in_flight);
                let mut still_declined = bits & at(declined);
                while still_declined != 0 {
                    let bit = still_declined.trailing_zeros();
                    still_declined &= still_declined - 1;
                    let index = word as u32 * 64 + bit;
                    if peer
                        .declined_until
                        .get(&index)
                        .is_some_and(|until| *until > now)
                    {
                        bits &= !(1 << bit);
                    }
                }
                std::iter::from_fn(move || {
                    (bits != 0).then(|| {
                        let bit = bits.trailing_zeros();
                        bits &= bits - 1;
                        word as u32 * 64 + bit
                    })
                })
            })
    }

    /// The chunk to ask `id` for next, if any.
    fn pick_for(&self, id: PeerId, now: Instant, seed_keys: &[u64]) -> Option<(u32, Priority)> {
        let peer = self.peers.get(&id)?;
        let wanted = |index: u32| {
            !self.held.contains(index)
                && peer.have.contains(index)
                && !self.in_flight_bits.contains(index)
                && (!peer.declined.contains(index)
                    || peer
                        .declined_until
                        .get(&index)
                        .is_none_or(|until| *until <= now))
        };
        if let Some(index) = self.demanded.iter().copied().find(|index| wanted(*index)) {
            return Some((index, Priority::OnDemand));
        }
        if let Some(index) = self
            .critical_order
            .iter()
            .copied()
            .find(|index| wanted(*index))
        {
            return Some((index, Priority::BootTrace));
        }
        // A seed only for what no fetcher holds (see `held_by_fetchers`), a fetcher in another
        // rack only for what no fetcher in this one holds (`held_in_rack`). Boot-critical and
        // on-demand chunks above, and the endgame below, take any peer: they are about this
        // node's boot, not the swarm's economy.
        // A seed's share of the first copies: its rank r among the k seeds known, by key.
        let (seed_rank, seeds) = if peer.seed {
            let rank = seed_keys
                .iter()
                .position(|key| *key == peer.order_key)
                .unwrap_or(0);
            (rank as u32, seed_keys.len().max(1) as u32)
        } else {
            (0, 1)
        };
        let rarest = self
            .wanted_of(peer, now)
            .filter(|index| !peer.seed || self.held_by_fetchers[*index as usize] == 0)
            .filter(|index| peer.seed || peer.same_rack || self.held_in_rack[*index as usize] == 0)
            .min_by_key(|index| {
                (
                    *index % seeds != seed_rank,
                    self.availability[*index as usize],
                    mix(u64::from(*index) ^ self.tie_break),
                )
            });
        if let Some(index) = rarest {
            return Some((index, self.priority_of(index)));
        }
        // Endgame: only once every missing chunk is asked for somewhere, a second peer is
        // asked for the one asked longest ago, and the first answer cancels the other.
        if self.unasked() > 0 {
            return None;
        }
        self.in_flight
            .iter()
            .filter(|(index, asked)| {
                asked.len() < self.config.endgame_copies_max
                    && !asked.contains(&id)
                    && peer.have.contains(**index)
            })
            .min_by_key(|(index, asked)| {
                asked
                    .iter()
                    .filter_map(|other| self.peers.get(other)?.asked.get(index).copied())
                    .min()
            })
            .map(|(index, _)| (*index, self.priority_of(*index)))
    }

    fn priority_of(&self, index: u32) -> Priority {
        if self.demanded.contains(&index) {
            Priority::OnDemand
        } else if self.critical.contains(index) {
            Priority::BootTrace
        } else {
            Priority::Background
        }
    }
}

#[cfg(test)]
#[expect(clippy::panic, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    /// The origin of virtual time; nothing depends on its value.
    #[expect(
        clippy::disallowed_methods,
        reason = "an Instant can only be made from the clock; the scheduler never reads it"
    )]
    fn virtual_start() -> Instant {
        Instant::now()
    }

    fn drain(scheduler: &mut FetchScheduler) -> Vec<FetchAction> {
        std::iter::from_fn(|| scheduler.poll_action()).collect()
    }

    fn requests(actions: &[FetchAction]) -> Vec<(PeerId, u32)> {
        actions
            .iter()
            .filter_map(|action| match action {
                FetchAction::Request { peer, index, .. } => Some((*peer, *index)),
                _ => None,
            })
            .collect()
    }

    fn with(count: u32, indexes: &[u32]) -> Bitfield {
        let mut field = Bitfield::empty(count);
        for index in indexes {
            field.insert(*index);
        }
        field
    }

    #[test]
    fn boot_critical_chunks_go_first_in_order_then_the_rarest() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 3,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(10), &[7, 2], 1).unwrap();
        scheduler
            .handle_peer(now, 1, with(10, &[0, 1, 2, 3, 4, 5, 6, 7, 8]))
            .unwrap();
        let first = drain(&mut scheduler);
        assert_eq!(
            first[..2],
            [
                FetchAction::Request {
                    peer: 1,
                    index: 7,
                    priority: Priority::BootTrace
                },
                FetchAction::Request {
                    peer: 1,
                    index: 2,
                    priority: Priority::BootTrace
                },
            ]
        );
        assert_eq!(requests(&first).len(), 3, "bounded per peer");
        // Peer 2 holds everything: chunk 9, which only it holds, is the rarest.
        scheduler.handle_peer(now, 2, Bitfield::full(10)).unwrap();
        let second = drain(&mut scheduler);
        assert_eq!(
            second.first(),
            Some(&FetchAction::Request {
                peer: 2,
                index: 9,
                priority: Priority::Background
            })
        );
        // A seed is asked for nothing a fetcher holds: chunk 9 is all it gets.
        assert_eq!(requests(&second), vec![(2, 9)]);
        assert_eq!(scheduler.requests_in_flight(), 4);
    }

    #[test]
    fn two_seeds_split_the_first_copies_by_chunk_number() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 3,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(60), &[], 9).unwrap();
        // Keys as every fetcher would derive them from the seeds' addresses: peer 7 ranks
        // first, peer 3 second, whatever the local ids.
        scheduler.handle_peer(now, 3, Bitfield::full(60)).unwrap();
        scheduler.handle_peer_order_key(now, 3, 200);
        scheduler.handle_peer(now, 7, Bitfield::full(60)).unwrap();
        scheduler.handle_peer_order_key(now, 7, 100);
        // What went out before both keys were known is answered; from then on each seed is
        // asked only for its share while its share lasts.
        let mut answered = requests(&drain(&mut scheduler));
        let mut asked: Vec<(PeerId, u32)> = Vec::new();
        for _ in 0..2 {
            for (peer, index) in std::mem::take(&mut answered) {
                scheduler
                    .handle_chunk(now, peer, index, ChunkArrival::Verified)
                    .unwrap();
            }
            answered = requests(&drain(&mut scheduler));
            asked.extend(answered.iter().copied());
        }
        assert!(!asked.is_empty());
        for (peer, index) in &asked {
            let expected_rank = if *peer == 7 { 0 } else { 1 };
            assert_eq!(index % 2, expected_rank, "{asked:?}");
        }
    }

    #[test]
    fn a_fetcher_in_another_rack_is_asked_only_for_what_this_rack_lacks() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 8,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(8), &[], 5).unwrap();
        // Peer 1 is in this rack and holds chunks 0-3; peer 2, in another rack, holds all but
        // chunk 7 (a fetcher, not a seed).
        scheduler
            .handle_peer(now, 1, with(8, &[0, 1, 2, 3]))
            .unwrap();
        scheduler.handle_peer_place(now, 1, true);
        scheduler
            .handle_peer(now, 2, with(8, &[0, 1, 2, 3, 4, 5, 6]))
            .unwrap();
        let asked = requests(&drain(&mut scheduler));
        let mut from_other_rack: Vec<u32> = asked
            .iter()
            .filter(|(peer, _)| *peer == 2)
            .map(|(_, index)| *index)
            .collect();
        from_other_rack.sort_unstable();
        assert_eq!(from_other_rack, [4, 5, 6], "{asked:?}");
        let mut from_rack: Vec<u32> = asked
            .iter()
            .filter(|(peer, _)| *peer == 1)
            .map(|(_, index)| *index)
            .collect();
        from_rack.sort_unstable();
        assert_eq!(from_rack, [0, 1, 2, 3]);
        // Placed elsewhere after all: it counts as any other fetcher again, and nothing of
        // what is in flight is asked twice.
        scheduler.handle_peer_place(now, 1, false);
        assert!(requests(&drain(&mut scheduler)).is_empty());
    }

    #[test]
    fn a_seed_is_asked_only_for_what_no_fetcher_holds_until_the_endgame() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 1,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(6), &[], 3).unwrap();
        // Peer 2 is a fetcher holding chunks 1 and 2; peer 1 a seed (the whole image).
        scheduler.handle_peer(now, 2, with(6, &[1, 2])).unwrap();
        let [(2, from_fetcher)] = requests(&drain(&mut scheduler))[..] else {
            panic!("one request to the fetcher");
        };
        assert!([1, 2].contains(&from_fetcher));
        scheduler.handle_peer(now, 1, Bitfield::full(6)).unwrap();
        let mut from_seed = Vec::new();
        // The fetcher gains chunk 3 before the seed is asked for it.
        scheduler.handle_have_chunk(now, 2, 3).unwrap();
        loop {
            let asked = requests(&drain(&mut scheduler));
            let Some(&(peer, index)) = asked.iter().find(|(peer, _)| *peer == 1) else {
                break;
            };
            assert_eq!(peer, 1);
            from_seed.push(index);
            scheduler
                .handle_chunk(now, 1, index, ChunkArrival::Verified)
                .unwrap();
        }
        from_seed.sort_unstable();
        // Chunks 0, 4 and 5: nobody but the seed holds them. Then, with every missing chunk
        // asked somewhere, the endgame may ask the seed for a second copy of the one the
        // fetcher is still sending.
        assert_eq!(from_seed[..3], [0, 4, 5], "{from_seed:?}");
        assert!(from_seed.len() <= 4);
        for extra in &from_seed[3..] {
            assert_eq!(
                *extra, from_fetcher,
                "only as an endgame copy: {from_seed:?}"
            );
        }
    }

    #[test]
    fn a_declined_chunk_is_asked_elsewhere_and_of_the_same_peer_again_only_later() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 1,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(2), &[], 9).unwrap();
        scheduler.handle_peer(now, 1, Bitfield::full(2)).unwrap();
        let [(1, first)] = requests(&drain(&mut scheduler))[..] else {
            panic!("one request");
        };
        let pause = Duration::from_secs(2);
        scheduler.handle_declined(now, 1, first, pause).unwrap();
        // The peer is still used, for the other chunk.
        assert_eq!(requests(&drain(&mut scheduler)), vec![(1, 1 - first)]);
        scheduler
            .handle_chunk(now, 1, 1 - first, ChunkArrival::Verified)
            .unwrap();
        assert_eq!(requests(&drain(&mut scheduler)), vec![], "declined for now");
        assert_eq!(scheduler.poll_timeout(), Some(now + pause));
        scheduler.handle_timeout(now + pause);
        assert_eq!(requests(&drain(&mut scheduler)), vec![(1, first)]);
    }

    #[test]
    fn a_corrupt_chunk_bans_its_peer_and_is_asked_elsewhere() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 1,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(2), &[], 5).unwrap();
        scheduler.handle_peer(now, 1, Bitfield::full(2)).unwrap();
        let asked = requests(&drain(&mut scheduler));
        let (_, index) = asked[0];
        scheduler
            .handle_chunk(now, 1, index, ChunkArrival::Corrupt)
            .unwrap();
        let actions = drain(&mut scheduler);
        assert_eq!(actions, vec![FetchAction::Ban { peer: 1, index }]);
        assert!(!scheduler.held().contains(index));
        assert_eq!(
            scheduler.handle_peer(now, 1, Bitfield::full(2)),
            Err(SchedulerError::Banned(1))
        );
        scheduler.handle_peer(now, 2, Bitfield::full(2)).unwrap();
        assert!(requests(&drain(&mut scheduler)).contains(&(2, index)));
    }

    #[test]
    fn a_peer_that_times_out_is_paused_and_its_requests_go_elsewhere() {
        let start = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 2,
            request_timeout: Duration::from_secs(5),
            pause_after_timeout: Duration::from_secs(10),
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(4), &[], 9).unwrap();
        scheduler.handle_peer(start, 1, Bitfield::full(4)).unwrap();
        let to_one = requests(&drain(&mut scheduler));
        assert_eq!(to_one.len(), 2);
        scheduler.handle_peer(start, 2, Bitfield::full(4)).unwrap();
        let to_two = requests(&drain(&mut scheduler));
        assert_eq!(to_two.len(), 2);
        assert_eq!(
            scheduler.poll_timeout(),
            Some(start + Duration::from_secs(5))
        );
        // Peer 2 answers; peer 1 does not.
        let later = start + Duration::from_secs(1);
        for (_, index) in &to_two {
            scheduler
                .handle_chunk(later, 2, *index, ChunkArrival::Verified)
                .unwrap();
        }
        drain(&mut scheduler);
        let timed_out = start + Duration::from_secs(5);
        scheduler.handle_timeout(timed_out);
        let actions = drain(&mut scheduler);
        for (_, index) in &to_one {
            assert!(actions.contains(&FetchAction::Cancel {
                peer: 1,
                index: *index
            }));
            // Asked of peer 2 now (or already, as the endgame's second copy), of peer 1 no more.
            assert_eq!(
                scheduler.in_flight.get(index),
                Some(&BTreeSet::from([2])),
                "{actions:?}"
            );
        }
        // Paused: nothing goes to peer 1 until the pause ends.
        assert!(!requests(&actions).iter().any(|(peer, _)| *peer == 1));
        assert!(
            scheduler
                .poll_timeout()
                .is_some_and(|deadline| deadline <= timed_out + Duration::from_secs(10))
        );
    }

    #[test]
    fn a_busy_peer_that_keeps_answering_is_not_paused() {
        // A seed with a long queue: each request waits longer than the timeout, but the seed
        // sends a chunk every 2 s, so it is slow, not stuck, and stays in use.
        let start = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 4,
            request_timeout: Duration::from_secs(5),
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, Bitfield::empty(8), &[], 3).unwrap();
        scheduler.handle_peer(start, 1, Bitfield::full(8)).unwrap();
        let mut asked: VecDeque<u32> = requests(&drain(&mut scheduler))
            .into_iter()
            .map(|(_, index)| index)
            .collect();
        let mut now = start;
        while let Some(index) = asked.pop_front() {
            now += Duration::from_secs(2);
            if let Some(deadline) = scheduler.poll_timeout()
                && deadline <= now
            {
                scheduler.handle_timeout(deadline);
            }
            scheduler
                .handle_chunk(now, 1, index, ChunkArrival::Verified)
                .unwrap();
            for action in drain(&mut scheduler) {
                assert!(
                    !matches!(action, FetchAction::Cancel { .. }),
                    "{action:?} at {:?}",
                    now - start
                );
                if let FetchAction::Request { index, .. } = action {
                    asked.push_back(index);
                }
            }
        }
        assert!(scheduler.is_complete());
        // 8 chunks at one every 2 s: the later ones waited 8 s and more.
        assert_eq!(now - start, Duration::from_secs(16));
    }

    #[test]
    fn the_endgame_asks_a_second_peer_and_cancels_the_slower() {
        let now = virtual_start();
        let config = SchedulerConfig {
            requests_per_peer: 1,
            endgame_copies_max: 2,
            ..SchedulerConfig::default()
        };
        let mut scheduler = FetchScheduler::new(config, with(3, &[0, 1]), &[], 3).unwrap();
        scheduler.handle_peer(now, 1, Bitfield::full(3)).unwrap();
        assert_eq!(requests(&drain(&mut scheduler)), vec![(1, 2)]);
        // Peer 2 arrives with nothing left unasked: it gets a copy of the last request.
        scheduler.handle_peer(now, 2, Bitfield::full(3)).unwrap();
        assert_eq!(requests(&drain(&mut scheduler)), vec![(2, 2)]);
        // A third peer gets no third copy.
        scheduler.handle_peer(now, 3, Bitfield::full(3)).unwrap();
        assert!(requests(&drain(&mut scheduler)).is_empty());
        scheduler
            .handle_chunk(now, 2, 2, ChunkArrival::Verified)
            .unwrap();
        assert_eq!(
            drain(&mut scheduler),
            vec![
                FetchAction::Cancel { peer: 1, index: 2 },
                FetchAction::Complete
            ]
        );
        assert_eq!(scheduler.requests_in_flight(), 0);
    }

    #[test]
    fn a_fetch_from_peers_that_come_and_go_completes_once() {
        let start = virtual_start();
        let count = 200;
        let mut scheduler = FetchScheduler::new(
            SchedulerConfig::default(),
            Bitfield::empty(count),
            &[0, 1],
            42,
        )
        .unwrap();
        let halves = [
            (
                1,
                (0..count)
                    .filter(|index| index % 2 == 0)
                    .collect::<Vec<_>>(),
            ),
            (
                2,
                (0..count)
                    .filter(|index| index % 2 == 1)
                    .collect::<Vec<_>>(),
            ),
            (3, (0..count).collect::<Vec<_>>()),
        ];
        for (peer, indexes) in &halves {
            scheduler
                .handle_peer(start, *peer, with(count, indexes))
                .unwrap();
        }
        let mut now = start;
        let mut completes = 0;
        let mut served = BTreeMap::<PeerId, u32>::new();
        for step in 0..10_000 {
            now += Duration::from_millis(10);
            if step == 20 {
                scheduler.handle_peer_gone(now, 3);
            }
            let actions = drain(&mut scheduler);
            if actions.is_empty() && scheduler.is_complete() {
                break;
            }
            for action in actions {
                match action {
                    FetchAction::Request { peer, index, .. } => {
                        if peer == 3 && step >= 20 {
                            continue;
                        }
                        *served.entry(peer).or_default() += 1;
                        scheduler
                            .handle_chunk(now, peer, index, ChunkArrival::Verified)
                            .unwrap();
                    }
                    FetchAction::Complete => completes += 1,
                    FetchAction::Cancel { .. } => {}
                    FetchAction::Ban { .. } => panic!("nobody sent a bad chunk"),
                }
            }
        }
        assert!(scheduler.is_complete());
        assert_eq!(completes, 1);
        // Every chunk once, plus the endgame's second copies: at most one per request slot.
        let extra = served.values().sum::<u32>() - count;
        assert!(extra <= 3 * 4, "{extra} extra chunks: {served:?}");
    }
}
