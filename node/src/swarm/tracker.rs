//! The tracker's QUIC side: a server answers tracker sessions with `transfer`'s sans-IO
//! [`Tracker`], and every member (agent or server) keeps a session with its image's tracker,
//! re-announcing on a period, and hands the neighbours it is told of to its fetch.
//!
//! A tracker session is a connection on the chunk ALPN whose control stream opens with
//! `Announce` instead of `Hello`; each `Announce` is answered with `Neighbours`. The member's
//! address is the one its connection comes from (its swarm endpoint), so a member cannot list
//! anyone but itself. When the session closes, the member's listing goes with it; a member
//! that vanishes without a close is forgotten when its connection times out, and at the latest
//! after the tracker's time to live.
#![allow(
    clippy::disallowed_methods,
    reason = "a driver: it reads the clock for the tracker core and paces re-announces"
)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use quinn::{Connection, SendStream};
use tracing::Instrument;
use transfer::ContentHash;
use transfer::swarm::tracker::{NEIGHBOURS_MAX, Neighbours};
use transfer::swarm::{Announce, Message, Tracker, TrackerConfig, tracker_order};

use super::fetch::FetchEvent;
use super::peering::{FrameReader, SharedImage, SwarmNode, write_message};
use super::{CLOSE_BUSY, CLOSE_DONE, CLOSE_PROTOCOL, SwarmError};
use crate::racks::RackMap;

/// Images one session may announce (a member announces the one it boots; a server each it
/// offers, on a session per image).
const IMAGES_PER_SESSION_MAX: usize = 16;
/// How long a member waits for a tracker to answer before it gives up on it.
const TRACKER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a member waits for a tracker's handshake before it also dials the next in order
/// (and takes whichever answers first). Without it, a dead first tracker cost every member
/// that powered on after its death the whole `TRACKER_TIMEOUT`; the storm engine showed it
/// (the rack-power-loss scenario, ADR 0011). Long enough that a live but loaded tracker
/// usually answers first, so members of one image still meet at one tracker.
const TRACKER_HEDGE_AFTER: Duration = Duration::from_secs(1);
/// How long a member that is not complete waits for its fetch to start before announcing
/// (neighbours told before the fetch listens would be lost until the next round).
const FETCH_START_WAIT: Duration = Duration::from_secs(2);

/// A server's tracker: the core, and the map from addresses to racks.
#[derive(Debug)]
pub struct TrackerService {
    tracker: Mutex<Tracker>,
    racks: RackMap,
    next_session: AtomicU64,
}

impl TrackerService {
    /// A tracker that places members in racks by `racks` (the DHCP subnets that name their
    /// rack, as the fleet configuration has them now), and by what a member says where no
    /// subnet matches.
    pub fn new(config: TrackerConfig, racks: RackMap) -> Arc<Self> {
        Arc::new(Self {
            tracker: Mutex::new(Tracker::new(config)),
            racks,
            next_session: AtomicU64::new(1),
        })
    }

    /// The rack of a member at `ip` that says it is in `claimed` (empty: it does not know).
    pub fn rack_of(&self, ip: IpAddr, claimed: &str) -> Option<String> {
        let mapped = match ip {
            IpAddr::V4(ip) => self.racks.rack_of(ip),
            IpAddr::V6(_) => None,
        };
        mapped.or_else(|| (!claimed.is_empty()).then(|| claimed.to_owned()))
    }

    /// Up to `wanted` booted nodes that may serve `manifest`'s firmware-stage files to a node
    /// booting at `client` (ADR 0016): complete members with a live session, in the client's
    /// rack, neither the client nor at an address in `servers`, by their chunk endpoints.
    /// None where the client's rack is unknown: a rack is what makes a peer near. The same
    /// client gets the same members in the same order, and an eligible member's place does
    /// not depend on which others `servers` excludes.
    pub fn firmware_peers(
        &self,
        manifest: &ContentHash,
        client: IpAddr,
        servers: &[IpAddr],
        wanted: usize,
    ) -> Vec<SocketAddr> {
        let Some(rack) = self.rack_of(client, "") else {
            return Vec::new();
        };
        // Nodes booting at once are spread over the rack's peers, the same node the same way.
        let seed = match client {
            IpAddr::V4(ip) => u64::from(u32::from(ip)),
            IpAddr::V6(ip) => u128::from(ip) as u64,
        };
        let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
        tracker.handle_timeout(tokio::time::Instant::now().into_std());
        tracker.complete_in_rack(manifest, &rack, wanted, seed, |candidate| {
            candidate.ip() != client && !servers.contains(&candidate.ip())
        })
    }

