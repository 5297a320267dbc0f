//! The agent: `/init` of the bootmesh initramfs (the same `bootmesh` binary, built static).
//!
//! As PID 1 it mounts the kernel filesystems, loads the modules the initramfs builder listed,
//! brings up the NIC that booted with its own DHCP client, fetches the node plan and the
//! manifest named by `bootmesh.image=` on the command line, obtains the root image (`ram`: every
//! chunk fetched and verified into a sealed memfd, then a read-only loop device; `nbd`: the
//! kernel's NBD client on a server's export), puts dm-verity over it, mounts the squashfs under
//! a tmpfs overlay, applies the plan, runs PREINIT, and `switch_root`s to the image's init.
//!
//! It says on the console what it does at every step. A failed step is retried with the next
//! server, then the whole round again; PID 1 never exits (the kernel would panic), so after
//! the last round it reboots into the firmware's PXE again.
//!
//! It resolves no host names: every address is an IP literal (a static glibc binary cannot
//! load NSS modules).

// A driver at the edge (PID 1 of a booting node): it reads the real clock for progress reports.
#![allow(clippy::disallowed_methods)]

pub mod apply;
pub mod cmdline;
pub mod devices;
pub mod fetch;
pub mod lazy;
pub mod nbd;
pub mod netlink;
pub mod network;
pub mod peer_firmware;
pub mod report;
pub mod system;

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use boot_services::dhcp::client::DhcpLease;
use transfer::{ChunkTransport, Manifest};

use crate::plan::{NodePlan, NodeSecrets, RootMode};
use crate::timeline::{BootStage, ImageSources, PEERS_REPORTED_MAX};
use cmdline::AgentCmdline;
use fetch::{FetchError, HttpTransport};
use network::Interface;

