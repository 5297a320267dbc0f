//! One redb database per server holds the Raft log, the vote and the state machine.
//!
//! What Raft's safety rests on commits with `Durability::Immediate`: when `append` reports an
//! entry flushed, or `save_vote` returns, the bytes are on disk (so are truncation, purge,
//! snapshots and snapshot installs). The state machine writes back only the rows a command
//! changed, in the same transaction as its applied log id, with `Durability::None`: the log
//! already holds every applied entry durably, and redb rolls a crash back to its last durable
//! commit, whose state rows and applied id agree, so entries after that applied id are
//! re-applied from the log on restart. The committed id is saved the same way: it only lets a
//! restarted server apply without waiting for the leader, and an older one is still a true
//! one. Every durable commit (the next append) makes the earlier volatile ones durable too, so
//! these cost no fsync of their own. The storage seam is redb's `StorageBackend`: a file in production, a simulated disk
//! (which can drop unsynced writes) in the simulator.

use std::fmt::Debug;
use std::io::Cursor;
use std::net::Ipv4Addr;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::state::{BlockId, MeshResponse, MeshState, Proposal, StateKey};
use crate::{MeshTypeConfig, ServerNode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("mesh_state");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

type Storage = StorageError<u64>;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("database: {0}")]
    Database(#[from] redb::Error),
    /// A stored value could not be decoded.
    #[error("stored {what} is unreadable: {source}")]
    Corrupt {
        /// Which value.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The store a server was created with is gone: its log and vote went with it.
    #[error("the Raft store {} is missing", path.display())]
    Missing {
        /// Where it should be.
        path: std::path::PathBuf,
    },
    /// A new store was asked for where one already exists.
    #[error("a Raft store already exists at {}", path.display())]
    Exists {
        /// Where.
        path: std::path::PathBuf,
    },
    /// The file failed its integrity check: it was changed outside the server (truncated,
    /// overwritten) or the disk lost data. It is never used again as it is: entries this server
    /// acknowledged may be gone.
    #[error("the Raft store {} is damaged: {reason}", path.display())]
    Damaged {
        /// The store.
        path: std::path::PathBuf,
        /// What the check found.
        reason: String,
    },
}

fn database_error(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(error.into())
}

/// Creates a new, empty store in the file at `path` (a server that founds or joins a
/// cluster); refuses to replace one.
pub fn create_file(path: &Path) -> Result<(), StoreError> {
    if path.exists() {
        return Err(StoreError::Exists {
            path: path.to_owned(),
        });
    }
    let database = Database::create(path).map_err(database_error)?;
    open_database(database).map(drop)
}

/// The marker left beside a store that failed its integrity check.
pub fn damage_marker(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".damaged");
    std::path::PathBuf::from(name)
}

/// Opens the existing store in the file at `path`, after checking every page of it.
///
/// A Raft voter that comes back with less than it acknowledged (a vote, log entries) can let
/// two leaders be elected or a committed entry be lost, so a missing, truncated or corrupted
/// file is an error here, never an empty or silently repaired store. redb's check repairs
/// what it can, so a failure also leaves a marker file beside the store: the next start
/// refuses too, rather than trusting the repaired file.
pub fn open_file(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let marker = damage_marker(path);
    if let Ok(reason) = std::fs::read_to_string(&marker) {
        return Err(StoreError::Damaged {
            path: path.to_owned(),
            reason: format!(
                "{} (found at an earlier start; {} records it)",
                reason.trim(),
                marker.display()
            ),
        });
    }
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.to_owned(),
        });
    }
    let damaged = |reason: String| {
        // Best effort: the error below is what matters; the marker makes it stick.
        let _ = std::fs::write(&marker, format!("{reason}\n"));
        StoreError::Damaged {
            path: path.to_owned(),
            reason,
        }
    };
    // Only corruption marks the file; another process holding it, or an I/O error, does not.
    let mut database = match Database::open(path) {
        Ok(database) => database,
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason))) => {
            return Err(damaged(reason));
        }
        Err(redb::DatabaseError::RepairAborted) => {
            return Err(damaged("redb could not finish repairing it".into()));
        }
        Err(other) => return Err(database_error(other)),
    };
    match database.check_integrity() {
        Ok(true) => {}
        Ok(false) => {
            return Err(damaged(
                "it failed the integrity check and redb repaired it to an earlier state".into(),
            ));
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason))) => {
            return Err(damaged(reason));
        }
        Err(other) => return Err(database_error(other)),
    }
    let (mut log, mut state_machine) = open_database(database).map_err(|error| match error {
        StoreError::Corrupt { .. } => damaged(error.to_string()),
        other => other,
    })?;
    log.writes = Writes::OffRuntime;
    state_machine.writes = Writes::OffRuntime;
    Ok((log, state_machine))
}