    /// Members of `manifest`'s swarm and how many are complete.
    pub fn members(&self, manifest: &ContentHash) -> (usize, usize) {
        self.tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .members(manifest)
    }

    /// Serves a tracker session whose first message was `first`, until it closes; then the
    /// member's listings go. `own_offer` says where the member reaches this server's own
    /// chunk endpoint for an image it offers: a tracker always names itself as a seed of its
    /// own images, so a standalone server needs no announce to itself (and a server bound to
    /// `0.0.0.0` is named by the address each member reached it on).
    pub(crate) async fn serve_session(
        &self,
        connection: Connection,
        mut send: SendStream,
        mut reader: FrameReader,
        first: Message,
        own_offer: impl Fn(&ContentHash) -> Option<SocketAddr>,
    ) {
        let address = connection.remote_address();
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("tracker session", member = %address, session);
        let mut announced = BTreeSet::new();
        async {
            let mut message = first;
            loop {
                let Message::Announce {
                    manifest,
                    rack,
                    complete,
                } = message
                else {
                    tracing::info!(kind = message.kind(), "not an announce; session closed");
                    connection.close(CLOSE_PROTOCOL.into(), b"expected an announce");
                    return;
                };
                if !announced.contains(&manifest) && announced.len() >= IMAGES_PER_SESSION_MAX {
                    tracing::info!("too many images on one session");
                    connection.close(CLOSE_PROTOCOL.into(), b"too many images");
                    return;
                }
                let rack = self.rack_of(address.ip(), &rack);
                let answer = self
                    .tracker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .handle_announce(
                        tokio::time::Instant::now().into_std(),
                        manifest,
                        Announce {
                            address,
                            rack: rack.clone(),
                            complete,
                            session,
                        },
                    );
                match answer {
                    Ok(mut neighbours) => {
                        if let Some(own) = own_offer(&manifest)
                            && own != address
                            && !neighbours.all().any(|neighbour| neighbour == own)
                        {
                            if neighbours.len() >= NEIGHBOURS_MAX {
                                neighbours.elsewhere.pop();
                            }
                            neighbours.elsewhere.insert(0, own);
                        }
                        if announced.insert(manifest) {
                            tracing::info!(%manifest, rack = rack.as_deref().unwrap_or("-"), complete, "member announced");
                        }
                        tracing::debug!(%manifest, complete, neighbours = neighbours.len(), "announce answered");
                        let answer = Message::Neighbours {
                            same_rack: neighbours.same_rack,
                            elsewhere: neighbours.elsewhere,
                        };
                        if let Err(error) = write_message(&mut send, &answer).await
                        {
                            tracing::debug!(%error, "session closed while answering");
                            return;
                        }
                    }
                    Err(refusal) => {
                        tracing::warn!(%manifest, %refusal, "announce refused");
                        connection.close(CLOSE_BUSY.into(), b"tracker full");
                        return;
                    }
                }
                message = match reader.next(address).await {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::debug!(%error, "session ended");
                        return;
                    }
                };
            }
        }
        .instrument(span)
        .await;
        let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
        for manifest in announced {
            tracker.handle_departure(&manifest, address, session);
        }
    }
}

/// How long a server writing a boot script waits for the image's tracker before it also
/// dials the next (a boot script is on a node's boot path; members meet at the first
/// tracker that answered them, which is nearly always the first in order).
const FIRMWARE_PEERS_HEDGE_AFTER: Duration = Duration::from_millis(200);
/// How long a server writing a boot script waits for booted peers in all; past it the
/// script names the servers only.
const FIRMWARE_PEERS_TIMEOUT: Duration = Duration::from_secs(1);
/// Boot scripts asking trackers at once, per server; more are written without peers.
const FIRMWARE_PEER_QUERIES_MAX: usize = 32;

/// Where a server learns which booted nodes may serve an image's firmware-stage files
/// (ADR 0016).
#[derive(Debug, Clone)]
pub enum FirmwarePeerSource {
    /// This server tracks its own images (a standalone server: no tracker list).
    Local(Arc<TrackerService>),
    /// Each image's tracker is the first of `trackers` in [`tracker_order`] that answers, as
    /// for the image's members, which may be another server of the cluster: it is asked.
    Trackers {
        /// This server's swarm member, which dials the trackers.
        swarm: Arc<SwarmNode>,
        /// The servers' swarm endpoints.
        trackers: Vec<SocketAddr>,
        /// Bounds the queries in flight.
        queries: Arc<tokio::sync::Semaphore>,
    },
}

