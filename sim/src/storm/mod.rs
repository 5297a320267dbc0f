//! The storm engine (DESIGN 9): a discrete-event, bandwidth-aware simulation of a boot storm
//! that drives the real swarm cores of `transfer` (the fetch scheduler, the tracker, the
//! upload gate and the send claims) for thousands of nodes, in virtual time, on a fluid model
//! of the datacenter network ([`network`]).
//!
//! What it models: each node powers on, starts its agent, announces to its image's tracker
//! (chosen by rendezvous hash over the servers, as in `node`), dials the neighbours it is
//! told of, exchanges HAVEs with its peerings, asks for chunks as its scheduler says, and
//! serves chunks through its upload gate while it fetches and after. Messages take the
//! configured latency; chunk bytes share the links max-min fairly. The same code answers for
//! the baseline: in `central` mode every node reads the whole image from one server.
//!
//! What it leaves out (the chaos engine's business): DHCP, TFTP, Raft, corrupted chunks and
//! crashes, and the CPU cost of moving bytes. One seed gives one run: every choice comes from
//! a seeded generator, every collection that is iterated is ordered, and the trace hash
//! covers every announce answer and chunk acceptance with its virtual time.

pub mod network;
pub mod report;
pub mod scenario;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use transfer::ContentHash;
use transfer::swarm::{
    Admission, Announce, Bitfield, ChunkArrival, FetchAction, FetchScheduler, HoldBack, Priority,
    SendClaims, Ticket, Tracker, TrackerConfig, UploadEvent, UploadGate, seed_order_key,
    tracker_order,
};

use self::network::{Endpoint, EndpointLink, FluidNetwork, Topology};
pub use self::report::StormReport;
pub use self::scenario::{Serving, StormScenario};

/// The most peerings a fetch opens from the neighbours a tracker names (as in `node`).
const PEERS_DIALLED_MAX: usize = 24;
/// The waits between a fetching member's announces: 1, 2 and 4 s, then every 5 s (as in
/// `node`); a complete member announces every 30 s.
const ANNOUNCE_FIRST: Duration = Duration::from_secs(1);
const ANNOUNCE_WHILE_FETCHING: Duration = Duration::from_secs(5);
/// A run that has not ended after this much virtual time is reported as stuck.
const VIRTUAL_TIME_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// The port members are reached on (a name in the simulation, never a socket).
const SWARM_PORT: u16 = 7000;

/// Why a storm run failed.
#[derive(Debug, thiserror::Error)]
pub enum StormError {
    /// The scenario does not describe a network that can be run.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// A core refused what the engine gave it: a bug in the engine.
    #[error("the engine fed a core something it refused: {0}")]
    Engine(String),
    /// Nodes never completed.
    #[error("{incomplete} of {nodes} nodes never completed (virtual time {seconds:.1} s)")]
    Stuck {
        /// Nodes without the whole image.
        incomplete: usize,
        /// Nodes.
        nodes: usize,
        /// When the run gave up.
        seconds: f64,
    },
}

/// A seeded generator (splitmix64): the engine's only source of choices.
#[derive(Debug, Clone)]
struct SeededRng(u64);

impl SeededRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.next() % bound }
    }
}

/// What happens, when.
#[derive(Debug, Clone)]
enum Event {
    PowerOn(Endpoint),
    AgentStarts(Endpoint),
    AnnounceDue(Endpoint),
    TrackerHears {
        member: Endpoint,
        complete: bool,
    },
    NeighboursArrive {
        member: Endpoint,
        same_rack: Vec<Endpoint>,
        all: Vec<Endpoint>,
    },
    PeeringUp {
        dialler: Endpoint,
        target: Endpoint,
    },
    HaveArrives {
        from: Endpoint,
        to: Endpoint,
        index: u32,
    },
    RequestArrives {
        fetcher: Endpoint,
        uploader: Endpoint,
        index: u32,
        priority: Priority,
    },
    CancelArrives {
        fetcher: Endpoint,
        uploader: Endpoint,
        index: u32,
    },
    AnswerArrives {
        fetcher: Endpoint,
        uploader: Endpoint,
        index: u32,
        answer: Refusal,
    },
    ChunkArrives {
        fetcher: Endpoint,
        uploader: Endpoint,
        index: u32,
    },
    SchedulerWake(Endpoint),
    GateWake(Endpoint),
}

/// How an uploader turned a request down.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Busy(Duration),
    Declined(Duration),
    NotHere,
}

