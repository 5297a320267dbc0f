//! A simulated disk for redb: what was written but not synced is lost in a crash, or torn
//! (each unsynced write survives whole, in part or not at all, sector by sector), and a
//! failing disk refuses to sync, and a slow disk makes each sync cost virtual time (which the
//! stores wait out after their writes, through `consensus::store::DiskLatency`).
//!
//! The disk outlives the server process that uses it: a crashed server is restarted on the same
//! disk and finds exactly what it had synced. Each process opens the disk through a handle of
//! its own; a crash fences the old handle, so a dead process (whose database may still be
//! dropped later) can never write again.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

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
    /// Syncs fail (the disk is dying) until this is cleared.
    failing: bool,
    /// Syncs refused so far.
    failed_syncs: u64,
    /// What each sync costs while the disk is slow (zero when it is not).
    sync_latency: Duration,
    /// Sync time not yet waited out by the stores.
    owed: Duration,
    /// Syncs done while slow, and the time they cost, for reports.
    slow_syncs: u64,
    slow_time: Duration,
}

/// Sector size: a torn write keeps whole sectors.
const SECTOR: usize = 512;

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
        platters.owed = Duration::ZERO;
    }

    /// The power fails while unsynced writes are on their way: each one survives whole, in
    /// part (a prefix of whole sectors) or not at all, as `random` decides; then as
    /// [`crash`](Self::crash). Drives reorder what was not synced, so any subset is possible.
    pub fn crash_torn(&self, mut random: impl FnMut() -> u64) {
        let mut platters = self.platters();
        let platters = &mut *platters;
        // The file is as long as what was synced, or as far as a surviving write reaches.
        let mut length = platters.durable.len();
        platters.durable.resize(platters.current.len(), 0);
        for (start, end) in std::mem::take(&mut platters.dirty) {
            let end = end.min(platters.current.len());
            if start >= end {
                continue;
            }
            let kept_end = match random() % 3 {
                0 => start,
                1 => end,
                _ => {
                    let sectors = (end - start).div_ceil(SECTOR) as u64;
                    (start + (random() % (sectors + 1)) as usize * SECTOR).min(end)
                }
            };
            if start < kept_end {
                platters.durable[start..kept_end]
                    .copy_from_slice(&platters.current[start..kept_end]);
                length = length.max(kept_end);
            }
        }
        platters.durable.truncate(length);
        platters.current = platters.durable.clone();
        platters.generation += 1;
        platters.owed = Duration::ZERO;
    }

    /// From now on every sync takes `latency` (a disk that is dying slowly, or a neighbour
    /// saturating it), until [`restore_speed`](Self::restore_speed).
    pub fn slow_syncs(&self, latency: Duration) {
        self.platters().sync_latency = latency;
    }

    /// Syncs are instant again.
    pub fn restore_speed(&self) {
        self.platters().sync_latency = Duration::ZERO;
    }

    /// Syncs done while the disk was slow, and the virtual time they cost.
    pub fn slow_sync_time(&self) -> (u64, Duration) {
        let platters = self.platters();
        (platters.slow_syncs, platters.slow_time)
    }

    /// From now on every sync fails with an I/O error, until [`repair`](Self::repair).
    pub fn fail_syncs(&self) {
        self.platters().failing = true;
    }

    /// Syncs work again (the disk was replaced; what it held survives).
    pub fn repair(&self) {
        self.platters().failing = false;
    }

    /// Syncs refused so far (the disk was failing).
    pub fn failed_syncs(&self) -> u64 {
        self.platters().failed_syncs
    }

    /// Syncs completed so far.
    pub fn syncs(&self) -> u64 {
        self.platters().syncs
    }
}

impl consensus::store::DiskLatency for SimDisk {
    fn take_owed(&self) -> Duration {
        std::mem::take(&mut self.platters().owed)
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
        if platters.failing {
            platters.failed_syncs += 1;
            return Err(io::Error::other("simulated disk: fsync failed"));
        }
        platters.durable.resize(platters.current.len(), 0);
        for (start, end) in platters.dirty.drain(..) {
            let end = end.min(platters.current.len());
            if start < end {
                platters.durable[start..end].copy_from_slice(&platters.current[start..end]);
            }
        }
        platters.syncs += 1;
        if !platters.sync_latency.is_zero() {
            platters.owed += platters.sync_latency;
            platters.slow_syncs += 1;
            platters.slow_time += platters.sync_latency;
        }
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

    #[test]
    fn a_torn_crash_keeps_whole_sectors_of_unsynced_writes_and_a_failing_disk_refuses_to_sync() {
        let disk = SimDisk::new();
        let handle = disk.attach();
        assert!(handle.write(0, &[1u8; 2048]).is_ok());
        assert!(handle.sync_data().is_ok());
        assert!(handle.write(0, &[2u8; 2048]).is_ok());
        // The write is torn after its second sector.
        let mut decisions = [2u64, 2].into_iter();
        disk.crash_torn(move || decisions.next().unwrap_or(0));
        let restarted = disk.attach();
        let mut read = [0u8; 2048];
        assert!(restarted.read(0, &mut read).is_ok());
        assert!(read[..1024].iter().all(|byte| *byte == 2));
        assert!(read[1024..].iter().all(|byte| *byte == 1));
        disk.fail_syncs();
        assert!(restarted.write(0, b"x").is_ok());
        assert!(restarted.sync_data().is_err());
        disk.repair();
        assert!(restarted.sync_data().is_ok());
    }
}
