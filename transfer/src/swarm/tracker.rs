//! The tracker (DESIGN 5.3): who is in an image's swarm, and which of them a fetcher should
//! peer with. Control plane central, data plane peer to peer: a fetcher announces itself to
//! its image's tracker, gets a rack-biased set of neighbours back, and from then on exchanges
//! HAVE bitfields with them directly; the tracker never sees a chunk.
//!
//! Each image has one tracker, the server that ranks first by rendezvous hash of the manifest
//! over the servers ([`tracker_order`]), so every fetcher of the image asks the same one and
//! gets the same view. Its state is soft: members re-announce on a period and the tracker
//! forgets whom it has not heard from, so a server that takes over after a failover rebuilds
//! the whole view from re-announces within one period, with nothing replicated.
//!
//! Sans-IO: the driver hands in the time, the announcer's observed address and its rack, and
//! the departures it sees (a closed session); nothing here reads a clock or a socket, and the
//! sampling randomness is derived from the inputs, so one input sequence gives one output.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::ContentHash;

/// The longest rack name (a label such as `r12` or `dc1-row3-rack7`).
pub const RACK_NAME_MAX: usize = 64;
/// The most neighbours one answer names.
pub const NEIGHBOURS_MAX: usize = 16;

/// Bounds and the shape of a neighbour set.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// How long a member stays listed without announcing again.
    pub ttl: Duration,
    /// Images tracked at once; announces about more are refused.
    pub images_max: usize,
    /// Members per image; announces beyond are refused (the member still fetches from the
    /// servers it knows). One image's tracker is one server, so this is the largest fleet
    /// that boots one image through the tracker: 262,144, a few tens of MiB of listings.
    /// (It was 100,000, and the storm engine's 102,400-node fleet ran into it.)
    pub members_per_image_max: usize,
    /// Complete members (servers, booted nodes) named per answer, so every fetcher has
    /// somewhere to get chunks that no other fetcher holds yet.
    pub seeds: usize,
    /// Members of the announcer's own rack named per answer: rack-local traffic never
    /// crosses the uplink.
    pub same_rack: usize,
    /// Members of other racks named per answer, so racks do not become islands (a rack
    /// whose members all started together would otherwise share only what its seeds send).
    pub other_racks: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(90),
            images_max: 1024,
            members_per_image_max: 1 << 18,
            seeds: 2,
            same_rack: 6,
            other_racks: 2,
        }
    }
}

/// One announce, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Where the member is reached: the address its announce came from (observed, not
    /// claimed, so nobody can point the swarm at a third party).
    pub address: SocketAddr,
    /// Its rack, if known.
    pub rack: Option<String>,
    /// It holds every chunk.
    pub complete: bool,
    /// The driver's name for the session the announce came on: a departure ends the listing
    /// only if no newer session of the same member has announced since.
    pub session: u64,
}

/// The answer to an announce: members to peer with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Neighbours {
    /// Members in the announcer's rack.
    pub same_rack: Vec<SocketAddr>,
    /// Members elsewhere, or of unknown rack.
    pub elsewhere: Vec<SocketAddr>,
}

