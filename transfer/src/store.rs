//! The chunk store on disk: content-addressed chunks and manifests under one directory.
//!
//! - `chunks/<first two hex digits>/<hash>`: a chunk, named by the blake3 of its bytes.
//! - `manifests/<hash>`: a manifest's rkyv bytes, named by their blake3.
//! - `catalog.json`: tags and group assignments ([`Catalog`]).
//! - `tmp/`: files being written; a crash leaves debris here, removed by the next writer
//!   (files of a process that still runs stay).
//! - `lock`: writers (import, rm, gc) hold an exclusive lock on it; readers take none.
//!
//! Every file is written to `tmp/`, synced, then renamed into place, so no reader ever sees a
//! torn chunk, even after kill -9 or power loss. A manifest is written only after the chunks
//! it names are durable. Chunks read from disk are hashed before use and kept in a bounded
//! cache of verified chunks, so every byte served has been verified since it was last read
//! from disk.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::catalog::Catalog;
use crate::hash::ContentHash;
use crate::manifest::{CHUNK_BYTES_LIMIT, MANIFEST_BYTES_MAX, Manifest, ManifestError};

/// Default bound on the verified-chunk cache.
pub const CHUNK_CACHE_BYTES_DEFAULT: usize = 256 * 1024 * 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such chunk on disk.
    #[error("chunk {hash} is not in the store")]
    ChunkMissing {
        /// The chunk asked for.
        hash: ContentHash,
    },
    /// A stored chunk whose bytes no longer hash to its name: disk corruption.
    #[error("chunk {expected} is corrupt on disk: its bytes hash to {actual}")]
    ChunkHashMismatch {
        /// The chunk's name.
        expected: ContentHash,
        /// What its bytes hash to now.
        actual: ContentHash,
    },
    /// No such manifest.
    #[error("image {hash} has no manifest in the store")]
    ManifestMissing {
        /// The manifest asked for.
        hash: ContentHash,
    },
    /// A stored manifest that fails validation.
    #[error("manifest {hash}: {error}")]
    Manifest {
        /// The manifest.
        hash: ContentHash,
        /// What is wrong.
        error: ManifestError,
    },
    /// The catalog file is unreadable.
    #[error("catalog {path}: {detail}")]
    Catalog {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A file system call failed.
    #[error("{context} {path}: {error}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

impl StoreError {
    /// True when stored bytes are corrupt (as opposed to missing or unreadable).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::ChunkHashMismatch { .. } | Self::Manifest { .. })
    }
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |error| StoreError::Io {
        context,
        path,
        error,
    }
}

/// What [`ChunkStore::insert_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new chunk.
    Written,
    /// The store already held these bytes (and they verified).
    AlreadyPresent,
    /// The store held a corrupt copy; it was replaced.
    Repaired,
}

/// Held while writing to the store; dropping it releases the lock.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Weighs cached chunks by their length, so the cache is bounded in bytes.
#[derive(Debug, Clone, Copy)]
struct ChunkBytes;

impl quick_cache::Weighter<ContentHash, Arc<[u8]>> for ChunkBytes {
    fn weight(&self, _hash: &ContentHash, bytes: &Arc<[u8]>) -> u64 {
        bytes.len() as u64
    }
}

/// The verified-chunk cache: bounded in bytes, and scan-resistant (quick_cache's CLOCK-Pro
/// style policy), because serving an image larger than the cache is a sequential scan, which
/// would leave a plain LRU with no hits at all. Hashing is keyed with fixed keys, so a run
/// evicts the same chunks every time.
type VerifiedCache = quick_cache::sync::Cache<
    ContentHash,
    Arc<[u8]>,
    ChunkBytes,
    std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>,
>;

/// Typical chunk size, for sizing the cache's tables.
const CHUNK_BYTES_TYPICAL: usize = 256 * 1024;

/// Content-addressed chunks and manifests in one directory.
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    cache: VerifiedCache,
    temp_counter: AtomicU64,
    /// Fan-out directories that received a chunk since the last [`sync`](Self::sync).
    unsynced_directories: Mutex<BTreeSet<String>>,
    /// Chunks were written without their own fsync since the last sync.
    deferred_writes: AtomicBool,
}

/// When a written file must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Before the write returns.
    Now,
    /// By the next [`ChunkStore::sync`].
    AtSync,
}

