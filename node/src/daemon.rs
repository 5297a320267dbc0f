//! `bootmesh serve`: starts every configured service on real sockets and stops them together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use boot_services::dhcp::{DhcpMode, DhcpServer, PXE_PORT};
use boot_services::nbd::NbdConfig;
use boot_services::tftp::TftpConfig;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{ConfigError, ServerConfig};
use crate::dhcp_service::{DhcpCounters, DhcpServiceError, GroupCommitStore, run_dhcp_with_store};
use crate::files::{DirectorySource, FileExports};
use crate::image_source::{ExportsAndImages, FilesAndImages, ImageLibrary};
use crate::journal::FileLeaseJournal;
use crate::net::InterfaceLink;
use crate::seams::{SystemClock, TokioNetwork};

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A socket could not be bound, a root not opened.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The DHCP service stopped on a journal failure.
    #[error(transparent)]
    Dhcp(#[from] crate::dhcp_service::DhcpServiceError),
    /// The cluster member could not start or failed (the cause follows in the error chain).
    #[error("cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A service task panicked.
    #[error("service task failed: {0}")]
    Task(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// A future that resolves once `signal` turns true.
async fn shutdown_signal(mut signal: watch::Receiver<bool>) {
    while !*signal.borrow_and_update() {
        if signal.changed().await.is_err() {
            return;
        }
    }
}

/// The swarm member of this server: on an endpoint of its own, or on the cluster's.
/// The name a server outside a cluster gives its boot records: its host name.
fn local_server_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "local".into())
}

fn start_swarm(
    section: &crate::config::SwarmSection,
    member: Option<&crate::cluster::member::ClusterMember>,
) -> Result<Arc<crate::swarm::SwarmNode>, ServeError> {
    let upload = transfer::swarm::UploadConfig {
        bytes_per_second: section
            .upload_mib_per_second
            .map(|mib| mib.saturating_mul(1024 * 1024)),
        ..transfer::swarm::UploadConfig::default()
    };
    let swarm_error = |error: crate::swarm::SwarmError| ServeError::Task(error.to_string());
    match (section.listen, member) {
        (Some(address), _) => {
            let swarm = crate::swarm::SwarmNode::bind(address, upload).map_err(swarm_error)?;
            tracing::info!(%address, "serving image chunks to the swarm");
            Ok(swarm)
        }
        (None, Some(member)) => {
            let swarm = crate::swarm::SwarmNode::with_endpoint(member.endpoint().clone(), upload)
                .map_err(swarm_error)?;
            member.attach_swarm(Arc::clone(&swarm));
            tracing::info!(address = %member.record.address, "serving image chunks to the swarm on the cluster endpoint");
            Ok(swarm)
        }
        (None, None) => Err(ServeError::Task(
            "[swarm] needs `listen` on a server outside a cluster".into(),
        )),
    }
}