/// Why one boot round failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The kernel command line is unusable.
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    /// Reading a kernel file failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The network did not come up.
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    /// Fetching failed on every server.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A device could not be made.
    #[error(transparent)]
    Device(#[from] devices::DeviceError),
    /// The NBD root could not be attached on any server.
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    /// Mounting, modules, switching root.
    #[error(transparent)]
    System(#[from] system::SystemError),
    /// Writing the plan into the root.
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    /// The manifest cannot be booted by this agent.
    #[error("image {image}: {reason}")]
    Unbootable {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// No server to ask.
    #[error("no boot servers: the command line names none and DHCP gave no next server")]
    NoServers,
    /// The swarm could not deliver the root image (the servers' HTTP is tried next).
    #[error(transparent)]
    Swarm(#[from] crate::swarm::SwarmError),
    /// The lazy root's server could not be started or attached.
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
}

/// Boot rounds before the agent gives up and reboots into PXE.
const ROUNDS_MAX: u32 = 5;
/// Pause between rounds: long enough for a restarting server, short enough for an operator.
const ROUND_PAUSE: Duration = Duration::from_secs(5);
/// The tmpfs over the image takes the writes of the running system; bounded so a runaway
/// writer meets ENOSPC instead of the OOM killer.
const OVERLAY_SIZE: &str = "50%";
/// Seconds an `nbd` root's requests wait on a dead server, and for a reconnect.
const NBD_TIMEOUT_SECS: u64 = 30;

/// State kept across rounds: what worked need not be redone.
#[derive(Debug, Default)]
struct Progress {
    interface: Option<Interface>,
    lease: Option<DhcpLease>,
    lease_keeper: Option<network::LeaseKeeper>,
    root_mounted: bool,
    /// The boot token is single-use: once spent, later rounds keep what it fetched.
    token_spent: bool,
    secrets: Option<NodeSecrets>,
}

/// Console logging at `info`, or at the level `bootmesh.log=<level>` on the kernel command line
/// names (read once /proc is mounted).
fn init_console_logging() {
    let level = std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|cmdline| {
            cmdline
                .split_ascii_whitespace()
                .find_map(|word| word.strip_prefix("bootmesh.log=").map(str::to_owned))
        })
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The kernel log, not the console tty: the kernel writes it to every console itself (by
    // polling, so a serial port whose interrupts never come cannot block PID 1 in write(2),
    // which the tty path did under emulation), and it lands in the booted system's journal.
    // Its lines carry the kernel's timestamps already.
    // `quiet` on the command line hides info lines from the console; the agent's steps are
    // what an operator at a serial console needs, so they show until the image's init runs.
    show_agent_lines_on_console(true);
    let kernel_log = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n")
        .ok()
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .ok()
        });
    match kernel_log {
        Some(kernel_log) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .with_writer(KernelLogWriter::new(kernel_log))
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_target(false)
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Console log level while the agent runs: info lines show. The image's own setting (`quiet`
/// or not) is put back before its init starts.
fn show_agent_lines_on_console(agent_running: bool) {
    use std::sync::Mutex;
    static SAVED: Mutex<Option<String>> = Mutex::new(None);
    let path = "/proc/sys/kernel/printk";
    let Ok(mut saved) = SAVED.lock() else {
        return;
    };
    if agent_running {
        if let Ok(levels) = std::fs::read_to_string(path) {
            let mut fields = levels.split_whitespace();
            let console_level: u32 = fields
                .next()
                .and_then(|level| level.parse().ok())
                .unwrap_or(7);
            if console_level < 7 {
                let rest: Vec<&str> = fields.collect();
                let _ = std::fs::write(path, format!("7 {}\n", rest.join(" ")));
                *saved = Some(levels);
            }
        }
    } else if let Some(levels) = saved.take() {
        let _ = std::fs::write(path, levels);
    }
}

/// Writes each log line as one kernel log record, `bootmesh:` first.
#[derive(Debug, Clone)]
struct KernelLogWriter {
    kernel_log: std::sync::Arc<File>,
}

impl KernelLogWriter {
    fn new(kernel_log: File) -> Self {
        Self {
            kernel_log: std::sync::Arc::new(kernel_log),
        }
    }
}

impl std::io::Write for KernelLogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // One write(2) per record; the kernel cuts records at about 1 KiB.
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let record = format!("<6>bootmesh: {}\n", line.trim_end());
            let _ = (&*self.kernel_log).write(record.as_bytes());
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'writer> tracing_subscriber::fmt::MakeWriter<'writer> for KernelLogWriter {
    type Writer = KernelLogWriter;

    fn make_writer(&'writer self) -> Self::Writer {
        self.clone()
    }
}

/// Runs the agent as PID 1 of the initramfs. Never returns.
pub fn run_as_init() -> ! {
    let mounted = system::early_mounts();
    init_console_logging();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "bootmesh agent starting"
    );
    if let Err(error) = mounted {
        tracing::error!(%error, "early mounts failed");
    }
    match system::load_modules() {
        Ok(loaded) => tracing::info!(loaded, "kernel modules loaded"),
        Err(error) => tracing::error!(%error, "kernel modules"),
    }
    let mut progress = Progress::default();
    for round in 1..=ROUNDS_MAX {
        let error = boot_round(round, &mut progress);
        tracing::error!(round, rounds = ROUNDS_MAX, %error, "boot round failed");
        if progress.root_mounted {
            // A half-switched system cannot be retried safely; start over from the firmware.
            break;
        }
        std::thread::sleep(ROUND_PAUSE);
    }
    tracing::error!("giving up; rebooting to PXE-boot again");
    system::reboot()
}

/// One attempt at the whole boot; returns only with the reason it failed.
fn boot_round(round: u32, progress: &mut Progress) -> AgentError {
    match try_boot(round, progress) {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

enum Never {}

fn try_boot(round: u32, progress: &mut Progress) -> Result<Never, AgentError> {
    let cmdline_text =
        std::fs::read_to_string("/proc/cmdline").map_err(|source| AgentError::Io {
            what: "read /proc/cmdline",
            source,
        })?;
    let cmdline = AgentCmdline::parse(&cmdline_text)?;
    tracing::info!(round, image = %cmdline.image, servers = ?cmdline.servers, "boot round");

    let interface = match progress.interface.clone() {
        Some(interface) => interface,
        None => {
            let interface = network::find_interface(cmdline.mac)?;
            tracing::info!(interface = %interface.name, mac = %boot_services::dhcp::format_mac(&interface.mac), "bringing up the network");
            network::bring_up(&interface)?;
            progress.interface = Some(interface.clone());
            interface
        }
    };
    let lease = match progress.lease.clone() {
        Some(lease) => lease,
        None => {
            let seed = u64::from_le_bytes([
                interface.mac[0],
                interface.mac[1],
                interface.mac[2],
                interface.mac[3],
                interface.mac[4],
                interface.mac[5],
                0,
                0,
            ]) ^ u64::from(std::process::id());
            let (lease, keeper) = network::acquire_lease(&interface, seed)?;
            progress.lease = Some(lease.clone());
            progress.lease_keeper = Some(keeper);
            lease
        }
    };
    let mut servers = cmdline.servers.clone();
    if servers.is_empty()
        && let Some(next_server) = lease.next_server
    {
        servers.push(SocketAddr::new(next_server.into(), 80));
    }
    if servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    // Start each round at a different server, so a server that fails mid-boot is not first
    // again.
    let rotation = (round as usize - 1) % servers.len();
    servers.rotate_left(rotation);
    let transport = HttpTransport::new(servers);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| AgentError::Io {
            what: "start the fetch runtime",
            source,
        })?;
    let mac_text = boot_services::dhcp::format_mac(&interface.mac).replace(':', "-");
    let token = if progress.token_spent {
        None
    } else {
        cmdline.token.as_deref()
    };
    let swarm_address = SocketAddr::new(lease.address.into(), 0);
    let fetched = runtime.block_on(fetch_everything(
        &transport,
        &cmdline,
        token,
        &mac_text,
        swarm_address,
    ))?;
    drop(runtime);
    let FetchedBoot {
        plan,
        manifest,
        root_memory,
        swarm_image,
        secrets,
        plan_source,
        image_sources,
    } = fetched;
    let reporter = report::Reporter::new(transport.clone(), plan_source, &mac_text);
    if token.is_some() {
        progress.token_spent = true;
        progress.secrets = secrets;
    }
    let root_mode = match cmdline.root_mode.unwrap_or(plan.root_mode) {
        RootMode::Lazy => match lazy_refusal(&manifest, &cmdline) {
            Some(reason) => {
                tracing::warn!(%reason, "lazy root refused; the root comes over NBD from the servers");
                RootMode::Nbd
            }
            None => RootMode::Lazy,
        },
        mode => mode,
    };

    // Held until dm-verity holds the loop device (autoclear would detach it otherwise).
    let mut loop_handle = None;
    // Held for the rest of the round: dropped on a failure, it stops the lazy root's server.
    let mut lazy_root = None;
    let backing = match (root_mode, root_memory) {
        (RootMode::Ram, Some(memory)) => {
            let attached = devices::attach_loop_read_only(&memory)?;
            // The loop device holds the memory now; our descriptor can go.
            drop(memory);
            loop_handle = Some(attached.handle);
            attached.device
        }
        (RootMode::Lazy, _) => {
            let attached = lazy::attach(&lazy::LazyBoot {
                manifest: &manifest,
                image_hash: cmdline.image,
                trackers: &cmdline.trackers,
                address: swarm_address,
                tie_break: tie_break_of(&mac_text),
                serve_firmware: plan.firmware_from_peers,
            })?;
            lazy_root.insert(attached).device.clone()
        }
        _ => attach_nbd(&transport, &plan, &cmdline)?,
    };
    tracing::info!(device = %backing.path.display(), mode = root_mode.as_str(), "root image attached");
    let _ = reporter.report(BootStage::Image, image_sources);
    let verity_name = format!("bootmesh-root-{round}");
    let verified = devices::create_verity_device(&verity_name, &backing, &manifest.root.verity)?;
    drop(loop_handle);
    tracing::info!(device = %verified.path.display(), "dm-verity over the root image");
    system::assemble_root(&verified.path, OVERLAY_SIZE)?;
    progress.root_mounted = true;
    let new_root = Path::new(system::NEW_ROOT);
    if std::fs::symlink_metadata(new_root.join(cmdline.init.trim_start_matches('/'))).is_err() {
        return Err(AgentError::Unbootable {
            image: manifest.reference(),
            reason: format!("no {} in the image", cmdline.init),
        });
    }

    let hostname = plan.hostname.clone().or_else(|| lease.hostname.clone());
    apply::apply_plan(new_root, &plan, hostname.as_deref())?;
    if let Some(secrets) = &progress.secrets {
        let written = apply::write_secrets(Path::new("/"), secrets)?;
        tracing::info!(
            secrets = written,
            "secrets written to /run/bootmesh/secrets"
        );
    }
    for command in &plan.preinit {
        match system::run_in_new_root(command) {
            Ok(status) if status.success() => tracing::info!(%command, "PREINIT done"),
            Ok(status) => tracing::warn!(%command, %status, "PREINIT failed; booting on"),
            Err(error) => tracing::warn!(%error, "PREINIT could not run; booting on"),
        }
    }
    record_boot(
        &cmdline,
        &manifest,
        root_mode,
        &lease,
        &interface,
        transport.source_name(plan_source),
    )?;
    tracing::info!(
        image = %manifest.reference(),
        hostname = hostname.as_deref().unwrap_or("-"),
        init = %cmdline.init,
        peak_rss_kib = peak_rss_kib().unwrap_or(0),
        "switching to the image"
    );
    let _ = reporter.report(BootStage::Root, None);
    show_agent_lines_on_console(false);
    let device_name = verity_name.clone();
    let image = manifest.reference();
    let keeper = progress.lease_keeper.take();
    // The companion serves the image it booted from to the swarm: the memory the fetch filled
    // stays mapped into it across switch_root, so a booted node shares without fetching again.
    let serving = swarm_image.map(|image| BootedSwarm {
        firmware: plan.firmware_from_peers.then(|| {
            peer_firmware::PeerFirmware::new(
                cmdline.image,
                &manifest,
                std::sync::Arc::clone(image.shelf()),
            )
        }),
        image,
        trackers: cmdline.trackers.clone(),
        address: SocketAddr::new(lease.address.into(), 0),
    });
    Err(system::switch_root(&cmdline.init, move || {
        run_companion(&device_name, &image, keeper, serving, reporter)
    })
    .into())
}

/// The agent's peak resident memory (VmHWM), for the boot report.
fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What a booted node serves to the swarm.
struct BootedSwarm {
    image: std::sync::Arc<crate::swarm::SharedImage>,
    trackers: Vec<SocketAddr>,
    address: SocketAddr,
    /// The kernel and initrd to serve to booting peers (`firmware_from_peers`).
    firmware: Option<peer_firmware::PeerFirmware>,
}

/// Serves the booted image's chunks to the swarm and announces the node to the image's
/// tracker as a complete member, until the machine stops. Reads are verified again before
/// they are sent (the memory is sealed, but a chunk is trusted only by its hash).
fn serve_booted_image(serving: BootedSwarm) {
    use std::sync::Arc;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::warn!(%error, "not serving the image: no runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let node = match crate::swarm::SwarmNode::bind(
            serving.address,
            transfer::swarm::UploadConfig::default(),
        ) {
            Ok(node) => node,
            Err(error) => {
                tracing::warn!(%error, "not serving the image to the swarm");
                return;
            }
        };
        node.offer(Arc::clone(&serving.image));
        tracing::info!(listen = ?node.local_addr(), "serving the booted image to the swarm");
        if let Some(firmware) = serving.firmware {
            tokio::spawn(peer_firmware::serve(
                firmware,
                crate::plan::PEER_FIRMWARE_PORT,
            ));
        }
        Arc::clone(&node)
            .announce(
                serving.image,
                crate::swarm::AnnounceOptions {
                    trackers: serving.trackers,
                    ..crate::swarm::AnnounceOptions::default()
                },
                |tracker| tracing::info!(%tracker, "booted node announced to the image's tracker"),
            )
            .await;
    });
}

/// The agent's companion in the booted system: keeps the DHCP lease, watches the root
/// image's integrity, and serves the image to the swarm, until the machine stops.
fn run_companion(
    device_name: &str,
    image: &str,
    keeper: Option<network::LeaseKeeper>,
    serving: Option<BootedSwarm>,
    reporter: report::Reporter,
) {
    let booted = std::thread::Builder::new()
        .name("booted".into())
        .spawn(move || reporter.report_booted_when_reached());
    if let Err(error) = booted {
        tracing::warn!(%error, "booted not reported: thread not started");
    }
    if let Some(serving) = serving {
        let server = std::thread::Builder::new()
            .name("swarm".into())
            .spawn(move || serve_booted_image(serving));
        if let Err(error) = server {
            tracing::warn!(%error, "not serving the image: thread not started");
        }
    }
    let device_name = device_name.to_owned();
    let image = image.to_owned();
    let watcher = std::thread::Builder::new()
        .name("integrity".into())
        .spawn(move || watch_root_integrity(&device_name, &image));
    if let Err(error) = &watcher {
        tracing::warn!(%error, "no integrity watcher: thread not started");
    }
    match keeper {
        Some(keeper) => {
            let error = keeper.keep();
            tracing::error!(%error, "DHCP lease no longer kept");
        }
        None => tracing::warn!("no DHCP lease to keep"),
    }
    if let Ok(watcher) = watcher {
        let _ = watcher.join();
    }
}

/// How often the watcher reads dm-verity's status.
const INTEGRITY_POLL: Duration = Duration::from_secs(1);

/// The watcher left behind in the booted system: reports, once, when dm-verity has refused a
/// block of the root image (the read failed with EIO; nothing corrupt reached a program).
fn watch_root_integrity(device_name: &str, image: &str) {
    tracing::info!(device = %device_name, pid = std::process::id(), "integrity watcher running");
    loop {
        match devices::device_status(device_name) {
            // verity's status is `V` while every block read verified, `C` once one did not.
            Ok(status) if status.trim() == "C" => {
                tracing::error!(
                    %image,
                    device = %device_name,
                    "ROOT IMAGE CORRUPTION: dm-verity refused a block of the root image; the read \
                     failed and nothing corrupt was used. The server's copy or the path to it is bad"
                );
                return;
            }
            Ok(status) => tracing::trace!(%status, "dm-verity status"),
            Err(error) => {
                tracing::warn!(%error, "integrity watcher stops: cannot read dm-verity status");
                return;
            }
        }
        std::thread::sleep(INTEGRITY_POLL);
    }
}

/// Mixes this node's rarest-first order with others': from its MAC, so a node's fetch
/// replays while nodes differ.
fn tie_break_of(mac_text: &str) -> u64 {
    u64::from_le_bytes(
        transfer::ContentHash::of(mac_text.as_bytes()).0[..8]
            .try_into()
            .unwrap_or([0; 8]),
    )
}

/// Why this boot cannot have a `lazy` root, if it cannot: its chunks come from the swarm, and
/// the whole image must fit the RAM budget (`lazy::RAM_SHARE_PERCENT`).
fn lazy_refusal(manifest: &Manifest, cmdline: &AgentCmdline) -> Option<String> {
    if cmdline.trackers.is_empty() {
        return Some("no swarm (bootmesh.trackers= is empty)".into());
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    lazy::ram_budget_refusal(lazy::image_bytes(manifest), &meminfo)
}

struct FetchedBoot {
    plan: NodePlan,
    manifest: Manifest,
    root_memory: Option<File>,
    /// The image as the swarm fetched it (every part in memory), kept for the companion to
    /// serve once the node has booted.
    swarm_image: Option<std::sync::Arc<crate::swarm::SharedImage>>,
    secrets: Option<NodeSecrets>,
    plan_source: usize,
    /// Where the root image's bytes came from (none for an NBD root).
    image_sources: Option<ImageSources>,
}

async fn fetch_everything(
    transport: &HttpTransport,
    cmdline: &AgentCmdline,
    token: Option<&str>,
    mac_text: &str,
    swarm_address: SocketAddr,
) -> Result<FetchedBoot, AgentError> {
    let (plan, plan_source): (NodePlan, usize) = transport
        .get_json(&format!("nodes/{mac_text}/plan"), "node plan")
        .await?;
    tracing::info!(
        server = %transport.source_name(plan_source),
        hostname = plan.hostname.as_deref().unwrap_or("-"),
        group = plan.group.as_deref().unwrap_or("-"),
        root = plan.root_mode.as_str(),
        "node plan"
    );
    let manifest = fetch::fetch_manifest(transport, &cmdline.image).await?;
    tracing::info!(
        image = %manifest.reference(),
        root_bytes = manifest.root.part.size_bytes,
        chunks = manifest.root.part.chunks.len(),
        "manifest verified against bootmesh.image"
    );
    let root_mode = cmdline.root_mode.unwrap_or(plan.root_mode);
    let mut swarm_image = None;
    let mut image_sources = None;
    let root_memory = match root_mode {
        RootMode::Ram => {
            let from_swarm = if cmdline.trackers.is_empty() {
                None
            } else {
                let tie_break = tie_break_of(mac_text);
                match fetch_root_from_swarm(cmdline, &manifest, swarm_address, tie_break).await {
                    Ok((memory, image, sources)) => {
                        swarm_image = Some(image);
                        image_sources = Some(sources);
                        Some(memory)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the swarm did not deliver the root image; fetching it from the servers");
                        None
                    }
                }
            };
            match from_swarm {
                Some(memory) => Some(memory),
                None => {
                    let (memory, bytes) = fetch_root_into_memory(transport, &manifest).await?;
                    image_sources = Some(ImageSources {
                        server_bytes: bytes,
                        ..ImageSources::default()
                    });
                    Some(memory)
                }
            }
        }
        // A lazy root's server fetches it after the fork (`lazy::attach`).
        RootMode::Nbd | RootMode::Lazy => None,
    };
    // Secrets last: the single-use token is spent only once the boot is otherwise ready.
    let secrets = match token {
        Some(token) => {
            let path = format!("nodes/{mac_text}/secrets?token={token}");
            match transport.get_json::<NodeSecrets>(&path, "secrets").await {
                Ok((secrets, _)) => Some(secrets),
                Err(error) => {
                    tracing::warn!(%error, "no secrets for this boot");
                    None
                }
            }
        }
        None => None,
    };
    Ok(FetchedBoot {
        plan,
        manifest,
        root_memory,
        swarm_image,
        secrets,
        plan_source,
        image_sources,
    })
}

/// The root image from the swarm into sealed memory: the node announces itself to the image's
/// tracker (chosen among `bootmesh.trackers`), fetches every chunk of the image from the peers
/// it is told of (servers, and nodes booting at the same time, which it serves in turn while
/// it fetches), each verified before it is written, and seals the root. The kernel's and
/// initrd's chunks come along in memory, so that this node can serve whole images to others;
/// they are freed when the fetch ends.
async fn fetch_root_from_swarm(
    cmdline: &AgentCmdline,
    manifest: &Manifest,
    address: SocketAddr,
    tie_break: u64,
) -> Result<
    (
        File,
        std::sync::Arc<crate::swarm::SharedImage>,
        ImageSources,
    ),
    AgentError,
> {
    use std::sync::Arc;

    use crate::swarm::{
        AnnounceOptions, AssembledShelf, SharedImage, SwarmError, SwarmFetchConfig, SwarmNode,
    };

    let (shelf, root) = AssembledShelf::in_memory(manifest)?;
    let root = root.ok_or_else(|| SwarmError::Shelf("the manifest has no root part".into()))?;
    let image =
        transfer::swarm::SwarmImage::new(cmdline.image, manifest, &[]).map_err(SwarmError::from)?;
    let total = image.chunk_count();
    let shared = SharedImage::new(image, Arc::new(shelf));
    let node = SwarmNode::bind(address, transfer::swarm::UploadConfig::default())?;
    node.offer(Arc::clone(&shared));
    tracing::info!(listen = ?node.local_addr(), chunks = total, "root image from the swarm");
    let announcer = tokio::spawn(Arc::clone(&node).announce(
        Arc::clone(&shared),
        AnnounceOptions {
            trackers: cmdline.trackers.clone(),
            ..AnnounceOptions::default()
        },
        |tracker| tracing::info!(%tracker, "announced to the image's tracker"),
    ));
    let progress = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut next_report = 25u32;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let percent = shared.held().count() * 100 / total.max(1);
                if percent >= next_report && percent < 100 {
                    tracing::info!(percent, "root image (swarm)");
                    next_report = (percent / 25 + 1) * 25;
                }
            }
        })
    };
    let started = Instant::now();
    let fetched = node
        .fetch(
            Arc::clone(&shared),
            &[],
            SwarmFetchConfig {
                tie_break,
                ..SwarmFetchConfig::default()
            },
        )
        .await;
    progress.abort();
    announcer.abort();
    let uploaded = node
        .stats()
        .bytes_uploaded
        .load(std::sync::atomic::Ordering::Relaxed);
    node.shut_down_and_wait().await;
    let report = fetched?;
    let from_servers: u64 = report
        .sources
        .iter()
        .filter(|(source, _)| {
            cmdline
                .trackers
                .iter()
                .any(|tracker| tracker.ip() == source.ip())
        })
        .map(|(_, source)| source.bytes)
        .sum();
    let seconds = started.elapsed().as_secs_f64().max(0.001);
    let sources: Vec<String> = report
        .sources
        .iter()
        .map(|(source, taken)| format!("{}={}", source.ip(), taken.bytes))
        .collect();
    tracing::info!(
        chunks = report.chunks,
        bytes = report.bytes,
        peers = report.sources.len(),
        sources = sources.join(","),
        from_servers,
        from_nodes = report.bytes - from_servers,
        uploaded,
        mib_per_second = format!("{:.1}", report.bytes as f64 / 1_048_576.0 / seconds),
        "root image in memory from the swarm, every chunk verified"
    );
    seal_root(&root)?;
    // Servers are the trackers' hosts; every other source is a node that was booting or
    // booted at the same time.
    let mut peers: Vec<String> = report
        .sources
        .iter()
        .filter(|(source, _)| {
            !cmdline
                .trackers
                .iter()
                .any(|tracker| tracker.ip() == source.ip())
        })
        .map(|(source, _)| source.to_string())
        .collect();
    peers.truncate(PEERS_REPORTED_MAX);
    let sources = ImageSources {
        server_bytes: from_servers,
        peer_bytes: report.bytes - from_servers,
        peers,
    };
    Ok((root, shared, sources))
}

