//! A fluid model of a datacenter network: every NIC (each direction), every rack's uplink
//! (each direction) and the spine are resources with a capacity, and every pair of endpoints
//! with chunks on the way between them is one flow across the resources on its path. Flows get
//! max-min fair rates (progressive filling), which is what many TCP or QUIC connections through
//! the same bottlenecks converge to; the chunks of one pair share its rate equally, as the
//! streams of one QUIC connection do.
//!
//! Rates are recomputed only when the set of busy pairs changes, not for every chunk: a pair
//! whose uploader keeps its pipeline full keeps its rate. Time is in nanoseconds of virtual time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// An endpoint: a server or a node.
pub type Endpoint = u32;

/// What one transfer is, for whoever started it.
pub type TransferId = u64;

/// Where an endpoint sits and how fast its NIC is.
#[derive(Debug, Clone, Copy)]
pub struct EndpointLink {
    /// Its rack.
    pub rack: u32,
    /// Upload capacity, bytes per second (`f64::INFINITY`: no limit).
    pub up_bytes_per_second: f64,
    /// Download capacity, bytes per second.
    pub down_bytes_per_second: f64,
}

/// The network's shape.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Every endpoint, by number.
    pub endpoints: Vec<EndpointLink>,
    /// Racks.
    pub racks: u32,
    /// Each rack's uplink capacity in each direction, bytes per second.
    pub uplink_bytes_per_second: f64,
    /// The spine's capacity (all racks together), bytes per second.
    pub spine_bytes_per_second: f64,
}

#[derive(Debug)]
struct Transfer {
    id: TransferId,
    /// The pair's service counter when it began.
    started_at_service: f64,
    /// The pair's service counter at which this transfer is done.
    done_at_service: f64,
}

#[derive(Debug)]
struct Flow {
    path: Vec<u32>,
    /// The racks of its ends: a flow between racks stalls while either is cut off.
    racks: (u32, u32),
    /// Bytes per second for the whole pair.
    rate: f64,
    /// Bytes each transfer of the pair has received since the flow began (all transfers
    /// progress alike while they share it).
    service: f64,
    /// When `service` was last brought up to date.
    updated_at_ns: u64,
    transfers: Vec<Transfer>,
    /// Bumped whenever the flow's next completion changes (stale heap entries are skipped).
    version: u64,
}

impl Flow {
    fn catch_up(&mut self, now_ns: u64) {
        if !self.transfers.is_empty() && self.rate > 0.0 {
            let seconds = now_ns.saturating_sub(self.updated_at_ns) as f64 / 1e9;
            self.service += self.rate * seconds / self.transfers.len() as f64;
        }
        self.updated_at_ns = self.updated_at_ns.max(now_ns);
    }

    fn next_completion_ns(&self) -> Option<u64> {
        if self.rate <= 0.0 {
            return None;
        }
        let first = self
            .transfers
            .iter()
            .map(|transfer| transfer.done_at_service)
            .min_by(f64::total_cmp)?;
        let remaining = (first - self.service).max(0.0);
        let seconds = remaining * self.transfers.len() as f64 / self.rate;
        Some(self.updated_at_ns + (seconds * 1e9).ceil() as u64)
    }
}

/// A transfer that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Which.
    pub id: TransferId,
    /// From.
    pub source: Endpoint,
    /// To.
    pub destination: Endpoint,
    /// When, in virtual nanoseconds.
    pub at_ns: u64,
}

