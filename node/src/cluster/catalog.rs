//! Every server boots each group from the image the cluster's catalog names (ADR 0014).
//!
//! `bootmesh image promote` and `rollback` on any server commit the tag and the promotion
//! through Raft; each server's follower sees the change, makes sure its own store holds the
//! image (the manifest from a member over the admin channel, checked against its hash; the
//! chunks from the other members over the swarm, each verified on arrival) and then points its
//! local catalog at it, which is what its boot scripts read. Until the image is whole here, a
//! server keeps booting the group from what it had: a node never gets a boot script whose
//! kernel this server cannot serve.
#![allow(
    clippy::disallowed_methods,
    reason = "a driver: it polls the applied state and sleeps between attempts"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use transfer::{ChunkStore, ContentHash, ImageReference, Manifest};

use super::member::ClusterMember;
use crate::swarm::{SharedImage, StoreShelf, SwarmFetchConfig, SwarmNode};

/// How often the follower compares the cluster's catalog with the local one.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How long after a failed attempt the same image is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Why an image could not be made local.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The store could not be read or written.
    #[error("image store: {0}")]
    Store(String),
    /// No member handed over the manifest.
    #[error("{0}")]
    Manifest(String),
    /// The chunks did not all arrive.
    #[error("fetching the chunks: {0}")]
    Fetch(String),
    /// The image is missing here and this server has no swarm to fetch it with.
    #[error(
        "the image is not in this server's store and it has no [swarm] section to fetch it from the other servers: import it here, or add [swarm]"
    )]
    NoSwarm,
}

/// A promotion in the cluster's catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Promotion {
    group: String,
    reference: String,
    manifest: ContentHash,
}

/// Follows the cluster's catalog into this server's store and local catalog.
#[derive(Debug)]
pub struct CatalogFollower {
    /// The cluster member whose applied state holds the catalog.
    pub member: ClusterMember,
    /// This server's image store.
    pub store: Arc<ChunkStore>,
    /// The swarm node that fetches missing images (in `serve`, always one: a server without
    /// `[swarm]` has one that only dials out).
    pub swarm: Option<Arc<SwarmNode>>,
}

