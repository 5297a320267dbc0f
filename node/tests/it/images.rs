//! `bootmesh image`: the real binary importing docker-save archives, OCI archives and layouts,
//! rootfs trees and squashfs files that the tests build here, checked with tools nobody here
//! wrote (unsquashfs, veritysetup). No network: every source is a local file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::lab;

/// 2024-05-01T10:00:00Z: the `created` of the layered test image's config.
const LAYERED_CREATED_RFC3339: &str = "2024-05-01T10:00:00Z";
const LAYERED_CREATED_UNIX_SECS: u64 = 1_714_557_600;
/// Layer entries carry this mtime; the image's squashfs must not (it uses `created`).
const LAYER_ENTRY_MTIME: u64 = 1_600_000_000;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Running the binary.

/// `bootmesh image --state-dir STATE ARGS...`, stdin closed.
fn bootmesh(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .arg("image")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        // Errors as an operator sees them, without the backtrace the test harness asks for.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("run bootmesh image {args:?}: {error}"))
}

/// Like [`bootmesh`], but the command must succeed; returns its stdout.
fn bootmesh_ok(state: &Path, args: &[&str]) -> String {
    let output = bootmesh(state, args);
    assert!(
        output.status.success(),
        "bootmesh image {args:?} failed: {}",
        lab::describe(&output)
    );
    String::from_utf8(output.stdout).expect("stdout is UTF-8")
}

/// Imports `from` as `reference`; returns the manifest hash and the printed summary.
fn import(state: &Path, reference: &str, from: &Path, options: &[&str]) -> (String, String) {
    let from = from.to_str().expect("UTF-8 path");
    let mut args = vec!["import", reference, "--from", from];
    args.extend_from_slice(options);
    let summary = bootmesh_ok(state, &args);
    let hash = summary_value(&summary, "image").to_owned();
    assert!(
        hash.len() == 64 && hash.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "no manifest hash in the summary:\n{summary}"
    );
    (hash, summary)
}

/// The value of a `  label   value` line of an import summary or `show`.
fn summary_value<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| {
            line.trim_start()
                .strip_prefix(label)
                .filter(|rest| rest.starts_with(' '))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

/// The summary's `chunks     N (M already in the store, X MiB written)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ChunkCounts {
    chunks: u64,
    reused: u64,
    written_mib: f64,
}

fn chunk_counts(summary: &str) -> ChunkCounts {
    let line = summary_value(summary, "chunks");
    let parsed = line.split_once(" (").and_then(|(chunks, rest)| {
        let (reused, rest) = rest.split_once(" already in the store, ")?;
        let written = rest.strip_suffix(" MiB written)")?;
        Some(ChunkCounts {
            chunks: chunks.parse().ok()?,
            reused: reused.parse().ok()?,
            written_mib: written.parse().ok()?,
        })
    });
    parsed.unwrap_or_else(|| panic!("unexpected chunks line {line:?}"))
}

/// Exports `part` of `image` to `output` (which must succeed) and returns the bytes.
fn export(state: &Path, image: &str, part: &str, output: &Path) -> Vec<u8> {
    let output_argument = output.to_str().expect("UTF-8 path");
    bootmesh_ok(
        state,
        &["export", image, "--part", part, "-o", output_argument],
    );
    fs::read(output).unwrap_or_else(|error| panic!("read {}: {error}", output.display()))
}

/// Runs `program` (which must succeed) and returns its stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        lab::describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Unpacks a squashfs with unsquashfs (as root: owners, modes, devices, xattrs and hardlinks
/// restored) into `destination`, which must not exist yet.
fn unsquash(image: &Path, destination: &Path) {
    run_ok(
        "unsquashfs",
        &[
            "-quiet",
            "-no-progress",
            "-dest",
            destination.to_str().expect("UTF-8 path"),
            image.to_str().expect("UTF-8 path"),
        ],
    );
}

/// A failed command, with the line of stderr that says why.
fn assert_refused(output: &Output, what: &str, keyword: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{what} was accepted: {}",
        lab::describe(output)
    );
    assert!(
        !stderr.contains("panicked"),
        "{what} made bootmesh panic: {}",
        lab::describe(output)
    );
    let keyword_lower = keyword.to_lowercase();
    assert!(
        stderr
            .lines()
            .any(|line| line.to_lowercase().contains(&keyword_lower)),
        "{what}: no line of stderr says {keyword:?}: {}",
        lab::describe(output)
    );
}

/// What is wrong with the reason an operator reads, if anything: the cause under anyhow's
/// `Caused by:` (or the `Error:` line when there is no cause) must be one line, with nothing
/// from the input that could move the cursor or ring the bell.
fn reason_problem(output: &Output) -> Option<String> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason: Vec<&str> = match stderr.split_once("Caused by:") {
        Some((_, causes)) => causes
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect(),
        None => stderr
            .lines()
            .filter(|line| line.starts_with("Error: "))
            .collect(),
    };
    match reason.as_slice() {
        [line] if line.chars().any(char::is_control) => {
            Some(format!("the reason carries control characters: {line:?}"))
        }
        [_] => None,
        lines => Some(format!("the reason is {} lines: {lines:?}", lines.len())),
    }
}

// ---------------------------------------------------------------------------------------------
// Files and trees.

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Every path below `root` (directories included, `root` itself not), relative and sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let directory = root.join(&relative);
        for entry in fs::read_dir(&directory)
            .unwrap_or_else(|error| panic!("list {}: {error}", directory.display()))
        {
            let entry = entry.expect("directory entry");
            let child = relative.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                pending.push(child.clone());
            }
            paths.push(child);
        }
    }
    paths.sort();
    paths
}

/// Every file and directory of the store with the sha256 of its bytes (directories map to
/// zeros, so an empty directory left behind shows too). `lock` is left out: taking it is
/// not a change.
fn snapshot(store: &Path) -> BTreeMap<PathBuf, [u8; 32]> {
    walk(store)
        .into_iter()
        .filter(|relative| relative != Path::new("lock"))
        .map(|relative| {
            let path = store.join(&relative);
            let digest = if path.is_dir() {
                [0; 32]
            } else {
                Sha256::digest(fs::read(&path).expect("read store file")).into()
            };
            (relative, digest)
        })
        .collect()
}

/// Names the paths two snapshots disagree on.
fn assert_same_snapshot(
    what: &str,
    actual: &BTreeMap<PathBuf, [u8; 32]>,
    expected: &BTreeMap<PathBuf, [u8; 32]>,
) {
    let paths: BTreeSet<&PathBuf> = actual.keys().chain(expected.keys()).collect();
    let differences: Vec<String> = paths
        .into_iter()
        .filter_map(|path| match (actual.get(path), expected.get(path)) {
            (Some(_), None) => Some(format!("added {}", path.display())),
            (None, Some(_)) => Some(format!("removed {}", path.display())),
            (Some(left), Some(right)) if left != right => {
                Some(format!("changed {}", path.display()))
            }
            _ => None,
        })
        .collect();
    assert!(
        differences.is_empty(),
        "{what} changed the store:\n{}",
        differences.join("\n")
    );
}