/// The network with the transfers on it.
#[derive(Debug)]
pub struct FluidNetwork {
    topology: Topology,
    capacities: Vec<f64>,
    /// Bytes carried by each resource so far.
    carried: Vec<f64>,
    flows: BTreeMap<(Endpoint, Endpoint), Flow>,
    /// Which pair each live transfer belongs to.
    transfer_pairs: BTreeMap<TransferId, (Endpoint, Endpoint)>,
    completions: BinaryHeap<Reverse<(u64, Endpoint, Endpoint, u64)>>,
    rates_stale: bool,
    /// The next delivery's time, while nothing changed on the network since it was found (the
    /// engine asks at every event, and most events leave the network alone).
    next_delivery_cached: Option<Option<u64>>,
    /// Per resource: its place among the resources in use during a recomputation
    /// (`u32::MAX` when not in use). Kept between recomputations so that each costs what the
    /// busy flows touch, not what the whole fleet has.
    compact_index: Vec<u32>,
    /// Racks whose uplink is down: flows in or out of them get no rate.
    cut_racks: BTreeSet<u32>,
    /// Rate recomputations so far (a cost figure).
    pub recomputations: u64,
    /// At most one recomputation per this many nanoseconds (0: at every change).
    rate_quantum_ns: u64,
    /// When the rates were last recomputed.
    recomputed_at_ns: Option<u64>,
}

/// Resource numbering: each endpoint's upload and download, each rack's uplink up and down,
/// then the spine.
fn endpoint_up(endpoint: Endpoint) -> u32 {
    endpoint * 2
}
fn endpoint_down(endpoint: Endpoint) -> u32 {
    endpoint * 2 + 1
}

impl FluidNetwork {
    /// An idle network of `topology`.
    pub fn new(topology: Topology) -> Self {
        let endpoints = topology.endpoints.len();
        let mut capacities = Vec::with_capacity(endpoints * 2 + topology.racks as usize * 2 + 1);
        for link in &topology.endpoints {
            capacities.push(link.up_bytes_per_second);
            capacities.push(link.down_bytes_per_second);
        }
        for _ in 0..topology.racks {
            capacities.push(topology.uplink_bytes_per_second);
            capacities.push(topology.uplink_bytes_per_second);
        }
        capacities.push(topology.spine_bytes_per_second);
        let carried = vec![0.0; capacities.len()];
        Self {
            topology,
            capacities,
            carried,
            flows: BTreeMap::new(),
            transfer_pairs: BTreeMap::new(),
            completions: BinaryHeap::new(),
            rates_stale: false,
            next_delivery_cached: None,
            compact_index: Vec::new(),
            cut_racks: BTreeSet::new(),
            recomputations: 0,
            rate_quantum_ns: 0,
            recomputed_at_ns: None,
        }
    }

    /// Recompute the shares at most once per `quantum_ns` of virtual time: a pair that starts
    /// waits up to that long for its share (it has none before), and when a pair ends the
    /// others keep their shares that long. 0 (the default) recomputes at every change.
    pub fn with_rate_quantum(mut self, quantum_ns: u64) -> Self {
        self.rate_quantum_ns = quantum_ns;
        self
    }

    /// When the deferred recomputation is due, if one is.
    fn recomputation_due_ns(&self) -> Option<u64> {
        if !self.rates_stale {
            return None;
        }
        Some(
            self.recomputed_at_ns
                .map_or(0, |at| at.saturating_add(self.rate_quantum_ns)),
        )
    }

    fn uplink_up(&self, rack: u32) -> u32 {
        self.topology.endpoints.len() as u32 * 2 + rack * 2
    }
    fn uplink_down(&self, rack: u32) -> u32 {
        self.uplink_up(rack) + 1
    }
    fn spine(&self) -> u32 {
        self.capacities.len() as u32 - 1
    }

    fn path(&self, source: Endpoint, destination: Endpoint) -> Vec<u32> {
        let from = self.topology.endpoints[source as usize].rack;
        let to = self.topology.endpoints[destination as usize].rack;
        let mut path = vec![endpoint_up(source)];
        if from != to {
            path.extend([self.uplink_up(from), self.spine(), self.uplink_down(to)]);
        }
        path.push(endpoint_down(destination));
        // Unlimited resources never constrain a flow; leaving them out keeps filling cheap.
        path.retain(|resource| self.capacities[*resource as usize].is_finite());
        path
    }

