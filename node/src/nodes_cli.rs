//! `bootmesh nodes`: every node's latest boot as the servers saw it (`/api/v1/nodes` of any
//! server, which asks the other members), as a table or as JSON.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::agent::fetch::HttpTransport;
use crate::http_service::NodesView;
use crate::timeline::{BootStage, NodeTimeline};
pub use crate::timeline::{NodesFilter, parse_stage};

/// The most bytes a `/api/v1/nodes` answer may have (64k nodes at a few hundred bytes each).
pub const NODES_ANSWER_BYTES_MAX: usize = 64 << 20;

/// Why the nodes could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    /// The server did not answer.
    #[error("asking {server}: {source}")]
    Ask {
        /// The server asked.
        server: SocketAddr,
        /// The cause.
        source: crate::agent::fetch::HttpFetchError,
    },
    /// The answer was not a nodes view.
    #[error("{server} answered something that is not a node list: {source}")]
    Answer {
        /// The server asked.
        server: SocketAddr,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Asks `server`'s HTTP listener for the nodes that pass `filter`.
pub async fn fetch_nodes(
    server: SocketAddr,
    filter: &NodesFilter,
) -> Result<NodesView, NodesError> {
    let transport = HttpTransport::new(vec![server]);
    let path = if filter.is_empty() {
        "api/v1/nodes".to_owned()
    } else {
        format!("api/v1/nodes?{}", filter.to_query())
    };
    let body = transport
        .get(0, &path, NODES_ANSWER_BYTES_MAX)
        .await
        .map_err(|source| NodesError::Ask { server, source })?;
    serde_json::from_slice(&body).map_err(|source| NodesError::Answer { server, source })
}

/// Seconds with one decimal, or `-`.
fn seconds(milliseconds: Option<u64>) -> String {
    match milliseconds {
        Some(milliseconds) => format!("{}.{}", milliseconds / 1000, milliseconds % 1000 / 100),
        None => "-".into(),
    }
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / 1_048_576.0)
}

/// Where the image came from: `server 12.0MiB, peers 84.0MiB (3)`.
fn image_from(node: &NodeTimeline) -> String {
    match &node.sources {
        Some(sources) if sources.peer_bytes == 0 => {
            format!("server {}", mebibytes(sources.server_bytes))
        }
        Some(sources) => format!(
            "server {}, peers {} ({})",
            mebibytes(sources.server_bytes),
            mebibytes(sources.peer_bytes),
            sources.peers.len()
        ),
        None => "-".into(),
    }
}