impl Neighbours {
    /// Every neighbour, this rack's first.
    pub fn all(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.same_rack.iter().chain(&self.elsewhere).copied()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.same_rack.len() + self.elsewhere.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why an announce was not taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackerRefusal {
    /// Already tracking as many images as allowed.
    #[error("tracking {0} images already")]
    TooManyImages(usize),
    /// The image's swarm is as large as allowed.
    #[error("image {manifest} has {members} members already")]
    TooManyMembers {
        /// The image.
        manifest: ContentHash,
        /// Its members.
        members: usize,
    },
}

#[derive(Debug, Clone)]
struct Member {
    rack: Option<String>,
    complete: bool,
    expires_at: Instant,
    session: u64,
}

/// A set that can be sampled at random and changed in O(1): a vector of addresses and each
/// address's position in it.
#[derive(Debug, Default)]
struct SampleSet {
    items: Vec<SocketAddr>,
    positions: HashMap<SocketAddr, usize>,
}

impl SampleSet {
    fn insert(&mut self, address: SocketAddr) {
        if !self.positions.contains_key(&address) {
            self.positions.insert(address, self.items.len());
            self.items.push(address);
        }
    }

    fn remove(&mut self, address: &SocketAddr) {
        if let Some(position) = self.positions.remove(address) {
            self.items.swap_remove(position);
            if let Some(moved) = self.items.get(position) {
                self.positions.insert(*moved, position);
            }
        }
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Appends up to `wanted` members for which `eligible` holds and that `chosen` lacks, in
    /// an order drawn from `random`. Small sets are walked from a random start; large ones are
    /// probed at random a bounded number of times, so an answer costs O(wanted), not O(n).
    fn sample(
        &self,
        wanted: usize,
        random: &mut SplitMix,
        chosen: &mut Vec<SocketAddr>,
        eligible: impl Fn(&SocketAddr) -> bool,
    ) {
        let target = chosen.len() + wanted;
        if wanted == 0 || self.items.is_empty() {
            return;
        }
        let length = self.items.len();
        if length <= wanted * 8 {
            let start = random.below(length);
            for offset in 0..length {
                if chosen.len() >= target {
                    return;
                }
                let candidate = self.items[(start + offset) % length];
                if eligible(&candidate) && !chosen.contains(&candidate) {
                    chosen.push(candidate);
                }
            }
        } else {
            for _ in 0..wanted * 8 {
                if chosen.len() >= target {
                    return;
                }
                let candidate = self.items[random.below(length)];
                if eligible(&candidate) && !chosen.contains(&candidate) {
                    chosen.push(candidate);
                }
            }
        }
    }
}

/// The members of one image's swarm.
#[derive(Debug, Default)]
struct Swarm {
    members: HashMap<SocketAddr, Member>,
    everyone: SampleSet,
    complete: SampleSet,
    by_rack: BTreeMap<String, SampleSet>,
}

impl Swarm {
    fn forget(&mut self, address: &SocketAddr) -> Option<Member> {
        let member = self.members.remove(address)?;
        self.everyone.remove(address);
        self.complete.remove(address);
        if let Some(rack) = &member.rack
            && let Some(set) = self.by_rack.get_mut(rack)
        {
            set.remove(address);
            if set.is_empty() {
                self.by_rack.remove(rack);
            }
        }
        Some(member)
    }

    fn admit(&mut self, address: SocketAddr, member: Member) {
        self.everyone.insert(address);
        if member.complete {
            self.complete.insert(address);
        }
        if let Some(rack) = &member.rack {
            self.by_rack
                .entry(rack.clone())
                .or_default()
                .insert(address);
        }
        self.members.insert(address, member);
    }
}

/// The tracker's state: every image's members, until they stop announcing.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    swarms: BTreeMap<ContentHash, Swarm>,
    /// Every listing's expiry, in order, so that expiring is O(expired).
    expiries: BTreeSet<(Instant, ContentHash, SocketAddr)>,
    /// Announces handled so far: mixed into each answer's sampling, so that a member that
    /// announces again meets new neighbours.
    announces: u64,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            swarms: BTreeMap::new(),
            expiries: BTreeSet::new(),
            announces: 0,
        }
    }

