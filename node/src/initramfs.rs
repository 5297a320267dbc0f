//! Writing initramfs archives: the "newc" cpio format the kernel unpacks into its rootfs
//! before running `/init` (linux/Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Reproducible by construction: every entry is owned by root with time 0, inode numbers are
//! handed out in write order, and callers add entries in a fixed order. The kernel creates no
//! parent directories on its own, so [`CpioWriter`] adds missing ones first.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

/// The newc magic.
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Entries are padded to this alignment (header + name, and data).
const ALIGNMENT: u64 = 4;
/// The name of the end marker.
const TRAILER_NAME: &str = "TRAILER!!!";
/// Longest path accepted (the kernel's own limit is PATH_MAX).
const PATH_BYTES_MAX: usize = 4095;

/// File type bits of `st_mode`.
const MODE_DIRECTORY: u32 = 0o040_000;
const MODE_REGULAR: u32 = 0o100_000;
const MODE_SYMLINK: u32 = 0o120_000;
const MODE_CHARACTER_DEVICE: u32 = 0o020_000;

/// Why an entry could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The output failed.
    #[error("writing the initramfs: {0}")]
    Io(#[from] io::Error),
    /// A path that cannot be in an initramfs.
    #[error("initramfs path {0:?} is empty, absolute, too long or contains `..`")]
    BadPath(String),
    /// The same path twice.
    #[error("initramfs path {0:?} was added twice")]
    Duplicate(String),
    /// A file longer than the format's 32-bit size field.
    #[error("initramfs file {0:?} is larger than 4 GiB")]
    TooLarge(String),
}

/// A newc cpio archive being written.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    output: W,
    written_bytes: u64,
    next_inode: u32,
    paths: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `output`.
    pub fn new(output: W) -> Self {
        Self {
            output,
            written_bytes: 0,
            next_inode: 1,
            paths: BTreeSet::new(),
        }
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.output.write_all(bytes)?;
        self.written_bytes += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let remainder = self.written_bytes % ALIGNMENT;
        if remainder != 0 {
            let zeros = [0u8; ALIGNMENT as usize];
            let count = usize::try_from(ALIGNMENT - remainder).unwrap_or(0);
            self.write_bytes(zeros.get(..count).unwrap_or_default())?;
        }
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        size_bytes: u32,
        device: (u32, u32),
    ) -> Result<(), CpioError> {
        let inode = if name == TRAILER_NAME {
            0
        } else {
            let inode = self.next_inode;
            self.next_inode += 1;
            inode
        };
        let links = if mode & 0o170_000 == MODE_DIRECTORY {
            2
        } else {
            1
        };
        let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            inode, mode, 0, // uid
            0, // gid
            links, 0, // mtime: reproducible
            size_bytes, 0, // devmajor of the file system
            0, // devminor of the file system
            device.0, device.1, name_size, 0, // check (newc, not crc)
        ];
        let mut header = Vec::with_capacity(110 + name.len() + 1);
        header.extend_from_slice(NEWC_MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write_bytes(&header)?;
        self.pad()
    }

    /// Checks `path` and records it; adds missing parent directories first.
    fn claim(&mut self, path: &str) -> Result<(), CpioError> {
        let valid = !path.is_empty()
            && !path.starts_with('/')
            && path.len() <= PATH_BYTES_MAX
            && path
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
            && !path.contains('\0');
        if !valid {
            return Err(CpioError::BadPath(path.to_owned()));
        }
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !self.paths.contains(&parent) {
                self.paths.insert(parent.clone());
                self.header(&parent.clone(), MODE_DIRECTORY | 0o755, 0, (0, 0))?;
            }
        }
        if !self.paths.insert(path.to_owned()) {
            return Err(CpioError::Duplicate(path.to_owned()));
        }
        Ok(())
    }

    /// A directory.
    pub fn directory(&mut self, path: &str, permissions: u32) -> Result<(), CpioError> {
        self.claim(path)?;
        self.header(path, MODE_DIRECTORY | (permissions & 0o7777), 0, (0, 0))
    }

    /// A regular file with `bytes`.
    pub fn file(&mut self, path: &str, permissions: u32, bytes: &[u8]) -> Result<(), CpioError> {
        self.file_from_reader(path, permissions, bytes.len() as u64, bytes)
    }

    /// A regular file of `length_bytes` read from `reader` (which must yield exactly that many).
    pub fn file_from_reader(
        &mut self,
        path: &str,
        permissions: u32,
        length_bytes: u64,
        reader: impl Read,
    ) -> Result<(), CpioError> {
        let size = u32::try_from(length_bytes).map_err(|_| CpioError::TooLarge(path.to_owned()))?;
        self.claim(path)?;
        self.header(path, MODE_REGULAR | (permissions & 0o7777), size, (0, 0))?;
        let copied = io::copy(&mut reader.take(length_bytes), &mut self.output)?;
        self.written_bytes += copied;
        if copied != length_bytes {
            return Err(CpioError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: {copied} of {length_bytes} bytes"),
            )));
        }
        self.pad()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let size = u32::try_from(target.len()).map_err(|_| CpioError::TooLarge(path.to_owned()))?;
        self.claim(path)?;
        self.header(path, MODE_SYMLINK | 0o777, size, (0, 0))?;
        self.write_bytes(target.as_bytes())?;
        self.pad()
    }

    /// A character device (`/dev/console` must exist before `/init` runs, or the kernel has no
    /// console to give it).
    pub fn character_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.claim(path)?;
        self.header(
            path,
            MODE_CHARACTER_DEVICE | (permissions & 0o7777),
            0,
            (major, minor),
        )
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER_NAME, 0, 0, (0, 0))?;
        // Pad to 512 bytes, as cpio(1) does, so archives can be concatenated safely.
        let remainder = self.written_bytes % 512;
        if remainder != 0 {
            let zeros = vec![0u8; usize::try_from(512 - remainder).unwrap_or(0)];
            self.write_bytes(&zeros)?;
        }
        self.output.flush()?;
        Ok(self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Result<Vec<u8>, CpioError> {
        let mut writer = CpioWriter::new(Vec::new());
        writer.character_device("dev/console", 0o600, 5, 1)?;
        writer.file("init", 0o755, b"#!/bin/sh\necho hi\n")?;
        writer.file(
            "lib/modules/6.1.0-1-amd64/kernel/fs/squashfs/squashfs.ko",
            0o644,
            &[7u8; 1001],
        )?;
        writer.symlink("bin/sh", "../init")?;
        writer.directory("proc", 0o555)?;
        writer.finish()
    }

    #[test]
    fn archives_are_aligned_reproducible_and_refuse_bad_paths() -> Result<(), CpioError> {
        let first = sample()?;
        assert_eq!(first, sample()?, "same entries, same bytes");
        assert_eq!(first.len() % 512, 0);
        assert!(first.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&first);
        // Parents come before children, once each.
        let lib = text.find("lib\0").unwrap_or(usize::MAX);
        let module = text.find("squashfs.ko\0").unwrap_or(0);
        assert!(lib < module);
        assert_eq!(text.matches("lib/modules\0").count(), 1);
        assert!(text.contains("TRAILER!!!\0"));

        let mut writer = CpioWriter::new(Vec::new());
        for bad in ["", "/init", "a/../b", "a//b", "./init"] {
            assert!(
                matches!(writer.file(bad, 0o644, b""), Err(CpioError::BadPath(_))),
                "{bad:?}"
            );
        }
        writer.file("init", 0o755, b"")?;
        assert!(matches!(
            writer.file("init", 0o755, b""),
            Err(CpioError::Duplicate(_))
        ));
        Ok(())
    }
}
