//! A boot server's offer to the swarm: every image in its store, kept in step with imports
//! and removals.
#![allow(
    clippy::disallowed_methods,
    reason = "a driver: it scans the store off the async threads and sleeps between scans"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::{AnnounceOptions, SharedImage, StoreShelf, SwarmNode};

/// How often a server looks for images imported or removed since its last look.
const STORE_RESCAN: Duration = Duration::from_secs(5);

/// Offers every image in `store` to the swarm, and keeps the offer in step with the store
/// (imports and removals) until `shutdown` resolves. With `announce`, each offered image is
/// announced to its tracker as complete, so fetchers are told of this server as a seed.
pub async fn offer_store_images(
    swarm: &Arc<SwarmNode>,
    store: Arc<transfer::ChunkStore>,
    announce: Option<AnnounceOptions>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut announcers = JoinSet::new();
    let mut announcing = HashMap::new();
    loop {
        let scan_store = Arc::clone(&store);
        let offered = swarm.offered_manifests();
        let scan = tokio::task::spawn_blocking(move || scan_images(&scan_store, &offered)).await;
        match scan {
            Ok(Ok((new, gone))) => {
                for image in new {
                    let manifest = image.image().manifest();
                    if !swarm.offer_unless_offered(Arc::clone(&image)) {
                        continue;
                    }
                    tracing::info!(%manifest, chunks = image.image().chunk_count(), "offering an image to the swarm");
                    if let Some(options) = &announce {
                        let announcer = announcers.spawn(Arc::clone(swarm).announce(
                            image,
                            options.clone(),
                            |_| {},
                        ));
                        announcing.insert(manifest, announcer);
                    }
                }
                for manifest in gone {
                    tracing::info!(%manifest, "no longer offering a removed image");
                    swarm.withdraw(&manifest);
                    if let Some(announcer) = announcing.remove(&manifest) {
                        announcer.abort();
                    }
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "reading the image store for the swarm"),
            Err(error) => tracing::warn!(%error, "the image store scan failed"),
        }
        tokio::select! {
            biased;
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
