//! The manifest: what an image is made of. Its rkyv bytes are hashed to name the image, and
//! bytes that come from disk or from a peer are only ever read through validated access
//! ([`Manifest::decode`]): bytecheck first, then the semantic checks in
//! [`Manifest::validate`].

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::hash::ContentHash;
use crate::reference::ImageReference;
use crate::verity::{VerityError, VerityParameters};

/// The manifest layout this build writes and reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// Largest manifest accepted: a 64 GiB image in 64 KiB chunks needs about 40 MiB.
pub const MANIFEST_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest chunk a manifest may name; the chunker's maximum is below it.
pub const CHUNK_BYTES_LIMIT: u32 = 16 * 1024 * 1024;
/// Longest kernel command line kept (Linux's own limit on x86 is 2 KiB; this leaves room).
pub const CMDLINE_BYTES_MAX: usize = 4096;

/// One stored chunk of a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ChunkRef {
    /// blake3 of the chunk's bytes.
    pub hash: ContentHash,
    /// The chunk's length.
    pub length_bytes: u32,
}

/// A file of the image (kernel, initrd, root image), as the chunks that make it up, in order.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Part {
    /// Total length: the sum of the chunk lengths.
    pub size_bytes: u64,
    /// The chunks, in file order.
    pub chunks: Vec<ChunkRef>,
}

/// The root image: a squashfs, zero-padded to the verity data block size, followed by the
/// dm-verity superblock and hash tree (`veritysetup` layout, hash offset = padded data size).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RootImage {
    /// The whole device: data, padding, verity superblock and hash tree.
    pub part: Part,
    /// Length of the squashfs as imported (`image export` writes exactly these bytes).
    pub squashfs_bytes: u64,
    /// How the kernel checks it.
    pub verity: VerityParameters,
}

/// An image: name, tag, the parts and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT_VERSION`].
    pub format_version: u32,
    /// Image name (`name` of `name:tag`).
    pub name: String,
    /// Image tag.
    pub tag: String,
    /// When the image was made (seconds since the Unix epoch): taken from the source (OCI
    /// config, newest file) so that the same input gives the same manifest.
    pub created_unix_secs: u64,
    /// Default kernel command line for nodes booting it.
    pub cmdline: String,
    /// The kernel, if the image carries one.
    pub kernel: Option<Part>,
    /// The initrd, if the image carries one.
    pub initrd: Option<Part>,
    /// The root file system.
    pub root: RootImage,
}

/// Which part of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PartName {
    /// The kernel.
    Kernel,
    /// The initrd.
    Initrd,
    /// The root image (squashfs + verity tree).
    Root,
}

impl PartName {
    /// Every part, in manifest order.
    pub const ALL: [Self; 3] = [Self::Kernel, Self::Initrd, Self::Root];

    /// The name used in paths and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Initrd => "initrd",
            Self::Root => "root",
        }
    }
}