/// Runs every service in `config` until `shutdown` resolves or one of them fails.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_sender, stop_receiver) = watch::channel(false);
    // The image store every service reads images from (`bootmesh image import` writes it).
    let images = ImageLibrary::new(Arc::new(
        crate::image::open_store_with_cache(
            &config.state_dir,
            usize::try_from(config.images.chunk_cache_mib.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
        )
        .map_err(|error| ServeError::Task(format!("image store: {error}")))?,
    ));
    let mut services: JoinSet<Result<(), ServeError>> = JoinSet::new();

    // The cluster member starts first: the DHCP service commits its leases through it, and the
    // fleet configuration it holds replaces the file's fleet sections.
    let local_config = config.clone();
    let member = match &config.cluster {
        Some(settings) => {
            let files = crate::cluster::files::ClusterFiles::new(&config.state_dir);
            if !files.exists() {
                return Err(ServeError::Task(format!(
                    "[cluster] is set but {} has no cluster identity: run `bootmesh cluster init` or `bootmesh cluster join` first",
                    config.state_dir.display()
                )));
            }
            let member = crate::cluster::member::ClusterMember::start(&files, settings).await?;
            let shutdown = shutdown_signal(stop_receiver.clone());
            let running = member.clone();
            services.spawn(async move { running.run(shutdown).await.map_err(ServeError::from) });
            Some(member)
        }
        None => None,
    };
    let (config, fleet_version) = match &member {
        Some(member) => fleet_applied(&local_config, member)?,
        None => (local_config.clone(), 0),
    };
    // Every node's plan and secrets: served over HTTP, and (without secrets) as lts.conf.
    let node_plans = config.node_plans()?;
    // A change of the fleet configuration reaches the running DHCP core and boot scripts.
    let (dhcp_reconfigure, dhcp_reconfigured) = watch::channel(None);
    let scripts_handle =
        crate::http_service::BootScriptsHandle::new(boot_scripts(&config, &images, &node_plans));
    let lts_conf = crate::image_source::LtsConfHandle::new(node_plans.lts_conf());
    let readiness = crate::http_service::Readiness::starting();
    // Where each node is, by the subnets that name a rack; followed as the fleet changes.
    let racks = crate::racks::RackMap::new(config.rack_map());
    if let Some(member) = &member {
        let watcher = FleetWatcher {
            local: local_config.clone(),
            member: member.clone(),
            version: fleet_version,
            images: images.clone(),
            dhcp: dhcp_reconfigure,
            scripts: scripts_handle.clone(),
            lts_conf: lts_conf.clone(),
            readiness: readiness.clone(),
            racks: racks.clone(),
        };
        let shutdown = shutdown_signal(stop_receiver.clone());
        services.spawn(async move {
            watcher.run(shutdown).await;
            Ok(())
        });
    }

    // What this server sees of each boot; in a cluster, named by its cluster address, which
    // every member and `cluster status` know it by.
    let boots = Arc::new(crate::boots::BootRecorder::new(match &member {
        Some(member) => member.record.address.to_string(),
        None => local_server_name(),
    }));
    if let Some(member) = &member {
        member.attach_boots(Arc::clone(&boots));
    }

    let mut swarm_node = None;
    if let Some(section) = &config.swarm {
        let swarm = start_swarm(section, member.as_ref())?;
        swarm_node = Some(Arc::clone(&swarm));
        swarm.enable_tracker(crate::swarm::TrackerService::new(
            transfer::swarm::TrackerConfig::default(),
            racks.clone(),
        ));
        // With a list, this server announces its images to each image's tracker; without
        // one it is the tracker of its own images, and names itself to those who ask.
        let announce = (!section.trackers.is_empty()).then(|| crate::swarm::AnnounceOptions {
            trackers: section.trackers.clone(),
            rack: member.as_ref().map(|member| member.record.rack.clone()),
            ..crate::swarm::AnnounceOptions::default()
        });
        let store = Arc::clone(images.store());
        let shutdown = shutdown_signal(stop_receiver.clone());
        services.spawn(async move {
            crate::swarm::offer_store_images(&swarm, store, announce, shutdown).await;
            let stats = swarm.stats();
            tracing::info!(
                chunks_uploaded = stats
                    .chunks_uploaded
                    .load(std::sync::atomic::Ordering::Relaxed),
                bytes_uploaded = stats
                    .bytes_uploaded
                    .load(std::sync::atomic::Ordering::Relaxed),
                requests_refused_busy = stats
                    .requests_refused_busy
                    .load(std::sync::atomic::Ordering::Relaxed),
                requests_declined_duplicate = stats
                    .requests_declined_duplicate
                    .load(std::sync::atomic::Ordering::Relaxed),
                sends_stopped_by_requester = stats
                    .sends_stopped_by_requester
                    .load(std::sync::atomic::Ordering::Relaxed),
                "swarm stopped"
            );
            swarm.shut_down_and_wait().await;
            Ok(())
        });
    }

    // In a cluster, the groups boot what the cluster's catalog names, on every server.
    if let Some(member) = &member {
        member.attach_images(Arc::clone(images.store()));
        // A server without [swarm] serves no chunks, but still fetches the images the
        // cluster promotes, from the members that do, over the cluster endpoint.
        let fetcher = match &swarm_node {
            Some(swarm) => Arc::clone(swarm),
            None => crate::swarm::SwarmNode::with_endpoint(
                member.endpoint().clone(),
                transfer::swarm::UploadConfig::default(),
            )
            .map_err(|error| ServeError::Task(error.to_string()))?,
        };
        let follower = crate::cluster::catalog::CatalogFollower {
            member: member.clone(),
            store: Arc::clone(images.store()),
            swarm: Some(fetcher),
        };
        let shutdown = shutdown_signal(stop_receiver.clone());
        services.spawn(async move {
            follower.run(shutdown).await;
            Ok(())
        });
    }

    let mut dhcp_counters = None;
    // Made before their services, since /metrics (HTTP) starts between them.
    let tftp_counters = Arc::new(crate::metrics::SessionCounters::default());
    let nbd_counters = Arc::new(crate::metrics::SessionCounters::default());
    if let Some(dhcp_config) = config.dhcp_config()? {
        let Some(section) = config.dhcp.clone() else {
            return Err(ServeError::Task("dhcp config without section".into()));
        };
        let mode = dhcp_config.mode;
        let dynamic_ranges: Vec<Vec<boot_services::dhcp::AddressRange>> = dhcp_config
            .subnets
            .iter()
            .map(|subnet| subnet.ranges.clone())
            .collect();
        let server = DhcpServer::new(dhcp_config).map_err(|error| ConfigError::Invalid {
            key: "dhcp".into(),
            reason: error.to_string(),
        })?;
        let mut links = Vec::new();
        for interface in &section.interfaces {
            links.push(Arc::new(
                InterfaceLink::bind(interface, section.port).map_err(io_error(format!(
                    "dhcp on {interface} port {}",
                    section.port
                )))?,
            ));
            if mode == DhcpMode::Proxy {
                links.push(Arc::new(InterfaceLink::bind(interface, PXE_PORT).map_err(
                    io_error(format!("proxydhcp on {interface} port {PXE_PORT}")),
                )?));
            }
        }
        let shutdown = shutdown_signal(stop_receiver.clone());
        let queue_max = section.receive_queue_max;
        let counters = Arc::new(DhcpCounters {
            boots: Some(Arc::clone(&boots)),
            ..DhcpCounters::default()
        });
        dhcp_counters = Some(Arc::clone(&counters));
        match &member {
            // In a cluster, leases are committed through Raft and shared by every server.
            Some(member) => {
                let minority_journal =
                    FileLeaseJournal::open(&config.state_dir.join("cluster").join("minority"))
                        .map_err(DhcpServiceError::from)?;
                let store = crate::cluster::leases::ClusterLeaseStore::new(
                    member.clone(),
                    &dynamic_ranges,
                    minority_journal,
                    dhcp_reconfigured,
                );
                services.spawn(async move {
                    crate::cluster::leases::run_cluster_dhcp(
                        server,
                        links,
                        store,
                        SystemClock,
                        queue_max,
                        counters,
                        shutdown,
                    )
                    .await
                    .map_err(ServeError::from)
                });
            }
            None => {
                let journal =
                    FileLeaseJournal::open(&config.state_dir).map_err(|error| ServeError::Io {
                        what: error.to_string(),
                        source: std::io::Error::other("journal"),
                    })?;
                services.spawn(async move {
                    run_dhcp_with_store(
                        server,
                        links,
                        GroupCommitStore::new(journal),
                        SystemClock,
                        queue_max,
                        counters,
                        shutdown,
                    )
                    .await
                    .map_err(ServeError::from)
                });
            }
        }
        tracing::info!(interfaces = ?section.interfaces, port = section.port, ?mode, "dhcp serving");
    }

    if let Some(tftp) = config.tftp.clone() {
        let source = FilesAndImages::new(
            DirectorySource::new(&tftp.root)
                .map_err(io_error(format!("tftp root {}", tftp.root.display())))?,
            Some(images.clone()),
        )
        .with_lts_conf(lts_conf.clone());
        let tftp_config = TftpConfig {
            blksize_max: tftp.blksize_max,
            windowsize_max: tftp.windowsize_max,
            timeout_default: Duration::from_millis(tftp.timeout_ms),
            retries_max: tftp.retries_max,
            sessions_max: tftp.sessions_max,
        };
        // Bind before spawning so that a port in use fails start-up, not later.
        std::net::UdpSocket::bind(tftp.listen)
            .map_err(io_error(format!("tftp on {}", tftp.listen)))?;
        let shutdown = shutdown_signal(stop_receiver.clone());
        let counters = Arc::clone(&tftp_counters);
        services.spawn(async move {
            crate::tftp_service::run_tftp(
                TokioNetwork,
                tftp.listen,
                source,
                tftp_config,
                counters,
                shutdown,
            )
            .await
            .map_err(io_error("tftp"))
        });
    }

    if let Some(http) = config.http.clone() {
        let source = DirectorySource::new(&http.root)
            .map_err(io_error(format!("http root {}", http.root.display())))?;
        let listener = tokio::net::TcpListener::bind(http.listen)
            .await
            .map_err(io_error(format!("http on {}", http.listen)))?;
        let scripts = scripts_handle.clone();
        let http_counters = Arc::new(crate::metrics::HttpCounters::default());
        let probes = crate::http_service::Probes {
            readiness: readiness.clone(),
            metrics: Arc::new(crate::metrics::registry(crate::metrics::MetricsSources {
                readiness: readiness.clone(),
                http: Arc::clone(&http_counters),
                dhcp: dhcp_counters.clone(),
                tftp: config.tftp.is_some().then(|| Arc::clone(&tftp_counters)),
                nbd: config.nbd.is_some().then(|| Arc::clone(&nbd_counters)),
                swarm: swarm_node.clone(),
                member: member.clone(),
                boots: Arc::clone(&boots),
            })),
            http: http_counters,
            boots: Arc::clone(&boots),
            member: member.clone(),
            racks: racks.clone(),
        };
        let shutdown = shutdown_signal(stop_receiver.clone());
        // Where the booted peers of an image are known: this server's own tracker when it
        // tracks its images alone; with a tracker list each image's tracker, which may be
        // another server (ADR 0016).
        let firmware_peers = swarm_node.as_ref().and_then(|swarm| {
            let trackers = config
                .swarm
                .as_ref()
                .map(|section| section.trackers.clone())?;
            if trackers.is_empty() {
                swarm
                    .tracker()
                    .cloned()
                    .map(crate::swarm::FirmwarePeerSource::Local)
            } else {
                Some(crate::swarm::FirmwarePeerSource::trackers(
                    Arc::clone(swarm),
                    trackers,
                ))
            }
        });
        services.spawn(async move {
            crate::http_service::run_http(
                listener,
                source,
                scripts,
                probes,
                firmware_peers,
                http.connections_max,
                shutdown,
            )
            .await
            .map_err(io_error("http"))
        });
    }

    if let Some(nbd) = config.nbd.clone() {
        let exports = ExportsAndImages::new(
            FileExports::new(nbd.exports.iter().map(|export| {
                (
                    export.name.clone(),
                    export.path.clone(),
                    export.description.clone(),
                )
            })),
            Some(images.clone()),
        );
        for export in &nbd.exports {
            std::fs::metadata(&export.path).map_err(io_error(format!(
                "nbd export {:?} at {}",
                export.name,
                export.path.display()
            )))?;
        }
        let listener = tokio::net::TcpListener::bind(nbd.listen)
            .await
            .map_err(io_error(format!("nbd on {}", nbd.listen)))?;
        let shutdown = shutdown_signal(stop_receiver.clone());
        let counters = Arc::clone(&nbd_counters);
        services.spawn(async move {
            crate::nbd_service::run_nbd(
                listener,
                exports,
                NbdConfig::default(),
                nbd.connections_max,
                counters,
                shutdown,
            )
            .await
            .map_err(io_error("nbd"))
        });
    }

    tracing::info!(services = services.len(), "bootmesh serving");
    if member.is_none() {
        // A cluster member is ready once it knows a leader (its fleet watcher says so).
        readiness.set_ready();
    }
    tokio::pin!(shutdown);
    let first_failure = tokio::select! {
        biased;
        () = &mut shutdown => None,
        finished = services.join_next() => match finished {
            Some(Ok(Ok(()))) | None => None,
            Some(Ok(Err(error))) => Some(error),
            Some(Err(join_error)) => Some(ServeError::Task(join_error.to_string())),
        },
    };
    tracing::info!("stopping services");
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while services.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        services.abort_all();
    }
    match first_failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The boot scripts `config` describes.
