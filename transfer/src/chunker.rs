//! Content-defined chunking (FastCDC, 2020 variant): chunk boundaries follow the bytes, not
//! their offsets, so inserting or removing bytes in one place changes only the chunks around
//! it. ADR 0004 records the measurements behind the sizes.

use std::io::Read;

use crate::hash::ContentHash;
use crate::manifest::{ChunkRef, Part};

/// FastCDC's size bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkingParameters {
    /// No cut before this many bytes (except at the end).
    pub min_bytes: u32,
    /// The typical chunk length.
    pub average_bytes: u32,
    /// A cut is forced at this length.
    pub max_bytes: u32,
}

impl ChunkingParameters {
    /// 64 KiB / 256 KiB / 1 MiB: large enough that a 1 GiB image is about 4000 chunks (a small
    /// manifest and few requests per boot), small enough that an edit costs little (ADR 0004).
    pub const DEFAULT: Self = Self {
        min_bytes: 64 * 1024,
        average_bytes: 256 * 1024,
        max_bytes: 1024 * 1024,
    };
}

/// Reading the input failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkingError<E: std::error::Error + 'static> {
    /// The reader failed.
    #[error("reading the input to chunk: {0}")]
    Read(String),
    /// The chunk consumer failed.
    #[error(transparent)]
    Consumer(E),
}

/// Cuts everything `reader` yields into chunks, hands each to `consume` (with its hash), and
/// returns the part they make up. Memory is bounded by the maximum chunk size.
pub fn chunk_reader<R: Read, E: std::error::Error + 'static>(
    reader: R,
    parameters: ChunkingParameters,
    mut consume: impl FnMut(ContentHash, &[u8]) -> Result<(), E>,
) -> Result<Part, ChunkingError<E>> {
    let chunker = fastcdc::v2020::StreamCDC::new(
        reader,
        parameters.min_bytes,
        parameters.average_bytes,
        parameters.max_bytes,
    );
    let mut part = Part::default();
    for chunk in chunker {
        let chunk = chunk.map_err(|error| ChunkingError::Read(error.to_string()))?;
        let hash = ContentHash::of(&chunk.data);
        consume(hash, &chunk.data).map_err(ChunkingError::Consumer)?;
        let length_bytes = u32::try_from(chunk.length)
            .map_err(|_| ChunkingError::Read(format!("chunk of {} bytes", chunk.length)))?;
        part.size_bytes += u64::from(length_bytes);
        part.chunks.push(ChunkRef { hash, length_bytes });
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random_bytes(length: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn chunk_all(bytes: &[u8]) -> Result<Part, ChunkingError<std::io::Error>> {
        chunk_reader::<_, std::io::Error>(bytes, ChunkingParameters::DEFAULT, |_, _| Ok(()))
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() -> Result<(), Box<dyn std::error::Error>> {
        let original = pseudo_random_bytes(16 * 1024 * 1024, 1);
        let mut edited = original.clone();
        let insert_at = 8 * 1024 * 1024 + 12_345;
        edited.splice(insert_at..insert_at, pseudo_random_bytes(100_000, 2));
        let before = chunk_all(&original)?;
        let after = chunk_all(&edited)?;
        assert_eq!(before.size_bytes, original.len() as u64);
        assert_eq!(after.size_bytes, edited.len() as u64);
        let known: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let reused = after
            .chunks
            .iter()
            .filter(|c| known.contains(&c.hash))
            .count();
        let new = after.chunks.len() - reused;
        assert!(new <= 4, "{new} of {} chunks changed", after.chunks.len());
        assert!(
            after
                .chunks
                .iter()
                .all(|c| c.length_bytes <= ChunkingParameters::DEFAULT.max_bytes)
        );
        Ok(())
    }

    #[test]
    fn empty_input_is_an_empty_part() -> Result<(), Box<dyn std::error::Error>> {
        assert_eq!(chunk_all(&[])?, Part::default());
        Ok(())
    }
}
