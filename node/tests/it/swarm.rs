//! The image swarm over real QUIC on loopback: several members in one process, each with its
//! own endpoint, chunk store on disk and upload gate, exchanging an image's chunks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::lab;
use node::swarm::{
    AnnounceOptions, ChunkShelf, SharedImage, StoreShelf, SwarmError, SwarmFetchConfig, SwarmNode,
    TrackerService,
};
use transfer::manifest::MANIFEST_FORMAT_VERSION;
use transfer::swarm::{SwarmImage, UploadConfig};
use transfer::{
    ChunkRef, ChunkStore, ChunkingParameters, ContentHash, Manifest, RootImage, VerityParameters,
    chunk_reader,
};

const LOOPBACK: &str = "127.0.0.1:0";

/// An image of `bytes` pseudo-random bytes (from `seed`), chunked into `store`.
fn make_image(store: &ChunkStore, bytes: usize, seed: &[u8]) -> (ContentHash, Manifest) {
    let mut content = vec![0u8; bytes];
    blake3::Hasher::new()
        .update(seed)
        .finalize_xof()
        .fill(&mut content);
    let part = chunk_reader(&content[..], ChunkingParameters::DEFAULT, |hash, chunk| {
        store.insert_chunk(hash, chunk).map(|_| ())
    })
    .expect("chunk the image");
    store.sync().expect("sync");
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: "swarm-test".into(),
        tag: "v1".into(),
        created_unix_secs: 1,
        cmdline: String::new(),
        kernel: None,
        initrd: None,
        root: RootImage {
            squashfs_bytes: part.size_bytes,
            part,
            verity: VerityParameters {
                algorithm: "sha256".into(),
                data_block_bytes: 4096,
                hash_block_bytes: 4096,
                data_blocks: 1,
                hash_offset_bytes: 4096,
                salt: vec![1; 32],
                root_hash: [0; 32],
            },
        },
    };
    let hash = store.put_manifest(&manifest).expect("store the manifest");
    (hash, manifest)
}

/// A member with its own store.
struct Member {
    node: Arc<SwarmNode>,
    store: Arc<ChunkStore>,
    image: Arc<SharedImage>,
    _directory: tempfile::TempDir,
}

impl Member {
    fn address(&self) -> SocketAddr {
        self.node.local_addr().expect("bound")
    }

    fn uploaded(&self) -> u64 {
        self.node.stats().bytes_uploaded.load(Ordering::Relaxed)
    }

    /// Every chunk of the image is in the store and reads back verified.
    fn assert_complete_and_verified(&self, expected: &SwarmImage) {
        for chunk in expected.chunks() {
            let bytes = self.store.read_chunk(&chunk.hash).expect("a held chunk");
            assert_eq!(ContentHash::of(&bytes), chunk.hash);
        }
        assert!(self.image.held().is_complete());
    }
}

fn member(
    upload: UploadConfig,
    swarm_image: &SwarmImage,
    shelf: impl FnOnce(Arc<ChunkStore>) -> Arc<dyn ChunkShelf>,
) -> Member {
    let directory = tempfile::tempdir().expect("store directory");
    let store = Arc::new(ChunkStore::open(directory.path(), 64 << 20).expect("open store"));
    let node = SwarmNode::bind(LOOPBACK.parse().expect("address"), upload).expect("bind");
    let image = SharedImage::new(swarm_image.clone(), shelf(Arc::clone(&store)));
    node.offer(Arc::clone(&image));
    Member {
        node,
        store,
        image,
        _directory: directory,
    }
}

fn store_shelf(store: Arc<ChunkStore>) -> Arc<dyn ChunkShelf> {
    Arc::new(StoreShelf::new(store))
}

/// A seed: a member whose store holds the whole image.
fn seed(upload: UploadConfig, image_bytes: usize) -> (Member, SwarmImage) {
    let directory = tempfile::tempdir().expect("store directory");
    let store = Arc::new(ChunkStore::open(directory.path(), 64 << 20).expect("open store"));
    let (hash, manifest) = make_image(&store, image_bytes, b"swarm test image");
    let swarm_image = SwarmImage::new(hash, &manifest, &[]).expect("number the image");
    let node = SwarmNode::bind(LOOPBACK.parse().expect("address"), upload).expect("bind");
    let image = SharedImage::new(swarm_image.clone(), store_shelf(Arc::clone(&store)));
    assert!(image.held().is_complete());
    node.offer(Arc::clone(&image));
    (
        Member {
            node,
            store,
            image,
            _directory: directory,
        },
        swarm_image,
    )
}

fn limited(bytes_per_second: u64) -> UploadConfig {
    UploadConfig {
        bytes_per_second: Some(bytes_per_second),
        burst_bytes: 1 << 20,
        ..UploadConfig::default()
    }
}