impl CatalogFollower {
    /// Runs until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // No fetch runs yet: pins are left from a previous life that died mid-fetch, and
        // would keep their chunks from collection for good. What is still wanted is pinned
        // again when its fetch starts.
        let store = Arc::clone(&self.store);
        let cleared =
            tokio::task::spawn_blocking(move || -> Result<usize, transfer::StoreError> {
                let pins = store.pinned_manifests()?;
                for hash in &pins {
                    store.unpin_manifest(hash)?;
                }
                Ok(pins.len())
            })
            .await;
        match cleared {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => {
                tracing::info!(count, "cleared the pins of fetches a previous run left")
            }
            Ok(Err(error)) => tracing::warn!(%error, "the image store's pins could not be cleared"),
            Err(error) => tracing::warn!(%error, "the image store's pins could not be cleared"),
        }
        let mut failed_at: BTreeMap<ContentHash, Instant> = BTreeMap::new();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
            let behind = self.promotions_not_followed().await;
            self.member
                .set_catalog_groups_behind(u64::try_from(behind.len()).unwrap_or(u64::MAX));
            // Only images still wanted are remembered as failed: bounded by the groups.
            failed_at.retain(|manifest, _| {
                behind
                    .iter()
                    .any(|promotion| promotion.manifest == *manifest)
            });
            for promotion in behind {
                if failed_at
                    .get(&promotion.manifest)
                    .is_some_and(|at| at.elapsed() < RETRY_AFTER)
                {
                    continue;
                }
                let span = tracing::info_span!(
                    "catalog",
                    group = %promotion.group,
                    image = %promotion.reference,
                    manifest = %promotion.manifest
                );
                let outcome = tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    outcome = tracing::Instrument::instrument(self.follow(&promotion), span.clone()) => outcome,
                };
                let _entered = span.enter();
                match outcome {
                    Ok(()) => {
                        failed_at.remove(&promotion.manifest);
                        let left = self.member.catalog_groups_behind().saturating_sub(1);
                        self.member.set_catalog_groups_behind(left);
                        tracing::info!(
                            "the group boots this image here now, as the cluster's catalog says"
                        );
                    }
                    Err(error) => {
                        failed_at.insert(promotion.manifest, Instant::now());
                        tracing::warn!(%error, "the cluster's catalog names an image this server cannot serve yet; it keeps booting the group from what it had");
                    }
                }
            }
        }
    }

    /// The cluster's promotions that the local catalog does not follow yet.
    async fn promotions_not_followed(&self) -> Vec<Promotion> {
        let cluster: Vec<Promotion> = self.member.state.read(|state| {
            state
                .promotions
                .iter()
                .filter_map(|(group, reference)| {
                    let entry = state.catalog.get(reference)?;
                    Some(Promotion {
                        group: group.clone(),
                        reference: reference.clone(),
                        manifest: entry.manifest.parse().ok()?,
                    })
                })
                .collect()
        });
        if cluster.is_empty() {
            return cluster;
        }
        let store = Arc::clone(&self.store);
        let local = tokio::task::spawn_blocking(move || store.catalog()).await;
        let Ok(Ok(local)) = local else {
            tracing::warn!("the local image catalog is unreadable; following the cluster's later");
            return Vec::new();
        };
        cluster
            .into_iter()
            .filter(|promotion| {
                local.group_image(&promotion.group)
                    != Some((promotion.reference.as_str(), promotion.manifest))
            })
            .collect()
    }

    /// Makes the image whole in the local store, then promotes it locally.
    async fn follow(&self, promotion: &Promotion) -> Result<(), FollowError> {
        let store = Arc::clone(&self.store);
        let hash = promotion.manifest;
        let local_manifest = tokio::task::spawn_blocking(move || match store.manifest(&hash) {
            Ok(manifest) => Ok(Some(manifest)),
            Err(transfer::StoreError::ManifestMissing { .. }) => Ok(None),
            Err(error) => Err(FollowError::Store(error.to_string())),
        })
        .await
        .map_err(|error| FollowError::Store(error.to_string()))??;
        let manifest = match local_manifest {
            Some(manifest) => manifest,
            None => {
                tracing::info!("asking the other servers for the manifest");
                self.member
                    .manifest_from_other_members(hash)
                    .await
                    .map_err(FollowError::Manifest)?
            }
        };
        // Pinned first, so that `image gc` keeps the manifest and the chunks fetched so far
        // until the image is tagged here. Stored before its chunks: the server's store scan
        // offers what the store holds and withdraws offers of manifests it does not, which
        // would withdraw the fetch's own.
        let store = Arc::clone(&self.store);
        let stored = manifest.clone();
        tokio::task::spawn_blocking(move || -> Result<(), transfer::StoreError> {
            let lock = store.lock_for_writing()?;
            store.pin_manifest(&hash, &lock)?;
            drop(lock);
            store.put_manifest(&stored)?;
            Ok(())
        })
        .await
        .map_err(|error| FollowError::Store(error.to_string()))?
        .map_err(|error| FollowError::Store(error.to_string()))?;
        let followed = match self.make_whole(hash, &manifest).await {
            Ok(()) => {
                let store = Arc::clone(&self.store);
                let promotion = promotion.clone();
                tokio::task::spawn_blocking(move || promote_locally(&store, &promotion))
                    .await
                    .map_err(|error| FollowError::Store(error.to_string()))
                    .and_then(|promoted| promoted)
            }
            Err(error) => Err(error),
        };
        // Tagged now, or given up on until the next attempt (which pins it again).
        let store = Arc::clone(&self.store);
        let unpinned = tokio::task::spawn_blocking(move || store.unpin_manifest(&hash)).await;
        if !matches!(unpinned, Ok(Ok(()))) {
            tracing::warn!("the image's pin could not be removed; the next start clears it");
        }
        followed
    }

    /// Fetches the chunks of `manifest` this store lacks from the other members.
    async fn make_whole(&self, hash: ContentHash, manifest: &Manifest) -> Result<(), FollowError> {
        let image = transfer::swarm::SwarmImage::new(hash, manifest, &[])
            .map_err(|error| FollowError::Store(error.to_string()))?;
        let shelf = Arc::new(StoreShelf::new(Arc::clone(&self.store)));
        let shared = tokio::task::spawn_blocking(move || SharedImage::new(image, shelf))
            .await
            .map_err(|error| FollowError::Store(error.to_string()))?;
        if shared.is_complete() {
            return Ok(());
        }
        let Some(swarm) = &self.swarm else {
            return Err(FollowError::NoSwarm);
        };
        let peers = self.member.other_member_addresses();
        tracing::info!(
            chunks = shared.image().chunk_count(),
            held = shared.held().count(),
            peers = peers.len(),
            "fetching the image from the other servers"
        );
        let report = swarm
            .fetch(shared, &peers, SwarmFetchConfig::default())
            .await
            .map_err(|error| FollowError::Fetch(error.to_string()))?;
        tracing::info!(
            chunks = report.chunks,
            bytes = report.bytes,
            elapsed_ms = u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
            "the image is whole here"
        );
        Ok(())
    }
}

/// Points the local catalog's tag at the cluster's manifest and makes the group boot it.
fn promote_locally(store: &ChunkStore, promotion: &Promotion) -> Result<(), FollowError> {
    let store_error = |error: &dyn std::fmt::Display| FollowError::Store(error.to_string());
    let reference =
        ImageReference::parse(&promotion.reference).map_err(|error| store_error(&error))?;
    let lock = store
        .lock_for_writing()
        .map_err(|error| store_error(&error))?;
    let mut catalog = store.catalog().map_err(|error| store_error(&error))?;
    catalog.tag(&reference, promotion.manifest);
    catalog
        .promote(&promotion.group, &promotion.reference)
        .map_err(|error| store_error(&error))?;
    store
        .write_catalog(&catalog, &lock)
        .map_err(|error| store_error(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_promotion_follows_the_cluster_and_keeps_the_groups_history() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let store = ChunkStore::open(directory.path(), 1 << 20).expect("store");
        let old = ContentHash([1; 32]);
        let new = ContentHash([2; 32]);
        let follow = |reference: &str, manifest: ContentHash| {
            promote_locally(
                &store,
                &Promotion {
                    group: "workers".into(),
                    reference: reference.into(),
                    manifest,
                },
            )
            .expect("promoted");
        };
        follow("node:v1", old);
        follow("node:v2", new);
        let catalog = store.catalog().expect("catalog");
        assert_eq!(catalog.group_image("workers"), Some(("node:v2", new)));
        // A rollback here returns to what the cluster promoted before.
        let mut rolled_back = catalog;
        assert_eq!(rolled_back.rollback("workers").expect("history"), "node:v1");
        // The cluster's manifest wins over a local tag of the same name.
        follow("node:v1", new);
        assert_eq!(
            store.catalog().expect("catalog").group_image("workers"),
            Some(("node:v1", new))
        );
    }
}
