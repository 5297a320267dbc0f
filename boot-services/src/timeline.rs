//! Boot timelines: what one server saw of each node's latest boot, stage by stage, and the
//! merge of several servers' views into one timeline per node.
//!
//! A boot passes through stages that different servers may see: the DHCP exchange (the server
//! that ACKed), the iPXE boot script (the firmware then loads kernel and initrd), the node plan
//! (the agent is running, so the kernel booted), and the agent's own reports: root image
//! fetched (with the bytes it took from servers and from peers), `switch_root` into the image,
//! and the booted system up. Each server keeps its own view in a [`BootTimelines`], soft state
//! bounded in nodes; nothing here is replicated, because a boot storm of thousands of nodes
//! must not turn into thousands of Raft commits for a status display. Whoever asks merges the
//! servers' views with [`merge`].
//!
//! Sans-IO: the caller passes the wall-clock time in milliseconds since the Unix epoch (the
//! servers' clocks agree within the cluster's drift bound, a few seconds at worst, which is
//! well under a boot's stages).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// `2026-12-01T23:50:11Z`: a UTC date and time (RFC 3339) from seconds since the Unix epoch,
/// as operators read them in tables and logs (the civil calendar from a day
/// count, in 400-year eras of the proleptic Gregorian calendar).
pub fn utc_timestamp(since_epoch: u64) -> String {
    let days = since_epoch / 86_400;
    let seconds_of_day = since_epoch % 86_400;
    // Days since 0000-03-01: leap days then fall at the end of a year.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds_of_day / 3600,
        seconds_of_day / 60 % 60,
        seconds_of_day % 60
    )
}

/// The client and address of a DHCP ACK that binds a client anew, read from the reply's fixed
/// BOOTP header (RFC 2131 section 2): `ciaddr` unset (a renewal echoes the client's address
/// there), `yiaddr` set, an Ethernet `chaddr`. The caller passes replies it encoded itself and
/// knows to be ACKs; reading four fields at fixed offsets costs no decode on the reply path.
pub fn new_binding_of_ack(reply: &[u8]) -> Option<([u8; 6], Ipv4Addr)> {
    const HTYPE_ETHERNET: u8 = 1;
    const BOOTP_HEADER_BYTES: usize = 236;
    if reply.len() < BOOTP_HEADER_BYTES || reply[1] != HTYPE_ETHERNET || reply[2] != 6 {
        return None;
    }
    let address = |offset: usize| {
        Ipv4Addr::new(
            reply[offset],
            reply[offset + 1],
            reply[offset + 2],
            reply[offset + 3],
        )
    };
    let (ciaddr, yiaddr) = (address(12), address(16));
    if !ciaddr.is_unspecified() || yiaddr.is_unspecified() {
        return None;
    }
    let mac = <[u8; 6]>::try_from(&reply[28..34]).ok()?;
    Some((mac, yiaddr))
}

/// `52:54:00:12:34:56`: a MAC as operators read it (and as `ip link` and dhcpd write it).
pub fn colon_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A stage of a boot, in the order a boot reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootStage {
    /// A DHCP server ACKed an address (firmware, iPXE or agent).
    Dhcp,
    /// The iPXE boot script was served: the firmware loads kernel and initrd next.
    Kernel,
    /// The agent fetched its node plan: the kernel and initramfs are running.
    Plan,
    /// The agent holds the verified root image.
    Image,
    /// The agent switched to the image's init.
    Root,
    /// The image's system reported itself up (systemd reached multi-user).
    Booted,
}

impl BootStage {
    /// Every stage, in order.
    pub const ALL: [BootStage; 6] = [
        BootStage::Dhcp,
        BootStage::Kernel,
        BootStage::Plan,
        BootStage::Image,
        BootStage::Root,
        BootStage::Booted,
    ];

    /// The stage's name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BootStage::Dhcp => "dhcp",
            BootStage::Kernel => "kernel",
            BootStage::Plan => "plan",
            BootStage::Image => "image",
            BootStage::Root => "root",
            BootStage::Booted => "booted",
        }
    }
}

