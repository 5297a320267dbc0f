//! `bootmesh agent swarm`: one swarm member as a process. It fetches an image into a chunk
//! store from its peers while serving what it holds, then keeps serving until it is told to
//! stop. Booted nodes run it to share their image; tests and benchmarks run many of them.
//!
//! It prints one line per event on stdout, for scripts and tests: `listening ADDR`,
//! `progress HELD TOTAL` (at most every 100 ms, while chunks arrive), `complete ...` with the
//! bytes per source, and `uploaded BYTES` when it stops.
#![allow(
    clippy::disallowed_methods,
    reason = "the member's driver: it reads the clock for its progress lines"
)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use transfer::swarm::{SwarmImage, UploadConfig};
use transfer::{ChunkStore, ContentHash, Manifest, StoreError};

use super::{
    AnnounceOptions, AssembledShelf, ChunkShelf, FetchReport, SharedImage, StoreShelf, SwarmError,
    SwarmFetchConfig, SwarmNode,
};
use crate::agent::fetch::{HttpTransport, fetch_manifest};

/// Verified chunks kept in memory for serving.
const CHUNK_CACHE_BYTES: usize = 256 * 1024 * 1024;
/// How often progress is printed while chunks arrive.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Where a member keeps the image.
#[derive(Debug, Clone)]
pub enum Keep {
    /// In a chunk store at this directory (a server's kind of storage).
    Store(PathBuf),
    /// Assembled as files `kernel`, `initrd`, `root` in this directory (what a node boots).
    Assembled(PathBuf),
}

/// What one member does.
#[derive(Debug, Clone)]
pub struct MemberOptions {
    /// The image.
    pub manifest: ContentHash,
    /// Boot servers' HTTP addresses, asked for the manifest when the store lacks it.
    pub servers: Vec<SocketAddr>,
    /// Where chunks are kept.
    pub keep: Keep,
    /// This member's chunk endpoint.
    pub listen: SocketAddr,
    /// Peers to fetch from (servers' chunk endpoints, other members).
    pub peers: Vec<SocketAddr>,
    /// Where the member announces itself and learns its neighbours (no trackers: only
    /// `peers`).
    pub announce: AnnounceOptions,
    /// Upload cap.
    pub upload_bytes_per_second: Option<u64>,
    /// Mixes this member's rarest-first order.
    pub tie_break: u64,
}

fn print_line(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (nobody reads the progress) must not stop the member.
    let _unread = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

fn store_error(error: StoreError) -> SwarmError {
    SwarmError::Shelf(error.to_string())
}

/// Runs the member until the image is complete and then until `shutdown` resolves.
pub async fn run_member(
    options: MemberOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<FetchReport, SwarmError> {
    let (shelf, manifest): (Arc<dyn ChunkShelf>, Manifest) = match &options.keep {
        Keep::Store(directory) => {
            let store =
                Arc::new(ChunkStore::open(directory, CHUNK_CACHE_BYTES).map_err(store_error)?);
            let manifest = load_manifest(Some(&store), &options).await?;
            (Arc::new(StoreShelf::new(store)), manifest)
        }
        Keep::Assembled(directory) => {
            let manifest = load_manifest(None, &options).await?;
            let shelf = AssembledShelf::create(directory, &manifest)?;
            (Arc::new(shelf), manifest)
        }
    };
    let image = SwarmImage::new(options.manifest, &manifest, &[])?;
    let total = image.chunk_count();
    let shared = tokio::task::spawn_blocking(move || SharedImage::new(image, shelf))
        .await
        .map_err(|error| SwarmError::Shelf(error.to_string()))?;
    let upload = UploadConfig {
        bytes_per_second: options.upload_bytes_per_second,
        ..UploadConfig::default()
    };
    let node = SwarmNode::bind(options.listen, upload)?;
    node.offer(Arc::clone(&shared));
    if let Some(address) = node.local_addr() {
        print_line(&format!("listening {address}"));
    }
    let progress = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut printed = None;
            loop {
                let held = shared.held().count();
                if printed != Some(held) {
                    print_line(&format!("progress {held} {total}"));
                    printed = Some(held);
                }
                if held == total {
                    return;
                }
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
        })
    };
    // Announced for as long as the member runs: while it fetches (to meet neighbours) and
    // after (as a seed the tracker names to others).
    let announcer = tokio::spawn(Arc::clone(&node).announce(
        Arc::clone(&shared),
        options.announce.clone(),
        |tracker| print_line(&format!("tracker {tracker}")),
    ));
    let _stop_announcing = AbortOnDrop(announcer);
    let config = SwarmFetchConfig {
        tie_break: options.tie_break,
        ..SwarmFetchConfig::default()
    };
    let report = node
        .fetch(Arc::clone(&shared), &options.peers, config)
        .await;
    progress.abort();
    // The fetch synced the store before it reported the image complete.
    let report = report?;
    print_line(&format!("progress {total} {total}"));
    let sources: Vec<String> = report
        .sources
        .iter()
        .map(|(address, source)| format!("{address}={}", source.bytes))
        .collect();
    print_line(&format!(
        "complete chunks={} bytes={} elapsed_ms={} sources={}",
        report.chunks,
        report.bytes,
        report.elapsed.as_millis(),
        sources.join(",")
    ));
    shutdown.await;
    print_line(&format!(
        "uploaded {}",
        node.stats().bytes_uploaded.load(Ordering::Relaxed)
    ));
    node.shut_down_and_wait().await;
    Ok(report)
}

/// Aborts a task when dropped, however the member ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The manifest from the store, or else from a server (verified by its hash, then stored).
async fn load_manifest(
    store: Option<&Arc<ChunkStore>>,
    options: &MemberOptions,
) -> Result<Manifest, SwarmError> {
    if let Some(store) = store {
        match store.manifest(&options.manifest) {
            Ok(manifest) => return Ok(manifest),
            Err(StoreError::ManifestMissing { .. }) => {}
            Err(error) => return Err(store_error(error)),
        }
    }
    if options.servers.is_empty() {
        return Err(SwarmError::Shelf(format!(
            "manifest {} is not in the store and no --server was given to ask for it",
            options.manifest
        )));
    }
    let transport = HttpTransport::new(options.servers.clone());
    let manifest = fetch_manifest(&transport, &options.manifest)
        .await
        .map_err(|error| SwarmError::Shelf(error.to_string()))?;
    if let Some(store) = store {
        store.put_manifest(&manifest).map_err(store_error)?;
    }
    Ok(manifest)
}
