//! The chaos engine's quinn profile (`chunks = "swarm"`, ADR 0012): the image moves over the
//! swarm's real QUIC code inside turmoil instead of over one simulated TCP connection per
//! chunk. Every server is a swarm member on its own quinn endpoint: it seeds the image,
//! answers tracker sessions and announces the image to its tracker, as `serve` does with a
//! `[swarm]` section. Every node that has its lease becomes a member too, on an endpoint of its
//! own on its farm's host: it announces itself to the image's tracker (its farm is its rack),
//! fetches with the agent's swarm fetch (rarest first, peers named by the tracker, a peer that
//! sends a wrong chunk banned), and, once complete, keeps serving the others as a booted node
//! does.
//!
//! The checks are the engine's: every chunk a node keeps is compared with the true bytes
//! (its shelf is the checker), a server with a rotting disk serves flipped bytes from its
//! shelf, and a node counts as booted when it holds the whole image.
//!
//! What this profile does not model: the network's duplication fault touches only the nodes'
//! DHCP datagrams (turmoil has no duplication; the farm duplicates what it sends and hears),
//! and a farm's nodes reach each other over the farm host's loopback, which no fault touches
//! (a rack's own switch).

// A driver: it spawns each member's tasks on its simulated host.
#![allow(clippy::disallowed_methods)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use node::swarm::{
    AnnounceOptions, ChunkShelf, SharedImage, SwarmError, SwarmFetchConfig, SwarmNode,
    TrackerService,
};
use transfer::manifest::MANIFEST_FORMAT_VERSION;
use transfer::swarm::{SwarmImage, TrackerConfig, UploadConfig};
use transfer::{ChunkRef, Manifest, RootImage, VerityParameters};

use super::image::ChaosImage;
use super::{Shared, lock};
use crate::Trace;

