//! Storm scenarios: the fleet, the image, the network and how the nodes power on, as TOML
//! files (`sim/scenarios/*.toml`) that the storm engine and `bootmesh sim` read.

use serde::Deserialize;

/// One storm scenario.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StormScenario {
    /// A name for reports.
    pub name: String,
    /// What the scenario is about, for reports.
    #[serde(default)]
    pub description: String,
    /// Racks, nodes and servers.
    pub fleet: Fleet,
    /// The image every node boots.
    pub image: ImageShape,
    /// Link capacities and latencies.
    pub network: NetworkShape,
    /// How and when the nodes power on.
    #[serde(default)]
    pub boot: BootShape,
    /// Who serves the image.
    #[serde(default)]
    pub serving: Serving,
    /// Protocol settings to try other than `node`'s (what-if studies); absent: `node`'s.
    #[serde(default)]
    pub protocol: ProtocolShape,
    /// What goes wrong during the storm, each `[[fault]]` at its virtual time.
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
}

/// Something that goes wrong during a storm. Times count from the start of the run (the first
/// power-on may come at 0).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Every node and server of `rack` loses power at `at_ms`: nodes lose the image they held
    /// in RAM, connections to them die silently (peers notice by QUIC's idle timeout), and
    /// a tracker among them loses its soft state. Power returns `for_ms` later: servers come
    /// back with their image, nodes power on again (spread as at the start) and boot anew.
    RackPowerLoss {
        /// Which rack.
        rack: u32,
        /// When, milliseconds.
        at_ms: u64,
        /// For how long.
        for_ms: u64,
    },
    /// `rack`'s uplink goes down for `down_ms` and up for `up_ms`, `times` times, from
    /// `at_ms`: nothing crosses it while down (chunks stall, messages are lost, and a rack
    /// without a server of its own gets no DHCP through its relay); a connection across it
    /// that stays silent for QUIC's idle timeout is lost.
    LinkFlap {
        /// Which rack.
        rack: u32,
        /// When the first down period starts, milliseconds.
        at_ms: u64,
        /// Each down period.
        down_ms: u64,
        /// Each up period between them.
        up_ms: u64,
        /// Down periods.
        times: u32,
    },
    /// `rack` is cut off, its relay with it, from `at_ms` for `for_ms` (one long flap).
    RackCut {
        /// Which rack.
        rack: u32,
        /// When, milliseconds.
        at_ms: u64,
        /// For how long.
        for_ms: u64,
    },
}

impl Fault {
    /// The rack it strikes.
    pub fn rack(&self) -> u32 {
        match self {
            Self::RackPowerLoss { rack, .. }
            | Self::LinkFlap { rack, .. }
            | Self::RackCut { rack, .. } => *rack,
        }
    }

    /// The uplink's down periods, as (start, end) milliseconds.
    pub fn uplink_down_periods(&self) -> Vec<(u64, u64)> {
        match *self {
            Self::RackPowerLoss { .. } => Vec::new(),
            Self::RackCut { at_ms, for_ms, .. } => vec![(at_ms, at_ms + for_ms)],
            Self::LinkFlap {
                at_ms,
                down_ms,
                up_ms,
                times,
                ..
            } => (0..u64::from(times))
                .map(|period| {
                    let start = at_ms + period * (down_ms + up_ms);
                    (start, start + down_ms)
                })
                .collect(),
        }
    }
}

/// Protocol settings other than `node`'s defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolShape {
    /// The send claims' windows (ADR 0009), milliseconds: after the recipient's announcement,
    /// after the send, and the retry hint while in transit.
    #[serde(default)]
    pub claim_announced_grace_ms: Option<u64>,
    /// See above.
    #[serde(default)]
    pub claim_sent_window_ms: Option<u64>,
    /// See above.
    #[serde(default)]
    pub claim_in_transit_retry_ms: Option<u64>,
    /// Idle seeds send duplicates at once instead of after the claim windows (tried for ADR
    /// 0011, and left: it cost the namespace lab's server a copy more).
    #[serde(default)]
    pub idle_seeds_send_at_once: bool,
    /// Requests one fetcher may have outstanding with one peer.
    #[serde(default)]
    pub requests_per_peer: Option<usize>,
    /// How long a request may take before its peer is paused, milliseconds.
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    /// Chunks one member sends at once.
    #[serde(default)]
    pub upload_sending_max: Option<usize>,
    /// Requests waiting at one member's upload gate.
    #[serde(default)]
    pub upload_queued_max: Option<usize>,
}