impl FirmwarePeerSource {
    /// Asks `trackers` through `swarm`.
    pub fn trackers(swarm: Arc<SwarmNode>, trackers: Vec<SocketAddr>) -> Self {
        Self::Trackers {
            swarm,
            trackers,
            queries: Arc::new(tokio::sync::Semaphore::new(FIRMWARE_PEER_QUERIES_MAX)),
        }
    }

    /// Up to `wanted` booted nodes (their IPs) that may serve `manifest`'s firmware-stage
    /// files to the node booting at `client`, none at an address in `servers`. Empty when
    /// the tracker cannot be asked in time: the script then names the servers only.
    pub async fn firmware_peers(
        &self,
        manifest: &ContentHash,
        client: IpAddr,
        servers: &[IpAddr],
        wanted: usize,
    ) -> Vec<IpAddr> {
        let peers = match self {
            Self::Local(tracker) => tracker.firmware_peers(manifest, client, servers, wanted),
            Self::Trackers {
                swarm,
                trackers,
                queries,
            } => {
                let Ok(_query) = queries.try_acquire() else {
                    tracing::info!("too many boot scripts asking trackers at once; servers only");
                    return Vec::new();
                };
                // The tracker does not know which members are servers: it is asked for as
                // many more as there are, and they are left out here. Its choice for a
                // client is a fixed order filtered, so the result is what it would have
                // chosen knowing them.
                let asked = (wanted + servers.len()).min(transfer::swarm::FIRMWARE_PEERS_MAX);
                match tokio::time::timeout(
                    FIRMWARE_PEERS_TIMEOUT,
                    swarm.ask_firmware_peers(trackers, manifest, client, asked),
                )
                .await
                {
                    Ok(Ok(peers)) => peers,
                    Ok(Err(error)) => {
                        tracing::info!(%error, "booted peers unknown; servers only");
                        return Vec::new();
                    }
                    Err(_) => {
                        tracing::info!("no tracker answered in time; servers only");
                        return Vec::new();
                    }
                }
            }
        };
        peers
            .into_iter()
            .map(|peer| peer.ip())
            .filter(|peer| *peer != client && !servers.contains(peer))
            .take(wanted)
            .collect()
    }
}

/// How a member announces itself.
#[derive(Debug, Clone)]
pub struct AnnounceOptions {
    /// The servers that track images (their swarm endpoints); the image's tracker is the
    /// first of them by [`tracker_order`] that answers.
    pub trackers: Vec<SocketAddr>,
    /// The rack this member believes it is in (the tracker's subnet map comes first).
    pub rack: Option<String>,
    /// How often it announces again while it fetches (each answer may name new neighbours).
    pub every_while_fetching: Duration,
    /// How often it announces again once complete (to stay listed; must be well within the
    /// tracker's time to live).
    pub every_when_complete: Duration,
}

impl Default for AnnounceOptions {
    fn default() -> Self {
        Self {
            trackers: Vec::new(),
            rack: None,
            every_while_fetching: Duration::from_secs(5),
            every_when_complete: Duration::from_secs(30),
        }
    }
}

/// The first pause before a member that announces to a lower-ranked tracker (or to none)
/// tries the better-ranked ones again; it doubles up to the announce period. Short, so that
/// members that started before their tracker was up soon all meet at the same one.
const RETRY_BETTER_FIRST: Duration = Duration::from_secs(1);

/// The first pause after a session was lost before the next attempt; it doubles up to the
/// announce period while sessions keep being lost.
const LOST_PAUSE_FIRST: Duration = Duration::from_millis(500);

/// An open session with a tracker.
struct Session {
    tracker: SocketAddr,
    rank: usize,
    connection: Connection,
    send: SendStream,
    reader: FrameReader,
}

