//! The seams through which the protocol machines read the bytes they serve.

use std::fmt;

/// Why a read from a [`FileSource`] or [`BlockSource`] failed. The protocol machines turn each
/// into the protocol's own error reply (TFTP error packet, NBD error code, HTTP status).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// The path or export does not exist.
    #[error("not found")]
    NotFound,
    /// The path leaves the served root, or names something that must not be served.
    #[error("access denied")]
    AccessDenied,
    /// The stored bytes failed verification; they must never be sent.
    #[error("stored data is corrupt")]
    Corrupt,
    /// Any other I/O failure, with a short description for the log.
    #[error("i/o error: {0}")]
    Io(String),
}

/// A read-only tree of files, addressed by normalised relative paths such as `boot/vmlinuz`.
///
/// Implementations must refuse paths that would leave their root (`..`, absolute paths,
/// symlinks pointing outside); [`normalise_path`] does the textual part of that.
pub trait FileSource {
    /// An open file.
    type File: ReadAt;
    /// Opens `path` (already normalised by [`normalise_path`]) for reading.
    fn open(&self, path: &str) -> Result<Self::File, SourceError>;
}

/// Positional reads from an open file or export.
pub trait ReadAt {
    /// Total size in bytes.
    fn size_bytes(&self) -> u64;
    /// Fills `buffer` from `offset`; returns how many bytes were read (fewer only at the end).
    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError>;
}

/// A set of named, read-only block exports (NBD).
pub trait BlockSource {
    /// An open export.
    type Export: ReadAt;
    /// Names of all exports, for NBD_OPT_LIST.
    fn export_names(&self) -> Vec<String>;
    /// Opens the export called `name`.
    fn open_export(&self, name: &str) -> Result<Self::Export, SourceError>;
    /// The description of an export shown by NBD_OPT_LIST, if any.
    fn export_description(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Turns a client-supplied path into a normalised relative path, or refuses it.
///
/// Leading slashes are accepted as TFTP clients commonly send them (`/pxelinux.0`), backslashes
/// are treated as separators (Windows-style PXE clients), empty and `.` components are dropped,
/// and any `..` component, NUL byte or control character refuses the whole path: we never try to
/// resolve `..`, because a path that needs it is not one a boot client has reason to send.
pub fn normalise_path(raw: &str) -> Result<String, SourceError> {
    if raw.bytes().any(|byte| byte == 0 || byte < 0x20) {
        return Err(SourceError::AccessDenied);
    }
    let mut components = Vec::new();
    for component in raw.split(['/', '\\']) {
        match component {
            "" | "." => {}
            ".." => return Err(SourceError::AccessDenied),
            other => components.push(other),
        }
    }
    if components.is_empty() {
        return Err(SourceError::NotFound);
    }
    Ok(components.join("/"))
}

/// A [`ReadAt`] over bytes held in memory; used by tests and for small generated files
/// (iPXE scripts, `lts.conf`).
#[derive(Clone)]
pub struct MemoryFile {
    bytes: std::sync::Arc<[u8]>,
}

impl MemoryFile {
    /// Wraps `bytes`.
    pub fn new(bytes: impl Into<std::sync::Arc<[u8]>>) -> Self {
        Self {
            bytes: bytes.into(),
        }
    }
}

impl fmt::Debug for MemoryFile {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("MemoryFile")
            .field("size_bytes", &self.bytes.len())
            .finish()
    }
}

impl ReadAt for MemoryFile {
    fn size_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(remaining) = self.bytes.get(start..) else {
            return Ok(0);
        };
        let count = remaining.len().min(buffer.len());
        buffer[..count].copy_from_slice(&remaining[..count]);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&str, SourceError>) {
        assert_eq!(normalise_path(raw), expected.map(str::to_owned), "{raw}");
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        check("pxelinux.0", Ok("pxelinux.0"));
        check("/boot//vmlinuz", Ok("boot/vmlinuz"));
        check("\\boot\\x86\\ipxe.efi", Ok("boot/x86/ipxe.efi"));
        check("./a/./b", Ok("a/b"));
        check("../etc/passwd", Err(SourceError::AccessDenied));
        check("a/../../b", Err(SourceError::AccessDenied));
        check("a\0b", Err(SourceError::AccessDenied));
        check("/", Err(SourceError::NotFound));
    }

    #[test]
    fn memory_file_reads_at_offsets() {
        let file = MemoryFile::new(b"hello world".to_vec());
        let mut buffer = [0u8; 5];
        assert_eq!(file.read_at(6, &mut buffer), Ok(5));
        assert_eq!(&buffer, b"world");
        assert_eq!(file.read_at(9, &mut buffer), Ok(2));
        assert_eq!(file.read_at(100, &mut buffer), Ok(0));
    }
}