struct Scheduled {
    at_ns: u64,
    sequence: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ns, self.sequence) == (other.at_ns, other.sequence)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_ns, self.sequence).cmp(&(other.at_ns, other.sequence))
    }
}

/// One server or node.
struct Member {
    rack: u32,
    server: bool,
    held: Bitfield,
    fetch: Option<FetchScheduler>,
    powered_on_ns: Option<u64>,
    started_ns: Option<u64>,
    completed_ns: Option<u64>,
    peers: BTreeSet<Endpoint>,
    dialling: BTreeSet<Endpoint>,
    same_rack_named: BTreeSet<Endpoint>,
    gate: UploadGate,
    claims: SendClaims<Endpoint>,
    /// Requests waiting in the gate or being sent, by (fetcher, chunk).
    uploads: BTreeMap<(Endpoint, u32), Ticket>,
    scheduler_wake_ns: Option<u64>,
    gate_wake_ns: Option<u64>,
    announce_wait: Duration,
    bytes_from_servers: u64,
    bytes_from_nodes: u64,
    bytes_duplicate: u64,
    bytes_uploaded: u64,
}

/// A request the gate released or holds.
#[derive(Debug, Clone, Copy)]
struct Upload {
    uploader: Endpoint,
    fetcher: Endpoint,
    index: u32,
}

/// Counters of the whole run.
#[derive(Debug, Clone, Default)]
struct Tally {
    requests: u64,
    declined: u64,
    busy: u64,
    not_here: u64,
    cancelled: u64,
    announces: u64,
    peerings: u64,
    bytes_same_rack: u64,
    bytes_across_racks: u64,
    bytes_across_racks_from_nodes: u64,
    events: u64,
}

/// One storm, being run.
pub struct StormEngine {
    scenario: StormScenario,
    /// The origin of virtual time for the cores, which take `Instant`s.
    origin: Instant,
    now_ns: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    sequence: u64,
    network: FluidNetwork,
    members: Vec<Member>,
    servers: u32,
    manifest: ContentHash,
    tracker_endpoint: Endpoint,
    tracker: Tracker,
    tickets: BTreeMap<Ticket, Upload>,
    next_ticket: Ticket,
    rng: SeededRng,
    trace_hash: u64,
    tally: Tally,
    late_started: bool,
    /// Nodes without the whole image yet (kept, not counted: the loop asks every step).
    incomplete_nodes: usize,
    /// Of those, the nodes outside the late racks.
    incomplete_early_nodes: usize,
}

impl std::fmt::Debug for StormEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StormEngine")
            .field("scenario", &self.scenario.name)
            .field("now_ns", &self.now_ns)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// The address a member is reached on: a name in the simulation (10.0.0.0/8 counted up),
/// never a socket.
fn address_of(endpoint: Endpoint) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(0x0A00_0000 + endpoint),
        SWARM_PORT,
    ))
}

fn endpoint_of(address: SocketAddr) -> Option<Endpoint> {
    match address {
        SocketAddr::V4(v4) if v4.port() == SWARM_PORT => {
            u32::from(*v4.ip()).checked_sub(0x0A00_0000)
        }
        _ => None,
    }
}

fn mbit(rate: f64) -> f64 {
    rate * 1e6 / 8.0
}

