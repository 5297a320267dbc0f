//! Byte offset to chunk, for random reads of a part (NBD, HTTP ranges, TFTP blocks).

use crate::manifest::{ChunkRef, Part};

/// The start offset of every chunk of a part, for binary search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartIndex {
    chunks: Vec<ChunkRef>,
    /// `starts[i]` is where chunk `i` begins; one more entry holds the part's size.
    starts: Vec<u64>,
}

/// Where a byte offset falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPosition {
    /// Index of the chunk in the part.
    pub chunk_index: usize,
    /// The chunk.
    pub chunk: ChunkRef,
    /// The offset's distance from the chunk's start.
    pub offset_in_chunk: u64,
    /// The chunk's start offset in the part.
    pub chunk_start: u64,
}

impl PartIndex {
    /// Builds the index (one pass over the chunk list).
    pub fn new(part: &Part) -> Self {
        let mut starts = Vec::with_capacity(part.chunks.len() + 1);
        let mut offset = 0u64;
        for chunk in &part.chunks {
            starts.push(offset);
            offset += u64::from(chunk.length_bytes);
        }
        starts.push(offset);
        Self {
            chunks: part.chunks.clone(),
            starts,
        }
    }

    /// The part's length.
    pub fn size_bytes(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The chunk holding byte `offset`, or `None` past the end.
    pub fn locate(&self, offset: u64) -> Option<ChunkPosition> {
        if offset >= self.size_bytes() {
            return None;
        }
        // The last start that is <= offset.
        let chunk_index = self
            .starts
            .partition_point(|start| *start <= offset)
            .checked_sub(1)?;
        let chunk_start = *self.starts.get(chunk_index)?;
        Some(ChunkPosition {
            chunk_index,
            chunk: *self.chunks.get(chunk_index)?,
            offset_in_chunk: offset - chunk_start,
            chunk_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;

    #[test]
    fn locates_every_boundary() {
        let lengths = [10u32, 1, 5];
        let part = Part {
            size_bytes: 16,
            chunks: lengths
                .iter()
                .map(|length| ChunkRef {
                    hash: ContentHash::of(&length.to_le_bytes()),
                    length_bytes: *length,
                })
                .collect(),
        };
        let index = PartIndex::new(&part);
        let found = |offset| {
            index
                .locate(offset)
                .map(|p| (p.chunk_index, p.offset_in_chunk))
        };
        assert_eq!(found(0), Some((0, 0)));
        assert_eq!(found(9), Some((0, 9)));
        assert_eq!(found(10), Some((1, 0)));
        assert_eq!(found(11), Some((2, 0)));
        assert_eq!(found(15), Some((2, 4)));
        assert_eq!(found(16), None);
        assert_eq!(PartIndex::new(&Part::default()).locate(0), None);
    }
}
