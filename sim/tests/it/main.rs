//! The simulator's integration tests: determinism first.

mod chaos;
mod cluster;
mod quic;
mod storm;

use sim::run_boot_path;

#[test]
fn same_seed_same_trace_different_seed_different_trace() {
    let first = run_boot_path(7, 3).expect("run with seed 7");
    let again = run_boot_path(7, 3).expect("rerun with seed 7");
    assert_eq!(first, again, "one seed must replay the same run");
    let other = run_boot_path(8, 3).expect("run with seed 8");
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "another seed must give another run"
    );
    assert!(
        first.events > 20,
        "trace too small to mean anything: {}",
        first.events
    );
    assert_eq!(first.addresses.len(), 3);
}

#[test]
fn many_nodes_boot_with_distinct_addresses() {
    let report = run_boot_path(1, 12).expect("12 nodes boot");
    assert_eq!(report.addresses.len(), 12);
    assert!(
        report
            .addresses
            .iter()
            .all(|address| !address.is_unspecified())
    );
}