impl StormEngine {
    /// A storm of `scenario`, all of whose choices follow from `seed`.
    pub fn new(scenario: StormScenario, seed: u64) -> Result<Self, StormError> {
        scenario.validate()?;
        let servers = scenario.fleet.servers;
        let nodes = scenario.node_count();
        let chunks = scenario.image.chunks;
        let network_shape = &scenario.network;
        let unlimited = f64::INFINITY;
        let mut endpoints = Vec::with_capacity((servers + nodes) as usize);
        for server in 0..servers {
            endpoints.push(EndpointLink {
                rack: server % scenario.fleet.racks,
                up_bytes_per_second: mbit(network_shape.server_up_mbit),
                down_bytes_per_second: unlimited,
            });
        }
        for node in 0..nodes {
            endpoints.push(EndpointLink {
                rack: node / scenario.fleet.nodes_per_rack.max(1),
                up_bytes_per_second: mbit(network_shape.node_up_mbit),
                down_bytes_per_second: network_shape.node_down_mbit.map_or(unlimited, mbit),
            });
        }
        let topology = Topology {
            racks: scenario.fleet.racks,
            uplink_bytes_per_second: network_shape.uplink_mbit.map_or(unlimited, mbit),
            spine_bytes_per_second: network_shape.spine_mbit.map_or(unlimited, mbit),
            endpoints: endpoints.clone(),
        };
        let claim_timings = scenario.protocol.claim_timings();
        let upload_config = scenario.protocol.upload();
        let members = endpoints
            .iter()
            .enumerate()
            .map(|(number, link)| {
                let server = (number as u32) < servers;
                let held = if server {
                    Bitfield::full(chunks)
                } else {
                    Bitfield::empty(chunks)
                };
                Member {
                    rack: link.rack,
                    server,
                    held,
                    fetch: None,
                    powered_on_ns: None,
                    started_ns: None,
                    completed_ns: server.then_some(0),
                    peers: BTreeSet::new(),
                    dialling: BTreeSet::new(),
                    same_rack_named: BTreeSet::new(),
                    gate: UploadGate::new(upload_config),
                    claims: SendClaims::new(chunks, claim_timings),
                    uploads: BTreeMap::new(),
                    scheduler_wake_ns: None,
                    gate_wake_ns: None,
                    announce_wait: ANNOUNCE_FIRST,
                    bytes_from_servers: 0,
                    bytes_from_nodes: 0,
                    bytes_duplicate: 0,
                    bytes_uploaded: 0,
                }
            })
            .collect();
        let manifest = ContentHash::of(scenario.name.as_bytes());
        let server_addresses: Vec<SocketAddr> = (0..servers).map(address_of).collect();
        let tracker_endpoint = tracker_order(&manifest, &server_addresses)
            .first()
            .copied()
            .and_then(endpoint_of)
            .unwrap_or(0);
        let mut engine = Self {
            origin: virtual_origin(),
            now_ns: 0,
            queue: BinaryHeap::new(),
            sequence: 0,
            network: FluidNetwork::new(topology),
            members,
            servers,
            manifest,
            tracker_endpoint,
            tracker: Tracker::new(TrackerConfig::default()),
            tickets: BTreeMap::new(),
            next_ticket: 0,
            rng: SeededRng(seed),
            trace_hash: 0xCBF2_9CE4_8422_2325,
            tally: Tally::default(),
            late_started: false,
            incomplete_nodes: 0,
            incomplete_early_nodes: 0,
            scenario,
        };
        if engine.scenario.serving == Serving::Swarm {
            // The servers other than the tracker announce the image they offer.
            for server in 0..servers {
                if server != engine.tracker_endpoint {
                    let at = engine.latency_ns(server, engine.tracker_endpoint);
                    engine.push(
                        at,
                        Event::TrackerHears {
                            member: server,
                            complete: true,
                        },
                    );
                }
            }
        }
        let late: BTreeSet<u32> = engine.scenario.boot.late_racks.iter().copied().collect();
        engine.incomplete_nodes = nodes as usize;
        for node in servers..servers + nodes {
            if !late.contains(&engine.members[node as usize].rack) {
                engine.incomplete_early_nodes += 1;
                engine.power_on_later(node);
            }
        }
        Ok(engine)
    }

    fn power_on_later(&mut self, node: Endpoint) {
        let spread_ns = self.scenario.boot.power_on_spread_ms * 1_000_000;
        let at = self.now_ns + self.rng.below(spread_ns + 1);
        self.push(at, Event::PowerOn(node));
    }

    fn instant(&self, at_ns: u64) -> Instant {
        self.origin + Duration::from_nanos(at_ns)
    }

    fn now(&self) -> Instant {
        self.instant(self.now_ns)
    }

