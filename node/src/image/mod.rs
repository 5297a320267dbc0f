//! Images on a boot server: `bootmesh image import | list | show | rm | export | verify | gc |
//! promote | rollback`, over the chunk store of `transfer`.
//!
//! Import turns a source (docker save, OCI, rootfs, squashfs) into a reproducible root
//! squashfs with a dm-verity tree, cuts kernel, initrd and root into content-defined chunks,
//! stores the chunks (verified, atomically) and then the manifest, and finally tags it. It
//! works in a staging directory inside the store's `tmp/`, under the store's writer lock;
//! whatever fails, the store is left as it was: staged files go with the staging directory
//! and chunks this import added are removed again.

pub mod layers;
pub mod source;
pub mod squashfs;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use transfer::catalog::CatalogError;
use transfer::chunker::ChunkingError;
use transfer::manifest::MANIFEST_FORMAT_VERSION;
use transfer::reference::ReferenceError;
use transfer::verity::{VerityError, build_hash_tree};
use transfer::{
    ChunkStore, ChunkingParameters, ContentHash, ImageReference, InsertOutcome, Manifest,
    ManifestError, Part, PartName, PartReader, RootImage, StoreError, chunk_reader,
};

use self::source::SourceKind;
use self::squashfs::SquashfsLayout;

/// Why an image command failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The source is not a well-formed image (truncated, corrupt, unsupported).
    #[error("{0}")]
    Malformed(String),
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
    /// An external tool failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// Which tool.
        tool: &'static str,
        /// Its complaint.
        detail: String,
    },
    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest could not be made or read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The catalog refused a change.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A bad `name:tag`.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The verity tree could not be built.
    #[error(transparent)]
    Verity(#[from] VerityError),
    /// Nothing by that name.
    #[error("no image {0} in the catalog")]
    NotFound(String),
    /// A flag combination that cannot work.
    #[error("{0}")]
    Usage(String),
    /// The bootmesh initramfs could not be built.
    #[error("bootmesh initramfs: {0}")]
    Initramfs(#[from] crate::initramfs_builder::InitramfsError),
}

/// Longest reason kept in a [`ImageError::Malformed`].
const REASON_CHARS_MAX: usize = 300;

impl ImageError {
    /// A malformed-source error whose text is safe to print: parsers quote the bytes they choke
    /// on, and a hostile archive must not get control characters or escape sequences onto the
    /// operator's terminal. Control characters become `?`, and the text is one bounded line.
    pub fn malformed(detail: impl Into<String>) -> Self {
        let detail: String = detail.into();
        let mut printable: String = detail
            .chars()
            .map(|character| {
                if character.is_control() {
                    '?'
                } else {
                    character
                }
            })
            .take(REASON_CHARS_MAX)
            .collect();
        if detail.chars().count() > REASON_CHARS_MAX {
            printable.push_str("...");
        }
        Self::Malformed(printable)
    }

    /// An I/O error mapper with context.
    pub fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |error| Self::Io {
            context,
            path,
            error,
        }
    }
}

/// Where the bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSource {
    /// A file or directory.
    Path(PathBuf),
    /// Standard input (a `docker save` stream, a tarball, a squashfs).
    Stdin,
}

/// What to import and how.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The tag to create or move.
    pub reference: ImageReference,
    /// The source.
    pub source: ImportSource,
    /// Kernel file to use instead of the tree's `/boot`.
    pub kernel: Option<PathBuf>,
    /// Initrd file to use instead of the tree's `/boot`.
    pub initrd: Option<PathBuf>,
    /// Default kernel command line.
    pub cmdline: String,
    /// Creation time to record instead of the source's own.
    pub created_unix_secs: Option<u64>,
    /// Squashfs layout.
    pub layout: SquashfsLayout,
    /// Chunk sizes.
    pub chunking: ChunkingParameters,
    /// The static agent: when given (and no `initrd`), the image's initrd is the bootmesh
    /// initramfs built from it and the image's own kernel modules.
    pub agent: Option<PathBuf>,
    /// Kernel modules for the bootmesh initramfs beyond the required and NIC ones.
    pub extra_modules: Vec<String>,
}

