//! A simulated disk for redb: what was written but not synced is lost in a crash.
//!
//! The disk outlives the server process that uses it: a crashed server is restarted on the same
//! disk and finds exactly what it had synced. Each process opens the disk through a handle of
//! its own; a crash fences the old handle, so a dead process (whose database may still be
//! dropped later) can never write again.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::StorageBackend;

/// redb's backend methods fail with `std::io::Error`.
type BackendIoError = io::Error;

#[derive(Debug, Default)]
struct Platters {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Byte ranges of `current` written since the last sync.
    dirty: Vec<(usize, usize)>,
    /// Bumped by every crash; handles of older generations are fenced.
    generation: u64,
    /// Completed syncs, for reports.
    syncs: u64,
}

/// A disk that survives its server's crashes.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    platters: Arc<Mutex<Platters>>,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn platters(&self) -> MutexGuard<'_, Platters> {
        self.platters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle for one server process.
    pub fn attach(&self) -> SimDiskHandle {
        SimDiskHandle {
            disk: self.clone(),
            generation: self.platters().generation,
        }
    }

    /// The power fails: unsynced writes are lost and every existing handle is fenced.
    pub fn crash(&self) {
        let mut platters = self.platters();
        platters.current = platters.durable.clone();
        platters.dirty.clear();
        platters.generation += 1;
    }

    /// Syncs completed so far.
    pub fn syncs(&self) -> u64 {
        self.platters().syncs
    }
}

/// One process's view of a [`SimDisk`].
pub struct SimDiskHandle {
    disk: SimDisk,
    generation: u64,
}

impl fmt::Debug for SimDiskHandle {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SimDiskHandle")
            .field("generation", &self.generation)
            .finish()
    }
}

fn fenced() -> BackendIoError {
    io::Error::other("disk detached: its server crashed")
}

impl SimDiskHandle {
    fn live(&self) -> Result<MutexGuard<'_, Platters>, BackendIoError> {
        let platters = self.disk.platters();
        if platters.generation == self.generation {
            Ok(platters)
        } else {
            Err(fenced())
        }
    }
}

impl StorageBackend for SimDiskHandle {
    fn len(&self) -> Result<u64, BackendIoError> {
        Ok(self.live()?.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        let platters = self.live()?;
        let start = usize::try_from(offset).map_err(|_| fenced())?;
        let source = platters
            .current
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let mut platters = self.live()?;
        let len = usize::try_from(len).map_err(|_| fenced())?;
        let old = platters.current.len();
        platters.current.resize(len, 0);
        if len > old {
            platters.dirty.push((old, len));
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        let mut platters = self.live()?;
        let platters = &mut *platters;
        platters.durable.resize(platters.current.len(), 0);
        for (start, end) in platters.dirty.drain(..) {
            let end = end.min(platters.current.len());
            if start < end {
                platters.durable[start..end].copy_from_slice(&platters.current[start..end]);
            }
        }
        platters.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        let mut platters = self.live()?;
        let start = usize::try_from(offset).map_err(|_| fenced())?;
        let end = start + data.len();
        if platters.current.len() < end {
            platters.current.resize(end, 0);
        }
        platters.current[start..end].copy_from_slice(data);
        platters.dirty.push((start, end));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_synced_bytes_loses_the_rest_and_fences_old_handles() {
        let disk = SimDisk::new();
        let handle = disk.attach();
        assert!(handle.write(0, b"synced").is_ok());
        assert!(handle.sync_data().is_ok());
        assert!(handle.write(0, b"LOST").is_ok());
        assert!(handle.write(10, b"tail").is_ok());
        disk.crash();
        assert!(
            handle.write(0, b"zombie").is_err(),
            "a crashed process cannot write"
        );
        let restarted = disk.attach();
        assert_eq!(restarted.len().ok(), Some(6));
        let mut read = [0u8; 6];
        assert!(restarted.read(0, &mut read).is_ok());
        assert_eq!(&read, b"synced");
    }
}
