//! Images in the chunk store behind the boot-services seams: NBD exports per image (by
//! `name:tag` and by manifest hash), and `images/<name:tag or hash>/<part>` files for TFTP and
//! HTTP. Every byte comes through the store's verified cache; a corrupt chunk becomes
//! [`SourceError::Corrupt`], which each protocol answers with its own error (NBD EIO, a TFTP
//! ERROR packet, an HTTP 5xx) instead of sending the bad bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use boot_services::source::{BlockSource, FileSource, MemoryFile, ReadAt, SourceError};
use transfer::{
    ChunkStore, ContentHash, ImageReference, Manifest, PartName, PartReader, StoreError,
};

/// Manifests kept decoded (they are immutable, named by hash).
const MANIFESTS_CACHED_MAX: usize = 64;

/// The image store as seen by the boot services.
#[derive(Debug, Clone)]
pub struct ImageLibrary {
    store: Arc<ChunkStore>,
    manifests: Arc<Mutex<BTreeMap<ContentHash, Arc<Manifest>>>>,
}

fn source_error(error: &StoreError) -> SourceError {
    match error {
        StoreError::ChunkHashMismatch { .. } | StoreError::Manifest { .. } => SourceError::Corrupt,
        StoreError::ManifestMissing { .. } => SourceError::NotFound,
        other => SourceError::Io(other.to_string()),
    }
}

impl ImageLibrary {
    /// Serves the images of `store`.
    pub fn new(store: Arc<ChunkStore>) -> Self {
        Self {
            store,
            manifests: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    fn manifest(&self, hash: &ContentHash) -> Result<Arc<Manifest>, SourceError> {
        let mut cache = self
            .manifests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(manifest) = cache.get(hash) {
            return Ok(Arc::clone(manifest));
        }
        let manifest = Arc::new(self.store.manifest(hash).map_err(|error| {
            tracing::warn!(image = %hash, %error, "manifest unreadable");
            source_error(&error)
        })?);
        // Full: drop the entry with the lowest hash, which is as good as any (a dropped
        // manifest is only decoded again).
        if cache.len() >= MANIFESTS_CACHED_MAX
            && let Some(lowest) = cache.keys().next().copied()
        {
            cache.remove(&lowest);
        }
        cache.insert(*hash, Arc::clone(&manifest));
        Ok(manifest)
    }

    /// Resolves `name:tag` (through the catalog, read afresh so that imports and promotions
    /// take effect at once) or a manifest hash.
    pub fn resolve(&self, name: &str) -> Result<(ContentHash, Arc<Manifest>), SourceError> {
        let hash = match name.parse::<ContentHash>() {
            Ok(hash) => hash,
            Err(_) => {
                let reference = ImageReference::parse(name).map_err(|_| SourceError::NotFound)?;
                let catalog = self.store.catalog().map_err(|error| source_error(&error))?;
                catalog
                    .resolve(&reference.to_string())
                    .ok_or(SourceError::NotFound)?
            }
        };
        Ok((hash, self.manifest(&hash)?))
    }

    /// What a group boots now: its tag, the manifest hash and the manifest.
    pub fn group_image(
        &self,
        group: &str,
    ) -> Result<Option<(String, ContentHash, Arc<Manifest>)>, SourceError> {
        let catalog = self.store.catalog().map_err(|error| source_error(&error))?;
        let Some((reference, hash)) = catalog.group_image(group) else {
            return Ok(None);
        };
        Ok(Some((reference.to_owned(), hash, self.manifest(&hash)?)))
    }

    /// Opens one part of an image.
    pub fn open_part(&self, name: &str, part: PartName) -> Result<StoreFile, SourceError> {
        let (_, manifest) = self.resolve(name)?;
        let part = manifest.part(part).ok_or(SourceError::NotFound)?;
        Ok(StoreFile {
            reader: PartReader::new(Arc::clone(&self.store), part),
        })
    }

    /// A verified chunk by hash (for HTTP `/chunks/<hash>`).
    pub fn chunk(&self, hash: &ContentHash) -> Result<Arc<[u8]>, SourceError> {
        self.store.read_chunk(hash).map_err(|error| match error {
            StoreError::ChunkMissing { .. } => SourceError::NotFound,
            other => source_error(&other),
        })
    }
}

/// One image part, read chunk by chunk from the store.
#[derive(Debug, Clone)]
pub struct StoreFile {
    reader: PartReader,
}

impl ReadAt for StoreFile {
    fn size_bytes(&self) -> u64 {
        self.reader.size_bytes()
    }

    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        self.reader.read_at(offset, buffer).map_err(|error| {
            tracing::error!(offset, %error, "image read refused");
            source_error(&error)
        })
    }
}

/// `images/<name:tag or hash>/<kernel|initrd|root>`, if `path` has that shape.
pub fn image_path(path: &str) -> Option<(&str, PartName)> {
    let rest = path.strip_prefix("images/")?;
    let (name, part) = rest.split_once('/')?;
    Some((name, part.parse().ok()?))
}

impl BlockSource for ImageLibrary {
    type Export = StoreFile;

