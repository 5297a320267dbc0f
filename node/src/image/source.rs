//! What `image import --from SRC` can read, and how each kind becomes a root tree: a
//! `docker save` archive, an OCI image layout (directory or archive), a rootfs directory or
//! tarball, or a ready squashfs.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ImageError;
use super::layers::{LayerStatistics, apply_layer};

/// The kinds of source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A squashfs image, used as the root image unchanged.
    Squashfs(PathBuf),
    /// A directory holding the root tree.
    RootfsDirectory(PathBuf),
    /// A tar (optionally gzip-compressed) of the root tree.
    RootfsTarball(PathBuf),
    /// A `docker save` archive or its unpacked directory.
    DockerArchive(PathBuf),
    /// An OCI image layout directory or archive.
    OciLayout(PathBuf),
}

impl SourceKind {
    /// A short name for messages and the summary.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Squashfs(_) => "squashfs image",
            Self::RootfsDirectory(_) => "rootfs directory",
            Self::RootfsTarball(_) => "rootfs tarball",
            Self::DockerArchive(_) => "docker save archive",
            Self::OciLayout(_) => "OCI image layout",
        }
    }
}

const SQUASHFS_MAGIC: &[u8] = b"hsqs";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// Largest JSON document (manifest, index, config) read from an archive.
const JSON_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Most layers accepted in one image (Docker's own limit is 127).
const LAYERS_MAX: usize = 256;

/// A tar stream, transparently gunzipped.
pub fn open_maybe_compressed(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let file = File::open(path).map_err(ImageError::io("open", path))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf().map_err(ImageError::io("read", path))?;
    if head.starts_with(GZIP_MAGIC) {
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)));
    }
    if head.starts_with(ZSTD_MAGIC) {
        return Err(ImageError::malformed(format!(
            "{} is zstd-compressed, which this build does not read; use gzip or no compression",
            path.display()
        )));
    }
    Ok(Box::new(reader))
}

/// Top-level names in a tar stream (reads it through once).
fn tar_top_level_names(path: &Path) -> Result<Vec<String>, ImageError> {
    let mut archive = tar::Archive::new(open_maybe_compressed(path)?);
    let mut names = Vec::new();
    let entries = archive.entries().map_err(|error| {
        ImageError::malformed(format!("{} is not a tar archive: {error}", path.display()))
    })?;
    for entry in entries {
        let entry = entry.map_err(|error| {
            ImageError::malformed(format!(
                "{} is not a readable tar archive: {error}",
                path.display()
            ))
        })?;
        let entry_path = entry
            .path()
            .map_err(|error| ImageError::malformed(format!("tar entry path: {error}")))?;
        let mut components = entry_path
            .components()
            .filter(|component| !matches!(component, Component::CurDir | Component::RootDir));
        if let (Some(Component::Normal(first)), None) = (components.next(), components.next()) {
            names.push(first.to_string_lossy().into_owned());
        }
    }
    if names.is_empty() {
        return Err(ImageError::malformed(format!(
            "{} is an empty tar archive",
            path.display()
        )));
    }
    Ok(names)
}

/// Works out what `path` is.
pub fn detect(path: &Path) -> Result<SourceKind, ImageError> {
    let metadata = fs::metadata(path).map_err(ImageError::io("inspect", path))?;
    if metadata.is_dir() {
        if path.join("oci-layout").is_file() {
            return Ok(SourceKind::OciLayout(path.to_path_buf()));
        }
        if path.join("manifest.json").is_file() && !path.join("etc").exists() {
            return Ok(SourceKind::DockerArchive(path.to_path_buf()));
        }
        return Ok(SourceKind::RootfsDirectory(path.to_path_buf()));
    }
    let mut head = [0u8; 4];
    let head_length = File::open(path)
        .and_then(|mut file| file.read(&mut head))
        .map_err(ImageError::io("read", path))?;
    let head = head.get(..head_length).unwrap_or_default();
    if head.starts_with(SQUASHFS_MAGIC) {
        return Ok(SourceKind::Squashfs(path.to_path_buf()));
    }
    let names = tar_top_level_names(path)?;
    let has = |wanted: &str| names.iter().any(|name| name == wanted);
    if has("oci-layout") && has("index.json") {
        Ok(SourceKind::OciLayout(path.to_path_buf()))
    } else if has("manifest.json") && !has("etc") {
        Ok(SourceKind::DockerArchive(path.to_path_buf()))
    } else {
        Ok(SourceKind::RootfsTarball(path.to_path_buf()))
    }
}