/// Chunk files in the store and their total length.
fn chunk_files(store: &Path) -> (usize, u64) {
    let chunks = store.join("chunks");
    walk(&chunks)
        .into_iter()
        .map(|relative| chunks.join(relative))
        .filter(|path| path.is_file())
        .fold((0, 0), |(count, bytes), path| {
            (count + 1, bytes + fs::metadata(&path).expect("chunk").len())
        })
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read byte");
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, offset).expect("write byte");
}

/// What a tree entry is, as far as an image is concerned.
#[derive(Clone, PartialEq, Eq)]
enum Content {
    Directory,
    File(Vec<u8>),
    Symlink(PathBuf),
    CharDevice { major: u32, minor: u32 },
    Fifo,
}

/// One entry of a tree: everything a booted node could observe about it except its inode
/// number (hardlinks are named by the first path of their inode instead).
#[derive(Clone, PartialEq, Eq)]
struct Entry {
    content: Content,
    /// Permission bits with setuid, setgid and sticky.
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// For a non-directory with several links: the first path, in sorted order, of its inode.
    same_inode_as: Option<PathBuf>,
}

/// Short files as text and long ones by length and digest, so a difference reads at a glance.
impl std::fmt::Debug for Content {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory => write!(formatter, "directory"),
            Self::File(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) if bytes.len() <= 64 => write!(formatter, "file {text:?}"),
                _ => write!(
                    formatter,
                    "file of {} bytes, sha256 {}",
                    bytes.len(),
                    sha256_hex(bytes)
                ),
            },
            Self::Symlink(target) => write!(formatter, "symlink to {}", target.display()),
            Self::CharDevice { major, minor } => {
                write!(formatter, "character device {major},{minor}")
            }
            Self::Fifo => write!(formatter, "fifo"),
        }
    }
}

/// Modes in octal and xattr values as text.
impl std::fmt::Debug for Entry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{:?}, mode {:04o}, owner {}:{}, mtime {}",
            self.content, self.mode, self.uid, self.gid, self.mtime
        )?;
        for (name, value) in &self.xattrs {
            write!(
                formatter,
                ", xattr {name}={:?}",
                String::from_utf8_lossy(value)
            )?;
        }
        if let Some(first_path) = &self.same_inode_as {
            write!(formatter, ", same inode as {}", first_path.display())?;
        }
        Ok(())
    }
}

impl Entry {
    fn new(content: Content, mode: u32, uid: u32, gid: u32) -> Self {
        Self {
            content,
            mode,
            uid,
            gid,
            mtime: i64::try_from(LAYERED_CREATED_UNIX_SECS).expect("fits"),
            xattrs: BTreeMap::new(),
            same_inode_as: None,
        }
    }

    fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.insert(name.to_owned(), value.to_vec());
        self
    }

    fn linked_to(mut self, first_path: &str) -> Self {
        self.same_inode_as = Some(PathBuf::from(first_path));
        self
    }
}

fn directory(mode: u32, uid: u32, gid: u32) -> Entry {
    Entry::new(Content::Directory, mode, uid, gid)
}

fn regular(mode: u32, uid: u32, gid: u32, bytes: &[u8]) -> Entry {
    Entry::new(Content::File(bytes.to_vec()), mode, uid, gid)
}

fn symlink_to(target: &str) -> Entry {
    Entry::new(Content::Symlink(PathBuf::from(target)), 0o777, 0, 0)
}

fn xattrs_of(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    let length = rustix::fs::llistxattr(path, &mut names[..])
        .unwrap_or_else(|error| panic!("list xattrs of {}: {error}", path.display()));
    names[..length]
        .split(|byte| *byte == 0)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let name = String::from_utf8(name.to_vec()).expect("UTF-8 xattr name");
            let mut value = vec![0u8; 64 * 1024];
            let value_length = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..])
                .unwrap_or_else(|error| panic!("read xattr {name} of {}: {error}", path.display()));
            value.truncate(value_length);
            (name, value)
        })
        .collect()
}

/// Everything below `root` (not `root` itself), read back from disk.
fn describe_tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut first_path_of_inode: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut tree = BTreeMap::new();
    for relative in walk(root) {
        let path = root.join(&relative);
        let metadata = fs::symlink_metadata(&path).expect("metadata");
        let kind = metadata.file_type();
        let content = if kind.is_dir() {
            Content::Directory
        } else if kind.is_file() {
            Content::File(fs::read(&path).expect("read file"))
        } else if kind.is_symlink() {
            Content::Symlink(fs::read_link(&path).expect("read link"))
        } else if kind.is_char_device() {
            Content::CharDevice {
                major: rustix::fs::major(metadata.rdev()),
                minor: rustix::fs::minor(metadata.rdev()),
            }
        } else if kind.is_fifo() {
            Content::Fifo
        } else {
            panic!("{} is of an unexpected type {kind:?}", relative.display());
        };
        let same_inode_as = (!kind.is_dir() && metadata.nlink() > 1).then(|| {
            first_path_of_inode
                .entry((metadata.dev(), metadata.ino()))
                .or_insert_with(|| relative.clone())
                .clone()
        });
        tree.insert(
            relative,
            Entry {
                content,
                mode: metadata.mode() & 0o7777,
                uid: metadata.uid(),
                gid: metadata.gid(),
                mtime: metadata.mtime(),
                xattrs: xattrs_of(&path),
                same_inode_as,
            },
        );
    }
    tree
}

/// Names every path where two trees differ (a plain assert_eq would bury it in file bytes).
fn assert_same_tree(
    what: &str,
    actual: &BTreeMap<PathBuf, Entry>,
    expected: &BTreeMap<PathBuf, Entry>,
) {
    let paths: BTreeSet<&PathBuf> = actual.keys().chain(expected.keys()).collect();
    let differences: Vec<String> = paths
        .into_iter()
        .filter_map(|path| match (actual.get(path), expected.get(path)) {
            (Some(_), None) => Some(format!("unexpected {}", path.display())),
            (None, Some(_)) => Some(format!("missing {}", path.display())),
            (Some(left), Some(right)) if left != right => Some(format!(
                "{}:\n    got      {left:?}\n    expected {right:?}",
                path.display()
            )),
            _ => None,
        })
        .collect();
    assert!(
        differences.is_empty(),
        "{what} differs:\n{}",
        differences.join("\n")
    );
}

/// A small root tree: directories, an owner other than root, a symlink, and `file_count`
/// incompressible files of `file_bytes` each (so the squashfs is about their total).
fn write_rootfs(root: &Path, seed: u64, file_count: usize, file_bytes: usize) {
    fs::create_dir_all(root.join("etc")).expect("mkdir");
    fs::create_dir_all(root.join("usr/lib/data")).expect("mkdir");
    fs::write(root.join("etc/hostname"), b"node\n").expect("write");
    std::os::unix::fs::chown(root.join("etc/hostname"), Some(1000), Some(1000)).expect("chown");
    std::os::unix::fs::symlink("../usr/lib", root.join("etc/lib")).expect("symlink");
    for index in 0..file_count {
        fs::write(
            root.join(format!("usr/lib/data/blob{index:02}")),
            lab::deterministic_bytes(seed + index as u64, file_bytes),
        )
        .expect("write");
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn write_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        let path = root.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, bytes).expect("write");
    }
}

