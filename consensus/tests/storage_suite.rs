//! openraft's own storage test suite against the redb store, on a real file.

use consensus::MeshTypeConfig;
use consensus::store::{LogStore, StateMachineStore, create_file, open_file};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct FileStore;

impl StoreBuilder<MeshTypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for FileStore {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let directory = tempfile::tempdir()
            .map_err(|error| StorageError::from(openraft::StorageIOError::<u64>::write(&error)))?;
        let path = directory.path().join("mesh.redb");
        create_file(&path)
            .map_err(|error| StorageError::from(openraft::StorageIOError::<u64>::write(&error)))?;
        let (log, state_machine) = open_file(&path)
            .map_err(|error| StorageError::from(openraft::StorageIOError::<u64>::write(&error)))?;
        Ok((directory, log, state_machine))
    }
}

#[test]
fn the_redb_store_passes_openrafts_storage_suite() {
    Suite::test_all(FileStore).expect("openraft's storage suite passes");
}