impl ChunkStore {
    /// Opens (creating if needed) the store at `root`, with a verified-chunk cache of at most
    /// `cache_bytes_max` bytes.
    pub fn open(root: &Path, cache_bytes_max: usize) -> Result<Self, StoreError> {
        for directory in ["chunks", "manifests", "pins", "tmp"] {
            let path = root.join(directory);
            fs::create_dir_all(&path).map_err(io_error("create", &path))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            cache: VerifiedCache::with(
                (cache_bytes_max / CHUNK_BYTES_TYPICAL).max(16),
                cache_bytes_max as u64,
                ChunkBytes,
                Default::default(),
                Default::default(),
            ),
            temp_counter: AtomicU64::new(0),
            unsynced_directories: Mutex::new(BTreeSet::new()),
            deferred_writes: AtomicBool::new(false),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the writers' lock (blocking until other writers finish) and clears debris that
    /// a crashed writer left in `tmp/`. A file that a living process is still writing stays:
    /// chunk and manifest writes name their process (`<name>.<pid>.<serial>`) and take no
    /// lock, so a server storing a chunk it fetched must not lose it to an import or a gc
    /// run beside it. Anything else in `tmp/` (an import's staging directory) was made under
    /// this lock, so its maker is gone.
    pub fn lock_for_writing(&self) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open", &path))?;
        file.lock().map_err(io_error("lock", &path))?;
        let temp = self.root.join("tmp");
        let entries = fs::read_dir(&temp).map_err(io_error("list", &temp))?;
        for entry in entries {
            let entry = entry.map_err(io_error("list", &temp))?;
            if written_by_a_living_process(&entry.file_name().to_string_lossy()) {
                continue;
            }
            let debris = entry.path();
            tracing::info!(path = %debris.display(), "removing what an interrupted write left");
            let removed = if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                fs::remove_dir_all(&debris)
            } else {
                fs::remove_file(&debris)
            };
            removed.map_err(io_error("remove", &debris))?;
        }
        Ok(StoreLock { _file: file })
    }