// ---------------------------------------------------------------------------------------------
// Building layers and image archives.

/// A tar stream built entry by entry in the order a test needs: order is meaning here (an
/// opaque whiteout spares only what its own layer wrote before it).
struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl LayerBuilder {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(LAYER_ENTRY_MTIME);
        header.set_size(0);
        header
    }

    fn dir(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(EntryType::Directory, mode, uid, gid);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .expect("append directory");
        self
    }

    fn file(mut self, path: &str, mode: u32, uid: u64, gid: u64, bytes: &[u8]) -> Self {
        let mut header = Self::header(EntryType::Regular, mode, uid, gid);
        header.set_size(bytes.len() as u64);
        self.builder
            .append_data(&mut header, path, bytes)
            .expect("append file");
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(EntryType::Symlink, 0o777, 0, 0);
        self.builder
            .append_link(&mut header, path, target)
            .expect("append symlink");
        self
    }

    /// A hardlink to `target`, a path from the image root (as `docker save` writes them).
    fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(EntryType::Link, 0o644, 0, 0);
        self.builder
            .append_link(&mut header, path, target)
            .expect("append hardlink");
        self
    }

    fn char_device(mut self, path: &str, mode: u32, major: u32, minor: u32) -> Self {
        let mut header = Self::header(EntryType::Char, mode, 0, 0);
        header.set_device_major(major).expect("device major");
        header.set_device_minor(minor).expect("device minor");
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .expect("append device");
        self
    }

    fn fifo(mut self, path: &str, mode: u32) -> Self {
        let mut header = Self::header(EntryType::Fifo, mode, 0, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .expect("append fifo");
        self
    }

    /// `DIRECTORY/.wh.NAME`: deletes `path` from the layers below.
    fn whiteout(self, path: &str) -> Self {
        let (directory, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if directory.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{directory}/.wh.{name}")
        };
        self.file(&marker, 0o644, 0, 0, b"")
    }

    /// `DIRECTORY/.wh..wh..opq`: hides what the layers below put in `directory`.
    fn opaque(self, directory: &str) -> Self {
        self.file(&format!("{directory}/.wh..wh..opq"), 0o644, 0, 0, b"")
    }

    /// A PAX `SCHILY.xattr.NAME` record for the entry appended next.
    fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{name}");
        self.builder
            .append_pax_extensions([(key.as_str(), value)])
            .expect("append PAX header");
        self
    }

    /// A regular file whose name is written as given, bypassing the tar crate's refusal of
    /// `..` (a hostile archive would not ask it).
    fn file_with_raw_name(mut self, name: &[u8], bytes: &[u8]) -> Self {
        let mut header = Self::header(EntryType::Regular, 0o644, 0, 0);
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_size(bytes.len() as u64);
        header.set_cksum();
        self.builder
            .append(&header, bytes)
            .expect("append raw entry");
        self
    }

    /// The files of an image archive, with a directory entry before each new directory.
    fn members(mut self, files: &[(String, Vec<u8>)]) -> Self {
        let mut directories = BTreeSet::new();
        for (name, bytes) in files {
            let parents: Vec<&Path> = Path::new(name)
                .ancestors()
                .skip(1)
                .filter(|parent| !parent.as_os_str().is_empty())
                .collect();
            for parent in parents.into_iter().rev() {
                if directories.insert(parent.to_path_buf()) {
                    self = self.dir(parent.to_str().expect("UTF-8 name"), 0o755, 0, 0);
                }
            }
            self = self.file(name, 0o644, 0, 0, bytes);
        }
        self
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }
}

fn tar_archive(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    LayerBuilder::new().members(files).finish()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn image_config(layers: &[Vec<u8>], created: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|layer| format!("sha256:{}", sha256_hex(layer)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": { "Cmd": ["/sbin/init"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("config JSON")
}

/// The members of a `docker save` archive of `layers` (uncompressed, named by their sha256
/// like Docker does): manifest and config first, so a cut in the middle lands in a layer.
fn docker_save_files(layers: &[Vec<u8>], created: &str) -> Vec<(String, Vec<u8>)> {
    let config = image_config(layers, created);
    let config_name = format!("{}.json", sha256_hex(&config));
    let layer_names: Vec<String> = layers
        .iter()
        .map(|layer| format!("{}/layer.tar", sha256_hex(layer)))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["bootmesh/test:latest"],
        "Layers": layer_names,
    }]))
    .expect("manifest JSON");
    let mut files = vec![
        ("manifest.json".to_owned(), manifest),
        (config_name, config),
    ];
    files.extend(layer_names.into_iter().zip(layers.iter().cloned()));
    files
}