/// Progress reporting for long imports (the CLI draws bars; tests ignore it).
pub trait ImportProgress {
    /// A new phase begins; `total_bytes` if known.
    fn phase(&self, name: &str, total_bytes: Option<u64>);
    /// Bytes done in the current phase.
    fn advance(&self, bytes: u64);
    /// The current phase ended.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ImportProgress for NoProgress {
    fn phase(&self, _name: &str, _total_bytes: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// `name:tag`.
    pub reference: String,
    /// The manifest hash: the image's identity.
    pub manifest_hash: ContentHash,
    /// What kind of source it was.
    pub source_kind: &'static str,
    /// The squashfs.
    pub squashfs_bytes: u64,
    /// Squashfs + verity tree.
    pub root_bytes: u64,
    /// Kernel length, if any.
    pub kernel_bytes: Option<u64>,
    /// Initrd length, if any.
    pub initrd_bytes: Option<u64>,
    /// Distinct chunks the image is made of.
    pub chunks: u64,
    /// Of those, chunks the store held already.
    pub chunks_reused: u64,
    /// Bytes newly written to the store.
    pub bytes_written: u64,
    /// The verity root hash (hex).
    pub verity_root_hash: String,
    /// The tag named another image before.
    pub replaced: Option<ContentHash>,
}

/// Verified chunks a command-line run (export, verify) keeps in memory: it reads each chunk
/// once, so a cache would only hold memory.
const CLI_CHUNK_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The store of a server whose state directory is `state_dir`, for command-line use.
pub fn open_store(state_dir: &Path) -> Result<ChunkStore, ImageError> {
    open_store_with_cache(state_dir, CLI_CHUNK_CACHE_BYTES)
}

/// The store of a server, with a verified-chunk cache of `cache_bytes`.
pub fn open_store_with_cache(
    state_dir: &Path,
    cache_bytes: usize,
) -> Result<ChunkStore, ImageError> {
    Ok(ChunkStore::open(&state_dir.join("images"), cache_bytes)?)
}

/// Chunks written by an import in progress, removed again if it fails.
struct WrittenChunks<'a> {
    store: &'a ChunkStore,
    written: Vec<ContentHash>,
    chunks_reused: u64,
    bytes_written: u64,
    committed: bool,
}

/// What the chunk writer did.
#[derive(Debug, Default)]
struct WriterTally {
    written: Vec<ContentHash>,
    chunks_reused: u64,
    bytes_written: u64,
    failure: Option<StoreError>,
}

/// Chunks queued for the writer thread (at most this many wait, each at most 1 MiB).
const CHUNK_QUEUE_MAX: usize = 8;

/// The chunking side of the pipeline: hands each distinct chunk to the writer thread, which
/// stores it (a verify-or-write and an fsync per chunk) while the next chunks are cut and
/// hashed on this thread.
struct ChunkSender {
    sender: std::sync::mpsc::SyncSender<(ContentHash, Vec<u8>)>,
    seen: HashSet<ContentHash>,
}

/// Sending failed because the writer stopped (on a store error, reported by its tally).
#[derive(Debug, thiserror::Error)]
#[error("the chunk writer stopped")]
struct WriterStopped;

impl ChunkSender {
    fn submit(&mut self, hash: ContentHash, bytes: &[u8]) -> Result<(), WriterStopped> {
        if !self.seen.insert(hash) {
            return Ok(());
        }
        self.sender
            .send((hash, bytes.to_vec()))
            .map_err(|_| WriterStopped)
    }
}

/// The writer thread's loop.
fn write_chunks(
    store: &ChunkStore,
    queue: std::sync::mpsc::Receiver<(ContentHash, Vec<u8>)>,
) -> WriterTally {
    let mut tally = WriterTally::default();
    for (hash, bytes) in queue {
        match store.insert_chunk(hash, &bytes) {
            Ok(InsertOutcome::Written) => {
                tally.written.push(hash);
                tally.bytes_written += bytes.len() as u64;
            }
            Ok(InsertOutcome::AlreadyPresent) => tally.chunks_reused += 1,
            Ok(InsertOutcome::Repaired) => tally.bytes_written += bytes.len() as u64,
            Err(error) => {
                tally.failure = Some(error);
                break;
            }
        }
    }
    tally
}

impl Drop for WrittenChunks<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for hash in &self.written {
            if let Err(error) = self.store.remove_chunk(hash) {
                tracing::warn!(chunk = %hash, %error, "could not remove a chunk of a failed import");
            }
        }
        // Fan-out directories this import created are empty again; other ones still hold
        // chunks and stay (removing a non-empty directory fails, harmlessly).
        for hash in &self.written {
            self.store.remove_empty_fan_out(hash);
        }
    }
}