    fn export_names(&self) -> Vec<String> {
        match self.store.catalog() {
            Ok(catalog) => {
                let mut names: Vec<String> = catalog.images.keys().cloned().collect();
                names.extend(catalog.images.values().map(ContentHash::to_hex));
                names.sort();
                names.dedup();
                names
            }
            Err(error) => {
                tracing::warn!(%error, "catalog unreadable; listing no image exports");
                Vec::new()
            }
        }
    }

    fn open_export(&self, name: &str) -> Result<StoreFile, SourceError> {
        self.open_part(name, PartName::Root)
    }

    fn export_description(&self, name: &str) -> Option<String> {
        let (hash, manifest) = self.resolve(name).ok()?;
        Some(format!(
            "bootmesh image {} ({hash}), squashfs + dm-verity, root hash {}",
            manifest.reference(),
            manifest.root.verity.root_hash_hex()
        ))
    }
}

/// The generated `lts.conf`, replaceable while serving (the fleet configuration changed):
/// a transfer that has started keeps the text it opened.
#[derive(Debug, Clone)]
pub struct LtsConfHandle(std::sync::Arc<std::sync::RwLock<MemoryFile>>);

impl LtsConfHandle {
    /// A handle serving `text`.
    pub fn new(text: String) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(
            MemoryFile::new(text.into_bytes()),
        )))
    }

    /// The text now.
    pub fn current(&self) -> MemoryFile {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `text` from the next open on.
    pub fn replace(&self, text: String) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            MemoryFile::new(text.into_bytes());
    }
}

/// A directory, plus the images of the store under `images/`, plus a generated `lts.conf`.
#[derive(Debug, Clone)]
pub struct FilesAndImages<S> {
    files: S,
    images: Option<ImageLibrary>,
    lts_conf: Option<LtsConfHandle>,
}

impl<S> FilesAndImages<S> {
    /// Serves `files`, and `images` under `images/`.
    pub fn new(files: S, images: Option<ImageLibrary>) -> Self {
        Self {
            files,
            images,
            lts_conf: None,
        }
    }

    /// Also serves `text` (`NodePlans::lts_conf`) where LTSP 5 clients look for their
    /// lts.conf: `ltsp/<arch>/lts.conf` for any one `<arch>`, and `lts.conf` unless the
    /// directory has a file of that name.
    pub fn with_lts_conf(mut self, lts_conf: LtsConfHandle) -> Self {
        self.lts_conf = Some(lts_conf);
        self
    }
}

/// Whether `path` (normalised) is `ltsp/<one component>/lts.conf`.
fn is_ltsp_lts_conf_path(path: &str) -> bool {
    let mut components = path.split('/');
    matches!(
        (components.next(), components.next(), components.next(), components.next()),
        (Some("ltsp"), Some(arch), Some("lts.conf"), None) if !arch.is_empty()
    )
}

/// A file from either place, or generated.
#[derive(Debug, Clone)]
pub enum FileOrImage<F> {
    /// From the directory.
    File(F),
    /// From the image store.
    Image(StoreFile),
    /// Generated from the configuration (lts.conf).
    Generated(MemoryFile),
}

impl<F: ReadAt> ReadAt for FileOrImage<F> {
    fn size_bytes(&self) -> u64 {
        match self {
            Self::File(file) => file.size_bytes(),
            Self::Image(image) => image.size_bytes(),
            Self::Generated(generated) => generated.size_bytes(),
        }
    }
    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        match self {
            Self::File(file) => file.read_at(offset, buffer),
            Self::Image(image) => image.read_at(offset, buffer),
            Self::Generated(generated) => generated.read_at(offset, buffer),
        }
    }
}