/// Where the stores run their redb writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// On the calling task: a simulated disk, where the simulator owns every thread and a
    /// seed must replay the run (and its syncs take no real time).
    Inline,
    /// On a blocking thread, awaited: a file on a real disk. A write holds redb's writer lock
    /// through its fsync, which takes milliseconds; on the runtime's worker it stalled
    /// everything else the server does there (DHCP, QUIC, Raft messages) for that long, and
    /// with one worker a storm overflowed the DHCP socket meanwhile. Every write goes this
    /// way, small ones too: one left on a worker would wait there for the lock instead.
    OffRuntime,
}

/// Runs the redb write `write` as `writes` says.
async fn run_write<T: Send + 'static>(
    writes: Writes,
    write: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
) -> Result<T, redb::Error> {
    match writes {
        Writes::Inline => write(),
        Writes::OffRuntime => {
            #[allow(
                clippy::disallowed_methods,
                reason = "the store's disk seam: a real disk's writes block, so they get a \
                          blocking thread; a simulated disk's run inline (Writes::Inline)"
            )]
            let handle = tokio::task::spawn_blocking(write);
            handle.await.unwrap_or_else(|error| {
                Err(redb::StorageError::Io(std::io::Error::other(format!(
                    "the store's write did not finish: {error}"
                )))
                .into())
            })
        }
    }
}

/// Opens (or creates) the store on `backend`.
pub fn open_backend(
    backend: impl StorageBackend,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let database = Database::builder()
        .create_with_backend(backend)
        .map_err(database_error)?;
    open_database(database)
}

/// [`open_backend`] on a disk whose syncs take time outside the backend (see
/// [`DiskLatency`]): the simulator's slow disks.
pub fn open_backend_with_latency(
    backend: impl StorageBackend,
    latency: Arc<dyn DiskLatency>,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let (mut log, mut state_machine) = open_backend(backend)?;
    log.latency = Some(Arc::clone(&latency));
    state_machine.latency = Some(latency);
    Ok((log, state_machine))
}

fn open_database(database: Database) -> Result<(LogStore, StateMachineStore), StoreError> {
    let database = Arc::new(database);
    let transaction = begin_write(&database).map_err(database_error)?;
    {
        transaction.open_table(LOG).map_err(database_error)?;
        transaction.open_table(META).map_err(database_error)?;
        transaction.open_table(STATE).map_err(database_error)?;
    }
    transaction.commit().map_err(database_error)?;
    let state_machine = StateMachineStore::load(Arc::clone(&database))?;
    Ok((
        LogStore {
            database,
            latency: None,
            writes: Writes::Inline,
        },
        state_machine,
    ))
}

fn begin_write(database: &Database) -> Result<WriteTransaction, redb::Error> {
    begin_write_with(database, Durability::Immediate)
}

/// A write that may be lost in a crash, rolling back to the last durable commit as a whole:
/// only for what can be rebuilt from the durable log (see the module's comment).
fn begin_volatile_write(database: &Database) -> Result<WriteTransaction, redb::Error> {
    begin_write_with(database, Durability::None)
}

fn begin_write_with(
    database: &Database,
    durability: Durability,
) -> Result<WriteTransaction, redb::Error> {
    let mut transaction = database.begin_write()?;
    transaction.set_durability(durability)?;
    Ok(transaction)
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain data types to JSON cannot fail (string keys, no custom impls).
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        what: what.to_owned(),
        source,
    })
}

fn read_meta<T: DeserializeOwned>(database: &Database, key: &str) -> Result<Option<T>, StoreError> {
    let transaction = database.begin_read().map_err(database_error)?;
    let table = transaction.open_table(META).map_err(database_error)?;
    match table.get(key).map_err(database_error)? {
        Some(bytes) => decode(key, bytes.value()).map(Some),
        None => Ok(None),
    }
}