/// An OCI image layout of `layers`: every member, and the member name of each layer blob.
/// The first layer stays an uncompressed `tar`, the others are `tar+gzip`, so both media
/// types are read.
fn oci_files(layers: &[Vec<u8>], created: &str) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let blob = |bytes: &[u8]| (format!("sha256:{}", sha256_hex(bytes)), bytes.len());
    let blob_name = |digest: &str| format!("blobs/sha256/{}", &digest["sha256:".len()..]);
    let mut files = Vec::new();
    let mut layer_names = Vec::new();
    let mut descriptors = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        let (bytes, media_type) = if index == 0 {
            (layer.clone(), "application/vnd.oci.image.layer.v1.tar")
        } else {
            (gzip(layer), "application/vnd.oci.image.layer.v1.tar+gzip")
        };
        let (digest, size) = blob(&bytes);
        descriptors.push(serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": size,
        }));
        layer_names.push(blob_name(&digest));
        files.push((blob_name(&digest), bytes));
    }
    let config = image_config(layers, created);
    let (config_digest, config_size) = blob(&config);
    files.push((blob_name(&config_digest), config));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": descriptors,
    }))
    .expect("manifest JSON");
    let (manifest_digest, manifest_size) = blob(&manifest);
    files.push((blob_name(&manifest_digest), manifest));
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "org.opencontainers.image.ref.name": "latest" },
        }],
    }))
    .expect("index JSON");
    files.insert(0, ("index.json".to_owned(), index));
    files.insert(
        0,
        (
            "oci-layout".to_owned(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
    );
    (files, layer_names)
}

/// Three layers that use every feature a layer can: modes, owners, setuid, symlinks,
/// hardlinks within and across layers, a device node, a fifo, xattrs on a file and a
/// directory, a whiteout, an opaque directory, and type changes in both directions.
fn layered_image_layers() -> Vec<Vec<u8>> {
    let first = LayerBuilder::new()
        .dir("etc", 0o755, 0, 0)
        .file("etc/hostname", 0o644, 0, 0, b"layer one\n")
        .file("etc/obsolete", 0o644, 0, 0, b"deleted by layer three\n")
        .dir("opt", 0o755, 0, 0)
        .dir("opt/app", 0o755, 0, 0)
        .file("opt/app/one", 0o644, 0, 0, b"one\n")
        .file("opt/app/two", 0o644, 0, 0, b"two from layer one\n")
        .dir("usr", 0o755, 0, 0)
        .dir("usr/bin", 0o755, 0, 0)
        .file("usr/bin/tool", 0o755, 1000, 1000, b"#!/bin/sh\necho tool\n")
        .file("usr/bin/su", 0o4755, 0, 0, b"setuid root\n")
        .dir("var", 0o755, 0, 0)
        .file(
            "var/thing",
            0o644,
            0,
            0,
            b"a file that becomes a directory\n",
        )
        .dir("srv", 0o755, 0, 0)
        .dir("srv/data", 0o700, 1000, 1000)
        .file("srv/data/old", 0o600, 1000, 1000, b"old\n")
        .finish();
    let second = LayerBuilder::new()
        .hardlink("usr/bin/tool-hardlink", "usr/bin/tool")
        .symlink("usr/bin/tool-alias", "tool")
        .dir("home", 0o755, 0, 0)
        .xattr("user.bootmesh", b"directory")
        .dir("home/user", 0o750, 1000, 1000)
        .file("home/user/notes", 0o600, 1000, 1000, b"notes\n")
        .hardlink("home/user/notes-again", "home/user/notes")
        .dir("dev", 0o755, 0, 0)
        .char_device("dev/null", 0o666, 1, 3)
        .dir("run", 0o755, 0, 0)
        .fifo("run/initctl", 0o600)
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .xattr("user.bootmesh", b"hello")
        .file("etc/config", 0o640, 0, 1000, b"key=value\n")
        .dir("var/thing", 0o755, 0, 0)
        .file("var/thing/inside", 0o644, 0, 0, b"inside\n")
        .finish();
    let third = LayerBuilder::new()
        .whiteout("etc/obsolete")
        .file("etc/hostname", 0o644, 0, 0, b"layer three\n")
        .file("opt/app/two", 0o644, 0, 0, b"two from layer three\n")
        .opaque("opt/app")
        .file("srv/data", 0o644, 0, 0, b"a directory that became a file\n")
        .finish();
    vec![first, second, third]
}

/// The tree the three layers make, written out by hand from the layer rules.
fn layered_image_tree() -> BTreeMap<PathBuf, Entry> {
    [
        ("dev", directory(0o755, 0, 0)),
        (
            "dev/null",
            Entry::new(Content::CharDevice { major: 1, minor: 3 }, 0o666, 0, 0),
        ),
        ("etc", directory(0o755, 0, 0)),
        (
            "etc/config",
            regular(0o640, 0, 1000, b"key=value\n").xattr("user.bootmesh", b"hello"),
        ),
        ("etc/hostname", regular(0o644, 0, 0, b"layer three\n")),
        ("etc/localtime", symlink_to("/usr/share/zoneinfo/UTC")),
        ("home", directory(0o755, 0, 0)),
        (
            "home/user",
            directory(0o750, 1000, 1000).xattr("user.bootmesh", b"directory"),
        ),
        (
            "home/user/notes",
            regular(0o600, 1000, 1000, b"notes\n").linked_to("home/user/notes"),
        ),
        (
            "home/user/notes-again",
            regular(0o600, 1000, 1000, b"notes\n").linked_to("home/user/notes"),
        ),
        ("opt", directory(0o755, 0, 0)),
        ("opt/app", directory(0o755, 0, 0)),
        (
            "opt/app/two",
            regular(0o644, 0, 0, b"two from layer three\n"),
        ),
        ("run", directory(0o755, 0, 0)),
        ("run/initctl", Entry::new(Content::Fifo, 0o600, 0, 0)),
        ("srv", directory(0o755, 0, 0)),
        (
            "srv/data",
            regular(0o644, 0, 0, b"a directory that became a file\n"),
        ),
        ("usr", directory(0o755, 0, 0)),
        ("usr/bin", directory(0o755, 0, 0)),
        ("usr/bin/su", regular(0o4755, 0, 0, b"setuid root\n")),
        (
            "usr/bin/tool",
            regular(0o755, 1000, 1000, b"#!/bin/sh\necho tool\n").linked_to("usr/bin/tool"),
        ),
        ("usr/bin/tool-alias", symlink_to("tool")),
        (
            "usr/bin/tool-hardlink",
            regular(0o755, 1000, 1000, b"#!/bin/sh\necho tool\n").linked_to("usr/bin/tool"),
        ),
        ("var", directory(0o755, 0, 0)),
        ("var/thing", directory(0o755, 0, 0)),
        ("var/thing/inside", regular(0o644, 0, 0, b"inside\n")),
    ]
    .into_iter()
    .map(|(path, entry)| (PathBuf::from(path), entry))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn docker_and_oci_sources_of_one_layered_image_unpack_to_exactly_the_expected_tree() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    lab::require_program("unsquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let layers = layered_image_layers();
    let docker_archive = directory.path().join("docker-save.tar");
    fs::write(
        &docker_archive,
        tar_archive(&docker_save_files(&layers, LAYERED_CREATED_RFC3339)),
    )
    .expect("write");
    let (oci_members, _) = oci_files(&layers, LAYERED_CREATED_RFC3339);
    let oci_archive = directory.path().join("oci.tar");
    fs::write(&oci_archive, tar_archive(&oci_members)).expect("write");
    let oci_layout = directory.path().join("oci-layout");
    write_files(&oci_layout, &oci_members);

    let created = LAYERED_CREATED_UNIX_SECS.to_string();
    let sources = [
        ("node:docker", &docker_archive, "docker save archive"),
        ("node:oci", &oci_archive, "OCI image layout"),
        ("node:layout", &oci_layout, "OCI image layout"),
    ];
    let mut squashfs_images = Vec::new();
    for (index, (reference, source, kind)) in sources.iter().enumerate() {
        let (_, summary) = import(&state, reference, source, &["--created", &created]);
        assert!(
            summary.contains(kind),
            "{reference} is not a {kind}:\n{summary}"
        );
        if index > 0 {
            // The same tree makes the same squashfs, so nothing new reaches the store.
            let counts = chunk_counts(&summary);
            assert_eq!(counts.reused, counts.chunks, "{reference}:\n{summary}");
        }
        let exported = directory.path().join(format!("{index}.squashfs"));
        squashfs_images.push((reference, export(&state, reference, "squashfs", &exported)));
    }
    let (first_reference, first_image) = &squashfs_images[0];
    for (reference, image) in &squashfs_images[1..] {
        lab::assert_same_bytes(
            &format!("squashfs of {reference} against {first_reference}"),
            image,
            first_image,
        );
    }

    // Without --created the config's `created` is the image's time: the same bytes again.
    import(&state, "node:config-time", &oci_archive, &[]);
    let show = bootmesh_ok(&state, &["show", "node:config-time"]);
    assert_eq!(summary_value(&show, "created"), created, "{show}");
    let config_time_image = export(
        &state,
        "node:config-time",
        "squashfs",
        &directory.path().join("config-time.squashfs"),
    );
    lab::assert_same_bytes(
        "squashfs dated by the config",
        &config_time_image,
        first_image,
    );

    let extracted = directory.path().join("extracted");
    unsquash(&directory.path().join("0.squashfs"), &extracted);
    assert_same_tree(
        "the layered image's tree",
        &describe_tree(&extracted),
        &layered_image_tree(),
    );
}

#[test]
fn the_same_rootfs_imported_into_two_stores_gets_the_same_manifest_hash() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    lab::require_program("unsquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let tree = directory.path().join("rootfs");
    write_rootfs(&tree, 20, 4, 512 * 1024);
    let first_state = directory.path().join("first");
    let second_state = directory.path().join("second");

    // No --created: the time comes from the tree, and must be as stable as the rest.
    let (first_hash, _) = import(&first_state, "node:v1", &tree, &[]);
    let (second_hash, _) = import(&second_state, "node:v1", &tree, &[]);
    assert_eq!(first_hash, second_hash);

    let (again_hash, again_summary) = import(&first_state, "node:v1", &tree, &[]);
    assert_eq!(again_hash, first_hash);
    let counts = chunk_counts(&again_summary);
    assert_eq!(counts.reused, counts.chunks, "{again_summary}");
    assert!(counts.written_mib == 0.0, "{again_summary}");

    // A gzip tarball of the same tree unpacks to the same tree.
    let tarball = directory.path().join("rootfs.tar.gz");
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    for relative in walk(&tree) {
        builder
            .append_path_with_name(tree.join(&relative), &relative)
            .expect("append");
    }
    fs::write(&tarball, gzip(&builder.into_inner().expect("tar"))).expect("write");
    let show = bootmesh_ok(&first_state, &["show", "node:v1"]);
    let created = summary_value(&show, "created");
    let (_, tarball_summary) = import(
        &second_state,
        "node:tarball",
        &tarball,
        &["--created", created],
    );
    assert!(
        tarball_summary.contains("rootfs tarball"),
        "{tarball_summary}"
    );
    let trees: Vec<BTreeMap<PathBuf, Entry>> =
        [(&first_state, "node:v1"), (&second_state, "node:tarball")]
            .into_iter()
            .enumerate()
            .map(|(index, (state, reference))| {
                let image = directory.path().join(format!("{index}.squashfs"));
                export(state, reference, "squashfs", &image);
                let extracted = directory.path().join(format!("extracted-{index}"));
                unsquash(&image, &extracted);
                describe_tree(&extracted)
            })
            .collect();
    assert_same_tree("the tarball's tree", &trees[1], &trees[0]);
}

#[test]
fn exported_squashfs_kernel_and_initrd_are_byte_identical_to_the_imported_files() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");

    let squashfs_tree = directory.path().join("squashfs-tree");
    write_rootfs(&squashfs_tree, 30, 3, 700 * 1024);
    let squashfs = directory.path().join("ready.squashfs");
    run_ok(
        "mksquashfs",
        &[
            squashfs_tree.to_str().expect("UTF-8 path"),
            squashfs.to_str().expect("UTF-8 path"),
            "-noappend",
            "-quiet",
        ],
    );
    let original = fs::read(&squashfs).expect("read");
    let (file_hash, summary) = import(&state, "node:ready", &squashfs, &[]);
    assert!(summary.contains("squashfs image"), "{summary}");
    let exported = export(
        &state,
        "node:ready",
        "squashfs",
        &directory.path().join("ready.exported"),
    );
    lab::assert_same_bytes("exported squashfs", &exported, &original);

    // The same squashfs piped in is the same image.
    let piped = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .arg("image")
        .arg("--state-dir")
        .arg(&state)
        .args(["import", "node:ready", "--from", "-"])
        .stdin(fs::File::open(&squashfs).expect("open"))
        .output()
        .expect("run bootmesh");
    assert!(piped.status.success(), "{}", lab::describe(&piped));
    let piped_summary = String::from_utf8_lossy(&piped.stdout);
    assert_eq!(summary_value(&piped_summary, "image"), file_hash);

    // To stdout, too.
    let to_stdout = bootmesh(&state, &["export", "node:ready", "-o", "-"]);
    assert!(to_stdout.status.success(), "{}", lab::describe(&to_stdout));
    lab::assert_same_bytes("squashfs on stdout", &to_stdout.stdout, &original);

    // An image without a kernel has none to export.
    let no_kernel_target = directory.path().join("no-kernel");
    let no_kernel = bootmesh(
        &state,
        &[
            "export",
            "node:ready",
            "--part",
            "kernel",
            "-o",
            no_kernel_target.to_str().expect("UTF-8 path"),
        ],
    );
    assert_refused(&no_kernel, "exporting a missing kernel", "has no kernel");
    assert!(!no_kernel_target.exists());

    // The newest kernel of /boot and its initrd become the image's kernel and initrd.
    let boot_tree = directory.path().join("boot-tree");
    write_rootfs(&boot_tree, 40, 1, 256 * 1024);
    fs::create_dir_all(boot_tree.join("boot")).expect("mkdir");
    let kernel = lab::deterministic_bytes(41, 3 * MIB + 123);
    let initrd = lab::deterministic_bytes(42, 5 * MIB + 4567);
    fs::write(boot_tree.join("boot/vmlinuz-6.1.0-1-amd64"), &kernel).expect("write");
    fs::write(boot_tree.join("boot/initrd.img-6.1.0-1-amd64"), &initrd).expect("write");
    fs::write(boot_tree.join("boot/vmlinuz-5.10.0-28-amd64"), b"older").expect("write");
    fs::write(boot_tree.join("boot/initrd.img-5.10.0-28-amd64"), b"older").expect("write");
    let (_, boot_summary) = import(&state, "node:boot", &boot_tree, &["--created", "1"]);
    assert!(
        boot_summary.contains("kernel     3.0 MiB"),
        "{boot_summary}"
    );
    for (part, expected) in [("kernel", &kernel), ("initrd", &initrd)] {
        let bytes = export(
            &state,
            "node:boot",
            part,
            &directory.path().join(format!("{part}.exported")),
        );
        lab::assert_same_bytes(&format!("exported {part}"), &bytes, expected);
    }
}

/// `show`'s verity parameters: hash offset, salt and root hash.
fn verity_of(state: &Path, image: &str) -> (u64, String, String) {
    let show = bootmesh_ok(state, &["show", image]);
    let verity = summary_value(&show, "verity");
    let offset = verity
        .split(", ")
        .find_map(|field| field.strip_prefix("hash offset "))
        .unwrap_or_else(|| panic!("no hash offset in {verity:?}"))
        .parse()
        .expect("hash offset");
    let salt = verity
        .split(", ")
        .find_map(|field| field.strip_prefix("salt "))
        .unwrap_or_else(|| panic!("no salt in {verity:?}"))
        .to_owned();
    let root_hash = summary_value(&show, "root hash").to_owned();
    (offset, salt, root_hash)
}

#[test]
fn veritysetup_accepts_the_exported_root_and_rejects_it_after_one_flipped_byte() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    lab::require_program("veritysetup");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let tree = directory.path().join("rootfs");
    write_rootfs(&tree, 50, 8, MIB);
    import(&state, "node:v1", &tree, &["--created", "1"]);
    let (hash_offset, salt, root_hash) = verity_of(&state, "node:v1");
    let root = directory.path().join("root.img");
    export(&state, "node:v1", "root", &root);
    let root_argument = root.to_str().expect("UTF-8 path");
    let offset_argument = format!("--hash-offset={hash_offset}");

    let dump = run_ok("veritysetup", &["dump", root_argument, &offset_argument]);
    let dumped = |label: &str| {
        dump.lines()
            .find_map(|line| line.strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {label:?} in veritysetup dump:\n{dump}"))
            .to_owned()
    };
    assert_eq!(dumped("Salt:"), salt);
    assert_eq!(dumped("Hash algorithm:"), "sha256");
    assert_eq!(
        dumped("Data blocks:").parse::<u64>().expect("data blocks") * 4096,
        hash_offset
    );
    run_ok(
        "veritysetup",
        &[
            "verify",
            root_argument,
            root_argument,
            &root_hash,
            &offset_argument,
        ],
    );

    flip_byte(&root, hash_offset / 2 + 7);
    let tampered = Command::new("veritysetup")
        .args([
            "verify",
            root_argument,
            root_argument,
            &root_hash,
            &offset_argument,
        ])
        .output()
        .expect("run veritysetup");
    assert!(
        !tampered.status.success(),
        "veritysetup accepted a flipped data byte: {}",
        lab::describe(&tampered)
    );
}

#[test]
fn a_corrupt_chunk_is_named_by_verify_and_export_and_reimporting_repairs_it() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let store = state.join("images");
    let tree = directory.path().join("rootfs");
    write_rootfs(&tree, 60, 4, MIB);
    let (_, summary) = import(&state, "node:v1", &tree, &["--created", "1"]);
    let counts = chunk_counts(&summary);
    let good_root = export(
        &state,
        "node:v1",
        "root",
        &directory.path().join("good.img"),
    );

    // The tree has no /boot, so every chunk belongs to the root part.
    let chunks_directory = store.join("chunks");
    let victim = walk(&chunks_directory)
        .into_iter()
        .find(|relative| chunks_directory.join(relative).is_file())
        .expect("a chunk file");
    let victim_hash = victim
        .file_name()
        .and_then(|name| name.to_str())
        .expect("chunk name")
        .to_owned();
    let victim_path = chunks_directory.join(&victim);
    flip_byte(
        &victim_path,
        fs::metadata(&victim_path).expect("chunk").len() / 2,
    );

    for scope in [vec!["verify", "node:v1"], vec!["verify"]] {
        let verify = bootmesh(&state, &scope);
        assert!(
            !verify.status.success(),
            "{scope:?}: {}",
            lab::describe(&verify)
        );
        let report = String::from_utf8_lossy(&verify.stdout);
        assert!(
            report.contains(&format!("BAD chunk {victim_hash}")),
            "{scope:?} does not name the chunk: {}",
            lab::describe(&verify)
        );
    }

    let exports = directory.path().join("exports");
    fs::create_dir(&exports).expect("mkdir");
    let target = exports.join("root.img");
    let failed = bootmesh(
        &state,
        &[
            "export",
            "node:v1",
            "--part",
            "root",
            "-o",
            target.to_str().expect("UTF-8 path"),
        ],
    );
    assert_refused(&failed, "exporting a corrupt chunk", &victim_hash);
    assert_eq!(
        walk(&exports),
        Vec::<PathBuf>::new(),
        "a failed export left files behind"
    );

    let (_, repair_summary) = import(&state, "node:v1", &tree, &["--created", "1"]);
    let repair_counts = chunk_counts(&repair_summary);
    assert_eq!(repair_counts.chunks, counts.chunks, "{repair_summary}");
    assert_eq!(
        repair_counts.reused,
        counts.chunks - 1,
        "only the corrupt chunk is rewritten:\n{repair_summary}"
    );
    bootmesh_ok(&state, &["verify", "node:v1"]);
    let repaired_root = export(&state, "node:v1", "root", &target);
    lab::assert_same_bytes("root after the repair", &repaired_root, &good_root);
}

