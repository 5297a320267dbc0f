//! Random reads of an image part straight from the chunk store.

use std::sync::Arc;

use crate::index::PartIndex;
use crate::manifest::Part;
use crate::store::{ChunkStore, StoreError};

/// Reads any byte range of one part, chunk by chunk, through the store's verified cache.
#[derive(Debug, Clone)]
pub struct PartReader {
    store: Arc<ChunkStore>,
    index: Arc<PartIndex>,
}

impl PartReader {
    /// A reader for `part`.
    pub fn new(store: Arc<ChunkStore>, part: &Part) -> Self {
        Self {
            store,
            index: Arc::new(PartIndex::new(part)),
        }
    }

    /// The part's length.
    pub fn size_bytes(&self) -> u64 {
        self.index.size_bytes()
    }

    /// Fills `buffer` from `offset`; returns the bytes read (short only at the end of the
    /// part). A missing or corrupt chunk is an error and no byte of it is copied.
    pub fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, StoreError> {
        let mut filled = 0usize;
        while filled < buffer.len() {
            let Some(position) = self.index.locate(offset + filled as u64) else {
                break;
            };
            let chunk = self.store.read_chunk(&position.chunk.hash)?;
            let start = usize::try_from(position.offset_in_chunk).unwrap_or(usize::MAX);
            let available = chunk.get(start..).unwrap_or_default();
            let wanted = buffer.len() - filled;
            let count = available.len().min(wanted);
            if count == 0 {
                // A chunk shorter than the manifest says: the store verified its hash, so the
                // manifest and store disagree; treat as missing rather than loop.
                return Err(StoreError::ChunkMissing {
                    hash: position.chunk.hash,
                });
            }
            if let (Some(target), Some(source)) = (
                buffer.get_mut(filled..filled + count),
                available.get(..count),
            ) {
                target.copy_from_slice(source);
            }
            filled += count;
        }
        Ok(filled)
    }
}