    /// Starts sending `bytes` from `source` to `destination` at `now_ns`.
    pub fn start(
        &mut self,
        now_ns: u64,
        id: TransferId,
        source: Endpoint,
        destination: Endpoint,
        bytes: u64,
    ) {
        self.next_delivery_cached = None;
        let pair = (source, destination);
        if !self.flows.contains_key(&pair) {
            let path = self.path(source, destination);
            let racks = (
                self.topology.endpoints[source as usize].rack,
                self.topology.endpoints[destination as usize].rack,
            );
            self.flows.insert(
                pair,
                Flow {
                    path,
                    racks,
                    rate: 0.0,
                    service: 0.0,
                    updated_at_ns: now_ns,
                    transfers: Vec::new(),
                    version: 0,
                },
            );
            self.rates_stale = true;
        }
        if let Some(flow) = self.flows.get_mut(&pair) {
            flow.catch_up(now_ns);
            flow.transfers.push(Transfer {
                id,
                started_at_service: flow.service,
                done_at_service: flow.service + bytes as f64,
            });
            flow.version += 1;
            if let Some(at) = flow.next_completion_ns() {
                self.completions
                    .push(Reverse((at, source, destination, flow.version)));
            }
        }
        self.transfer_pairs.insert(id, pair);
    }

    /// Stops transfer `id` (the requester cancelled it, or an end died). Its bytes so far were
    /// carried for nothing.
    pub fn cancel(&mut self, now_ns: u64, id: TransferId) -> bool {
        let Some(pair) = self.transfer_pairs.remove(&id) else {
            return false;
        };
        self.remove_transfer(now_ns, pair, id);
        true
    }

    fn remove_transfer(&mut self, now_ns: u64, pair: (Endpoint, Endpoint), id: TransferId) {
        self.next_delivery_cached = None;
        let Some(flow) = self.flows.get_mut(&pair) else {
            return;
        };
        flow.catch_up(now_ns);
        if let Some(position) = flow.transfers.iter().position(|transfer| transfer.id == id) {
            let transfer = flow.transfers.swap_remove(position);
            // What it carried, whole or cut short, counts on every resource of its path.
            let carried =
                (flow.service.min(transfer.done_at_service) - transfer.started_at_service).max(0.0);
            for resource in &flow.path {
                self.carried[*resource as usize] += carried;
            }
        }
        flow.version += 1;
        if flow.transfers.is_empty() {
            self.flows.remove(&pair);
            self.rates_stale = true;
        } else if let Some(at) = flow.next_completion_ns() {
            self.completions
                .push(Reverse((at, pair.0, pair.1, flow.version)));
        }
    }

    /// Cuts `rack` off (its uplink is down) or joins it again. Flows across it keep their
    /// bytes so far and stall until it is back.
    pub fn set_rack_cut(&mut self, rack: u32, cut: bool) {
        let changed = if cut {
            self.cut_racks.insert(rack)
        } else {
            self.cut_racks.remove(&rack)
        };
        self.rates_stale |= changed;
    }

    /// Whether traffic between `from` and `to` crosses a cut uplink.
    pub fn is_cut_between(&self, from: Endpoint, to: Endpoint) -> bool {
        let from = self.topology.endpoints[from as usize].rack;
        let to = self.topology.endpoints[to as usize].rack;
        from != to && (self.cut_racks.contains(&from) || self.cut_racks.contains(&to))
    }

    /// Whether `rack`'s uplink is down.
    pub fn is_rack_cut(&self, rack: u32) -> bool {
        self.cut_racks.contains(&rack)
    }

    /// The transfers under way that `endpoint` sends or receives.
    pub fn transfers_of(&self, endpoint: Endpoint) -> Vec<TransferId> {
        self.transfer_pairs
            .iter()
            .filter(|(_, (source, destination))| *source == endpoint || *destination == endpoint)
            .map(|(id, _)| *id)
            .collect()
    }