impl ProtocolShape {
    /// The claim timings: `node`'s, with what this sets.
    pub fn claim_timings(&self) -> transfer::swarm::ClaimTimings {
        let mut timings = transfer::swarm::ClaimTimings::default();
        let millis = std::time::Duration::from_millis;
        if let Some(ms) = self.claim_announced_grace_ms {
            timings.announced_grace = millis(ms);
        }
        if let Some(ms) = self.claim_sent_window_ms {
            timings.sent_window = millis(ms);
        }
        if let Some(ms) = self.claim_in_transit_retry_ms {
            timings.in_transit_retry = millis(ms);
        }
        timings
    }

    /// The upload gate's settings: `node`'s, with what this sets.
    pub fn upload(&self) -> transfer::swarm::UploadConfig {
        let mut config = transfer::swarm::UploadConfig::default();
        if let Some(sending) = self.upload_sending_max {
            config.sending_max = sending.max(1);
        }
        if let Some(queued) = self.upload_queued_max {
            config.queued_max = queued;
        }
        config
    }

    /// The scheduler settings: `node`'s, with what this sets.
    pub fn scheduler(&self) -> transfer::swarm::SchedulerConfig {
        let mut config = transfer::swarm::SchedulerConfig::default();
        if let Some(requests) = self.requests_per_peer {
            config.requests_per_peer = requests.max(1);
        }
        if let Some(ms) = self.request_timeout_ms {
            config.request_timeout = std::time::Duration::from_millis(ms.max(1));
        }
        config
    }
}

/// Racks, nodes and servers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Racks.
    pub racks: u32,
    /// Booting nodes in each rack.
    pub nodes_per_rack: u32,
    /// Boot servers, placed one per rack from rack 0 on (wrapping round).
    pub servers: u32,
}

/// The image: its chunk count and (equal) chunk size.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageShape {
    /// Chunks in the image.
    pub chunks: u32,
    /// Bytes per chunk, in KiB (the real average is 256).
    pub chunk_kib: u32,
    /// The first chunks are boot-critical (kernel, initrd, read trace), fetched first.
    #[serde(default)]
    pub boot_critical_chunks: u32,
}

impl ImageShape {
    /// Bytes in one chunk.
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_kib) * 1024
    }

    /// Bytes in the image.
    pub fn bytes(&self) -> u64 {
        self.chunk_bytes() * u64::from(self.chunks)
    }
}

/// Link capacities (megabits per second, 10^6) and latencies.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkShape {
    /// A node's upload capacity.
    pub node_up_mbit: f64,
    /// A node's download capacity; absent: unlimited (a lab whose caps are on egress only).
    #[serde(default)]
    pub node_down_mbit: Option<f64>,
    /// A server's upload capacity.
    pub server_up_mbit: f64,
    /// Each rack's uplink, each direction; absent: unlimited.
    #[serde(default)]
    pub uplink_mbit: Option<f64>,
    /// The spine, all racks together; absent: unlimited.
    #[serde(default)]
    pub spine_mbit: Option<f64>,
    /// One-way latency within a rack, microseconds.
    #[serde(default = "default_latency_us")]
    pub latency_us: u64,
    /// One-way latency between racks, microseconds.
    #[serde(default = "default_cross_rack_latency_us")]
    pub cross_rack_latency_us: u64,
    /// The fair shares are recomputed at most once per this many microseconds of virtual time
    /// (0: at every change of the busy pairs, exact). Each recomputation walks every busy
    /// pair, so at tens of thousands of nodes they are most of a run's cost; with a quantum, a
    /// pair that starts waits up to one for its share, and the others keep theirs that long
    /// after a pair ends. BENCHMARKS.md has what it changes in the figures.
    #[serde(default)]
    pub rate_quantum_us: u64,
}

