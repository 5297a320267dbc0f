//! The swarm's real QUIC peerings (quinn, TLS, the chunk exchange and the fetch scheduler)
//! inside turmoil, on the simulator's UDP socket and runtime.
#![allow(
    clippy::expect_used,
    reason = "test helpers: a failed set-up fails the test"
)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use node::swarm::{ChunkShelf, SharedImage, SwarmFetchConfig, SwarmNode};
use sim::quic::MemoryShelf;
use transfer::manifest::MANIFEST_FORMAT_VERSION;
use transfer::swarm::{SwarmImage, UploadConfig};
use transfer::{ChunkRef, ContentHash, Manifest, Part, RootImage, VerityParameters};

const CHUNKS: usize = 24;
const CHUNK_BYTES: usize = 16 * 1024;
const PORT: u16 = 7400;

/// An image of `CHUNKS` distinct chunks in its root part, and the chunks' bytes.
fn image() -> (SwarmImage, Vec<(ChunkRef, Vec<u8>)>) {
    let chunks: Vec<(ChunkRef, Vec<u8>)> = (0..CHUNKS)
        .map(|index| {
            let bytes: Vec<u8> = (0..CHUNK_BYTES)
                .map(|offset| {
                    ((index * CHUNK_BYTES + offset).wrapping_mul(2_654_435_761) >> 11) as u8
                })
                .collect();
            let reference = ChunkRef {
                hash: ContentHash::of(&bytes),
                length_bytes: CHUNK_BYTES as u32,
            };
            (reference, bytes)
        })
        .collect();
    let size = (CHUNKS * CHUNK_BYTES) as u64;
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: "node".into(),
        tag: "quic-in-turmoil".into(),
        created_unix_secs: 1,
        cmdline: String::new(),
        kernel: None,
        initrd: None,
        root: RootImage {
            part: Part {
                size_bytes: size,
                chunks: chunks.iter().map(|(reference, _)| *reference).collect(),
            },
            squashfs_bytes: size,
            verity: VerityParameters {
                algorithm: "sha256".into(),
                data_block_bytes: 4096,
                hash_block_bytes: 4096,
                data_blocks: size / 4096,
                hash_offset_bytes: size,
                salt: Vec::new(),
                root_hash: [0; 32],
            },
        },
    };
    let image = SwarmImage::new(ContentHash::of(b"quic-in-turmoil"), &manifest, &[])
        .expect("a small image");
    (image, chunks)
}

fn endpoint_configs() -> (quinn::ServerConfig, Arc<quinn::TransportConfig>) {
    let (certificate, key) = node::swarm::tls::ephemeral_identity().expect("a certificate");
    let transport = node::swarm::transport_config();
    (
        node::swarm::tls::server_config(certificate, key, Arc::clone(&transport))
            .expect("server TLS"),
        transport,
    )
}

/// What one run saw, per fetcher: when it finished (virtual time), the bytes it fetched and
/// those of them from the seeding server.
type Outcome = BTreeMap<String, (Duration, u64, u64)>;

/// One server seeds the image; `fetchers` nodes fetch it from the server and from each other.
fn run(seed: u64, fetchers: usize) -> Outcome {
    let mut simulation = turmoil::Builder::new()
        .rng_seed(seed)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .simulation_duration(Duration::from_secs(120))
        .build();
    let outcome: Arc<Mutex<Outcome>> = Arc::default();
    simulation.host("seed", move || async move {
        let (server, _) = endpoint_configs();
        let endpoint = sim::quic::endpoint(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
            Some(server),
            seed,
        )
        .await?;
        let node = SwarmNode::serve_on(endpoint, UploadConfig::default())?;
        let (image, chunks) = image();
        let shelf = Arc::new(MemoryShelf::default());
        for (reference, bytes) in &chunks {
            shelf.store(reference, bytes)?;
        }
        node.offer(SharedImage::new(image, shelf));
        std::future::pending::<()>().await;
        Ok(())
    });
    for fetcher in 0..fetchers {
        let outcome = Arc::clone(&outcome);
        let name = format!("node{fetcher}");
        simulation.client(name.clone(), async move {
            // Staggered power-on: later nodes find earlier ones holding chunks.
            tokio::time::sleep(Duration::from_millis(40 * fetcher as u64)).await;
            let (server, _) = endpoint_configs();
            let endpoint = sim::quic::endpoint(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
                Some(server),
                seed.wrapping_add(1 + fetcher as u64),
            )
            .await?;
            let node = SwarmNode::serve_on(endpoint, UploadConfig::default())?;
            let (image, chunks) = image();
            let shelf = Arc::new(MemoryShelf::default());
            let shared = SharedImage::new(image, Arc::clone(&shelf) as Arc<dyn ChunkShelf>);
            let mut peers = vec![SocketAddr::new(turmoil::lookup("seed"), PORT)];
            peers.extend(
                (0..fetcher).map(|earlier| {
                    SocketAddr::new(turmoil::lookup(format!("node{earlier}")), PORT)
                }),
            );
            let report = node
                .fetch(shared, &peers, SwarmFetchConfig::default())
                .await?;
            // Every chunk arrived, with the right bytes (the fetch verified them too).
            for (reference, bytes) in &chunks {
                let held = shelf.read(reference)?.expect("every chunk is held");
                assert_eq!(&*held, bytes.as_slice());
            }
            let from_seed = peers
                .first()
                .and_then(|seed| report.sources.get(seed))
                .map_or(0, |source| source.bytes);
            outcome
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    name,
                    (
                        turmoil::sim_elapsed().unwrap_or_default(),
                        report.bytes,
                        from_seed,
                    ),
                );
            // Keep serving the others until the simulation ends.
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        });
    }
    simulation.run().expect("the simulation runs to its end");
    outcome
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// The first step of the quinn profile (ADR 0012): the swarm's peerings run on quinn inside
/// turmoil, every fetcher ends with the whole image, verified, partly from its peers, and one
/// seed replays the run (finish times to the microsecond, bytes by source). (This test found a
/// busy loop in the fetch: in virtual time a task that spins stops time, and the run hung.)
#[test]
fn the_swarm_fetches_an_image_over_quinn_inside_turmoil_and_one_seed_replays_it() {
    let outcome = run(3, 4);
    eprintln!("{outcome:#?}");
    assert_eq!(outcome.len(), 4, "every fetcher completes");
    let fetched: u64 = outcome.values().map(|(_, bytes, _)| bytes).sum();
    let from_seed: u64 = outcome.values().map(|(_, _, from_seed)| from_seed).sum();
    assert_eq!(fetched, (4 * CHUNKS * CHUNK_BYTES) as u64);
    eprintln!("the seed sent {from_seed} of the {fetched} bytes");
    assert!(from_seed < fetched, "the fetchers also served each other");
    assert_eq!(run(3, 4), outcome, "one seed, one run");
    assert_ne!(run(4, 4), outcome, "another seed, another run");
}
