//! Images as content-addressed chunks: blake3 chunk and manifest hashes, content-defined
//! chunking, rkyv manifests read only through validated access, dm-verity trees, the catalog,
//! and the on-disk chunk store that verifies every chunk it loads.
//!
//! Never here: sockets, runtimes, clocks or randomness. The chunk store reads and writes
//! files (it is the disk); everything else is plain computation. The peer-to-peer exchange
//! is in `swarm`: its messages and its fetch scheduler, driven from outside.

pub mod catalog;
pub mod chunker;
pub mod hash;
pub mod index;
pub mod manifest;
pub mod reader;
pub mod reference;
pub mod store;
pub mod swarm;
pub mod transport;
pub mod verity;

pub use catalog::{Catalog, CatalogError};
pub use chunker::{ChunkingParameters, chunk_reader};
pub use hash::ContentHash;
pub use index::PartIndex;
pub use manifest::{ChunkRef, Manifest, ManifestError, Part, PartName, RootImage};
pub use reader::PartReader;
pub use reference::ImageReference;
pub use store::{ChunkStore, InsertOutcome, StoreError, StoreLock};
pub use transport::{ChunkTransport, ChunkVerifyError, verify_chunk};
pub use verity::VerityParameters;