    /// When the next transfer ends, if any is under way. Recomputes the rates first if the
    /// busy pairs changed.
    pub fn next_delivery_ns(&mut self, now_ns: u64) -> Option<u64> {
        if self
            .recomputation_due_ns()
            .is_some_and(|due_ns| due_ns <= now_ns)
        {
            self.recompute(now_ns);
        }
        // A deferred recomputation is a moment the engine must come back at, as a delivery
        // is (nothing is delivered then; the rates change).
        let deferred = self.recomputation_due_ns();
        let next = self.next_completion_ns();
        match (next, deferred) {
            (Some(next), Some(due)) => Some(next.min(due)),
            (next, due) => next.or(due),
        }
    }

    fn next_completion_ns(&mut self) -> Option<u64> {
        if let Some(cached) = self.next_delivery_cached {
            return cached;
        }
        let mut next = None;
        while let Some(Reverse((at, source, destination, version))) = self.completions.peek() {
            match self.flows.get(&(*source, *destination)) {
                Some(flow) if flow.version == *version => {
                    next = Some(*at);
                    break;
                }
                _ => {
                    self.completions.pop();
                }
            }
        }
        self.next_delivery_cached = Some(next);
        next
    }

    /// Ends every transfer due by `now_ns` (call with the time [`Self::next_delivery_ns`]
    /// gave).
    pub fn deliver_due(&mut self, now_ns: u64) -> Vec<Delivered> {
        self.next_delivery_cached = None;
        let mut delivered = Vec::new();
        while let Some(Reverse((at, source, destination, version))) =
            self.completions.peek().copied()
        {
            if at > now_ns {
                break;
            }
            self.completions.pop();
            let pair = (source, destination);
            let Some(flow) = self.flows.get_mut(&pair) else {
                continue;
            };
            if flow.version != version {
                continue;
            }
            flow.catch_up(at);
            // Every transfer whose bytes are in (rounding to the nanosecond leaves a
            // fraction of a byte).
            let finished: Vec<TransferId> = flow
                .transfers
                .iter()
                .filter(|transfer| transfer.done_at_service <= flow.service + 1e-3)
                .map(|transfer| transfer.id)
                .collect();
            for id in finished {
                self.transfer_pairs.remove(&id);
                self.remove_transfer(at, pair, id);
                delivered.push(Delivered {
                    id,
                    source,
                    destination,
                    at_ns: at,
                });
            }
            if let Some(flow) = self.flows.get_mut(&pair) {
                flow.version += 1;
                if let Some(next) = flow.next_completion_ns() {
                    self.completions
                        .push(Reverse((next, source, destination, flow.version)));
                }
            }
        }
        delivered
    }

