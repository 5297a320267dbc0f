//! Fetching an image from the swarm: the driver of `transfer::swarm::FetchScheduler`. It dials
//! the peers it was given, takes in every peer that dials it about the same image, carries out
//! the scheduler's requests (one QUIC stream each), verifies each chunk against the manifest
//! before it is stored or announced, and bans a peer that sends a wrong one.
#![allow(
    clippy::disallowed_methods,
    reason = "a driver: it spawns request tasks and reads the clock for the scheduler"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::Connection;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use transfer::swarm::tracker::Neighbours;
use transfer::swarm::wire::FRAME_BYTES_MAX;
use transfer::swarm::{
    Bitfield, ChunkArrival, FetchAction, FetchScheduler, Message, PeerId, Priority,
    SchedulerConfig, data_frame_payload, decode_frame, seed_order_key,
};
use transfer::{ChunkRef, verify_chunk};

use super::peering::{SharedImage, SwarmNode, write_message};
use super::{CLOSE_BANNED, SwarmError};

/// Events the peerings of an image report to its fetch.
#[derive(Debug)]
pub(crate) enum FetchEvent {
    /// A peering is up (dialed or accepted).
    PeerUp {
        peer: PeerId,
        address: SocketAddr,
        connection: Connection,
        have: Bitfield,
    },
    /// The peer holds one more chunk.
    HaveChunk { peer: PeerId, index: u32 },
    /// The peer sent a whole new bitfield.
    PeerHave { peer: PeerId, have: Bitfield },
    /// The peering closed.
    PeerGone { peer: PeerId },
    /// A dial failed.
    DialFailed { address: SocketAddr, error: String },
    /// The image's tracker names these members as neighbours.
    Neighbours(Neighbours),
    /// A reader is blocked on this chunk (a `lazy` root): it goes before everything else.
    Demand { index: u32 },
}

/// Settings of one fetch.
#[derive(Debug, Clone)]
pub struct SwarmFetchConfig {
    /// The scheduler's bounds and pauses.
    pub scheduler: SchedulerConfig,
    /// How long the fetch may go without a chunk arriving, while no peer holds what is
    /// missing or none answers, before it gives up.
    pub stall_timeout: Duration,
    /// Mixes the rarest-first order of this fetcher (from its seeded randomness).
    pub tie_break: u64,
}

impl Default for SwarmFetchConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            stall_timeout: Duration::from_secs(30),
            tie_break: 0,
        }
    }
}

/// What one peer gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// Verified chunks from it.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Chunks from it that failed verification (one bans it).
    pub rejected: u64,
}

/// How a fetch went.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Chunks fetched (not counting those held before).
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Per peer address.
    pub sources: BTreeMap<SocketAddr, SourceReport>,
    /// How long it took.
    pub elapsed: Duration,
}

/// What a request came back with.
enum Answer {
    Verified {
        bytes: u64,
    },
    Corrupt(String),
    Busy(Duration),
    /// Busy for this chunk only: the peer just sent it to others, who have it now.
    Declined(Duration),
    NotHere,
    Failed(String),
    /// The chunk was good but could not be kept: the fetch cannot go on.
    StoreFailed(String),
}

/// The first pause before the given peers are dialled again, and the longest.
const REDIAL_FIRST: Duration = Duration::from_millis(500);
const REDIAL_MAX: Duration = Duration::from_secs(4);
/// Peerings a fetch opens or takes in before it stops dialling the neighbours a tracker
/// names (peers that dial it are still taken in, up to the endpoint's bound).
const PEERS_DIALLED_MAX: usize = 24;
/// Rack-local addresses a fetch remembers (the tracker names at most 16 per answer).
const PEERINGS_NOTED_MAX: usize = 4096;
/// How long a neighbour that could not be dialled is left alone.
const DIAL_FAILED_PAUSE: Duration = Duration::from_secs(10);

struct Peer {
    address: SocketAddr,
    connection: Connection,
}