/// Sources an import must refuse: what each is, its bytes, and a word the reason must say.
fn malformed_sources() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    const CREATED: &str = "2024-01-01T00:00:00Z";
    let payload_layer = LayerBuilder::new()
        .dir("data", 0o755, 0, 0)
        .file(
            "data/blob",
            0o644,
            0,
            0,
            &lab::deterministic_bytes(71, 2 * MIB),
        )
        .finish();
    let escaping_layer = |name: &[u8]| {
        LayerBuilder::new()
            .dir("etc", 0o755, 0, 0)
            .file_with_raw_name(name, b"escaped\n")
            .finish()
    };
    let docker_archive_of = |layer: Vec<u8>| tar_archive(&docker_save_files(&[layer], CREATED));

    let whole = docker_archive_of(payload_layer.clone());
    let truncated = whole[..whole.len() / 2].to_vec();

    let mut not_json = docker_save_files(std::slice::from_ref(&payload_layer), CREATED);
    not_json[0].1 = b"[{\"Config\": \"this is not JSON".to_vec();

    let (mut oci_members, layer_names) = oci_files(std::slice::from_ref(&payload_layer), CREATED);
    // The first OCI layer is an uncompressed tar, so the tampered blob still parses: only
    // the digest can catch it.
    let layer_member = oci_members
        .iter_mut()
        .find(|(name, _)| name == &layer_names[0])
        .expect("layer blob");
    let middle = layer_member.1.len() / 2;
    layer_member.1[middle] ^= 0x5a;

    // Five levels up from the staging rootfs is the test's own directory.
    let escaping_archive = LayerBuilder::new()
        .file_with_raw_name(b"../../../../../escape", b"escaped\n")
        .members(&docker_save_files(&[payload_layer], CREATED))
        .finish();

    vec![
        ("a docker save archive cut in a layer", truncated, "tar"),
        (
            "a manifest.json that is not JSON",
            tar_archive(&not_json),
            "JSON",
        ),
        (
            "an OCI layer that does not match its digest",
            tar_archive(&oci_members),
            "digest",
        ),
        (
            "a layer with ../escape",
            docker_archive_of(escaping_layer(b"../escape")),
            "leaves the image root",
        ),
        (
            "a layer with ../../../../../escape",
            docker_archive_of(escaping_layer(b"../../../../../escape")),
            "leaves the image root",
        ),
        (
            "an archive member outside the archive",
            escaping_archive,
            "leaves the archive root",
        ),
        (
            "a garbage file",
            lab::deterministic_bytes(72, 64 * 1024),
            "tar",
        ),
        ("an empty file", Vec::new(), "empty"),
        (
            "a file that only starts like a squashfs",
            [b"hsqs".as_slice(), &lab::deterministic_bytes(73, 64 * 1024)].concat(),
            "squashfs",
        ),
        ("a squashfs cut in half", truncated_squashfs(), "truncated"),
    ]
}