/// UDP port of every server's swarm endpoint.
pub const SWARM_PORT: u16 = 7003;
/// A farm's node `k` (counted within the farm) has its swarm endpoint on this port plus `k`.
pub const NODE_PORT_FIRST: u16 = 20_000;
/// The most nodes one farm may hold in this profile (one port each).
pub const NODES_PER_FARM_MAX: usize = (u16::MAX - NODE_PORT_FIRST) as usize;
/// Pause between fetch rounds of a node whose fetch gave up.
const FETCH_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often a server adds what its swarm member uploaded to the run's counters.
const UPLOAD_COUNT_EVERY: Duration = Duration::from_millis(250);
/// How often a booted node looks whether the run is over.
const FINISHED_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The image as the swarm knows it: a manifest around the chaos image's chunks, which all sit
/// in the root part.
pub fn swarm_image(image: &ChaosImage) -> Result<SwarmImage, SwarmError> {
    let size = image.part.size_bytes;
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: "chaos".into(),
        tag: "swarm".into(),
        created_unix_secs: super::EPOCH_SECS,
        cmdline: String::new(),
        kernel: None,
        initrd: None,
        root: RootImage {
            part: image.part.clone(),
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
    let (hash, _) = manifest
        .identity()
        .map_err(|error| SwarmError::Shelf(format!("the chaos image's manifest: {error}")))?;
    Ok(SwarmImage::new(hash, &manifest, &[])?)
}

/// Where server `id`'s swarm member listens.
pub fn server_swarm_address(id: u64) -> SocketAddr {
    SocketAddr::new(
        turmoil::lookup(super::member::server_name(id).as_str()),
        SWARM_PORT,
    )
}

/// A server's shelf: it holds the whole image, and while the harness has its disk rotting,
/// every chunk it reads has its first byte flipped.
#[derive(Debug)]
struct ServerShelf {
    server: u64,
    image: ChaosImage,
    shared: Shared,
}

impl ChunkShelf for ServerShelf {
    fn read(&self, chunk: &ChunkRef) -> Result<Option<Arc<[u8]>>, SwarmError> {
        let Some(bytes) = self.image.chunk(&chunk.hash) else {
            return Ok(None);
        };
        let mut bytes = bytes.to_vec();
        if lock(&self.shared).corrupt_servers.contains(&self.server)
            && let Some(first) = bytes.first_mut()
        {
            *first ^= 0xff;
        }
        Ok(Some(Arc::from(bytes)))
    }

    fn store(&self, _chunk: &ChunkRef, _bytes: &[u8]) -> Result<(), SwarmError> {
        // A seed fetches nothing; it holds every chunk from the start.
        Ok(())
    }

    fn holds(&self, chunk: &ChunkRef) -> bool {
        self.image.chunk(&chunk.hash).is_some()
    }

    fn sync(&self) -> Result<(), SwarmError> {
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// A node's image in RAM, and the checker of what it keeps: every chunk stored is compared
/// with the true bytes.
#[derive(Debug)]
struct NodeShelf {
    node: usize,
    image: ChaosImage,
    chunks: crate::quic::MemoryShelf,
    shared: Shared,
    trace: Trace,
}

impl ChunkShelf for NodeShelf {
    fn read(&self, chunk: &ChunkRef) -> Result<Option<Arc<[u8]>>, SwarmError> {
        self.chunks.read(chunk)
    }

    fn store(&self, chunk: &ChunkRef, bytes: &[u8]) -> Result<(), SwarmError> {
        let index = self.image.index_of(&chunk.hash).unwrap_or(usize::MAX);
        let right = self.image.chunk(&chunk.hash) == Some(bytes);
        super::image::record_kept(self.node, index, right, &self.shared, &self.trace);
        self.chunks.store(chunk, bytes)
    }

    fn holds(&self, chunk: &ChunkRef) -> bool {
        self.chunks.holds(chunk)
    }

    fn sync(&self) -> Result<(), SwarmError> {
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}

/// A quinn endpoint with a throwaway identity (as every swarm member has) on the current host.
async fn endpoint(port: u16, seed: u64) -> Result<quinn::Endpoint, SwarmError> {
    let (certificate, key) = node::swarm::tls::ephemeral_identity()?;
    let server =
        node::swarm::tls::server_config(certificate, key, node::swarm::transport_config())?;
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    crate::quic::endpoint(address, Some(server), seed)
        .await
        .map_err(|source| SwarmError::Bind { address, source })
}

/// Adds what a member uploaded since the last count to its server's bytes sent; on a period,
/// and a last time when the server's host goes down (the counter is dropped with it).
struct UploadCounter {
    server: u64,
    node: Arc<SwarmNode>,
    counted: u64,
    shared: Shared,
}

impl UploadCounter {
    fn count(&mut self) {
        let uploaded = self.node.stats().bytes_uploaded.load(Ordering::Relaxed);
        let new = uploaded.saturating_sub(self.counted);
        self.counted = uploaded;
        if new > 0 {
            *lock(&self.shared)
                .bytes_served
                .entry(self.server)
                .or_default() += new;
        }
    }
}

impl Drop for UploadCounter {
    fn drop(&mut self) {
        self.count();
    }
}

/// Starts server `id`'s swarm member: it seeds the image, tracks it, and announces it to its
/// tracker among `servers`. It runs until the server's host goes down.
pub async fn serve_image(
    id: u64,
    servers: u64,
    seed: u64,
    shared: Shared,
) -> Result<(), SwarmError> {
    let node = SwarmNode::serve_on(endpoint(SWARM_PORT, seed).await?, UploadConfig::default())?;
    // No subnet names a rack here: members say which rack they are in (their farm).
    node.enable_tracker(TrackerService::new(
        TrackerConfig::default(),
        node::racks::RackMap::default(),
    ));
    let image = ChaosImage::new();
    let shelf = Arc::new(ServerShelf {
        server: id,
        image: image.clone(),
        shared: Arc::clone(&shared),
    });
    let offered = SharedImage::new(swarm_image(&image)?, shelf);
    node.offer(Arc::clone(&offered));
    let options = AnnounceOptions {
        trackers: (1..=servers).map(server_swarm_address).collect(),
        ..AnnounceOptions::default()
    };
    tokio::spawn(Arc::clone(&node).announce(offered, options, |_| {}));
    let mut counter = UploadCounter {
        server: id,
        node,
        counted: 0,
        shared,
    };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPLOAD_COUNT_EVERY).await;
            counter.count();
        }
    });
    Ok(())
}

