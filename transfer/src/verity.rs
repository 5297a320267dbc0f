//! dm-verity hash trees in the `veritysetup` on-disk format (version 1, sha256, 4 KiB blocks),
//! appended to the root image so that the kernel checks every block it reads, whoever served
//! it. The tree is written level by level through positional I/O on the image file, so memory
//! does not grow with the image.

use std::fs::File;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

/// Data and hash block size (the kernel's page size on the machines we boot).
pub const VERITY_BLOCK_BYTES: u32 = 4096;
/// sha256.
pub const VERITY_DIGEST_BYTES: usize = 32;
/// The superblock's own length; it occupies a whole hash block.
const SUPERBLOCK_BYTES: usize = 512;
/// Longest salt the format allows.
pub const VERITY_SALT_BYTES_MAX: usize = 256;
/// Hashes per hash block.
const HASHES_PER_BLOCK: u64 = (VERITY_BLOCK_BYTES as u64) / (VERITY_DIGEST_BYTES as u64);
/// Blocks read or written per positional I/O call.
const BATCH_BLOCKS: usize = 256;
/// The format's level limit.
const LEVELS_MAX: u32 = 63;

/// What the kernel (and `veritysetup`) need to check the root image.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VerityParameters {
    /// Always `sha256` here.
    pub algorithm: String,
    /// Data block size.
    pub data_block_bytes: u32,
    /// Hash block size.
    pub hash_block_bytes: u32,
    /// Data blocks covered (the padded squashfs).
    pub data_blocks: u64,
    /// Where the superblock starts: right after the data.
    pub hash_offset_bytes: u64,
    /// Salt, prepended to every hashed block (format version 1).
    pub salt: Vec<u8>,
    /// The root hash: what the kernel command line pins.
    pub root_hash: [u8; VERITY_DIGEST_BYTES],
}

/// Why a tree could not be built or its parameters do not fit the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerityError {
    /// The data area is empty or not a whole number of blocks.
    #[error("verity data area of {0} bytes is not a positive multiple of {VERITY_BLOCK_BYTES}")]
    DataSize(u64),
    /// Salt longer than the format allows.
    #[error("verity salt of {0} bytes is longer than {VERITY_SALT_BYTES_MAX}")]
    SaltTooLong(usize),
    /// Reading data or writing the tree failed.
    #[error("verity tree i/o: {0}")]
    Io(String),
    /// Parameters that do not describe the image they came with.
    #[error("{0}")]
    Inconsistent(String),
}

impl VerityParameters {
    /// The root hash as lowercase hex (what `veritysetup` prints and takes).
    pub fn root_hash_hex(&self) -> String {
        hex(&self.root_hash)
    }

    /// The salt as lowercase hex.
    pub fn salt_hex(&self) -> String {
        hex(&self.salt)
    }