impl SwarmNode {
    /// Fetches every chunk of `image` that is not held yet, from `peers` and from whoever
    /// dials this member about the image meanwhile, and offers the image to others as it
    /// fills. Returns when every chunk is held and verified.
    pub async fn fetch(
        self: &Arc<Self>,
        image: Arc<SharedImage>,
        peers: &[SocketAddr],
        config: SwarmFetchConfig,
    ) -> Result<FetchReport, SwarmError> {
        let started = Instant::now();
        let manifest = image.image().manifest();
        let total = image.image().chunk_count();
        let stalled = |held: &Bitfield, detail: String| SwarmError::Stalled {
            manifest,
            missing: total - held.count(),
            total,
            detail,
        };
        let mut scheduler = FetchScheduler::new(
            config.scheduler,
            image.held(),
            image.image().boot_critical(),
            config.tie_break,
        )
        .map_err(|error| stalled(&image.held(), error.to_string()))?;
        let (events_sender, mut events) = mpsc::channel(1024);
        image.set_fetch(Some(events_sender.clone()));
        let _unregister = Unregister(Arc::clone(&image));
        self.offer(Arc::clone(&image));

        let own = self.local_addr();
        let peers: Vec<SocketAddr> = peers
            .iter()
            .copied()
            .filter(|address| Some(*address) != own)
            .collect();
        let mut dials = JoinSet::new();
        // Addresses being dialled, and those whose dial failed lately (tracker neighbours).
        let mut dialling: std::collections::BTreeSet<SocketAddr> = peers.iter().copied().collect();
        let mut dial_failed: BTreeMap<SocketAddr, Instant> = BTreeMap::new();
        // Members the tracker placed in this node's rack.
        let mut rack_local: std::collections::BTreeSet<SocketAddr> =
            std::collections::BTreeSet::new();
        self.dial_all(&mut dials, &peers, &image, &events_sender);
        let mut redial_after = REDIAL_FIRST;
        let mut redial_at: Option<Instant> = None;

        let mut report = FetchReport::default();
        let mut known: BTreeMap<PeerId, Peer> = BTreeMap::new();
        // Every peer ever taken in, so that a chunk that arrives just after its peer went
        // is still counted for it.
        let mut addresses: BTreeMap<PeerId, SocketAddr> = BTreeMap::new();
        let mut requests: JoinSet<(PeerId, u32, Answer)> = JoinSet::new();
        let mut in_flight: BTreeMap<(PeerId, u32), AbortHandle> = BTreeMap::new();
        let mut last_progress = Instant::now();
        let mut last_error = String::from("no peer answered");
        loop {
            // The select below is biased (one seed, one simulated run), so a steady stream of
            // answers could keep its timer branch from ever winning: a due timeout is handled
            // here, whichever branch woke the loop.
            let now = Instant::now().into_std();
            if scheduler.poll_timeout().is_some_and(|due| due <= now) {
                scheduler.handle_timeout(now);
            }
            while let Some(action) = scheduler.poll_action() {
                match action {
                    FetchAction::Request {
                        peer,
                        index,
                        priority,
                    } => {
                        let (Some(known_peer), Some(chunk)) =
                            (known.get(&peer), image.image().chunk(index).copied())
                        else {
                            continue;
                        };
                        let connection = known_peer.connection.clone();
                        let image = Arc::clone(&image);
                        let handle = requests.spawn(async move {
                            let answer =
                                request_chunk(&connection, &image, index, chunk, priority).await;
                            (peer, index, answer)
                        });
                        in_flight.insert((peer, index), handle);
                    }
                    FetchAction::Cancel { peer, index } => {
                        if let Some(handle) = in_flight.remove(&(peer, index)) {
                            handle.abort();
                        }
                    }
                    FetchAction::Ban { peer, index } => {
                        if let Some(banned) = known.remove(&peer) {
                            tracing::error!(
                                peer = %banned.address,
                                index,
                                "BANNED peer: it sent a chunk that does not match the manifest"
                            );
                            banned.connection.close(CLOSE_BANNED.into(), b"wrong chunk");
                        }
                    }
                    FetchAction::Complete => {
                        super::shelf::on_shelf(Arc::clone(image.shelf()), |shelf| shelf.sync())
                            .await??;
                        report.elapsed = started.elapsed();
                        tracing::info!(
                            %manifest,
                            chunks = report.chunks,
                            bytes = report.bytes,
                            peers = report.sources.len(),
                            elapsed_ms = report.elapsed.as_millis() as u64,
                            "image complete"
                        );
                        return Ok(report);
                    }
                }
            }
            if last_progress.elapsed() >= config.stall_timeout {
                return Err(stalled(scheduler.held(), last_error));
            }
            // The given peers not peered with are dialled again, less and less often, until
            // they answer or the fetch stalls: a server may be restarting, or not offering
            // the image yet (it was imported a moment ago), while a peer that holds nothing
            // yet (another fetcher) keeps `known` from being empty.
            let unpeered: Vec<SocketAddr> = if dials.is_empty() {
                let peered: std::collections::BTreeSet<SocketAddr> =
                    known.values().map(|peer| peer.address).collect();
                peers
                    .iter()
                    .copied()
                    .filter(|address| !peered.contains(address) && !dialling.contains(address))
                    .collect()
            } else {
                Vec::new()
            };
            if !unpeered.is_empty() {
                let now = Instant::now();
                match redial_at {
                    Some(at) if at <= now => {
                        redial_at = None;
                        dialling.extend(unpeered.iter().copied());
                        self.dial_all(&mut dials, &unpeered, &image, &events_sender);
                        redial_after = (redial_after * 2).min(REDIAL_MAX);
                    }
                    Some(_) => {}
                    None => redial_at = Some(now + redial_after),
                }
            } else {
                // Nothing to redial (all peered, or dials under way). A redial time left
                // over from before would be in the past soon, and the wait below would
                // return at once, again and again: a busy loop for the rest of the fetch.
                // (Found by running the fetch in the simulator, where time does not pass
                // while a task spins.)
                redial_at = None;
            }
            let stall_at = last_progress + config.stall_timeout;
            let wake_at = [scheduler.poll_timeout().map(Instant::from_std), redial_at]
                .into_iter()
                .flatten()
                .fold(stall_at, Instant::min);
            tokio::select! {
                biased;
                event = events.recv() => {
                    let Some(event) = event else {
                        continue;
                    };
                    let now = Instant::now().into_std();
                    match event {
                        FetchEvent::PeerUp { peer, address, connection, have } => {
                            match scheduler.handle_peer(now, peer, have) {
                                Ok(()) => {
                                    if rack_local.contains(&address) {
                                        scheduler.handle_peer_place(now, peer, true);
                                    }
                                    scheduler.handle_peer_order_key(now, peer, seed_order_key(address));
                                    addresses.insert(peer, address);
                                    known.insert(peer, Peer { address, connection });
                                    redial_after = REDIAL_FIRST;
                                }
                                Err(error) => {
                                    tracing::debug!(%address, %error, "peer not taken in");
                                }
                            }
                        }
                        FetchEvent::HaveChunk { peer, index } => {
                            let _unknown = scheduler.handle_have_chunk(now, peer, index);
                        }
                        FetchEvent::Demand { index } => {
                            if let Err(error) = scheduler.handle_demand(now, index) {
                                tracing::warn!(index, %error, "a demand for no chunk of the image");
                            }
                        }
                        FetchEvent::PeerHave { peer, have } => {
                            if known.contains_key(&peer) {
                                let _refused = scheduler.handle_peer(now, peer, have);
                            }
                        }
                        FetchEvent::PeerGone { peer } => {
                            if let Some(gone) = known.remove(&peer) {
                                tracing::info!(peer = %gone.address, "peer gone; its requests go elsewhere");
                                last_error = format!("{} went away", gone.address);
                            }
                            scheduler.handle_peer_gone(now, peer);
                        }
                        FetchEvent::DialFailed { address, error } => {
                            tracing::warn!(peer = %address, %error, "could not reach a peer");
                            dial_failed.insert(address, Instant::now());
                            last_error = error;
                        }
                        FetchEvent::Neighbours(neighbours) => {
                            for address in &neighbours.same_rack {
                                if rack_local.len() < PEERINGS_NOTED_MAX && rack_local.insert(*address) {
                                    for (id, known_peer) in &known {
                                        if known_peer.address == *address {
                                            scheduler.handle_peer_place(now, *id, true);
                                        }
                                    }
                                }
                            }
                            let now = Instant::now();
                            dial_failed.retain(|_, at| now.duration_since(*at) < DIAL_FAILED_PAUSE);
                            let peered: std::collections::BTreeSet<SocketAddr> =
                                known.values().map(|peer| peer.address).collect();
                            let room = PEERS_DIALLED_MAX
                                .saturating_sub(peered.len() + dialling.len());
                            let new: Vec<SocketAddr> = neighbours
                                .all()
                                .filter(|address| {
                                    Some(*address) != own
                                        && !peered.contains(address)
                                        && !dialling.contains(address)
                                        && !dial_failed.contains_key(address)
                                })
                                .take(room)
                                .collect();
                            if !new.is_empty() {
                                tracing::debug!(count = new.len(), "dialling neighbours the tracker named");
                                dialling.extend(new.iter().copied());
                                self.dial_all(&mut dials, &new, &image, &events_sender);
                            }
                        }
                    }
                }
                Some(finished) = requests.join_next() => {
                    let Ok((peer, index, answer)) = finished else {
                        // Aborted (cancelled) requests end here.
                        continue;
                    };
                    in_flight.remove(&(peer, index));
                    let now = Instant::now().into_std();
                    let address = addresses.get(&peer).copied();
                    match answer {
                        Answer::Verified { bytes } => {
                            last_progress = Instant::now();
                            image.mark_held(index);
                            self.stats().chunks_downloaded.fetch_add(1, Ordering::Relaxed);
                            self.stats().bytes_downloaded.fetch_add(bytes, Ordering::Relaxed);
                            if !scheduler.held().contains(index) {
                                report.chunks += 1;
                                report.bytes += bytes;
                                if let Some(address) = address {
                                    let source = report.sources.entry(address).or_default();
                                    source.chunks += 1;
                                    source.bytes += bytes;
                                }
                            }
                            let _out_of_range =
                                scheduler.handle_chunk(now, peer, index, ChunkArrival::Verified);
                        }
                        Answer::Corrupt(reason) => {
                            self.stats().chunks_rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                peer = ?address,
                                index,
                                %reason,
                                "REJECTED chunk: not what the manifest names; nothing of it is kept"
                            );
                            if let Some(address) = address {
                                report.sources.entry(address).or_default().rejected += 1;
                            }
                            last_error = reason;
                            let _out_of_range =
                                scheduler.handle_chunk(now, peer, index, ChunkArrival::Corrupt);
                        }
                        Answer::Busy(retry_after) => {
                            let _out_of_range =
                                scheduler.handle_refused(now, peer, index, Some(retry_after));
                        }
                        Answer::Declined(retry_after) => {
                            let _out_of_range =
                                scheduler.handle_declined(now, peer, index, retry_after);
                        }
                        Answer::NotHere => {
                            let _out_of_range = scheduler.handle_refused(now, peer, index, None);
                        }
                        Answer::StoreFailed(reason) => {
                            return Err(SwarmError::Shelf(reason));
                        }
                        Answer::Failed(reason) => {
                            tracing::debug!(peer = ?address, index, %reason, "request failed");
                            last_error = reason;
                            // Whatever broke (usually the connection) gets a moment; a closed
                            // peering reports itself gone.
                            let _out_of_range = scheduler.handle_refused(
                                now,
                                peer,
                                index,
                                Some(Duration::from_secs(1)),
                            );
                        }
                    }
                }
                Some(dialled) = dials.join_next() => {
                    if let Ok(address) = dialled {
                        dialling.remove(&address);
                    }
                }
                () = tokio::time::sleep_until(wake_at) => {
                    scheduler.handle_timeout(Instant::now().into_std());
                }
            }
        }
    }
}