fn boot_scripts(
    config: &ServerConfig,
    images: &ImageLibrary,
    node_plans: &crate::plan::NodePlans,
) -> crate::http_service::BootScripts {
    let mut scripts = crate::http_service::BootScripts {
        images: Some(images.clone()),
        plans: node_plans.clone(),
        servers: config.boot_servers(),
        // A cluster member without a listen address of its own serves the swarm on its
        // cluster endpoint, which this file does not name: such servers list `trackers`.
        trackers: config.swarm.as_ref().map_or_else(Vec::new, |swarm| {
            if swarm.trackers.is_empty() {
                swarm.listen.into_iter().collect()
            } else {
                swarm.trackers.clone()
            }
        }),
        token_time_to_live: config.boot_token_ttl(),
        ..Default::default()
    };
    if let Some(boot) = &config.boot {
        scripts.kernel = boot.kernel.clone();
        scripts.initrd = boot.initrd.clone();
        scripts.cmdline = boot.cmdline.clone();
    }
    for group in &config.groups {
        scripts
            .group_cmdlines
            .insert(group.name.clone(), group.cmdline.clone());
    }
    scripts
}

/// `local` with the fleet sections of the cluster's configuration, when the cluster has one;
/// and that configuration's version (0: none yet, the file's sections serve).
fn fleet_applied(
    local: &ServerConfig,
    member: &crate::cluster::member::ClusterMember,
) -> Result<(ServerConfig, u64), ServeError> {
    let document = member.state.read(|state| state.config.clone());
    if document.version == 0 {
        return Ok((local.clone(), 0));
    }
    let fleet = crate::config::FleetConfig::parse(
        &document.document,
        std::path::Path::new("cluster fleet configuration"),
    )?;
    tracing::info!(
        version = document.version,
        "serving the cluster's fleet configuration"
    );
    Ok((local.with_fleet(&fleet)?, document.version))
}