/// A reader that reports progress.
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn ImportProgress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.progress.advance(count as u64);
        Ok(count)
    }
}

fn chunk_file(
    path: &Path,
    chunking: ChunkingParameters,
    chunks: &mut ChunkSender,
    progress: &dyn ImportProgress,
) -> Result<Part, ImageError> {
    let file = File::open(path).map_err(ImageError::io("open", path))?;
    chunk_stream(file, chunking, chunks, progress)
}

fn chunk_stream(
    reader: impl Read,
    chunking: ChunkingParameters,
    chunks: &mut ChunkSender,
    progress: &dyn ImportProgress,
) -> Result<Part, ImageError> {
    let reader = std::io::BufReader::with_capacity(
        1024 * 1024,
        Counting {
            inner: reader,
            progress,
        },
    );
    chunk_reader(reader, chunking, |hash, bytes| chunks.submit(hash, bytes)).map_err(|error| {
        match error {
            ChunkingError::Read(detail) => {
                ImageError::malformed(format!("reading image data: {detail}"))
            }
            // The writer's own error replaces this one once it is joined.
            ChunkingError::Consumer(stopped) => ImageError::Usage(stopped.to_string()),
        }
    })
}

/// Kernel, initrd and root device, chunked in that order.
fn chunk_parts(
    chunks: &mut ChunkSender,
    chunking: ChunkingParameters,
    progress: &dyn ImportProgress,
    boot_files: [Option<&Path>; 2],
    squashfs_path: &Path,
    padding_bytes: u64,
    tree_path: &Path,
) -> Result<(Option<Part>, Option<Part>, Part), ImageError> {
    let [kernel_path, initrd_path] = boot_files;
    let mut boot_parts = [None, None];
    for ((path, label), slot) in [
        (kernel_path, "chunking kernel"),
        (initrd_path, "chunking initrd"),
    ]
    .into_iter()
    .zip(boot_parts.iter_mut())
    {
        if let Some(path) = path {
            progress.phase(label, fs::metadata(path).ok().map(|m| m.len()));
            *slot = Some(chunk_file(path, chunking, chunks, progress)?);
            progress.finish();
        }
    }
    let squashfs_data = File::open(squashfs_path).map_err(ImageError::io("open", squashfs_path))?;
    let tree_data = File::open(tree_path).map_err(ImageError::io("open", tree_path))?;
    let squashfs_bytes = squashfs_data
        .metadata()
        .map_err(ImageError::io("inspect", squashfs_path))?
        .len();
    let tree_bytes = tree_data
        .metadata()
        .map_err(ImageError::io("inspect", tree_path))?
        .len();
    progress.phase(
        "chunking root image",
        Some(squashfs_bytes + padding_bytes + tree_bytes),
    );
    let root_stream = squashfs_data
        .chain(std::io::repeat(0).take(padding_bytes))
        .chain(tree_data);
    let root = chunk_stream(root_stream, chunking, chunks, progress)?;
    progress.finish();
    let [kernel, initrd] = boot_parts;
    Ok((kernel, initrd, root))
}

