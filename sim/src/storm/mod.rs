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

/// The picture of storm runs, each with its label (for example "swarm" and "central"): their
/// boot-time CDFs and bytes by source.
pub fn storm_svg(title: &str, runs: &[(&str, &StormReport)]) -> String {
    crate::plot::boot_svg(&crate::plot::BootPlot {
        title: title.to_owned(),
        sources: StormReport::PLOT_SOURCES
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
        runs: runs
            .iter()
            .map(|(label, report)| report.plot_run(label))
            .collect(),
    })
}
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
/// QUIC's idle timeout on chunk and tracker connections (`node::swarm::transport_config`):
/// how long a dead or cut-off peer goes unnoticed.
const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a member waits for a tracker's handshake before it also dials the next in order
/// (`node::swarm::tracker`'s hedge): the engine moves on to the next at once, since only the
/// first to answer counts.
const TRACKER_HEDGE_AFTER: Duration = Duration::from_secs(1);
/// How soon a node without a lease asks again (PXE firmware retries within seconds).
const DHCP_RETRY: Duration = Duration::from_secs(4);
/// How soon a central-mode node dials its server again after losing it.
const REDIAL_AFTER: Duration = Duration::from_secs(1);

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
        tracker: Endpoint,
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
    /// A central-mode node dials its server again after losing it.
    Redial(Endpoint),
    /// A member's tracker handshake went unanswered: it tries the next tracker in order.
    TrackerRetry(Endpoint),
    // Faults (see `scenario::Fault`).
    RackPowerOff(u32),
    RackPowerOn(u32),
    UplinkDown(u32),
    UplinkUp(u32),
    /// QUIC's idle timeout after `rack` was cut at `since_ns`: connections across it that
    /// stayed silent so long are lost, if it is still cut.
    IdleCheck {
        rack: u32,
        since_ns: u64,
    },
    /// `observer`'s connection to `lost` (dead in its `incarnation`) times out.
    PeerLost {
        observer: Endpoint,
        lost: Endpoint,
        incarnation: u32,
    },
    /// A tracker's session with a dead member times out.
    TrackerLoses {
        tracker: Endpoint,
        member: Endpoint,
        session: u64,
    },
    /// Members notice that a tracker died (its sessions time out) and fail over.
    TrackerDownNoticed {
        tracker: Endpoint,
        incarnation: u32,
    },
}

impl Event {
    /// The members an event is sent between or concerns (to drop what a dead one would have
    /// sent or received).
    fn endpoints(&self) -> [Option<Endpoint>; 2] {
        match *self {
            Self::PowerOn(node)
            | Self::AgentStarts(node)
            | Self::AnnounceDue(node)
            | Self::SchedulerWake(node)
            | Self::GateWake(node)
            | Self::Redial(node)
            | Self::TrackerRetry(node) => [Some(node), None],
            Self::TrackerHears {
                tracker, member, ..
            }
            | Self::TrackerLoses {
                tracker, member, ..
            } => [Some(tracker), Some(member)],
            Self::NeighboursArrive { member, .. } => [Some(member), None],
            // A dial to a dead target is the dialler's business (it fails): see `peering_up`.
            Self::PeeringUp { dialler, .. } => [Some(dialler), None],
            Self::HaveArrives { from, to, .. } => [Some(from), Some(to)],
            Self::RequestArrives {
                fetcher, uploader, ..
            }
            | Self::CancelArrives {
                fetcher, uploader, ..
            }
            | Self::AnswerArrives {
                fetcher, uploader, ..
            }
            | Self::ChunkArrives {
                fetcher, uploader, ..
            } => [Some(fetcher), Some(uploader)],
            Self::PeerLost { observer, .. } => [Some(observer), None],
            Self::RackPowerOff(_)
            | Self::RackPowerOn(_)
            | Self::UplinkDown(_)
            | Self::UplinkUp(_)
            | Self::IdleCheck { .. }
            | Self::TrackerDownNoticed { .. } => [None, None],
        }
    }
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
    /// Powered (a rack power loss turns it off).
    up: bool,
    /// Lives so far: bumped at each power loss, so what belonged to an earlier life is known.
    incarnation: u32,
    /// The tracker its session is open with, if any.
    tracker_session: Option<Endpoint>,
    /// Without a session: the rank (in tracker order) it tries next.
    tracker_try: usize,
    /// A handshake with a tracker is waiting to time out.
    tracker_retry_pending: bool,
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
    faults: u64,
    messages_lost: u64,
    dials_failed: u64,
    peerings_lost: u64,
    dhcp_retries: u64,
}