/// Where a node's root image came from, as its agent reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSources {
    /// Bytes fetched from boot servers (HTTP, or the swarm's server members).
    #[serde(default)]
    pub server_bytes: u64,
    /// Bytes fetched from other nodes through the swarm.
    #[serde(default)]
    pub peer_bytes: u64,
    /// The peers it fetched from (addresses), at most [`PEERS_REPORTED_MAX`].
    #[serde(default)]
    pub peers: Vec<String>,
}

/// Peers a report may name; the rest are counted, not named.
pub const PEERS_REPORTED_MAX: usize = 16;

/// What a node's agent reports (`POST /nodes/<mac>/report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    /// The stage reached: `image`, `root` or `booted`.
    pub stage: BootStage,
    /// For `image`: where the bytes came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<ImageSources>,
    /// The node's uptime (since its kernel started) when it reported, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Agents report only their own stages; DHCP, kernel and plan are seen by the servers.
    #[error("an agent reports image, root or booted, not {0}")]
    NotAnAgentStage(&'static str),
    /// Too many peers named.
    #[error("a report names at most {PEERS_REPORTED_MAX} peers, not {0}")]
    TooManyPeers(usize),
}

impl AgentReport {
    /// Checks what an agent may claim.
    pub fn validate(&self) -> Result<(), ReportError> {
        if self.stage < BootStage::Image {
            return Err(ReportError::NotAnAgentStage(self.stage.as_str()));
        }
        if let Some(sources) = &self.sources
            && sources.peers.len() > PEERS_REPORTED_MAX
        {
            return Err(ReportError::TooManyPeers(sources.peers.len()));
        }
        Ok(())
    }
}

/// One stage as a server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSeen {
    /// The stage.
    pub stage: BootStage,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The server that saw it.
    pub server: String,
    /// What was seen: the address ACKed, the image's sources, ...
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A node's latest boot as one server saw it, or as servers saw it together after [`merge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTimeline {
    /// The node's MAC, `52:54:00:12:34:56`.
    pub mac: String,
    /// The address it was last ACKed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// Its host name from the fleet configuration, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The rack its address is in, by the subnets of the fleet configuration of the server
    /// that answers (servers record none: where an address is can change with the fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// The catalog image this boot boots (`node:v2`), from its boot script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When this boot began: its first DHCP ACK, if a server saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<u64>,
    /// The first time each stage was reached in this boot, in stage order.
    pub stages: Vec<StageSeen>,
    /// Where the root image came from, once reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<ImageSources>,
    /// The node's uptime when it reported itself booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_to_booted_ms: Option<u64>,
    /// Boots this server saw of the node since it started.
    pub boots_seen: u64,
}

impl NodeTimeline {
    fn new(mac: &[u8; 6]) -> Self {
        Self {
            mac: colon_mac(mac),
            address: None,
            hostname: None,
            rack: None,
            image: None,
            started_unix_ms: None,
            stages: Vec::new(),
            sources: None,
            kernel_to_booted_ms: None,
            boots_seen: 0,
        }
    }

    /// The furthest stage reached.
    pub fn latest_stage(&self) -> Option<BootStage> {
        self.stages.iter().map(|seen| seen.stage).max()
    }

    /// When `stage` was first reached.
    pub fn reached(&self, stage: BootStage) -> Option<u64> {
        self.stages
            .iter()
            .find(|seen| seen.stage == stage)
            .map(|seen| seen.at_unix_ms)
    }

    /// The boot's duration from its first DHCP ACK to the system up, if both were seen.
    pub fn boot_duration_ms(&self) -> Option<u64> {
        let booted = self.reached(BootStage::Booted)?;
        Some(booted.saturating_sub(self.started_unix_ms?))
    }

    fn record(&mut self, seen: StageSeen) {
        match self
            .stages
            .iter_mut()
            .find(|existing| existing.stage == seen.stage)
        {
            // The first time counts: iPXE and the agent ACK again after the firmware did.
            Some(existing) if existing.at_unix_ms <= seen.at_unix_ms => {}
            Some(existing) => *existing = seen,
            None => {
                self.stages.push(seen);
                self.stages.sort_by_key(|seen| seen.stage);
            }
        }
    }

    fn begin_boot(&mut self, at_unix_ms: u64) {
        self.stages.clear();
        self.sources = None;
        self.image = None;
        self.kernel_to_booted_ms = None;
        self.started_unix_ms = Some(at_unix_ms);
        self.boots_seen += 1;
    }
}

