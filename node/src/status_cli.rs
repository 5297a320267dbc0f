//! `bootmesh status`: the whole installation on one screen, from any server's HTTP listener
//! (no state directory, no certificate: it works from an operator's laptop): the server's
//! health, the cluster (term, leader, members by rack), what each group was promoted to, and
//! the fleet's boots by stage, rack and image.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::agent::fetch::HttpTransport;
use crate::http_service::NodesView;
use crate::http_service::dashboard::ClusterView;
use crate::nodes_cli::{NodesError, NodesFilter, fetch_nodes};
use crate::timeline::BootStage;

/// The most bytes a `/api/v1/cluster` answer may have.
const CLUSTER_ANSWER_BYTES_MAX: usize = 4 << 20;

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The server did not answer `/api/v1/cluster`.
    #[error("asking {server} for the cluster: {source}")]
    Ask {
        /// The server asked.
        server: SocketAddr,
        /// The cause.
        source: crate::agent::fetch::HttpFetchError,
    },
    /// The answer was not a cluster view.
    #[error("{server} answered something that is not a cluster view: {source}")]
    Answer {
        /// The server asked.
        server: SocketAddr,
        /// The cause.
        source: serde_json::Error,
    },
    /// The nodes could not be listed.
    #[error(transparent)]
    Nodes(#[from] NodesError),
}

/// Boots counted one way.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootCount {
    /// Nodes.
    pub nodes: usize,
    /// Of those, booted.
    pub booted: usize,
}

/// One image's distribution.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageCount {
    /// Nodes whose latest boot boots it.
    pub nodes: usize,
    /// Of those, booted.
    pub booted: usize,
    /// Image bytes the nodes took from servers.
    pub server_bytes: u64,
    /// Image bytes the nodes took from peers.
    pub peer_bytes: u64,
}

/// The fleet's boots, summed up.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetSummary {
    /// Nodes the servers know.
    pub nodes: usize,
    /// Nodes by the furthest stage of their latest boot, in stage order.
    pub by_stage: BTreeMap<BootStage, usize>,
    /// Nodes by rack (`-`: an address in no rack's subnet, or none).
    pub by_rack: BTreeMap<String, BootCount>,
    /// Nodes by the catalog image they boot.
    pub by_image: BTreeMap<String, ImageCount>,
    /// Servers that did not answer for their part, with why.
    pub servers_missing: Vec<String>,
}

impl FleetSummary {
    /// Sums up `view`.
    pub fn of(view: &NodesView) -> Self {
        let mut summary = Self {
            nodes: view.nodes.len(),
            by_stage: BootStage::ALL.iter().map(|stage| (*stage, 0)).collect(),
            ..Self::default()
        };
        for node in &view.nodes {
            let stage = node.latest_stage();
            let booted = stage == Some(BootStage::Booted);
            if let Some(stage) = stage {
                *summary.by_stage.entry(stage).or_default() += 1;
            }
            let rack = summary
                .by_rack
                .entry(node.rack.clone().unwrap_or_else(|| "-".into()))
                .or_default();
            rack.nodes += 1;
            rack.booted += usize::from(booted);
            if let Some(image) = &node.image {
                let count = summary.by_image.entry(image.clone()).or_default();
                count.nodes += 1;
                count.booted += usize::from(booted);
                if let Some(sources) = &node.sources {
                    count.server_bytes += sources.server_bytes;
                    count.peer_bytes += sources.peer_bytes;
                }
            }
        }
        summary.servers_missing = view
            .servers
            .iter()
            .filter_map(|server| {
                let error = server.error.as_ref()?;
                Some(format!("{} ({error})", server.server))
            })
            .collect();
        summary
    }
}

/// What `bootmesh status --json` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatusView {
    /// The answering server's health and its view of the cluster and catalog.
    pub cluster: ClusterView,
    /// The fleet's boots.
    pub fleet: FleetSummary,
}

