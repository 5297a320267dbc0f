//! A swarm member (boot server or agent) and its peerings: the images it offers, the
//! handshake on a new connection in either direction, the HAVE exchange on the control
//! stream, and the serving of chunk requests through the node's upload gate.
#![allow(
    clippy::disallowed_methods,
    reason = "a driver: it spawns the tasks of each peering and reads the clock for timeouts"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;
use transfer::ContentHash;
use transfer::swarm::claims::{ClaimTimings, HoldBack, SendClaims};
use transfer::swarm::wire::{FRAME_BYTES_MAX, data_frame_header};
use transfer::swarm::{
    Bitfield, Message, PeerId, Priority, SwarmImage, UploadConfig, decode_frame,
};

use super::fetch::FetchEvent;
use super::shelf::ChunkShelf;
use super::tracker::TrackerService;
use super::uploader::{Turn, Uploader};
use super::{CLOSE_PROTOCOL, CLOSE_UNKNOWN_IMAGE, SwarmError, tls, transport_config};

/// How long a new peering may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HAVE announcements a slow peering may fall behind by before it is sent a whole bitfield.
const ANNOUNCEMENTS_BUFFERED: usize = 4096;
/// How often a blocked reader demands its missing chunks again.
const DEMAND_REPEAT: Duration = Duration::from_secs(1);
/// How long a sent chunk holds its upload slot waiting for the requester's acknowledgement.
const SEND_ACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request frame (length, kind, index, priority).
const REQUEST_FRAME_BYTES_MAX: usize = 16;
/// One image a member offers (and, while it fetches, fills).
pub struct SharedImage {
    image: SwarmImage,
    shelf: Arc<dyn ChunkShelf>,
    held: Mutex<Bitfield>,
    /// Signalled with every chunk gained, for blocked readers ([`SharedImage::wait_held`]).
    held_changed: Condvar,
    /// Every chunk gained, for the peerings to announce.
    gained: broadcast::Sender<u32>,
    /// The fetch that runs for this image, if one does: peerings report to it.
    fetch: Mutex<Option<mpsc::Sender<FetchEvent>>>,
    /// Per chunk: its last send (ADR 0009).
    claims: Mutex<SendClaims<SocketAddr>>,
    /// Peers with a peering about this image now (a chunk is pointed only at a live one).
    live_peers: Mutex<BTreeMap<SocketAddr, usize>>,
}

impl std::fmt::Debug for SharedImage {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SharedImage")
            .field("manifest", &self.image.manifest())
            .field("held", &self.held().count())
            .finish_non_exhaustive()
    }
}

impl SharedImage {
    /// `image` kept on `shelf`; which chunks are held is read from the shelf (blocking).
    pub fn new(image: SwarmImage, shelf: Arc<dyn ChunkShelf>) -> Arc<Self> {
        let mut held = Bitfield::empty(image.chunk_count());
        for (index, chunk) in (0u32..).zip(image.chunks()) {
            if shelf.holds(chunk) {
                held.insert(index);
            }
        }
        let (gained, _) = broadcast::channel(ANNOUNCEMENTS_BUFFERED);
        let claims = Mutex::new(SendClaims::new(
            image.chunk_count(),
            ClaimTimings::default(),
        ));
        Arc::new(Self {
            claims,
            live_peers: Mutex::default(),
            image,
            shelf,
            held: Mutex::new(held),
            held_changed: Condvar::new(),
            gained,
            fetch: Mutex::new(None),
        })
    }

    /// The image's numbering.
    pub fn image(&self) -> &SwarmImage {
        &self.image
    }

    /// Where its chunks are kept.
    pub fn shelf(&self) -> &Arc<dyn ChunkShelf> {
        &self.shelf
    }

    /// The chunks held now.
    pub fn held(&self) -> Bitfield {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_complete()
    }