/// What a server tells the recorder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// This server ACKed `address` to a client binding anew (not a renewal).
    DhcpAck {
        /// The address.
        address: Ipv4Addr,
    },
    /// This server served the node's iPXE boot script.
    BootScript {
        /// The catalog image it boots (`node:v2`), when its group boots one.
        image: Option<String>,
    },
    /// This server served the node's plan.
    Plan {
        /// The host name the plan gives, if any.
        hostname: Option<String>,
    },
    /// The node's agent reported to this server.
    Report(AgentReport),
}

/// What recording an observation completed, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The boot reached `booted` now, this long after its first DHCP ACK here.
    pub boot_duration_ms: Option<u64>,
    /// The boot reached `booted` now, this long after the node's kernel started.
    pub kernel_to_booted_ms: Option<u64>,
    /// The root image's sources, reported now.
    pub sources: Option<ImageSources>,
}

/// A boot that sees no new stage for this long is over (a node that failed and was left off):
/// its next DHCP ACK starts a new boot even before its agent ran.
pub const BOOT_STALE_MS: u64 = 30 * 60 * 1000;

/// One server's timelines, bounded: past `nodes_max` nodes the one updated longest ago is
/// forgotten.
#[derive(Debug)]
pub struct BootTimelines {
    server: String,
    nodes_max: usize,
    nodes: HashMap<[u8; 6], (u64, NodeTimeline)>,
    /// Update sequence -> node, for forgetting the least recently updated.
    by_update: BTreeMap<u64, [u8; 6]>,
    updates: u64,
}

impl BootTimelines {
    /// Timelines kept by `server` (its name in every stage it records).
    pub fn new(server: impl Into<String>, nodes_max: usize) -> Self {
        Self {
            server: server.into(),
            nodes_max: nodes_max.max(1),
            nodes: HashMap::new(),
            by_update: BTreeMap::new(),
            updates: 0,
        }
    }

    /// The server's name, as its stages carry it.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Nodes known.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records what this server saw of node `mac` at `now_unix_ms`.
    pub fn observe(
        &mut self,
        now_unix_ms: u64,
        mac: &[u8; 6],
        observation: Observation,
    ) -> Recorded {
        self.updates += 1;
        let update = self.updates;
        let (last_update, timeline) = self
            .nodes
            .entry(*mac)
            .or_insert_with(|| (update, NodeTimeline::new(mac)));
        self.by_update.remove(last_update);
        *last_update = update;
        self.by_update.insert(update, *mac);
        let mut recorded = Recorded::default();
        let (stage, detail) = match observation {
            Observation::DhcpAck { address } => {
                let last_seen = timeline
                    .stages
                    .iter()
                    .map(|seen| seen.at_unix_ms)
                    .max()
                    .unwrap_or(0);
                // The firmware, iPXE and the agent each ACK once per boot; an ACK after the
                // agent has run, or after a long silence, is the next boot.
                let next_boot = timeline.stages.is_empty()
                    || timeline
                        .latest_stage()
                        .is_some_and(|stage| stage >= BootStage::Plan)
                    || now_unix_ms.saturating_sub(last_seen) > BOOT_STALE_MS;
                if next_boot {
                    timeline.begin_boot(now_unix_ms);
                }
                timeline.address = Some(address);
                (BootStage::Dhcp, address.to_string())
            }
            Observation::BootScript { image } => {
                let detail = image.clone().unwrap_or_default();
                if image.is_some() {
                    timeline.image = image;
                }
                (BootStage::Kernel, detail)
            }
            Observation::Plan { hostname } => {
                if hostname.is_some() {
                    timeline.hostname = hostname;
                }
                (BootStage::Plan, String::new())
            }
            Observation::Report(report) => {
                let mut detail = String::new();
                if let Some(sources) = report.sources {
                    detail = format!(
                        "{} bytes from servers, {} from {} peers",
                        sources.server_bytes,
                        sources.peer_bytes,
                        sources.peers.len()
                    );
                    recorded.sources = Some(sources.clone());
                    timeline.sources = Some(sources);
                }
                if report.stage == BootStage::Booted
                    && timeline.reached(BootStage::Booted).is_none()
                {
                    timeline.kernel_to_booted_ms = report.uptime_ms;
                    recorded.kernel_to_booted_ms = report.uptime_ms;
                    recorded.boot_duration_ms = timeline
                        .started_unix_ms
                        .map(|started| now_unix_ms.saturating_sub(started));
                }
                (report.stage, detail)
            }
        };
        timeline.record(StageSeen {
            stage,
            at_unix_ms: now_unix_ms,
            server: self.server.clone(),
            detail,
        });
        while self.nodes.len() > self.nodes_max {
            let Some((_, oldest)) = self.by_update.pop_first() else {
                break;
            };
            self.nodes.remove(&oldest);
        }
        recorded
    }