fn write_meta(
    database: &Database,
    key: &str,
    value: &impl Serialize,
    durability: Durability,
) -> Result<(), redb::Error> {
    let transaction = begin_write_with(database, durability)?;
    {
        let mut table = transaction.open_table(META)?;
        table.insert(key, encode(value).as_slice())?;
    }
    transaction.commit()?;
    Ok(())
}

/// Time a disk took for the syncs just done, when that time does not pass inside the sync:
/// a simulated disk, since redb's storage backend is synchronous and a slow fsync there
/// cannot take virtual time. The stores wait it out after their writes, through the Raft
/// runtime's clock, so Raft hears of a write's durability that much later. A real disk has
/// none: its time passes in the sync itself.
pub trait DiskLatency: Send + Sync + Debug + 'static {
    /// The time owed for the syncs since the last call; the next call owes nothing for them.
    fn take_owed(&self) -> std::time::Duration;
}

/// Waits out what `latency` says the last writes cost.
async fn pay_disk_latency(latency: Option<&Arc<dyn DiskLatency>>) {
    if let Some(latency) = latency {
        let owed = latency.take_owed();
        if !owed.is_zero() {
            <crate::runtime::MeshRuntime as openraft::AsyncRuntime>::sleep(owed).await;
        }
    }
}

/// The Raft log and vote.
#[derive(Debug, Clone)]
pub struct LogStore {
    database: Arc<Database>,
    latency: Option<Arc<dyn DiskLatency>>,
    writes: Writes,
}

impl LogStore {
    fn entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry<MeshTypeConfig>>, StoreError> {
        let transaction = self.database.begin_read().map_err(database_error)?;
        let table = transaction.open_table(LOG).map_err(database_error)?;
        let mut entries = Vec::new();
        for row in table.range::<u64>(range).map_err(database_error)? {
            let (index, bytes) = row.map_err(database_error)?;
            entries.push(decode(
                &format!("log entry {}", index.value()),
                bytes.value(),
            )?);
        }
        Ok(entries)
    }