impl std::str::FromStr for PartName {
    type Err = ManifestError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|part| part.as_str() == text)
            .ok_or_else(|| ManifestError::UnknownPart(text.chars().take(40).collect()))
    }
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Longer than [`MANIFEST_BYTES_MAX`].
    #[error("manifest of {length_bytes} bytes is larger than the {MANIFEST_BYTES_MAX}-byte limit")]
    TooLarge {
        /// What was offered.
        length_bytes: usize,
    },
    /// Not a well-formed archived manifest.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// A layout this build does not know.
    #[error(
        "manifest format version {0} is not supported (this build reads {MANIFEST_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    /// The bytes do not hash to the name they were fetched by.
    #[error("manifest hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        /// The name asked for.
        expected: ContentHash,
        /// What the bytes hash to.
        actual: ContentHash,
    },
    /// Name or tag outside the grammar.
    #[error("invalid image name or tag: {0}")]
    InvalidReference(String),
    /// A part whose chunk lengths do not add up, or a chunk of zero or excessive length.
    #[error("{part} part is inconsistent: {detail}")]
    InconsistentPart {
        /// Which part.
        part: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Verity parameters that do not describe this root image.
    #[error("root image verity parameters: {0}")]
    Verity(#[from] VerityError),
    /// A command line longer than [`CMDLINE_BYTES_MAX`].
    #[error("cmdline of {0} bytes is longer than {CMDLINE_BYTES_MAX}")]
    CmdlineTooLong(usize),
    /// A part name that is not kernel, initrd or root.
    #[error("no part named {0:?} (kernel, initrd, root)")]
    UnknownPart(String),
}

impl Manifest {
    /// The canonical bytes (rkyv) whose hash is the image's identity.
    pub fn encode(&self) -> Result<AlignedVec, ManifestError> {
        rkyv::to_bytes::<rancor::Error>(self)
            .map_err(|error| ManifestError::Malformed(error.to_string()))
    }

    /// Encodes and hashes: the identity of this manifest.
    pub fn identity(&self) -> Result<(ContentHash, AlignedVec), ManifestError> {
        let bytes = self.encode()?;
        Ok((ContentHash::of(&bytes), bytes))
    }

    /// Reads untrusted bytes: size bound, rkyv validation (bytecheck), then
    /// [`validate`](Self::validate). The bytes need no particular alignment.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::TooLarge {
                length_bytes: bytes.len(),
            });
        }
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let manifest = rkyv::from_bytes::<Self, rancor::Error>(&aligned)
            .map_err(|error| ManifestError::Malformed(error.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Reads untrusted bytes that were asked for by `expected` hash.
    pub fn decode_expecting(bytes: &[u8], expected: ContentHash) -> Result<Self, ManifestError> {
        let actual = ContentHash::of(bytes);
        if actual != expected {
            return Err(ManifestError::HashMismatch { expected, actual });
        }
        Self::decode(bytes)
    }

    /// The semantic checks every manifest passes before anything uses it.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion(self.format_version));
        }
        ImageReference::new(&self.name, &self.tag)
            .map_err(|error| ManifestError::InvalidReference(error.to_string()))?;
        if self.cmdline.len() > CMDLINE_BYTES_MAX {
            return Err(ManifestError::CmdlineTooLong(self.cmdline.len()));
        }
        if let Some(kernel) = &self.kernel {
            validate_part("kernel", kernel)?;
        }
        if let Some(initrd) = &self.initrd {
            validate_part("initrd", initrd)?;
        }
        validate_part("root", &self.root.part)?;
        self.root
            .verity
            .validate(self.root.squashfs_bytes, self.root.part.size_bytes)?;
        Ok(())
    }

    /// `name:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    /// A part by name, if present.
    pub fn part(&self, name: PartName) -> Option<&Part> {
        match name {
            PartName::Kernel => self.kernel.as_ref(),
            PartName::Initrd => self.initrd.as_ref(),
            PartName::Root => Some(&self.root.part),
        }
    }

    /// Every chunk of every part, in manifest order (duplicates included).
    pub fn all_chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        PartName::ALL
            .into_iter()
            .filter_map(|name| self.part(name))
            .flat_map(|part| part.chunks.iter())
    }
}

fn validate_part(name: &'static str, part: &Part) -> Result<(), ManifestError> {
    let mut total_bytes: u64 = 0;
    for (index, chunk) in part.chunks.iter().enumerate() {
        if chunk.length_bytes == 0 || chunk.length_bytes > CHUNK_BYTES_LIMIT {
            return Err(ManifestError::InconsistentPart {
                part: name,
                detail: format!("chunk {index} has length {}", chunk.length_bytes),
            });
        }
        total_bytes = total_bytes.saturating_add(u64::from(chunk.length_bytes));
    }
    if total_bytes != part.size_bytes {
        return Err(ManifestError::InconsistentPart {
            part: name,
            detail: format!(
                "chunks add up to {total_bytes} bytes, size says {}",
                part.size_bytes
            ),
        });
    }
    Ok(())
}