    /// Max-min fair rates for every busy pair (progressive filling): repeatedly the resource
    /// that offers its unfixed flows the smallest equal share fixes them at that share.
    #[inline(never)]
    fn recompute(&mut self, now_ns: u64) {
        self.rates_stale = false;
        self.recomputations += 1;
        self.recomputed_at_ns = Some(now_ns);
        if self.compact_index.len() != self.capacities.len() {
            self.compact_index = vec![u32::MAX; self.capacities.len()];
        }
        // Only the resources on busy paths take part, numbered compactly in the order first
        // met; the queue keys on the resource's own number, so the filling (and every rate,
        // to the bit) is what a pass over all resources would give. Paths and the flows of
        // each resource are kept flat (offsets into one array): a recomputation runs at every
        // change of the busy pairs, thousands of flows each time.
        let flow_count = self.flows.len();
        let mut touched: Vec<u32> = Vec::new();
        let mut remaining: Vec<f64> = Vec::new();
        let mut unfixed: Vec<u32> = Vec::new();
        let mut rates = vec![f64::INFINITY; flow_count];
        let mut fixed = vec![false; flow_count];
        let mut path_starts: Vec<u32> = Vec::with_capacity(flow_count + 1);
        let mut path_data: Vec<u32> = Vec::with_capacity(flow_count * 2);
        for (number, flow) in self.flows.values_mut().enumerate() {
            path_starts.push(path_data.len() as u32);
            flow.catch_up(now_ns);
            let (from, to) = flow.racks;
            if from != to && (self.cut_racks.contains(&from) || self.cut_racks.contains(&to)) {
                // Across a cut uplink: no rate, and no share taken from anything.
                fixed[number] = true;
                rates[number] = 0.0;
                continue;
            }
            for &resource in &flow.path {
                let slot = &mut self.compact_index[resource as usize];
                if *slot == u32::MAX {
                    *slot = touched.len() as u32;
                    touched.push(resource);
                    remaining.push(self.capacities[resource as usize]);
                    unfixed.push(0);
                }
                unfixed[*slot as usize] += 1;
                path_data.push(*slot);
            }
        }
        path_starts.push(path_data.len() as u32);
        let path =
            |flow: usize| &path_data[path_starts[flow] as usize..path_starts[flow + 1] as usize];
        // The flows of each resource, in flow order.
        let mut flows_start = vec![0u32; touched.len() + 1];
        for &compact in &path_data {
            flows_start[compact as usize + 1] += 1;
        }
        for compact in 0..touched.len() {
            flows_start[compact + 1] += flows_start[compact];
        }
        let mut flows_data = vec![0u32; path_data.len()];
        let mut filled = flows_start.clone();
        for flow in 0..flow_count {
            for &compact in path(flow) {
                flows_data[filled[compact as usize] as usize] = flow as u32;
                filled[compact as usize] += 1;
            }
        }
        let mut queue: BinaryHeap<Reverse<(OrderedShare, u32, u32)>> =
            BinaryHeap::with_capacity(touched.len());
        for (compact, &resource) in touched.iter().enumerate() {
            let share = remaining[compact] / f64::from(unfixed[compact]);
            queue.push(Reverse((OrderedShare(share), resource, compact as u32)));
        }
        while let Some(Reverse((OrderedShare(share), _, resource))) = queue.pop() {
            let resource = resource as usize;
            if unfixed[resource] == 0 {
                continue;
            }
            let current = remaining[resource] / f64::from(unfixed[resource]);
            if current.total_cmp(&share) != std::cmp::Ordering::Equal {
                continue;
            }
            let share = share.max(0.0);
            let flows = flows_start[resource] as usize..flows_start[resource + 1] as usize;
            for &flow in &flows_data[flows] {
                let flow = flow as usize;
                if fixed[flow] {
                    continue;
                }
                fixed[flow] = true;
                rates[flow] = share;
                for &other in path(flow) {
                    let other = other as usize;
                    remaining[other] -= share;
                    unfixed[other] -= 1;
                    if other != resource && unfixed[other] > 0 {
                        let share = remaining[other] / f64::from(unfixed[other]);
                        queue.push(Reverse((OrderedShare(share), touched[other], other as u32)));
                    }
                }
            }
        }
        for resource in touched {
            self.compact_index[resource as usize] = u32::MAX;
        }
        // Every flow gets a new version below, so every entry in the heap goes stale: start
        // it afresh rather than let stale entries pile up (and be popped one by one).
        let mut entries = Vec::with_capacity(flow_count);
        for (number, (pair, flow)) in self.flows.iter_mut().enumerate() {
            // A pair with no limited resource on its path (both ends unlimited, same rack) is
            // given a very high rate rather than an infinite one.
            flow.rate = if rates[number].is_finite() {
                rates[number]
            } else {
                1e15
            };
            flow.version += 1;
            if let Some(at) = flow.next_completion_ns() {
                entries.push(Reverse((at, pair.0, pair.1, flow.version)));
            }
        }
        self.completions = BinaryHeap::from(entries);
        self.next_delivery_cached = None;
    }

