//! The storm engine: real swarm cores, virtual time, a fluid network.

use sim::storm::{Serving, StormScenario, run_storm};

#[expect(
    clippy::expect_used,
    reason = "a test helper: a scenario that does not read fails the test"
)]
fn lab_scenario() -> StormScenario {
    StormScenario::from_toml(include_str!("../../scenarios/lab-twenty-agents.toml"))
        .expect("the lab scenario reads")
}

#[test]
fn the_lab_storm_completes_and_the_server_sends_few_copies() {
    let scenario = lab_scenario();
    let report = run_storm(&scenario, 1).expect("the storm completes");
    eprintln!("{}", report.text());
    assert_eq!(report.figures.fetch_seconds.len(), 20);
    assert!(report.server_copies() < 3.0, "{}", report.text());
    assert!(report.ratio_to_lower_bound() >= 1.0, "{}", report.text());
}

#[test]
fn the_central_baseline_sends_one_copy_per_node_from_the_servers() {
    let mut scenario = lab_scenario();
    scenario.serving = Serving::Central;
    let report = run_storm(&scenario, 1).expect("the storm completes");
    eprintln!("{}", report.text());
    assert!(
        (report.server_copies() - 20.0).abs() < 0.5,
        "{}",
        report.text()
    );
    assert_eq!(report.figures.bytes_from_nodes, 0);
}

#[test]
fn one_seed_gives_one_trace_and_another_seed_another() {
    let scenario = lab_scenario();
    let first = run_storm(&scenario, 7).expect("the storm completes");
    let again = run_storm(&scenario, 7).expect("the storm completes");
    let other = run_storm(&scenario, 8).expect("the storm completes");
    assert_eq!(first.trace_hash(), again.trace_hash());
    assert_ne!(first.trace_hash(), other.trace_hash());
}
