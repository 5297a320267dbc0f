//! The agent's boot reports: `POST /nodes/<mac>/report` to the servers when the root image is
//! in memory or attached, when the root is assembled, and when the booted system has reached
//! multi-user.target, so `bootmesh nodes` shows every stage of a boot with its timing and the
//! peers the image came from.
//!
//! Reports are best effort: a report that does not arrive costs the operator a column in a
//! table, never the boot. Each is tried on at most [`REPORT_SERVERS_MAX`] servers with a short
//! timeout, and a failure is logged and forgotten.

use std::path::Path;
use std::time::Duration;

use crate::timeline::{AgentReport, BootStage, ImageSources};

use transfer::ChunkTransport;

use super::fetch::HttpTransport;
use super::system;

/// Servers a report is offered to before it is given up.
pub const REPORT_SERVERS_MAX: usize = 2;
/// Time for one server to take a report.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// The file the booted system's `bootmesh-booted.service` creates once multi-user.target is
/// reached (under `/run`, so every boot starts without it).
pub const BOOTED_MARKER: &str = "booted";
/// The file the companion leaves once a server has taken its booted report (for the booted
/// system's own scripts: the servers know this boot is complete).
pub const BOOTED_REPORTED_MARKER: &str = "booted-reported";
/// How often the companion looks for the marker.
const BOOTED_POLL: Duration = Duration::from_secs(1);
/// How long the companion waits for the booted system before it stops looking: a system
/// that needs longer than the servers' stale-boot horizon is not reported as booted.
const BOOTED_WAIT: Duration = Duration::from_millis(crate::timeline::BOOT_STALE_MS);

/// Where reports go: the servers, starting with the one that served the plan.
#[derive(Debug, Clone)]
pub struct Reporter {
    transport: HttpTransport,
    first: usize,
    /// The MAC as the servers' paths spell it (`52-54-00-12-34-56`).
    mac_path: String,
}

impl Reporter {
    /// Reports go to `transport`'s servers from `first` on, for the node with MAC `mac_path`.
    pub fn new(transport: HttpTransport, first: usize, mac_path: &str) -> Self {
        Self {
            transport,
            first,
            mac_path: mac_path.to_owned(),
        }
    }

    /// Reports `stage` (and, for the image, where its bytes came from). Blocks for at most
    /// [`REPORT_SERVERS_MAX`] × [`REPORT_TIMEOUT`]; returns whether a server took it.
    pub fn report(&self, stage: BootStage, sources: Option<ImageSources>) -> bool {
        let report = AgentReport {
            stage,
            sources,
            uptime_ms: uptime_ms(),
        };
        let body = match serde_json::to_vec(&report) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(%error, stage = stage.as_str(), "boot stage not reported");
                return false;
            }
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::warn!(%error, stage = stage.as_str(), "boot stage not reported: no runtime");
                return false;
            }
        };
        let servers = self.transport.servers().len();
        let path = format!("nodes/{}/report", self.mac_path);
        runtime.block_on(async {
            for attempt in 0..REPORT_SERVERS_MAX.min(servers) {
                let source = (self.first + attempt) % servers;
                match self
                    .transport
                    .post_json(source, &path, body.clone(), REPORT_TIMEOUT)
                    .await
                {
                    Ok(()) => {
                        tracing::debug!(
                            stage = stage.as_str(),
                            server = %self.transport.source_name(source),
                            "boot stage reported"
                        );
                        return true;
                    }
                    Err(error) => {
                        tracing::warn!(%error, stage = stage.as_str(), "boot stage not reported");
                    }
                }
            }
            false
        })
    }

    /// In the booted system: waits for `bootmesh-booted.service` to leave its marker, then
    /// reports the boot complete.
    pub fn report_booted_when_reached(&self) {
        let marker = Path::new(system::AGENT_RUN_DIR).join(BOOTED_MARKER);
        let mut waited = Duration::ZERO;
        while !marker.exists() {
            if waited >= BOOTED_WAIT {
                tracing::warn!(
                    marker = %marker.display(),
                    "the booted system never reached multi-user.target; booted not reported"
                );
                return;
            }
            std::thread::sleep(BOOTED_POLL);
            waited += BOOTED_POLL;
        }
        tracing::info!("multi-user.target reached");
        if self.report(BootStage::Booted, None) {
            let reported = Path::new(system::AGENT_RUN_DIR).join(BOOTED_REPORTED_MARKER);
            if let Err(error) = std::fs::write(&reported, b"") {
                tracing::warn!(%error, path = %reported.display(), "booted reported, marker not written");
            }
        }
    }
}

/// Milliseconds since the kernel started, from `/proc/uptime`.
fn uptime_ms() -> Option<u64> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    // Uptime is positive and far below u64::MAX milliseconds.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((seconds * 1000.0) as u64)
}