/// Imports an image (see the module documentation).
pub fn import(
    store: &ChunkStore,
    options: &ImportOptions,
    progress: &dyn ImportProgress,
) -> Result<ImportSummary, ImageError> {
    let lock = store.lock_for_writing()?;
    let staging = tempfile::Builder::new()
        .prefix("import.")
        .tempdir_in(store.root().join("tmp"))
        .map_err(ImageError::io("create staging directory in", store.root()))?;
    let staging_path = staging.path().to_path_buf();

    let source_path = match &options.source {
        ImportSource::Path(path) => path.clone(),
        ImportSource::Stdin => {
            let spooled = staging_path.join("stdin");
            progress.phase("reading standard input", None);
            let mut file = File::create(&spooled).map_err(ImageError::io("create", &spooled))?;
            let mut stdin = Counting {
                inner: std::io::stdin().lock(),
                progress,
            };
            std::io::copy(&mut stdin, &mut file)
                .map_err(ImageError::io("spool standard input to", &spooled))?;
            progress.finish();
            spooled
        }
    };
    // Flags naming files are checked before the long work, not after it.
    for (flag, path) in [("--kernel", &options.kernel), ("--initrd", &options.initrd)] {
        if let Some(path) = path
            && !path.is_file()
        {
            return Err(ImageError::Usage(format!(
                "{flag} {} is not a file",
                path.display()
            )));
        }
    }
    let kind = source::detect(&source_path)?;
    tracing::info!(source = %source_path.display(), kind = kind.describe(), "importing");

    // The root tree (for sources that are trees) and the squashfs.
    let mut squashfs_path: Option<PathBuf> = None;
    let mut tree: Option<PathBuf> = None;
    let mut created = options.created_unix_secs;
    match &kind {
        SourceKind::Squashfs(path) => {
            squashfs::validate_squashfs(path)?;
            squashfs_path = Some(path.clone());
            if created.is_none() {
                created = Some(squashfs::squashfs_mkfs_time(path)?);
            }
        }
        SourceKind::RootfsDirectory(path) => tree = Some(path.clone()),
        SourceKind::RootfsTarball(path) => {
            let root = staging_path.join("rootfs");
            fs::create_dir_all(&root).map_err(ImageError::io("create", &root))?;
            progress.phase("unpacking rootfs tarball", None);
            let mut statistics = layers::LayerStatistics::default();
            layers::apply_layer(source::open_maybe_compressed(path)?, &root, &mut statistics)?;
            progress.finish();
            tree = Some(root);
        }
        SourceKind::DockerArchive(path) | SourceKind::OciLayout(path) => {
            let layout_root = if path.is_dir() {
                path.clone()
            } else {
                let unpacked = staging_path.join("archive");
                progress.phase("unpacking image archive", None);
                source::unpack_image_archive(path, &unpacked)?;
                progress.finish();
                unpacked
            };
            let image_layers = if matches!(kind, SourceKind::OciLayout(_)) {
                source::oci_layers(&layout_root)?
            } else {
                source::docker_layers(&layout_root)?
            };
            let total: u64 = image_layers
                .layers
                .iter()
                .filter_map(|layer| fs::metadata(&layer.path).ok())
                .map(|metadata| metadata.len())
                .sum();
            let root = staging_path.join("rootfs");
            progress.phase("applying layers", Some(total));
            let statistics =
                source::apply_layers(&image_layers, &root, |_, length| progress.advance(length))?;
            progress.finish();
            tracing::info!(
                layers = image_layers.layers.len(),
                entries = statistics.entries,
                whiteouts = statistics.whiteouts,
                opaque = statistics.opaque_directories,
                "layers applied"
            );
            if created.is_none() {
                created = image_layers.created_unix_secs;
            }
            tree = Some(root);
        }
    }
    if let Some(tree) = &tree {
        if created.is_none() {
            created = Some(newest_file_time(tree)?);
        }
        let output = staging_path.join("root.squashfs");
        progress.phase("mksquashfs", None);
        squashfs::build_squashfs(tree, &output, created.unwrap_or(0), options.layout)?;
        progress.finish();
        squashfs_path = Some(output);
    }
    let squashfs_path = squashfs_path
        .ok_or_else(|| ImageError::Usage("the source gave no root image".to_owned()))?;
    let created_unix_secs = created.unwrap_or(0);

    // Kernel and initrd: flags, else the tree's /boot.
    let (found_kernel, found_initrd) = match &tree {
        Some(tree) => find_boot_files(tree),
        None => (None, None),
    };
    let kernel_path = options.kernel.clone().or(found_kernel);
    let initrd_path = match (&options.initrd, &options.agent) {
        (Some(initrd), _) => Some(initrd.clone()),
        (None, Some(agent)) => {
            let Some(tree) = &tree else {
                return Err(ImageError::Usage(
                    "--agent needs a source with a file tree (docker, OCI or rootfs), to take \
                     the kernel modules from; for a squashfs, pass --initrd"
                        .to_owned(),
                ));
            };
            progress.phase("bootmesh initramfs", None);
            let built =
                agent_initramfs(tree, kernel_path.as_deref(), agent, &options.extra_modules)?;
            let path = staging_path.join("bootmesh-initramfs.cpio.gz");
            fs::write(&path, &built.bytes).map_err(ImageError::io("write", &path))?;
            progress.finish();
            tracing::info!(
                modules = built.modules.len(),
                absent = ?built.modules_absent,
                bytes = built.bytes.len(),
                "bootmesh initramfs built"
            );
            Some(path)
        }
        (None, None) => found_initrd,
    };

    // The verity tree, salted with a digest of the squashfs so the same input gives the same
    // tree.
    let squashfs_file =
        File::open(&squashfs_path).map_err(ImageError::io("open", &squashfs_path))?;
    let squashfs_bytes = squashfs_file
        .metadata()
        .map_err(ImageError::io("inspect", &squashfs_path))?
        .len();
    if squashfs_bytes == 0 {
        return Err(ImageError::malformed(format!(
            "{} is empty",
            squashfs_path.display()
        )));
    }
    progress.phase("dm-verity hash tree", Some(squashfs_bytes * 2));
    let mut salt_hasher = blake3::Hasher::new();
    salt_hasher.update(b"bootmesh verity salt v1");
    // Large reads: std::io::copy would read 8 KiB at a time.
    let mut salt_buffer = vec![0u8; 1024 * 1024];
    let mut salt_reader = &squashfs_file;
    loop {
        let count = salt_reader
            .read(&mut salt_buffer)
            .map_err(ImageError::io("read", &squashfs_path))?;
        if count == 0 {
            break;
        }
        salt_hasher.update(salt_buffer.get(..count).unwrap_or_default());
        progress.advance(count as u64);
    }
    let salt = *salt_hasher.finalize().as_bytes();
    let tree_path = staging_path.join("verity.tree");
    let tree_file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tree_path)
        .map_err(ImageError::io("create", &tree_path))?;
    let verity = build_hash_tree(&squashfs_file, squashfs_bytes, &tree_file, &salt)?;
    progress.advance(squashfs_bytes);
    progress.finish();

    // Chunks: cut and hashed here, stored by a writer thread meanwhile.
    let mut chunks = WrittenChunks {
        store,
        written: Vec::new(),
        chunks_reused: 0,
        bytes_written: 0,
        committed: false,
    };
    let padding_bytes = verity.hash_offset_bytes - squashfs_bytes;
    let tree_bytes = tree_file
        .metadata()
        .map_err(ImageError::io("inspect", &tree_path))?
        .len();
    let (parts, tally) = std::thread::scope(|scope| {
        let (sender, queue) = std::sync::mpsc::sync_channel(CHUNK_QUEUE_MAX);
        let writer = scope.spawn(|| write_chunks(store, queue));
        let mut sender = ChunkSender {
            sender,
            seen: HashSet::new(),
        };
        let parts = chunk_parts(
            &mut sender,
            options.chunking,
            progress,
            [kernel_path.as_deref(), initrd_path.as_deref()],
            &squashfs_path,
            padding_bytes,
            &tree_path,
        );
        drop(sender);
        let tally = writer.join().unwrap_or_else(|_| WriterTally {
            failure: Some(StoreError::Io {
                context: "store chunks (writer thread panicked)",
                path: store.root().to_path_buf(),
                error: std::io::Error::other("panic"),
            }),
            ..WriterTally::default()
        });
        (parts, tally)
    });
    chunks.written = tally.written;
    chunks.chunks_reused = tally.chunks_reused;
    chunks.bytes_written = tally.bytes_written;
    if let Some(error) = tally.failure {
        return Err(ImageError::Store(error));
    }
    let (kernel, initrd, root_part) = parts?;
    if root_part.size_bytes != verity.hash_offset_bytes + tree_bytes {
        return Err(ImageError::malformed(format!(
            "{} changed while it was imported",
            squashfs_path.display()
        )));
    }
    store.sync()?;

    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: options.reference.name.clone(),
        tag: options.reference.tag.clone(),
        created_unix_secs,
        cmdline: options.cmdline.clone(),
        kernel,
        initrd,
        root: RootImage {
            part: root_part,
            squashfs_bytes,
            verity,
        },
    };
    manifest.validate()?;
    let manifest_hash = store.put_manifest(&manifest)?;
    let mut catalog = store.catalog()?;
    let replaced = catalog
        .tag(&options.reference, manifest_hash)
        .filter(|previous| *previous != manifest_hash);
    store.write_catalog(&catalog, &lock)?;
    chunks.committed = true;

    let distinct: BTreeSet<ContentHash> = manifest.all_chunks().map(|chunk| chunk.hash).collect();
    Ok(ImportSummary {
        reference: options.reference.to_string(),
        manifest_hash,
        source_kind: kind.describe(),
        squashfs_bytes,
        root_bytes: manifest.root.part.size_bytes,
        kernel_bytes: manifest.kernel.as_ref().map(|part| part.size_bytes),
        initrd_bytes: manifest.initrd.as_ref().map(|part| part.size_bytes),
        chunks: distinct.len() as u64,
        chunks_reused: chunks.chunks_reused,
        bytes_written: chunks.bytes_written,
        verity_root_hash: manifest.root.verity.root_hash_hex(),
        replaced,
    })
}