    /// Chunk `index` is held now (stored and verified): announce it.
    pub(crate) fn mark_held(&self, index: u32) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.insert(index) {
            // Sent under the lock, so that a peering that subscribes and then copies the
            // bitfield never misses a chunk between the two.
            let _no_peerings = self.gained.send(index);
            self.held_changed.notify_all();
        }
    }

    /// Blocks the calling thread (not a runtime's) until every chunk of `indices` is held, or
    /// `limit` has passed; returns whether they are. Chunks not held are demanded from the
    /// running fetch at once and again every second, so a demand lost to a full queue or made
    /// before the fetch started is not lost for good. For a `lazy` root's block reads.
    pub fn wait_held(&self, indices: &[u32], limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut demanded_at: Option<std::time::Instant> = None;
        loop {
            let missing: Vec<u32> = indices
                .iter()
                .copied()
                .filter(|index| !held.contains(*index))
                .collect();
            if missing.is_empty() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if demanded_at.is_none_or(|at| now.duration_since(at) >= DEMAND_REPEAT) {
                if let Some(fetch) = self.fetch() {
                    for index in &missing {
                        let _full_or_done = fetch.try_send(FetchEvent::Demand { index: *index });
                    }
                }
                demanded_at = Some(now);
            }
            let wait = deadline.saturating_duration_since(now).min(DEMAND_REPEAT);
            held = self
                .held_changed
                .wait_timeout(held, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The held bitfield and a subscription to every chunk gained after it.
    fn held_and_subscribe(&self) -> (Bitfield, broadcast::Receiver<u32>) {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        (held.clone(), self.gained.subscribe())
    }

    /// Whether chunk `index` is on its way to, or was just announced by, another live peer
    /// than `requester`, and `hold_back` says to point the requester there: that peer, and
    /// when to ask again. Otherwise notes the send to `requester` now (`SendClaims::claim`).
    fn claim_send(
        &self,
        index: u32,
        requester: SocketAddr,
        hold_back: HoldBack,
    ) -> Result<(), (SocketAddr, Duration)> {
        let now = tokio::time::Instant::now().into_std();
        self.claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .claim(now, index, requester, hold_back, |peer| self.is_live(*peer))
    }

    /// The send of chunk `index` to `requester` did not happen after all.
    fn release_claim(&self, index: u32, requester: SocketAddr) {
        self.claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(index, requester);
    }

    /// `peer` announced chunk `index`.
    fn note_announced(&self, index: u32, peer: SocketAddr) {
        let now = tokio::time::Instant::now().into_std();
        self.claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .note_announced(now, index, peer);
    }

    fn is_live(&self, peer: SocketAddr) -> bool {
        self.live_peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&peer)
    }

    /// Counts a peering with `peer` in (`up`) or out.
    fn peering_with(&self, peer: SocketAddr, up: bool) {
        let mut live = self
            .live_peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if up {
            *live.entry(peer).or_default() += 1;
        } else if let Some(count) = live.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                live.remove(&peer);
            }
        }
    }

    pub(crate) fn set_fetch(&self, fetch: Option<mpsc::Sender<FetchEvent>>) {
        *self.fetch.lock().unwrap_or_else(PoisonError::into_inner) = fetch;
    }

    /// The fetch that runs for this image, if one does.
    pub(crate) fn fetch_running(&self) -> Option<mpsc::Sender<FetchEvent>> {
        self.fetch()
    }

    fn fetch(&self) -> Option<mpsc::Sender<FetchEvent>> {
        self.fetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What a member has done, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct SwarmStats {
    /// Chunks sent to peers.
    pub chunks_uploaded: AtomicU64,
    /// Bytes of chunks sent to peers.
    pub bytes_uploaded: AtomicU64,
    /// Requests answered "busy".
    pub requests_refused_busy: AtomicU64,
    /// Requests answered "not here".
    pub requests_not_here: AtomicU64,
    /// Requests declined because the chunk had just gone to another peer.
    pub requests_declined_duplicate: AtomicU64,
    /// Chunks whose sending was cut short: the requester stopped the stream (it had the chunk
    /// from elsewhere, or gave up) or never acknowledged it.
    pub sends_stopped_by_requester: AtomicU64,
    /// Chunks received and verified.
    pub chunks_downloaded: AtomicU64,
    /// Bytes of chunks received and verified.
    pub bytes_downloaded: AtomicU64,
    /// Chunks received that failed verification (never stored).
    pub chunks_rejected: AtomicU64,
}

/// A swarm member: its endpoint, the images it offers, its upload gate.
pub struct SwarmNode {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    images: Mutex<BTreeMap<ContentHash, Arc<SharedImage>>>,
    uploader: Uploader,
    next_peer: AtomicU64,
    stats: SwarmStats,
    /// Present on servers: tracker sessions are answered.
    tracker: std::sync::OnceLock<Arc<TrackerService>>,
}

impl std::fmt::Debug for SwarmNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SwarmNode")
            .field("address", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl SwarmNode {
    /// A member with an endpoint of its own at `address` (a throwaway certificate; agents
    /// and tests), accepting peerings until the returned node is dropped.
    pub fn bind(address: SocketAddr, upload: UploadConfig) -> Result<Arc<Self>, SwarmError> {
        let (certificate, key) = tls::ephemeral_identity()?;
        let server = tls::server_config(certificate, key, transport_config())?;
        let bind_error = |source| SwarmError::Bind { address, source };
        let socket = super::chunk_socket(address).map_err(bind_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_error(std::io::Error::other("no async runtime for quinn")))?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        Self::serve_on(endpoint, upload)
    }

    /// A member on `endpoint` (made with [`tls::server_config`] and [`transport_config`], or
    /// by a simulation on its own network), accepting peerings on it until the returned node is
    /// dropped.
    pub fn serve_on(endpoint: Endpoint, upload: UploadConfig) -> Result<Arc<Self>, SwarmError> {
        let node = Self::with_endpoint(endpoint.clone(), upload)?;
        let weak = Arc::downgrade(&node);
        let slots = Arc::new(tokio::sync::Semaphore::new(super::PEERINGS_MAX));
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Some(node) = weak.upgrade() else {
                    return;
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(remote = %incoming.remote_address(), "peer refused: too many peerings");
                    incoming.refuse();
                    continue;
                };
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(connection) => node.serve_connection(connection).await,
                        Err(error) => tracing::debug!(%error, "a peer's handshake failed"),
                    }
                    drop(slot);
                });
            }
        });
        Ok(node)
    }

    /// A member on an endpoint someone else accepts on (a boot server's cluster endpoint,
    /// which hands it the connections that chose [`ALPN_CHUNKS`](super::ALPN_CHUNKS)).
    pub fn with_endpoint(
        endpoint: Endpoint,
        upload: UploadConfig,
    ) -> Result<Arc<Self>, SwarmError> {
        Ok(Arc::new(Self {
            endpoint,
            client_config: tls::client_config(transport_config())?,
            images: Mutex::default(),
            uploader: Uploader::start(upload),
            next_peer: AtomicU64::new(1),
            stats: SwarmStats::default(),
            tracker: std::sync::OnceLock::new(),
        }))
    }

    /// Answers tracker sessions with `tracker` from now on (servers do; agents do not).
    pub fn enable_tracker(&self, tracker: Arc<TrackerService>) {
        let _already = self.tracker.set(tracker);
    }

    /// The tracker this member runs, if it runs one.
    pub fn tracker(&self) -> Option<&Arc<TrackerService>> {
        self.tracker.get()
    }

    /// Where peers reach this member.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// What it has done so far.
    pub fn stats(&self) -> &SwarmStats {
        &self.stats
    }

    /// Offers `image` to peers (replacing an earlier offer of the same manifest).
    pub fn offer(&self, image: Arc<SharedImage>) {
        self.images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(image.image().manifest(), image);
    }

    /// Offers `image` unless its manifest is offered already (a fetch in progress offers its
    /// own, whose holdings grow as chunks arrive; a store scan must not replace it). Returns
    /// whether it was offered.
    pub fn offer_unless_offered(&self, image: Arc<SharedImage>) -> bool {
        let mut images = self.images.lock().unwrap_or_else(PoisonError::into_inner);
        match images.entry(image.image().manifest()) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(vacant) => {
                vacant.insert(image);
                true
            }
        }
    }

    /// Stops offering the image whose manifest is `manifest` (peerings about it end as their
    /// peers go).
    pub fn withdraw(&self, manifest: &ContentHash) {
        self.images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(manifest);
    }

    /// The manifests offered.
    pub fn offered_manifests(&self) -> std::collections::BTreeSet<ContentHash> {
        self.images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// The offered image whose manifest is `manifest`.
    pub fn offered(&self, manifest: &ContentHash) -> Option<Arc<SharedImage>> {
        self.images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(manifest)
            .cloned()
    }

    /// Stops serving and waits (at most a second) until the peers have been told, so that
    /// they drop this member at once instead of waiting out a timeout.
    pub async fn shut_down_and_wait(&self) {
        self.shut_down();
        let _told_or_not =
            tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Stops serving: every peering is closed at once and nothing more is accepted.
    pub fn shut_down(&self) {
        self.images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.endpoint
            .close(super::CLOSE_DONE.into(), b"shutting down");
    }

    fn next_peer_id(&self) -> PeerId {
        self.next_peer.fetch_add(1, Ordering::Relaxed)
    }

    /// Serves a connection a peer opened: the handshake, then the peering until it closes.
    pub async fn serve_connection(self: Arc<Self>, connection: Connection) {
        let address = connection.remote_address();
        let span = tracing::info_span!("peering", peer = %address, side = "accepted");
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.accept_handshake(&connection)).await
            {
                Ok(Ok(Accepted::Peering(image, control, have))) => {
                    self.run_peering(connection, control, image, have).await;
                }
                Ok(Ok(Accepted::TrackerSession(send, reader, first))) => {
                    if let Some(tracker) = self.tracker() {
                        let port = self.local_addr().map(|address| address.port());
                        let reached = connection.local_ip().or_else(|| {
                            self.local_addr()
                                .map(|address| address.ip())
                                .filter(|ip| !ip.is_unspecified())
                        });
                        let own_offer = |manifest: &ContentHash| {
                            let (ip, port) = (reached?, port?);
                            self.offered(manifest)?;
                            Some(SocketAddr::new(ip, port))
                        };
                        tracker
                            .serve_session(connection, send, reader, first, own_offer)
                            .await;
                    }
                }
                Ok(Ok(Accepted::Answered(mut send, answer))) => {
                    // The asker closes the connection once it has read the answer; until
                    // then the answer may still need resending.
                    if write_message(&mut send, &answer).await.is_ok() {
                        let _finished = send.finish();
                        let _closed_or_not =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.closed()).await;
                    }
                }
                Ok(Ok(Accepted::Closed)) => {}
                Ok(Err(error)) => {
                    tracing::info!(%error, "peering refused");
                    connection.close(CLOSE_PROTOCOL.into(), b"protocol");
                }
                Err(_) => {
                    tracing::info!("no hello in time");
                    connection.close(CLOSE_PROTOCOL.into(), b"no hello");
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn accept_handshake(&self, connection: &Connection) -> Result<Accepted, SwarmError> {
        let address = connection.remote_address();
        let peer_error = |reason: String| SwarmError::Peer {
            peer: address,
            reason,
        };
        let (send, receive) = connection
            .accept_bi()
            .await
            .map_err(|error| peer_error(format!("no control stream: {error}")))?;
        let mut reader = FrameReader::new(receive);
        let (manifest, chunk_count) = match reader.next(address).await? {
            Message::Hello {
                manifest,
                chunk_count,
            } => (manifest, chunk_count),
            announce @ Message::Announce { .. } => {
                if self.tracker().is_none() {
                    tracing::info!("an announce, but this member is no tracker");
                    connection.close(super::CLOSE_NO_TRACKER.into(), b"no tracker here");
                    return Ok(Accepted::Closed);
                }
                return Ok(Accepted::TrackerSession(send, reader, announce));
            }
            Message::FirmwarePeersWanted {
                manifest,
                client,
                wanted,
            } => {
                let Some(tracker) = self.tracker() else {
                    tracing::info!("asked for firmware peers, but this member is no tracker");
                    connection.close(super::CLOSE_NO_TRACKER.into(), b"no tracker here");
                    return Ok(Accepted::Closed);
                };
                let peers = tracker.firmware_peers(&manifest, client, &[], usize::from(wanted));
                tracing::debug!(%manifest, %client, ?peers, "firmware peers asked for");
                return Ok(Accepted::Answered(send, Message::FirmwarePeers { peers }));
            }
            _ => return Err(peer_error("the first message is not a hello".into())),
        };
        let Some(image) = self.offered(&manifest) else {
            tracing::info!(%manifest, "asked about an image not offered here");
            connection.close(CLOSE_UNKNOWN_IMAGE.into(), b"unknown image");
            return Ok(Accepted::Closed);
        };
        if chunk_count != image.image().chunk_count() {
            return Err(peer_error(format!(
                "hello says {chunk_count} chunks, the manifest has {}",
                image.image().chunk_count()
            )));
        }
        let mut control = Control {
            send,
            reader,
            announcements: None,
        };
        control
            .greet(&image)
            .await
            .map_err(|error| peer_error(error.to_string()))?;
        let have = control.read_have(&image, address).await?;
        Ok(Accepted::Peering(image, control, have))
    }

    /// Connects to `address` and opens the connection's control stream (a peering's, or a
    /// tracker session's).
    pub(crate) async fn open_control(
        &self,
        address: SocketAddr,
    ) -> Result<(Connection, SendStream, FrameReader), SwarmError> {
        let peer_error = |reason: String| SwarmError::Peer {
            peer: address,
            reason,
        };
        let connection = self
            .endpoint
            .connect_with(self.client_config.clone(), address, tls::PEER_NAME)
            .map_err(|error| peer_error(error.to_string()))?
            .await
            .map_err(|error| peer_error(error.to_string()))?;
        let (send, receive) = connection
            .open_bi()
            .await
            .map_err(|error| peer_error(error.to_string()))?;
        Ok((connection, send, FrameReader::new(receive)))
    }

    /// Dials `address` about `image`; once the handshake is done the peering runs on its own
    /// (and reports to the image's fetch, if one runs). Returns when the peering is up.
    pub(crate) async fn dial(
        self: &Arc<Self>,
        address: SocketAddr,
        image: &Arc<SharedImage>,
    ) -> Result<(), SwarmError> {
        let peer_error = |reason: String| SwarmError::Peer {
            peer: address,
            reason,
        };
        let handshake = async {
            let (connection, send, reader) = self.open_control(address).await?;
            let mut control = Control {
                send,
                reader,
                announcements: None,
            };
            control
                .greet(image)
                .await
                .map_err(|error| peer_error(error.to_string()))?;
            let Message::Hello {
                manifest,
                chunk_count,
            } = control.reader.next(address).await?
            else {
                return Err(peer_error("the answer is not a hello".into()));
            };
            if manifest != image.image().manifest() || chunk_count != image.image().chunk_count() {
                return Err(peer_error("it answered about another image".into()));
            }
            let have = control.read_have(image, address).await?;
            Ok((connection, control, have))
        };
        let (connection, control, have) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| peer_error("no hello in time".into()))??;
        let node = Arc::clone(self);
        let image = Arc::clone(image);
        let span = tracing::info_span!("peering", peer = %address, side = "dialed");
        tokio::spawn(
            async move { node.run_peering(connection, control, image, have).await }
                .instrument(span),
        );
        Ok(())
    }

    /// The peering after its handshake: HAVE updates both ways, chunk requests served, and
    /// the peer reported to this member's fetch of the image, until the connection closes.
    async fn run_peering(
        self: Arc<Self>,
        connection: Connection,
        control: Control,
        image: Arc<SharedImage>,
        have: Bitfield,
    ) {
        let peer = self.next_peer_id();
        let address = connection.remote_address();
        if let Some(fetch) = image.fetch() {
            let _fetch_over = fetch
                .send(FetchEvent::PeerUp {
                    peer,
                    address,
                    connection: connection.clone(),
                    have,
                })
                .await;
        }
        tracing::debug!(peer, "peering up");
        let Control {
            mut send,
            mut reader,
            announcements,
        } = control;
        let Some(mut announcements) = announcements else {
            return;
        };
        image.peering_with(address, true);
        let announcing = {
            let image = Arc::clone(&image);
            async move {
                loop {
                    let message = match announcements.recv().await {
                        Ok(index) => Message::HaveChunk { index },
                        Err(broadcast::error::RecvError::Lagged(_)) => Message::Have(image.held()),
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if write_message(&mut send, &message).await.is_err() {
                        return;
                    }
                }
            }
        };
        let listening = {
            let image = Arc::clone(&image);
            let connection = connection.clone();
            async move {
                loop {
                    let event = match reader.next(address).await {
                        Ok(Message::HaveChunk { index }) if index < image.image().chunk_count() => {
                            image.note_announced(index, address);
                            FetchEvent::HaveChunk { peer, index }
                        }
                        Ok(Message::Have(have)) if have.len() == image.image().chunk_count() => {
                            FetchEvent::PeerHave { peer, have }
                        }
                        Ok(other) => {
                            tracing::info!(
                                kind = other.kind(),
                                "unexpected message on the control stream; closing"
                            );
                            connection.close(CLOSE_PROTOCOL.into(), b"protocol");
                            return;
                        }
                        Err(error) => {
                            tracing::debug!(%error, "control stream ended");
                            return;
                        }
                    };
                    if let Some(fetch) = image.fetch() {
                        let _fetch_over = fetch.send(event).await;
                    }
                }
            }
        };
        let serving = {
            let node = Arc::clone(&self);
            let image = Arc::clone(&image);
            let connection = connection.clone();
            async move {
                while let Ok((send, receive)) = connection.accept_bi().await {
                    let node = Arc::clone(&node);
                    let image = Arc::clone(&image);
                    tokio::spawn(
                        async move { node.serve_request(&image, address, send, receive).await }
                            .in_current_span(),
                    );
                }
            }
        };
        tokio::select! {
            biased;
            () = announcing => {}
            () = listening => {}
            () = serving => {}
        }
        connection.close(super::CLOSE_DONE.into(), b"done");
        image.peering_with(address, false);
        let reason = connection.closed().await;
        tracing::debug!(peer, %reason, "peering closed");
        if let Some(fetch) = image.fetch() {
            let _fetch_over = fetch.send(FetchEvent::PeerGone { peer }).await;
        }
    }

    /// One request stream: `Request` in, then `Data`, `Busy` or `NotHere` out.
    async fn serve_request(
        &self,
        image: &SharedImage,
        requester: SocketAddr,
        mut send: SendStream,
        mut receive: RecvStream,
    ) {
        let frame = match receive.read_to_end(REQUEST_FRAME_BYTES_MAX).await {
            Ok(frame) => frame,
            Err(error) => {
                tracing::debug!(%error, "a request stream broke");
                return;
            }
        };
        let (index, priority) = match decode_frame(&frame) {
            Ok(Some((Message::Request { index, priority }, used))) if used == frame.len() => {
                (index, priority)
            }
            Ok(_) | Err(_) => {
                tracing::info!("a request stream without a request; dropped");
                let _already_gone = send.reset(CLOSE_PROTOCOL.into());
                return;
            }
        };
        let answer = self
            .answer(image, requester, index, priority, &mut send)
            .await;
        match answer {
            Ok(()) => {
                let _already_gone = send.finish();
            }
            Err(error) => tracing::debug!(index, %error, "a request ended early"),
        }
    }

    async fn answer(
        &self,
        image: &SharedImage,
        requester: SocketAddr,
        index: u32,
        priority: Priority,
        send: &mut SendStream,
    ) -> Result<(), quinn::WriteError> {
        let not_here = Message::NotHere { index };
        let Some(chunk) = image.image().chunk(index).copied() else {
            return write_message(send, &not_here).await;
        };
        if !image.held().contains(index) {
            self.stats.requests_not_here.fetch_add(1, Ordering::Relaxed);
            return write_message(send, &not_here).await;
        }
        // Requests for a chunk just sent to someone else are pointed there, boot-critical ones
        // too (under a storm a seed's upload is what everyone waits for, and the first copy
        // is seconds away); only a reader blocked on the chunk right now is always served.
        // A busy seed holds duplicates back for as long as it stays busy; an idle one, and
        // a member still fetching, for the claim windows (`SendClaims`, ADR 0011).
        let hold_back = if image.is_complete() && self.uploader.is_busy() {
            HoldBack::WhileBusy
        } else {
            HoldBack::Windows
        };
        if priority != Priority::OnDemand
            && let Err((recipient, remaining)) = image.claim_send(index, requester, hold_back)
        {
            self.stats
                .requests_declined_duplicate
                .fetch_add(1, Ordering::Relaxed);
            let busy = Message::Busy {
                index,
                retry_after_ms: u32::try_from(remaining.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
                alternatives: vec![recipient],
            };
            return write_message(send, &busy).await;
        }
        let sent = self.send_chunk(image, chunk, index, priority, send).await;
        if !matches!(sent, Ok(true)) {
            image.release_claim(index, requester);
        }
        sent.map(|_| ())
    }

    /// Sends chunk `index` when the upload gate allows; `Ok(true)` once its bytes are out.
    async fn send_chunk(
        &self,
        image: &SharedImage,
        chunk: transfer::ChunkRef,
        index: u32,
        priority: Priority,
        send: &mut SendStream,
    ) -> Result<bool, quinn::WriteError> {
        let not_here = Message::NotHere { index };
        let turn = tokio::select! {
            biased;
            // The requester gave up (endgame, timeout): the queued request goes with it.
            _stopped = send.stopped() => return Ok(false),
            turn = self.uploader.turn(priority, chunk.length_bytes) => turn,
        };
        let permit = match turn {
            Turn::Send(permit) => permit,
            Turn::Busy(retry_after) => {
                self.stats
                    .requests_refused_busy
                    .fetch_add(1, Ordering::Relaxed);
                let busy = Message::Busy {
                    index,
                    retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
                    // Whom else to ask is the tracker's to say (a fetcher has its neighbour
                    // set); an uploader does not track its peers' chunks.
                    alternatives: Vec::new(),
                };
                return write_message(send, &busy).await.map(|()| false);
            }
        };
        let read =
            super::shelf::on_shelf(Arc::clone(image.shelf()), move |shelf| shelf.read(&chunk))
                .await;
        let bytes = match read {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => {
                self.stats.requests_not_here.fetch_add(1, Ordering::Relaxed);
                return write_message(send, &not_here).await.map(|()| false);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, index, "reading a chunk to serve it failed");
                return write_message(send, &not_here).await.map(|()| false);
            }
            Err(error) => {
                tracing::warn!(%error, index, "the chunk reader task failed");
                return write_message(send, &not_here).await.map(|()| false);
            }
        };
        let length = bytes.len();
        // The chunk goes to QUIC as it sits in the cache, without a copy.
        send.write_all_chunks(&mut [
            bytes::Bytes::copy_from_slice(&data_frame_header(index, length)),
            bytes::Bytes::from_owner(bytes),
        ])
        .await?;
        // The slot is held until the requester has the bytes, not only until quinn has
        // buffered them: the gate's count of sends is then the chunks on the wire, so a busy
        // link shows as a busy gate (and duplicates are declined, `SendClaims`) instead of
        // as an idle one with megabytes queued in the connection.
        // Counted once written: what the server hands its connections is what its link
        // carries (a stream the requester stops later was mostly sent already).
        self.stats.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_uploaded
            .fetch_add(length as u64, Ordering::Relaxed);
        let _finished_before = send.finish();
        let acknowledged = tokio::time::timeout(SEND_ACKNOWLEDGED_TIMEOUT, send.stopped()).await;
        drop(permit);
        if !matches!(acknowledged, Ok(Ok(None))) {
            self.stats
                .sends_stopped_by_requester
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }
}

/// What a new connection turned out to be.
enum Accepted {
    /// A peering about an image offered here, after its handshake.
    Peering(Arc<SharedImage>, Control, Bitfield),
    /// A tracker session, and its first announce.
    TrackerSession(SendStream, FrameReader, Message),
    /// A one-question session: the answer to write before the asker closes.
    Answered(SendStream, Message),
    /// Refused and closed.
    Closed,
}

/// The control stream of one peering.
struct Control {
    send: SendStream,
    reader: FrameReader,
    /// Chunks gained since the `Have` this side sent.
    announcements: Option<broadcast::Receiver<u32>>,
}

impl Control {
    /// Sends `Hello` and `Have`, subscribing to what is gained after the bitfield was taken.
    async fn greet(&mut self, image: &SharedImage) -> Result<(), quinn::WriteError> {
        let (held, announcements) = image.held_and_subscribe();
        self.announcements = Some(announcements);
        let hello = Message::Hello {
            manifest: image.image().manifest(),
            chunk_count: image.image().chunk_count(),
        };
        write_message(&mut self.send, &hello).await?;
        write_message(&mut self.send, &Message::Have(held)).await
    }

    async fn read_have(
        &mut self,
        image: &SharedImage,
        address: SocketAddr,
    ) -> Result<Bitfield, SwarmError> {
        match self.reader.next(address).await? {
            Message::Have(have) if have.len() == image.image().chunk_count() => Ok(have),
            other => Err(SwarmError::Peer {
                peer: address,
                reason: format!("expected its bitfield, got {}", other.kind()),
            }),
        }
    }
}

/// Writes one message as a frame.
pub(crate) async fn write_message(
    send: &mut SendStream,
    message: &Message,
) -> Result<(), quinn::WriteError> {
    let mut frame = Vec::new();
    message.encode(&mut frame);
    send.write_all(&frame).await
}

/// Reads frames off a stream, never holding more than one frame's worth beyond what it has
/// decoded.
pub(crate) struct FrameReader {
    receive: RecvStream,
    buffer: Vec<u8>,
}

impl FrameReader {
    pub(crate) fn new(receive: RecvStream) -> Self {
        Self {
            receive,
            buffer: Vec::new(),
        }
    }

    /// The next message; an error when the stream ends or breaks the protocol.
    pub(crate) async fn next(&mut self, address: SocketAddr) -> Result<Message, SwarmError> {
        let peer_error = |reason: String| SwarmError::Peer {
            peer: address,
            reason,
        };
        loop {
            match decode_frame(&self.buffer) {
                Ok(Some((message, used))) => {
                    self.buffer.drain(..used);
                    return Ok(message);
                }
                Ok(None) => {}
                Err(error) => {
                    return Err(peer_error(format!("bad frame: {error}")));
                }
            }
            if self.buffer.len() > FRAME_BYTES_MAX + 4 {
                return Err(peer_error("a frame larger than the limit".into()));
            }
            let mut piece = [0u8; 16 * 1024];
            match self.receive.read(&mut piece).await {
                Ok(Some(count)) => self.buffer.extend_from_slice(&piece[..count]),
                Ok(None) => return Err(peer_error("the stream ended".into())),
                Err(error) => return Err(peer_error(error.to_string())),
            }
        }
    }
}