/// A real squashfs of a few files, cut in half.
fn truncated_squashfs() -> Vec<u8> {
    let directory = tempfile::tempdir().expect("tempdir");
    let tree = directory.path().join("tree");
    fs::create_dir_all(&tree).expect("tree");
    fs::write(tree.join("file"), lab::deterministic_bytes(74, 256 * 1024)).expect("file");
    let image = directory.path().join("image.sqfs");
    let output = std::process::Command::new("mksquashfs")
        .arg(&tree)
        .arg(&image)
        .args(["-noappend", "-quiet", "-no-progress"])
        .output()
        .expect("run mksquashfs");
    assert!(
        output.status.success(),
        "mksquashfs: {}",
        lab::describe(&output)
    );
    let bytes = fs::read(&image).expect("squashfs");
    bytes[..bytes.len() / 2].to_vec()
}

/// Imports each malformed source as `node:bad`; returns each one's output.
fn import_malformed(directory: &Path, state: &Path) -> Vec<(&'static str, Output, &'static str)> {
    malformed_sources()
        .into_iter()
        .enumerate()
        .map(|(index, (what, bytes, keyword))| {
            let source = directory.join(format!("bad-{index}"));
            fs::write(&source, bytes).expect("write");
            let source_argument = source.to_str().expect("UTF-8 path");
            let output = bootmesh(state, &["import", "node:bad", "--from", source_argument]);
            (what, output, keyword)
        })
        .collect()
}