/// The newest modification time of any non-directory in `tree` (directories' times change as
/// files are unpacked into them, so they are not part of the image's identity).
fn newest_file_time(tree: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let mut newest = 0i64;
    let mut pending = vec![tree.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in fs::read_dir(&directory).map_err(ImageError::io("list", &directory))? {
            let entry = entry.map_err(ImageError::io("list", &directory))?;
            let metadata = entry
                .metadata()
                .map_err(ImageError::io("inspect", &entry.path()))?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                newest = newest.max(metadata.mtime());
            }
        }
    }
    Ok(u64::try_from(newest).unwrap_or(0))
}

/// Compares version strings the way people read them: digit runs as numbers.
fn version_key(text: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut digits = String::new();
    let mut letters = String::new();
    for character in text.chars() {
        if character.is_ascii_digit() {
            if !letters.is_empty() {
                key.push((0, std::mem::take(&mut letters)));
            }
            digits.push(character);
        } else {
            if !digits.is_empty() {
                key.push((digits.parse().unwrap_or(u64::MAX), String::new()));
                digits.clear();
            }
            letters.push(character);
        }
    }
    if !digits.is_empty() {
        key.push((digits.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !letters.is_empty() {
        key.push((0, letters));
    }
    key
}

/// Builds the bootmesh initramfs for the kernel of `tree`: the version comes from the kernel's
/// file name (`vmlinuz-VERSION`), else from the only directory under `lib/modules`.
fn agent_initramfs(
    tree: &Path,
    kernel: Option<&Path>,
    agent: &Path,
    extra_modules: &[String],
) -> Result<crate::initramfs_builder::BuiltInitramfs, ImageError> {
    use crate::initramfs_builder::{InitramfsSpec, build_initramfs, kernel_versions};
    let versions = kernel_versions(tree);
    let from_kernel_name = kernel
        .and_then(|path| path.file_name())
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("vmlinuz-"));
    let chosen = match from_kernel_name {
        Some(version) => versions.iter().find(|(found, _)| found == version),
        None if versions.len() == 1 => versions.first(),
        None => None,
    };
    let Some((version, directory)) = chosen else {
        let found: Vec<&str> = versions
            .iter()
            .map(|(version, _)| version.as_str())
            .collect();
        return Err(ImageError::Usage(format!(
            "cannot tell which kernel modules to put in the bootmesh initramfs: kernel {:?}, \
             module directories {found:?}",
            from_kernel_name.unwrap_or("unnamed"),
        )));
    };
    Ok(build_initramfs(&InitramfsSpec {
        agent: agent.to_path_buf(),
        modules_directory: directory.clone(),
        kernel_version: version.clone(),
        extra_modules: extra_modules.to_vec(),
    })?)
}

/// The newest `boot/vmlinuz-VERSION` of the tree and its `initrd.img-VERSION` (Debian) or
/// `initramfs-VERSION.img` (Fedora); only regular files, never symlinks out of the tree.
pub fn find_boot_files(tree: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    let boot = tree.join("boot");
    let Ok(entries) = fs::read_dir(&boot) else {
        return (None, None);
    };
    let mut kernels: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((version, entry.path()))
        })
        .collect();
    kernels.sort_by_key(|(version, _)| version_key(version));
    let Some((version, kernel)) = kernels.pop() else {
        return (None, None);
    };
    let initrd = [
        format!("initrd.img-{version}"),
        format!("initramfs-{version}.img"),
    ]
    .into_iter()
    .map(|name| boot.join(name))
    .find(|path| fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file()));
    (Some(kernel), initrd)
}