/// Unpacks an archive of an image (docker save, OCI) into `directory`: regular files and
/// directories only, no path may leave it.
pub fn unpack_image_archive(archive_path: &Path, directory: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(directory).map_err(ImageError::io("create", directory))?;
    let mut archive = tar::Archive::new(open_maybe_compressed(archive_path)?);
    let entries = archive
        .entries()
        .map_err(|error| ImageError::malformed(format!("image archive: {error}")))?;
    for entry in entries {
        let mut entry = entry
            .map_err(|error| ImageError::malformed(format!("image archive entry: {error}")))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link()) {
            continue;
        }
        let unpacked = entry.unpack_in(directory).map_err(|error| {
            ImageError::malformed(format!(
                "image archive entry could not be unpacked: {error}"
            ))
        })?;
        if !unpacked {
            return Err(ImageError::malformed(
                "image archive entry leaves the archive root".to_owned(),
            ));
        }
    }
    Ok(())
}

/// How a member of an unpacked archive is named in messages: relative to the archive, since
/// the staging directory is gone by the time anyone reads the message.
fn member_name(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read_json(root: &Path, path: &Path) -> Result<serde_json::Value, ImageError> {
    let name = member_name(root, path);
    let file = File::open(path)
        .map_err(|error| ImageError::malformed(format!("the image has no {name}: {error}")))?;
    let mut bytes = Vec::new();
    file.take(JSON_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(ImageError::io("read", path))?;
    if bytes.len() as u64 > JSON_BYTES_MAX {
        return Err(ImageError::malformed(format!("{name} is too large")));
    }
    serde_json::from_slice(&bytes)
        .map_err(|error| ImageError::malformed(format!("{name} is not valid JSON: {error}")))
}

/// A path named inside an image archive, kept inside it.
fn archive_member(root: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let relative = Path::new(name);
    if relative
        .components()
        .any(|component| !matches!(component, Component::Normal(_) | Component::CurDir))
    {
        return Err(ImageError::malformed(format!(
            "archive names a path outside itself: {name:?}"
        )));
    }
    Ok(root.join(relative))
}

/// One layer to apply: a file, and the sha256 its (compressed) bytes must have, if known.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// Where the layer is.
    pub path: PathBuf,
    /// `sha256:` digest from an OCI manifest.
    pub sha256: Option<String>,
}

/// What an image archive says: its layers in order and when it was made.
#[derive(Debug, Clone)]
pub struct ImageLayers {
    /// Bottom first.
    pub layers: Vec<LayerBlob>,
    /// The config's `created`, if present and parseable.
    pub created_unix_secs: Option<u64>,
    /// The config's `Cmd`/`Entrypoint` are ignored: nodes boot the image's init.
    pub config_path: PathBuf,
}

/// Layers of an unpacked `docker save` archive.
pub fn docker_layers(root: &Path) -> Result<ImageLayers, ImageError> {
    let manifest = read_json(root, &root.join("manifest.json"))?;
    let images = manifest
        .as_array()
        .filter(|images| !images.is_empty())
        .ok_or_else(|| ImageError::malformed("manifest.json lists no image".to_owned()))?;
    if images.len() > 1 {
        tracing::warn!(
            count = images.len(),
            "docker archive holds several images; importing the first"
        );
    }
    let image = images
        .first()
        .ok_or_else(|| ImageError::malformed("no image".to_owned()))?;
    let config_name = image
        .get("Config")
        .and_then(|config| config.as_str())
        .ok_or_else(|| ImageError::malformed("manifest.json has no Config".to_owned()))?;
    let layer_names = image
        .get("Layers")
        .and_then(|layers| layers.as_array())
        .ok_or_else(|| ImageError::malformed("manifest.json has no Layers".to_owned()))?;
    if layer_names.len() > LAYERS_MAX {
        return Err(ImageError::malformed(format!(
            "{} layers is more than {LAYERS_MAX}",
            layer_names.len()
        )));
    }
    let mut layers = Vec::new();
    for name in layer_names {
        let name = name
            .as_str()
            .ok_or_else(|| ImageError::malformed("a layer name is not a string".to_owned()))?;
        let path = archive_member(root, name)?;
        // Newer `docker save` archives name layers by digest: check them when they do.
        let sha256 = name
            .strip_prefix("blobs/sha256/")
            .map(|hex| format!("sha256:{hex}"));
        layers.push(LayerBlob { path, sha256 });
    }
    let config_path = archive_member(root, config_name)?;
    let created_unix_secs = created_of(&read_json(root, &config_path)?);
    Ok(ImageLayers {
        layers,
        created_unix_secs,
        config_path,
    })
}

fn oci_blob(root: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or_else(|| ImageError::malformed(format!("digest {digest:?} has no algorithm")))?;
    if algorithm != "sha256" || hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_hexdigit())
    {
        return Err(ImageError::malformed(format!(
            "digest {digest:?} is not a sha256 digest"
        )));
    }
    Ok(root.join("blobs").join(algorithm).join(hex))
}