impl SwarmNode {
    /// Asks `manifest`'s tracker (the first of `trackers` in [`tracker_order`] to answer) for
    /// up to `wanted` complete members in the rack of the node booting at `client`: one
    /// question on a connection of its own, closed once answered.
    pub async fn ask_firmware_peers(
        &self,
        trackers: &[SocketAddr],
        manifest: &ContentHash,
        client: IpAddr,
        wanted: usize,
    ) -> Result<Vec<SocketAddr>, SwarmError> {
        let order = tracker_order(manifest, trackers);
        let Some((_, tracker, (connection, mut send, mut reader))) = self
            .open_first_answering(&order, FIRMWARE_PEERS_HEDGE_AFTER)
            .await
        else {
            return Err(SwarmError::NoTracker);
        };
        let peer_error = |reason: String| SwarmError::Peer {
            peer: tracker,
            reason,
        };
        let question = Message::FirmwarePeersWanted {
            manifest: *manifest,
            client,
            wanted: u8::try_from(wanted.min(transfer::swarm::FIRMWARE_PEERS_MAX))
                .unwrap_or(u8::MAX),
        };
        write_message(&mut send, &question)
            .await
            .map_err(|error| peer_error(error.to_string()))?;
        let answer = reader.next(tracker).await;
        connection.close(CLOSE_DONE.into(), b"answered");
        match answer? {
            Message::FirmwarePeers { peers } => {
                tracing::debug!(%tracker, %manifest, %client, ?peers, "the image's tracker named booted peers");
                Ok(peers)
            }
            other => Err(peer_error(format!(
                "expected firmware peers, got {}",
                other.kind()
            ))),
        }
    }

    /// Opens a control stream with the first of `trackers` (in rank order) to answer: the
    /// tracker of rank r is dialled `TRACKER_HEDGE_AFTER` × r after the first, each dial
    /// waits at most `TRACKER_TIMEOUT`. A better-ranked tracker that answers later is moved
    /// back to by the announce loop's retries.
    async fn open_first_answering(
        &self,
        trackers: &[SocketAddr],
        hedge_after: Duration,
    ) -> Option<(usize, SocketAddr, (Connection, SendStream, FrameReader))> {
        let mut dials: FuturesUnordered<_> = trackers
            .iter()
            .enumerate()
            .map(|(rank, &tracker)| async move {
                tokio::time::sleep(hedge_after * rank as u32).await;
                let opened =
                    tokio::time::timeout(TRACKER_TIMEOUT, self.open_control(tracker)).await;
                (rank, tracker, opened)
            })
            .collect();
        while let Some((rank, tracker, opened)) = dials.next().await {
            match opened {
                Ok(Ok(streams)) => return Some((rank, tracker, streams)),
                Ok(Err(error)) => tracing::debug!(%tracker, %error, "tracker unreachable"),
                Err(_) => tracing::debug!(%tracker, "tracker did not answer in time"),
            }
        }
        None
    }