    /// Takes in (or refreshes) the announcer as a member of `manifest`'s swarm and answers
    /// with its neighbours: complete members first, then members of its own rack, then of
    /// others (filling up from other racks when its own has too few). Never the announcer
    /// itself; at most [`NEIGHBOURS_MAX`].
    pub fn handle_announce(
        &mut self,
        now: Instant,
        manifest: ContentHash,
        announce: Announce,
    ) -> Result<Neighbours, TrackerRefusal> {
        self.handle_timeout(now);
        if !self.swarms.contains_key(&manifest) && self.swarms.len() >= self.config.images_max {
            return Err(TrackerRefusal::TooManyImages(self.swarms.len()));
        }
        let swarm = self.swarms.entry(manifest).or_default();
        let previous = swarm.forget(&announce.address);
        if previous.is_none() && swarm.members.len() >= self.config.members_per_image_max {
            let members = swarm.members.len();
            if swarm.members.is_empty() {
                self.swarms.remove(&manifest);
            }
            return Err(TrackerRefusal::TooManyMembers { manifest, members });
        }
        if let Some(previous) = previous {
            self.expiries
                .remove(&(previous.expires_at, manifest, announce.address));
        }
        let expires_at = now + self.config.ttl;
        let rack = announce
            .rack
            .filter(|rack| !rack.is_empty() && rack.len() <= RACK_NAME_MAX);

        self.announces += 1;
        let mut random = SplitMix::seeded(&manifest, announce.address, self.announces);
        let mut chosen = Vec::with_capacity(NEIGHBOURS_MAX);
        let own = announce.address;
        if !announce.complete {
            swarm
                .complete
                .sample(self.config.seeds, &mut random, &mut chosen, |candidate| {
                    *candidate != own
                });
        }
        let mut rack_wanted = self.config.same_rack;
        if let Some(rack) = &rack
            && let Some(set) = swarm.by_rack.get(rack)
        {
            let before = chosen.len();
            set.sample(rack_wanted, &mut random, &mut chosen, |candidate| {
                *candidate != own
            });
            rack_wanted -= chosen.len() - before;
        }
        let others_wanted = self.config.other_racks + rack_wanted;
        let members = &swarm.members;
        swarm
            .everyone
            .sample(others_wanted, &mut random, &mut chosen, |candidate| {
                *candidate != own
                    && (rack.is_none()
                        || members.get(candidate).map(|member| &member.rack) != Some(&rack))
            });
        // A rack with nobody elsewhere to offer (one rack only): fill from anyone.
        let short = (self.config.seeds + self.config.same_rack + self.config.other_racks)
            .min(NEIGHBOURS_MAX)
            .saturating_sub(chosen.len());
        swarm
            .everyone
            .sample(short, &mut random, &mut chosen, |candidate| {
                *candidate != own
            });
        chosen.truncate(NEIGHBOURS_MAX);
        let (same_rack, elsewhere): (Vec<SocketAddr>, Vec<SocketAddr>) =
            chosen.into_iter().partition(|candidate| {
                rack.is_some()
                    && swarm.members.get(candidate).map(|member| &member.rack) == Some(&rack)
            });

        swarm.admit(
            own,
            Member {
                rack,
                complete: announce.complete,
                expires_at,
                session: announce.session,
            },
        );
        self.expiries.insert((expires_at, manifest, own));
        Ok(Neighbours {
            same_rack,
            elsewhere,
        })
    }

    /// The member at `address` left `manifest`'s swarm: `session` closed. A listing that a
    /// newer session has refreshed since stays.
    pub fn handle_departure(&mut self, manifest: &ContentHash, address: SocketAddr, session: u64) {
        let listed_by_session = self
            .swarms
            .get(manifest)
            .and_then(|swarm| swarm.members.get(&address))
            .is_some_and(|member| member.session == session);
        if listed_by_session {
            self.forget(manifest, address);
        }
    }

    fn forget(&mut self, manifest: &ContentHash, address: SocketAddr) {
        if let Some(swarm) = self.swarms.get_mut(manifest) {
            if let Some(member) = swarm.forget(&address) {
                self.expiries
                    .remove(&(member.expires_at, *manifest, address));
            }
            if swarm.members.is_empty() {
                self.swarms.remove(manifest);
            }
        }
    }

