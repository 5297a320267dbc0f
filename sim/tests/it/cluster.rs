//! The Raft cluster under the simulator: it elects, replicates, survives a leader crash with
//! lost unsynced writes, and one seed replays a run exactly.

use sim::cluster::{ClusterSpec, run_cluster};

#[test]
fn three_servers_elect_and_replicate_and_the_same_seed_replays_the_run() {
    let spec = ClusterSpec {
        seed: 11,
        ..ClusterSpec::default()
    };
    let first = run_cluster(&spec).expect("seed 11");
    eprintln!(
        "seed 11: {} events in {:?} virtual, leaders {:?}, applied {:?}",
        first.events, first.elapsed, first.leaders, first.applied
    );
    assert!(!first.leaders.is_empty(), "a leader was elected");
    let last: Vec<u64> = first.applied.values().copied().collect();
    assert_eq!(last.len(), 3);
    assert!(last.windows(2).all(|pair| pair[0] == pair[1]), "{last:?}");
    assert!(last[0] >= spec.commands, "every command applied: {last:?}");

    let again = run_cluster(&spec).expect("seed 11 again");
    assert_eq!(
        again, first,
        "the same seed gives the same run, trace hash included"
    );

    let other = run_cluster(&ClusterSpec {
        seed: 12,
        ..ClusterSpec::default()
    })
    .expect("seed 12");
    assert_ne!(
        other.trace_hash, first.trace_hash,
        "another seed, another run"
    );
}

#[test]
fn the_leader_crashes_losing_unsynced_writes_and_the_cluster_heals() {
    for seed in [21, 22] {
        let spec = ClusterSpec {
            seed,
            commands: 60,
            crash_leader_after_commands: Some(25),
            ..ClusterSpec::default()
        };
        let report = run_cluster(&spec).expect("the crash run completes");
        eprintln!(
            "seed {seed}: crashed {:?}; leaders {:?}; applied {:?}; {:?} virtual",
            report.crashed, report.leaders, report.applied, report.elapsed
        );
        let crashed = report.crashed.expect("the leader was crashed");
        let first_term = report
            .leaders
            .first()
            .map(|(_, term, _)| *term)
            .unwrap_or(0);
        assert!(
            report
                .leaders
                .iter()
                .any(|(_, term, leader)| *term > first_term && *leader != crashed),
            "another server took over: {:?}",
            report.leaders
        );
        let last: Vec<u64> = report.applied.values().copied().collect();
        assert!(last.windows(2).all(|pair| pair[0] == pair[1]), "{last:?}");
        if seed == 21 {
            let again = run_cluster(&spec).expect("the crash run replays");
            assert_eq!(again, report, "a crash replays from its seed too");
        }
    }
}

#[test]
fn a_restarted_server_behind_the_compacted_log_catches_up_from_a_snapshot() {
    // A snapshot every 10 entries, 2 kept behind it: the crashed leader comes back after the
    // others moved 35 commands on, so the entries it lacks are gone from every log.
    let spec = ClusterSpec {
        seed: 31,
        commands: 60,
        crash_leader_after_commands: Some(25),
        snapshot_every: 10,
        ..ClusterSpec::default()
    };
    let report = run_cluster(&spec).expect("the run completes");
    eprintln!(
        "crashed {:?}; snapshot installs {:?}; applied {:?}",
        report.crashed, report.snapshot_installs, report.applied
    );
    let crashed = report.crashed.expect("the leader was crashed");
    assert!(
        report.snapshot_installs.get(&crashed).copied().unwrap_or(0) >= 1,
        "the restarted server caught up from a snapshot: {:?}",
        report.snapshot_installs
    );
    let last: Vec<u64> = report.applied.values().copied().collect();
    assert!(last.windows(2).all(|pair| pair[0] == pair[1]), "{last:?}");
    assert_eq!(
        run_cluster(&spec).expect("the run replays"),
        report,
        "a snapshot install replays from its seed too"
    );
}