/// One line of `image list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageListing {
    /// `name:tag`.
    pub reference: String,
    /// Manifest hash.
    pub manifest_hash: ContentHash,
    /// Root image size.
    pub root_bytes: u64,
    /// Creation time.
    pub created_unix_secs: u64,
    /// Groups booting it.
    pub groups: Vec<String>,
}

/// Every tagged image.
pub fn list(store: &ChunkStore) -> Result<Vec<ImageListing>, ImageError> {
    let catalog = store.catalog()?;
    let mut listings = Vec::new();
    for (reference, hash) in &catalog.images {
        let manifest = store.manifest(hash)?;
        let groups = catalog
            .groups
            .iter()
            .filter(|(_, group)| &group.current == reference)
            .map(|(name, _)| name.clone())
            .collect();
        listings.push(ImageListing {
            reference: reference.clone(),
            manifest_hash: *hash,
            root_bytes: manifest.root.part.size_bytes,
            created_unix_secs: manifest.created_unix_secs,
            groups,
        });
    }
    Ok(listings)
}

/// Resolves `name:tag` or a manifest hash to the manifest.
pub fn resolve(store: &ChunkStore, name: &str) -> Result<(ContentHash, Manifest), ImageError> {
    let hash = match name.parse::<ContentHash>() {
        Ok(hash) => hash,
        Err(_) => {
            let reference = ImageReference::parse(name)?;
            store
                .catalog()?
                .resolve(&reference.to_string())
                .ok_or_else(|| ImageError::NotFound(reference.to_string()))?
        }
    };
    Ok((hash, store.manifest(&hash)?))
}

