//! What a storm run reports: boot times against the lower bound, bytes by source, and how
//! much crossed the racks' uplinks.

use std::fmt::Write as _;

use crate::plot::{PlotRun, percentiles};

use super::scenario::{Serving, StormScenario};

/// The raw figures of one run.
#[derive(Debug, Clone)]
pub struct Figures {
    /// What ran.
    pub scenario: StormScenario,
    /// Bytes in the image.
    pub image_bytes: u64,
    /// Per node: from its agent's start to holding the image.
    pub fetch_seconds: Vec<f64>,
    /// Per node: from power-on to holding the image.
    pub boot_seconds: Vec<f64>,
    /// From the first agent's start to the last node's completion.
    pub span_seconds: f64,
    /// Virtual time at the end.
    pub end_seconds: f64,
    /// Image bytes nodes took from servers (first copies only).
    pub bytes_from_servers: u64,
    /// Image bytes nodes took from other nodes (first copies only).
    pub bytes_from_nodes: u64,
    /// Bytes of chunks that arrived twice (the endgame's duplicates).
    pub bytes_duplicate: u64,
    /// Bytes the servers sent.
    pub bytes_uploaded_by_servers: u64,
    /// Chunk bytes delivered within a rack.
    pub bytes_same_rack: u64,
    /// Chunk bytes delivered across racks.
    pub bytes_across_racks: u64,
    /// Of those, the bytes nodes (not servers) sent.
    pub bytes_across_racks_from_nodes: u64,
    /// Per rack: bytes its uplink carried out and in.
    pub uplink_bytes: Vec<(f64, f64)>,
    /// Chunk requests.
    pub requests: u64,
    /// Requests declined because the chunk had just gone to another peer.
    pub declined: u64,
    /// Requests answered "busy".
    pub busy: u64,
    /// Requests for chunks the peer did not hold.
    pub not_here: u64,
    /// Requests cancelled (endgame).
    pub cancelled: u64,
    /// Announces to the tracker.
    pub announces: u64,
    /// Peerings opened.
    pub peerings: u64,
    /// Events handled.
    pub events: u64,
    /// Max-min rate recomputations.
    pub rate_recomputations: u64,
    /// The least virtual time between two of them (0: none; the scenario's
    /// `rate_quantum_us`).
    pub rate_quantum_us: u64,
    /// Faults that struck (power losses and uplink down periods).
    pub faults: u64,
    /// Messages lost on a cut uplink.
    pub messages_lost: u64,
    /// Dials that went unanswered (a dead peer, or a cut between).
    pub dials_failed: u64,
    /// Peerings lost to QUIC's idle timeout (a dead or cut-off peer).
    pub peerings_lost: u64,
    /// Times a node cut off from every DHCP server asked again.
    pub dhcp_retries: u64,
    /// Hash of the trace: announces answered, chunks accepted and completions, with times.
    pub trace_hash: u64,
}

/// One storm run's report.
#[derive(Debug, Clone)]
pub struct StormReport {
    /// The figures.
    pub figures: Figures,
    /// Fetch time percentiles (p50, p99, max), seconds.
    pub fetch_percentiles: [f64; 3],
    /// Boot time percentiles (p50, p99, max), seconds.
    pub boot_percentiles: [f64; 3],
    /// The scenario's lower bound on the fetch span.
    pub lower_bound_seconds: f64,
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

impl StormReport {
    /// The names of the byte sources in [`StormReport::plot_run`]'s order.
    pub const PLOT_SOURCES: [&str; 4] = [
        "from servers",
        "from nodes, same rack",
        "from nodes, other racks",
        "duplicates",
    ];

    /// This run as one curve and one bar of a picture.
    pub fn plot_run(&self, label: &str) -> PlotRun {
        let figures = &self.figures;
        let from_nodes_across = figures.bytes_across_racks_from_nodes as f64;
        let from_nodes = figures.bytes_from_nodes as f64;
        PlotRun {
            label: label.to_owned(),
            boot_seconds: figures.boot_seconds.clone(),
            bytes_by_source: vec![
                figures.bytes_from_servers as f64,
                (from_nodes - from_nodes_across).max(0.0),
                from_nodes_across.min(from_nodes),
                figures.bytes_duplicate as f64,
            ],
        }
    }

    /// The report of `figures`.
    pub fn new(figures: Figures) -> Self {
        Self {
            fetch_percentiles: percentiles(&figures.fetch_seconds),
            boot_percentiles: percentiles(&figures.boot_seconds),
            lower_bound_seconds: figures.scenario.lower_bound_seconds(),
            figures,
        }
    }

    /// The trace hash: equal for equal runs.
    pub fn trace_hash(&self) -> u64 {
        self.figures.trace_hash
    }

