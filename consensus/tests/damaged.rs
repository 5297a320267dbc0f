//! A store file that was truncated, overwritten or deleted is refused with a clear error,
//! never opened as an empty or silently repaired store, and stays refused.

#![allow(clippy::expect_used, clippy::panic)] // A failed step fails the test, loudly.

use std::path::Path;

use consensus::MeshTypeConfig;
use consensus::state::{MeshCommand, Proposal};
use consensus::store::{StoreError, create_file, damage_marker, open_file};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

/// A store with a few hundred applied entries, closed cleanly; returns its size.
async fn filled_store(path: &Path) -> u64 {
    create_file(path).expect("create");
    let (_log, mut state_machine) = open_file(path).expect("open");
    for batch in 0..20u64 {
        let entries: Vec<Entry<MeshTypeConfig>> = (0..20u64)
            .map(|offset| {
                let index = batch * 20 + offset + 1;
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Normal(Proposal {
                        at: 1_000,
                        command: MeshCommand::TagImage {
                            reference: format!("image:v{index}"),
                            manifest: format!("{index:064x}"),
                            size_bytes: index,
                        },
                    }),
                }
            })
            .collect();
        state_machine.apply(entries).await.expect("apply");
    }
    std::fs::metadata(path).expect("size").len()
}

fn expect_damaged(path: &Path, what: &str) {
    match open_file(path) {
        Err(error @ StoreError::Damaged { .. }) => {
            eprintln!("{what}: {error}");
            assert!(error.to_string().contains("mesh.redb"), "{error}");
        }
        Err(other) => panic!("{what}: expected a damaged-store error, got {other}"),
        Ok(_) => panic!("{what}: the damaged store was opened"),
    }
    // And at the next start too, whatever redb repaired in between.
    match open_file(path) {
        Err(StoreError::Damaged { reason, .. }) => {
            assert!(reason.contains("earlier start"), "{reason}")
        }
        Err(other) => panic!("{what}, second start: {other}"),
        Ok(_) => panic!("{what}: opened at the second start"),
    }
    assert!(damage_marker(path).exists());
}

#[tokio::test]
async fn a_truncated_store_is_refused_at_every_start() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("mesh.redb");
    let size = filled_store(&path).await;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for truncation");
    file.set_len(size / 2).expect("truncate");
    drop(file);
    expect_damaged(&path, "truncated to half");
}

#[tokio::test]
async fn a_store_with_overwritten_pages_is_refused_at_every_start() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("mesh.redb");
    let size = filled_store(&path).await;
    let mut bytes = std::fs::read(&path).expect("read");
    // Garbage over the middle of the file, where table pages live.
    let start = usize::try_from(size / 2).expect("size");
    for byte in &mut bytes[start..start + 8192] {
        *byte ^= 0x5a;
    }
    std::fs::write(&path, &bytes).expect("write");
    expect_damaged(&path, "8 KiB overwritten");
}

#[test]
fn a_missing_store_is_refused_not_recreated() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("mesh.redb");
    assert!(matches!(open_file(&path), Err(StoreError::Missing { .. })));
    assert!(!path.exists(), "nothing was created in its place");
    create_file(&path).expect("create");
    assert!(matches!(create_file(&path), Err(StoreError::Exists { .. })));
}
