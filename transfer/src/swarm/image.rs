//! An image as the swarm numbers it: its distinct chunks, in manifest order (kernel, initrd,
//! root), so chunk `i` means the same bytes to every peer that holds the same manifest; and
//! which of them a boot needs first.

use std::collections::HashMap;

use super::wire::CHUNKS_MAX;
use crate::{ChunkRef, ContentHash, Manifest, PartName};

/// An image too large for the swarm's numbering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the image has {0} distinct chunks, more than the swarm's {CHUNKS_MAX}")]
pub struct TooManyChunks(usize);

/// The swarm's view of one manifest.
#[derive(Debug, Clone)]
pub struct SwarmImage {
    manifest: ContentHash,
    chunks: Vec<ChunkRef>,
    index_of: HashMap<ContentHash, u32>,
    boot_critical: Vec<u32>,
    total_bytes: u64,
}

impl SwarmImage {
    /// The numbering of `manifest` (whose hash is `manifest_hash`). The kernel's and the
    /// initrd's chunks are boot-critical, in file order, followed by `read_trace` (root chunks
    /// a first boot reads, in the order it read them; hashes not in the image are skipped).
    pub fn new(
        manifest_hash: ContentHash,
        manifest: &Manifest,
        read_trace: &[ContentHash],
    ) -> Result<Self, TooManyChunks> {
        let mut chunks = Vec::new();
        let mut index_of = HashMap::new();
        for chunk in manifest.all_chunks() {
            if let std::collections::hash_map::Entry::Vacant(entry) = index_of.entry(chunk.hash) {
                let index = u32::try_from(chunks.len())
                    .ok()
                    .filter(|&index| index < CHUNKS_MAX)
                    .ok_or(TooManyChunks(chunks.len() + 1))?;
                entry.insert(index);
                chunks.push(*chunk);
            }
        }
        let firmware_parts = [PartName::Kernel, PartName::Initrd]
            .into_iter()
            .filter_map(|name| manifest.part(name))
            .flat_map(|part| part.chunks.iter().map(|chunk| chunk.hash));
        let boot_critical = firmware_parts
            .chain(read_trace.iter().copied())
            .filter_map(|hash| index_of.get(&hash).copied())
            .collect();
        let total_bytes = chunks
            .iter()
            .map(|chunk| u64::from(chunk.length_bytes))
            .sum();
        Ok(Self {
            manifest: manifest_hash,
            chunks,
            index_of,
            boot_critical,
            total_bytes,
        })
    }

    /// The manifest's hash: the image's identity.
    pub fn manifest(&self) -> ContentHash {
        self.manifest
    }

    /// Distinct chunks.
    pub fn chunk_count(&self) -> u32 {
        // `new` refuses more than CHUNKS_MAX, which fits.
        u32::try_from(self.chunks.len()).unwrap_or(CHUNKS_MAX)
    }

    /// Chunk `index`, if the image has it.
    pub fn chunk(&self, index: u32) -> Option<&ChunkRef> {
        self.chunks.get(index as usize)
    }

    /// Every distinct chunk, by index.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// The index of the chunk whose hash is `hash`.
    pub fn index_of(&self, hash: &ContentHash) -> Option<u32> {
        self.index_of.get(hash).copied()
    }

    /// Boot-critical chunks, in the order a boot needs them (may repeat; the scheduler
    /// keeps the first).
    pub fn boot_critical(&self) -> &[u32] {
        &self.boot_critical
    }

    /// Bytes of the distinct chunks together.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}