    /// Announces `image` to its tracker until the task is dropped: on a period, and at once
    /// when the image becomes complete (fetchers are told of a new seed). Neighbours go to the
    /// image's fetch, if one runs. When the tracker cannot be reached the next in order takes
    /// over; a better-ranked one that answers again is moved back to, so that every member of
    /// the image soon asks the same tracker again. `on_tracker` hears each new session.
    pub async fn announce(
        self: Arc<Self>,
        image: Arc<SharedImage>,
        options: AnnounceOptions,
        on_tracker: impl Fn(SocketAddr) + Send,
    ) {
        let manifest = image.image().manifest();
        let total = image.image().chunk_count();
        let order = tracker_order(&manifest, &options.trackers);
        if order.is_empty() {
            return;
        }
        let span = tracing::info_span!("announce", %manifest);
        async move {
            if image.held().count() < total {
                let waited = tokio::time::Instant::now();
                while image.fetch_running().is_none() && waited.elapsed() < FETCH_START_WAIT {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let mut session: Option<Session> = None;
            let mut retry_better = RETRY_BETTER_FIRST;
            // A fetcher announces again after 1 s, 2 s, ... up to its period: members of a
            // storm come up together, and the first answers name few of them.
            let mut fetching_period = RETRY_BETTER_FIRST;
            let mut lost_pause = LOST_PAUSE_FIRST;
            loop {
                let better_than = session.as_ref().map_or(order.len(), |open| open.rank);
                if let Some((rank, tracker, (connection, send, reader))) =
                    self.open_first_answering(&order[..better_than], TRACKER_HEDGE_AFTER)
                        .await
                {
                    if let Some(previous) = session.take() {
                        previous.connection.close(CLOSE_DONE.into(), b"moved back");
                    }
                    tracing::info!(%tracker, "announcing to tracker");
                    on_tracker(tracker);
                    session = Some(Session {
                        tracker,
                        rank,
                        connection,
                        send,
                        reader,
                    });
                }
                let complete = image.held().count() == total;
                if let Some(open) = &mut session {
                    let rack = options.rack.clone().unwrap_or_default();
                    let asked = tokio::time::timeout(
                        TRACKER_TIMEOUT,
                        open.announce(manifest, rack, complete),
                    )
                    .await;
                    match asked {
                        Ok(Ok(neighbours)) => {
                            lost_pause = LOST_PAUSE_FIRST;
                            if let Some(fetch) = image.fetch_running() {
                                let _fetch_over =
                                    fetch.send(FetchEvent::Neighbours(neighbours)).await;
                            }
                        }
                        Ok(Err(error)) => {
                            // A tracker that takes sessions but refuses announces (full) is
                            // asked less and less often, not twice a second.
                            tracing::warn!(tracker = %open.tracker, %error, pause_ms = lost_pause.as_millis() as u64, "tracker session lost");
                            session = None;
                            tokio::time::sleep(lost_pause).await;
                            lost_pause = (lost_pause * 2).min(options.every_while_fetching);
                            continue;
                        }
                        Err(_) => {
                            tracing::warn!(tracker = %open.tracker, "tracker did not answer in time");
                            open.connection.close(CLOSE_DONE.into(), b"too slow");
                            session = None;
                            continue;
                        }
                    }
                }
                // Until the period is over, or the image became complete; sooner while a
                // better-ranked tracker may come back.
                let period = if complete {
                    options.every_when_complete
                } else {
                    let period = fetching_period.min(options.every_while_fetching);
                    fetching_period = (fetching_period * 2).min(options.every_while_fetching);
                    period
                };
                let wait = if session.as_ref().is_some_and(|open| open.rank == 0) {
                    retry_better = RETRY_BETTER_FIRST;
                    period
                } else {
                    let wait = retry_better.min(period);
                    retry_better = (retry_better * 2).min(period);
                    wait
                };
                // A session that closes meanwhile (the tracker died: its connection timed
                // out) ends the wait, so the member is listed by the next tracker at once.
                let wait_from = tokio::time::Instant::now();
                while wait_from.elapsed() < wait {
                    let closed = async {
                        match &session {
                            Some(open) => open.connection.closed().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        reason = closed => {
                            tracing::warn!(%reason, "tracker session lost");
                            session = None;
                            break;
                        }
                        () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    if !complete && image.held().count() == total {
                        break;
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }
}

impl Session {
    async fn announce(
        &mut self,
        manifest: ContentHash,
        rack: String,
        complete: bool,
    ) -> Result<Neighbours, SwarmError> {
        let peer_error = |reason: String| SwarmError::Peer {
            peer: self.tracker,
            reason,
        };
        write_message(
            &mut self.send,
            &Message::Announce {
                manifest,
                rack,
                complete,
            },
        )
        .await
        .map_err(|error| peer_error(error.to_string()))?;
        match self.reader.next(self.tracker).await? {
            Message::Neighbours {
                same_rack,
                elsewhere,
            } => Ok(Neighbours {
                same_rack,
                elsewhere,
            }),
            other => Err(peer_error(format!(
                "answered an announce with {}",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot_services::dhcp::Ipv4Network;

    #[test]
    fn a_member_is_in_the_rack_of_the_most_specific_subnet_else_where_it_says() {
        let network = |address: [u8; 4], prefix_length: u8| Ipv4Network {
            address: address.into(),
            prefix_length,
        };
        let service = TrackerService::new(
            TrackerConfig::default(),
            RackMap::new(vec![
                (network([10, 0, 0, 0], 16), "row".into()),
                (network([10, 0, 2, 0], 24), "r2".into()),
            ]),
        );
        let ip = |text: &str| text.parse::<IpAddr>().expect("an address");
        assert_eq!(service.rack_of(ip("10.0.2.9"), "r7").as_deref(), Some("r2"));
        assert_eq!(service.rack_of(ip("10.0.3.9"), "").as_deref(), Some("row"));
        assert_eq!(service.rack_of(ip("10.1.0.1"), "r7").as_deref(), Some("r7"));
        assert_eq!(service.rack_of(ip("10.1.0.1"), ""), None);
        assert_eq!(service.rack_of(ip("fd00::1"), ""), None);
    }
}