#[test]
fn malformed_sources_are_refused_with_a_reason_and_leave_the_store_as_it_was() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let store = state.join("images");
    let tree = directory.path().join("rootfs");
    write_rootfs(&tree, 70, 2, 256 * 1024);
    import(&state, "node:v1", &tree, &["--created", "1"]);
    let before = snapshot(&store);

    let mut checked = 0;
    for (what, output, keyword) in import_malformed(directory.path(), &state) {
        assert_refused(&output, what, keyword);
        assert_same_snapshot(what, &snapshot(&store), &before);
        checked += 1;
    }
    assert_eq!(checked, malformed_sources().len());
    let escaped: Vec<PathBuf> = walk(directory.path())
        .into_iter()
        .filter(|relative| relative.file_name().is_some_and(|name| name == "escape"))
        .collect();
    assert!(
        escaped.is_empty(),
        "files escaped the image root: {escaped:?}"
    );
    bootmesh_ok(&state, &["verify"]);
}

#[test]
fn every_malformed_source_is_explained_in_one_printable_line() {
    if !lab::enabled() {
        return;
    }
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let problems: Vec<String> = import_malformed(directory.path(), &state)
        .into_iter()
        .filter_map(|(what, output, _)| {
            reason_problem(&output).map(|problem| format!("{what}: {problem}"))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `list`'s rows as (reference, groups); `list --json` says the same.
fn listed(state: &Path) -> Vec<(String, String)> {
    let rows: Vec<(String, String)> = bootmesh_ok(state, &["list"])
        .lines()
        .skip(1)
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            (
                words.first().expect("reference").to_string(),
                words.last().expect("groups").to_string(),
            )
        })
        .collect();
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&bootmesh_ok(state, &["list", "--json"])).expect("list --json");
    let from_json: Vec<(String, String)> = json
        .iter()
        .map(|listing| {
            let groups: Vec<&str> = listing["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect();
            let groups = if groups.is_empty() {
                "-".to_owned()
            } else {
                groups.join(",")
            };
            (listing["image"].as_str().expect("image").to_owned(), groups)
        })
        .collect();
    assert_eq!(rows, from_json, "list and list --json agree");
    rows
}

fn row(reference: &str, groups: &str) -> (String, String) {
    (reference.to_owned(), groups.to_owned())
}

#[test]
fn promote_rollback_rm_and_gc_never_take_chunks_from_a_kept_image() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let store = state.join("images");
    let tree = directory.path().join("rootfs");
    write_rootfs(&tree, 80, 8, MIB);
    let (_, v1_summary) = import(&state, "node:v1", &tree, &["--created", "1"]);
    let v1_counts = chunk_counts(&v1_summary);
    bootmesh_ok(&state, &["promote", "node:v1", "--group", "workers"]);

    fs::write(
        tree.join("usr/lib/data/blob04"),
        lab::deterministic_bytes(800, MIB),
    )
    .expect("write");
    let (v2_hash, v2_summary) = import(&state, "node:v2", &tree, &["--created", "1"]);
    let v2_counts = chunk_counts(&v2_summary);
    let v2_only_chunks = v2_counts.chunks - v2_counts.reused;
    assert!(
        v2_counts.reused > 0 && v2_only_chunks > 0,
        "v2 should share some chunks with v1 and add some:\n{v2_summary}"
    );
    assert_eq!(
        chunk_files(&store).0 as u64,
        v1_counts.chunks + v2_only_chunks
    );

    let promoted = bootmesh_ok(&state, &["promote", "node:v2", "--group", "workers"]);
    assert!(
        promoted.contains("group workers now boots node:v2"),
        "{promoted}"
    );
    assert_eq!(
        listed(&state),
        vec![row("node:v1", "-"), row("node:v2", "workers")]
    );
    assert_refused(
        &bootmesh(&state, &["rm", "node:v2"]),
        "removing the image a group boots",
        "workers",
    );

    let rolled_back = bootmesh_ok(&state, &["rollback", "--group", "workers"]);
    assert!(
        rolled_back.contains("group workers now boots node:v1 again"),
        "{rolled_back}"
    );
    assert_eq!(
        listed(&state),
        vec![row("node:v1", "workers"), row("node:v2", "-")]
    );
    assert_refused(
        &bootmesh(&state, &["rollback", "--group", "workers"]),
        "a second rollback",
        "no earlier image",
    );
    bootmesh_ok(&state, &["rm", "node:v2"]);
    assert_eq!(listed(&state), vec![row("node:v1", "workers")]);

    let v1_root = export(
        &state,
        "node:v1",
        "root",
        &directory.path().join("before.img"),
    );
    // An image being fetched (a server following the cluster's catalog pins it before it
    // stores the manifest) is kept by gc although no tag names it yet.
    let opened = transfer::ChunkStore::open(&store, 1 << 20).expect("open the store");
    let pinned: transfer::ContentHash = v2_hash.parse().expect("a manifest hash");
    {
        let lock = opened.lock_for_writing().expect("the writers' lock");
        opened.pin_manifest(&pinned, &lock).expect("pin");
    }
    let kept = bootmesh_ok(&state, &["gc"]);
    assert!(kept.contains("removed 0 manifests and 0 chunks"), "{kept}");
    opened.unpin_manifest(&pinned).expect("unpin");
    let collected = bootmesh_ok(&state, &["gc"]);
    assert!(
        collected.contains(&format!("removed 1 manifests and {v2_only_chunks} chunks")),
        "{collected}"
    );
    assert_eq!(chunk_files(&store).0 as u64, v1_counts.chunks);
    bootmesh_ok(&state, &["verify", "node:v1"]);
    bootmesh_ok(&state, &["verify"]);
    let after = export(
        &state,
        "node:v1",
        "root",
        &directory.path().join("after.img"),
    );
    lab::assert_same_bytes("node:v1 after gc", &after, &v1_root);
    assert!(
        !bootmesh(&state, &["show", &v2_hash]).status.success(),
        "the collected manifest is still there"
    );
}

/// xorshift64: fast, seedable, and good enough to defeat compression and deduplication.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `length` bytes that zstd halves, as it does real binaries, while no two files share a
/// chunk: every 4 KiB block is 2 KiB of noise followed by 2 KiB of zeros. (Noise from a
/// 16-letter alphabet compresses 2:1 too, but zstd's high levels crawl through it: mksquashfs
/// at its default level 15 managed 11 MB/s here, three minutes for this test's two imports;
/// noise and zeros go through at about 60 MB/s at any level.)
fn compressible_bytes(seed: u64, length: usize) -> Vec<u8> {
    const BLOCK_BYTES: usize = 4096;
    const NOISE_BYTES: usize = BLOCK_BYTES / 2;
    let mut random = Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut bytes = vec![0u8; length.next_multiple_of(BLOCK_BYTES)];
    for block in bytes.chunks_exact_mut(BLOCK_BYTES) {
        for word in block[..NOISE_BYTES].chunks_exact_mut(8) {
            word.copy_from_slice(&random.next().to_le_bytes());
        }
    }
    bytes.truncate(length);
    bytes
}