    /// The slowest node's fetch over the lower bound (with nodes powering on at once, the
    /// time until all hold the image; with a spread, each node's own fetch is what the bound
    /// is about).
    pub fn ratio_to_lower_bound(&self) -> f64 {
        if self.lower_bound_seconds > 0.0 {
            self.fetch_percentiles[2] / self.lower_bound_seconds
        } else {
            0.0
        }
    }

    /// Copies of the image the servers sent.
    pub fn server_copies(&self) -> f64 {
        self.figures.bytes_uploaded_by_servers as f64 / self.figures.image_bytes.max(1) as f64
    }

    /// A text report.
    pub fn text(&self) -> String {
        let figures = &self.figures;
        let scenario = &figures.scenario;
        let mut out = String::new();
        let serving = match scenario.serving {
            Serving::Swarm => "swarm (tracker, peers, racks)",
            Serving::Central => "central (every node from one server, LTSP-style)",
        };
        let _ = writeln!(
            out,
            "scenario {}: {} racks x {} nodes, {} servers, image {:.1} MiB in {} chunks; {serving}",
            scenario.name,
            scenario.fleet.racks,
            scenario.fleet.nodes_per_rack,
            scenario.fleet.servers,
            mib(figures.image_bytes as f64),
            scenario.image.chunks,
        );
        let [p50, p99, max] = self.fetch_percentiles;
        let _ = writeln!(
            out,
            "fetch (agent start to image held): p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s"
        );
        let [p50, p99, max] = self.boot_percentiles;
        let _ = writeln!(
            out,
            "boot (power-on to image held):     p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s"
        );
        let _ = writeln!(
            out,
            "all nodes hold the image {:.2} s after the first agent's start; slowest fetch {:.2} s against the lower bound {:.2} s: ratio {:.2}",
            figures.span_seconds,
            self.fetch_percentiles[2],
            self.lower_bound_seconds,
            self.ratio_to_lower_bound()
        );
        let taken = (figures.bytes_from_servers + figures.bytes_from_nodes).max(1) as f64;
        let _ = writeln!(
            out,
            "bytes: {:.0} MiB from servers ({:.1} %), {:.0} MiB from nodes ({:.1} %); servers sent {:.2} copies; duplicates {:.0} MiB",
            mib(figures.bytes_from_servers as f64),
            100.0 * figures.bytes_from_servers as f64 / taken,
            mib(figures.bytes_from_nodes as f64),
            100.0 * figures.bytes_from_nodes as f64 / taken,
            self.server_copies(),
            mib(figures.bytes_duplicate as f64),
        );
        let crossed: f64 = figures.uplink_bytes.iter().map(|(up, _)| up).sum();
        let _ = writeln!(
            out,
            "racks: {:.0} MiB delivered within a rack, {:.0} MiB across ({:.0} MiB of it from nodes); uplinks carried {:.0} MiB out in all (busiest rack {:.0} MiB in)",
            mib(figures.bytes_same_rack as f64),
            mib(figures.bytes_across_racks as f64),
            mib(figures.bytes_across_racks_from_nodes as f64),
            mib(crossed),
            mib(figures
                .uplink_bytes
                .iter()
                .map(|(_, down)| *down)
                .fold(0.0, f64::max)),
        );
        let _ = writeln!(
            out,
            "protocol: {} requests ({} declined as just sent elsewhere, {} busy, {} not held, {} cancelled), {} announces, {} peerings",
            figures.requests,
            figures.declined,
            figures.busy,
            figures.not_here,
            figures.cancelled,
            figures.announces,
            figures.peerings,
        );
        if figures.faults > 0 {
            let _ = writeln!(
                out,
                "faults: {} struck; {} messages lost on cut uplinks, {} dials unanswered, {} peerings lost to the idle timeout, {} DHCP retries of nodes cut off",
                figures.faults,
                figures.messages_lost,
                figures.dials_failed,
                figures.peerings_lost,
                figures.dhcp_retries,
            );
        }
        let _ = writeln!(
            out,
            "engine: {} events, {} rate recomputations{}, virtual end {:.2} s, trace hash {:016x}",
            figures.events,
            figures.rate_recomputations,
            if figures.rate_quantum_us > 0 {
                format!(" (at most one per {} µs)", figures.rate_quantum_us)
            } else {
                String::new()
            },
            figures.end_seconds,
            figures.trace_hash
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&values), [50.0, 99.0, 100.0]);
        assert_eq!(percentiles(&[]), [0.0, 0.0, 0.0]);
        assert_eq!(percentiles(&[3.0]), [3.0, 3.0, 3.0]);
    }
}