/// Asks `server` for the cluster and the nodes.
pub async fn fetch_status(server: SocketAddr) -> Result<StatusView, StatusError> {
    let transport = HttpTransport::new(vec![server]);
    let body = transport
        .get(0, "api/v1/cluster", CLUSTER_ANSWER_BYTES_MAX)
        .await
        .map_err(|source| StatusError::Ask { server, source })?;
    let cluster: ClusterView =
        serde_json::from_slice(&body).map_err(|source| StatusError::Answer { server, source })?;
    let nodes = fetch_nodes(server, &NodesFilter::default()).await?;
    Ok(StatusView {
        cluster,
        fleet: FleetSummary::of(&nodes),
    })
}

fn share(part: u64, whole: u64) -> String {
    part.saturating_mul(100)
        .checked_div(whole)
        .map_or_else(|| "-".into(), |percent| format!("{percent} %"))
}

/// The text `bootmesh status` prints.
pub fn render(status: &StatusView) -> String {
    let mut text = String::new();
    let cluster = &status.cluster;
    match &cluster.not_ready_because {
        None => {
            let _ = writeln!(text, "server {}: ready", cluster.server);
        }
        Some(reason) => {
            let _ = writeln!(text, "server {}: NOT READY: {reason}", cluster.server);
        }
    }
    match &cluster.cluster {
        None => text.push_str("a single server, not in a cluster\n"),
        Some(view) => {
            let leader = view
                .leader
                .map_or_else(|| "unknown".to_owned(), |leader| leader.to_string());
            let _ = writeln!(
                text,
                "cluster {}: {} members, term {}, leader {leader}; this is server {} ({})",
                view.cluster_name,
                view.members.len(),
                view.term,
                view.server_id,
                view.role
            );
            let mut by_rack: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for member in &view.members {
                let mut name = format!("{} {}", member.server_id, member.address);
                if Some(member.server_id) == view.leader {
                    name.push_str(" (leader)");
                }
                if !member.voter {
                    name.push_str(" (learner)");
                }
                by_rack
                    .entry(member.rack.as_deref().unwrap_or("-"))
                    .or_default()
                    .push(name);
            }
            for (rack, members) in by_rack {
                let _ = writeln!(text, "  rack {rack}: {}", members.join(", "));
            }
            if let Some(offset) = view.clock_offset_to_leader_ms {
                let _ = writeln!(text, "  clock: {offset} ms from the leader's");
            }
        }
    }
    if let Some(catalog) = &cluster.catalog {
        if catalog.promotions.is_empty() {
            text.push_str("catalog: no group promoted yet\n");
        } else {
            let promoted: Vec<String> = catalog
                .promotions
                .iter()
                .map(|promotion| format!("{} -> {}", promotion.group, promotion.image))
                .collect();
            let here = if catalog.groups_behind_here == 0 {
                "this server boots them all".to_owned()
            } else {
                format!(
                    "this server is still fetching for {} group(s)",
                    catalog.groups_behind_here
                )
            };
            let _ = writeln!(text, "catalog: {}; {here}", promoted.join(", "));
        }
    }
    let fleet = &status.fleet;
    let stages: Vec<String> = fleet
        .by_stage
        .iter()
        .map(|(stage, count)| format!("{} {count}", stage.as_str()))
        .collect();
    let _ = writeln!(
        text,
        "nodes: {} known; furthest stage: {}",
        fleet.nodes,
        stages.join(", ")
    );
    if !fleet.by_rack.is_empty() {
        let racks: Vec<String> = fleet
            .by_rack
            .iter()
            .map(|(rack, count)| format!("{rack} {} ({} booted)", count.nodes, count.booted))
            .collect();
        let _ = writeln!(text, "  by rack: {}", racks.join(", "));
    }
    for (image, count) in &fleet.by_image {
        let _ = writeln!(
            text,
            "  image {image}: {} nodes, {} booted, {} of its bytes from peers",
            count.nodes,
            count.booted,
            share(count.peer_bytes, count.server_bytes + count.peer_bytes)
        );
    }
    for missing in &fleet.servers_missing {
        let _ = writeln!(
            text,
            "server {missing} did not answer; its nodes may be missing"
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::admin::{ClusterStatus, MemberStatus};
    use crate::http_service::ServerAsked;
    use crate::http_service::dashboard::{CatalogView, PromotionView};
    use crate::timeline::{ImageSources, NodeTimeline, StageSeen};

    fn node(
        mac: &str,
        rack: Option<&str>,
        image: Option<&str>,
        stages: &[BootStage],
    ) -> NodeTimeline {
        NodeTimeline {
            mac: mac.into(),
            address: None,
            hostname: None,
            rack: rack.map(str::to_owned),
            image: image.map(str::to_owned),
            started_unix_ms: Some(1),
            stages: stages
                .iter()
                .enumerate()
                .map(|(index, stage)| StageSeen {
                    stage: *stage,
                    at_unix_ms: 1 + index as u64,
                    server: "s1".into(),
                    detail: String::new(),
                })
                .collect(),
            sources: image.map(|_| ImageSources {
                server_bytes: 1,
                peer_bytes: 3,
                peers: Vec::new(),
            }),
            kernel_to_booted_ms: None,
            boots_seen: 1,
        }
    }

    #[test]
    fn the_status_sums_the_fleet_and_names_the_cluster_and_catalog() {
        let member = |server_id: u64, rack: &str| MemberStatus {
            server_id,
            address: format!("10.0.0.{server_id}:7100"),
            rack: Some(rack.into()),
            voter: true,
            matched: None,
        };
        let status = StatusView {
            cluster: ClusterView {
                server: "10.0.0.2:7100".into(),
                ready: true,
                not_ready_because: None,
                cluster: Some(ClusterStatus {
                    server_id: 2,
                    cluster_name: "dc1".into(),
                    role: "Follower".into(),
                    term: 4,
                    leader: Some(1),
                    last_log_index: Some(10),
                    last_applied: Some(10),
                    members: vec![member(1, "r1"), member(2, "r1"), member(3, "r2")],
                    clock_offset_to_leader_ms: Some(-3),
                }),
                catalog: Some(CatalogView {
                    promotions: vec![PromotionView {
                        group: "workers".into(),
                        image: "node:v2".into(),
                        manifest: "ab".into(),
                    }],
                    groups_behind_here: 1,
                }),
            },
            fleet: FleetSummary::of(&NodesView {
                servers: vec![ServerAsked {
                    server: "10.0.0.3:7100".into(),
                    error: Some("timed out".into()),
                }],
                nodes_known: 3,
                nodes: vec![
                    node("m1", Some("r1"), Some("node:v2"), &BootStage::ALL),
                    node(
                        "m2",
                        Some("r2"),
                        Some("node:v2"),
                        &[BootStage::Dhcp, BootStage::Kernel],
                    ),
                    node("m3", None, None, &[BootStage::Dhcp]),
                ],
            }),
        };
        let text = render(&status);
        for line in [
            "server 10.0.0.2:7100: ready",
            "cluster dc1: 3 members, term 4, leader 1; this is server 2 (Follower)",
            "  rack r1: 1 10.0.0.1:7100 (leader), 2 10.0.0.2:7100",
            "  rack r2: 3 10.0.0.3:7100",
            "  clock: -3 ms from the leader's",
            "catalog: workers -> node:v2; this server is still fetching for 1 group(s)",
            "nodes: 3 known; furthest stage: dhcp 1, kernel 1, plan 0, image 0, root 0, booted 1",
            "  by rack: - 1 (0 booted), r1 1 (1 booted), r2 1 (0 booted)",
            "  image node:v2: 2 nodes, 1 booted, 75 % of its bytes from peers",
            "server 10.0.0.3:7100 (timed out) did not answer; its nodes may be missing",
        ] {
            assert!(
                text.lines().any(|shown| shown == line),
                "{line:?} in\n{text}"
            );
        }
        let json = serde_json::to_string(&status).expect("json");
        let back: StatusView = serde_json::from_str(&json).expect("back");
        assert_eq!(back.fleet, status.fleet);
    }
}