impl SwarmNode {
    fn dial_all(
        self: &Arc<Self>,
        dials: &mut JoinSet<SocketAddr>,
        peers: &[SocketAddr],
        image: &Arc<SharedImage>,
        events: &mpsc::Sender<FetchEvent>,
    ) {
        for &address in peers {
            let node = Arc::clone(self);
            let image = Arc::clone(image);
            let events = events.clone();
            dials.spawn(async move {
                if let Err(error) = node.dial(address, &image).await {
                    let _fetch_over = events
                        .send(FetchEvent::DialFailed {
                            address,
                            error: error.to_string(),
                        })
                        .await;
                }
                address
            });
        }
    }
}

/// Takes the image's fetch registration away when the fetch ends, however it ends.
struct Unregister(Arc<SharedImage>);

impl Drop for Unregister {
    fn drop(&mut self) {
        self.0.set_fetch(None);
    }
}

/// Reads an answer stream whole into one buffer, sized from its frame's length prefix once
/// that has arrived: one copy of a chunk's bytes out of QUIC's buffers, no zero-filling, and
/// never more than one frame's worth.
async fn read_answer(receive: &mut quinn::RecvStream) -> Result<Vec<u8>, String> {
    let mut frame: Vec<u8> = Vec::new();
    let mut frame_bytes: Option<usize> = None;
    while let Some(piece) = receive
        .read_chunk(usize::MAX, true)
        .await
        .map_err(|error| error.to_string())?
    {
        if frame.len() + piece.bytes.len() > frame_bytes.unwrap_or(FRAME_BYTES_MAX + 4) {
            return Err("longer than its frame".into());
        }
        frame.extend_from_slice(&piece.bytes);
        if frame_bytes.is_none()
            && let Some(prefix) = frame.get(..4)
        {
            let length = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if length > FRAME_BYTES_MAX {
                return Err(format!(
                    "a frame of {length} bytes, more than {FRAME_BYTES_MAX}"
                ));
            }
            frame_bytes = Some(4 + length);
            frame.reserve_exact((4 + length).saturating_sub(frame.len()));
        }
    }
    Ok(frame)
}

