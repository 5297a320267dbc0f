//! Building the root squashfs with `mksquashfs` (squashfs-tools), reproducibly: sorted
//! entries (mksquashfs sorts directories), every timestamp fixed to the image's creation time,
//! no fragments (ADR 0004: packed fragments shift on every edit and defeat chunk reuse), and
//! zstd at level 3 (ADR 0004: 50 times faster than mksquashfs's default level 15 on a Debian
//! node image, for 10 % more bytes; decompression speed is the same).

use std::path::Path;
use std::process::{Command, Stdio};

use super::ImageError;

/// Compression of data and metadata blocks.
pub const SQUASHFS_COMPRESSION: &str = "zstd";
/// The default zstd level.
pub const COMPRESSION_LEVEL_DEFAULT: u8 = 3;
/// Data block size.
pub const SQUASHFS_BLOCK_BYTES: u32 = 128 * 1024;
/// mksquashfs's own cache bound (its default is a quarter of RAM).
const MKSQUASHFS_MEMORY: &str = "128M";

/// How to lay out the squashfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquashfsLayout {
    /// Pack file tails into shared fragment blocks (smaller image, poorer reuse).
    pub fragments: bool,
    /// zstd level, 1 (fastest) to 22 (smallest).
    pub compression_level: u8,
}

impl Default for SquashfsLayout {
    fn default() -> Self {
        Self {
            fragments: false,
            compression_level: COMPRESSION_LEVEL_DEFAULT,
        }
    }
}

/// Runs mksquashfs on `tree`, writing `output`.
pub fn build_squashfs(
    tree: &Path,
    output: &Path,
    created_unix_secs: u64,
    layout: SquashfsLayout,
) -> Result<(), ImageError> {
    let time = created_unix_secs.min(u64::from(u32::MAX)).to_string();
    let mut command = Command::new("mksquashfs");
    command
        .arg(tree)
        .arg(output)
        .args([
            "-noappend",
            "-no-progress",
            "-quiet",
            "-comp",
            SQUASHFS_COMPRESSION,
        ])
        .args([
            "-Xcompression-level",
            &layout.compression_level.clamp(1, 22).to_string(),
        ])
        .args(["-b", &SQUASHFS_BLOCK_BYTES.to_string()])
        .args(["-mkfs-time", &time, "-all-time", &time])
        .args(["-mem", MKSQUASHFS_MEMORY])
        .arg("-xattrs");
    if !layout.fragments {
        command.arg("-no-fragments");
    }
    let result = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|error| ImageError::Tool {
            tool: "mksquashfs",
            detail: format!("cannot run it (install squashfs-tools): {error}"),
        })?;
    if !result.status.success() {
        return Err(ImageError::Tool {
            tool: "mksquashfs",
            detail: format!(
                "{}: {}",
                result.status,
                String::from_utf8_lossy(&result.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The `mkfs_time` field of a squashfs superblock (seconds since the epoch).
pub fn squashfs_mkfs_time(image: &Path) -> Result<u64, ImageError> {
    use std::io::Read;
    let mut superblock = [0u8; 12];
    std::fs::File::open(image)
        .and_then(|mut file| file.read_exact(&mut superblock))
        .map_err(ImageError::io("read superblock of", image))?;
    if &superblock[..4] != b"hsqs" {
        return Err(ImageError::malformed(format!(
            "{} is not a squashfs image",
            image.display()
        )));
    }
    Ok(u64::from(u32::from_le_bytes([
        superblock[8],
        superblock[9],
        superblock[10],
        superblock[11],
    ])))
}

/// Checks that `image` is a whole squashfs 4.0 image that unsquashfs can list: a truncated or
/// counterfeit file must not become a root image that no node can mount.
pub fn validate_squashfs(image: &Path) -> Result<(), ImageError> {
    use std::io::Read;
    let mut superblock = [0u8; 96];
    let mut file = std::fs::File::open(image).map_err(ImageError::io("open", image))?;
    let length = file
        .metadata()
        .map_err(ImageError::io("inspect", image))?
        .len();
    file.read_exact(&mut superblock).map_err(|_| {
        ImageError::malformed(format!("{} is too short for a squashfs", image.display()))
    })?;
    let u16_at = |offset: usize| u16::from_le_bytes([superblock[offset], superblock[offset + 1]]);
    let u64_at = |offset: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&superblock[offset..offset + 8]);
        u64::from_le_bytes(bytes)
    };
    let (major, minor) = (u16_at(28), u16_at(30));
    if &superblock[..4] != b"hsqs" || (major, minor) != (4, 0) {
        return Err(ImageError::malformed(format!(
            "{} is not a squashfs 4.0 image (version {major}.{minor})",
            image.display()
        )));
    }
    let bytes_used = u64_at(40);
    if bytes_used > length {
        return Err(ImageError::malformed(format!(
            "{} is truncated: its superblock says {bytes_used} bytes, the file has {length}",
            image.display()
        )));
    }
    let listing = Command::new("unsquashfs")
        .args(["-l", "-no-progress"])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|error| ImageError::Tool {
            tool: "unsquashfs",
            detail: format!("cannot run it (install squashfs-tools): {error}"),
        })?;
    if !listing.status.success() {
        return Err(ImageError::malformed(format!(
            "{} is not a readable squashfs: {}",
            image.display(),
            String::from_utf8_lossy(&listing.stderr).trim()
        )));
    }
    Ok(())
}
