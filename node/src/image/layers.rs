//! Applying image layers (tar streams) to a directory in order, the way container runtimes do:
//! later layers replace earlier entries, `.wh.NAME` deletes NAME from the layers below, and
//! `.wh..wh..opq` empties a directory of everything the layers below put there.
//!
//! Kept: modes, owners, xattrs, symlinks, hardlinks, device nodes and fifos (which need root,
//! as any image unpacking does).

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::ImageError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Counts for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStatistics {
    /// Entries written.
    pub entries: u64,
    /// Paths deleted by whiteouts.
    pub whiteouts: u64,
    /// Directories emptied by opaque whiteouts.
    pub opaque_directories: u64,
}

/// A layer path made safe: relative, no `..`, no `.`.
fn clean_path(raw: &Path) -> Result<PathBuf, ImageError> {
    let mut clean = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::malformed(format!(
                    "layer entry {} leaves the image root",
                    raw.display()
                )));
            }
        }
    }
    Ok(clean)
}

fn remove_any(path: &Path) -> Result<bool, ImageError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path)
            .map(|()| true)
            .map_err(ImageError::io("remove", path)),
        Ok(_) => fs::remove_file(path)
            .map(|()| true)
            .map_err(ImageError::io("remove", path)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(ImageError::io("inspect", path)(error)),
    }
}

/// True if `path` (inside `root`) is reached without following a symlink in its parents, so
/// that writing through it cannot land outside the tree.
fn parents_are_real_directories(root: &Path, relative: &Path) -> bool {
    let mut current = root.to_path_buf();
    let Some(parent) = relative.parent() else {
        return true;
    };
    for component in parent.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(metadata) if metadata.file_type().is_symlink() => return false,
            _ => {}
        }
    }
    true
}

/// Applies one layer to `root`.
pub fn apply_layer(
    layer: impl Read,
    root: &Path,
    statistics: &mut LayerStatistics,
) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(layer);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // xattrs are set below for every kind of entry; tar only sets them on regular files.
    archive.set_unpack_xattrs(false);
    let mut created_here: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|error| ImageError::malformed(format!("layer is not a tar stream: {error}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|error| ImageError::malformed(format!("layer entry: {error}")))?;
        let raw_path = entry
            .path()
            .map_err(|error| ImageError::malformed(format!("layer entry path: {error}")))?
            .into_owned();
        let relative = clean_path(&raw_path)?;
        let Some(file_name) = relative.file_name().and_then(|name| name.to_str()) else {
            continue; // the root directory itself
        };
        if !parents_are_real_directories(root, &relative) {
            return Err(ImageError::malformed(format!(
                "layer entry {} goes through a symlink",
                relative.display()
            )));
        }
        let parent = relative.parent().map(Path::to_path_buf).unwrap_or_default();
        if file_name == OPAQUE_WHITEOUT {
            empty_directory_below(root, &parent, &created_here)?;
            statistics.opaque_directories += 1;
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(ImageError::malformed(format!(
                    "whiteout {} names no file",
                    relative.display()
                )));
            }
            if remove_any(&root.join(&parent).join(hidden))? {
                statistics.whiteouts += 1;
            }
            continue;
        }
        let target = root.join(&relative);
        let kind = entry.header().entry_type();
        // A directory replaces a non-directory and vice versa; a directory over a directory
        // keeps its contents (layers merge).
        if let Ok(existing) = fs::symlink_metadata(&target)
            && existing.is_dir() != kind.is_dir()
        {
            remove_any(&target)?;
        }
        let xattrs = pax_xattrs(&mut entry)?;
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            make_special_file(&entry, &target)?;
        } else {
            let unpacked = entry.unpack_in(root).map_err(|error| {
                ImageError::malformed(format!("unpacking {}: {error}", relative.display()))
            })?;
            if !unpacked {
                return Err(ImageError::malformed(format!(
                    "layer entry {} leaves the image root",
                    relative.display()
                )));
            }
        }
        for (name, value) in &xattrs {
            if let Err(error) = rustix::fs::lsetxattr(
                &target,
                name.as_str(),
                value,
                rustix::fs::XattrFlags::empty(),
            ) {
                if kind.is_symlink() {
                    // Linux refuses user.* attributes on symlinks; nothing can carry them.
                    tracing::warn!(path = %relative.display(), %name, %error, "xattr on a symlink dropped");
                } else {
                    return Err(ImageError::io("set xattr on", &target)(error.into()));
                }
            }
        }
        created_here.insert(relative);
        statistics.entries += 1;
    }
    Ok(())
}