    fn last_entry_id(&self) -> Result<Option<LogId<u64>>, StoreError> {
        let transaction = self.database.begin_read().map_err(database_error)?;
        let table = transaction.open_table(LOG).map_err(database_error)?;
        match table.last().map_err(database_error)? {
            Some((index, bytes)) => {
                let entry: Entry<MeshTypeConfig> =
                    decode(&format!("log entry {}", index.value()), bytes.value())?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    /// Removes the entries in `range` and records `purged` if given, in one transaction.
    async fn remove(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<LogId<u64>>,
    ) -> Result<(), redb::Error> {
        let database = Arc::clone(&self.database);
        run_write(self.writes, move || {
            remove_entries(&database, range, purged)
        })
        .await
    }
}

/// [`LogStore::remove`]'s transaction.
fn remove_entries(
    database: &Database,
    range: (Bound<u64>, Bound<u64>),
    purged: Option<LogId<u64>>,
) -> Result<(), redb::Error> {
    let transaction = begin_write(database)?;
    {
        let mut table = transaction.open_table(LOG)?;
        let indexes = table
            .range::<u64>(range)?
            .map(|row| row.map(|(index, _)| index.value()))
            .collect::<Result<Vec<u64>, _>>()?;
        for index in indexes {
            table.remove(index)?;
        }
        if let Some(purged) = purged {
            let mut meta = transaction.open_table(META)?;
            meta.insert(LAST_PURGED, encode(&purged).as_slice())?;
        }
    }
    transaction.commit()?;
    Ok(())
}

impl RaftLogReader<MeshTypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<MeshTypeConfig>>, Storage> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.entries(bounds)
            .map_err(|error| StorageIOError::read_logs(&error).into())
    }
}

impl RaftLogStorage<MeshTypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<MeshTypeConfig>, Storage> {
        let read = || -> Result<_, StoreError> {
            let last_purged_log_id: Option<LogId<u64>> = read_meta(&self.database, LAST_PURGED)?;
            let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        };
        read().map_err(|error| StorageIOError::read_logs(&error).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Storage> {
        let database = Arc::clone(&self.database);
        let vote = *vote;
        let written = run_write(self.writes, move || {
            write_meta(&database, VOTE, &vote, Durability::Immediate)
        })
        .await
        .map_err(|error| StorageIOError::write_vote(&error).into());
        pay_disk_latency(self.latency.as_ref()).await;
        written
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Storage> {
        read_meta(&self.database, VOTE).map_err(|error| StorageIOError::read_vote(&error).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), Storage> {
        let database = Arc::clone(&self.database);
        let written = run_write(self.writes, move || {
            write_meta(&database, COMMITTED, &committed, Durability::None)
        })
        .await
        .map_err(|error| StorageIOError::write(&error).into());
        pay_disk_latency(self.latency.as_ref()).await;
        written
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, Storage> {
        read_meta::<Option<LogId<u64>>>(&self.database, COMMITTED)
            .map(Option::flatten)
            .map_err(|error| StorageIOError::read(&error).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<MeshTypeConfig>,
    ) -> Result<(), Storage>
    where
        I: IntoIterator<Item = Entry<MeshTypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let database = Arc::clone(&self.database);
        let entries: Vec<Entry<MeshTypeConfig>> = entries.into_iter().collect();
        let written = run_write(self.writes, move || {
            let transaction = begin_write(&database)?;
            {
                let mut table = transaction.open_table(LOG)?;
                for entry in &entries {
                    table.insert(entry.log_id.index, encode(entry).as_slice())?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
        .await;
        pay_disk_latency(self.latency.as_ref()).await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                callback.log_io_completed(Err(std::io::Error::other(message)));
                Err(StorageIOError::write_logs(&error).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), Storage> {
        let removed = self
            .remove((Bound::Included(log_id.index), Bound::Unbounded), None)
            .await
            .map_err(|error| StorageIOError::write_logs(&error).into());
        pay_disk_latency(self.latency.as_ref()).await;
        removed
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), Storage> {
        self.remove(
            (Bound::Unbounded, Bound::Included(log_id.index)),
            Some(log_id),
        )
        .await
        .map_err(|error| StorageIOError::write_logs(&error).into())
    }
}

/// A snapshot as stored and sent: the whole state with the log position it reflects.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SnapshotBody {
    state: MeshState,
}

/// Told of every applied entry: its log id, and its proposal and response (`None` for blanks
/// and membership changes).
pub type ApplyObserver = Arc<dyn Fn(&LogId<u64>, Option<(&Proposal, &MeshResponse)>) + Send + Sync>;

/// Told when a snapshot from the leader replaced the whole state (its last log id): whoever
/// mirrors the state entry by entry must reload it.
pub type SnapshotObserver = Arc<dyn Fn(Option<&LogId<u64>>) + Send + Sync>;

/// Decodes a snapshot as a leader sends it (untrusted until decoded whole).
pub fn decode_snapshot(data: &[u8]) -> Result<MeshState, StoreError> {
    let body: SnapshotBody = decode("snapshot", data)?;
    let mut state = body.state;
    state.reindex();
    Ok(state)
}

/// Read access to the applied state for the rest of the server (admin answers, the DHCP
/// service's view of leases). Readers hold the lock briefly and never across an await.
#[derive(Debug, Clone, Default)]
pub struct StateHandle(Arc<RwLock<MeshState>>);

impl StateHandle {
    /// Runs `read` on the state as applied so far.
    pub fn read<T>(&self, read: impl FnOnce(&MeshState) -> T) -> T {
        let state = self.0.read().unwrap_or_else(PoisonError::into_inner);
        read(&state)
    }

    fn write(&self) -> RwLockWriteGuard<'_, MeshState> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The state machine, kept in memory and written back row by row.
pub struct StateMachineStore {
    database: Arc<Database>,
    state: StateHandle,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, ServerNode>,
    observers: Vec<ApplyObserver>,
    snapshot_observers: Vec<SnapshotObserver>,
    sabotage: crate::state::StateSabotage,
    latency: Option<Arc<dyn DiskLatency>>,
    writes: Writes,
}

impl Debug for StateMachineStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StateMachineStore")
            .field("applied", &self.applied)
            .field("membership", &self.membership)
            .finish_non_exhaustive()
    }
}

fn state_key(key: &StateKey) -> String {
    match key {
        StateKey::Lease(address) => format!("lease/{address}"),
        StateKey::Quarantine(address) => format!("quarantine/{address}"),
        StateKey::Block(block) => format!("block/{}", block.0),
        StateKey::Config => "config".to_owned(),
        StateKey::Image(reference) => format!("image/{reference}"),
        StateKey::Promotion(group) => format!("promotion/{group}"),
        StateKey::Member(id) => format!("member/{id}"),
        StateKey::JoinToken(hash) => format!("token/{hash}"),
        StateKey::NextServerId => "next_server_id".to_owned(),
    }
}

/// The current value of `key` in `state`, encoded; `None` when absent.
fn state_value(state: &MeshState, key: &StateKey) -> Option<Vec<u8>> {
    match key {
        StateKey::Lease(address) => state.leases.get(address).map(encode),
        StateKey::Quarantine(address) => state.quarantine.get(address).map(encode),
        StateKey::Block(block) => state.blocks.get(block).map(encode),
        StateKey::Config => Some(encode(&state.config)),
        StateKey::Image(reference) => state.catalog.get(reference).map(encode),
        StateKey::Promotion(group) => state.promotions.get(group).map(encode),
        StateKey::Member(id) => state.members.get(id).map(encode),
        StateKey::JoinToken(hash) => state.join_tokens.get(hash).map(encode),
        StateKey::NextServerId => Some(encode(&state.next_server_id)),
    }
}

/// Puts one stored row back into `state`.
fn load_row(state: &mut MeshState, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let address = |text: &str| -> Result<Ipv4Addr, StoreError> {
        text.parse().map_err(|_| StoreError::Corrupt {
            what: key.to_owned(),
            source: serde::de::Error::custom("not an IPv4 address"),
        })
    };
    match key.split_once('/') {
        Some(("lease", rest)) => {
            state.leases.insert(address(rest)?, decode(key, bytes)?);
        }
        Some(("quarantine", rest)) => {
            state.quarantine.insert(address(rest)?, decode(key, bytes)?);
        }
        Some(("block", rest)) => {
            state
                .blocks
                .insert(BlockId(address(rest)?), decode(key, bytes)?);
        }
        Some(("image", rest)) => {
            state.catalog.insert(rest.to_owned(), decode(key, bytes)?);
        }
        Some(("promotion", rest)) => {
            state
                .promotions
                .insert(rest.to_owned(), decode(key, bytes)?);
        }
        Some(("member", rest)) => {
            let id = rest.parse().map_err(|_| StoreError::Corrupt {
                what: key.to_owned(),
                source: serde::de::Error::custom("not a member id"),
            })?;
            state.members.insert(id, decode(key, bytes)?);
        }
        Some(("token", rest)) => {
            state
                .join_tokens
                .insert(rest.to_owned(), decode(key, bytes)?);
        }
        _ if key == "config" => state.config = decode(key, bytes)?,
        _ if key == "next_server_id" => state.next_server_id = decode(key, bytes)?,
        _ => {
            return Err(StoreError::Corrupt {
                what: key.to_owned(),
                source: serde::de::Error::custom("unknown state row"),
            });
        }
    }
    Ok(())
}

impl StateMachineStore {
    fn load(database: Arc<Database>) -> Result<Self, StoreError> {
        let mut state = MeshState::default();
        {
            let transaction = database.begin_read().map_err(database_error)?;
            let table = transaction.open_table(STATE).map_err(database_error)?;
            for row in table.iter().map_err(database_error)? {
                let (key, bytes) = row.map_err(database_error)?;
                load_row(&mut state, key.value(), bytes.value())?;
            }
        }
        state.reindex();
        let applied = read_meta(&database, APPLIED)?.flatten();
        let membership = read_meta(&database, MEMBERSHIP)?.unwrap_or_default();
        Ok(Self {
            database,
            state: StateHandle(Arc::new(RwLock::new(state))),
            applied,
            membership,
            observers: Vec::new(),
            snapshot_observers: Vec::new(),
            sabotage: crate::state::StateSabotage::default(),
            latency: None,
            writes: Writes::Inline,
        })
    }

    /// Calls `observer` for every entry applied from now on (traces, metrics), after the
    /// observers added before it.
    pub fn observe_applies(&mut self, observer: ApplyObserver) {
        self.observers.push(observer);
    }

    /// Calls `observer` after every snapshot installed from the leader, after the observers
    /// added before it.
    pub fn observe_snapshot_installs(&mut self, observer: SnapshotObserver) {
        self.snapshot_observers.push(observer);
    }

    /// Switches on deliberate bugs: for the simulator's checker tests only.
    #[cfg(feature = "sabotage")]
    pub fn sabotage(&mut self, sabotage: crate::state::StateSabotage) {
        self.sabotage = sabotage;
        self.state.write().sabotage = sabotage;
    }

    /// A handle to the state as applied, for readers outside Raft.
    pub fn state(&self) -> StateHandle {
        self.state.clone()
    }

    /// Writes the rows `changed` as the state has them now, with the applied id and
    /// membership, in one (volatile) transaction.
    async fn write_back(&self, changed: Vec<StateKey>) -> Result<(), redb::Error> {
        let database = Arc::clone(&self.database);
        let state = self.state.clone();
        let applied = self.applied;
        let membership = self.membership.clone();
        run_write(self.writes, move || {
            write_rows(&database, &state, &changed, applied, &membership)
        })
        .await
    }

    /// Replaces the whole state (snapshot install) in one transaction.
    async fn replace(
        &mut self,
        state: MeshState,
        meta: &SnapshotMeta<u64, ServerNode>,
        data: Vec<u8>,
    ) -> Result<(), redb::Error> {
        let database = Arc::clone(&self.database);
        let stored_meta = meta.clone();
        let mut state = run_write(self.writes, move || {
            replace_rows(&database, &state, &stored_meta, &data)?;
            Ok(state)
        })
        .await?;
        state.sabotage = self.sabotage;
        *self.state.write() = state;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }
}

/// [`StateMachineStore::write_back`]'s transaction. It reads the state while it writes:
/// the state machine applies nothing meanwhile (`apply` waits for it).
fn write_rows(
    database: &Database,
    state: &StateHandle,
    changed: &[StateKey],
    applied: Option<LogId<u64>>,
    membership: &StoredMembership<u64, ServerNode>,
) -> Result<(), redb::Error> {
    let state = state.0.read().unwrap_or_else(PoisonError::into_inner);
    let transaction = begin_volatile_write(database)?;
    {
        let mut table = transaction.open_table(STATE)?;
        for key in changed {
            let name = state_key(key);
            match state_value(&state, key) {
                Some(value) => {
                    table.insert(name.as_str(), value.as_slice())?;
                }
                None => {
                    table.remove(name.as_str())?;
                }
            }
        }
        let mut meta = transaction.open_table(META)?;
        meta.insert(APPLIED, encode(&applied).as_slice())?;
        meta.insert(MEMBERSHIP, encode(membership).as_slice())?;
    }
    transaction.commit()?;
    Ok(())
}

/// [`StateMachineStore::replace`]'s transaction.
fn replace_rows(
    database: &Database,
    state: &MeshState,
    meta: &SnapshotMeta<u64, ServerNode>,
    data: &[u8],
) -> Result<(), redb::Error> {
    let transaction = begin_write(database)?;
    {
        let mut table = transaction.open_table(STATE)?;
        let keys = table
            .iter()?
            .map(|row| row.map(|(key, _)| key.value().to_owned()))
            .collect::<Result<Vec<String>, _>>()?;
        for key in keys {
            table.remove(key.as_str())?;
        }
        let mut rows = Vec::new();
        rows.extend(state.leases.keys().map(|address| StateKey::Lease(*address)));
        rows.extend(
            state
                .quarantine
                .keys()
                .map(|address| StateKey::Quarantine(*address)),
        );
        rows.extend(state.blocks.keys().map(|block| StateKey::Block(*block)));
        rows.push(StateKey::Config);
        rows.extend(
            state
                .catalog
                .keys()
                .map(|reference| StateKey::Image(reference.clone())),
        );
        rows.extend(
            state
                .promotions
                .keys()
                .map(|group| StateKey::Promotion(group.clone())),
        );
        rows.extend(state.members.keys().map(|id| StateKey::Member(*id)));
        rows.extend(
            state
                .join_tokens
                .keys()
                .map(|hash| StateKey::JoinToken(hash.clone())),
        );
        rows.push(StateKey::NextServerId);
        for key in &rows {
            if let Some(value) = state_value(state, key) {
                table.insert(state_key(key).as_str(), value.as_slice())?;
            }
        }
        let mut stored = transaction.open_table(META)?;
        stored.insert(APPLIED, encode(&meta.last_log_id).as_slice())?;
        stored.insert(MEMBERSHIP, encode(&meta.last_membership).as_slice())?;
        stored.insert(SNAPSHOT_META, encode(meta).as_slice())?;
        stored.insert(SNAPSHOT_DATA, data)?;
    }
    transaction.commit()?;
    Ok(())
}

impl RaftStateMachine<MeshTypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, ServerNode>), Storage> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MeshResponse>, Storage>
    where
        I: IntoIterator<Item = Entry<MeshTypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut changed = Vec::new();
        for entry in entries {
            self.applied = Some(entry.log_id);
            let (response, proposal) = match entry.payload {
                EntryPayload::Blank => (MeshResponse::Nothing, None),
                EntryPayload::Normal(proposal) => {
                    let (response, keys) = self.state.write().apply(&proposal);
                    changed.extend(keys);
                    (response, Some(proposal))
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    (MeshResponse::Nothing, None)
                }
            };
            for observer in &self.observers {
                observer(
                    &entry.log_id,
                    proposal.as_ref().map(|proposal| (proposal, &response)),
                );
            }
            responses.push(response);
        }
        changed.sort();
        changed.dedup();
        let written = self.write_back(changed).await;
        pay_disk_latency(self.latency.as_ref()).await;
        written.map_err(|error| StorageIOError::write_state_machine(&error))?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            database: Arc::clone(&self.database),
            state: self.state.read(MeshState::clone),
            applied: self.applied,
            membership: self.membership.clone(),
            writes: self.writes,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Storage> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, ServerNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Storage> {
        let data = snapshot.into_inner();
        let state = decode_snapshot(&data)
            .map_err(|error| StorageIOError::read_snapshot(Some(meta.signature()), &error))?;
        self.replace(state, meta, data)
            .await
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), &error))?;
        for observer in &self.snapshot_observers {
            observer(meta.last_log_id.as_ref());
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MeshTypeConfig>>, Storage> {
        let read = || -> Result<Option<Snapshot<MeshTypeConfig>>, StoreError> {
            let Some(meta) =
                read_meta::<SnapshotMeta<u64, ServerNode>>(&self.database, SNAPSHOT_META)?
            else {
                return Ok(None);
            };
            let transaction = self.database.begin_read().map_err(database_error)?;
            let table = transaction.open_table(META).map_err(database_error)?;
            let data = table
                .get(SNAPSHOT_DATA)
                .map_err(database_error)?
                .map(|bytes| bytes.value().to_vec())
                .unwrap_or_default();
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
        };
        read().map_err(|error| StorageIOError::read_snapshot(None, &error).into())
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
#[derive(Debug)]
pub struct SnapshotBuilder {
    database: Arc<Database>,
    state: MeshState,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, ServerNode>,
    writes: Writes,
}

impl RaftSnapshotBuilder<MeshTypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MeshTypeConfig>, Storage> {
        // Encoding the whole state is the expensive part (a hundred thousand leases): it goes
        // off the runtime with the write.
        let database = Arc::clone(&self.database);
        let state = std::mem::take(&mut self.state);
        let applied = self.applied;
        let membership = self.membership.clone();
        let built = run_write(self.writes, move || {
            let data = encode(&SnapshotBody { state });
            let snapshot_id = match applied {
                Some(applied) => format!("{}-{}-{}", applied.leader_id, applied.index, data.len()),
                None => format!("empty-{}", data.len()),
            };
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            };
            let transaction = begin_write(&database)?;
            {
                let mut table = transaction.open_table(META)?;
                table.insert(SNAPSHOT_META, encode(&meta).as_slice())?;
                table.insert(SNAPSHOT_DATA, data.as_slice())?;
            }
            transaction.commit()?;
            Ok((meta, data))
        })
        .await;
        let (meta, data) = built.map_err(|error| StorageIOError::write_snapshot(None, &error))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