    /// Checks that these parameters describe a root image whose squashfs is `squashfs_bytes`
    /// long and whose whole device is `device_bytes` long.
    pub fn validate(&self, squashfs_bytes: u64, device_bytes: u64) -> Result<(), VerityError> {
        let inconsistent = |detail: String| Err(VerityError::Inconsistent(detail));
        if self.algorithm != "sha256" {
            return inconsistent(format!("algorithm {:?} is not sha256", self.algorithm));
        }
        if self.data_block_bytes != VERITY_BLOCK_BYTES
            || self.hash_block_bytes != VERITY_BLOCK_BYTES
        {
            return inconsistent(format!(
                "block sizes {}/{} are not {VERITY_BLOCK_BYTES}",
                self.data_block_bytes, self.hash_block_bytes
            ));
        }
        if self.salt.len() > VERITY_SALT_BYTES_MAX {
            return Err(VerityError::SaltTooLong(self.salt.len()));
        }
        let expected_offset = self.data_blocks.checked_mul(u64::from(VERITY_BLOCK_BYTES));
        if self.data_blocks == 0 || expected_offset != Some(self.hash_offset_bytes) {
            return inconsistent(format!(
                "hash offset {} does not follow {} data blocks",
                self.hash_offset_bytes, self.data_blocks
            ));
        }
        if squashfs_bytes > self.hash_offset_bytes
            || self.hash_offset_bytes - squashfs_bytes >= u64::from(VERITY_BLOCK_BYTES)
        {
            return inconsistent(format!(
                "squashfs of {squashfs_bytes} bytes does not pad to hash offset {}",
                self.hash_offset_bytes
            ));
        }
        let expected_device = self
            .hash_offset_bytes
            .checked_add(hash_area_bytes(self.data_blocks));
        if expected_device != Some(device_bytes) {
            return inconsistent(format!(
                "root image of {device_bytes} bytes, but data and tree need {expected_device:?}"
            ));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Blocks in each level, leaves (level 0) first.
fn level_block_counts(data_blocks: u64) -> Vec<u64> {
    let mut counts = Vec::new();
    let mut blocks_below = data_blocks;
    // `veritysetup` stops once the level below fits in one block; a single data block has
    // no levels at all (its own hash is the root).
    while blocks_below > 1 && (counts.len() as u32) < LEVELS_MAX {
        let level_blocks = blocks_below.div_ceil(HASHES_PER_BLOCK);
        counts.push(level_blocks);
        blocks_below = level_blocks;
    }
    counts
}

/// Bytes after the hash offset: the superblock's block and every level.
pub fn hash_area_bytes(data_blocks: u64) -> u64 {
    let tree_blocks: u64 = level_block_counts(data_blocks).iter().sum();
    (1 + tree_blocks).saturating_mul(u64::from(VERITY_BLOCK_BYTES))
}

fn io_error(context: &str, error: &std::io::Error) -> VerityError {
    VerityError::Io(format!("{context}: {error}"))
}

fn salted_hash(salt: &[u8], block: &[u8]) -> [u8; VERITY_DIGEST_BYTES] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(block);
    hasher.finalize().into()
}

/// Builds the hash tree of the first `data_bytes` of `data` (read as if zero-padded to a
/// whole block) into `tree`: the superblock at offset 0, then the levels, top first. Appended
/// to the padded data, `tree` is the hash area of a `veritysetup` device whose hash offset is
/// the padded data size. Returns the parameters, root hash included.
pub fn build_hash_tree(
    data: &File,
    data_bytes: u64,
    tree: &File,
    salt: &[u8],
) -> Result<VerityParameters, VerityError> {
    let block_bytes = u64::from(VERITY_BLOCK_BYTES);
    if data_bytes == 0 {
        return Err(VerityError::DataSize(data_bytes));
    }
    if salt.len() > VERITY_SALT_BYTES_MAX {
        return Err(VerityError::SaltTooLong(salt.len()));
    }
    let data_blocks = data_bytes.div_ceil(block_bytes);
    let counts = level_block_counts(data_blocks);
    let mut level_offsets = vec![0u64; counts.len()];
    let mut next_offset = block_bytes; // after the superblock's block
    for (level, count) in counts.iter().enumerate().rev() {
        if let Some(slot) = level_offsets.get_mut(level) {
            *slot = next_offset;
        }
        next_offset += count * block_bytes;
    }

    let root_hash = if counts.is_empty() {
        let mut block = vec![0u8; VERITY_BLOCK_BYTES as usize];
        read_padded(data, 0, data_bytes, &mut block)?;
        salted_hash(salt, &block)
    } else {
        let mut last_block = hash_level(
            data,
            data_bytes,
            salt,
            data_blocks,
            tree,
            level_offsets.first().copied().unwrap_or(0),
        )?;
        for level in 1..counts.len() {
            let source_offset = level_offsets.get(level - 1).copied().unwrap_or(0);
            let source_blocks = counts.get(level - 1).copied().unwrap_or(0);
            let source = TreeLevel {
                file: tree,
                offset: source_offset,
            };
            last_block = hash_level(
                &source,
                source_blocks * block_bytes,
                salt,
                source_blocks,
                tree,
                level_offsets.get(level).copied().unwrap_or(0),
            )?;
        }
        salted_hash(salt, &last_block)
    };

    let uuid = uuid_from_salt(salt);
    tree.write_all_at(&superblock(data_blocks, salt, &uuid), 0)
        .map_err(|error| io_error("write superblock", &error))?;
    tree.set_len(next_offset)
        .map_err(|error| io_error("size hash area", &error))?;
    Ok(VerityParameters {
        algorithm: "sha256".to_owned(),
        data_block_bytes: VERITY_BLOCK_BYTES,
        hash_block_bytes: VERITY_BLOCK_BYTES,
        data_blocks,
        hash_offset_bytes: data_blocks * block_bytes,
        salt: salt.to_vec(),
        root_hash,
    })
}

/// Something blocks can be read from at an offset.
trait BlockInput {
    fn read_at_exact(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl BlockInput for File {
    fn read_at_exact(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buffer, offset)
    }
}

/// A level of the tree being built, read back to hash the level above it.
struct TreeLevel<'a> {
    file: &'a File,
    offset: u64,
}

impl BlockInput for TreeLevel<'_> {
    fn read_at_exact(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buffer, self.offset + offset)
    }
}

