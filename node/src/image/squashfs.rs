//! Building the root squashfs with `mksquashfs` (squashfs-tools), reproducibly: sorted
//! entries (mksquashfs sorts directories), every timestamp fixed to the image's creation time,
//! no fragments (ADR 0004: packed fragments shift on every edit and defeat chunk reuse).

use std::path::Path;
use std::process::{Command, Stdio};

use super::ImageError;

/// Compression of data and metadata blocks.
pub const SQUASHFS_COMPRESSION: &str = "zstd";
/// Data block size.
pub const SQUASHFS_BLOCK_BYTES: u32 = 128 * 1024;
/// mksquashfs's own cache bound (its default is a quarter of RAM).
const MKSQUASHFS_MEMORY: &str = "128M";

/// How to lay out the squashfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SquashfsLayout {
    /// Pack file tails into shared fragment blocks (smaller image, poorer reuse).
    pub fragments: bool,
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
        return Err(ImageError::Malformed(format!(
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