/// Verifies the chunk that lies at `range` in `frame` and stores it, without copying it out.
async fn verify_and_store(
    image: &SharedImage,
    index: u32,
    chunk: ChunkRef,
    frame: Vec<u8>,
    range: std::ops::Range<usize>,
) -> Answer {
    let Some(bytes) = frame.get(range.clone()) else {
        return Answer::Failed("the answer's chunk lies outside its frame".into());
    };
    if let Err(error) = verify_chunk(&chunk, bytes) {
        return Answer::Corrupt(error.to_string());
    }
    let length = bytes.len() as u64;
    let stored = super::shelf::on_shelf(Arc::clone(image.shelf()), move |shelf| {
        match frame.get(range) {
            Some(bytes) => shelf.store(&chunk, bytes),
            None => Err(SwarmError::Shelf("a chunk's range moved".into())),
        }
    });
    match stored.await {
        Ok(Ok(())) => Answer::Verified { bytes: length },
        Ok(Err(error)) => Answer::StoreFailed(format!("store chunk {index}: {error}")),
        Err(error) => Answer::StoreFailed(format!("store chunk {index}: {error}")),
    }
}

/// One request on its own stream: the answer, with `Data` verified and stored.
async fn request_chunk(
    connection: &Connection,
    image: &SharedImage,
    index: u32,
    chunk: ChunkRef,
    priority: Priority,
) -> Answer {
    let (mut send, mut receive) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(error) => return Answer::Failed(format!("open a stream: {error}")),
    };
    if let Err(error) = write_message(&mut send, &Message::Request { index, priority }).await {
        return Answer::Failed(format!("send the request: {error}"));
    }
    let _already_closed = send.finish();
    let frame = match read_answer(&mut receive).await {
        Ok(frame) => frame,
        Err(error) => return Answer::Failed(format!("read the answer: {error}")),
    };
    match data_frame_payload(&frame) {
        Ok(Some((sent_index, range))) if sent_index == index => {
            return verify_and_store(image, index, chunk, frame, range).await;
        }
        Ok(Some((sent_index, _))) => {
            return Answer::Failed(format!("answered a request with chunk {sent_index}"));
        }
        Ok(None) => {}
        Err(error) => return Answer::Failed(format!("bad answer: {error}")),
    }
    let message = match decode_frame(&frame) {
        Ok(Some((message, used))) if used == frame.len() => message,
        Ok(_) => return Answer::Failed("the answer is not one whole frame".into()),
        Err(error) => return Answer::Failed(format!("bad answer: {error}")),
    };
    match message {
        Message::Busy {
            retry_after_ms,
            alternatives,
            ..
        } => {
            let retry_after = Duration::from_millis(u64::from(retry_after_ms));
            if alternatives.is_empty() {
                Answer::Busy(retry_after)
            } else {
                Answer::Declined(retry_after)
            }
        }
        Message::NotHere { .. } => Answer::NotHere,
        other => Answer::Failed(format!("answered a request with {}", other.kind())),
    }
}