/// Reads `buffer.len()` bytes at `offset`, zero-filling what lies past `available_bytes`.
fn read_padded<I: BlockInput + ?Sized>(
    input: &I,
    offset: u64,
    available_bytes: u64,
    buffer: &mut [u8],
) -> Result<(), VerityError> {
    let present = usize::try_from(available_bytes.saturating_sub(offset))
        .unwrap_or(usize::MAX)
        .min(buffer.len());
    let (head, tail) = buffer.split_at_mut(present);
    input
        .read_at_exact(head, offset)
        .map_err(|error| io_error("read blocks to hash", &error))?;
    tail.fill(0);
    Ok(())
}

/// Hashes `source_blocks` blocks of `source` (zero-padded past `source_bytes`) into hash
/// blocks written to `tree` at `target_offset`; returns the last hash block (the top block,
/// for the top level).
fn hash_level<I: BlockInput + ?Sized>(
    source: &I,
    source_bytes: u64,
    salt: &[u8],
    source_blocks: u64,
    tree: &File,
    target_offset: u64,
) -> Result<Vec<u8>, VerityError> {
    let block_bytes = VERITY_BLOCK_BYTES as usize;
    let mut input = vec![0u8; block_bytes * BATCH_BLOCKS];
    let mut output: Vec<u8> = Vec::with_capacity(block_bytes * BATCH_BLOCKS);
    let mut hash_block = vec![0u8; block_bytes];
    let mut hashes_in_block = 0usize;
    let mut written_offset = target_offset;
    let mut done_blocks = 0u64;
    let mut last_block = Vec::new();
    while done_blocks < source_blocks {
        let batch_blocks = (source_blocks - done_blocks).min(BATCH_BLOCKS as u64) as usize;
        let batch = input
            .get_mut(..batch_blocks * block_bytes)
            .ok_or_else(|| VerityError::Io("batch larger than buffer".to_owned()))?;
        read_padded(
            source,
            done_blocks * u64::from(VERITY_BLOCK_BYTES),
            source_bytes,
            batch,
        )?;
        for block in batch.chunks_exact(block_bytes) {
            let digest = salted_hash(salt, block);
            let start = hashes_in_block * VERITY_DIGEST_BYTES;
            if let Some(slot) = hash_block.get_mut(start..start + VERITY_DIGEST_BYTES) {
                slot.copy_from_slice(&digest);
            }
            hashes_in_block += 1;
            if hashes_in_block as u64 == HASHES_PER_BLOCK {
                output.extend_from_slice(&hash_block);
                hash_block.fill(0);
                hashes_in_block = 0;
            }
        }
        done_blocks += batch_blocks as u64;
        if output.len() >= block_bytes * BATCH_BLOCKS {
            last_block = output
                .get(output.len() - block_bytes..)
                .unwrap_or_default()
                .to_vec();
            tree.write_all_at(&output, written_offset)
                .map_err(|error| io_error("write hash blocks", &error))?;
            written_offset += output.len() as u64;
            output.clear();
        }
    }
    if hashes_in_block > 0 {
        output.extend_from_slice(&hash_block);
    }
    if !output.is_empty() {
        last_block = output
            .get(output.len() - block_bytes..)
            .unwrap_or_default()
            .to_vec();
        tree.write_all_at(&output, written_offset)
            .map_err(|error| io_error("write hash blocks", &error))?;
    }
    Ok(last_block)
}