    /// Forgets every member that has not announced within the time to live.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(expires_at, manifest, address)) = self.expiries.first() {
            if expires_at > now {
                return;
            }
            self.expiries.pop_first();
            self.forget(&manifest, address);
        }
    }

    /// When the next member expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _, _)| *at)
    }

    /// Members of `manifest`'s swarm, and how many of them are complete.
    pub fn members(&self, manifest: &ContentHash) -> (usize, usize) {
        self.swarms
            .get(manifest)
            .map_or((0, 0), |swarm| (swarm.everyone.len(), swarm.complete.len()))
    }

    /// Up to `wanted` complete members of `manifest`'s swarm in `rack` for which `eligible`
    /// holds, drawn with `seed` (a booting node's firmware is pointed at them, ADR 0016).
    /// O(wanted), as an announce is.
    pub fn complete_in_rack(
        &self,
        manifest: &ContentHash,
        rack: &str,
        wanted: usize,
        seed: u64,
        eligible: impl Fn(&SocketAddr) -> bool,
    ) -> Vec<SocketAddr> {
        let mut chosen = Vec::with_capacity(wanted);
        let Some(swarm) = self.swarms.get(manifest) else {
            return chosen;
        };
        let Some(set) = swarm.by_rack.get(rack) else {
            return chosen;
        };
        let mut random = SplitMix::seeded(manifest, SocketAddr::from(([0, 0, 0, 0], 0)), seed);
        set.sample(wanted, &mut random, &mut chosen, |candidate| {
            swarm
                .members
                .get(candidate)
                .is_some_and(|member| member.complete)
                && eligible(candidate)
        });
        chosen
    }

    /// Images with at least one member.
    pub fn image_count(&self) -> usize {
        self.swarms.len()
    }
}

/// The servers in the order in which fetchers of `manifest` use them as its tracker: highest
/// rendezvous score first. Every fetcher given the same servers computes the same order, and
/// when one server goes only the images it tracked move, each to its next server.
pub fn tracker_order(manifest: &ContentHash, servers: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut scored: Vec<(u64, SocketAddr)> = servers
        .iter()
        .map(|server| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"bootmesh tracker");
            hasher.update(&manifest.0);
            hash_address(&mut hasher, *server);
            (first_u64(hasher.finalize().as_bytes()), *server)
        })
        .collect();
    scored.sort_by(|a, b| b.cmp(a));
    scored.dedup_by_key(|(_, server)| *server);
    scored.into_iter().map(|(_, server)| server).collect()
}

fn hash_address(hasher: &mut blake3::Hasher, address: SocketAddr) {
    match address.ip() {
        IpAddr::V4(ip) => hasher.update(&ip.octets()),
        IpAddr::V6(ip) => hasher.update(&ip.octets()),
    };
    hasher.update(&address.port().to_be_bytes());
}

fn first_u64(bytes: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(first)
}