/// Follows the cluster's fleet configuration: each new version goes to the DHCP core and the
/// boot scripts while they serve. A version that this server cannot use (it was validated
/// before it was committed, so only a local difference can cause that) is logged and skipped.
struct FleetWatcher {
    local: ServerConfig,
    member: crate::cluster::member::ClusterMember,
    version: u64,
    images: ImageLibrary,
    dhcp: watch::Sender<Option<boot_services::dhcp::DhcpConfig>>,
    scripts: crate::http_service::BootScriptsHandle,
    lts_conf: crate::image_source::LtsConfHandle,
    readiness: crate::http_service::Readiness,
    racks: crate::racks::RackMap,
}

impl FleetWatcher {
    async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = interval.tick() => {}
            }
            let leader = self.member.raft.metrics().borrow().current_leader;
            match leader {
                Some(_) => self.readiness.set_ready(),
                None => self
                    .readiness
                    .set_not_ready("no cluster leader known: new leases cannot be committed"),
            }
            let version = self.member.state.read(|state| state.config.version);
            if version == self.version {
                continue;
            }
            match fleet_applied(&self.local, &self.member).and_then(|(config, version)| {
                let plans = config.node_plans()?;
                let dhcp = config.dhcp_config()?;
                Ok((config, version, plans, dhcp))
            }) {
                Ok((config, version, plans, dhcp)) => {
                    self.scripts
                        .replace(boot_scripts(&config, &self.images, &plans));
                    self.lts_conf.replace(plans.lts_conf());
                    self.racks.replace(config.rack_map());
                    if let Some(dhcp) = dhcp {
                        let _ = self.dhcp.send(Some(dhcp));
                    }
                    tracing::info!(version, "fleet configuration applied");
                    self.version = version;
                }
                Err(error) => {
                    tracing::error!(version, %error, "fleet configuration not usable here; keeping the previous one");
                    self.version = version;
                }
            }
        }
    }
}