    /// Every node's timeline, by MAC.
    pub fn snapshot(&self) -> Vec<NodeTimeline> {
        let mut timelines: Vec<NodeTimeline> = self
            .nodes
            .values()
            .map(|(_, timeline)| timeline.clone())
            .collect();
        timelines.sort_by(|a, b| a.mac.cmp(&b.mac));
        timelines
    }
}

/// How far apart two servers' clocks may be when deciding that a stage belongs to the current
/// boot (the cluster's drift bound is smaller).
pub const MERGE_SLACK_MS: u64 = 10_000;

/// Merges several servers' views into one timeline per node: the latest boot a server saw
/// begin defines the boot, and each stage's first sighting in it (on any server) counts.
pub fn merge(views: impl IntoIterator<Item = Vec<NodeTimeline>>) -> Vec<NodeTimeline> {
    let mut by_mac: BTreeMap<String, Vec<NodeTimeline>> = BTreeMap::new();
    for view in views {
        for timeline in view {
            by_mac
                .entry(timeline.mac.clone())
                .or_default()
                .push(timeline);
        }
    }
    by_mac
        .into_values()
        .map(|timelines| {
            let started = timelines
                .iter()
                .filter_map(|timeline| timeline.started_unix_ms)
                .max();
            let in_this_boot =
                |at: u64| started.is_none_or(|started| at + MERGE_SLACK_MS >= started);
            let mut merged = NodeTimeline {
                mac: timelines[0].mac.clone(),
                address: None,
                hostname: None,
                rack: None,
                image: None,
                started_unix_ms: started,
                stages: Vec::new(),
                sources: None,
                kernel_to_booted_ms: None,
                boots_seen: timelines
                    .iter()
                    .map(|timeline| timeline.boots_seen)
                    .max()
                    .unwrap_or(0),
            };
            // Latest information first: the newest view of each field wins.
            let mut newest_first: Vec<&NodeTimeline> = timelines.iter().collect();
            newest_first.sort_by_key(|timeline| {
                std::cmp::Reverse(timeline.stages.iter().map(|seen| seen.at_unix_ms).max())
            });
            for timeline in newest_first {
                merged.address = merged.address.or(timeline.address);
                merged.hostname = merged.hostname.take().or(timeline.hostname.clone());
                for seen in &timeline.stages {
                    if in_this_boot(seen.at_unix_ms) {
                        merged.record(seen.clone());
                    }
                }
                if timeline
                    .reached(BootStage::Kernel)
                    .is_some_and(in_this_boot)
                {
                    merged.image = merged.image.take().or(timeline.image.clone());
                }
                if timeline.reached(BootStage::Image).is_some_and(in_this_boot) {
                    merged.sources = merged.sources.take().or(timeline.sources.clone());
                }
                if timeline
                    .reached(BootStage::Booted)
                    .is_some_and(in_this_boot)
                {
                    merged.kernel_to_booted_ms =
                        merged.kernel_to_booted_ms.or(timeline.kernel_to_booted_ms);
                }
            }
            merged
        })
        .collect()
}

/// Which nodes to list: those that match every filter given. With thousands of nodes the
/// question is usually "which are stuck at dhcp", "what is rack r7 doing" or "who boots v2";
/// the server filters, so the answer is as small as the question.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodesFilter {
    /// Nodes whose furthest stage in their latest boot is this one.
    pub stage: Option<BootStage>,
    /// Nodes in this rack.
    pub rack: Option<String>,
    /// Nodes whose latest boot boots this catalog image (`node:v2`).
    pub image: Option<String>,
}