    /// Bytes carried so far by each rack's uplink, up and down (a transfer counts when it
    /// ends or is cancelled).
    pub fn uplink_bytes(&self, rack: u32) -> (f64, f64) {
        (
            self.carried[self.uplink_up(rack) as usize],
            self.carried[self.uplink_down(rack) as usize],
        )
    }
}

/// A share that orders by `total_cmp` (shares are never NaN).
#[derive(Debug, Clone, Copy)]
struct OrderedShare(f64);

impl PartialEq for OrderedShare {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0) == std::cmp::Ordering::Equal
    }
}
impl Eq for OrderedShare {}
impl PartialOrd for OrderedShare {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedShare {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(endpoints: &[(u32, f64, f64)], uplink: f64) -> Topology {
        Topology {
            endpoints: endpoints
                .iter()
                .map(|(rack, up, down)| EndpointLink {
                    rack: *rack,
                    up_bytes_per_second: *up,
                    down_bytes_per_second: *down,
                })
                .collect(),
            racks: 2,
            uplink_bytes_per_second: uplink,
            spine_bytes_per_second: f64::INFINITY,
        }
    }

    fn run_to_end(network: &mut FluidNetwork, from_ns: u64) -> Vec<Delivered> {
        let mut all = Vec::new();
        let mut now = from_ns;
        while let Some(at) = network.next_delivery_ns(now) {
            now = at;
            all.extend(network.deliver_due(now));
        }
        all
    }

    #[test]
    fn one_uploader_shares_its_link_equally_and_a_lone_transfer_gets_all_of_it() {
        // Endpoint 0 uploads 1000 B/s to 1 and 2 (both fast): 1000 bytes each take 2 s while
        // both run; then a 500-byte transfer alone takes 0.5 s.
        let inf = f64::INFINITY;
        let mut network = FluidNetwork::new(topology(
            &[(0, 1000.0, inf), (0, inf, inf), (0, inf, inf)],
            inf,
        ));
        network.start(0, 1, 0, 1, 1000);
        network.start(0, 2, 0, 2, 1000);
        let delivered = run_to_end(&mut network, 0);
        assert_eq!(delivered.len(), 2);
        assert!(delivered.iter().all(|done| done.at_ns == 2_000_000_000));
        network.start(2_000_000_000, 3, 0, 2, 500);
        let delivered = run_to_end(&mut network, 2_000_000_000);
        assert_eq!(delivered[0].at_ns, 2_500_000_000);
    }

    #[test]
    fn a_flow_held_back_elsewhere_leaves_its_share_to_the_others() {
        // 0 uploads to 1 (which downloads at 100 B/s) and to 2 (unlimited) over a 1000 B/s
        // link: max-min gives 100 to the first and 900 to the second.
        let inf = f64::INFINITY;
        let mut network = FluidNetwork::new(topology(
            &[(0, 1000.0, inf), (0, inf, 100.0), (0, inf, inf)],
            inf,
        ));
        network.start(0, 1, 0, 1, 100);
        network.start(0, 2, 0, 2, 900);
        let delivered = run_to_end(&mut network, 0);
        assert_eq!(delivered.len(), 2);
        assert!(delivered.iter().all(|done| done.at_ns == 1_000_000_000));
    }

    #[test]
    fn chunks_of_one_pair_share_its_rate_and_cross_rack_traffic_is_counted_on_the_uplinks() {
        let inf = f64::INFINITY;
        // Endpoint 0 in rack 0, endpoint 1 in rack 1; the uplink (500 B/s) is the bottleneck.
        let mut network = FluidNetwork::new(topology(&[(0, 1000.0, inf), (1, inf, inf)], 500.0));
        network.start(0, 1, 0, 1, 500);
        network.start(0, 2, 0, 1, 250);
        let delivered = run_to_end(&mut network, 0);
        // Both progress at 250 B/s: the second is done at 1 s, the first gets 500 B/s
        // from then and is done at 1.5 s.
        assert_eq!(
            delivered
                .iter()
                .map(|done| (done.id, done.at_ns))
                .collect::<Vec<_>>(),
            vec![(2, 1_000_000_000), (1, 1_500_000_000)]
        );
        let (up, _) = network.uplink_bytes(0);
        let (_, down) = network.uplink_bytes(1);
        assert!((up - 750.0).abs() < 1.0, "{up}");
        assert!((down - 750.0).abs() < 1.0, "{down}");
        // A cancelled transfer ends without a delivery.
        network.start(1_500_000_000, 3, 0, 1, 500);
        assert!(network.cancel(1_600_000_000, 3));
        assert!(run_to_end(&mut network, 1_600_000_000).is_empty());
    }