/// Layers of an OCI image layout directory (the linux/amd64 image if it holds several).
pub fn oci_layers(root: &Path) -> Result<ImageLayers, ImageError> {
    let mut document = read_json(root, &root.join("index.json"))?;
    // Follow nested indexes to an image manifest, a bounded number of times.
    for _ in 0..4 {
        let manifests = document
            .get("manifests")
            .and_then(|manifests| manifests.as_array())
            .filter(|manifests| !manifests.is_empty())
            .ok_or_else(|| ImageError::malformed("OCI index lists no manifest".to_owned()))?;
        let chosen = manifests
            .iter()
            .find(|descriptor| {
                let platform = descriptor.get("platform");
                platform.is_none_or(|platform| {
                    platform.get("os").and_then(|os| os.as_str()) == Some("linux")
                        && platform.get("architecture").and_then(|arch| arch.as_str())
                            == Some("amd64")
                })
            })
            .or_else(|| manifests.first())
            .ok_or_else(|| ImageError::malformed("OCI index lists no manifest".to_owned()))?;
        let digest = chosen
            .get("digest")
            .and_then(|digest| digest.as_str())
            .ok_or_else(|| ImageError::malformed("OCI descriptor has no digest".to_owned()))?;
        let blob = oci_blob(root, digest)?;
        check_sha256(&blob, digest)?;
        let next = read_json(root, &blob)?;
        if next.get("layers").is_some() {
            return oci_manifest_layers(root, &next);
        }
        document = next;
    }
    Err(ImageError::malformed(
        "OCI indexes nest too deeply".to_owned(),
    ))
}