fn default_latency_us() -> u64 {
    50
}

fn default_cross_rack_latency_us() -> u64 {
    200
}

/// How the nodes power on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootShape {
    /// Nodes power on at instants drawn uniformly from this span (0: all at once).
    #[serde(default)]
    pub power_on_spread_ms: u64,
    /// From power-on to the agent's first announce: firmware, DHCP, kernel and initramfs.
    #[serde(default)]
    pub agent_starts_after_ms: u64,
    /// Racks that power on only after the others are all booted (a rack restored after a
    /// power loss): their nodes start then, with the same spread.
    #[serde(default)]
    pub late_racks: Vec<u32>,
}

/// Who serves the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Serving {
    /// bootmesh: the tracker names neighbours, nodes fetch from servers and from each other.
    #[default]
    Swarm,
    /// The baseline (LTSP-style): each node reads the whole image from one server, the
    /// servers split the nodes between them, and no node serves another.
    Central,
}

/// Why a scenario cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not TOML, or not this shape.
    #[error("scenario: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value out of range.
    #[error("scenario: {0}")]
    Invalid(String),
}

impl StormScenario {
    /// Reads a scenario from TOML and checks it.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Self = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks the values make a network that can be run.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let invalid = |reason: &str| Err(ScenarioError::Invalid(reason.to_owned()));
        if self.fleet.racks == 0 || self.fleet.servers == 0 {
            return invalid("a fleet needs at least one rack and one server");
        }
        // Members are numbered (and named by address) in a u32 beside the servers.
        let nodes = u64::from(self.fleet.racks) * u64::from(self.fleet.nodes_per_rack);
        if self.fleet.racks > 4096 || self.fleet.servers > 4096 || nodes > 1_000_000 {
            return invalid("at most 4096 racks, 4096 servers and 1,000,000 nodes");
        }
        if self.image.chunks == 0 || self.image.chunk_kib == 0 {
            return invalid("the image needs chunks of at least 1 KiB");
        }
        if self.image.boot_critical_chunks > self.image.chunks {
            return invalid("more boot-critical chunks than chunks");
        }
        let rates = [
            Some(self.network.node_up_mbit),
            self.network.node_down_mbit,
            Some(self.network.server_up_mbit),
            self.network.uplink_mbit,
            self.network.spine_mbit,
        ];
        if rates
            .into_iter()
            .flatten()
            .any(|mbit| mbit.is_nan() || mbit <= 0.0)
        {
            return invalid("every link capacity must be above 0 Mbit/s");
        }
        if let Some(rack) = self
            .boot
            .late_racks
            .iter()
            .find(|rack| **rack >= self.fleet.racks)
        {
            return Err(ScenarioError::Invalid(format!(
                "late rack {rack} is not one of the {} racks",
                self.fleet.racks
            )));
        }
        // A day of virtual time bounds every fault, so no sum below can overflow.
        const DAY_MS: u64 = 24 * 3600 * 1000;
        for (number, fault) in self.faults.iter().enumerate() {
            let invalid = |reason: String| {
                Err(ScenarioError::Invalid(format!(
                    "fault {}: {reason}",
                    number + 1
                )))
            };
            if fault.rack() >= self.fleet.racks {
                return invalid(format!(
                    "rack {} is not one of the {} racks",
                    fault.rack(),
                    self.fleet.racks
                ));
            }
            let (at_ms, lasting_ms) = match *fault {
                Fault::RackPowerLoss { at_ms, for_ms, .. }
                | Fault::RackCut { at_ms, for_ms, .. } => (at_ms, for_ms),
                Fault::LinkFlap {
                    at_ms,
                    down_ms,
                    up_ms,
                    times,
                    ..
                } => {
                    if down_ms == 0 || times == 0 || times > 10_000 {
                        return invalid(
                            "a flap needs down_ms above 0 and 1 to 10,000 times".to_owned(),
                        );
                    }
                    (
                        at_ms,
                        down_ms.min(DAY_MS).saturating_add(up_ms.min(DAY_MS)) * u64::from(times),
                    )
                }
            };
            if lasting_ms == 0 || at_ms > DAY_MS || lasting_ms > DAY_MS {
                return invalid("a fault lasts above 0 ms, within a day of the start".to_owned());
            }
        }
        Ok(())
    }

    /// Booting nodes.
    pub fn node_count(&self) -> u32 {
        self.fleet.racks * self.fleet.nodes_per_rack
    }

    /// The swarm's lower bound on the time for every node to hold the image, in seconds:
    /// max(S/B_servers, S/B_node, N·S/(B_servers + N·B_node)), with S the image, B_servers
    /// the servers' upload together, B_node a node's upload (or download, if lower) and N the
    /// nodes. (Uplinks are not counted: the bound is the issue's, for a flat network.)
    pub fn lower_bound_seconds(&self) -> f64 {
        let bits = self.image.bytes() as f64 * 8.0;
        let servers = self.network.server_up_mbit * 1e6 * f64::from(self.fleet.servers);
        let node_up = self.network.node_up_mbit * 1e6;
        let node = self
            .network
            .node_down_mbit
            .map_or(node_up, |down| node_up.min(down * 1e6));
        let nodes = f64::from(self.node_count());
        [
            bits / servers,
            bits / node,
            nodes * bits / (servers + nodes * node_up),
        ]
        .into_iter()
        .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        name = "small"
        [fleet]
        racks = 2
        nodes_per_rack = 10
        servers = 1
        [image]
        chunks = 64
        chunk_kib = 256
        [network]
        node_up_mbit = 200
        server_up_mbit = 100
    "#;

    #[test]
    fn a_scenario_reads_from_toml_and_unknown_or_bad_values_are_refused() {
        let scenario = StormScenario::from_toml(SMALL).unwrap();
        assert_eq!(scenario.node_count(), 20);
        assert_eq!(scenario.serving, Serving::Swarm);
        // 16 MiB at 100 Mbit/s from the one server is the bound.
        let expected = 16.0 * 1024.0 * 1024.0 * 8.0 / 100e6;
        assert!((scenario.lower_bound_seconds() - expected).abs() < 1e-9);
        let unknown = SMALL.replace("servers = 1", "servers = 1\nsrevers = 2");
        assert!(StormScenario::from_toml(&unknown).is_err());
        let zero = SMALL.replace("server_up_mbit = 100", "server_up_mbit = 0");
        assert!(matches!(
            StormScenario::from_toml(&zero),
            Err(ScenarioError::Invalid(_))
        ));
    }

    #[test]
    fn faults_read_with_their_kind_and_are_checked() {
        let faults = format!(
            "{SMALL}\n[[fault]]\nkind = \"rack_power_loss\"\nrack = 1\nat_ms = 500\nfor_ms = 2000\n\
             [[fault]]\nkind = \"link_flap\"\nrack = 0\nat_ms = 100\ndown_ms = 10\nup_ms = 20\ntimes = 3\n"
        );
        let scenario = StormScenario::from_toml(&faults).unwrap();
        assert_eq!(scenario.faults.len(), 2);
        assert_eq!(
            scenario.faults[1].uplink_down_periods(),
            vec![(100, 110), (130, 140), (160, 170)]
        );
        let unknown_field = faults.replace("for_ms = 2000", "for_ms = 2000\nfro_ms = 1");
        assert!(StormScenario::from_toml(&unknown_field).is_err());
        let unknown_kind = faults.replace("rack_power_loss", "rack_on_fire");
        assert!(StormScenario::from_toml(&unknown_kind).is_err());
        let no_such_rack = faults.replace("rack = 1", "rack = 2");
        assert!(matches!(
            StormScenario::from_toml(&no_such_rack),
            Err(ScenarioError::Invalid(reason)) if reason.contains("fault 1")
        ));
        let never_down = faults.replace("down_ms = 10", "down_ms = 0");
        assert!(StormScenario::from_toml(&never_down).is_err());
    }
}