    fn chunk_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, hash: &ContentHash) -> PathBuf {
        self.root.join("manifests").join(hash.to_hex())
    }

    /// Writes `bytes` to a fresh file in `tmp/`, syncs it and renames it to `target`.
    /// The caller syncs `target`'s directory.
    fn write_atomically(
        &self,
        target: &Path,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<(), StoreError> {
        let serial = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let name = target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = self
            .root
            .join("tmp")
            .join(format!("{name}.{}.{serial}", std::process::id()));
        let mut file = File::create(&temp).map_err(io_error("create", &temp))?;
        file.write_all(bytes).map_err(io_error("write", &temp))?;
        match durability {
            Durability::Now => file.sync_all().map_err(io_error("sync", &temp))?,
            Durability::AtSync => self.deferred_writes.store(true, Ordering::Release),
        }
        drop(file);
        fs::rename(&temp, target).map_err(io_error("rename into place", target))?;
        Ok(())
    }

    /// Stores a chunk whose bytes hash to `hash` (checked here: a chunk is verified on write).
    /// Present chunks are re-read and verified; a corrupt copy is replaced. Call
    /// [`sync`](Self::sync) before publishing anything that names the chunk.
    pub fn insert_chunk(
        &self,
        hash: ContentHash,
        bytes: &[u8],
    ) -> Result<InsertOutcome, StoreError> {
        self.insert_chunk_with(hash, bytes, Durability::Now)
    }

    /// [`insert_chunk`](Self::insert_chunk) without an fsync of its own: the chunk is durable
    /// after the next [`sync`](Self::sync), which flushes the whole file system once. For
    /// fetches of many chunks, where one flush at the end replaces one per chunk; a chunk torn
    /// by a crash before that is refused by the verification of every load, and fetched again.
    pub fn insert_chunk_deferred(
        &self,
        hash: ContentHash,
        bytes: &[u8],
    ) -> Result<InsertOutcome, StoreError> {
        self.insert_chunk_with(hash, bytes, Durability::AtSync)
    }

    fn insert_chunk_with(
        &self,
        hash: ContentHash,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<InsertOutcome, StoreError> {
        let actual = ContentHash::of(bytes);
        if actual != hash {
            return Err(StoreError::ChunkHashMismatch {
                expected: hash,
                actual,
            });
        }
        let path = self.chunk_path(&hash);
        let outcome = match self.read_verified_from_disk(&hash) {
            Ok(_) => return Ok(InsertOutcome::AlreadyPresent),
            Err(StoreError::ChunkMissing { .. }) => InsertOutcome::Written,
            Err(StoreError::ChunkHashMismatch { .. }) => {
                tracing::warn!(chunk = %hash, "replacing a corrupt stored chunk with good bytes");
                InsertOutcome::Repaired
            }
            Err(error) => return Err(error),
        };
        let directory = path.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&directory).map_err(io_error("create", &directory))?;
        self.write_atomically(&path, bytes, durability)?;
        self.lock_unsynced().insert(hash.to_hex()[..2].to_owned());
        self.cache.remove(&hash);
        Ok(outcome)
    }

    fn lock_unsynced(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.unsynced_directories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes every chunk inserted so far durable (syncs the directories they were renamed
    /// into).
    pub fn sync(&self) -> Result<(), StoreError> {
        if self.deferred_writes.swap(false, Ordering::AcqRel) {
            let root = File::open(&self.root).map_err(io_error("open", &self.root))?;
            rustix::fs::syncfs(&root).map_err(|error| StoreError::Io {
                context: "syncfs",
                path: self.root.clone(),
                error: error.into(),
            })?;
        }
        let directories = std::mem::take(&mut *self.lock_unsynced());
        for directory in directories {
            sync_directory(&self.root.join("chunks").join(directory))?;
        }
        sync_directory(&self.root.join("chunks"))
    }

    /// True if a chunk file with this name exists (not verified).
    pub fn contains_chunk(&self, hash: &ContentHash) -> bool {
        self.chunk_path(hash).is_file()
    }

    /// Reads a chunk from disk, bypassing the cache, and verifies it.
    pub fn read_verified_from_disk(&self, hash: &ContentHash) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_path(hash);
        let bytes = match read_bounded(&path, CHUNK_BYTES_LIMIT as usize) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(StoreError::ChunkMissing { hash: *hash });
            }
            Err(error) => return Err(io_error("read", &path)(error)),
        };
        let actual = ContentHash::of(&bytes);
        if actual != *hash {
            return Err(StoreError::ChunkHashMismatch {
                expected: *hash,
                actual,
            });
        }
        Ok(bytes)
    }

    /// A verified chunk: from the cache, or read from disk, verified and cached. A corrupt
    /// chunk is an error (and logged); its bytes are never returned.
    pub fn read_chunk(&self, hash: &ContentHash) -> Result<Arc<[u8]>, StoreError> {
        if let Some(bytes) = self.cache.get(hash) {
            return Ok(bytes);
        }
        let bytes: Arc<[u8]> = match self.read_verified_from_disk(hash) {
            Ok(bytes) => bytes.into(),
            Err(error) => {
                if error.is_corruption() {
                    tracing::error!(chunk = %hash, %error, "corrupt chunk refused");
                }
                return Err(error);
            }
        };
        self.cache.insert(*hash, Arc::clone(&bytes));
        Ok(bytes)
    }

    /// Every chunk file's name (unverified), sorted.
    pub fn list_chunks(&self) -> Result<Vec<ContentHash>, StoreError> {
        let chunks = self.root.join("chunks");
        let mut hashes = Vec::new();
        for fan_out in fs::read_dir(&chunks).map_err(io_error("list", &chunks))? {
            let fan_out = fan_out.map_err(io_error("list", &chunks))?.path();
            if fan_out.is_dir() {
                hashes.extend(hashes_named_in(&fan_out)?);
            }
        }
        hashes.sort();
        Ok(hashes)
    }

    /// Removes a chunk; returns the bytes freed.
    pub fn remove_chunk(&self, hash: &ContentHash) -> Result<u64, StoreError> {
        let path = self.chunk_path(hash);
        let length = fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(io_error("remove", &path)(error)),
        }
        self.cache.remove(hash);
        Ok(length)
    }

    /// Removes the fan-out directory of `hash` if it is empty (after a failed import).
    pub fn remove_empty_fan_out(&self, hash: &ContentHash) {
        if let Some(directory) = self.chunk_path(hash).parent() {
            let _ = fs::remove_dir(directory);
        }
    }

    /// Removes every empty fan-out directory (what interrupted imports leave); returns how
    /// many.
    pub fn remove_empty_fan_outs(&self) -> Result<u64, StoreError> {
        let chunks = self.root.join("chunks");
        let mut removed = 0;
        for fan_out in fs::read_dir(&chunks).map_err(io_error("list", &chunks))? {
            let fan_out = fan_out.map_err(io_error("list", &chunks))?.path();
            // Fails on a non-empty directory, which is what should stay.
            if fan_out.is_dir() && fs::remove_dir(&fan_out).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Stores a manifest (after [`sync`](Self::sync) made its chunks durable) and returns its
    /// hash.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<ContentHash, StoreError> {
        let (hash, bytes) = manifest.identity().map_err(|error| StoreError::Manifest {
            hash: ContentHash([0; 32]),
            error,
        })?;
        let path = self.manifest_path(&hash);
        if !path.is_file() {
            self.write_atomically(&path, &bytes, Durability::Now)?;
            sync_directory(&self.root.join("manifests"))?;
        }
        Ok(hash)
    }

    /// Reads and validates a manifest by hash.
    pub fn manifest(&self, hash: &ContentHash) -> Result<Manifest, StoreError> {
        let path = self.manifest_path(hash);
        let bytes = match read_bounded(&path, MANIFEST_BYTES_MAX) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(StoreError::ManifestMissing { hash: *hash });
            }
            Err(error) => return Err(io_error("read", &path)(error)),
        };
        Manifest::decode_expecting(&bytes, *hash)
            .map_err(|error| StoreError::Manifest { hash: *hash, error })
    }

    /// The raw bytes of a stored manifest (verified against its name), for peers.
    pub fn manifest_bytes(&self, hash: &ContentHash) -> Result<Vec<u8>, StoreError> {
        self.manifest(hash)?;
        let path = self.manifest_path(hash);
        read_bounded(&path, MANIFEST_BYTES_MAX).map_err(io_error("read", &path))
    }

    /// Every stored manifest's hash, sorted.
    pub fn list_manifests(&self) -> Result<Vec<ContentHash>, StoreError> {
        let mut hashes = hashes_named_in(&self.root.join("manifests"))?;
        hashes.sort();
        Ok(hashes)
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, hash: &ContentHash) -> Result<(), StoreError> {
        let path = self.manifest_path(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }

    /// Keeps the manifest `hash` and every chunk it names from garbage collection although no
    /// tag names it yet: a fetch of it is under way (a server following the cluster's
    /// catalog). Taken under the writers' lock, so a collection either finished before the
    /// pin or sees it.
    pub fn pin_manifest(&self, hash: &ContentHash, _lock: &StoreLock) -> Result<(), StoreError> {
        let path = self.root.join("pins").join(hash.to_hex());
        File::create(&path).map_err(io_error("create", &path))?;
        Ok(())
    }

    /// Ends a [`pin_manifest`](Self::pin_manifest) (an absent pin is no error).
    pub fn unpin_manifest(&self, hash: &ContentHash) -> Result<(), StoreError> {
        let path = self.root.join("pins").join(hash.to_hex());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }

    /// The pinned manifests, sorted (a store from before pins existed has none).
    pub fn pinned_manifests(&self) -> Result<Vec<ContentHash>, StoreError> {
        let directory = self.root.join("pins");
        if !directory.is_dir() {
            return Ok(Vec::new());
        }
        let mut hashes = hashes_named_in(&directory)?;
        hashes.sort();
        Ok(hashes)
    }

    /// The catalog (empty if none was written yet).
    pub fn catalog(&self) -> Result<Catalog, StoreError> {
        let path = self.root.join("catalog.json");
        match fs::read(&path) {
            Ok(bytes) => Catalog::from_json(&bytes).map_err(|detail| StoreError::Catalog {
                path: path.clone(),
                detail,
            }),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(Catalog::default()),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    /// Replaces the catalog atomically. Hold the [`StoreLock`] across read-modify-write.
    pub fn write_catalog(&self, catalog: &Catalog, _lock: &StoreLock) -> Result<(), StoreError> {
        let path = self.root.join("catalog.json");
        let bytes = catalog.to_json().map_err(|detail| StoreError::Catalog {
            path: path.clone(),
            detail,
        })?;
        self.write_atomically(&path, &bytes, Durability::Now)?;
        sync_directory(&self.root)
    }
}

/// The files in `directory` whose names are content hashes (anything else is ignored).
fn hashes_named_in(directory: &Path) -> Result<Vec<ContentHash>, StoreError> {
    let mut hashes = Vec::new();
    for entry in fs::read_dir(directory).map_err(io_error("list", directory))? {
        let entry = entry.map_err(io_error("list", directory))?;
        if let Some(hash) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        {
            hashes.push(hash);
        }
    }
    Ok(hashes)
}

fn sync_directory(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error("sync directory", path))
}

/// Reads a whole file, refusing files longer than `bytes_max` (a corrupt or planted file must
/// not make us allocate without bound).
fn read_bounded(path: &Path, bytes_max: usize) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let length = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if length > bytes_max {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("{length} bytes is more than the {bytes_max}-byte limit"),
        ));
    }
    let mut bytes = Vec::with_capacity(length);
    file.take(bytes_max as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether a `tmp/` entry's name is `<name>.<pid>.<serial>` with a process that still runs.
/// A pid reused since a crash keeps that debris until the new process ends: a file left
/// over, never a write lost.
fn written_by_a_living_process(name: &str) -> bool {
    let mut parts = name.rsplitn(3, '.');
    let (Some(serial), Some(pid), Some(_target)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if serial.parse::<u64>().is_err() {
        return false;
    }
    match pid.parse::<u32>() {
        Ok(pid) => Path::new("/proc").join(pid.to_string()).exists(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkRef, MANIFEST_FORMAT_VERSION, Part, RootImage};
    use crate::reader::PartReader;
    use crate::verity::VerityParameters;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn flip_first_byte(path: &Path) -> TestResult {
        let mut bytes = fs::read(path)?;
        bytes[0] ^= 0xff;
        fs::write(path, bytes)?;
        Ok(())
    }

    #[test]
    fn chunks_are_verified_on_write_and_on_every_load_from_disk() -> TestResult {
        let directory = tempfile::tempdir()?;
        let store = ChunkStore::open(directory.path(), 1024)?;
        let bytes = b"a chunk of an image".to_vec();
        let hash = ContentHash::of(&bytes);
        // Wrong name: refused.
        assert!(matches!(
            store.insert_chunk(ContentHash::of(b"other"), &bytes),
            Err(StoreError::ChunkHashMismatch { .. })
        ));
        assert_eq!(store.insert_chunk(hash, &bytes)?, InsertOutcome::Written);
        assert_eq!(
            store.insert_chunk(hash, &bytes)?,
            InsertOutcome::AlreadyPresent
        );
        store.sync()?;
        assert_eq!(&*store.read_chunk(&hash)?, bytes.as_slice());
        assert_eq!(store.list_chunks()?, vec![hash]);

        // Corrupt it on disk: a fresh store (empty cache) refuses it, and so does a scrub.
        flip_first_byte(&store.chunk_path(&hash))?;
        let reopened = ChunkStore::open(directory.path(), 1024)?;
        let error = reopened.read_chunk(&hash).err();
        assert!(
            matches!(error, Some(StoreError::ChunkHashMismatch { .. })),
            "{error:?}"
        );
        assert!(error.is_some_and(|error| error.is_corruption()));
        assert!(reopened.read_verified_from_disk(&hash).is_err());
        // Inserting the good bytes again repairs it.
        assert_eq!(
            reopened.insert_chunk(hash, &bytes)?,
            InsertOutcome::Repaired
        );
        assert_eq!(&*reopened.read_chunk(&hash)?, bytes.as_slice());

        assert_eq!(reopened.remove_chunk(&hash)?, bytes.len() as u64);
        assert!(matches!(
            reopened.read_chunk(&hash),
            Err(StoreError::ChunkMissing { .. })
        ));
        Ok(())
    }

    #[test]
    fn the_cache_stays_within_its_bound() -> TestResult {
        let directory = tempfile::tempdir()?;
        let store = ChunkStore::open(directory.path(), 250)?;
        for index in 0..10u8 {
            let bytes = vec![index; 100];
            let hash = ContentHash::of(&bytes);
            store.insert_chunk(hash, &bytes)?;
            store.read_chunk(&hash)?;
            assert!(store.cache.weight() <= 250);
        }
        assert!(store.cache.len() <= 2);
        Ok(())
    }

    #[test]
    fn debris_of_interrupted_writes_is_cleared_by_the_next_writer_and_live_writes_stay()
    -> TestResult {
        let directory = tempfile::tempdir()?;
        let store = ChunkStore::open(directory.path(), 1024)?;
        // A pid above the kernel's largest (2^22): no process has it.
        let debris = directory
            .path()
            .join("tmp")
            .join("half-written.999999999.0");
        fs::write(&debris, b"torn")?;
        // A file this process is writing, as a fetch that stores a chunk does beside a gc.
        let in_progress = directory.path().join("tmp").join(format!(
            "{}.{}.7",
            "ab".repeat(32),
            std::process::id()
        ));
        fs::write(&in_progress, b"half")?;
        fs::create_dir_all(
            directory
                .path()
                .join("tmp")
                .join("import.abc")
                .join("rootfs"),
        )?;
        let _lock = store.lock_for_writing()?;
        assert!(!debris.exists());
        assert!(in_progress.exists());
        assert_eq!(fs::read_dir(directory.path().join("tmp"))?.count(), 1);
        Ok(())
    }

    #[test]
    fn chunks_written_without_their_own_flush_read_back_and_are_flushed_by_sync() -> TestResult {
        let directory = tempfile::tempdir()?;
        let store = ChunkStore::open(directory.path(), 1 << 20)?;
        let bytes = vec![9u8; 5000];
        let hash = ContentHash::of(&bytes);
        assert_eq!(
            store.insert_chunk_deferred(hash, &bytes)?,
            InsertOutcome::Written
        );
        assert!(store.deferred_writes.load(Ordering::Acquire));
        assert_eq!(&*store.read_chunk(&hash)?, &bytes[..]);
        store.sync()?;
        assert!(!store.deferred_writes.load(Ordering::Acquire));
        // Wrong bytes are refused the same way as by insert_chunk.
        assert!(matches!(
            store.insert_chunk_deferred(hash, &bytes[1..]),
            Err(StoreError::ChunkHashMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn manifests_and_parts_read_back() -> TestResult {
        let directory = tempfile::tempdir()?;
        let store = Arc::new(ChunkStore::open(directory.path(), 1 << 20)?);
        let pieces: Vec<Vec<u8>> = vec![vec![1; 4000], vec![2; 96], vec![3; 4096]];
        let mut part = Part::default();
        for piece in &pieces {
            let hash = ContentHash::of(piece);
            store.insert_chunk(hash, piece)?;
            part.chunks.push(ChunkRef {
                hash,
                length_bytes: piece.len() as u32,
            });
            part.size_bytes += piece.len() as u64;
        }
        store.sync()?;
        let manifest = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            name: "node".into(),
            tag: "v1".into(),
            created_unix_secs: 1,
            cmdline: "console=ttyS0".into(),
            kernel: None,
            initrd: None,
            root: RootImage {
                part: part.clone(),
                squashfs_bytes: 4096,
                verity: VerityParameters {
                    algorithm: "sha256".into(),
                    data_block_bytes: 4096,
                    hash_block_bytes: 4096,
                    data_blocks: 1,
                    hash_offset_bytes: 4096,
                    salt: vec![1; 32],
                    root_hash: [0; 32],
                },
            },
        };
        let hash = store.put_manifest(&manifest)?;
        assert_eq!(store.manifest(&hash)?, manifest);
        assert_eq!(store.list_manifests()?, vec![hash]);
        assert_eq!(ContentHash::of(&store.manifest_bytes(&hash)?), hash);

        let reader = PartReader::new(Arc::clone(&store), &part);
        let mut buffer = vec![0u8; 200];
        assert_eq!(reader.read_at(3950, &mut buffer)?, 200);
        assert_eq!(&buffer[..50], &[1; 50]);
        assert_eq!(&buffer[50..146], &[2; 96]);
        assert_eq!(&buffer[146..], &[3; 54]);
        assert_eq!(reader.read_at(8100, &mut buffer)?, 92);
        assert_eq!(reader.read_at(8192, &mut buffer)?, 0);

        // A corrupt manifest file is refused by name.
        flip_first_byte(&store.manifest_path(&hash))?;
        assert!(matches!(
            store.manifest(&hash),
            Err(StoreError::Manifest { .. })
        ));
        Ok(())
    }
}