/// Removes a tag (refused while a group boots it). Chunks are freed by [`gc`].
pub fn remove(store: &ChunkStore, name: &str) -> Result<ContentHash, ImageError> {
    let lock = store.lock_for_writing()?;
    let reference = ImageReference::parse(name)?;
    let mut catalog = store.catalog()?;
    let hash = catalog
        .untag(&reference.to_string())
        .map_err(|error| match error {
            CatalogError::UnknownImage(reference) => ImageError::NotFound(reference),
            other => ImageError::Catalog(other),
        })?;
    store.write_catalog(&catalog, &lock)?;
    Ok(hash)
}

/// What `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportPart {
    /// The squashfs exactly as imported.
    Squashfs,
    /// The whole root device (squashfs, padding, verity tree).
    Root,
    /// The kernel.
    Kernel,
    /// The initrd.
    Initrd,
}

/// Writes a part of an image to `output`, every chunk verified; returns the bytes written.
pub fn export(
    store: std::sync::Arc<ChunkStore>,
    name: &str,
    part: ExportPart,
    output: &mut dyn Write,
) -> Result<u64, ImageError> {
    let (_, manifest) = resolve(&store, name)?;
    let (part_name, length) = match part {
        ExportPart::Squashfs => (PartName::Root, Some(manifest.root.squashfs_bytes)),
        ExportPart::Root => (PartName::Root, None),
        ExportPart::Kernel => (PartName::Kernel, None),
        ExportPart::Initrd => (PartName::Initrd, None),
    };
    let chosen = manifest
        .part(part_name)
        .ok_or_else(|| ImageError::Usage(format!("image {name} has no {}", part_name.as_str())))?;
    let reader = PartReader::new(store, chosen);
    let total = length.unwrap_or(reader.size_bytes());
    let mut buffer = vec![0u8; 1024 * 1024];
    let mut offset = 0u64;
    while offset < total {
        let wanted = usize::try_from(total - offset)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let slice = buffer.get_mut(..wanted).unwrap_or_default();
        let read = reader.read_at(offset, slice)?;
        if read == 0 {
            return Err(ImageError::malformed(format!(
                "image {name} ends early at {offset}"
            )));
        }
        output
            .write_all(slice.get(..read).unwrap_or_default())
            .map_err(ImageError::io("write", Path::new("output")))?;
        offset += read as u64;
    }
    output
        .flush()
        .map_err(ImageError::io("write", Path::new("output")))?;
    Ok(offset)
}

/// A chunk that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    /// The chunk.
    pub hash: ContentHash,
    /// What is wrong (missing, corrupt).
    pub problem: String,
    /// The images that need it.
    pub images: Vec<String>,
}

/// What a verification pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks read and checked.
    pub chunks_checked: u64,
    /// Bytes read.
    pub bytes_checked: u64,
    /// Chunks missing or corrupt.
    pub bad_chunks: Vec<BadChunk>,
    /// Manifests that failed validation.
    pub bad_manifests: Vec<String>,
}

