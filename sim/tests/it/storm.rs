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

/// A fleet on 10 Gbit/s nodes, 25 Gbit/s servers and 40 Gbit/s uplinks, two servers and a
/// 16 MiB image: the whole image could arrive in about 0.01 s.
fn fast_fleet(racks: u32, nodes_per_rack: u32, boot_critical_chunks: u32, boot: &str) -> String {
    format!(
        r#"
        name = "fast-fleet"
        [fleet]
        racks = {racks}
        nodes_per_rack = {nodes_per_rack}
        servers = 2
        [image]
        chunks = 64
        chunk_kib = 256
        boot_critical_chunks = {boot_critical_chunks}
        [network]
        node_up_mbit = 10000
        node_down_mbit = 10000
        server_up_mbit = 25000
        uplink_mbit = 40000
        latency_us = 30
        cross_rack_latency_us = 120
        [boot]
        {boot}
        "#
    )
}

#[test]
fn claim_windows_of_tenths_of_a_second_cut_the_tail_on_fast_links() {
    // ADR 0011: with claim windows of seconds (the rule before), a fetcher waits seconds for
    // chunks an idle 25 Gbit/s seed, or a neighbour, could send in microseconds.
    // 16 nodes in two racks.
    let now = StormScenario::from_toml(&fast_fleet(2, 8, 24, "power_on_spread_ms = 2000"))
        .expect("the scenario reads");
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
        (
            "rack-power-loss",
            include_str!("../../scenarios/rack-power-loss.toml"),
        ),
        (
            "flapping-link",
            include_str!("../../scenarios/flapping-link.toml"),
        ),
        (
            "rack-cut-off",
            include_str!("../../scenarios/rack-cut-off.toml"),
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

#[expect(
    clippy::expect_used,
    reason = "a test helper: a scenario that does not read fails the test"
)]
/// Four racks of ten nodes powering on over 4 s, with `fault`. Server 0 stands in rack 0,
/// server 1 in rack 1.
fn small_fleet_with(fault: &str) -> StormScenario {
    let fleet = fast_fleet(
        4,
        10,
        8,
        "power_on_spread_ms = 4000\nagent_starts_after_ms = 1000",
    );
    StormScenario::from_toml(&format!("{fleet}\n[[fault]]\n{fault}")).expect("the scenario reads")
}

#[test]
fn a_rack_that_loses_power_with_its_server_boots_again_and_everyone_completes() {
    // Rack 0 (with server 0) dies 2.5 s in, while most nodes are fetching, and returns at 12.5
    // s: its nodes lost what they held; their peers elsewhere lose them at the idle timeout.
    let scenario =
        small_fleet_with("kind = \"rack_power_loss\"\nrack = 0\nat_ms = 2500\nfor_ms = 10000");
    for serving in [Serving::Swarm, Serving::Central] {
        let mut scenario = scenario.clone();
        scenario.serving = serving;
        let report = run_storm(&scenario, 5).expect("every node completes after the power returns");
        let figures = &report.figures;
        assert_eq!(figures.faults, 1, "{}", report.text());
        assert_eq!(figures.fetch_seconds.len(), 40, "{}", report.text());
        // Rack 0's nodes powered on again after 12.5 s and booted then.
        assert!(figures.end_seconds > 12.5 + 1.0, "{}", report.text());
        if serving == Serving::Swarm {
            assert!(figures.peerings_lost > 0, "{}", report.text());
        }
        let again = run_storm(&scenario, 5).expect("the replay completes");
        assert_eq!(report.trace_hash(), again.trace_hash());
    }
}

#[test]
fn a_rack_cut_off_with_its_relay_waits_for_its_leases_and_finishes_after_the_cut_heals() {
    // Rack 3 has no server: cut off from 0.5 s to 20.5 s, its nodes get no lease until then.
    let scenario = small_fleet_with("kind = \"rack_cut\"\nrack = 3\nat_ms = 500\nfor_ms = 20000");
    let report = run_storm(&scenario, 2).expect("every node completes after the cut heals");
    let figures = &report.figures;
    assert!(figures.dhcp_retries > 0, "{}", report.text());
    assert!(
        report.boot_percentiles[2] > 20.5 - 4.0,
        "the cut rack's last node booted before the cut healed:\n{}",
        report.text()
    );
    // The other three racks were not held up by it.
    let mut boots = figures.boot_seconds.clone();
    boots.sort_by(f64::total_cmp);
    assert!(
        boots[29] < 10.0,
        "30 nodes outside the cut rack should be up long before it heals:\n{}",
        report.text()
    );
}

#[test]
fn a_flapping_uplink_loses_messages_and_stalls_chunks_but_every_node_completes() {
    let scenario = small_fleet_with(
        "kind = \"link_flap\"\nrack = 2\nat_ms = 200\ndown_ms = 700\nup_ms = 500\ntimes = 6",
    );
    let report = run_storm(&scenario, 3).expect("every node completes");
    let figures = &report.figures;
    assert_eq!(figures.faults, 6, "{}", report.text());
    assert!(figures.messages_lost > 0, "{}", report.text());
    assert_eq!(figures.fetch_seconds.len(), 40);
}

#[test]
fn changing_one_fault_decision_changes_the_trace() {
    let early =
        small_fleet_with("kind = \"rack_power_loss\"\nrack = 1\nat_ms = 3000\nfor_ms = 5000");
    let later =
        small_fleet_with("kind = \"rack_power_loss\"\nrack = 1\nat_ms = 3001\nfor_ms = 5000");
    let early = run_storm(&early, 9).expect("the storm completes");
    let later = run_storm(&later, 9).expect("the storm completes");
    assert_ne!(
        early.trace_hash(),
        later.trace_hash(),
        "a power loss 1 ms later must show in the trace"
    );
}