fn oci_manifest_layers(
    root: &Path,
    manifest: &serde_json::Value,
) -> Result<ImageLayers, ImageError> {
    let config_digest = manifest
        .get("config")
        .and_then(|config| config.get("digest"))
        .and_then(|digest| digest.as_str())
        .ok_or_else(|| ImageError::malformed("OCI manifest has no config".to_owned()))?;
    let config_path = oci_blob(root, config_digest)?;
    check_sha256(&config_path, config_digest)?;
    let created_unix_secs = created_of(&read_json(root, &config_path)?);
    let descriptors = manifest
        .get("layers")
        .and_then(|layers| layers.as_array())
        .ok_or_else(|| ImageError::malformed("OCI manifest has no layers".to_owned()))?;
    if descriptors.len() > LAYERS_MAX {
        return Err(ImageError::malformed(format!(
            "{} layers is more than {LAYERS_MAX}",
            descriptors.len()
        )));
    }
    let mut layers = Vec::new();
    for descriptor in descriptors {
        let media_type = descriptor
            .get("mediaType")
            .and_then(|media_type| media_type.as_str())
            .unwrap_or_default();
        if media_type.contains("zstd") {
            return Err(ImageError::malformed(format!(
                "layer media type {media_type} (zstd) is not supported by this build"
            )));
        }
        let digest = descriptor
            .get("digest")
            .and_then(|digest| digest.as_str())
            .ok_or_else(|| ImageError::malformed("OCI layer has no digest".to_owned()))?;
        layers.push(LayerBlob {
            path: oci_blob(root, digest)?,
            sha256: Some(digest.to_owned()),
        });
    }
    Ok(ImageLayers {
        layers,
        created_unix_secs,
        config_path,
    })
}

fn check_sha256(path: &Path, digest: &str) -> Result<(), ImageError> {
    let mut file = File::open(path)
        .map_err(|error| ImageError::malformed(format!("blob {digest} is missing: {error}")))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(ImageError::io("read", path))?;
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    if digest.strip_prefix("sha256:") != Some(actual.as_str()) {
        return Err(ImageError::malformed(format!(
            "a blob does not match its digest {digest}: its bytes are sha256:{actual}"
        )));
    }
    Ok(())
}

/// Applies the layers in order to `root`.
pub fn apply_layers(
    layers: &ImageLayers,
    root: &Path,
    mut on_layer: impl FnMut(usize, u64),
) -> Result<LayerStatistics, ImageError> {
    fs::create_dir_all(root).map_err(ImageError::io("create", root))?;
    let mut statistics = LayerStatistics::default();
    for (index, layer) in layers.layers.iter().enumerate() {
        if let Some(digest) = &layer.sha256 {
            check_sha256(&layer.path, digest)?;
        }
        let length = fs::metadata(&layer.path)
            .map_err(|error| {
                ImageError::malformed(format!(
                    "layer {} of {} is missing from the archive: {error}",
                    index + 1,
                    layers.layers.len()
                ))
            })?
            .len();
        apply_layer(open_maybe_compressed(&layer.path)?, root, &mut statistics).map_err(
            |error| match error {
                ImageError::Malformed(detail) => ImageError::malformed(format!(
                    "layer {} of {}: {detail}",
                    index + 1,
                    layers.layers.len()
                )),
                other => other,
            },
        )?;
        on_layer(index, length);
    }
    Ok(statistics)
}

/// The `created` time of an image config (RFC 3339), in seconds since the epoch.
fn created_of(config: &serde_json::Value) -> Option<u64> {
    config
        .get("created")
        .and_then(|created| created.as_str())
        .and_then(parse_rfc3339)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)` to seconds since the epoch (none before it).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        text.get(range)
            .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))?
            .parse()
            .ok()
    };
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes.get(4) != Some(&b'-') || bytes.get(7) != Some(&b'-') {
        return None;
    }
    if !matches!(bytes.get(10), Some(b'T' | b't' | b' ')) || bytes.get(13) != Some(&b':') {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = text.get(19..)?;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        rest = fraction.get(digits..)?;
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let offset_hours: i64 = rest.get(1..3)?.parse().ok()?;
            let offset_minutes: i64 = rest.get(4..6)?.parse().ok()?;
            if rest.len() != 6 || rest.as_bytes().get(3) != Some(&b':') {
                return None;
            }
            sign * (offset_hours * 3600 + offset_minutes * 60)
        }
    };
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let year_shifted = if month <= 2 { year - 1 } else { year };
    let era = year_shifted.div_euclid(400);
    let year_of_era = year_shifted - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    u64::try_from(seconds).ok()
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.789123456Z"),
            Some(1_709_210_096)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T14:34:56+02:00"),
            Some(1_709_210_096)
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2024-02-29T14:34:56+0200"), None);
    }
}