/// What one node needs to join the swarm.
#[derive(Debug, Clone)]
pub struct MemberSetup {
    /// The node.
    pub node: usize,
    /// Its place on its farm (its endpoint's port is `NODE_PORT_FIRST` plus this).
    pub offset: usize,
    /// Its farm, which it names as its rack.
    pub farm: usize,
    /// Servers in the cluster.
    pub servers: u64,
    /// The run's seed.
    pub seed: u64,
}

/// Node `setup.node` boots over the swarm: it joins on its own endpoint, announces itself,
/// fetches until it holds the whole image (round after round, if a round gives up), and then
/// keeps serving and announcing until the run is over.
pub async fn boot_member(setup: MemberSetup, shared: Shared, trace: Trace) {
    let node_name = format!("node{}", setup.node);
    let endpoint_seed = setup.seed ^ (setup.node as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
    let port = u16::try_from(setup.offset)
        .ok()
        .and_then(|offset| NODE_PORT_FIRST.checked_add(offset));
    let joined = match port {
        Some(port) => match endpoint(port, endpoint_seed).await {
            Ok(endpoint) => SwarmNode::serve_on(endpoint, UploadConfig::default()),
            Err(error) => Err(error),
        },
        None => Err(SwarmError::Shelf(format!(
            "no port for node {} of a farm",
            setup.offset
        ))),
    };
    let member = match joined {
        Ok(member) => member,
        Err(error) => {
            lock(&shared)
                .violations
                .push(format!("{node_name} could not join the swarm: {error}"));
            return;
        }
    };
    let image = ChaosImage::new();
    let swarm_image = match swarm_image(&image) {
        Ok(swarm_image) => swarm_image,
        Err(error) => {
            lock(&shared).violations.push(format!(
                "{node_name}: the image has no swarm numbering: {error}"
            ));
            return;
        }
    };
    let shelf = Arc::new(NodeShelf {
        node: setup.node,
        image,
        chunks: crate::quic::MemoryShelf::default(),
        shared: Arc::clone(&shared),
        trace: trace.clone(),
    });
    let held = SharedImage::new(swarm_image, shelf);
    member.offer(Arc::clone(&held));
    let servers: Vec<SocketAddr> = (1..=setup.servers).map(server_swarm_address).collect();
    let options = AnnounceOptions {
        trackers: servers.clone(),
        rack: Some(format!("farm{}", setup.farm)),
        ..AnnounceOptions::default()
    };
    let announcer = tokio::spawn(Arc::clone(&member).announce(Arc::clone(&held), options, |_| {}));
    let config = SwarmFetchConfig {
        tie_break: setup.node as u64,
        ..SwarmFetchConfig::default()
    };
    let (mut from_servers, mut from_nodes, mut rejected) = (0u64, 0u64, 0u64);
    loop {
        if lock(&shared).finished {
            announcer.abort();
            return;
        }
        let fetched = member
            .fetch(Arc::clone(&held), &servers, config.clone())
            .await;
        match fetched {
            Ok(report) => {
                for (source, given) in &report.sources {
                    if servers.contains(source) {
                        from_servers += given.bytes;
                    } else {
                        from_nodes += given.bytes;
                    }
                    rejected += given.rejected;
                }
                trace.record(format!(
                    "{node_name} booted over the swarm: {from_servers} bytes from servers, {from_nodes} from nodes, {rejected} chunks refused"
                ));
                let mut observed = lock(&shared);
                observed.booted.insert(setup.node);
                observed
                    .booted_at
                    .insert(setup.node, turmoil::sim_elapsed().unwrap_or_default());
                observed.chunks_rejected += rejected;
                observed.bytes_from_nodes += from_nodes;
                break;
            }
            Err(error) => {
                trace.record(format!("{node_name} fetch round failed: {error}"));
                tokio::time::sleep(FETCH_RETRY_AFTER).await;
            }
        }
    }
    // Booted: the node serves its image to the others and stays listed as a seed.
    while !lock(&shared).finished {
        tokio::time::sleep(FINISHED_CHECK_EVERY).await;
    }
    announcer.abort();
    member.shut_down();
}
