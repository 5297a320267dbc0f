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

/// 80 nodes on 10 Gbit/s: the whole 64 MiB image could arrive in 0.05 s.
const FAST_RACKS: &str = r#"
    name = "fast-racks"
    [fleet]
    racks = 4
    nodes_per_rack = 20
    servers = 2
    [image]
    chunks = 256
    chunk_kib = 256
    boot_critical_chunks = 24
    [network]
    node_up_mbit = 10000
    node_down_mbit = 10000
    server_up_mbit = 25000
    uplink_mbit = 40000
    latency_us = 30
    cross_rack_latency_us = 120
    [boot]
    power_on_spread_ms = 2000
"#;

#[test]
fn claim_windows_of_tenths_of_a_second_cut_the_tail_on_fast_links() {
    // ADR 0011: with claim windows of seconds (the rule before), a fetcher waits seconds for
    // chunks an idle 25 Gbit/s seed, or a neighbour, could send in microseconds.
    let now = StormScenario::from_toml(FAST_RACKS).expect("the scenario reads");
    let mut before = now.clone();
    before.protocol.claim_announced_grace_ms = Some(3000);
    before.protocol.claim_sent_window_ms = Some(5000);
    before.protocol.claim_in_transit_retry_ms = Some(1000);
    let now = run_storm(&now, 1).expect("the storm completes");
    let before = run_storm(&before, 1).expect("the storm completes");
    eprintln!("now:\n{}\nbefore:\n{}", now.text(), before.text());
    assert!(
        now.fetch_percentiles[1] * 2.0 < before.fetch_percentiles[1],
        "fetch p99 {:.2} s now against {:.2} s before",
        now.fetch_percentiles[1],
        before.fetch_percentiles[1]
    );
}

#[test]
fn chunks_cross_into_a_rack_about_once_and_spread_inside_it() {
    // The namespace lab's rack test, in the engine: what agents take from agents of the other
    // rack is a small part of what they take within their own.
    let report = run_storm(&lab_scenario(), 3).expect("the storm completes");
    let figures = &report.figures;
    assert!(
        figures.bytes_across_racks_from_nodes * 3 < figures.bytes_same_rack,
        "{}",
        report.text()
    );
}

#[test]
fn every_scenario_shipped_reads() {
    for (name, text) in [
        (
            "lab-twenty-agents",
            include_str!("../../scenarios/lab-twenty-agents.toml"),
        ),
        (
            "lab-twenty-agents-link-bound",
            include_str!("../../scenarios/lab-twenty-agents-link-bound.toml"),
        ),
        (
            "rack-power-on",
            include_str!("../../scenarios/rack-power-on.toml"),
        ),
        ("fleet-1k", include_str!("../../scenarios/fleet-1k.toml")),
        ("fleet-10k", include_str!("../../scenarios/fleet-10k.toml")),
        (
            "fleet-100k",
            include_str!("../../scenarios/fleet-100k.toml"),
        ),
    ] {
        let scenario = StormScenario::from_toml(text);
        assert!(scenario.is_ok(), "{name}: {scenario:?}");
        assert_eq!(
            scenario.map(|scenario| scenario.name).ok().as_deref(),
            Some(name)
        );
    }
}