/// The table `bootmesh nodes` prints: per node its rack, the image it boots, its furthest
/// stage, each stage's time after the boot's first DHCP ACK, the whole boot, and where its
/// image came from; then the peers each node fetched from, and the servers that did not
/// answer.
pub fn render_table(view: &NodesView) -> String {
    let mut rows = vec![vec![
        "MAC".to_owned(),
        "HOSTNAME".to_owned(),
        "ADDRESS".to_owned(),
        "RACK".to_owned(),
        "BOOTS".to_owned(),
        "STAGE".to_owned(),
        "KERNEL".to_owned(),
        "PLAN".to_owned(),
        "IMAGE".to_owned(),
        "ROOT".to_owned(),
        "BOOTED".to_owned(),
        "IMAGE FROM".to_owned(),
    ]];
    for node in &view.nodes {
        let after_dhcp = |stage: BootStage| {
            let at = node.reached(stage)?;
            Some(at.saturating_sub(node.started_unix_ms?))
        };
        rows.push(vec![
            node.mac.clone(),
            node.hostname.clone().unwrap_or_else(|| "-".into()),
            node.address
                .map_or_else(|| "-".into(), |address| address.to_string()),
            node.rack.clone().unwrap_or_else(|| "-".into()),
            node.image.clone().unwrap_or_else(|| "-".into()),
            node.latest_stage()
                .map_or("-", BootStage::as_str)
                .to_owned(),
            seconds(after_dhcp(BootStage::Kernel)),
            seconds(after_dhcp(BootStage::Plan)),
            seconds(after_dhcp(BootStage::Image)),
            seconds(after_dhcp(BootStage::Root)),
            seconds(after_dhcp(BootStage::Booted)),
            image_from(node),
        ]);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for row in &rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == columns {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[column]);
            }
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    let shown = if view.nodes_known > view.nodes.len() {
        format!("{} of {} nodes", view.nodes.len(), view.nodes_known)
    } else {
        format!("{} nodes", view.nodes.len())
    };
    let _ = writeln!(
        table,
        "\n{shown}; stage times in seconds after the boot's first DHCP ACK"
    );
    for node in &view.nodes {
        if let Some(sources) = &node.sources
            && !sources.peers.is_empty()
        {
            let _ = writeln!(
                table,
                "{} fetched from {}",
                node.mac,
                sources.peers.join(" ")
            );
        }
    }
    for server in &view.servers {
        if let Some(error) = &server.error {
            let _ = writeln!(
                table,
                "server {} did not answer ({error}); its nodes may be missing",
                server.server
            );
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_service::ServerAsked;
    use crate::timeline::{ImageSources, StageSeen};

    fn seen(stage: BootStage, at_unix_ms: u64) -> StageSeen {
        StageSeen {
            stage,
            at_unix_ms,
            server: "s1".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn the_table_shows_each_stage_after_dhcp_and_the_image_sources() {
        let started = 1_700_000_000_000;
        let view = NodesView {
            nodes_known: 2,
            servers: vec![
                ServerAsked {
                    server: "s1".into(),
                    error: None,
                },
                ServerAsked {
                    server: "10.0.0.2:7700".into(),
                    error: Some("timed out".into()),
                },
            ],
            nodes: vec![
                NodeTimeline {
                    mac: "52:54:00:00:00:01".into(),
                    address: Some("10.9.0.20".parse().unwrap()),
                    hostname: Some("worker-1".into()),
                    rack: Some("r2".into()),
                    image: Some("node:v2".into()),
                    started_unix_ms: Some(started),
                    stages: vec![
                        seen(BootStage::Dhcp, started),
                        seen(BootStage::Kernel, started + 1_200),
                        seen(BootStage::Plan, started + 9_000),
                        seen(BootStage::Image, started + 14_550),
                        seen(BootStage::Root, started + 15_000),
                        seen(BootStage::Booted, started + 41_000),
                    ],
                    sources: Some(ImageSources {
                        server_bytes: 1 << 20,
                        peer_bytes: 3 << 20,
                        peers: vec!["10.9.0.21:7800".into()],
                    }),
                    kernel_to_booted_ms: Some(33_000),
                    boots_seen: 1,
                },
                NodeTimeline {
                    mac: "52:54:00:00:00:02".into(),
                    address: None,
                    hostname: None,
                    rack: None,
                    image: None,
                    started_unix_ms: None,
                    stages: vec![seen(BootStage::Plan, started)],
                    sources: None,
                    kernel_to_booted_ms: None,
                    boots_seen: 0,
                },
            ],
        };
        let table = render_table(&view);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("MAC "), "{table}");
        let columns: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            columns,
            [
                "52:54:00:00:00:01",
                "worker-1",
                "10.9.0.20",
                "r2",
                "node:v2",
                "booted",
                "1.2",
                "9.0",
                "14.5",
                "15.0",
                "41.0",
                "server",
                "1.0MiB,",
                "peers",
                "3.0MiB",
                "(1)"
            ],
            "{table}"
        );
        // A node first seen by its plan (its DHCP went to a server that did not answer) has
        // no times to show, but its stage.
        let columns: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            columns,
            [
                "52:54:00:00:00:02",
                "-",
                "-",
                "-",
                "-",
                "plan",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-"
            ]
        );
        assert!(table.contains("52:54:00:00:00:01 fetched from 10.9.0.21:7800"));
        assert!(table.contains("server 10.0.0.2:7700 did not answer (timed out)"));
        assert!(table.contains("2 nodes;"));
    }
}