/// Removes what lower layers put in `directory`, keeping what this layer already wrote.
fn empty_directory_below(
    root: &Path,
    directory: &Path,
    created_here: &HashSet<PathBuf>,
) -> Result<(), ImageError> {
    let absolute = root.join(directory);
    let Ok(entries) = fs::read_dir(&absolute) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(ImageError::io("list", &absolute))?;
        let relative = directory.join(entry.file_name());
        if created_here.contains(&relative) {
            continue;
        }
        remove_any(&entry.path())?;
    }
    Ok(())
}

/// `SCHILY.xattr.NAME` records of the entry's PAX header.
fn pax_xattrs<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut xattrs = Vec::new();
    let Some(extensions) = entry
        .pax_extensions()
        .map_err(|error| ImageError::malformed(format!("PAX header: {error}")))?
    else {
        return Ok(xattrs);
    };
    for extension in extensions {
        let extension =
            extension.map_err(|error| ImageError::malformed(format!("PAX record: {error}")))?;
        let Ok(key) = extension.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            xattrs.push((name.to_owned(), extension.value_bytes().to_vec()));
        }
    }
    Ok(xattrs)
}

/// Device nodes and fifos, which the tar crate would write as regular files.
fn make_special_file<R: Read>(entry: &tar::Entry<'_, R>, target: &Path) -> Result<(), ImageError> {
    use rustix::fs::{FileType, Mode};
    let header = entry.header();
    let malformed = |what: &str| ImageError::malformed(format!("{what} of {}", target.display()));
    let mode = header.mode().map_err(|_| malformed("mode"))?;
    let kind = header.entry_type();
    let (file_type, device) = if kind.is_fifo() {
        (FileType::Fifo, 0)
    } else {
        let major = header
            .device_major()
            .map_err(|_| malformed("device major"))?
            .unwrap_or(0);
        let minor = header
            .device_minor()
            .map_err(|_| malformed("device minor"))?
            .unwrap_or(0);
        let file_type = if kind.is_character_special() {
            FileType::CharacterDevice
        } else {
            FileType::BlockDevice
        };
        (file_type, rustix::fs::makedev(major, minor))
    };
    remove_any(target)?;
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(ImageError::io("create", parent))?;
    }
    rustix::fs::mknodat(
        rustix::fs::CWD,
        target,
        file_type,
        Mode::from_raw_mode(mode & 0o7777),
        device,
    )
    .map_err(|error| ImageError::io("create device node", target)(error.into()))?;
    let uid = header.uid().map_err(|_| malformed("uid"))?;
    let gid = header.gid().map_err(|_| malformed("gid"))?;
    let owner = rustix::fs::Uid::from_raw(u32::try_from(uid).map_err(|_| malformed("uid"))?);
    let group = rustix::fs::Gid::from_raw(u32::try_from(gid).map_err(|_| malformed("gid"))?);
    rustix::fs::chownat(
        rustix::fs::CWD,
        target,
        Some(owner),
        Some(group),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|error| ImageError::io("chown", target)(error.into()))?;
    // mknod applies the umask; set the exact mode.
    rustix::fs::chmod(target, Mode::from_raw_mode(mode & 0o7777))
        .map_err(|error| ImageError::io("chmod", target)(error.into()))?;
    Ok(())
}