#[test]
fn an_import_killed_with_sigkill_leaves_no_torn_chunk_and_the_next_writer_cleans_up() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let store = state.join("images");
    let small = directory.path().join("small");
    write_rootfs(&small, 80, 2, 256 * 1024);
    import(&state, "node:v0", &small, &["--created", "1"]);
    let before = snapshot(&store);

    // A tree big enough that the import is still writing chunks when it is killed.
    let big = directory.path().join("big");
    fs::create_dir_all(big.join("data")).expect("mkdir");
    for index in 0..48u64 {
        fs::write(
            big.join(format!("data/file{index:02}")),
            compressible_bytes(1000 + index, 8 * MIB),
        )
        .expect("write");
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .arg("image")
        .arg("--state-dir")
        .arg(&state)
        .args(["import", "node:big", "--from"])
        .arg(&big)
        .args(["--created", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start import");
    let chunks_before = chunk_files(&store).0;
    let writing = lab::wait_for(std::time::Duration::from_secs(120), || {
        chunk_files(&store).0 >= chunks_before + 20
    });
    child.kill().expect("SIGKILL the import");
    child.wait().expect("reap the import");
    assert!(writing.is_some(), "the import never started writing chunks");

    // Every chunk file on disk is whole: a scrub of the entire store passes.
    bootmesh_ok(&state, &["verify"]);
    // The dead import never published anything.
    assert!(!bootmesh_ok(&state, &["list"]).contains("node:big"));
    // The next writer removes the staging debris; gc removes the orphaned chunks; the store
    // is then exactly what it was.
    bootmesh_ok(&state, &["gc"]);
    assert_same_snapshot("after kill -9 and gc", &snapshot(&store), &before);
}

#[test]
fn growing_one_file_of_a_1_gib_image_reuses_at_least_80_percent_of_its_chunks() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    const TREE_BYTES: u64 = 1 << 30;
    const FILE_BYTES_MIN: f64 = 64.0 * 1024.0;
    const FILE_BYTES_MAX: f64 = 20.0 * 1024.0 * 1024.0;
    const EDITED_FILE_BYTES: usize = 10 * MIB;
    const INSERTED_BYTES: usize = 100 * 1024;
    let started = Instant::now();
    let directory = tempfile::tempdir().expect("tempdir");
    let state = directory.path().join("state");
    let store = state.join("images");
    let tree = directory.path().join("rootfs");

    // Sizes skewed towards small files (cubed uniform draws), as in a real root tree.
    let mut random = Xorshift(0x0005_eed0_fb00_7000);
    let mut files: Vec<(PathBuf, usize)> = Vec::new();
    let mut total_bytes = 0u64;
    while total_bytes < TREE_BYTES {
        let draw = random.unit();
        let size =
            (FILE_BYTES_MIN + (FILE_BYTES_MAX - FILE_BYTES_MIN) * draw * draw * draw) as usize;
        let path = PathBuf::from(format!(
            "usr/lib/d{}/d{}/file{:03}.bin",
            random.next() % 8,
            random.next() % 4,
            files.len()
        ));
        total_bytes += size as u64;
        files.push((path, size));
    }
    files.sort();
    let median = files.len() / 2;
    files[median].1 = EDITED_FILE_BYTES;
    let seed_of = |index: usize| index as u64 + 1;
    for (index, (path, size)) in files.iter().enumerate() {
        let path = tree.join(path);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, compressible_bytes(seed_of(index), *size)).expect("write");
    }
    let tree_bytes: usize = files.iter().map(|(_, size)| size).sum();
    let generated = started.elapsed();

    // Imported under GNU time: the peak RSS of bootmesh and of the mksquashfs it runs (wait4
    // reports the largest of a process and its waited-for descendants).
    lab::require_program("/usr/bin/time");
    let measured = Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kib %M"])
        .arg(env!("CARGO_BIN_EXE_bootmesh"))
        .arg("image")
        .arg("--state-dir")
        .arg(&state)
        .args(["import", "node:v1", "--from"])
        .arg(&tree)
        .args(["--created", "1"])
        .output()
        .expect("run bootmesh under /usr/bin/time");
    assert!(
        measured.status.success(),
        "import v1: {}",
        lab::describe(&measured)
    );
    let v1_summary = String::from_utf8_lossy(&measured.stdout).into_owned();
    let peak_rss_kib: u64 = String::from_utf8_lossy(&measured.stderr)
        .lines()
        .find_map(|line| line.strip_prefix("peak-rss-kib "))
        .and_then(|kib| kib.trim().parse().ok())
        .expect("peak RSS from /usr/bin/time");
    eprintln!("import of a {tree_bytes}-byte tree: peak RSS {peak_rss_kib} KiB");
    assert!(
        peak_rss_kib < 256 * 1024,
        "importing 1 GiB took {peak_rss_kib} KiB of RSS (bound: 256 MiB)"
    );
    let v1_written_bytes = chunk_files(&store).1;
    let v1_imported = started.elapsed();

    // Grow the median file by inserting bytes in its middle: everything after it shifts.
    let (edited_path, _) = &files[median];
    let mut edited = compressible_bytes(seed_of(median), EDITED_FILE_BYTES);
    let insert_at = EDITED_FILE_BYTES / 2 + 1234;
    edited.splice(
        insert_at..insert_at,
        compressible_bytes(0xfeed, INSERTED_BYTES),
    );
    fs::write(tree.join(edited_path), &edited).expect("write");
    let (_, v2_summary) = import(&state, "node:v2", &tree, &["--created", "1"]);
    let v2_written_bytes = chunk_files(&store).1 - v1_written_bytes;
    let v2_imported = started.elapsed();

    let v1_counts = chunk_counts(&v1_summary);
    let v2_counts = chunk_counts(&v2_summary);
    let ratio = v2_counts.reused as f64 / v2_counts.chunks as f64;
    eprintln!(
        "chunk reuse: {} files, {tree_bytes} bytes of tree; v1 {} chunks, {v1_written_bytes} \
         bytes written; v2 (file {} grown by {INSERTED_BYTES} bytes) {} chunks, {} reused \
         (ratio {ratio:.4}), {v2_written_bytes} bytes written; generate {:.1} s, import v1 \
         {:.1} s, import v2 {:.1} s",
        files.len(),
        v1_counts.chunks,
        edited_path.display(),
        v2_counts.chunks,
        v2_counts.reused,
        generated.as_secs_f64(),
        (v1_imported - generated).as_secs_f64(),
        (v2_imported - v1_imported).as_secs_f64(),
    );
    eprintln!("v1 summary:\n{v1_summary}v2 summary:\n{v2_summary}");
    assert!(
        ratio >= 0.80,
        "only {ratio:.3} of v2's chunks were already in the store:\n{v2_summary}"
    );
}