impl NodesFilter {
    /// Whether `node` passes.
    pub fn matches(&self, node: &NodeTimeline) -> bool {
        self.stage
            .is_none_or(|stage| node.latest_stage() == Some(stage))
            && self
                .rack
                .as_ref()
                .is_none_or(|rack| node.rack.as_ref() == Some(rack))
            && self
                .image
                .as_ref()
                .is_none_or(|image| node.image.as_ref() == Some(image))
    }

    /// Whether every node passes.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The filter as a URL query (`stage=dhcp&rack=r2`), empty without filters.
    pub fn to_query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(stage) = self.stage {
            query.append_pair("stage", stage.as_str());
        }
        if let Some(rack) = &self.rack {
            query.append_pair("rack", rack);
        }
        if let Some(image) = &self.image {
            query.append_pair("image", image);
        }
        query.finish()
    }

    /// Reads a URL query; an unknown key, a repeated one or an unknown stage is an error that
    /// says which.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut filter = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let repeated = match key.as_ref() {
                "stage" => filter.stage.replace(parse_stage(&value)?).is_some(),
                "rack" => filter.rack.replace(value.into_owned()).is_some(),
                "image" => filter.image.replace(value.into_owned()).is_some(),
                other => return Err(format!("unknown filter {other:?}: stage, rack or image")),
            };
            if repeated {
                return Err(format!("filter {key:?} given twice"));
            }
        }
        Ok(filter)
    }
}

