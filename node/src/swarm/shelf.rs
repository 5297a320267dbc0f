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

    /// Makes every stored chunk durable (once, when a fetch completes: `store` need not
    /// flush each chunk, since a torn one fails verification and is fetched again).
    fn sync(&self) -> Result<(), SwarmError>;

    /// Whether the calls above may block on storage (so drivers make them off the async
    /// threads). A shelf in memory says no, and is called inline: in a simulation, work on
    /// tokio's blocking pool finishes on real time and would make a run depend on it.
    fn blocks(&self) -> bool {
        true
    }
}

/// Runs `work` on `shelf`: on the blocking pool if the shelf blocks, inline if not.
pub(crate) async fn on_shelf<T: Send + 'static>(
    shelf: Arc<dyn ChunkShelf>,
    work: impl FnOnce(&dyn ChunkShelf) -> T + Send + 'static,
) -> Result<T, SwarmError> {
    if shelf.blocks() {
        #[allow(
            clippy::disallowed_methods,
            reason = "the swarm's drivers run blocking storage off the async threads"
        )]
        tokio::task::spawn_blocking(move || work(shelf.as_ref()))
            .await
            .map_err(|error| SwarmError::Shelf(error.to_string()))
    } else {
        Ok(work(shelf.as_ref()))
    }
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
            .insert_chunk_deferred(chunk.hash, bytes)
            .map(|_| ())
            .map_err(|error| SwarmError::Shelf(error.to_string()))
    }

    fn holds(&self, chunk: &ChunkRef) -> bool {
        self.store.contains_chunk(&chunk.hash)
    }

    fn sync(&self) -> Result<(), SwarmError> {
        self.store
            .sync()
            .map_err(|error| SwarmError::Shelf(error.to_string()))
    }
}

/// A shelf that is the image itself: each part (kernel, initrd, root) assembled in one file,
/// every chunk written at each offset where the part has it. What a node boots from, with no
/// copy in a chunk store beside it; reads for serving are verified again, since the file is
/// plain bytes on disk (or in memory) that anything could have changed.
#[derive(Debug)]
pub struct AssembledShelf {
    files: Vec<std::fs::File>,
    /// Which part each file holds.
    parts: Vec<transfer::PartName>,
    /// Per chunk hash: (file, offset) of every place it occupies.
    placements: std::collections::HashMap<transfer::ContentHash, Vec<(usize, u64)>>,
    /// Chunks written since the files were created.
    stored: std::sync::Mutex<std::collections::HashSet<transfer::ContentHash>>,
}

impl AssembledShelf {
    /// Creates (truncating) one file per part of `manifest` in `directory`, named after the
    /// part (`kernel`, `initrd`, `root`), each at its full length.
    pub fn create(
        directory: &std::path::Path,
        manifest: &transfer::Manifest,
    ) -> Result<Self, SwarmError> {
        std::fs::create_dir_all(directory).map_err(|error| {
            SwarmError::Shelf(format!("create {}: {error}", directory.display()))
        })?;
        Self::with_files(manifest, |name| {
            let path = directory.join(name.as_str());
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|error| format!("create {}: {error}", path.display()))
        })
    }

    /// One sealable memory file per part of `manifest` (a booting node, whose disk is RAM),
    /// and a second descriptor of the root part's: the caller seals it once the fetch is
    /// complete and hands it to a loop device.
    pub fn in_memory(
        manifest: &transfer::Manifest,
    ) -> Result<(Self, Option<std::fs::File>), SwarmError> {
        use rustix::fs::MemfdFlags;
        let shelf = Self::with_files(manifest, |name| {
            rustix::fs::memfd_create(
                format!("bootmesh-{}", name.as_str()),
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )
            .map(std::fs::File::from)
            .map_err(|error| format!("memfd for the {}: {error}", name.as_str()))
        })?;
        let root = match shelf
            .parts
            .iter()
            .position(|name| *name == transfer::PartName::Root)
        {
            Some(index) => Some(
                shelf.files[index]
                    .try_clone()
                    .map_err(|error| SwarmError::Shelf(format!("the root's memfd: {error}")))?,
            ),
            None => None,
        };
        Ok((shelf, root))
    }

    fn with_files(
        manifest: &transfer::Manifest,
        mut open: impl FnMut(transfer::PartName) -> Result<std::fs::File, String>,
    ) -> Result<Self, SwarmError> {
        let mut files = Vec::new();
        let mut parts = Vec::new();
        let mut placements: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
        for name in transfer::PartName::ALL {
            let Some(part) = manifest.part(name) else {
                continue;
            };
            let file = open(name).map_err(SwarmError::Shelf)?;
            file.set_len(part.size_bytes).map_err(|error| {
                SwarmError::Shelf(format!("size the {}: {error}", name.as_str()))
            })?;
            let mut offset = 0u64;
            for chunk in &part.chunks {
                placements
                    .entry(chunk.hash)
                    .or_default()
                    .push((files.len(), offset));
                offset += u64::from(chunk.length_bytes);
            }
            files.push(file);
            parts.push(name);
        }
        Ok(Self {
            files,
            parts,
            placements,
            stored: std::sync::Mutex::default(),
        })
    }

    fn is_stored(&self, chunk: &ChunkRef) -> bool {
        self.stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&chunk.hash)
    }
}

impl ChunkShelf for AssembledShelf {
    fn read(&self, chunk: &ChunkRef) -> Result<Option<Arc<[u8]>>, SwarmError> {
        use std::os::unix::fs::FileExt;
        if !self.is_stored(chunk) {
            return Ok(None);
        }
        let Some(&(file, offset)) = self.placements.get(&chunk.hash).and_then(|at| at.first())
        else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; chunk.length_bytes as usize];
        self.files[file]
            .read_exact_at(&mut bytes, offset)
            .map_err(|error| SwarmError::Shelf(format!("read chunk {}: {error}", chunk.hash)))?;
        match transfer::verify_chunk(chunk, &bytes) {
            Ok(()) => Ok(Some(Arc::from(bytes))),
            Err(error) => {
                tracing::error!(%error, "an assembled image changed on disk; not serving the chunk");
                Ok(None)
            }
        }
    }

    fn store(&self, chunk: &ChunkRef, bytes: &[u8]) -> Result<(), SwarmError> {
        use std::os::unix::fs::FileExt;
        for &(file, offset) in self.placements.get(&chunk.hash).into_iter().flatten() {
            self.files[file]
                .write_all_at(bytes, offset)
                .map_err(|error| {
                    SwarmError::Shelf(format!("write chunk {}: {error}", chunk.hash))
                })?;
        }
        self.stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(chunk.hash);
        Ok(())
    }

    fn holds(&self, chunk: &ChunkRef) -> bool {
        self.is_stored(chunk)
    }

    fn sync(&self) -> Result<(), SwarmError> {
        for file in &self.files {
            file.sync_all()
                .map_err(|error| SwarmError::Shelf(format!("sync the assembled image: {error}")))?;
        }
        Ok(())
    }
}
