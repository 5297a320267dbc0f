//! The image swarm over real QUIC on loopback: several members in one process, each with its
//! own endpoint, chunk store on disk and upload gate, exchanging an image's chunks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use node::swarm::{ChunkShelf, SharedImage, StoreShelf, SwarmError, SwarmFetchConfig, SwarmNode};
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
    assert_eq!(seed.uploaded(), from_seed, "the seed's count and the fetchers' agree");
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
    let from_liar = report.sources.get(&liar.address()).cloned().unwrap_or_default();
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
    while fetcher.node.stats().chunks_downloaded.load(Ordering::Relaxed) < tenth {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent_by_first = first.node.stats().chunks_uploaded.load(Ordering::Relaxed);
    first.node.shut_down();
    let report = fetch.await.expect("fetch task").expect("the fetch completes");
    fetcher.assert_complete_and_verified(&swarm_image);
    let from_first = report.sources.get(&first.address()).cloned().unwrap_or_default();
    let from_second = report.sources.get(&second.address()).cloned().unwrap_or_default();
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