/// Re-reads and re-hashes every chunk of the named image, or (with `None`) every chunk and
/// manifest in the store (a scrub). Reads from disk, never from the cache.
pub fn verify(store: &ChunkStore, name: Option<&str>) -> Result<VerifyReport, ImageError> {
    let catalog = store.catalog()?;
    let mut report = VerifyReport::default();
    // Which images need which chunk, for the report.
    let mut needed_by: BTreeMap<ContentHash, Vec<String>> = BTreeMap::new();
    let targets: Vec<(String, ContentHash)> = match name {
        Some(name) => {
            let (hash, _) = resolve(store, name)?;
            vec![(name.to_owned(), hash)]
        }
        None => catalog
            .images
            .iter()
            .map(|(reference, hash)| (reference.clone(), *hash))
            .collect(),
    };
    for (reference, hash) in &targets {
        match store.manifest(hash) {
            Ok(manifest) => {
                for chunk in manifest.all_chunks() {
                    let images = needed_by.entry(chunk.hash).or_default();
                    if !images.contains(reference) {
                        images.push(reference.clone());
                    }
                }
            }
            Err(error) => report
                .bad_manifests
                .push(format!("{reference} ({hash}): {error}")),
        }
    }
    let mut to_check: BTreeSet<ContentHash> = needed_by.keys().copied().collect();
    if name.is_none() {
        to_check.extend(store.list_chunks()?);
        for hash in store.list_manifests()? {
            if let Err(error) = store.manifest(&hash) {
                report.bad_manifests.push(format!("{hash}: {error}"));
            }
        }
    }
    for hash in to_check {
        report.chunks_checked += 1;
        match store.read_verified_from_disk(&hash) {
            Ok(bytes) => report.bytes_checked += bytes.len() as u64,
            Err(error) => {
                tracing::error!(chunk = %hash, %error, "chunk failed verification");
                report.bad_chunks.push(BadChunk {
                    hash,
                    problem: error.to_string(),
                    images: needed_by.get(&hash).cloned().unwrap_or_default(),
                });
            }
        }
    }
    Ok(report)
}

/// What garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests no tag names.
    pub manifests_removed: u64,
    /// Chunks no kept manifest names.
    pub chunks_removed: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Chunks kept.
    pub chunks_kept: u64,
}

/// Removes manifests no tag names and chunks no remaining manifest names.
pub fn gc(store: &ChunkStore) -> Result<GcReport, ImageError> {
    let _lock = store.lock_for_writing()?;
    let catalog = store.catalog()?;
    let mut kept_manifests = catalog.referenced_manifests();
    let mut kept_chunks: HashSet<ContentHash> = HashSet::new();
    for hash in &kept_manifests {
        // A kept manifest that cannot be read stops the collection: deleting chunks on a
        // guess could destroy an image.
        let manifest = store.manifest(hash)?;
        kept_chunks.extend(manifest.all_chunks().map(|chunk| chunk.hash));
    }
    // Images being fetched (pinned, not tagged yet) keep what they have so far. Their
    // manifest may not be stored yet: then nothing of them is here to keep.
    for hash in store.pinned_manifests()? {
        match store.manifest(&hash) {
            Ok(manifest) => {
                kept_chunks.extend(manifest.all_chunks().map(|chunk| chunk.hash));
                kept_manifests.insert(hash);
            }
            Err(transfer::StoreError::ManifestMissing { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let mut report = GcReport::default();
    for hash in store.list_manifests()? {
        if !kept_manifests.contains(&hash) {
            store.remove_manifest(&hash)?;
            report.manifests_removed += 1;
        }
    }
    for hash in store.list_chunks()? {
        if kept_chunks.contains(&hash) {
            report.chunks_kept += 1;
        } else {
            report.bytes_freed += store.remove_chunk(&hash)?;
            report.chunks_removed += 1;
        }
    }
    store.remove_empty_fan_outs()?;
    Ok(report)
}

/// Makes `group` boot `name`.
pub fn promote(store: &ChunkStore, name: &str, group: &str) -> Result<ContentHash, ImageError> {
    let lock = store.lock_for_writing()?;
    let reference = ImageReference::parse(name)?.to_string();
    let mut catalog = store.catalog()?;
    catalog.promote(group, &reference)?;
    store.write_catalog(&catalog, &lock)?;
    catalog
        .resolve(&reference)
        .ok_or(ImageError::NotFound(reference))
}

/// Returns `group` to what it booted before; returns that tag.
pub fn rollback(store: &ChunkStore, group: &str) -> Result<String, ImageError> {
    let lock = store.lock_for_writing()?;
    let mut catalog = store.catalog()?;
    let reference = catalog.rollback(group)?;
    store.write_catalog(&catalog, &lock)?;
    Ok(reference)
}