/// A stable UUID for the superblock (the format wants one; `veritysetup` makes a random one).
fn uuid_from_salt(salt: &[u8]) -> [u8; 16] {
    let digest = blake3::hash(&[b"bootmesh verity uuid".as_slice(), salt].concat());
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest.as_bytes()[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

/// The 512-byte superblock, padded to a whole hash block.
fn superblock(data_blocks: u64, salt: &[u8], uuid: &[u8; 16]) -> Vec<u8> {
    let mut block = Vec::with_capacity(VERITY_BLOCK_BYTES as usize);
    block.extend_from_slice(b"verity\0\0");
    block.extend_from_slice(&1u32.to_le_bytes()); // format version
    block.extend_from_slice(&1u32.to_le_bytes()); // hash type: normal
    block.extend_from_slice(uuid);
    let mut algorithm = [0u8; 32];
    algorithm[..6].copy_from_slice(b"sha256");
    block.extend_from_slice(&algorithm);
    block.extend_from_slice(&VERITY_BLOCK_BYTES.to_le_bytes());
    block.extend_from_slice(&VERITY_BLOCK_BYTES.to_le_bytes());
    block.extend_from_slice(&data_blocks.to_le_bytes());
    block.extend_from_slice(&(salt.len() as u16).to_le_bytes());
    block.extend_from_slice(&[0u8; 6]);
    let mut salt_field = [0u8; VERITY_SALT_BYTES_MAX];
    salt_field[..salt.len()].copy_from_slice(salt);
    block.extend_from_slice(&salt_field);
    block.resize(SUPERBLOCK_BYTES, 0);
    block.resize(VERITY_BLOCK_BYTES as usize, 0);
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_counts_follow_the_format() {
        assert_eq!(level_block_counts(1), Vec::<u64>::new());
        assert_eq!(level_block_counts(2), vec![1]);
        assert_eq!(level_block_counts(128), vec![1]);
        assert_eq!(level_block_counts(129), vec![2, 1]);
        assert_eq!(level_block_counts(128 * 128 + 1), vec![129, 2, 1]);
        assert_eq!(hash_area_bytes(129), 4 * 4096);
    }

    #[test]
    fn tree_and_parameters_agree() -> Result<(), Box<dyn std::error::Error>> {
        let data_file = tempfile::tempfile()?;
        let tree_file = tempfile::tempfile()?;
        // 200 blocks minus 100 bytes: the last block is zero-padded.
        let data: Vec<u8> = (0..200u32 * 4096 - 100)
            .map(|index| (index % 251) as u8)
            .collect();
        data_file.write_all_at(&data, 0)?;
        let salt = [7u8; 32];
        let parameters = build_hash_tree(&data_file, data.len() as u64, &tree_file, &salt)?;
        let device_bytes = 200 * 4096 + tree_file.metadata()?.len();
        parameters.validate(data.len() as u64, device_bytes)?;
        assert_eq!(parameters.hash_offset_bytes, 200 * 4096);
        assert_eq!(tree_file.metadata()?.len(), hash_area_bytes(200));
        // The top level (one block) holds the hashes of level 0's two blocks.
        let mut top = vec![0u8; 4096];
        tree_file.read_exact_at(&mut top, 4096)?;
        assert_eq!(salted_hash(&salt, &top), parameters.root_hash);
        let mut leaf_block = vec![0u8; 4096];
        tree_file.read_exact_at(&mut leaf_block, 2 * 4096)?;
        assert_eq!(&leaf_block[..32], &salted_hash(&salt, &data[..4096]));
        assert_eq!(&top[..32], &salted_hash(&salt, &leaf_block));
        let mut last_data_block = data[199 * 4096..].to_vec();
        last_data_block.resize(4096, 0);
        let mut second_leaf_block = vec![0u8; 4096];
        tree_file.read_exact_at(&mut second_leaf_block, 3 * 4096)?;
        assert_eq!(
            &second_leaf_block[71 * 32..72 * 32],
            &salted_hash(&salt, &last_data_block)
        );
        // Same input, same tree.
        let again = tempfile::tempfile()?;
        assert_eq!(
            build_hash_tree(&data_file, data.len() as u64, &again, &salt)?,
            parameters
        );
        Ok(())
    }

    #[test]
    fn refuses_empty_data_and_long_salts() -> Result<(), Box<dyn std::error::Error>> {
        let file = tempfile::tempfile()?;
        let tree = tempfile::tempfile()?;
        assert_eq!(
            build_hash_tree(&file, 0, &tree, &[]),
            Err(VerityError::DataSize(0))
        );
        assert_eq!(
            build_hash_tree(&file, 4096, &tree, &[0; 300]),
            Err(VerityError::SaltTooLong(300))
        );
        Ok(())
    }
}