/// A small deterministic generator (SplitMix64) for sampling neighbours, seeded from the
/// announce itself: no global randomness, and the same announces give the same answers.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn seeded(manifest: &ContentHash, announcer: SocketAddr, sequence: u64) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"bootmesh neighbours");
        hasher.update(&manifest.0);
        hash_address(&mut hasher, announcer);
        hasher.update(&sequence.to_le_bytes());
        Self(first_u64(hasher.finalize().as_bytes()))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..bound` for sampling (`bound` > 0).
    fn below(&mut self, bound: usize) -> usize {
        ((u128::from(self.next()) * bound as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(rack: u8, host: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, rack, host], 7200))
    }

    fn announce(rack: u8, host: u8, complete: bool) -> Announce {
        Announce {
            address: address(rack, host),
            rack: Some(format!("r{rack}")),
            complete,
            session: u64::from(host),
        }
    }

    #[test]
    fn firmware_peers_are_complete_members_of_the_rack_that_pass_the_filter() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let now = start();
        for (rack, host, complete) in [(1, 1, true), (1, 2, false), (1, 3, true), (2, 4, true)] {
            tracker
                .handle_announce(now, manifest(), announce(rack, host, complete))
                .expect("taken in");
        }
        let mut found = tracker.complete_in_rack(&manifest(), "r1", 4, 7, |_| true);
        found.sort();
        assert_eq!(found, vec![address(1, 1), address(1, 3)]);
        let filtered = tracker.complete_in_rack(&manifest(), "r1", 4, 7, |candidate| {
            *candidate != address(1, 1)
        });
        assert_eq!(filtered, vec![address(1, 3)]);
        assert_eq!(
            tracker
                .complete_in_rack(&manifest(), "r1", 1, 7, |_| true)
                .len(),
            1
        );
        assert!(
            tracker
                .complete_in_rack(&manifest(), "r9", 4, 7, |_| true)
                .is_empty()
        );
        assert!(
            tracker
                .complete_in_rack(&ContentHash::of(b"other"), "r1", 4, 7, |_| true)
                .is_empty()
        );
    }

    fn start() -> Instant {
        #[expect(clippy::disallowed_methods, reason = "a fixed origin for virtual time")]
        Instant::now()
    }

    fn manifest() -> ContentHash {
        ContentHash::of(b"image")
    }

    #[test]
    fn a_fetcher_meets_seeds_mostly_its_own_rack_and_a_few_others() {
        let now = start();
        let mut tracker = Tracker::new(TrackerConfig::default());
        for server in 1..=3 {
            tracker
                .handle_announce(now, manifest(), announce(0, server, true))
                .unwrap();
        }
        for rack in 1..=4 {
            for host in 1..=40 {
                tracker
                    .handle_announce(now, manifest(), announce(rack, host, false))
                    .unwrap();
            }
        }
        let config = TrackerConfig::default();
        let mut same_rack_total = 0;
        for host in 41..=60 {
            let answer = tracker
                .handle_announce(now, manifest(), announce(2, host, false))
                .unwrap();
            let neighbours: Vec<SocketAddr> = answer.all().collect();
            assert!(
                answer
                    .same_rack
                    .iter()
                    .all(|neighbour| neighbour.ip().to_string().starts_with("10.0.2."))
            );
            assert!(
                answer
                    .elsewhere
                    .iter()
                    .all(|neighbour| !neighbour.ip().to_string().starts_with("10.0.2."))
            );
            let seeds = neighbours
                .iter()
                .filter(|neighbour| neighbour.ip().to_string().starts_with("10.0.0."))
                .count();
            let same_rack = neighbours
                .iter()
                .filter(|neighbour| neighbour.ip().to_string().starts_with("10.0.2."))
                .count();
            assert!(seeds >= config.seeds, "{neighbours:?}");
            assert!(same_rack >= config.same_rack, "{neighbours:?}");
            assert!(!neighbours.contains(&address(2, host)));
            assert!(neighbours.len() <= NEIGHBOURS_MAX);
            let mut unique = neighbours.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), neighbours.len(), "no neighbour twice");
            same_rack_total += same_rack;
            // Other racks are named too, so racks never become islands.
            assert!(
                neighbours.len() - seeds - same_rack >= config.other_racks,
                "{neighbours:?}"
            );
        }
        assert!(same_rack_total > 0);
        assert_eq!(tracker.members(&manifest()), (3 + 160 + 20, 3));
    }

    #[test]
    fn a_rack_alone_fills_its_answer_from_its_own_rack_and_a_first_member_gets_nobody() {
        let now = start();
        let mut tracker = Tracker::new(TrackerConfig::default());
        assert!(
            tracker
                .handle_announce(now, manifest(), announce(1, 1, false))
                .unwrap()
                .is_empty()
        );
        for host in 2..=30 {
            tracker
                .handle_announce(now, manifest(), announce(1, host, false))
                .unwrap();
        }
        let neighbours = tracker
            .handle_announce(now, manifest(), announce(1, 31, false))
            .unwrap();
        assert_eq!(neighbours.len(), 10, "seeds+rack+others quota, all from r1");
    }

    #[test]
    fn members_that_stop_announcing_or_leave_are_forgotten_and_answers_differ_per_announce() {
        let now = start();
        let config = TrackerConfig::default();
        let ttl = config.ttl;
        let mut tracker = Tracker::new(config);
        for host in 1..=100 {
            tracker
                .handle_announce(now, manifest(), announce(1, host, false))
                .unwrap();
        }
        let first = tracker
            .handle_announce(now, manifest(), announce(1, 1, false))
            .unwrap();
        let second = tracker
            .handle_announce(now, manifest(), announce(1, 1, false))
            .unwrap();
        assert_ne!(first, second, "a re-announce meets new neighbours");
        // A departure of an older session of host 2 leaves the listing of its newer one.
        tracker.handle_departure(&manifest(), address(1, 2), 1);
        assert_eq!(tracker.members(&manifest()).0, 100);
        tracker.handle_departure(&manifest(), address(1, 2), 2);
        assert_eq!(tracker.members(&manifest()).0, 99);
        // Host 1 keeps announcing; everyone else goes quiet.
        let later = now + ttl / 2;
        tracker
            .handle_announce(later, manifest(), announce(1, 1, true))
            .unwrap();
        assert_eq!(tracker.poll_timeout(), Some(now + ttl));
        tracker.handle_timeout(now + ttl);
        assert_eq!(tracker.members(&manifest()), (1, 1));
        tracker.handle_timeout(later + ttl);
        assert_eq!(tracker.members(&manifest()), (0, 0));
        assert_eq!(tracker.image_count(), 0);
        assert_eq!(tracker.poll_timeout(), None);
    }

    #[test]
    fn the_same_announces_give_the_same_answers() {
        let run = || {
            let now = start();
            let mut tracker = Tracker::new(TrackerConfig::default());
            let mut answers = Vec::new();
            for host in 1..=200u8 {
                answers.push(
                    tracker
                        .handle_announce(now, manifest(), announce(host % 5, host, host < 10))
                        .unwrap(),
                );
            }
            answers
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn bounds_refuse_more_images_and_members_than_allowed() {
        let now = start();
        let mut tracker = Tracker::new(TrackerConfig {
            images_max: 2,
            members_per_image_max: 3,
            ..TrackerConfig::default()
        });
        for image in 0..2u8 {
            tracker
                .handle_announce(now, ContentHash::of(&[image]), announce(1, 1, false))
                .unwrap();
        }
        assert_eq!(
            tracker.handle_announce(now, ContentHash::of(&[9]), announce(1, 1, false)),
            Err(TrackerRefusal::TooManyImages(2))
        );
        let image = ContentHash::of(&[0]);
        for host in 2..=3 {
            tracker
                .handle_announce(now, image, announce(1, host, false))
                .unwrap();
        }
        assert!(matches!(
            tracker.handle_announce(now, image, announce(1, 4, false)),
            Err(TrackerRefusal::TooManyMembers { members: 3, .. })
        ));
        // A member already listed may always announce again.
        tracker
            .handle_announce(now, image, announce(1, 3, true))
            .unwrap();
        // An overlong rack name is dropped, not stored.
        let mut long = announce(1, 1, false);
        long.rack = Some("r".repeat(RACK_NAME_MAX + 1));
        tracker.handle_announce(now, image, long).unwrap();
        assert_eq!(tracker.members(&image), (3, 1));
    }

    #[test]
    fn every_fetcher_ranks_the_trackers_alike_and_a_lost_server_moves_only_its_images() {
        let servers: Vec<SocketAddr> = (1..=5).map(|host| address(0, host)).collect();
        let mut first_choice = BTreeMap::<SocketAddr, usize>::new();
        let mut moved = 0;
        for image in 0..500u32 {
            let manifest = ContentHash::of(&image.to_le_bytes());
            let order = tracker_order(&manifest, &servers);
            assert_eq!(order.len(), 5);
            let mut reversed = servers.clone();
            reversed.reverse();
            assert_eq!(order, tracker_order(&manifest, &reversed));
            *first_choice.entry(order[0]).or_default() += 1;
            let without_first: Vec<SocketAddr> = servers
                .iter()
                .copied()
                .filter(|server| *server != servers[0])
                .collect();
            let after = tracker_order(&manifest, &without_first);
            if order[0] == servers[0] {
                assert_eq!(after[0], order[1]);
                moved += 1;
            } else {
                assert_eq!(after[0], order[0], "images of the other servers stay put");
            }
        }
        assert_eq!(first_choice.len(), 5);
        assert!(
            first_choice.values().all(|count| *count > 50),
            "{first_choice:?}"
        );
        assert!(moved > 50 && moved < 150);
    }
}