    fn push(&mut self, at_ns: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Reverse(Scheduled {
            at_ns,
            sequence: self.sequence,
            event,
        }));
    }

    fn latency_ns(&self, from: Endpoint, to: Endpoint) -> u64 {
        let network = &self.scenario.network;
        let micros = if self.members[from as usize].rack == self.members[to as usize].rack {
            network.latency_us
        } else {
            network.cross_rack_latency_us
        };
        micros * 1000
    }

    fn send(&mut self, from: Endpoint, to: Endpoint, event: Event) {
        let at = self.now_ns + self.latency_ns(from, to);
        self.push(at, event);
    }

    fn record(&mut self, values: [u64; 4]) {
        for value in std::iter::once(self.now_ns).chain(values) {
            for byte in value.to_le_bytes() {
                self.trace_hash ^= u64::from(byte);
                self.trace_hash = self.trace_hash.wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
    }

    fn nodes(&self) -> std::ops::Range<Endpoint> {
        self.servers..self.members.len() as Endpoint
    }

    /// Runs the storm to its end: every node holds the image.
    pub fn run(mut self) -> Result<StormReport, StormError> {
        let limit_ns = VIRTUAL_TIME_LIMIT.as_nanos() as u64;
        loop {
            if self.incomplete_nodes == 0 {
                break;
            }
            let next_event = self.queue.peek().map(|Reverse(scheduled)| scheduled.at_ns);
            let next_delivery = self.network.next_delivery_ns(self.now_ns);
            let next = match (next_event, next_delivery) {
                (None, None) => break,
                (Some(event), None) => event,
                (None, Some(delivery)) => delivery,
                (Some(event), Some(delivery)) => event.min(delivery),
            };
            if next > limit_ns {
                break;
            }
            self.now_ns = self.now_ns.max(next);
            if next_delivery == Some(next) {
                for delivered in self.network.deliver_due(self.now_ns) {
                    self.upload_done(delivered.id);
                }
            }
            while let Some(Reverse(scheduled)) = self.queue.peek() {
                if scheduled.at_ns > self.now_ns {
                    break;
                }
                let Some(Reverse(scheduled)) = self.queue.pop() else {
                    break;
                };
                self.tally.events += 1;
                self.handle(scheduled.event)?;
            }
            if !self.late_started
                && !self.scenario.boot.late_racks.is_empty()
                && self.incomplete_early_nodes == 0
            {
                self.late_started = true;
                let late: BTreeSet<u32> = self.scenario.boot.late_racks.iter().copied().collect();
                let waiting: Vec<Endpoint> = self
                    .nodes()
                    .filter(|node| late.contains(&self.members[*node as usize].rack))
                    .collect();
                for node in waiting {
                    self.power_on_later(node);
                }
            }
        }
        let incomplete = self
            .nodes()
            .filter(|node| self.members[*node as usize].completed_ns.is_none())
            .count();
        if incomplete > 0 {
            return Err(StormError::Stuck {
                incomplete,
                nodes: self.nodes().len(),
                seconds: self.now_ns as f64 / 1e9,
            });
        }
        Ok(self.report())
    }

    fn handle(&mut self, event: Event) -> Result<(), StormError> {
        match event {
            Event::PowerOn(node) => {
                self.members[node as usize].powered_on_ns = Some(self.now_ns);
                let at = self.now_ns + self.scenario.boot.agent_starts_after_ms * 1_000_000;
                self.push(at, Event::AgentStarts(node));
            }
            Event::AgentStarts(node) => self.agent_starts(node)?,
            Event::AnnounceDue(node) => self.announce(node),
            Event::TrackerHears { member, complete } => self.tracker_hears(member, complete)?,
            Event::NeighboursArrive {
                member,
                same_rack,
                all,
            } => self.neighbours_arrive(member, &same_rack, &all),
            Event::PeeringUp { dialler, target } => self.peering_up(dialler, target),
            Event::HaveArrives { from, to, index } => {
                let now = self.now();
                let member = &mut self.members[to as usize];
                member.claims.note_announced(now, index, from);
                if let Some(fetch) = &mut member.fetch {
                    fetch
                        .handle_have_chunk(now, u64::from(from), index)
                        .map_err(|error| StormError::Engine(error.to_string()))?;
                    self.drain_fetch(to);
                }
            }
            Event::RequestArrives {
                fetcher,
                uploader,
                index,
                priority,
            } => self.request_arrives(fetcher, uploader, index, priority),
            Event::CancelArrives {
                fetcher,
                uploader,
                index,
            } => self.cancel_arrives(fetcher, uploader, index),
            Event::AnswerArrives {
                fetcher,
                uploader,
                index,
                answer,
            } => {
                let now = self.now();
                if let Some(fetch) = &mut self.members[fetcher as usize].fetch {
                    let peer = u64::from(uploader);
                    let result = match answer {
                        Refusal::Busy(pause) => fetch.handle_refused(now, peer, index, Some(pause)),
                        Refusal::Declined(pause) => fetch.handle_declined(now, peer, index, pause),
                        Refusal::NotHere => fetch.handle_refused(now, peer, index, None),
                    };
                    result.map_err(|error| StormError::Engine(error.to_string()))?;
                    self.drain_fetch(fetcher);
                }
            }
            Event::ChunkArrives {
                fetcher,
                uploader,
                index,
            } => self.chunk_arrives(fetcher, uploader, index)?,
            Event::SchedulerWake(node) => {
                let now = self.now();
                let member = &mut self.members[node as usize];
                if member.scheduler_wake_ns == Some(self.now_ns) {
                    member.scheduler_wake_ns = None;
                    if let Some(fetch) = &mut member.fetch {
                        fetch.handle_timeout(now);
                    }
                    self.drain_fetch(node);
                }
            }
            Event::GateWake(node) => {
                let member = &mut self.members[node as usize];
                if member.gate_wake_ns == Some(self.now_ns) {
                    member.gate_wake_ns = None;
                    self.pump_gate(node);
                }
            }
        }
        Ok(())
    }

    fn agent_starts(&mut self, node: Endpoint) -> Result<(), StormError> {
        let chunks = self.scenario.image.chunks;
        let critical: Vec<u32> = (0..self.scenario.image.boot_critical_chunks).collect();
        let tie_break = self.rng.next();
        let fetch = FetchScheduler::new(
            self.scenario.protocol.scheduler(),
            Bitfield::empty(chunks),
            &critical,
            tie_break,
        )
        .map_err(|error| StormError::Engine(error.to_string()))?;
        let member = &mut self.members[node as usize];
        member.fetch = Some(fetch);
        member.started_ns = Some(self.now_ns);
        match self.scenario.serving {
            Serving::Swarm => self.announce(node),
            Serving::Central => {
                // The node's own server, as a segment's LTSP server is.
                let server = (node - self.servers) % self.servers;
                let at = self.now_ns + 2 * self.latency_ns(node, server);
                self.members[node as usize].dialling.insert(server);
                self.push(
                    at,
                    Event::PeeringUp {
                        dialler: node,
                        target: server,
                    },
                );
            }
        }
        Ok(())
    }

    fn announce(&mut self, member: Endpoint) {
        let complete = self.members[member as usize].completed_ns.is_some();
        self.tally.announces += 1;
        self.send(
            member,
            self.tracker_endpoint,
            Event::TrackerHears { member, complete },
        );
        // While fetching: again after 1, 2 and 4 s, then every 5 s. A complete node's later
        // announces only keep its listing and change nothing in a storm's time span.
        if !complete {
            let state = &mut self.members[member as usize];
            let wait = state.announce_wait;
            state.announce_wait = (wait * 2).min(ANNOUNCE_WHILE_FETCHING);
            let at = self.now_ns + wait.as_nanos() as u64;
            self.push(at, Event::AnnounceDue(member));
        }
    }

    fn tracker_hears(&mut self, member: Endpoint, complete: bool) -> Result<(), StormError> {
        let now = self.now();
        let rack = Some(format!("r{}", self.members[member as usize].rack));
        let announce = Announce {
            address: address_of(member),
            rack,
            complete,
            session: u64::from(member),
        };
        let neighbours = self
            .tracker
            .handle_announce(now, self.manifest, announce)
            .map_err(|error| StormError::Engine(error.to_string()))?;
        let mut same_rack: Vec<Endpoint> = neighbours
            .same_rack
            .iter()
            .filter_map(|address| endpoint_of(*address))
            .collect();
        let mut all: Vec<Endpoint> = neighbours.all().filter_map(endpoint_of).collect();
        // The tracker names itself as a seed of the image it offers (as `node` does).
        if member != self.tracker_endpoint && !all.contains(&self.tracker_endpoint) {
            all.insert(0, self.tracker_endpoint);
            all.truncate(transfer::swarm::tracker::NEIGHBOURS_MAX);
            same_rack.retain(|neighbour| all.contains(neighbour));
        }
        self.record([1, u64::from(member), all.len() as u64, u64::from(complete)]);
        if !self.members[member as usize].server {
            self.send(
                self.tracker_endpoint,
                member,
                Event::NeighboursArrive {
                    member,
                    same_rack,
                    all,
                },
            );
        }
        Ok(())
    }

    fn neighbours_arrive(&mut self, node: Endpoint, same_rack: &[Endpoint], all: &[Endpoint]) {
        let now = self.now();
        let member = &mut self.members[node as usize];
        if member.completed_ns.is_some() {
            return;
        }
        for &neighbour in same_rack {
            if member.same_rack_named.insert(neighbour)
                && member.peers.contains(&neighbour)
                && let Some(fetch) = &mut member.fetch
            {
                fetch.handle_peer_place(now, u64::from(neighbour), true);
            }
        }
        let room = PEERS_DIALLED_MAX.saturating_sub(member.peers.len() + member.dialling.len());
        let new: Vec<Endpoint> = all
            .iter()
            .copied()
            .filter(|neighbour| {
                *neighbour != node
                    && !member.peers.contains(neighbour)
                    && !member.dialling.contains(neighbour)
            })
            .take(room)
            .collect();
        member.dialling.extend(new.iter().copied());
        for target in new {
            // A QUIC handshake: one round trip.
            let at = self.now_ns + 2 * self.latency_ns(node, target);
            self.push(
                at,
                Event::PeeringUp {
                    dialler: node,
                    target,
                },
            );
        }
        self.drain_fetch(node);
    }

    fn peering_up(&mut self, dialler: Endpoint, target: Endpoint) {
        self.members[dialler as usize].dialling.remove(&target);
        if self.members[dialler as usize].peers.contains(&target) {
            return;
        }
        self.tally.peerings += 1;
        for (side, other) in [(dialler, target), (target, dialler)] {
            self.members[side as usize].peers.insert(other);
            let now = self.now();
            let other_held = self.members[other as usize].held.clone();
            let member = &mut self.members[side as usize];
            let same_rack = member.same_rack_named.contains(&other);
            if member.completed_ns.is_none()
                && let Some(fetch) = &mut member.fetch
                && fetch.handle_peer(now, u64::from(other), other_held).is_ok()
            {
                if same_rack {
                    fetch.handle_peer_place(now, u64::from(other), true);
                }
                fetch.handle_peer_order_key(
                    now,
                    u64::from(other),
                    seed_order_key(address_of(other)),
                );
                self.drain_fetch(side);
            }
        }
    }

    fn request_arrives(
        &mut self,
        fetcher: Endpoint,
        uploader: Endpoint,
        index: u32,
        priority: Priority,
    ) {
        self.tally.requests += 1;
        let now = self.now();
        let swarm = self.scenario.serving == Serving::Swarm;
        let idle_seeds_send_at_once = self.scenario.protocol.idle_seeds_send_at_once;
        let chunk_bytes = u32::try_from(self.scenario.image.chunk_bytes()).unwrap_or(u32::MAX);
        let member = &mut self.members[uploader as usize];
        if !member.held.contains(index) {
            self.tally.not_here += 1;
            self.answer(fetcher, uploader, index, Refusal::NotHere);
            return;
        }
        if swarm && priority != Priority::OnDemand {
            let peers = &member.peers;
            let hold_back = if member.held.is_complete() && member.gate.is_busy() {
                HoldBack::WhileBusy
            } else if member.held.is_complete() && idle_seeds_send_at_once {
                HoldBack::Never
            } else {
                HoldBack::Windows
            };
            if let Err((_recipient, wait)) =
                member
                    .claims
                    .claim(now, index, fetcher, hold_back, |peer| peers.contains(peer))
            {
                self.tally.declined += 1;
                self.answer(fetcher, uploader, index, Refusal::Declined(wait));
                return;
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        match member
            .gate
            .handle_request(now, ticket, priority, chunk_bytes)
        {
            Admission::Queued => {
                member.uploads.insert((fetcher, index), ticket);
                self.tickets.insert(
                    ticket,
                    Upload {
                        uploader,
                        fetcher,
                        index,
                    },
                );
                self.pump_gate(uploader);
            }
            Admission::Busy { retry_after } => {
                member.claims.release(index, fetcher);
                self.tally.busy += 1;
                self.answer(fetcher, uploader, index, Refusal::Busy(retry_after));
            }
        }
    }

    fn answer(&mut self, fetcher: Endpoint, uploader: Endpoint, index: u32, answer: Refusal) {
        self.send(
            uploader,
            fetcher,
            Event::AnswerArrives {
                fetcher,
                uploader,
                index,
                answer,
            },
        );
    }

    fn pump_gate(&mut self, uploader: Endpoint) {
        let now = self.now();
        let chunk_bytes = self.scenario.image.chunk_bytes();
        while let Some(event) = self.members[uploader as usize].gate.poll_event(now) {
            match event {
                UploadEvent::Send(ticket) => {
                    if let Some(upload) = self.tickets.get(&ticket).copied() {
                        self.network.start(
                            self.now_ns,
                            ticket,
                            uploader,
                            upload.fetcher,
                            chunk_bytes,
                        );
                    }
                }
                UploadEvent::Busy {
                    ticket,
                    retry_after,
                } => {
                    if let Some(upload) = self.tickets.remove(&ticket) {
                        let member = &mut self.members[uploader as usize];
                        member.uploads.remove(&(upload.fetcher, upload.index));
                        member.claims.release(upload.index, upload.fetcher);
                        self.tally.busy += 1;
                        self.answer(
                            upload.fetcher,
                            uploader,
                            upload.index,
                            Refusal::Busy(retry_after),
                        );
                    }
                }
            }
        }
        let wake = self.members[uploader as usize].gate.poll_timeout();
        if let Some(at) = wake {
            let at_ns = self.ns_of(at);
            let member = &mut self.members[uploader as usize];
            if member.gate_wake_ns.is_none_or(|wake| at_ns < wake) {
                member.gate_wake_ns = Some(at_ns);
                self.push(at_ns, Event::GateWake(uploader));
            }
        }
    }

    fn ns_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    fn upload_done(&mut self, ticket: Ticket) {
        let Some(upload) = self.tickets.remove(&ticket) else {
            return;
        };
        let chunk_bytes = self.scenario.image.chunk_bytes();
        let member = &mut self.members[upload.uploader as usize];
        member.gate.handle_sent();
        member.uploads.remove(&(upload.fetcher, upload.index));
        member.bytes_uploaded += chunk_bytes;
        self.pump_gate(upload.uploader);
        self.send(
            upload.uploader,
            upload.fetcher,
            Event::ChunkArrives {
                fetcher: upload.fetcher,
                uploader: upload.uploader,
                index: upload.index,
            },
        );
    }

    fn cancel_arrives(&mut self, fetcher: Endpoint, uploader: Endpoint, index: u32) {
        let member = &mut self.members[uploader as usize];
        let Some(ticket) = member.uploads.remove(&(fetcher, index)) else {
            return;
        };
        self.tally.cancelled += 1;
        member.claims.release(index, fetcher);
        if self.network.cancel(self.now_ns, ticket) {
            member.gate.handle_sent();
        } else {
            member.gate.handle_cancel(ticket);
        }
        self.tickets.remove(&ticket);
        self.pump_gate(uploader);
    }

    fn chunk_arrives(
        &mut self,
        fetcher: Endpoint,
        uploader: Endpoint,
        index: u32,
    ) -> Result<(), StormError> {
        let now = self.now();
        let chunk_bytes = self.scenario.image.chunk_bytes();
        let from_server = self.members[uploader as usize].server;
        let same_rack = self.members[uploader as usize].rack == self.members[fetcher as usize].rack;
        if same_rack {
            self.tally.bytes_same_rack += chunk_bytes;
        } else {
            self.tally.bytes_across_racks += chunk_bytes;
            if !from_server {
                self.tally.bytes_across_racks_from_nodes += chunk_bytes;
            }
        }
        let member = &mut self.members[fetcher as usize];
        let Some(fetch) = &mut member.fetch else {
            return Ok(());
        };
        let new = member.held.insert(index);
        if new {
            if from_server {
                member.bytes_from_servers += chunk_bytes;
            } else {
                member.bytes_from_nodes += chunk_bytes;
            }
        } else {
            member.bytes_duplicate += chunk_bytes;
        }
        fetch
            .handle_chunk(now, u64::from(uploader), index, ChunkArrival::Verified)
            .map_err(|error| StormError::Engine(error.to_string()))?;
        if new {
            self.record([2, u64::from(fetcher), u64::from(uploader), u64::from(index)]);
            let peers: Vec<Endpoint> = self.members[fetcher as usize]
                .peers
                .iter()
                .copied()
                .collect();
            if self.scenario.serving == Serving::Swarm {
                for peer in peers {
                    self.send(
                        fetcher,
                        peer,
                        Event::HaveArrives {
                            from: fetcher,
                            to: peer,
                            index,
                        },
                    );
                }
            }
        }
        self.drain_fetch(fetcher);
        Ok(())
    }

    /// Carries out what `node`'s scheduler asks, and sets its next wake.
    fn drain_fetch(&mut self, node: Endpoint) {
        loop {
            let Some(fetch) = &mut self.members[node as usize].fetch else {
                return;
            };
            let Some(action) = fetch.poll_action() else {
                break;
            };
            match action {
                FetchAction::Request {
                    peer,
                    index,
                    priority,
                } => {
                    let uploader = peer as Endpoint;
                    self.send(
                        node,
                        uploader,
                        Event::RequestArrives {
                            fetcher: node,
                            uploader,
                            index,
                            priority,
                        },
                    );
                }
                FetchAction::Cancel { peer, index } => {
                    let uploader = peer as Endpoint;
                    self.send(
                        node,
                        uploader,
                        Event::CancelArrives {
                            fetcher: node,
                            uploader,
                            index,
                        },
                    );
                }
                // Nothing corrupt travels in a storm run; the chaos engine tests bans.
                FetchAction::Ban { .. } => {}
                FetchAction::Complete => {
                    let member = &mut self.members[node as usize];
                    member.completed_ns = Some(self.now_ns);
                    self.incomplete_nodes -= 1;
                    if !self.scenario.boot.late_racks.contains(&member.rack) {
                        self.incomplete_early_nodes -= 1;
                    }
                    self.record([3, u64::from(node), 0, 0]);
                    if self.scenario.serving == Serving::Swarm {
                        self.announce(node);
                    }
                }
            }
        }
        let wake = self.members[node as usize]
            .fetch
            .as_ref()
            .and_then(FetchScheduler::poll_timeout);
        if let Some(at) = wake {
            let at_ns = self.ns_of(at).max(self.now_ns);
            let member = &mut self.members[node as usize];
            if member
                .scheduler_wake_ns
                .is_none_or(|current| at_ns < current)
            {
                member.scheduler_wake_ns = Some(at_ns);
                self.push(at_ns, Event::SchedulerWake(node));
            }
        }
    }

    fn report(&self) -> StormReport {
        let image_bytes = self.scenario.image.bytes();
        let mut fetch_seconds = Vec::new();
        let mut boot_seconds = Vec::new();
        let (mut from_servers, mut from_nodes, mut duplicate) = (0u64, 0u64, 0u64);
        let mut first_start = u64::MAX;
        let mut last_complete = 0u64;
        for node in self.nodes() {
            let member = &self.members[node as usize];
            let (Some(started), Some(completed), Some(powered)) =
                (member.started_ns, member.completed_ns, member.powered_on_ns)
            else {
                continue;
            };
            first_start = first_start.min(started);
            last_complete = last_complete.max(completed);
            fetch_seconds.push(completed.saturating_sub(started) as f64 / 1e9);
            boot_seconds.push(completed.saturating_sub(powered) as f64 / 1e9);
            from_servers += member.bytes_from_servers;
            from_nodes += member.bytes_from_nodes;
            duplicate += member.bytes_duplicate;
        }
        let uploaded_by_servers: u64 = (0..self.servers)
            .map(|server| self.members[server as usize].bytes_uploaded)
            .sum();
        let uplinks = (0..self.scenario.fleet.racks)
            .map(|rack| self.network.uplink_bytes(rack))
            .collect();
        StormReport::new(report::Figures {
            scenario: self.scenario.clone(),
            image_bytes,
            fetch_seconds,
            boot_seconds,
            span_seconds: last_complete.saturating_sub(first_start.min(last_complete)) as f64 / 1e9,
            end_seconds: self.now_ns as f64 / 1e9,
            bytes_from_servers: from_servers,
            bytes_from_nodes: from_nodes,
            bytes_duplicate: duplicate,
            bytes_uploaded_by_servers: uploaded_by_servers,
            bytes_same_rack: self.tally.bytes_same_rack,
            bytes_across_racks: self.tally.bytes_across_racks,
            bytes_across_racks_from_nodes: self.tally.bytes_across_racks_from_nodes,
            uplink_bytes: uplinks,
            requests: self.tally.requests,
            declined: self.tally.declined,
            busy: self.tally.busy,
            not_here: self.tally.not_here,
            cancelled: self.tally.cancelled,
            announces: self.tally.announces,
            peerings: self.tally.peerings,
            events: self.tally.events,
            rate_recomputations: self.network.recomputations,
            trace_hash: self.trace_hash,
        })
    }
}

/// The origin of virtual time: the cores take `Instant`s, and an `Instant` can only be made
/// from the clock. Only differences from it are ever used, so its value changes nothing.
#[expect(
    clippy::disallowed_methods,
    reason = "the one clock read: an origin that virtual time is counted from"
)]
fn virtual_origin() -> Instant {
    Instant::now()
}

/// Runs `scenario` with `seed`.
pub fn run_storm(scenario: &StormScenario, seed: u64) -> Result<StormReport, StormError> {
    StormEngine::new(scenario.clone(), seed)?.run()
}
