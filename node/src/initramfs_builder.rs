//! The bootmesh initramfs: `/init` is the agent (the `bootmesh` binary built static), plus the
//! kernel modules the image's kernel needs to reach its root (NIC, NBD, loop, squashfs,
//! overlay, dm-verity) with their dependencies, taken from the image itself so they match its
//! kernel exactly, and the order to load them in (`/etc/bootmesh/modules`).
//!
//! An image whose kernel package ran no depmod (a `dpkg -x`, a Dockerfile that copied modules)
//! has no `modules.dep`; the dependencies are then read from each module's own `depends=` field.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::initramfs::{CpioError, CpioWriter};
use crate::modules::{ModuleError, ModuleIndex, module_name};

/// Why the initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The agent binary is not static: it would not run in an initramfs with no libraries.
    #[error(
        "{0}: the agent must be a statically linked binary (it has an ELF interpreter); build it with `-C target-feature=+crt-static --target x86_64-unknown-linux-gnu`"
    )]
    AgentNotStatic(PathBuf),
    /// The agent is not an ELF executable.
    #[error("{0}: not an ELF executable")]
    AgentNotElf(PathBuf),
    /// The image has no modules for its kernel.
    #[error("no kernel modules for {version} under {path}")]
    NoModules {
        /// The kernel version.
        version: String,
        /// Where we looked.
        path: PathBuf,
    },
    /// A needed module is missing.
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// A compressed module that the agent could not load.
    #[error(
        "{0}: modules compressed with xz or zstd are not supported yet; use an image with plain or gzip modules"
    )]
    UnsupportedCompression(String),
    /// Writing the archive failed.
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

/// Modules the agent cannot boot without (unless built in).
pub const REQUIRED_MODULES: &[&str] = &["loop", "dm_verity", "squashfs", "overlay", "nbd"];
/// NIC drivers included when the kernel has them: virtual machines and the common server NICs.
pub const DEFAULT_NIC_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "bnxt_en",
    "mlx5_core",
    "tg3",
];

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The static agent binary (becomes `/init`).
    pub agent: PathBuf,
    /// The image's `/lib/modules/<version>` directory.
    pub modules_directory: PathBuf,
    /// Kernel version (the directory's name).
    pub kernel_version: String,
    /// Modules beyond the required and default NIC ones (for unusual NICs).
    pub extra_modules: Vec<String>,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltInitramfs {
    /// The gzip-compressed newc archive.
    pub bytes: Vec<u8>,
    /// Module files included, in load order.
    pub modules: Vec<String>,
    /// Wanted NIC modules this kernel does not have.
    pub modules_absent: Vec<String>,
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError + '_ {
    move |source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// True if `elf` has no `PT_INTERP` program header (it needs no dynamic loader).
pub fn is_static_elf(elf: &[u8]) -> Option<bool> {
    if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None; // Only 64-bit little-endian, which is what x86_64 and aarch64 boot.
    }
    let read_u64 = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?))
    };
    let read_u16 = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?))
    };
    let read_u32 = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?))
    };
    let program_headers = usize::try_from(read_u64(0x20)?).ok()?;
    let entry_bytes = usize::from(read_u16(0x36)?);
    let count = usize::from(read_u16(0x38)?);
    const PT_INTERP: u32 = 3;
    for index in 0..count {
        let header = program_headers.checked_add(index.checked_mul(entry_bytes)?)?;
        if read_u32(header)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// The `depends=` field of a module's `.modinfo`: the names it needs.
pub fn modinfo_depends(module: &[u8]) -> Vec<String> {
    let needle = b"\0depends=";
    let Some(start) = module
        .windows(needle.len())
        .position(|window| window == needle)
    else {
        return Vec::new();
    };
    let value = &module[start + needle.len()..];
    let end = value
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect()
}

/// Builds the `modules.dep` lines of `wanted` and everything they need, reading only those
/// modules' own `depends=` fields (a distribution kernel has thousands of modules).
fn scan_module_dependencies(directory: &Path, wanted: &[&str]) -> Result<String, InitramfsError> {
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    let mut pending = vec![directory.join("kernel")];
    while let Some(current) = pending.pop() {
        let Ok(entries) = fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            let Ok(relative) = path.strip_prefix(directory) else {
                continue;
            };
            let relative = relative.to_string_lossy().into_owned();
            if let Some(name) = module_name(&relative) {
                paths.insert(name, relative);
            }
        }
    }
    let mut depends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue: Vec<String> = wanted.iter().map(|name| name.replace('-', "_")).collect();
    while let Some(name) = queue.pop() {
        if depends.contains_key(&name) {
            continue;
        }
        let Some(relative) = paths.get(&name) else {
            continue; // Built in, or absent: the index decides.
        };
        let needs = modinfo_depends(&read_module(&directory.join(relative))?);
        queue.extend(needs.iter().cloned());
        depends.insert(name, needs);
    }
    // modules.dep lists each module's whole closure with every module before the ones it
    // needs (loaders go from the end): a post-order walk, reversed.
    fn post_order(
        name: &str,
        depends: &BTreeMap<String, Vec<String>>,
        seen: &mut Vec<String>,
        depth: usize,
    ) {
        if depth > 64 || seen.iter().any(|placed| placed == name) {
            return;
        }
        for needed in depends.get(name).into_iter().flatten() {
            post_order(needed, depends, seen, depth + 1);
        }
        seen.push(name.to_owned());
    }
    let mut dep = String::new();
    for (name, needs) in &depends {
        let mut closure: Vec<String> = Vec::new();
        for needed in needs {
            post_order(needed, &depends, &mut closure, 0);
        }
        closure.reverse();
        let closure_paths: Vec<&str> = closure
            .iter()
            .filter_map(|dependency| paths.get(dependency).map(String::as_str))
            .collect();
        let path = paths.get(name).map(String::as_str).unwrap_or_default();
        dep.push_str(&format!("{path}: {}\n", closure_paths.join(" ")));
    }
    Ok(dep)
}

