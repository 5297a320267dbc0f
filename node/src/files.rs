//! Files and images on the local disk behind the boot-services seams ([`FileSource`],
//! [`BlockSource`]), confined to their roots.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use boot_services::source::{BlockSource, FileSource, ReadAt, SourceError};

/// A directory served read-only (TFTP, HTTP). Paths must be normalised first; symlinks are
/// followed only while they stay inside the root.
#[derive(Debug, Clone)]
pub struct DirectorySource {
    root: PathBuf,
}

impl DirectorySource {
    /// Serves `root`, which must exist.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
        })
    }

    /// The canonical root.
    pub fn root_path(&self) -> &Path {
        &self.root
    }

    /// The canonical path of `relative_path`, if it is a regular file inside the root.
    pub fn resolve(&self, relative_path: &str) -> Result<PathBuf, SourceError> {
        let joined = self.root.join(relative_path);
        let canonical = joined.canonicalize().map_err(map_io_error)?;
        if !canonical.starts_with(&self.root) {
            return Err(SourceError::AccessDenied);
        }
        let metadata = canonical.metadata().map_err(map_io_error)?;
        if !metadata.is_file() {
            return Err(SourceError::NotFound);
        }
        Ok(canonical)
    }
}

fn map_io_error(error: std::io::Error) -> SourceError {
    match error.kind() {
        std::io::ErrorKind::NotFound => SourceError::NotFound,
        std::io::ErrorKind::PermissionDenied => SourceError::AccessDenied,
        _ => SourceError::Io(error.to_string()),
    }
}

/// An open file read by position (pread), shareable across threads.
#[derive(Debug, Clone)]
pub struct LocalFile {
    file: Arc<File>,
    size_bytes: u64,
}

impl LocalFile {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(map_io_error)?;
        let size_bytes = file.metadata().map_err(map_io_error)?.len();
        Ok(Self {
            file: Arc::new(file),
            size_bytes,
        })
    }
}

impl ReadAt for LocalFile {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        let mut filled = 0;
        while filled < buffer.len() {
            let Some(rest) = buffer.get_mut(filled..) else {
                break;
            };
            match self.file.read_at(rest, offset + filled as u64) {
                Ok(0) => break,
                Ok(count) => filled += count,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(map_io_error(error)),
            }
        }
        Ok(filled)
    }
}

impl FileSource for DirectorySource {
    type File = LocalFile;

    fn open(&self, path: &str) -> Result<LocalFile, SourceError> {
        LocalFile::open(&self.resolve(path)?)
    }
}

/// Named image files served as NBD exports.
#[derive(Debug, Clone, Default)]
pub struct FileExports {
    exports: Arc<BTreeMap<String, (PathBuf, Option<String>)>>,
}

impl FileExports {
    /// Exports `(name, path, description)`.
    pub fn new(exports: impl IntoIterator<Item = (String, PathBuf, Option<String>)>) -> Self {
        let map = exports
            .into_iter()
            .map(|(name, path, description)| (name, (path, description)))
            .collect();
        Self {
            exports: Arc::new(map),
        }
    }
}

impl BlockSource for FileExports {
    type Export = LocalFile;

    fn export_names(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    fn open_export(&self, name: &str) -> Result<LocalFile, SourceError> {
        let (path, _) = self.exports.get(name).ok_or(SourceError::NotFound)?;
        LocalFile::open(path)
    }

    fn export_description(&self, name: &str) -> Option<String> {
        self.exports
            .get(name)
            .and_then(|(_, description)| description.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_source_refuses_escapes() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"no").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("boot")).unwrap();
        std::fs::write(root.path().join("boot/vmlinuz"), b"kernel").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("escape"))
            .unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz", root.path().join("inside")).unwrap();
        let source = DirectorySource::new(root.path()).unwrap();
        let mut buffer = [0u8; 16];
        let file = source.open("boot/vmlinuz").unwrap();
        assert_eq!(file.read_at(0, &mut buffer), Ok(6));
        assert!(source.open("inside").is_ok());
        assert_eq!(source.open("escape").err(), Some(SourceError::AccessDenied));
        assert_eq!(source.open("boot").err(), Some(SourceError::NotFound));
        assert_eq!(source.open("missing").err(), Some(SourceError::NotFound));
    }
}
