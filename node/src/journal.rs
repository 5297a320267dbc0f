//! The single-server lease journal: the "durable commit" the DHCP core waits for before it ACKs.
//! An append-only file of checksummed records, fsynced before a batch is reported committed.
//! The Raft log replaces it in a cluster, behind the same [`LeaseJournal`] seam.
//!
//! Crash safety: a record is `length (u32 BE) | crc32 (u32 BE) | payload`. After a crash the
//! tail may be torn; loading stops at the first record whose length or checksum does not hold
//! and truncates the file there. Anything before it was fsynced, hence ACKed leases survive.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use boot_services::dhcp::LeaseChange;

const MAGIC: &[u8; 8] = b"BMLJ0001";
const RECORD_HEADER_BYTES: usize = 8;
/// A record longer than this is corruption, not a lease.
const RECORD_BYTES_MAX: u32 = 4096;
/// Compact once the journal holds this many records more than the live lease set.
const COMPACT_SLACK_RECORDS: usize = 65_536;

/// Why the journal failed. A failed append means "not committed": no ACK goes out.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O error on the journal file.
    #[error("lease journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a lease journal.
    #[error("{0} is not a bootmesh lease journal")]
    NotAJournal(PathBuf),
}

/// Durable storage of lease changes. `append` returns only once the changes survive a crash.
pub trait LeaseJournal: Send + 'static {
    /// Every change recorded so far, oldest first.
    fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError>;
    /// Makes `changes` durable, in order, as one batch.
    fn append(&mut self, changes: &[LeaseChange]) -> Result<(), JournalError>;
    /// Whether the history has grown much larger than the `live_bindings` it describes.
    fn needs_compaction(&self, live_bindings: usize) -> bool;
    /// Replaces the history with `live` (the current bindings). Must be crash-safe: either the
    /// old or the new history survives.
    fn compact(&mut self, live: &[LeaseChange]) -> Result<(), JournalError>;
}

/// [`LeaseJournal`] in a file.
#[derive(Debug)]
pub struct FileLeaseJournal {
    path: PathBuf,
    file: File,
    records: usize,
    buffer: Vec<u8>,
}

impl FileLeaseJournal {
    /// Opens (creating if needed) `state_dir/leases.journal`.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::Io {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join("leases.journal");
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            file.write_all(MAGIC).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_directory(state_dir).map_err(io)?;
        }
        Ok(Self {
            path,
            file,
            records: 0,
            buffer: Vec::new(),
        })
    }

    fn io_error(&self, source: std::io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn encode_records(changes: &[LeaseChange], output: &mut Vec<u8>) {
        for change in changes {
            let start = output.len();
            output.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
            change.encode(output);
            let payload = &output[start + RECORD_HEADER_BYTES..];
            let length = payload.len() as u32;
            let checksum = crc32fast::hash(payload);
            output[start..start + 4].copy_from_slice(&length.to_be_bytes());
            output[start + 4..start + 8].copy_from_slice(&checksum.to_be_bytes());
        }
    }
}

/// Reads the journal in `state_dir` without changing it (for `bootmesh leases` beside a
/// running server, which may be appending at that moment).
pub fn read_journal(state_dir: &Path) -> Result<Vec<LeaseChange>, JournalError> {
    let path = state_dir.join("leases.journal");
    let bytes = std::fs::read(&path).map_err(|source| JournalError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(decode_journal(&path, &bytes)?.0)
}

/// Decodes records up to the first torn or corrupt one; returns them and the valid length.
fn decode_journal(path: &Path, bytes: &[u8]) -> Result<(Vec<LeaseChange>, usize), JournalError> {
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(JournalError::NotAJournal(path.to_owned()));
    }
    let mut changes = Vec::new();
    let mut offset = MAGIC.len();
    while let Some(header) = bytes.get(offset..offset + RECORD_HEADER_BYTES) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let checksum = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if length > RECORD_BYTES_MAX {
            break;
        }
        let payload_start = offset + RECORD_HEADER_BYTES;
        let Some(payload) = bytes.get(payload_start..payload_start + length as usize) else {
            break;
        };
        if crc32fast::hash(payload) != checksum {
            break;
        }
        match LeaseChange::decode(payload) {
            Ok(change) => changes.push(change),
            Err(error) => {
                tracing::warn!(path = %path.display(), offset, %error, "undecodable lease record; stopping here");
                break;
            }
        }
        offset = payload_start + length as usize;
    }
    Ok((changes, offset))
}

fn sync_directory(directory: &Path) -> std::io::Result<()> {
    File::open(directory)?.sync_all()
}