fn quick_config(tie_break: u64) -> SwarmFetchConfig {
    SwarmFetchConfig {
        stall_timeout: Duration::from_secs(60),
        tie_break,
        ..SwarmFetchConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchers_that_serve_each_other_take_most_of_the_image_from_each_other() {
    // The seed uploads at 4 MiB/s; four fetchers of a 24 MiB image would need 24 s from it
    // alone. They know each other, so most of what each holds comes from the others.
    let image_bytes = 24 << 20;
    let (seed, swarm_image) = seed(limited(4 << 20), image_bytes);
    let fetchers: Vec<Member> = (0..4)
        .map(|_| member(UploadConfig::default(), &swarm_image, store_shelf))
        .collect();
    let mut everyone = vec![seed.address()];
    everyone.extend(fetchers.iter().map(Member::address));

    let mut fetches = tokio::task::JoinSet::new();
    for (number, fetcher) in fetchers.iter().enumerate() {
        let node = Arc::clone(&fetcher.node);
        let image = Arc::clone(&fetcher.image);
        let peers = everyone.clone();
        fetches.spawn(async move { node.fetch(image, &peers, quick_config(number as u64)).await });
    }
    let mut from_peers = 0u64;
    let mut from_seed = 0u64;
    while let Some(result) = fetches.join_next().await {
        let report = result.expect("fetch task").expect("fetch");
        for (address, source) in &report.sources {
            assert_eq!(source.rejected, 0);
            if *address == seed.address() {
                from_seed += source.bytes;
            } else {
                from_peers += source.bytes;
            }
        }
    }
    for fetcher in &fetchers {
        fetcher.assert_complete_and_verified(&swarm_image);
    }
    let total = swarm_image.total_bytes();
    eprintln!(
        "image {} MiB; fetched from the seed {} MiB, from peers {} MiB; seed uploaded {} MiB",
        total >> 20,
        from_seed >> 20,
        from_peers >> 20,
        seed.uploaded() >> 20
    );
    assert_eq!(from_seed + from_peers, 4 * total);
    assert_eq!(
        seed.uploaded(),
        from_seed,
        "the seed's count and the fetchers' agree"
    );
    assert!(
        seed.uploaded() < 5 * total / 2,
        "the seed sent {} bytes for four copies of {total}: the fetchers did not share",
        seed.uploaded()
    );
}

/// A hostile peer: it holds the image but flips a byte in every chunk it serves.
struct CorruptingShelf(StoreShelf);

impl ChunkShelf for CorruptingShelf {
    fn read(&self, chunk: &ChunkRef) -> Result<Option<Arc<[u8]>>, SwarmError> {
        Ok(self.0.read(chunk)?.map(|bytes| {
            let mut bytes = bytes.to_vec();
            bytes[0] ^= 0xff;
            Arc::from(bytes)
        }))
    }

    fn store(&self, chunk: &ChunkRef, bytes: &[u8]) -> Result<(), SwarmError> {
        self.0.store(chunk, bytes)
    }

    fn holds(&self, chunk: &ChunkRef) -> bool {
        self.0.holds(chunk)
    }

    fn sync(&self) -> Result<(), SwarmError> {
        self.0.sync()
    }
}

/// A reader blocked on chunks (a `lazy` root's block read, `SharedImage::wait_held`) gets them
/// before the rest: its demand goes to the front of the fetch. A 64-chunk image from a seed
/// capped at 2 MiB/s (about 8 chunks a second); a reader waits for four chunks spread over the
/// image as soon as the fetch runs. In the fetch's own order all four would be in the first
/// half one time in sixteen; demanded, they arrive among the first few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_reader_gets_its_chunks_before_the_rest_of_the_image() {
    let (seed, swarm_image) = seed(limited(2 << 20), 16 << 20);
    let fetcher = member(UploadConfig::default(), &swarm_image, store_shelf);
    let total = swarm_image.chunk_count();
    assert!(total >= 32, "{total} chunks: too few to tell orders apart");
    let wanted: Vec<u32> = (1..=4).map(|quarter| quarter * total / 4 - 1).collect();
    let fetch = {
        let node = Arc::clone(&fetcher.node);
        let image = Arc::clone(&fetcher.image);
        let peers = vec![seed.address()];
        tokio::spawn(async move { node.fetch(image, &peers, quick_config(1)).await })
    };
    let image = Arc::clone(&fetcher.image);
    let waited = wanted.clone();
    let held_then = tokio::task::spawn_blocking(move || {
        let arrived = image.wait_held(&waited, Duration::from_secs(60));
        (arrived, image.held().count())
    })
    .await
    .expect("reader thread");
    let (arrived, held_when_served) = held_then;
    assert!(arrived, "the demanded chunks never arrived");
    eprintln!("chunks {wanted:?} held when {held_when_served} of {total} were");
    assert!(
        held_when_served * 2 <= total,
        "the reader waited until {held_when_served} of {total} chunks were held"
    );
    fetch.await.expect("fetch task").expect("fetch");
    fetcher.assert_complete_and_verified(&swarm_image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_serves_corrupt_chunks_is_banned_and_nothing_corrupt_is_stored() {
    let (seed, swarm_image) = seed(UploadConfig::default(), 8 << 20);
    // The liar holds a full copy (the seed's chunks) and serves it flipped.
    let liar = member(UploadConfig::default(), &swarm_image, |store| {
        for chunk in swarm_image.chunks() {
            let bytes = seed.store.read_chunk(&chunk.hash).expect("seed chunk");
            store.insert_chunk(chunk.hash, &bytes).expect("copy");
        }
        Arc::new(CorruptingShelf(StoreShelf::new(store)))
    });
    assert!(liar.image.held().is_complete());
    let fetcher = member(UploadConfig::default(), &swarm_image, store_shelf);
    let report = fetcher
        .node
        .fetch(
            Arc::clone(&fetcher.image),
            &[liar.address(), seed.address()],
            quick_config(1),
        )
        .await
        .expect("the fetch completes from the honest peer");
    fetcher.assert_complete_and_verified(&swarm_image);
    let from_liar = report
        .sources
        .get(&liar.address())
        .cloned()
        .unwrap_or_default();
    assert_eq!(from_liar.chunks, 0, "nothing from the liar is kept");
    assert!(from_liar.rejected >= 1, "the liar was caught: {report:?}");
    assert_eq!(
        fetcher.node.stats().chunks_rejected.load(Ordering::Relaxed),
        from_liar.rejected
    );
    // Banned: after its first wrong chunk it is asked nothing more; only the requests already
    // in flight to it can have come back wrong.
    assert!(
        from_liar.rejected <= SwarmFetchConfig::default().scheduler.requests_per_peer as u64,
        "{from_liar:?}"
    );
    let everything: u64 = report.sources.values().map(|source| source.chunks).sum();
    assert_eq!(everything, u64::from(swarm_image.chunk_count()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_completes_from_the_others_when_its_peer_goes_away_midway() {
    // Two seeds; the first is slow, so that it is mid-transfer when it goes. It is shut
    // down when 10 % of the chunks have arrived (a progress counter, not a sleep).
    let image_bytes = 16 << 20;
    let (first, swarm_image) = seed(limited(2 << 20), image_bytes);
    let second = member(limited(2 << 20), &swarm_image, |store| {
        for chunk in swarm_image.chunks() {
            let bytes = first.store.read_chunk(&chunk.hash).expect("seed chunk");
            store.insert_chunk(chunk.hash, &bytes).expect("copy");
        }
        store_shelf(store)
    });
    let fetcher = member(UploadConfig::default(), &swarm_image, store_shelf);
    let fetch = {
        let node = Arc::clone(&fetcher.node);
        let image = Arc::clone(&fetcher.image);
        let peers = vec![first.address(), second.address()];
        tokio::spawn(async move { node.fetch(image, &peers, quick_config(7)).await })
    };
    let tenth = u64::from(swarm_image.chunk_count()).div_ceil(10);
    while fetcher
        .node
        .stats()
        .chunks_downloaded
        .load(Ordering::Relaxed)
        < tenth
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent_by_first = first.node.stats().chunks_uploaded.load(Ordering::Relaxed);
    first.node.shut_down();
    let report = fetch
        .await
        .expect("fetch task")
        .expect("the fetch completes");
    fetcher.assert_complete_and_verified(&swarm_image);
    let from_first = report
        .sources
        .get(&first.address())
        .cloned()
        .unwrap_or_default();
    let from_second = report
        .sources
        .get(&second.address())
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "chunks from the seed that went away: {} (it had sent {sent_by_first} when it went); from the other: {}",
        from_first.chunks, from_second.chunks
    );
    assert!(from_first.chunks >= 1 && from_second.chunks >= 1);
    assert_eq!(
        from_first.chunks + from_second.chunks,
        u64::from(swarm_image.chunk_count())
    );
}

/// Waits (at most a minute, polling) until `condition` holds; panics with `what` if it never does.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "never: {what}");
}

fn tracking(member: &Member) {
    member.node.enable_tracker(TrackerService::new(
        transfer::swarm::TrackerConfig::default(),
        node::racks::RackMap::default(),
    ));
}

/// Announces `member`'s image to `trackers` every 200 ms; each new tracker session's address
/// goes to the returned channel.
fn announce(
    member: &Member,
    trackers: &[SocketAddr],
    rack: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<SocketAddr>,
) {
    let (sessions, opened) = tokio::sync::mpsc::unbounded_channel();
    let options = AnnounceOptions {
        trackers: trackers.to_vec(),
        rack: Some(rack.to_owned()),
        every_while_fetching: Duration::from_millis(200),
        every_when_complete: Duration::from_millis(200),
    };
    let task = tokio::spawn(Arc::clone(&member.node).announce(
        Arc::clone(&member.image),
        options,
        move |tracker| {
            let _test_over = sessions.send(tracker);
        },
    ));
    (task, opened)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchers_that_know_only_the_tracker_find_the_seed_and_each_other() {
    // The seed tracks its own image and announces itself to itself; four fetchers are given
    // no peer at all, only the tracker, and must meet the seed and each other through it.
    let image_bytes = 16 << 20;
    let (seed, swarm_image) = seed(limited(4 << 20), image_bytes);
    tracking(&seed);
    let trackers = [seed.address()];
    let (_seed_announcer, _) = announce(&seed, &trackers, "r1");
    let fetchers: Vec<Member> = (0..4)
        .map(|_| member(UploadConfig::default(), &swarm_image, store_shelf))
        .collect();
    let mut announcers = Vec::new();
    let mut fetches = tokio::task::JoinSet::new();
    for (number, fetcher) in fetchers.iter().enumerate() {
        let node = Arc::clone(&fetcher.node);
        let image = Arc::clone(&fetcher.image);
        fetches.spawn(async move { node.fetch(image, &[], quick_config(number as u64)).await });
        announcers.push(announce(fetcher, &trackers, "r1"));
    }
    let mut from_peers = 0u64;
    let mut from_seed = 0u64;
    while let Some(result) = fetches.join_next().await {
        let report = result.expect("fetch task").expect("fetch");
        for (address, source) in &report.sources {
            if *address == seed.address() {
                from_seed += source.bytes;
            } else {
                from_peers += source.bytes;
            }
        }
    }
    for fetcher in &fetchers {
        fetcher.assert_complete_and_verified(&swarm_image);
    }
    let total = swarm_image.total_bytes();
    eprintln!(
        "through the tracker: {} MiB from the seed, {} MiB from each other",
        from_seed >> 20,
        from_peers >> 20
    );
    assert_eq!(from_seed + from_peers, 4 * total);
    assert!(from_peers > 0, "the fetchers never met each other");
    // Complete members announce so at once; the tracker lists all five as seeds.
    let tracker = Arc::clone(seed.node.tracker().expect("tracking"));
    let manifest = swarm_image.manifest();
    eventually("five complete members listed", || {
        tracker.members(&manifest) == (5, 5)
    })
    .await;
    // A member that shuts down leaves the tracker with its session.
    announcers[0].0.abort();
    fetchers[0].node.shut_down();
    eventually("the departed member forgotten", || {
        tracker.members(&manifest) == (4, 4)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_moves_to_the_next_tracker_when_its_tracker_goes_and_back_when_it_returns() {
    let (first, swarm_image) = seed(UploadConfig::default(), 4 << 20);
    let second = member(UploadConfig::default(), &swarm_image, |store| {
        for chunk in swarm_image.chunks() {
            let bytes = first.store.read_chunk(&chunk.hash).expect("seed chunk");
            store.insert_chunk(chunk.hash, &bytes).expect("copy");
        }
        store_shelf(store)
    });
    tracking(&first);
    tracking(&second);
    let trackers = [first.address(), second.address()];
    let manifest = swarm_image.manifest();
    let order = transfer::swarm::tracker_order(&manifest, &trackers);
    let (top, next) = if order[0] == first.address() {
        (first, second)
    } else {
        (second, first)
    };
    let (top_announcer, _) = announce(&top, &trackers, "r1");
    let (_next_announcer, _) = announce(&next, &trackers, "r1");
    let fetcher = member(UploadConfig::default(), &swarm_image, store_shelf);
    let (_fetcher_announcer, mut sessions) = announce(&fetcher, &trackers, "r2");
    let report = fetcher
        .node
        .fetch(Arc::clone(&fetcher.image), &[], quick_config(3))
        .await
        .expect("the fetch completes from the servers the tracker names");
    fetcher.assert_complete_and_verified(&swarm_image);
    assert!(
        report
            .sources
            .keys()
            .all(|source| trackers.contains(source))
    );
    assert_eq!(
        sessions.recv().await,
        Some(order[0]),
        "the first-ranked tracker first"
    );
    let top_tracker = Arc::clone(top.node.tracker().expect("tracking"));
    eventually("all three listed by the first tracker", || {
        top_tracker.members(&manifest) == (3, 3)
    })
    .await;

    // The tracker goes: everyone re-announces to the next, which rebuilds the view.
    top_announcer.abort();
    top.node.shut_down_and_wait().await;
    drop(top);
    drop(top_tracker);
    assert_eq!(
        sessions.recv().await,
        Some(order[1]),
        "failed over to the next tracker"
    );
    let next_tracker = Arc::clone(next.node.tracker().expect("tracking"));
    eventually("the next tracker lists the survivors", || {
        next_tracker.members(&manifest) == (2, 2)
    })
    .await;

    // A server is back at the first address (once the old socket is gone): members move
    // back to it.
    let mut returned = None;
    eventually("the first address bound again", || {
        returned = SwarmNode::bind(order[0], UploadConfig::default()).ok();
        returned.is_some()
    })
    .await;
    let returned = returned.expect("bound");
    returned.enable_tracker(TrackerService::new(
        transfer::swarm::TrackerConfig::default(),
        node::racks::RackMap::default(),
    ));
    assert_eq!(
        sessions.recv().await,
        Some(order[0]),
        "moved back to the first-ranked tracker"
    );
    eventually(
        "the returned tracker hears from the fetcher and the other server",
        || {
            returned
                .tracker()
                .is_some_and(|tracker| tracker.members(&manifest) == (2, 2))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_first_tracker_never_answers_announces_to_the_next() {
    // The first-ranked tracker's address is a UDP socket that reads nothing (a dead server):
    // its handshake never completes. The member also dials the next tracker after a second,
    // and announces there (the storm engine found that waiting out the first's timeout cost
    // every new member seconds when a tracker died; ADR 0011).
    let (server, swarm_image) = seed(UploadConfig::default(), 1 << 20);
    tracking(&server);
    let manifest = swarm_image.manifest();
    let (dead, hole) = dead_tracker_ranked_before(&manifest, server.address());
    // A complete member (a booted node) announces at once; one still fetching would first
    // wait up to 2 s for its fetch to start.
    let booted = member(UploadConfig::default(), &swarm_image, |store| {
        for chunk in swarm_image.chunks() {
            let bytes = server.store.read_chunk(&chunk.hash).expect("seed chunk");
            store.insert_chunk(chunk.hash, &bytes).expect("copy");
        }
        store_shelf(store)
    });
    let (_announcer, mut sessions) = announce(&booted, &[dead, server.address()], "r1");
    let started = std::time::Instant::now();
    assert_eq!(
        sessions.recv().await,
        Some(server.address()),
        "the member's first session is with the live tracker"
    );
    eprintln!(
        "session with the live tracker after {:.2} s (hedge after 1 s; the dead one's timeout is 3 s)",
        started.elapsed().as_secs_f64()
    );
    let tracker = Arc::clone(server.node.tracker().expect("tracking"));
    eventually("the live tracker lists the member", || {
        tracker.members(&manifest).0 >= 1
    })
    .await;
    drop(hole);
}

/// A bound loopback UDP socket that reads nothing, at an address the rendezvous hash ranks
/// ahead of `live` for `manifest`. The candidates are computed before anything is bound: the
/// live address's score is fixed, so when it is high only a wide search finds one above it
/// (binding 64 random ports failed once in about 65 runs).
fn dead_tracker_ranked_before(
    manifest: &ContentHash,
    live: SocketAddr,
) -> (SocketAddr, std::net::UdpSocket) {
    let candidates = (2u32..1 << 22).map(|index| {
        let host = index.to_be_bytes();
        SocketAddr::from(([127, host[1], host[2], host[3]], live.port()))
    });
    for candidate in candidates {
        if transfer::swarm::tracker_order(manifest, &[candidate, live])[0] != candidate {
            continue;
        }
        // Another test may hold this address; the next candidate does as well.
        if let Ok(hole) = std::net::UdpSocket::bind(candidate) {
            return (candidate, hole);
        }
    }
    panic!("no loopback address ranked ahead of the live tracker among 4 million");
}

// ---------------------------------------------------------------------------------------
// Processes in network namespaces: `bootmesh serve` with [swarm] and `bootmesh agent swarm`
// members, on one bridge, with tc bandwidth caps on every veth.

mod processes {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use transfer::{ChunkStore, ContentHash};

    use crate::lab::{self, Lab, run_checked};

    const HTTP_PORT: u16 = 8080;
    const SWARM_PORT: u16 = 7800;
    /// How long a whole fetch may take before the test gives up on it.
    const FETCH_LIMIT: Duration = Duration::from_secs(600);

    /// The image size: 64 MiB in the default run, the 256 MiB of the issue with
    /// BOOTMESH_SLOW=1 (20 copies of it cost minutes of CPU on a 2-core machine).
    fn image_mib() -> usize {
        if std::env::var_os("BOOTMESH_SLOW").is_some() {
            256
        } else {
            64
        }
    }

    pub struct SwarmLab {
        pub lab: Lab,
        switch: String,
        /// (namespace, inside interface, address) of each server.
        pub servers: Vec<(String, String, String)>,
        /// (namespace, address) of each agent.
        pub agents: Vec<(String, String)>,
        /// The rack (1-based) of each agent.
        pub agent_racks: Vec<usize>,
        /// Racks: rack 1 is 10.61.0.0/25 (with the servers), rack 2 is 10.61.0.128/25, all on
        /// one bridge; the servers' DHCP subnets name them, and the tracker goes by those.
        racks: usize,
        /// Every server's swarm endpoint, as `[swarm] trackers` lists them.
        trackers: Vec<String>,
        pub manifest: String,
        pub image_bytes: u64,
    }

    /// Caps the egress of `interface` in `namespace` at `mbit`.
    fn cap(namespace: &str, interface: &str, mbit: u32) {
        run_checked(
            "ip",
            &[
                "netns",
                "exec",
                namespace,
                "tc",
                "qdisc",
                "add",
                "dev",
                interface,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kb",
                "latency",
                "200ms",
            ],
        );
    }

    /// Bytes sent by `interface` in `namespace`, from its counters.
    pub fn tx_bytes(namespace: &str, interface: &str) -> u64 {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", namespace, "cat"])
            .arg(format!("/sys/class/net/{interface}/statistics/tx_bytes"))
            .output()
            .expect("read counters");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a byte count")
    }

    impl SwarmLab {
        /// `servers` servers (10.61.0.1..) each serving the same imported image, and
        /// `agents` agent namespaces (10.61.0.11.. in rack 1, 10.61.0.139.. in rack 2), split
        /// evenly over `racks` (1 or 2), every veth capped.
        pub fn new(
            servers: usize,
            agents: usize,
            racks: usize,
            server_mbit: u32,
            agent_mbit: u32,
        ) -> Self {
            assert!((1..=2).contains(&racks));
            let mut lab = Lab::new();
            let switch = lab.namespace("sw");
            run_checked(
                "ip",
                &["-n", &switch, "link", "add", "br0", "type", "bridge"],
            );
            run_checked("ip", &["-n", &switch, "link", "set", "br0", "up"]);
            let mut swarm_lab = Self {
                lab,
                switch,
                servers: Vec::new(),
                agents: Vec::new(),
                agent_racks: Vec::new(),
                racks,
                trackers: (1..=servers)
                    .map(|index| format!("10.61.0.{index}:{SWARM_PORT}"))
                    .collect(),
                manifest: String::new(),
                image_bytes: 0,
            };
            for index in 1..=servers {
                let (namespace, interface) = swarm_lab.attach(&format!("s{index}"), server_mbit);
                let address = format!("10.61.0.{index}");
                swarm_lab
                    .lab
                    .add_address(&namespace, &interface, &format!("{address}/24"));
                swarm_lab.servers.push((namespace, interface, address));
            }
            for index in 1..=agents {
                let (namespace, interface) = swarm_lab.attach(&format!("a{index}"), agent_mbit);
                let rack = 1 + (index - 1) * racks / agents;
                let address = format!("10.61.0.{}", 10 + index + 128 * (rack - 1));
                swarm_lab.agent_racks.push(rack);
                swarm_lab
                    .lab
                    .add_address(&namespace, &interface, &format!("{address}/24"));
                swarm_lab.agents.push((namespace, address));
            }
            swarm_lab.import_image();
            swarm_lab
        }

        fn attach(&mut self, role: &str, mbit: u32) -> (String, String) {
            let namespace = self.lab.namespace(role);
            let (inside, outside) = self.lab.veth(&format!("w{role}"), &namespace, &self.switch);
            run_checked(
                "ip",
                &["-n", &self.switch, "link", "set", &outside, "master", "br0"],
            );
            cap(&namespace, &inside, mbit);
            (namespace, inside)
        }

        fn state(&self, server: usize) -> PathBuf {
            self.lab.path(&format!("state-s{}", server + 1))
        }

        /// Imports one image (a kernel, an initrd, and incompressible data) into the first
        /// server's state and copies the store to the others.
        fn import_image(&mut self) {
            let tree = self.lab.path("rootfs");
            std::fs::create_dir_all(tree.join("boot")).expect("boot dir");
            std::fs::write(
                tree.join("boot/vmlinuz-6.1.0-1-amd64"),
                lab::deterministic_bytes(1, 4 << 20),
            )
            .expect("kernel");
            std::fs::write(
                tree.join("boot/initrd.img-6.1.0-1-amd64"),
                lab::deterministic_bytes(2, 2 << 20),
            )
            .expect("initrd");
            std::fs::write(
                tree.join("data"),
                lab::deterministic_bytes(3, image_mib() << 20),
            )
            .expect("data");
            let first = self.state(0);
            std::fs::create_dir_all(&first).expect("state dir");
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_bootmesh"))
                .args(["image", "--state-dir"])
                .arg(&first)
                .args(["import", "node:v1", "--from"])
                .arg(&tree)
                .args(["--created", "1"])
                .output()
                .expect("run bootmesh image import");
            assert!(
                output.status.success(),
                "import: {}",
                lab::describe(&output)
            );
            self.manifest = String::from_utf8_lossy(&output.stdout)
                .lines()
                .find_map(|line| {
                    line.trim()
                        .strip_prefix("image")
                        .map(|rest| rest.trim().to_owned())
                })
                .expect("the import names the image");
            let store = ChunkStore::open(&first.join("images"), 1 << 20).expect("store");
            let manifest = store
                .manifest(&self.manifest.parse().expect("hash"))
                .expect("manifest");
            let image = transfer::swarm::SwarmImage::new(
                self.manifest.parse().expect("hash"),
                &manifest,
                &[],
            )
            .expect("numbering");
            self.image_bytes = image.total_bytes();
            for server in 1..self.servers.len() {
                run_checked(
                    "cp",
                    &[
                        "-a",
                        &first.to_string_lossy(),
                        &self.state(server).to_string_lossy(),
                    ],
                );
            }
        }

        pub fn serve(&mut self, server: usize) {
            let (namespace, interface, address) = self.servers[server].clone();
            let www = self.lab.path("www");
            std::fs::create_dir_all(&www).expect("www");
            let trackers: Vec<String> = self
                .trackers
                .iter()
                .map(|tracker| format!("\"{tracker}\""))
                .collect();
            let mut config = format!(
                "state_dir = \"{state}\"\n\
                 [http]\nlisten = \"{address}:{HTTP_PORT}\"\nroot = \"{www}\"\n\
                 [swarm]\nlisten = \"{address}:{SWARM_PORT}\"\ntrackers = [{trackers}]\n",
                state = self.state(server).display(),
                www = www.display(),
                trackers = trackers.join(", "),
            );
            if self.racks > 1 {
                // The racks come from the DHCP subnets, as behind relays; the server answers
                // DHCP on an unprivileged port of its namespaced interface, which no client
                // here asks.
                config.push_str(&format!(
                    "[dhcp]\ninterfaces = [\"{interface}\"]\nport = 6767\n\
                     [[dhcp.subnet]]\ncidr = \"10.61.0.0/25\"\nrack = \"r1\"\n\
                     [[dhcp.subnet]]\ncidr = \"10.61.0.128/25\"\nrack = \"r2\"\n"
                ));
            }
            self.lab
                .serve(&format!("s{}", server + 1), &namespace, &config);
            let log_name = format!("s{}", server + 1);
            lab::wait_for(Duration::from_secs(20), || {
                self.lab
                    .log(&log_name)
                    .contains("offering an image to the swarm")
            })
            .unwrap_or_else(|| panic!("server offers no image:\n{}", self.lab.log(&log_name)));
        }

        pub fn agent_store(&self, agent: usize) -> PathBuf {
            self.lab.path(&format!("agent{}", agent + 1))
        }

        /// Starts agent `agent` with every server as a possible tracker and `peers` (addresses
        /// without port; the swarm port is added).
        pub fn start_agent(&mut self, agent: usize, peers: &[String]) {
            let (namespace, address) = self.agents[agent].clone();
            let store = self.agent_store(agent).to_string_lossy().into_owned();
            let listen = format!("{address}:{SWARM_PORT}");
            let server = format!("{}:{HTTP_PORT}", self.servers[0].2);
            let mut arguments = vec![
                "agent".to_owned(),
                "swarm".to_owned(),
                "--manifest".to_owned(),
                self.manifest.clone(),
                "--server".to_owned(),
                server,
                "--store".to_owned(),
                store,
                "--listen".to_owned(),
                listen,
            ];
            for peer in peers.iter().filter(|peer| **peer != address) {
                arguments.push("--peer".to_owned());
                arguments.push(format!("{peer}:{SWARM_PORT}"));
            }
            for tracker in &self.trackers {
                arguments.push("--tracker".to_owned());
                arguments.push(tracker.clone());
            }
            let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
            self.lab.spawn(
                &format!("agent{}", agent + 1),
                &namespace,
                env!("CARGO_BIN_EXE_bootmesh"),
                &arguments,
            );
        }

        pub fn agent_log(&self, agent: usize) -> String {
            self.lab.log(&format!("agent{}", agent + 1))
        }

        /// The agent's last `progress HELD TOTAL` line.
        pub fn agent_progress(&self, agent: usize) -> Option<(u64, u64)> {
            self.agent_log(agent).lines().rev().find_map(|line| {
                let mut words = line.strip_prefix("progress ")?.split(' ');
                Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
            })
        }

        /// The `complete` line's bytes per source address (ip).
        /// The trackers the agent announced to, in order (`tracker ADDR` lines, without port).
        pub fn agent_trackers(&self, agent: usize) -> Vec<String> {
            self.agent_log(agent)
                .lines()
                .filter_map(|line| line.strip_prefix("tracker "))
                .filter_map(|address| address.rsplit_once(':').map(|(ip, _)| ip.to_owned()))
                .collect()
        }

        pub fn agent_sources(&self, agent: usize) -> Option<Vec<(String, u64)>> {
            let log = self.agent_log(agent);
            let line = log.lines().find(|line| line.starts_with("complete "))?;
            let sources = line.split(" sources=").nth(1)?;
            Some(
                sources
                    .split(',')
                    .filter(|source| !source.is_empty())
                    .filter_map(|source| {
                        let (address, bytes) = source.split_once('=')?;
                        let ip = address.rsplit_once(':')?.0.to_owned();
                        Some((ip, bytes.parse().ok()?))
                    })
                    .collect(),
            )
        }

        /// Every chunk of the image is in the agent's store and reads back verified.
        pub fn assert_agent_holds_the_image(&self, agent: usize) {
            let store = ChunkStore::open(&self.agent_store(agent), 1 << 20).expect("agent store");
            let hash: ContentHash = self.manifest.parse().expect("hash");
            let manifest = store
                .manifest(&hash)
                .expect("the agent stored the manifest");
            for chunk in manifest.all_chunks() {
                store.read_chunk(&chunk.hash).unwrap_or_else(|error| {
                    panic!("agent {}: chunk {}: {error}", agent + 1, chunk.hash)
                });
            }
        }

        pub fn wait_until_complete(&self, agents: &[usize]) -> Duration {
            let started = Instant::now();
            lab::wait_for(FETCH_LIMIT, || {
                agents
                    .iter()
                    .all(|agent| self.agent_log(*agent).contains("\ncomplete "))
            })
            .unwrap_or_else(|| {
                let states: Vec<String> = agents
                    .iter()
                    .map(|agent| format!("agent{}: {:?}", agent + 1, self.agent_progress(*agent)))
                    .collect();
                panic!(
                    "not every agent completed within {FETCH_LIMIT:?}: {states:?}\nfirst log:\n{}",
                    self.agent_log(agents[0])
                )
            });
            started.elapsed()
        }
    }

    /// The number after `key=` in the last line of `log` that contains `marker`.
    pub fn logged_number(log: &str, marker: &str, key: &str) -> Option<u64> {
        let line = log.lines().rev().find(|line| line.contains(marker))?;
        let start = line.find(&format!("{key}="))? + key.len() + 1;
        line[start..]
            .split(|character: char| !character.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}

#[test]
fn twenty_agents_fetch_through_capped_links_and_the_server_sends_at_most_three_copies() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("tc");
    // The server uploads at 100 Mbit/s, each agent at 200 Mbit/s: from the server alone the
    // 20 copies would take 20 times S/100 Mbit; the swarm's lower bound is
    // max(S/B_server, S/B_agent, N*S/(B_server + N*B_agent)) = S/B_server.
    let agents = 20;
    // BOOTMESH_SWARM_CAPS_MBIT="25,50" runs the same lab with other caps: low caps make the
    // run bound by its links rather than by this machine's CPUs, which is what the storm
    // engine is checked against (`sim/scenarios/lab-twenty-agents-link-bound.toml`).
    let (server_mbit, agent_mbit) = std::env::var("BOOTMESH_SWARM_CAPS_MBIT")
        .ok()
        .and_then(|caps| {
            let (server, agent) = caps.split_once(',')?;
            Some((server.trim().parse().ok()?, agent.trim().parse().ok()?))
        })
        .unwrap_or((100u32, 200u32));
    // The agents are given no peers: only the server, as the image's tracker, which
    // places them in two racks by the server's DHCP subnets and names each mostly neighbours
    // of its own rack.
    let mut swarm = processes::SwarmLab::new(1, agents, 2, server_mbit, agent_mbit);
    swarm.serve(0);
    let (server_namespace, server_interface, server_address) = swarm.servers[0].clone();
    let sent_before = processes::tx_bytes(&server_namespace, &server_interface);
    let rack_of: std::collections::HashMap<String, usize> = swarm
        .agents
        .iter()
        .map(|(_, address)| address.clone())
        .zip(swarm.agent_racks.iter().copied())
        .collect();
    let started = std::time::Instant::now();
    for agent in 0..agents {
        swarm.start_agent(agent, &[]);
    }
    let all: Vec<usize> = (0..agents).collect();
    swarm.wait_until_complete(&all);
    let elapsed = started.elapsed();
    let sent_on_the_wire = processes::tx_bytes(&server_namespace, &server_interface) - sent_before;
    let mut agent_rss_mib: Vec<u64> = (0..agents)
        .filter_map(|agent| swarm.lab.rss_kib(&format!("agent{}", agent + 1)))
        .map(|kib| kib / 1024)
        .collect();
    agent_rss_mib.sort_unstable();
    let mut fetched_from_server = 0u64;
    let mut fetched_from_peers = 0u64;
    let (mut same_rack, mut other_rack) = (0u64, 0u64);
    for agent in 0..agents {
        swarm.assert_agent_holds_the_image(agent);
        // A session may be opened again (at low caps an answer can wait behind a full link
        // queue past the announce timeout), but only ever with the server.
        let mut trackers = swarm.agent_trackers(agent);
        trackers.dedup();
        assert_eq!(
            trackers,
            vec![server_address.clone()],
            "agent {agent} announced to the server"
        );
        for (ip, bytes) in swarm.agent_sources(agent).expect("a complete line") {
            if ip == server_address {
                fetched_from_server += bytes;
            } else {
                fetched_from_peers += bytes;
                if rack_of.get(&ip) == Some(&swarm.agent_racks[agent]) {
                    same_rack += bytes;
                } else {
                    other_rack += bytes;
                }
            }
        }
    }
    swarm
        .lab
        .terminate_and_wait("s1", Duration::from_secs(10))
        .expect("the server stops on SIGTERM");
    let server_log = swarm.lab.log("s1");
    let uploaded_by_server =
        processes::logged_number(&server_log, "swarm stopped", "bytes_uploaded")
            .unwrap_or_else(|| panic!("the server reports its uploads:\n{server_log}"));
    if let Some(line) = server_log
        .lines()
        .rev()
        .find(|line| line.contains("swarm stopped"))
    {
        eprintln!("server: {line}");
    }
    let image = swarm.image_bytes;
    let bits = |bytes: u64| bytes as f64 * 8.0;
    let lower_bound_seconds = [
        bits(image) / (f64::from(server_mbit) * 1e6),
        bits(image) / (f64::from(agent_mbit) * 1e6),
        agents as f64 * bits(image)
            / ((f64::from(server_mbit) + agents as f64 * f64::from(agent_mbit)) * 1e6),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    eprintln!(
        "{agents} agents, image {} MiB: all complete in {:.1} s (lower bound {lower_bound_seconds:.1} s, ratio {:.2}); \
         server sent {} MiB on the wire, {} MiB of chunks by its count ({:.2} copies); \
         agents took {} MiB from the server and {} MiB from each other ({} MiB within their rack, {} MiB across); \
         agent peak RSS median {} MiB, max {} MiB",
        image >> 20,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / lower_bound_seconds,
        sent_on_the_wire >> 20,
        uploaded_by_server >> 20,
        uploaded_by_server as f64 / image as f64,
        fetched_from_server >> 20,
        fetched_from_peers >> 20,
        same_rack >> 20,
        other_rack >> 20,
        agent_rss_mib
            .get(agent_rss_mib.len() / 2)
            .copied()
            .unwrap_or(0),
        agent_rss_mib.last().copied().unwrap_or(0),
    );
    assert_eq!(
        fetched_from_server + fetched_from_peers,
        agents as u64 * image,
        "every agent fetched exactly the image once"
    );
    assert!(
        uploaded_by_server >= fetched_from_server,
        "the server counts what it sent, the agents what they kept"
    );
    assert!(
        uploaded_by_server <= 3 * image,
        "the server uploaded {uploaded_by_server} bytes, more than 3 copies of {image}"
    );
    assert!(
        sent_on_the_wire <= 3 * image,
        "the server's interface sent {sent_on_the_wire} bytes, more than 3 copies of {image}"
    );
    // Each chunk crosses into a rack about once (the server sits in rack 1): what the
    // agents take across is a few copies, what they take within their rack the rest.
    assert!(
        other_rack * 3 < same_rack,
        "rack-local peers gave {same_rack} bytes, peers in the other rack {other_rack}"
    );
}

#[test]
fn an_agent_completes_from_another_server_when_the_one_it_fetches_from_is_killed() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("tc");
    // Two servers at 50 Mbit/s each, both listed as trackers; the agent is given only the
    // list, learns both servers from the image's tracker and fetches from both. When 10 % of
    // the chunks have arrived (its progress line, not a sleep), the tracker's server gets
    // kill -9: no goodbye on the wire, so the agent notices by timeouts, fails over to the
    // other tracker and completes from the other server.
    let mut swarm = processes::SwarmLab::new(2, 1, 1, 50, 1000);
    swarm.serve(0);
    swarm.serve(1);
    let servers: Vec<String> = swarm
        .servers
        .iter()
        .map(|server| server.2.clone())
        .collect();
    let started = std::time::Instant::now();
    swarm.start_agent(0, &[]);
    lab::wait_for(Duration::from_secs(120), || {
        swarm
            .agent_progress(0)
            .is_some_and(|(held, total)| held * 10 >= total)
    })
    .unwrap_or_else(|| panic!("no progress:\n{}", swarm.agent_log(0)));
    let (held, total) = swarm.agent_progress(0).expect("progress");
    let tracker = swarm
        .agent_trackers(0)
        .first()
        .cloned()
        .expect("a tracker line");
    let killed = servers
        .iter()
        .position(|server| *server == tracker)
        .expect("the tracker is a server");
    let survivor = &servers[1 - killed];
    swarm.lab.signal(&format!("s{}", killed + 1), libc::SIGKILL);
    let killed_at = started.elapsed();
    swarm.wait_until_complete(&[0]);
    let completed_at = started.elapsed();
    swarm.assert_agent_holds_the_image(0);
    let sources = swarm.agent_sources(0).expect("a complete line");
    let from = |ip: &str| {
        sources
            .iter()
            .filter(|(source, _)| source == ip)
            .map(|(_, bytes)| *bytes)
            .sum::<u64>()
    };
    eprintln!(
        "killed s{} (the image's tracker) at {:.1} s with {held} of {total} chunks held; complete at {:.1} s; \
         {} MiB from it, {} MiB from the other; trackers announced to: {:?}",
        killed + 1,
        killed_at.as_secs_f64(),
        completed_at.as_secs_f64(),
        from(&tracker) >> 20,
        from(survivor) >> 20,
        swarm.agent_trackers(0),
    );
    assert!(
        held * 2 <= total,
        "the kill came after half the image: {held}/{total}"
    );
    assert!(from(&tracker) > 0 && from(survivor) > 0);
    assert_eq!(from(&tracker) + from(survivor), swarm.image_bytes);
    lab::wait_for(Duration::from_secs(60), || {
        swarm.agent_trackers(0).last() == Some(survivor)
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent never announced to the surviving tracker:\n{}",
            swarm.agent_log(0)
        )
    });
}