impl<S: FileSource> FileSource for FilesAndImages<S> {
    type File = FileOrImage<S::File>;

    fn open(&self, path: &str) -> Result<Self::File, SourceError> {
        if let (Some(images), Some((name, part))) = (&self.images, image_path(path)) {
            return images.open_part(name, part).map(FileOrImage::Image);
        }
        if let Some(lts_conf) = &self.lts_conf {
            if is_ltsp_lts_conf_path(path) {
                return Ok(FileOrImage::Generated(lts_conf.current()));
            }
            // An lts.conf the operator put in the root wins over the generated one.
            if path == "lts.conf" {
                return match self.files.open(path) {
                    Err(SourceError::NotFound) => Ok(FileOrImage::Generated(lts_conf.current())),
                    other => other.map(FileOrImage::File),
                };
            }
        }
        self.files.open(path).map(FileOrImage::File)
    }
}

/// Configured export files, plus every image of the store.
#[derive(Debug, Clone)]
pub struct ExportsAndImages<B> {
    exports: B,
    images: Option<ImageLibrary>,
}

impl<B> ExportsAndImages<B> {
    /// Serves `exports` first, then `images`.
    pub fn new(exports: B, images: Option<ImageLibrary>) -> Self {
        Self { exports, images }
    }
}

impl<B: BlockSource> BlockSource for ExportsAndImages<B> {
    type Export = FileOrImage<B::Export>;

    fn export_names(&self) -> Vec<String> {
        let mut names = self.exports.export_names();
        if let Some(images) = &self.images {
            names.extend(images.export_names());
        }
        names
    }

    fn open_export(&self, name: &str) -> Result<Self::Export, SourceError> {
        match self.exports.open_export(name) {
            Err(SourceError::NotFound) => match &self.images {
                Some(images) => images.open_export(name).map(FileOrImage::Image),
                None => Err(SourceError::NotFound),
            },
            other => other.map(FileOrImage::File),
        }
    }

    fn export_description(&self, name: &str) -> Option<String> {
        self.exports
            .export_description(name)
            .or_else(|| self.images.as_ref()?.export_description(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::DirectorySource;

    fn read_all(file: &impl ReadAt) -> Vec<u8> {
        let mut buffer = vec![0u8; usize::try_from(file.size_bytes()).unwrap()];
        assert_eq!(file.read_at(0, &mut buffer), Ok(buffer.len()));
        buffer
    }

    #[test]
    fn lts_conf_is_generated_where_ltsp_looks_and_a_real_root_file_wins() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("undionly.kpxe"), b"ipxe").unwrap();
        let files = DirectorySource::new(root.path()).unwrap();
        let lts_conf = LtsConfHandle::new("[default]\n".into());
        let source = FilesAndImages::new(files, None).with_lts_conf(lts_conf.clone());
        for path in ["ltsp/i386/lts.conf", "ltsp/amd64/lts.conf", "lts.conf"] {
            assert_eq!(
                read_all(&source.open(path).unwrap()),
                b"[default]\n",
                "{path}"
            );
        }
        for path in ["ltsp/lts.conf", "ltsp/a/b/lts.conf", "other/i386/lts.conf"] {
            assert_eq!(
                source.open(path).err(),
                Some(SourceError::NotFound),
                "{path}"
            );
        }
        assert_eq!(read_all(&source.open("undionly.kpxe").unwrap()), b"ipxe");
        // A new fleet configuration: the next open serves the new text, an open file keeps
        // the text it had.
        let opened = source.open("ltsp/amd64/lts.conf").unwrap();
        lts_conf.replace("[default]\nSCREEN_07=shell\n".into());
        assert_eq!(read_all(&opened), b"[default]\n");
        assert_eq!(
            read_all(&source.open("ltsp/amd64/lts.conf").unwrap()),
            b"[default]\nSCREEN_07=shell\n"
        );
        std::fs::write(root.path().join("lts.conf"), b"# the operator's own\n").unwrap();
        assert_eq!(
            read_all(&source.open("lts.conf").unwrap()),
            b"# the operator's own\n"
        );
        let without = FilesAndImages::new(DirectorySource::new(root.path()).unwrap(), None);
        assert_eq!(
            without.open("ltsp/i386/lts.conf").err(),
            Some(SourceError::NotFound)
        );
    }
}
