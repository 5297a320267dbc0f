//! `GET /metrics` on every HTTP listener: what the server is doing, in Prometheus' text format
//! (OpenMetrics). Nothing is counted twice: at each scrape the collector reads the counters the
//! services already keep (DHCP, HTTP, the swarm) and the Raft node's own metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::dhcp_service::DhcpCounters;
use crate::http_service::Readiness;

/// HTTP requests answered, by status class, and the body bytes they announced.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Responses by class: 1xx..5xx.
    pub responses_by_class: [AtomicU64; 5],
    /// Sum of the responses' `Content-Length`s (files, chunks, scripts).
    pub response_bytes: AtomicU64,
}

impl HttpCounters {
    /// Counts one response.
    pub fn count(&self, status: u16, content_length: Option<u64>) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses_by_class[class].fetch_add(1, Ordering::Relaxed);
        if let Some(bytes) = content_length {
            self.response_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// A service of sessions (TFTP transfers, NBD connections): how many started, are running,
/// failed or were refused, and the bytes sent.
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// Sessions started.
    pub started: AtomicU64,
    /// Sessions running now.
    pub active: AtomicU64,
    /// Sessions that ended early (timeouts, client errors, broken connections).
    pub failed: AtomicU64,
    /// Requests refused (a bound reached, a file not found).
    pub refused: AtomicU64,
    /// Bytes sent: whole files for TFTP, everything written for NBD.
    pub bytes_sent: AtomicU64,
}

impl SessionCounters {
    /// Counts a session as started and running until the guard drops (also when its task is
    /// aborted).
    pub fn start(self: &Arc<Self>) -> ActiveSession {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveSession(Arc::clone(self))
    }
}

/// A running session; see [`SessionCounters::start`].
#[derive(Debug)]
pub struct ActiveSession(Arc<SessionCounters>);

impl ActiveSession {
    /// The counters it belongs to.
    pub fn counters(&self) -> &SessionCounters {
        &self.0
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the numbers come from; what a server does not run is `None`.
pub struct MetricsSources {
    /// Ready or not (`/readyz`).
    pub readiness: Readiness,
    /// The HTTP service.
    pub http: Arc<HttpCounters>,
    /// The DHCP service.
    pub dhcp: Option<Arc<DhcpCounters>>,
    /// The TFTP service.
    pub tftp: Option<Arc<SessionCounters>>,
    /// The NBD service.
    pub nbd: Option<Arc<SessionCounters>>,
    /// The swarm member.
    pub swarm: Option<Arc<crate::swarm::SwarmNode>>,
    /// The cluster member.
    pub member: Option<crate::cluster::member::ClusterMember>,
    /// The boots this server took part in.
    pub boots: Arc<crate::boots::BootRecorder>,
}

impl std::fmt::Debug for MetricsSources {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MetricsSources")
            .field("dhcp", &self.dhcp.is_some())
            .field("swarm", &self.swarm.is_some())
            .field("member", &self.member.is_some())
            .finish_non_exhaustive()
    }
}

/// The registry `/metrics` renders.
pub fn registry(sources: MetricsSources) -> Registry {
    let mut registry = Registry::with_prefix("bootmesh");
    registry.register_collector(Box::new(sources));
    registry
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn labelled_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (label_value, value) in values {
        ConstCounter::new(*value).encode(family.encode_family(&[(label, *label_value)])?)?;
    }
    Ok(())
}

fn as_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for MetricsSources {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        gauge(
            &mut encoder,
            "ready",
            "1 when the server is ready to serve nodes (what /readyz says)",
            i64::from(self.readiness.not_ready_because().is_none()),
        )?;
        let http = &self.http;
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let by_class: Vec<(&str, u64)> = classes
            .iter()
            .zip(&http.responses_by_class)
            .map(|(class, count)| (*class, load(count)))
            .collect();
        labelled_counter(
            &mut encoder,
            "http_responses",
            "HTTP responses (boot scripts, node plans, kernels, chunks), by status class",
            "class",
            &by_class,
        )?;
        counter(
            &mut encoder,
            "http_response_bytes",
            "Bytes of HTTP response bodies, as their Content-Length announced them",
            load(&http.response_bytes),
        )?;
        if let Some(dhcp) = &self.dhcp {
            counter(
                &mut encoder,
                "dhcp_datagrams_received",
                "DHCP datagrams received",
                load(&dhcp.received),
            )?;
            labelled_counter(
                &mut encoder,
                "dhcp_datagrams_dropped",
                "DHCP datagrams not answered: the receive queue was full, or the core dropped \
                 them (malformed, not for us, nothing to offer)",
                "reason",
                &[
                    ("queue_full", load(&dhcp.dropped_queue_full)),
                    ("not_answered", load(&dhcp.dropped_by_core)),
                ],
            )?;
            let by_reason: Vec<(&str, u64)> = boot_services::dhcp::DhcpDrop::KINDS
                .iter()
                .zip(&dhcp.dropped_by_reason)
                .map(|(kind, count)| (*kind, load(count)))
                .collect();
            labelled_counter(
                &mut encoder,
                "dhcp_requests_unanswered",
                "DHCP datagrams the core did not answer, by reason (other_server_chosen is the \
                 normal lot of the servers a client did not pick; awaiting_addresses is a \
                 DISCOVER kept until this server's next address block)",
                "reason",
                &by_reason,
            )?;
            let by_type: Vec<(&str, u64)> = DhcpCounters::REPLY_TYPES
                .iter()
                .zip(&dhcp.sent_by_type)
                .map(|(kind, count)| (*kind, load(count)))
                .collect();
            labelled_counter(
                &mut encoder,
                "dhcp_replies_sent",
                "DHCP replies sent, by message type",
                "type",
                &by_type,
            )?;
            counter(
                &mut encoder,
                "dhcp_lease_changes_committed",
                "Lease changes made durable (journaled, or committed through Raft) before their ACK",
                load(&dhcp.committed),
            )?;
        }
        for (service, unit, counters) in [
            ("tftp", "transfers", &self.tftp),
            ("nbd", "connections", &self.nbd),
        ] {
            let Some(counters) = counters else {
                continue;
            };
            let upper = service.to_ascii_uppercase();
            counter(
                &mut encoder,
                &format!("{service}_{unit}_started"),
                &format!("{upper} {unit} started"),
                load(&counters.started),
            )?;
            gauge(
                &mut encoder,
                &format!("{service}_{unit}_active"),
                &format!("{upper} {unit} running now"),
                as_gauge(load(&counters.active)),
            )?;
            counter(
                &mut encoder,
                &format!("{service}_{unit}_failed"),
                &format!("{upper} {unit} that ended early"),
                load(&counters.failed),
            )?;
            counter(
                &mut encoder,
                &format!("{service}_requests_refused"),
                &format!("{upper} requests refused (a bound reached, nothing to serve)"),
                load(&counters.refused),
            )?;
            counter(
                &mut encoder,
                &format!("{service}_bytes_sent"),
                &format!("Bytes {upper} sent"),
                load(&counters.bytes_sent),
            )?;
        }
        if let Some(swarm) = &self.swarm {
            let stats = swarm.stats();
            labelled_counter(
                &mut encoder,
                "swarm_chunk_bytes",
                "Image chunk bytes moved over the swarm, by direction",
                "direction",
                &[
                    ("uploaded", load(&stats.bytes_uploaded)),
                    ("downloaded", load(&stats.bytes_downloaded)),
                ],
            )?;
            counter(
                &mut encoder,
                "swarm_chunks_rejected",
                "Chunks that failed their hash check on arrival (their sender is banned)",
                load(&stats.chunks_rejected),
            )?;
            counter(
                &mut encoder,
                "swarm_requests_refused_busy",
                "Chunk requests answered with \"busy, try these\" (upload limit reached)",
                load(&stats.requests_refused_busy),
            )?;
        }
        self.boots.encode_metrics(&mut encoder)?;
        if let Some(member) = &self.member {
            let metrics = member.raft.metrics().borrow().clone();
            let last_log = metrics.last_log_index.unwrap_or(0);
            let applied = metrics.last_applied.map_or(0, |log_id| log_id.index);
            gauge(
                &mut encoder,
                "raft_term",
                "The Raft term",
                as_gauge(metrics.current_term),
            )?;
            gauge(
                &mut encoder,
                "raft_leader",
                "1 on the leader, 0 elsewhere",
                i64::from(metrics.current_leader == Some(member.record.server_id)),
            )?;
            gauge(
                &mut encoder,
                "raft_leader_known",
                "1 when this server knows a leader (leases can be committed)",
                i64::from(metrics.current_leader.is_some()),
            )?;
            gauge(
                &mut encoder,
                "raft_last_log_index",
                "Index of the last entry in this server's log",
                as_gauge(last_log),
            )?;
            gauge(
                &mut encoder,
                "raft_last_applied_index",
                "Index of the last entry applied to this server's state",
                as_gauge(applied),
            )?;
            gauge(
                &mut encoder,
                "raft_apply_lag",
                "Entries in the log not yet applied to the state",
                as_gauge(last_log.saturating_sub(applied)),
            )?;
            let (leases, members) = member
                .state
                .read(|state| (state.leases.len(), state.members.len()));
            gauge(
                &mut encoder,
                "leases",
                "Leases in the cluster state",
                i64::try_from(leases).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut encoder,
                "cluster_members",
                "Servers in the cluster",
                i64::try_from(members).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut encoder,
                "catalog_groups_behind",
                "Groups whose image the cluster promoted and this server does not boot yet (it is fetching the image, or cannot)",
                as_gauge(member.catalog_groups_behind()),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_the_services_counters() {
        let dhcp = Arc::new(DhcpCounters::default());
        dhcp.received.store(10, Ordering::Relaxed);
        dhcp.sent_by_type[1].store(4, Ordering::Relaxed);
        let http = Arc::new(HttpCounters::default());
        http.count(200, Some(1500));
        http.count(404, None);
        let tftp = Arc::new(SessionCounters::default());
        let finished = tftp.start();
        finished
            .counters()
            .bytes_sent
            .fetch_add(4096, Ordering::Relaxed);
        drop(finished);
        let _running = tftp.start();
        let boots = Arc::new(crate::boots::BootRecorder::new("s1"));
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let at =
            |seconds| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
        boots.observe(
            at(100),
            &mac,
            crate::timeline::Observation::DhcpAck {
                address: std::net::Ipv4Addr::new(10, 9, 0, 20),
            },
        );
        for (seconds, stage, peer_bytes) in [
            (130, crate::timeline::BootStage::Image, Some(900)),
            (142, crate::timeline::BootStage::Booted, None),
        ] {
            boots.observe(
                at(seconds),
                &mac,
                crate::timeline::Observation::Report(crate::timeline::AgentReport {
                    stage,
                    sources: peer_bytes.map(|peer_bytes| crate::timeline::ImageSources {
                        server_bytes: 100,
                        peer_bytes,
                        peers: Vec::new(),
                    }),
                    uptime_ms: Some(25_000),
                }),
            );
        }
        let readiness = Readiness::starting();
        readiness.set_ready();
        let registry = registry(MetricsSources {
            readiness,
            http,
            dhcp: Some(dhcp),
            tftp: Some(Arc::clone(&tftp)),
            nbd: None,
            swarm: None,
            member: None,
            boots: Arc::clone(&boots),
        });
        let text = render(&registry).unwrap();
        for line in [
            "bootmesh_ready 1",
            "bootmesh_http_responses_total{class=\"2xx\"} 1",
            "bootmesh_http_responses_total{class=\"4xx\"} 1",
            "bootmesh_http_response_bytes_total 1500",
            "bootmesh_dhcp_datagrams_received_total 10",
            "bootmesh_dhcp_replies_sent_total{type=\"ack\"} 4",
            "bootmesh_dhcp_replies_sent_total{type=\"nak\"} 0",
            "bootmesh_tftp_transfers_started_total 2",
            "bootmesh_tftp_transfers_active 1",
            "bootmesh_tftp_bytes_sent_total 4096",
            "bootmesh_boot_duration_seconds_bucket{le=\"45.0\"} 1",
            "bootmesh_boot_duration_seconds_bucket{le=\"30.0\"} 0",
            "bootmesh_boot_duration_seconds_sum 42.0",
            "bootmesh_boot_kernel_to_booted_seconds_count 1",
            "bootmesh_node_image_bytes_total{source=\"peer\"} 900",
            "bootmesh_node_image_bytes_total{source=\"server\"} 100",
            "bootmesh_nodes_seen 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains("raft"), "no cluster, no Raft metrics");
        assert!(!text.contains("nbd"), "no NBD service, no NBD metrics");
    }
}
