//! The image the chaos engine's nodes boot: a small part in content-addressed chunks, served
//! by every server over simulated TCP and fetched by each node with the agent's own fetch
//! (`node::agent::fetch`: chunks spread over the servers, every one verified against the
//! manifest, a server that serves wrong bytes banned for the boot).
//!
//! The sink a node writes into is the checker: it compares every chunk the node kept with
//! the true bytes, so a chunk accepted with a wrong hash is a violation.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use node::agent::fetch::ChunkSink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transfer::{ChunkRef, ChunkTransport, ContentHash, Part};

use super::{Shared, lock};
use crate::Trace;

/// Port of every server's chunk listener.
pub const CHUNK_PORT: u16 = 7002;
/// Chunks in the image, and their size: small, so that thousands of nodes stay cheap.
const CHUNKS: usize = 16;
const CHUNK_BYTES: usize = 4096;
/// A chunk request that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Answer length that means "no such chunk".
const NOT_FOUND: u32 = u32::MAX;

/// The image: its part (what the manifest says) and every chunk's bytes.
#[derive(Debug, Clone)]
pub struct ChaosImage {
    /// The chunks as the manifest lists them.
    pub part: Part,
    chunks: BTreeMap<ContentHash, Vec<u8>>,
    /// Each chunk's bytes, in order.
    ordered: Vec<Vec<u8>>,
}

impl ChaosImage {
    /// The run's image (the same in every run).
    pub fn new() -> Self {
        let mut chunks = BTreeMap::new();
        let mut ordered = Vec::with_capacity(CHUNKS);
        let mut references = Vec::with_capacity(CHUNKS);
        for index in 0..CHUNKS {
            let bytes: Vec<u8> = (0..CHUNK_BYTES)
                .map(|offset| {
                    ((index * CHUNK_BYTES + offset).wrapping_mul(2_654_435_761) >> 13) as u8
                })
                .collect();
            let hash = ContentHash::of(&bytes);
            references.push(ChunkRef {
                hash,
                length_bytes: CHUNK_BYTES as u32,
            });
            chunks.insert(hash, bytes.clone());
            ordered.push(bytes);
        }
        Self {
            part: Part {
                size_bytes: (CHUNKS * CHUNK_BYTES) as u64,
                chunks: references,
            },
            chunks,
            ordered,
        }
    }
}

impl ChaosImage {
    /// The true bytes of the chunk with `hash`.
    pub fn chunk(&self, hash: &ContentHash) -> Option<&[u8]> {
        self.chunks.get(hash).map(Vec::as_slice)
    }

    /// Where the chunk with `hash` sits in the image.
    pub fn index_of(&self, hash: &ContentHash) -> Option<usize> {
        self.part
            .chunks
            .iter()
            .position(|reference| reference.hash == *hash)
    }
}

impl Default for ChaosImage {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves the image's chunks until the host dies. While the harness has this server's disk
/// "corrupt", every chunk it serves has its first byte flipped.
pub async fn serve_chunks(server: u64, image: ChaosImage, shared: Shared) -> std::io::Result<()> {
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, CHUNK_PORT)).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let image = image.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut hash = [0u8; 32];
            if stream.read_exact(&mut hash).await.is_err() {
                return;
            }
            let answer = match image.chunks.get(&ContentHash(hash)) {
                Some(bytes) => {
                    let mut bytes = bytes.clone();
                    if lock(&shared).corrupt_servers.contains(&server)
                        && let Some(first) = bytes.first_mut()
                    {
                        *first ^= 0xff;
                    }
                    bytes
                }
                None => Vec::new(),
            };
            let length = if answer.is_empty() {
                NOT_FOUND
            } else {
                answer.len() as u32
            };
            if stream.write_all(&length.to_be_bytes()).await.is_ok()
                && stream.write_all(&answer).await.is_ok()
            {
                *lock(&shared).bytes_served.entry(server).or_default() += answer.len() as u64;
            }
        });
    }
}

/// Why one chunk request failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkRequestError {
    /// The server did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server has no such chunk (or no manifests: this image has none to fetch).
    #[error("not found")]
    NotFound,
}

/// Chunks from the servers over simulated TCP, one connection per request.
#[derive(Debug, Clone)]
pub struct TurmoilChunkTransport {
    /// The servers' host names.
    pub servers: Vec<String>,
}

impl TurmoilChunkTransport {
    async fn request(
        &self,
        source: usize,
        hash: &ContentHash,
    ) -> Result<Vec<u8>, ChunkRequestError> {
        let server = self
            .servers
            .get(source)
            .ok_or(ChunkRequestError::NotFound)?;
        let mut stream = turmoil::net::TcpStream::connect((server.as_str(), CHUNK_PORT)).await?;
        stream.write_all(&hash.0).await?;
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await?;
        let length = u32::from_be_bytes(length);
        if length == NOT_FOUND || length as usize > 4 * CHUNK_BYTES {
            return Err(ChunkRequestError::NotFound);
        }
        let mut bytes = vec![0u8; length as usize];
        stream.read_exact(&mut bytes).await?;
        Ok(bytes)
    }
}

impl ChunkTransport for TurmoilChunkTransport {
    type Error = ChunkRequestError;

    fn source_count(&self) -> usize {
        self.servers.len()
    }

    fn source_name(&self, source: usize) -> String {
        self.servers.get(source).cloned().unwrap_or_default()
    }

    async fn fetch_manifest(
        &self,
        _source: usize,
        _hash: &ContentHash,
    ) -> Result<Vec<u8>, Self::Error> {
        Err(ChunkRequestError::NotFound)
    }

    async fn fetch_chunk(&self, source: usize, hash: &ContentHash) -> Result<Vec<u8>, Self::Error> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request(source, hash))
            .await
            .map_err(|_| ChunkRequestError::Timeout(REQUEST_TIMEOUT))?
    }
}

/// A node's root image in RAM, as far as the checker cares: every chunk kept is compared with
/// the true bytes.
#[derive(Debug)]
pub struct CheckedSink {
    /// The node.
    pub node: usize,
    /// The true image.
    pub image: ChaosImage,
    /// Where violations go.
    pub shared: Shared,
    /// The run's trace.
    pub trace: Trace,
}

impl ChunkSink for CheckedSink {
    fn write_chunk(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        let index = usize::try_from(offset).unwrap_or(usize::MAX) / CHUNK_BYTES;
        let right = self
            .image
            .ordered
            .get(index)
            .is_some_and(|chunk| chunk == bytes);
        record_kept(self.node, index, right, &self.shared, &self.trace);
        Ok(())
    }
}

/// Node `node` kept chunk `index`: in the trace, and a violation unless its bytes are `right`.
pub fn record_kept(node: usize, index: usize, right: bool, shared: &Shared, trace: &Trace) {
    trace.record(format!(
        "node{node} kept chunk {index}{}",
        if right { "" } else { " WITH WRONG BYTES" }
    ));
    if !right {
        lock(shared).violations.push(format!(
            "{:.3} s: node{node} kept chunk {index} of its image with bytes that do not hash to the manifest's",
            turmoil::sim_elapsed().unwrap_or_default().as_secs_f64(),
        ));
    }
}