/// A module's bytes, decompressed if gzip (the kernel loads plain ELF through finit_module).
fn read_module(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let text = path.to_string_lossy();
    if text.ends_with(".ko.xz") || text.ends_with(".ko.zst") {
        return Err(InitramfsError::UnsupportedCompression(text.into_owned()));
    }
    let bytes = fs::read(path).map_err(read_error(path))?;
    if text.ends_with(".ko.gz") {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut plain)
            .map_err(read_error(path))?;
        return Ok(plain);
    }
    Ok(bytes)
}

/// Builds the initramfs of `spec`.
pub fn build_initramfs(spec: &InitramfsSpec) -> Result<BuiltInitramfs, InitramfsError> {
    let agent = fs::read(&spec.agent).map_err(read_error(&spec.agent))?;
    match is_static_elf(&agent) {
        Some(true) => {}
        Some(false) => return Err(InitramfsError::AgentNotStatic(spec.agent.clone())),
        None => return Err(InitramfsError::AgentNotElf(spec.agent.clone())),
    }
    let directory = &spec.modules_directory;
    if !directory.join("kernel").is_dir() {
        return Err(InitramfsError::NoModules {
            version: spec.kernel_version.clone(),
            path: directory.clone(),
        });
    }
    let mut all_wanted: Vec<&str> = REQUIRED_MODULES.to_vec();
    all_wanted.extend(DEFAULT_NIC_MODULES);
    all_wanted.extend(spec.extra_modules.iter().map(String::as_str));
    let modules_dep = match fs::read_to_string(directory.join("modules.dep")) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            scan_module_dependencies(directory, &all_wanted)?
        }
        Err(error) => return Err(read_error(&directory.join("modules.dep"))(error)),
    };
    let builtin = fs::read_to_string(directory.join("modules.builtin")).unwrap_or_default();
    let index = ModuleIndex::parse(&modules_dep, &builtin)?;

    let mut wanted: Vec<&str> = REQUIRED_MODULES.to_vec();
    let mut modules_absent = Vec::new();
    for optional in DEFAULT_NIC_MODULES
        .iter()
        .copied()
        .chain(spec.extra_modules.iter().map(String::as_str))
    {
        match index.load_order(&[optional]) {
            Ok(_) => wanted.push(optional),
            Err(_) => modules_absent.push(optional.to_owned()),
        }
    }
    // Extra modules were asked for by name: missing ones are an error, not a skip.
    if let Some(missing) = spec
        .extra_modules
        .iter()
        .find(|extra| modules_absent.contains(extra))
    {
        return Err(ModuleError::Unknown(missing.clone()).into());
    }
    let order = index.load_order(&wanted)?;

    let mut cpio = CpioWriter::new(Vec::new());
    for directory_path in [
        "dev",
        "proc",
        "sys",
        "run",
        "newroot",
        "tmp",
        "etc/bootmesh",
    ] {
        cpio.directory(directory_path, 0o755)?;
    }
    cpio.character_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, &agent)?;
    let base = format!("lib/modules/{}", spec.kernel_version);
    let mut list = String::new();
    for relative in &order {
        let plain_relative = relative.strip_suffix(".gz").unwrap_or(relative);
        let bytes = read_module(&directory.join(relative))?;
        cpio.file(&format!("{base}/{plain_relative}"), 0o644, &bytes)?;
        list.push_str(plain_relative);
        list.push('\n');
    }
    cpio.file("etc/bootmesh/modules", 0o644, list.as_bytes())?;
    let archive = cpio.finish()?;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    encoder
        .write_all(&archive)
        .map_err(|error| InitramfsError::Cpio(CpioError::Io(error)))?;
    let bytes = encoder
        .finish()
        .map_err(|error| InitramfsError::Cpio(CpioError::Io(error)))?;
    Ok(BuiltInitramfs {
        bytes,
        modules: order,
        modules_absent,
    })
}

/// The kernel versions under `root/usr/lib/modules` (or `root/lib/modules`). Symlinks are
/// never followed out of `root`: merged-/usr trees have `lib -> usr/lib`, and an absolute link
/// would name the host's own modules.
pub fn kernel_versions(root: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for base in ["usr/lib/modules", "lib/modules"] {
        let mut real = root.to_path_buf();
        let mut inside = true;
        for component in base.split('/') {
            real.push(component);
            if fs::symlink_metadata(&real).map_or(true, |meta| !meta.is_dir()) {
                inside = false;
                break;
            }
        }
        if !inside {
            continue;
        }
        let Ok(entries) = fs::read_dir(&real) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().join("kernel").is_dir() {
                found.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ));
            }
        }
        if !found.is_empty() {
            break;
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_reads_the_field() {
        let module = b"\x7fELF....\0license=GPL\0depends=dm-bufio,reed_solomon\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(module), vec!["dm_bufio", "reed_solomon"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }

    #[test]
    fn this_test_binary_is_recognised_as_elf() {
        let exe = std::env::current_exe().unwrap();
        let bytes = fs::read(exe).unwrap();
        assert!(is_static_elf(&bytes).is_some());
        assert_eq!(is_static_elf(b"#!/bin/sh\n"), None);
    }
}
