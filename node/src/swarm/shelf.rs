//! Where a swarm member keeps the chunks it holds, and reads them back to serve them. A boot
//! server keeps them in its chunk store; an agent will keep them in the image it assembles in
//! memory. Either way a chunk is verified before it is served: the store checks each chunk
//! as it loads it into its cache of verified chunks.

use std::sync::Arc;

use transfer::{ChunkRef, ChunkStore, StoreError};

use super::SwarmError;

/// Storage for one image's chunks. Blocking: drivers call it off the async threads.
pub trait ChunkShelf: Send + Sync + 'static {
    /// The bytes of `chunk`, verified since they were last read from storage; `None` if the
    /// shelf does not hold it.
    fn read(&self, chunk: &ChunkRef) -> Result<Option<Arc<[u8]>>, SwarmError>;

    /// Keeps `bytes`, which the caller has verified to be `chunk`.
    fn store(&self, chunk: &ChunkRef, bytes: &[u8]) -> Result<(), SwarmError>;

    /// Whether the shelf holds `chunk` (without reading it).
    fn holds(&self, chunk: &ChunkRef) -> bool;
}

/// A shelf in a [`ChunkStore`] (which verifies on write and on every load).
#[derive(Debug, Clone)]
pub struct StoreShelf {
    store: Arc<ChunkStore>,
}

impl StoreShelf {
    /// A shelf in `store`.
    pub fn new(store: Arc<ChunkStore>) -> Self {
        Self { store }
    }
}

impl ChunkShelf for StoreShelf {
    fn read(&self, chunk: &ChunkRef) -> Result<Option<Arc<[u8]>>, SwarmError> {
        match self.store.read_chunk(&chunk.hash) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StoreError::ChunkMissing { .. }) => Ok(None),
            // A stored chunk that no longer verifies is not served: it is as good as absent,
            // and the store's scrub is what repairs it.
            Err(error) if error.is_corruption() => {
                tracing::error!(chunk = %chunk.hash, %error, "a stored chunk failed verification; not serving it");
                Ok(None)
            }
            Err(error) => Err(SwarmError::Shelf(error.to_string())),
        }
    }

    fn store(&self, chunk: &ChunkRef, bytes: &[u8]) -> Result<(), SwarmError> {
        self.store
            .insert_chunk(chunk.hash, bytes)
            .map(|_| ())
            .map_err(|error| SwarmError::Shelf(error.to_string()))
    }

    fn holds(&self, chunk: &ChunkRef) -> bool {
        self.store.contains_chunk(&chunk.hash)
    }
}