impl LeaseJournal for FileLeaseJournal {
    fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError> {
        let mut bytes = Vec::new();
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|error| self.io_error(error))?;
        self.file
            .read_to_end(&mut bytes)
            .map_err(|error| self.io_error(error))?;
        let (changes, offset) = decode_journal(&self.path, &bytes)?;
        if offset < bytes.len() {
            tracing::warn!(
                path = %self.path.display(),
                kept_bytes = offset,
                dropped_bytes = bytes.len() - offset,
                "lease journal has a torn tail (crash during write); truncating it"
            );
            self.file
                .set_len(offset as u64)
                .map_err(|error| self.io_error(error))?;
            self.file.sync_all().map_err(|error| self.io_error(error))?;
        }
        self.file
            .seek(SeekFrom::End(0))
            .map_err(|error| self.io_error(error))?;
        self.records = changes.len();
        Ok(changes)
    }

    fn append(&mut self, changes: &[LeaseChange]) -> Result<(), JournalError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.buffer.clear();
        Self::encode_records(changes, &mut self.buffer);
        self.file
            .write_all(&self.buffer)
            .map_err(|error| self.io_error(error))?;
        self.file
            .sync_data()
            .map_err(|error| self.io_error(error))?;
        self.records += changes.len();
        Ok(())
    }

    fn needs_compaction(&self, live_bindings: usize) -> bool {
        self.records >= live_bindings + COMPACT_SLACK_RECORDS
    }

    fn compact(&mut self, live: &[LeaseChange]) -> Result<(), JournalError> {
        let temporary = self.path.with_extension("journal.tmp");
        let io = |source| JournalError::Io {
            path: temporary.clone(),
            source,
        };
        let mut bytes = MAGIC.to_vec();
        Self::encode_records(live, &mut bytes);
        let mut file = File::create(&temporary).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, &self.path).map_err(io)?;
        if let Some(directory) = self.path.parent() {
            sync_directory(directory).map_err(io)?;
        }
        let mut reopened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        reopened.seek(SeekFrom::End(0)).map_err(io)?;
        self.file = reopened;
        self.records = live.len();
        Ok(())
    }
}

/// [`LeaseJournal`] in memory, for the simulator and tests: "durable" means "survives a
/// restart of the server object", which is what a simulated disk provides.
#[derive(Debug, Default, Clone)]
pub struct MemoryLeaseJournal {
    records: std::sync::Arc<std::sync::Mutex<Vec<LeaseChange>>>,
}

impl LeaseJournal for MemoryLeaseJournal {
    fn load(&mut self) -> Result<Vec<LeaseChange>, JournalError> {
        Ok(self
            .records
            .lock()
            .map(|records| records.clone())
            .unwrap_or_default())
    }
    fn append(&mut self, changes: &[LeaseChange]) -> Result<(), JournalError> {
        if let Ok(mut records) = self.records.lock() {
            records.extend_from_slice(changes);
        }
        Ok(())
    }
    fn needs_compaction(&self, _live_bindings: usize) -> bool {
        false
    }
    fn compact(&mut self, live: &[LeaseChange]) -> Result<(), JournalError> {
        if let Ok(mut records) = self.records.lock() {
            *records = live.to_vec();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot_services::dhcp::ClientId;

    fn bind(last: u8) -> LeaseChange {
        LeaseChange::Bind {
            client: ClientId(vec![1, last]),
            hardware_address: vec![0x52, 0x54, 0, 0, 0, last],
            address: [10, 0, 0, last].into(),
            expires_at_unix_secs: 1000 + u64::from(last),
            hostname: None,
        }
    }

    #[test]
    fn appended_changes_survive_reopen() {
        let directory = tempfile::tempdir().unwrap();
        let mut journal = FileLeaseJournal::open(directory.path()).unwrap();
        assert!(journal.load().unwrap().is_empty());
        journal.append(&[bind(1), bind(2)]).unwrap();
        journal.append(&[bind(3)]).unwrap();
        drop(journal);
        let mut reopened = FileLeaseJournal::open(directory.path()).unwrap();
        assert_eq!(reopened.load().unwrap(), vec![bind(1), bind(2), bind(3)]);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_kept() {
        let directory = tempfile::tempdir().unwrap();
        let mut journal = FileLeaseJournal::open(directory.path()).unwrap();
        journal.load().unwrap();
        journal.append(&[bind(1), bind(2)]).unwrap();
        drop(journal);
        let path = directory.path().join("leases.journal");
        let full = std::fs::read(&path).unwrap();
        for cut in 1..20 {
            std::fs::write(&path, &full[..full.len() - cut]).unwrap();
            let mut reopened = FileLeaseJournal::open(directory.path()).unwrap();
            assert_eq!(reopened.load().unwrap(), vec![bind(1)], "cut {cut}");
            // And appending after the cut works.
            reopened.append(&[bind(3)]).unwrap();
            drop(reopened);
            let mut again = FileLeaseJournal::open(directory.path()).unwrap();
            assert_eq!(again.load().unwrap(), vec![bind(1), bind(3)], "cut {cut}");
        }
        // A flipped bit in the last record is found by its checksum.
        let mut flipped = full.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(
            FileLeaseJournal::open(directory.path())
                .unwrap()
                .load()
                .unwrap(),
            vec![bind(1)]
        );
    }

    #[test]
    fn foreign_file_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("leases.journal"), b"hello").unwrap();
        let mut journal = FileLeaseJournal::open(directory.path()).unwrap();
        assert!(matches!(journal.load(), Err(JournalError::NotAJournal(_))));
    }

    #[test]
    fn compaction_keeps_live_set() {
        let directory = tempfile::tempdir().unwrap();
        let mut journal = FileLeaseJournal::open(directory.path()).unwrap();
        journal.load().unwrap();
        assert!(!journal.needs_compaction(1));
        journal.records = COMPACT_SLACK_RECORDS + 5;
        assert!(journal.needs_compaction(1));
        journal.compact(&[bind(7)]).unwrap();
        journal.append(&[bind(8)]).unwrap();
        drop(journal);
        assert_eq!(
            FileLeaseJournal::open(directory.path())
                .unwrap()
                .load()
                .unwrap(),
            vec![bind(7), bind(8)]
        );
    }
}