/// Seals the root image's memory: nothing, not even this process, can change it under the
/// verity tree.
fn seal_root(memory: &File) -> Result<(), AgentError> {
    use rustix::fs::SealFlags;
    rustix::fs::fcntl_add_seals(
        memory,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )
    .map_err(|error| AgentError::Io {
        what: "seal the root image",
        source: error.into(),
    })
}

async fn fetch_root_into_memory(
    transport: &HttpTransport,
    manifest: &Manifest,
) -> Result<(File, u64), AgentError> {
    use rustix::fs::MemfdFlags;
    let part = &manifest.root.part;
    let memory = rustix::fs::memfd_create(
        "bootmesh-root",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|error| AgentError::Io {
        what: "memfd_create",
        source: error.into(),
    })?;
    let memory = File::from(memory);
    memory
        .set_len(part.size_bytes)
        .map_err(|source| AgentError::Io {
            what: "size the root image in memory",
            source,
        })?;
    let started = Instant::now();
    let total = part.size_bytes.max(1);
    let mut next_report = 25u64;
    let summary = fetch::fetch_part_into(transport, part, &memory, |summary| {
        let percent = summary.bytes * 100 / total;
        if percent >= next_report {
            tracing::info!(percent, bytes = summary.bytes, "root image");
            next_report = (percent / 25 + 1) * 25;
        }
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64().max(0.001);
    tracing::info!(
        chunks = summary.chunks,
        bytes = summary.bytes,
        rejected = summary.chunks_rejected,
        retried = summary.requests_failed,
        mib_per_second = format!("{:.1}", summary.bytes as f64 / 1_048_576.0 / seconds),
        "root image in memory, every chunk verified"
    );
    seal_root(&memory)?;
    Ok((memory, summary.bytes))
}

fn attach_nbd(
    transport: &HttpTransport,
    plan: &NodePlan,
    cmdline: &AgentCmdline,
) -> Result<devices::BlockDevice, AgentError> {
    let port = plan.nbd_port.unwrap_or(10809);
    let export_name = cmdline.image.to_hex();
    let mut last = None;
    for server in transport.servers() {
        let address = SocketAddr::new(server.ip(), port);
        match nbd::negotiate(address, &export_name).and_then(|export| {
            let device = nbd::attach(&export, Some(NBD_TIMEOUT_SECS))?;
            Ok((device, export.size_bytes))
        }) {
            Ok((device, size_bytes)) => {
                tracing::info!(server = %address, size_bytes, device = %device.path.display(), "nbd root attached");
                return Ok(device);
            }
            Err(error) => {
                tracing::warn!(server = %address, %error, "nbd: trying the next server");
                last = Some(error);
            }
        }
    }
    Err(match last {
        Some(error) => error.into(),
        None => AgentError::NoServers,
    })
}

/// What the booted system (and its agent) needs to know about this boot.
#[derive(Debug, serde::Serialize)]
struct BootRecord<'a> {
    image: String,
    reference: String,
    root_mode: &'static str,
    interface: &'a str,
    address: String,
    server: String,
    servers: Vec<String>,
}

fn record_boot(
    cmdline: &AgentCmdline,
    manifest: &Manifest,
    root_mode: RootMode,
    lease: &DhcpLease,
    interface: &Interface,
    server: String,
) -> Result<(), AgentError> {
    let record = BootRecord {
        image: cmdline.image.to_hex(),
        reference: manifest.reference(),
        root_mode: root_mode.as_str(),
        interface: &interface.name,
        address: format!("{}/{}", lease.address, lease.prefix_length),
        server,
        servers: cmdline.servers.iter().map(ToString::to_string).collect(),
    };
    let json = serde_json::to_string_pretty(&record).unwrap_or_default();
    std::fs::create_dir_all(system::AGENT_RUN_DIR)
        .and_then(|()| std::fs::write(Path::new(system::AGENT_RUN_DIR).join("boot.json"), json))
        .map_err(|source| AgentError::Io {
            what: "write /run/bootmesh/boot.json",
            source,
        })
}
