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

/// tokio's `select!` starts at a random branch unless told `biased;`, and that randomness
/// comes from an unseeded generator (tokio seeds it only under `--cfg tokio_unstable`), so
/// when two branches are ready at one virtual instant, two runs of a seed could go different
/// ways. Every `select!` in code that a simulation runs is therefore biased, and this test
/// keeps it so: it reads the sources of every crate of the workspace.
#[test]
fn every_select_in_the_workspace_is_biased_so_a_seed_replays_its_run() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the sim crate")
        .to_path_buf();
    let mut unbiased = Vec::new();
    let mut selects = 0;
    let mut folders: Vec<std::path::PathBuf> =
        ["node", "consensus", "transfer", "boot-services", "sim"]
            .iter()
            .map(|crate_name| workspace.join(crate_name).join("src"))
            .collect();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            if path.extension().is_none_or(|extension| extension != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file");
            let lines: Vec<&str> = text.lines().collect();
            for (number, line) in lines.iter().enumerate() {
                if !line.contains("select! {") || line.trim_start().starts_with("//") {
                    continue;
                }
                selects += 1;
                if lines.get(number + 1).map(|next| next.trim()) != Some("biased;") {
                    unbiased.push(format!("{}:{}", path.display(), number + 1));
                }
            }
        }
    }
    assert!(
        selects > 10,
        "found only {selects} selects: is the workspace where it was?"
    );
    assert!(
        unbiased.is_empty(),
        "a select! without `biased;` as its first line: {unbiased:?}"
    );
}
