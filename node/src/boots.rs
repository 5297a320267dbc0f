//! The server's record of the boots it takes part in: the DHCP driver and the HTTP service
//! tell it what they served, agents report their own stages, and `/metrics`, the nodes API and
//! the admin channel read it. The state itself is [`crate::timeline::BootTimelines`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::histogram::Histogram;

use crate::timeline::{BootTimelines, NodeTimeline, Observation, Recorded};

/// Nodes whose latest boot a server remembers; past it, the one updated longest ago goes.
/// About 1 KiB each: 64 MiB at most.
pub const NODES_REMEMBERED_MAX: usize = 65_536;

/// Upper bounds of the boot-duration buckets, in seconds: a VM under emulation takes minutes,
/// a real machine with a cached image seconds.
const BOOT_SECONDS_BUCKETS: [f64; 12] = [
    5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0,
];

/// See the module documentation.
pub struct BootRecorder {
    timelines: Mutex<BootTimelines>,
    /// First DHCP ACK seen here to the booted report.
    boot_seconds: Histogram,
    /// The node's kernel start to its booted report (its uptime then).
    kernel_to_booted_seconds: Histogram,
    image_server_bytes: AtomicU64,
    image_peer_bytes: AtomicU64,
    reports_refused: AtomicU64,
}

impl std::fmt::Debug for BootRecorder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BootRecorder")
            .field("nodes", &self.timelines().len())
            .finish_non_exhaustive()
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl BootRecorder {
    /// A recorder naming itself `server` in the stages it records.
    pub fn new(server: impl Into<String>) -> Self {
        Self::with_capacity(server, NODES_REMEMBERED_MAX)
    }

    /// A recorder remembering at most `nodes_max` nodes.
    pub fn with_capacity(server: impl Into<String>, nodes_max: usize) -> Self {
        Self {
            timelines: Mutex::new(BootTimelines::new(server, nodes_max)),
            boot_seconds: Histogram::new(BOOT_SECONDS_BUCKETS),
            kernel_to_booted_seconds: Histogram::new(BOOT_SECONDS_BUCKETS),
            image_server_bytes: AtomicU64::new(0),
            image_peer_bytes: AtomicU64::new(0),
            reports_refused: AtomicU64::new(0),
        }
    }

    fn timelines(&self) -> std::sync::MutexGuard<'_, BootTimelines> {
        // Every observation leaves the table consistent, so a panic elsewhere leaves it usable.
        self.timelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what was seen of node `mac` at `now`.
    pub fn observe(&self, now: SystemTime, mac: &[u8; 6], observation: Observation) {
        let Recorded {
            boot_duration_ms,
            kernel_to_booted_ms,
            sources,
        } = self.timelines().observe(unix_ms(now), mac, observation);
        if let Some(milliseconds) = boot_duration_ms {
            self.boot_seconds.observe(milliseconds as f64 / 1000.0);
        }
        if let Some(milliseconds) = kernel_to_booted_ms {
            self.kernel_to_booted_seconds
                .observe(milliseconds as f64 / 1000.0);
        }
        if let Some(sources) = sources {
            self.image_server_bytes
                .fetch_add(sources.server_bytes, Ordering::Relaxed);
            self.image_peer_bytes
                .fetch_add(sources.peer_bytes, Ordering::Relaxed);
        }
    }

    /// The name this server records its stages under.
    pub fn server_name(&self) -> String {
        self.timelines().server().to_owned()
    }

    /// Counts a report refused as malformed.
    pub fn count_refused_report(&self) {
        self.reports_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Every node this server remembers.
    pub fn snapshot(&self) -> Vec<NodeTimeline> {
        self.timelines().snapshot()
    }

    /// Writes the boot metrics.
    pub fn encode_metrics(&self, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        for (name, help, histogram) in [
            (
                "boot_duration_seconds",
                "Boots from their first DHCP ACK by this server to the booted system's report",
                &self.boot_seconds,
            ),
            (
                "boot_kernel_to_booted_seconds",
                "Boots from the node's kernel start to its booted system's report",
                &self.kernel_to_booted_seconds,
            ),
        ] {
            histogram.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                histogram.metric_type(),
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "node_image_bytes",
            "Root image bytes booting nodes reported fetching, by source (servers or peers)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (source, bytes) in [
            ("server", &self.image_server_bytes),
            ("peer", &self.image_peer_bytes),
        ] {
            ConstCounter::new(bytes.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("source", source)])?)?;
        }
        let refused = ConstCounter::new(self.reports_refused.load(Ordering::Relaxed));
        refused.encode(encoder.encode_descriptor(
            "node_reports_refused",
            "Agent reports refused as malformed",
            None,
            refused.metric_type(),
        )?)?;
        let nodes = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(self.timelines().len()).unwrap_or(i64::MAX),
        );
        nodes.encode(encoder.encode_descriptor(
            "nodes_seen",
            "Nodes whose latest boot this server remembers",
            None,
            nodes.metric_type(),
        )?)
    }
}
