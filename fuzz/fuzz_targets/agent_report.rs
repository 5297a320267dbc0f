//! Agents' boot reports (`POST /nodes/<mac>/report`, unauthenticated): any body either decodes
//! to a report or is refused, a refused report changes nothing, and any sequence of accepted
//! reports and server sightings keeps every timeline in stage order, never panics, and merges;
//! the fixed-header read of an ACK takes any bytes; and any `/api/v1/nodes` query is parsed or
//! refused, never a panic.
#![no_main]

use boot_services::timeline::{AgentReport, BootTimelines, NodesFilter, Observation, merge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The fixed-header read of a DHCP ACK that the reply path uses: any bytes, no panic.
    let _ = boot_services::timeline::new_binding_of_ack(data);
    // The `/api/v1/nodes` query: any bytes parse or are refused, and a parsed filter says the
    // same after a round trip through its own query.
    if let Ok(filter) = NodesFilter::from_query(&String::from_utf8_lossy(data)) {
        assert_eq!(NodesFilter::from_query(&filter.to_query()), Ok(filter));
    }
    let mut timelines = BootTimelines::new("fuzz", 4);
    let mut now = 1_700_000_000_000u64;
    for (index, line) in data.split(|byte| *byte == b'\n').enumerate() {
        let mac = [0x52, 0x54, 0, 0, 0, (index % 6) as u8];
        now += u64::from(line.first().copied().unwrap_or(0)) * 1000;
        let observation = match line.first() {
            Some(b'A') => Observation::DhcpAck {
                address: std::net::Ipv4Addr::new(10, 0, 0, index as u8),
            },
            Some(b'K') => Observation::BootScript {
                image: std::str::from_utf8(&line[1..]).ok().map(str::to_owned),
            },
            Some(b'P') => Observation::Plan {
                hostname: std::str::from_utf8(&line[1..]).ok().map(str::to_owned),
            },
            _ => {
                let Ok(report) = serde_json::from_slice::<AgentReport>(line) else {
                    continue;
                };
                if report.validate().is_err() {
                    continue;
                }
                Observation::Report(report)
            }
        };
        timelines.observe(now, &mac, observation);
    }
    let snapshot = timelines.snapshot();
    assert!(snapshot.len() <= 4);
    for node in &snapshot {
        assert!(node.stages.windows(2).all(|pair| pair[0].stage < pair[1].stage));
    }
    let merged = merge([snapshot.clone(), snapshot]);
    assert!(merged.len() <= 4);
});