    #[test]
    fn a_cut_rack_stalls_its_flows_across_and_leaves_the_others_their_share() {
        // 0 (rack 0) sends 1000 bytes at 1000 B/s to 1 (rack 1) and 1000 to 2 (rack 0), 500 B/s
        // each. Rack 1 is cut from 0.5 s to 2.5 s: the flow to 2 gets the whole link meanwhile
        // and ends at 1.25 s (250 + 750 bytes); the flow to 1 resumes at 2.5 s with 750 bytes
        // to go, which take 0.75 s.
        let inf = f64::INFINITY;
        let mut network = FluidNetwork::new(topology(
            &[(0, 1000.0, inf), (1, inf, inf), (0, inf, inf)],
            inf,
        ));
        network.start(0, 1, 0, 1, 1000);
        network.start(0, 2, 0, 2, 1000);
        assert_eq!(network.next_delivery_ns(0), Some(2_000_000_000));
        network.set_rack_cut(1, true);
        assert!(network.is_cut_between(0, 1) && !network.is_cut_between(0, 2));
        assert_eq!(network.transfers_of(1), vec![1]);
        let at = network.next_delivery_ns(500_000_000);
        assert_eq!(at, Some(1_250_000_000));
        let delivered = network.deliver_due(1_250_000_000);
        assert_eq!(
            delivered.iter().map(|done| done.id).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(
            network.next_delivery_ns(1_250_000_000),
            None,
            "the cut flow stalls"
        );
        network.set_rack_cut(1, false);
        assert_eq!(network.next_delivery_ns(2_500_000_000), Some(3_250_000_000));
    }

    #[test]
    fn with_a_rate_quantum_a_new_pair_waits_for_the_next_recomputation_and_no_byte_is_lost() {
        // 0 uploads at 1000 B/s; shares are recomputed at most every 0.5 s. A (1000 bytes to
        // 1) starts at 0 and has the link alone. B (1000 bytes to 2) starts at 0.2 s and has no
        // share until the recomputation at 0.5 s; A keeps the whole link until then (500 bytes
        // in), then both get 500 B/s: A is done at 1.5 s, and B, alone from then, at 2.0 s.
        // (Exact sharing: A at 1.8 s, B at 2.0 s.)
        let inf = f64::INFINITY;
        let mut network = FluidNetwork::new(topology(
            &[(0, 1000.0, inf), (0, inf, inf), (0, inf, inf)],
            inf,
        ))
        .with_rate_quantum(500_000_000);
        network.start(0, 1, 0, 1, 1000);
        assert_eq!(network.next_delivery_ns(0), Some(1_000_000_000));
        network.start(200_000_000, 2, 0, 2, 1000);
        assert_eq!(
            network.next_delivery_ns(200_000_000),
            Some(500_000_000),
            "the deferred recomputation is a moment to come back at"
        );
        assert!(network.deliver_due(500_000_000).is_empty());
        let delivered = run_to_end(&mut network, 500_000_000);
        assert_eq!(
            delivered
                .iter()
                .map(|done| (done.id, done.at_ns))
                .collect::<Vec<_>>(),
            vec![(1, 1_500_000_000), (2, 2_000_000_000)]
        );
        // At 0, at 0.5 s, when A ends and when B ends (nothing busy is left to share).
        assert_eq!(network.recomputations, 4);
    }
}