/// A stage by its name (`dhcp`, `kernel`, `plan`, `image`, `root`, `booted`).
pub fn parse_stage(name: &str) -> Result<BootStage, String> {
    BootStage::ALL
        .into_iter()
        .find(|stage| stage.as_str() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = BootStage::ALL.iter().map(|stage| stage.as_str()).collect();
            format!("unknown stage {name:?}: one of {}", names.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 20);

    fn ack() -> Observation {
        Observation::DhcpAck { address: ADDRESS }
    }

    fn report(stage: BootStage) -> Observation {
        Observation::Report(AgentReport {
            stage,
            sources: None,
            uptime_ms: Some(9_000),
        })
    }

    fn stages(timeline: &NodeTimeline) -> Vec<(BootStage, u64)> {
        timeline
            .stages
            .iter()
            .map(|seen| (seen.stage, seen.at_unix_ms))
            .collect()
    }

    #[test]
    fn an_ack_binds_anew_only_without_ciaddr_and_with_yiaddr() {
        let mut reply = vec![0u8; 300];
        reply[0] = 2;
        reply[1] = 1;
        reply[2] = 6;
        reply[16..20].copy_from_slice(&[10, 9, 0, 20]);
        reply[28..34].copy_from_slice(&MAC);
        assert_eq!(new_binding_of_ack(&reply), Some((MAC, ADDRESS)));
        let mut renewal = reply.clone();
        renewal[12..16].copy_from_slice(&[10, 9, 0, 20]);
        assert_eq!(new_binding_of_ack(&renewal), None);
        let mut inform = reply.clone();
        inform[16..20].copy_from_slice(&[0; 4]);
        assert_eq!(new_binding_of_ack(&inform), None);
        let mut not_ethernet = reply.clone();
        not_ethernet[2] = 16;
        assert_eq!(new_binding_of_ack(&not_ethernet), None);
        assert_eq!(new_binding_of_ack(&reply[..200]), None);
    }

    fn script() -> Observation {
        Observation::BootScript {
            image: Some("node:v2".into()),
        }
    }

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_796_083_200), "2026-12-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_796_169_011), "2026-12-01T23:50:11Z");
        assert_eq!(utc_timestamp(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn a_boot_keeps_the_first_sighting_of_each_stage_and_measures_itself() {
        let mut timelines = BootTimelines::new("s1", 10);
        // Firmware, then iPXE, then the agent: three ACKs, one boot.
        timelines.observe(1_000, &MAC, ack());
        timelines.observe(3_000, &MAC, ack());
        timelines.observe(3_100, &MAC, script());
        timelines.observe(8_000, &MAC, ack());
        timelines.observe(
            8_100,
            &MAC,
            Observation::Plan {
                hostname: Some("worker-1".into()),
            },
        );
        let image = timelines.observe(
            20_000,
            &MAC,
            Observation::Report(AgentReport {
                stage: BootStage::Image,
                sources: Some(ImageSources {
                    server_bytes: 10,
                    peer_bytes: 90,
                    peers: vec!["10.9.0.21:7800".into()],
                }),
                uptime_ms: None,
            }),
        );
        assert_eq!(image.sources.map(|sources| sources.peer_bytes), Some(90));
        timelines.observe(21_000, &MAC, report(BootStage::Root));
        let booted = timelines.observe(40_000, &MAC, report(BootStage::Booted));
        assert_eq!(booted.boot_duration_ms, Some(39_000));
        assert_eq!(booted.kernel_to_booted_ms, Some(9_000));
        // Reported twice (a restarted companion): measured once.
        let again = timelines.observe(41_000, &MAC, report(BootStage::Booted));
        assert_eq!(again.boot_duration_ms, None);

        let snapshot = timelines.snapshot();
        assert_eq!(snapshot.len(), 1);
        let timeline = &snapshot[0];
        assert_eq!(timeline.mac, "52:54:00:12:34:56");
        assert_eq!(timeline.hostname.as_deref(), Some("worker-1"));
        assert_eq!(timeline.image.as_deref(), Some("node:v2"));
        assert_eq!(timeline.stages[1].detail, "node:v2");
        assert_eq!(timeline.boots_seen, 1);
        assert_eq!(
            stages(timeline),
            vec![
                (BootStage::Dhcp, 1_000),
                (BootStage::Kernel, 3_100),
                (BootStage::Plan, 8_100),
                (BootStage::Image, 20_000),
                (BootStage::Root, 21_000),
                (BootStage::Booted, 40_000),
            ]
        );
        assert_eq!(timeline.boot_duration_ms(), Some(39_000));
    }

    #[test]
    fn an_ack_after_the_agent_ran_or_a_long_silence_starts_the_next_boot() {
        let mut timelines = BootTimelines::new("s1", 10);
        timelines.observe(1_000, &MAC, ack());
        timelines.observe(2_000, &MAC, Observation::Plan { hostname: None });
        timelines.observe(100_000, &MAC, ack());
        let timeline = &timelines.snapshot()[0];
        assert_eq!(timeline.boots_seen, 2);
        assert_eq!(stages(timeline), vec![(BootStage::Dhcp, 100_000)]);

        // Stuck at the boot script, then powered on again much later.
        timelines.observe(101_000, &MAC, script());
        timelines.observe(101_000 + BOOT_STALE_MS + 1, &MAC, ack());
        let timeline = &timelines.snapshot()[0];
        assert_eq!(timeline.boots_seen, 3);
        assert_eq!(timeline.latest_stage(), Some(BootStage::Dhcp));
        // Which image the next boot boots, its own boot script will say.
        assert_eq!(timeline.image, None);
    }

    #[test]
    fn the_least_recently_updated_node_is_forgotten_first() {
        let mut timelines = BootTimelines::new("s1", 2);
        let other = [0x52, 0x54, 0, 0, 0, 2];
        let third = [0x52, 0x54, 0, 0, 0, 3];
        timelines.observe(1, &MAC, ack());
        timelines.observe(2, &other, ack());
        timelines.observe(3, &MAC, script());
        timelines.observe(4, &third, ack());
        let macs: Vec<String> = timelines.snapshot().into_iter().map(|t| t.mac).collect();
        assert_eq!(macs, vec!["52:54:00:00:00:03", "52:54:00:12:34:56"]);
    }

    #[test]
    fn agents_report_only_their_own_stages_and_a_bounded_peer_list() {
        let mut report = AgentReport {
            stage: BootStage::Dhcp,
            sources: None,
            uptime_ms: None,
        };
        assert_eq!(report.validate(), Err(ReportError::NotAnAgentStage("dhcp")));
        report.stage = BootStage::Image;
        report.sources = Some(ImageSources {
            peers: vec![String::new(); PEERS_REPORTED_MAX + 1],
            ..ImageSources::default()
        });
        assert!(matches!(
            report.validate(),
            Err(ReportError::TooManyPeers(_))
        ));
        let text = r#"{"stage":"booted","uptime_ms":5,"extra":1}"#;
        assert!(serde_json::from_str::<AgentReport>(text).is_err());
    }

    #[test]
    fn servers_views_merge_into_the_latest_boot() {
        // s1 ACKed and served the script; s2 served the plan and heard the reports; s3 saw
        // only the node's previous boot.
        let mut s1 = BootTimelines::new("s1", 10);
        let mut s2 = BootTimelines::new("s2", 10);
        let mut s3 = BootTimelines::new("s3", 10);
        s3.observe(1_000, &MAC, ack());
        s3.observe(
            2_000,
            &MAC,
            Observation::BootScript {
                image: Some("node:v1".into()),
            },
        );
        s1.observe(500_000, &MAC, ack());
        s1.observe(501_000, &MAC, script());
        s2.observe(505_000, &MAC, Observation::Plan { hostname: None });
        s2.observe(530_000, &MAC, report(BootStage::Booted));
        let merged = merge([s1.snapshot(), s2.snapshot(), s3.snapshot()]);
        assert_eq!(merged.len(), 1);
        let timeline = &merged[0];
        assert_eq!(timeline.started_unix_ms, Some(500_000));
        assert_eq!(
            stages(timeline),
            vec![
                (BootStage::Dhcp, 500_000),
                (BootStage::Kernel, 501_000),
                (BootStage::Plan, 505_000),
                (BootStage::Booted, 530_000),
            ]
        );
        let servers: Vec<&str> = timeline.stages.iter().map(|s| s.server.as_str()).collect();
        assert_eq!(servers, vec!["s1", "s1", "s2", "s2"]);
        assert_eq!(
            timeline.image.as_deref(),
            Some("node:v2"),
            "not the last boot's"
        );
        assert_eq!(timeline.boot_duration_ms(), Some(30_000));
        assert_eq!(timeline.kernel_to_booted_ms, Some(9_000));
        assert_eq!(timeline.address, Some(ADDRESS));
    }

    #[test]
    fn filters_go_to_the_server_as_a_query_and_come_back_whole() {
        let filter = NodesFilter {
            stage: Some(BootStage::Dhcp),
            rack: Some("r2".into()),
            image: Some("node:v2 rc".into()),
        };
        let query = filter.to_query();
        assert_eq!(query, "stage=dhcp&rack=r2&image=node%3Av2+rc");
        assert_eq!(NodesFilter::from_query(&query), Ok(filter));
        assert_eq!(NodesFilter::from_query(""), Ok(NodesFilter::default()));
        for (bad, reason) in [
            ("stage=warm", "unknown stage \"warm\""),
            ("rack=r1&rack=r2", "filter \"rack\" given twice"),
            ("mac=x", "unknown filter \"mac\""),
        ] {
            let error = NodesFilter::from_query(bad).expect_err(bad);
            assert!(error.starts_with(reason), "{bad}: {error}");
        }
    }

    #[test]
    fn a_node_passes_when_it_matches_every_filter_given() {
        let mut node = NodeTimeline {
            mac: "52:54:00:00:02:01".into(),
            address: Some("10.98.2.100".parse().unwrap()),
            hostname: None,
            rack: Some("r2".into()),
            image: Some("node:v2".into()),
            started_unix_ms: Some(1),
            stages: [(BootStage::Dhcp, 1), (BootStage::Kernel, 2)]
                .into_iter()
                .map(|(stage, at_unix_ms)| StageSeen {
                    stage,
                    at_unix_ms,
                    server: "s1".into(),
                    detail: String::new(),
                })
                .collect(),
            sources: None,
            kernel_to_booted_ms: None,
            boots_seen: 1,
        };
        let filter = |stage, rack: Option<&str>, image: Option<&str>| NodesFilter {
            stage,
            rack: rack.map(str::to_owned),
            image: image.map(str::to_owned),
        };
        assert!(NodesFilter::default().matches(&node));
        assert!(filter(Some(BootStage::Kernel), Some("r2"), Some("node:v2")).matches(&node));
        // The furthest stage counts, not any stage passed.
        assert!(!filter(Some(BootStage::Dhcp), None, None).matches(&node));
        assert!(!filter(None, Some("r1"), None).matches(&node));
        assert!(!filter(None, None, Some("node:v1")).matches(&node));
        node.rack = None;
        assert!(!filter(None, Some("r2"), None).matches(&node));
    }
}
