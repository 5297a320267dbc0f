//! A boot server's offer to the swarm: every image in its store, kept in step with imports
//! and removals.
#![allow(
    clippy::disallowed_methods,
    reason = "a driver: it scans the store off the async threads and sleeps between scans"
)]

use std::sync::Arc;
use std::time::Duration;

use super::{SharedImage, StoreShelf, SwarmNode};

/// How often a server looks for images imported or removed since its last look.
const STORE_RESCAN: Duration = Duration::from_secs(5);

/// Offers every image in `store` to the swarm, and keeps the offer in step with the store
/// (imports and removals) until `shutdown` resolves.
pub async fn offer_store_images(
    swarm: &Arc<SwarmNode>,
    store: Arc<transfer::ChunkStore>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let scan_store = Arc::clone(&store);
        let offered = swarm.offered_manifests();
        let scan = tokio::task::spawn_blocking(move || scan_images(&scan_store, &offered)).await;
        match scan {
            Ok(Ok((new, gone))) => {
                for image in new {
                    tracing::info!(manifest = %image.image().manifest(), chunks = image.image().chunk_count(), "offering an image to the swarm");
                    swarm.offer(image);
                }
                for manifest in gone {
                    tracing::info!(%manifest, "no longer offering a removed image");
                    swarm.withdraw(&manifest);
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "reading the image store for the swarm"),
            Err(error) => tracing::warn!(%error, "the image store scan failed"),
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(STORE_RESCAN) => {}
        }
    }
}

/// Images in `store` not yet offered, and offered manifests no longer in it.
fn scan_images(
    store: &Arc<transfer::ChunkStore>,
    offered: &std::collections::BTreeSet<transfer::ContentHash>,
) -> Result<(Vec<Arc<SharedImage>>, Vec<transfer::ContentHash>), transfer::StoreError> {
    let present: std::collections::BTreeSet<transfer::ContentHash> =
        store.list_manifests()?.into_iter().collect();
    let mut new = Vec::new();
    for hash in present.difference(offered) {
        let manifest = store.manifest(hash)?;
        match transfer::swarm::SwarmImage::new(*hash, &manifest, &[]) {
            Ok(image) => new.push(SharedImage::new(
                image,
                Arc::new(StoreShelf::new(Arc::clone(store))),
            )),
            Err(error) => tracing::warn!(manifest = %hash, %error, "not offered to the swarm"),
        }
    }
    let gone = offered.difference(&present).copied().collect();
    Ok((new, gone))
}