/// Where a run is (see [`StormEngine::run_observed`]).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Virtual time so far.
    pub virtual_seconds: f64,
    /// Events handled so far.
    pub events: u64,
    /// Booting nodes in all.
    pub nodes: usize,
    /// Of those, the ones that do not hold the image (yet, or again after a power loss).
    pub nodes_without_the_image: usize,
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
    /// The image's trackers in rendezvous order (every server, as in `node`).
    tracker_order: Vec<Endpoint>,
    /// Each live tracker's soft state (lost when its server dies).
    trackers: BTreeMap<Endpoint, Tracker>,
    /// Per rack: how many faults hold its uplink down now, and since when.
    uplink_down: Vec<(u32, u64)>,
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
                    up: true,
                    incarnation: 0,
                    tracker_session: None,
                    tracker_try: 0,
                    tracker_retry_pending: false,
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
        let order: Vec<Endpoint> = tracker_order(&manifest, &server_addresses)
            .into_iter()
            .filter_map(endpoint_of)
            .collect();
        let trackers = order
            .iter()
            .map(|tracker| (*tracker, Tracker::new(TrackerConfig::default())))
            .collect();
        let racks = scenario.fleet.racks as usize;
        let mut engine = Self {
            origin: virtual_origin(),
            now_ns: 0,
            queue: BinaryHeap::new(),
            sequence: 0,
            network: FluidNetwork::new(topology)
                .with_rate_quantum(network_shape.rate_quantum_us.saturating_mul(1000)),
            members,
            servers,
            manifest,
            tracker_order: order,
            trackers,
            uplink_down: vec![(0, 0); racks],
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
            for server in 0..servers {
                engine.server_announces(server);
            }
        }
        for fault in engine.scenario.faults.clone() {
            let rack = fault.rack();
            match fault {
                scenario::Fault::RackPowerLoss { at_ms, for_ms, .. } => {
                    engine.push(at_ms * 1_000_000, Event::RackPowerOff(rack));
                    engine.push((at_ms + for_ms) * 1_000_000, Event::RackPowerOn(rack));
                }
                scenario::Fault::LinkFlap { .. } | scenario::Fault::RackCut { .. } => {
                    for (start, end) in fault.uplink_down_periods() {
                        engine.push(start * 1_000_000, Event::UplinkDown(rack));
                        engine.push(end * 1_000_000, Event::UplinkUp(rack));
                    }
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
        if self.network.is_cut_between(from, to) {
            self.tally.messages_lost += 1;
            return;
        }
        let at = self.now_ns + self.latency_ns(from, to);
        self.push(at, event);
    }

    /// A server offers the image to every other live tracker (as `node`'s servers announce
    /// to the image's trackers); a tracker names itself.
    fn server_announces(&mut self, server: Endpoint) {
        let trackers: Vec<Endpoint> = self
            .tracker_order
            .iter()
            .copied()
            .filter(|tracker| *tracker != server && self.members[*tracker as usize].up)
            .collect();
        for tracker in trackers {
            self.send(
                server,
                tracker,
                Event::TrackerHears {
                    tracker,
                    member: server,
                    complete: true,
                },
            );
        }
    }

    /// Sends `member`'s announce to its tracker, opening a session with the first tracker in
    /// order that answers (as `node`'s members do: a handshake unanswered for
    /// `TRACKER_HEDGE_AFTER` moves on to the next).
    fn announce_to_tracker(&mut self, member: Endpoint) {
        let state = &self.members[member as usize];
        if state.tracker_retry_pending || self.tracker_order.is_empty() {
            return;
        }
        let complete = state.completed_ns.is_some();
        let tracker = match state.tracker_session {
            Some(tracker) => tracker,
            None => {
                let tracker = self.tracker_order[state.tracker_try % self.tracker_order.len()];
                if !self.members[tracker as usize].up
                    || self.network.is_cut_between(member, tracker)
                {
                    let state = &mut self.members[member as usize];
                    state.tracker_try += 1;
                    state.tracker_retry_pending = true;
                    let at = self.now_ns + TRACKER_HEDGE_AFTER.as_nanos() as u64;
                    self.push(at, Event::TrackerRetry(member));
                    return;
                }
                self.members[member as usize].tracker_session = Some(tracker);
                tracker
            }
        };
        self.send(
            member,
            tracker,
            Event::TrackerHears {
                tracker,
                member,
                complete,
            },
        );
    }

    /// `member`'s session with its tracker closed (the tracker died, or a cut outlasted the
    /// idle timeout): it starts again from the first tracker in order.
    fn tracker_session_lost(&mut self, member: Endpoint) {
        let state = &mut self.members[member as usize];
        state.tracker_session = None;
        state.tracker_try = 0;
        if state.fetch.is_some() || state.server {
            self.announce_to_tracker(member);
        }
    }

    /// A member's tracker session id: one per life, so a late departure of an earlier life
    /// leaves the new listing alone.
    fn session_of(&self, member: Endpoint) -> u64 {
        (u64::from(member) << 32) | u64::from(self.members[member as usize].incarnation)
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
    pub fn run(self) -> Result<StormReport, StormError> {
        self.run_observed(u64::MAX, |_| {})
    }

    /// Runs the storm to its end as [`Self::run`] does, and shows `observe` where it is every
    /// `every_events` events (a long run's progress; it changes nothing in the run).
    pub fn run_observed(
        mut self,
        every_events: u64,
        mut observe: impl FnMut(&Progress),
    ) -> Result<StormReport, StormError> {
        let limit_ns = VIRTUAL_TIME_LIMIT.as_nanos() as u64;
        let mut next_observation = every_events;
        loop {
            if self.incomplete_nodes == 0 {
                break;
            }
            if self.tally.events >= next_observation {
                next_observation = self.tally.events.saturating_add(every_events);
                observe(&Progress {
                    virtual_seconds: self.now_ns as f64 / 1e9,
                    events: self.tally.events,
                    nodes: self.nodes().len(),
                    nodes_without_the_image: self.incomplete_nodes,
                });
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
        // Nothing reaches a member without power, and nothing it would do happens.
        if event
            .endpoints()
            .into_iter()
            .flatten()
            .any(|member| !self.members[member as usize].up)
        {
            return Ok(());
        }
        match event {
            Event::Redial(node) => self.dial_own_server(node),
            Event::TrackerRetry(member) => {
                self.members[member as usize].tracker_retry_pending = false;
                self.announce_to_tracker(member);
            }
            Event::RackPowerOff(rack) => self.rack_power_off(rack),
            Event::RackPowerOn(rack) => self.rack_power_on(rack),
            Event::UplinkDown(rack) => {
                self.tally.faults += 1;
                self.record([4, 2, u64::from(rack), 0]);
                let (depth, since) = &mut self.uplink_down[rack as usize];
                *depth += 1;
                if *depth == 1 {
                    *since = self.now_ns;
                    self.network.set_rack_cut(rack, true);
                    let at = self.now_ns + CONNECTION_IDLE_TIMEOUT.as_nanos() as u64;
                    let since_ns = self.now_ns;
                    self.push(at, Event::IdleCheck { rack, since_ns });
                }
            }
            Event::UplinkUp(rack) => {
                self.record([4, 3, u64::from(rack), 0]);
                let (depth, _) = &mut self.uplink_down[rack as usize];
                *depth = depth.saturating_sub(1);
                if *depth == 0 {
                    self.network.set_rack_cut(rack, false);
                }
            }
            Event::IdleCheck { rack, since_ns } => {
                let (depth, since) = self.uplink_down[rack as usize];
                if depth > 0 && since == since_ns {
                    self.cut_connections_of(rack);
                }
            }
            Event::PeerLost {
                observer,
                lost,
                incarnation,
            } => {
                let lost_member = &self.members[lost as usize];
                if !lost_member.up || lost_member.incarnation > incarnation {
                    self.forget_peering(observer, lost);
                }
            }
            Event::TrackerLoses {
                tracker,
                member,
                session,
            } => {
                let now = self.now();
                if let Some(state) = self.trackers.get_mut(&tracker) {
                    state.handle_departure(&self.manifest, address_of(member), session);
                    state.handle_timeout(now);
                }
            }
            Event::TrackerDownNoticed {
                tracker,
                incarnation,
            } => {
                let state = &self.members[tracker as usize];
                if !state.up || state.incarnation > incarnation {
                    let members: Vec<Endpoint> = (0..self.members.len() as Endpoint)
                        .filter(|member| {
                            let state = &self.members[*member as usize];
                            state.up && state.tracker_session == Some(tracker)
                        })
                        .collect();
                    for member in members {
                        self.tracker_session_lost(member);
                    }
                }
            }
            Event::PowerOn(node) => {
                self.members[node as usize].powered_on_ns = Some(self.now_ns);
                let at = self.now_ns + self.scenario.boot.agent_starts_after_ms * 1_000_000;
                self.push(at, Event::AgentStarts(node));
            }
            Event::AgentStarts(node) => self.agent_starts(node)?,
            Event::AnnounceDue(node) => self.announce(node),
            Event::TrackerHears {
                tracker,
                member,
                complete,
            } => self.tracker_hears(tracker, member, complete)?,
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

    /// Every member of `rack` loses power: what it held in RAM, its transfers, its messages on
    /// the way; its peers notice at QUIC's idle timeout.
    fn rack_power_off(&mut self, rack: u32) {
        self.tally.faults += 1;
        self.record([4, 0, u64::from(rack), 0]);
        let victims: Vec<Endpoint> = (0..self.members.len() as Endpoint)
            .filter(|member| {
                let state = &self.members[*member as usize];
                state.rack == rack && state.up
            })
            .collect();
        let idle_ns = CONNECTION_IDLE_TIMEOUT.as_nanos() as u64;
        let chunks = self.scenario.image.chunks;
        let claim_timings = self.scenario.protocol.claim_timings();
        let upload_config = self.scenario.protocol.upload();
        let late: BTreeSet<u32> = self.scenario.boot.late_racks.iter().copied().collect();
        for &victim in &victims {
            for ticket in self.network.transfers_of(victim) {
                self.abort_upload(ticket);
            }
            // Requests queued at its gate, or sent to it and not yet started.
            let queued: Vec<Ticket> = self
                .tickets
                .iter()
                .filter(|(_, upload)| upload.uploader == victim || upload.fetcher == victim)
                .map(|(ticket, _)| *ticket)
                .collect();
            for ticket in queued {
                self.abort_upload(ticket);
            }
            let incarnation = self.members[victim as usize].incarnation;
            let peers: Vec<Endpoint> = self.members[victim as usize]
                .peers
                .iter()
                .copied()
                .collect();
            for observer in peers {
                self.push(
                    self.now_ns + idle_ns,
                    Event::PeerLost {
                        observer,
                        lost: victim,
                        incarnation,
                    },
                );
            }
            let session = self.session_of(victim);
            for tracker in self.tracker_order.clone() {
                if tracker != victim {
                    self.push(
                        self.now_ns + idle_ns,
                        Event::TrackerLoses {
                            tracker,
                            member: victim,
                            session,
                        },
                    );
                }
            }
            if self.trackers.remove(&victim).is_some() {
                self.push(
                    self.now_ns + idle_ns,
                    Event::TrackerDownNoticed {
                        tracker: victim,
                        incarnation,
                    },
                );
            }
            let member = &mut self.members[victim as usize];
            member.up = false;
            member.incarnation += 1;
            if !member.server {
                if member.completed_ns.take().is_some() {
                    self.incomplete_nodes += 1;
                    if !late.contains(&member.rack) {
                        self.incomplete_early_nodes += 1;
                    }
                }
                member.held = Bitfield::empty(chunks);
                member.powered_on_ns = None;
                member.started_ns = None;
            }
            member.fetch = None;
            member.peers.clear();
            member.dialling.clear();
            member.same_rack_named.clear();
            member.gate = UploadGate::new(upload_config);
            member.claims = SendClaims::new(chunks, claim_timings);
            member.uploads.clear();
            member.scheduler_wake_ns = None;
            member.gate_wake_ns = None;
            member.announce_wait = ANNOUNCE_FIRST;
            member.tracker_session = None;
            member.tracker_try = 0;
            member.tracker_retry_pending = false;
        }
        // What the dead would have received or done is gone (a later life starts afresh).
        let dead: BTreeSet<Endpoint> = victims.into_iter().collect();
        let queue = std::mem::take(&mut self.queue);
        self.queue = queue
            .into_iter()
            .filter(|Reverse(scheduled)| {
                !scheduled
                    .event
                    .endpoints()
                    .into_iter()
                    .flatten()
                    .any(|member| dead.contains(&member))
            })
            .collect();
    }

    /// Power returns to `rack`: its servers serve again (a tracker with empty soft state),
    /// its nodes power on again, spread as at the start.
    fn rack_power_on(&mut self, rack: u32) {
        self.record([4, 1, u64::from(rack), 0]);
        let members: Vec<Endpoint> = (0..self.members.len() as Endpoint)
            .filter(|member| {
                let state = &self.members[*member as usize];
                state.rack == rack && !state.up
            })
            .collect();
        for &member in &members {
            self.members[member as usize].up = true;
            if self.members[member as usize].server {
                if self.tracker_order.contains(&member) {
                    self.trackers
                        .insert(member, Tracker::new(TrackerConfig::default()));
                    // (Members stay with the tracker they failed over to; `node`'s move
                    // back to a better-ranked one is not modelled.)
                }
            } else {
                self.power_on_later(member);
            }
        }
        if self.scenario.serving == Serving::Swarm {
            for member in members {
                if self.members[member as usize].server {
                    self.server_announces(member);
                }
            }
        }
    }

    /// QUIC's idle timeout struck every connection across `rack`'s uplink: peerings on both
    /// sides are lost, and trackers drop the sessions of members they cannot hear.
    fn cut_connections_of(&mut self, rack: u32) {
        let mut lost = Vec::new();
        for (number, member) in self.members.iter().enumerate() {
            if member.rack != rack || !member.up {
                continue;
            }
            for &peer in &member.peers {
                if self.members[peer as usize].rack != rack {
                    lost.push((number as Endpoint, peer));
                }
            }
        }
        for (inside, outside) in lost {
            self.forget_peering(inside, outside);
            self.forget_peering(outside, inside);
        }
        let sessions_lost: Vec<Endpoint> = (0..self.members.len() as Endpoint)
            .filter(|member| {
                let state = &self.members[*member as usize];
                state.up
                    && state.tracker_session.is_some_and(|tracker| {
                        (self.members[tracker as usize].rack == rack) != (state.rack == rack)
                    })
            })
            .collect();
        for member in sessions_lost {
            self.tracker_session_lost(member);
        }
        let now = self.now();
        for tracker in self.tracker_order.clone() {
            let tracker_inside = self.members[tracker as usize].rack == rack;
            let unheard: Vec<(Endpoint, u64)> = (0..self.members.len() as Endpoint)
                .filter(|member| {
                    let state = &self.members[*member as usize];
                    *member != tracker && state.up && (state.rack == rack) != tracker_inside
                })
                .map(|member| (member, self.session_of(member)))
                .collect();
            let Some(state) = self.trackers.get_mut(&tracker) else {
                continue;
            };
            for (member, session) in unheard {
                state.handle_departure(&self.manifest, address_of(member), session);
            }
            state.handle_timeout(now);
        }
    }

    /// `observer`'s connection to `peer` is gone: what it asked of the peer is asked
    /// elsewhere, and what it was sending the peer stops.
    fn forget_peering(&mut self, observer: Endpoint, peer: Endpoint) {
        if !self.members[observer as usize].peers.remove(&peer) {
            return;
        }
        self.tally.peerings_lost += 1;
        let between: Vec<Ticket> = self
            .tickets
            .iter()
            .filter(|(_, upload)| upload.uploader == observer && upload.fetcher == peer)
            .map(|(ticket, _)| *ticket)
            .collect();
        for ticket in between {
            self.abort_upload(ticket);
        }
        let now = self.now();
        if let Some(fetch) = &mut self.members[observer as usize].fetch {
            fetch.handle_peer_gone(now, u64::from(peer));
        }
        self.drain_fetch(observer);
        if self.scenario.serving == Serving::Central && !self.members[observer as usize].server {
            let at = self.now_ns + REDIAL_AFTER.as_nanos() as u64;
            self.push(at, Event::Redial(observer));
        }
    }

    /// Ends an upload that will never be delivered: its bytes so far were for nothing, and
    /// its uploader's slot or queue place is free again.
    fn abort_upload(&mut self, ticket: Ticket) {
        let Some(upload) = self.tickets.remove(&ticket) else {
            return;
        };
        let sending = self.network.cancel(self.now_ns, ticket);
        let member = &mut self.members[upload.uploader as usize];
        member.uploads.remove(&(upload.fetcher, upload.index));
        member.claims.release(upload.index, upload.fetcher);
        if sending {
            member.gate.handle_sent();
        } else {
            member.gate.handle_cancel(ticket);
        }
        if member.up {
            self.pump_gate(upload.uploader);
        }
    }

    fn agent_starts(&mut self, node: Endpoint) -> Result<(), StormError> {
        let rack = self.members[node as usize].rack;
        if self.network.is_rack_cut(rack)
            && !(0..self.servers).any(|server| {
                let server = &self.members[server as usize];
                server.up && server.rack == rack
            })
        {
            // Cut off with its relay and no server of its own: no lease, so no kernel and
            // no agent yet. The firmware asks again (PXE ROMs retry for seconds).
            self.tally.dhcp_retries += 1;
            let at = self.now_ns + DHCP_RETRY.as_nanos() as u64;
            self.push(at, Event::AgentStarts(node));
            return Ok(());
        }
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
            Serving::Central => self.dial_own_server(node),
        }
        Ok(())
    }

    /// Central mode: the node dials its own server, as a segment's LTSP server is.
    fn dial_own_server(&mut self, node: Endpoint) {
        let server = (node - self.servers) % self.servers;
        let member = &mut self.members[node as usize];
        if member.completed_ns.is_some()
            || member.fetch.is_none()
            || member.peers.contains(&server)
            || !member.dialling.insert(server)
        {
            return;
        }
        let at = self.now_ns + 2 * self.latency_ns(node, server);
        self.push(
            at,
            Event::PeeringUp {
                dialler: node,
                target: server,
            },
        );
    }

    fn announce(&mut self, member: Endpoint) {
        let complete = self.members[member as usize].completed_ns.is_some();
        self.tally.announces += 1;
        self.announce_to_tracker(member);
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

    fn tracker_hears(
        &mut self,
        tracker: Endpoint,
        member: Endpoint,
        complete: bool,
    ) -> Result<(), StormError> {
        let now = self.now();
        let rack = Some(format!("r{}", self.members[member as usize].rack));
        let announce = Announce {
            address: address_of(member),
            rack,
            complete,
            session: self.session_of(member),
        };
        let Some(state) = self.trackers.get_mut(&tracker) else {
            return Ok(());
        };
        let neighbours = state
            .handle_announce(now, self.manifest, announce)
            .map_err(|error| StormError::Engine(error.to_string()))?;
        let mut same_rack: Vec<Endpoint> = neighbours
            .same_rack
            .iter()
            .filter_map(|address| endpoint_of(*address))
            .collect();
        let mut all: Vec<Endpoint> = neighbours.all().filter_map(endpoint_of).collect();
        // The tracker names itself as a seed of the image it offers (as `node` does).
        if member != tracker && !all.contains(&tracker) {
            all.insert(0, tracker);
            all.truncate(transfer::swarm::tracker::NEIGHBOURS_MAX);
            same_rack.retain(|neighbour| all.contains(neighbour));
        }
        self.record([1, u64::from(member), all.len() as u64, u64::from(complete)]);
        if !self.members[member as usize].server {
            self.send(
                tracker,
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
        if !self.members[target as usize].up || self.network.is_cut_between(dialler, target) {
            // The handshake goes unanswered. In central mode the node has nobody else: it
            // tries its server again shortly; a swarm member meets others at its announces.
            self.tally.dials_failed += 1;
            if self.scenario.serving == Serving::Central {
                let at = self.now_ns + REDIAL_AFTER.as_nanos() as u64;
                self.push(at, Event::Redial(dialler));
            }
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
            rate_quantum_us: self.scenario.network.rate_quantum_us,
            faults: self.tally.faults,
            messages_lost: self.tally.messages_lost,
            dials_failed: self.tally.dials_failed,
            peerings_lost: self.tally.peerings_lost,
            dhcp_retries: self.tally.dhcp_retries,
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
