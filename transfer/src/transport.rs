//! The seam through which a node fetches image data: manifests and chunks by hash, from one
//! of several sources. The agent plugs in HTTP to boot servers now; the swarm plugs in QUIC to
//! peers. Whatever comes back is untrusted: [`verify_chunk`] and `Manifest::decode_expecting`
//! decide whether it is what was asked for.

use std::future::Future;

use crate::{ChunkRef, ContentHash};

/// Where image data comes from.
pub trait ChunkTransport {
    /// Why one fetch from one source failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// How many sources there are; `source` arguments are below this.
    fn source_count(&self) -> usize;

    /// A printable name of `source` (an address), for logs and reports.
    fn source_name(&self, source: usize) -> String;

    /// The bytes of manifest `hash` from `source`.
    fn fetch_manifest(
        &self,
        source: usize,
        hash: &ContentHash,
    ) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send;

    /// The bytes of chunk `hash` from `source`.
    fn fetch_chunk(
        &self,
        source: usize,
        hash: &ContentHash,
    ) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send;
}

/// A chunk that is not what its reference says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkVerifyError {
    /// Wrong length.
    #[error("chunk {expected}: {actual_bytes} bytes, expected {expected_bytes}")]
    LengthMismatch {
        /// The chunk asked for.
        expected: ContentHash,
        /// Bytes received.
        actual_bytes: usize,
        /// Bytes expected.
        expected_bytes: u32,
    },
    /// Wrong content.
    #[error("chunk {expected}: content hashes to {actual}")]
    HashMismatch {
        /// The chunk asked for.
        expected: ContentHash,
        /// What the bytes hash to.
        actual: ContentHash,
    },
}

/// Checks that `bytes` are chunk `chunk`.
pub fn verify_chunk(chunk: &ChunkRef, bytes: &[u8]) -> Result<(), ChunkVerifyError> {
    if bytes.len() != chunk.length_bytes as usize {
        return Err(ChunkVerifyError::LengthMismatch {
            expected: chunk.hash,
            actual_bytes: bytes.len(),
            expected_bytes: chunk.length_bytes,
        });
    }
    let actual = ContentHash::of(bytes);
    if actual != chunk.hash {
        return Err(ChunkVerifyError::HashMismatch {
            expected: chunk.hash,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_refuses_wrong_length_and_wrong_content() {
        let bytes = b"chunk bytes";
        let chunk = ChunkRef {
            hash: ContentHash::of(bytes),
            length_bytes: bytes.len() as u32,
        };
        assert_eq!(verify_chunk(&chunk, bytes), Ok(()));
        assert!(matches!(
            verify_chunk(&chunk, b"chunk byte"),
            Err(ChunkVerifyError::LengthMismatch { .. })
        ));
        assert!(matches!(
            verify_chunk(&chunk, b"chunk bytez"),
            Err(ChunkVerifyError::HashMismatch { .. })
        ));
    }
}
