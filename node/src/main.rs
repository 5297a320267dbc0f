//! The `bootmesh` command line.

mod demo;
mod image_cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use node::config::ServerConfig;

/// glibc's malloc cost a cluster server under a DHCP storm about an eighth of its CPU
/// (fastbin consolidation and free-list unlinking beside every datagram, reply and Raft entry
/// allocated and freed across the runtime's threads); mimalloc's thread-local free lists take
/// that out.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Network boot for bare-metal fleets from a self-healing mesh of boot servers.
#[derive(Debug, Parser)]
#[command(name = "bootmesh", version, about, long_about = None)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve DHCP, TFTP, HTTP and NBD as the configuration file says, until SIGTERM or SIGINT.
    Serve {
        /// The server's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit: prints the first problem with its line or key.
    CheckConfig {
        /// The server's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Watch a node's boot path served in a throwaway network-namespace lab (needs root).
    Demo,
    /// Manage the images in a server's store.
    Image {
        /// The server's `state_dir` (the store is its `images/`).
        #[arg(long, global = true, env = "BOOTMESH_STATE_DIR", default_value = image_cli::STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: image_cli::ImageCommand,
    },
    /// Build the bootmesh initramfs (what `image import --agent` puts in an image).
    Initramfs {
        #[command(subcommand)]
        command: InitramfsCommand,
    },
    /// The node agent: `/init` of the bootmesh initramfs (it starts by itself as PID 1).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Found, join, inspect and change the cluster of boot servers.
    Cluster {
        /// The server's `state_dir` (its cluster identity is in `cluster/`).
        #[arg(
            long,
            global = true,
            env = "BOOTMESH_STATE_DIR",
            default_value = "/var/lib/bootmesh"
        )]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: node::cluster_cli::ClusterCommand,
    },
    /// The fleet configuration the cluster holds: apply, show, diff.
    Config {
        /// The server's `state_dir`.
        #[arg(
            long,
            global = true,
            env = "BOOTMESH_STATE_DIR",
            default_value = "/var/lib/bootmesh"
        )]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: node::cluster_cli::ConfigCommand,
    },
    /// The leases the cluster holds.
    Lease {
        /// The server's `state_dir`.
        #[arg(
            long,
            global = true,
            env = "BOOTMESH_STATE_DIR",
            default_value = "/var/lib/bootmesh"
        )]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: node::cluster_cli::LeaseCommand,
    },
    /// One-time join tokens for new servers.
    Token {
        /// The server's `state_dir`.
        #[arg(
            long,
            global = true,
            env = "BOOTMESH_STATE_DIR",
            default_value = "/var/lib/bootmesh"
        )]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: node::cluster_cli::TokenCommand,
    },
    /// Rehearse a boot storm in the simulator (runs `bootmesh-sim`, installed beside this
    /// binary): `bootmesh sim --scenario FILE [--seed N] [--baseline] [--svg FILE]`,
    /// `bootmesh sim soak ...`; `bootmesh sim --help` says more.
    #[command(disable_help_flag = true)]
    Sim {
        /// Everything after `sim`, passed on as it is.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        arguments: Vec<std::ffi::OsString>,
    },
    /// Print a shell completion script: `bootmesh completions bash > /etc/bash_completion.d/bootmesh`
    /// (zsh: into a directory of `$fpath` as `_bootmesh`; fish: `~/.config/fish/completions/`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Every node's latest boot, as the servers saw it: DHCP, kernel (iPXE fetched its boot
    /// script), plan, image (in memory or attached), root (assembled), booted
    /// (multi-user.target reached), with each stage's time after the boot's first DHCP ACK and
    /// the peers the image came from. Any server answers for the whole cluster.
    ///
    /// Example: `bootmesh nodes --server 10.0.0.1:80`, `bootmesh nodes --server boot1:80 --json`,
    /// the nodes of rack r7 that got an address and no further:
    /// `bootmesh nodes --server boot1:80 --rack r7 --stage dhcp`
    Nodes {
        /// A boot server's HTTP listener, HOST:PORT.
        #[arg(long)]
        server: String,
        /// Only nodes whose latest boot got this far and no further: dhcp, kernel, plan, image,
        /// root or booted.
        #[arg(long, value_parser = node::nodes_cli::parse_stage)]
        stage: Option<node::timeline::BootStage>,
        /// Only nodes in this rack (the rack of the subnet that holds the node's address).
        #[arg(long)]
        rack: Option<String>,
        /// Only nodes whose latest boot boots this catalog image, `name:tag`.
        #[arg(long)]
        image: Option<String>,
        /// Print the servers' answer as JSON (`servers`: who was asked and who did not answer;
        /// `nodes`: one timeline per node) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The whole installation on one screen, from any server: its health, the cluster (term,
    /// leader, members by rack, clock offset), what each group was promoted to and whether
    /// that server boots it yet, and the fleet's boots by stage, rack and image.
    ///
    /// Needs only the server's HTTP listener (no state directory or certificate).
    /// Example: `bootmesh status --server boot1:8080`, `bootmesh status --server boot1:8080 --json`
    Status {
        /// A boot server's HTTP listener, HOST:PORT.
        #[arg(long)]
        server: String,
        /// JSON for scripts (`cluster`: the server's view; `fleet`: the sums) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the leases recorded in a server's state directory.
    Leases {
        /// The server's `state_dir`.
        #[arg(long)]
        state_dir: PathBuf,
        /// JSON for scripts (`expires_at_unix_secs` is the lease's end), instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum InitramfsCommand {
    /// Writes a gzip-compressed newc archive: the static agent as /init and the kernel modules
    /// (with their dependencies) from an image's file tree.
    Build {
        /// The static bootmesh binary.
        #[arg(long)]
        agent: PathBuf,
        /// The image's root directory (modules come from its `lib/modules/<version>`).
        #[arg(long)]
        root: PathBuf,
        /// Kernel version; needed only when the root has more than one.
        #[arg(long)]
        kernel_version: Option<String>,
        /// A module to add (a NIC driver, say); repeatable.
        #[arg(long = "module")]
        modules: Vec<String>,
        /// Where to write the archive.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Parses a kernel command line as the agent would and prints what it would boot; touches
    /// nothing (it also proves the static binary runs where no shared library exists).
    Explain {
        /// The command line (default: this machine's /proc/cmdline).
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// Fetches an image from the swarm into a chunk store while serving what it holds to other
    /// peers, then keeps serving until SIGTERM or SIGINT. Its peers are the ones given with
    /// --peer and the neighbours the image's tracker names (--tracker: the servers' swarm
    /// endpoints; the tracker is chosen among them by the image). Prints `listening`,
    /// `tracker ADDR`, `progress HELD TOTAL`, `complete ...` and `uploaded BYTES` lines.
    ///
    /// Example: `bootmesh agent swarm --manifest 3f2a... --server 10.0.0.1:8080
    /// --store /var/lib/bootmesh-agent --listen 0.0.0.0:7800 --tracker 10.0.0.1:7800
    /// --tracker 10.0.0.2:7800`
    Swarm {
        /// The image's manifest hash (what `bootmesh image show` prints).
        #[arg(long)]
        manifest: String,
        /// A boot server's HTTP address (ip:port) to ask for the manifest when the store lacks
        /// it; repeatable.
        #[arg(long = "server")]
        servers: Vec<std::net::SocketAddr>,
        /// Keep the image in a chunk store at this directory (created if missing).
        #[arg(
            long,
            required_unless_present = "assemble",
            conflicts_with = "assemble"
        )]
        store: Option<PathBuf>,
        /// Keep the image assembled as files `kernel`, `initrd` and `root` in this directory
        /// (what a node boots from), instead of in a chunk store.
        #[arg(long)]
        assemble: Option<PathBuf>,
        /// This member's chunk endpoint (UDP ip:port; port 0 picks one).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// A peer's chunk endpoint (a server's `[swarm]` address or another member); repeatable.
        #[arg(long = "peer", required_unless_present = "trackers")]
        peers: Vec<std::net::SocketAddr>,
        /// A server's swarm endpoint that may track the image; repeatable, the same list for
        /// every member of the image. The member announces itself there and peers with the
        /// neighbours it is told of.
        #[arg(long = "tracker")]
        trackers: Vec<std::net::SocketAddr>,
        /// The rack this member is in, if the servers' subnets do not say (1-64 of a-z A-Z
        /// 0-9 . _ -).
        #[arg(long)]
        rack: Option<String>,
        /// The most this member uploads, in MiB/s (default: no limit).
        #[arg(long)]
        upload_mib_per_second: Option<u64>,
        /// Exit once the image is complete instead of serving it on (benchmarks, scripts).
        #[arg(long)]
        exit_when_complete: bool,
    },
    /// Brings up the NIC with `mac` and configures it from DHCP as the agent does at boot, then
    /// prints the lease (for testing the agent's network path outside a VM; needs root).
    Network {
        /// The NIC's MAC address (default: the first Ethernet NIC).
        #[arg(long)]
        mac: Option<String>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOOTMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Replaces this process with `bootmesh-sim` from this binary's directory, or else from PATH.
/// The simulator links the whole server (it runs the same wiring), so it cannot be a module of
/// the binary it simulates without `node` depending on itself.
fn run_simulator(arguments: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    const SIMULATOR: &str = "bootmesh-sim";
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|directory| directory.join(SIMULATOR)))
        .filter(|candidate| candidate.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(SIMULATOR));
    let error = std::process::Command::new(&program).args(arguments).exec();
    Err(error).with_context(|| {
        format!(
            "running {} (build it with `cargo build --release -p sim --bin bootmesh-sim`, or \
             install it beside bootmesh)",
            program.display()
        )
    })
}

fn main() -> anyhow::Result<()> {
    // As the initramfs's /init the kernel passes its own arguments; PID 1 is the agent, always.
    if std::process::id() == 1 {
        node::agent::run_as_init();
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve { config } => {
            let config = ServerConfig::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                node::daemon::serve(config, termination())
                    .await
                    .context("serve")
            })
        }
        Command::CheckConfig { config } => {
            ServerConfig::load(&config)?;
            eprintln!("{}: ok", config.display());
            Ok(())
        }
        Command::Leases { state_dir, json } => print_leases(&state_dir, json),
        Command::Status { server, json } => print_status(&server, json),
        Command::Nodes {
            server,
            stage,
            rack,
            image,
            json,
        } => print_nodes(
            &server,
            &node::nodes_cli::NodesFilter { stage, rack, image },
            json,
        ),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "bootmesh", &mut std::io::stdout());
            Ok(())
        }
        Command::Cluster { state_dir, command } => {
            node::cluster_cli::run_cluster(&state_dir, command)
        }
        Command::Token { state_dir, command } => node::cluster_cli::run_token(&state_dir, command),
        Command::Lease { state_dir, command } => node::cluster_cli::run_lease(&state_dir, command),
        Command::Config { state_dir, command } => {
            node::cluster_cli::run_config(&state_dir, command)
        }
        Command::Image { state_dir, command } => image_cli::run(&state_dir, command),
        Command::Demo => demo::run_demo(),
        Command::Sim { arguments } => run_simulator(&arguments),
        Command::Initramfs {
            command:
                InitramfsCommand::Build {
                    agent,
                    root,
                    kernel_version,
                    modules,
                    output,
                },
        } => build_initramfs(agent, &root, kernel_version, modules, &output),
        Command::Agent { command } => match command {
            AgentCommand::Explain { cmdline } => explain_cmdline(cmdline),
            AgentCommand::Network { mac } => {
                let mac = mac
                    .map(|text| node::config::parse_mac(&text))
                    .transpose()
                    .map_err(|error| anyhow::anyhow!("--mac: {error}"))?;
                let interface = node::agent::network::find_interface(mac)?;
                node::agent::network::bring_up(&interface)?;
                let (lease, _keeper) =
                    node::agent::network::acquire_lease(&interface, u64::from(std::process::id()))?;
                let report = format!(
                    "interface {}\naddress {}/{}\nrouters {:?}\nserver {}\nhostname {}\n",
                    interface.name,
                    lease.address,
                    lease.prefix_length,
                    lease.routers,
                    lease.server_identifier,
                    lease.hostname.as_deref().unwrap_or("-")
                );
                use std::io::Write;
                std::io::stdout().write_all(report.as_bytes())?;
                Ok(())
            }
            AgentCommand::Swarm {
                manifest,
                servers,
                store,
                assemble,
                listen,
                peers,
                trackers,
                rack,
                upload_mib_per_second,
                exit_when_complete,
            } => {
                if let Some(rack) = &rack
                    && !node::config::is_rack_name(rack)
                {
                    anyhow::bail!("--rack {rack:?}: must be 1-64 of a-z A-Z 0-9 . _ -");
                }
                let manifest: transfer::ContentHash = manifest
                    .parse()
                    .map_err(|error| anyhow::anyhow!("--manifest: {error}"))?;
                if upload_mib_per_second == Some(0) {
                    anyhow::bail!(
                        "--upload-mib-per-second 0 would upload nothing; leave it out for no limit"
                    );
                }
                let options = node::swarm::member::MemberOptions {
                    manifest,
                    servers,
                    keep: match (store, assemble) {
                        (Some(store), _) => node::swarm::member::Keep::Store(store),
                        (None, Some(directory)) => node::swarm::member::Keep::Assembled(directory),
                        (None, None) => anyhow::bail!("--store or --assemble is required"),
                    },
                    listen,
                    peers,
                    announce: node::swarm::AnnounceOptions {
                        trackers,
                        rack,
                        ..node::swarm::AnnounceOptions::default()
                    },
                    upload_bytes_per_second: upload_mib_per_second
                        .map(|mib| mib.saturating_mul(1024 * 1024)),
                    tie_break: u64::from(std::process::id()),
                };
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let stop = async move {
                        if !exit_when_complete {
                            termination().await;
                        }
                    };
                    node::swarm::member::run_member(options, stop)
                        .await
                        .context("swarm")
                })?;
                Ok(())
            }
        },
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
                return;
            }
        };
    tokio::select! {
        biased;
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn print_leases(state_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use boot_services::dhcp::{DhcpConfig, DhcpServer};
    let mut server = DhcpServer::new(DhcpConfig::default()).context("empty lease table")?;
    for change in node::journal::read_journal(state_dir)? {
        server.restore(&change);
    }
    let hex = |bytes: &[u8], separator: &str| {
        bytes
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(separator)
    };
    let leases: Vec<node::cluster::admin::LeaseView> = server
        .lease_table()
        .bindings()
        .map(|(address, binding)| node::cluster::admin::LeaseView {
            address,
            hardware_address: hex(&binding.hardware_address, ":"),
            client: hex(&binding.client.0, ""),
            expires_at_unix_secs: binding.expires_at_unix_secs,
            hostname: binding.hostname.clone(),
        })
        .collect();
    let output = if json {
        format!("{}\n", serde_json::to_string_pretty(&leases)?)
    } else {
        node::cluster_cli::render_lease_table(&leases, node::cluster_cli::unix_now_secs())
    };
    use std::io::Write;
    std::io::stdout().write_all(output.as_bytes())?;
    Ok(())
}

fn server_address(server: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    server
        .to_socket_addrs()
        .with_context(|| format!("--server {server}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("--server {server}: the name has no address"))
}

fn print_status(server: &str, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let address = server_address(server)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(node::status_cli::fetch_status(address))?;
    let output = if json {
        let mut text = serde_json::to_string_pretty(&status)?;
        text.push('\n');
        text
    } else {
        node::status_cli::render(&status)
    };
    std::io::stdout().write_all(output.as_bytes())?;
    Ok(())
}

fn print_nodes(
    server: &str,
    filter: &node::nodes_cli::NodesFilter,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let address = server_address(server)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let view = runtime.block_on(node::nodes_cli::fetch_nodes(address, filter))?;
    let output = if json {
        let mut text = serde_json::to_string_pretty(&view)?;
        text.push('\n');
        text
    } else {
        node::nodes_cli::render_table(&view)
    };
    std::io::stdout().write_all(output.as_bytes())?;
    Ok(())
}

fn explain_cmdline(cmdline: Option<String>) -> anyhow::Result<()> {
    let text = match cmdline {
        Some(text) => text,
        None => std::fs::read_to_string("/proc/cmdline").context("read /proc/cmdline")?,
    };
    let parsed = node::agent::cmdline::AgentCmdline::parse(&text)?;
    let mut output = format!("image   {}\n", parsed.image);
    let servers: Vec<String> = parsed.servers.iter().map(ToString::to_string).collect();
    output.push_str(&format!("servers {}\n", servers.join(" ")));
    if let Some(mac) = parsed.mac {
        output.push_str(&format!(
            "mac     {}\n",
            boot_services::dhcp::format_mac(&mac)
        ));
    }
    if let Some(group) = &parsed.group {
        output.push_str(&format!("group   {group}\n"));
    }
    if let Some(mode) = parsed.root_mode {
        output.push_str(&format!("root    {}\n", mode.as_str()));
    }
    output.push_str(&format!("init    {}\n", parsed.init));
    output.push_str(&format!(
        "token   {}\n",
        if parsed.token.is_some() {
            "present"
        } else {
            "none"
        }
    ));
    use std::io::Write;
    std::io::stdout().write_all(output.as_bytes())?;
    Ok(())
}

fn build_initramfs(
    agent: PathBuf,
    root: &std::path::Path,
    kernel_version: Option<String>,
    extra_modules: Vec<String>,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    use node::initramfs_builder::{InitramfsSpec, build_initramfs, kernel_versions};
    let versions = kernel_versions(root);
    let (version, directory) = match kernel_version {
        Some(wanted) => versions
            .into_iter()
            .find(|(version, _)| *version == wanted)
            .with_context(|| format!("no modules for kernel {wanted} under {}", root.display()))?,
        None => match versions.as_slice() {
            [only] => only.clone(),
            [] => anyhow::bail!("no kernel modules under {}", root.display()),
            _ => anyhow::bail!(
                "{} has modules for several kernels; pick one with --kernel-version",
                root.display()
            ),
        },
    };
    let built = build_initramfs(&InitramfsSpec {
        agent,
        modules_directory: directory,
        kernel_version: version.clone(),
        extra_modules,
    })?;
    std::fs::write(output, &built.bytes).with_context(|| format!("write {}", output.display()))?;
    let mut report = format!(
        "{}: bootmesh initramfs for kernel {version}, {} bytes\n  modules ({}):\n",
        output.display(),
        built.bytes.len(),
        built.modules.len()
    );
    for module in &built.modules {
        report.push_str(&format!("    {module}\n"));
    }
    if !built.modules_absent.is_empty() {
        report.push_str(&format!(
            "  NIC drivers this kernel lacks: {}\n",
            built.modules_absent.join(" ")
        ));
    }
    use std::io::Write;
    std::io::stdout().write_all(report.as_bytes())?;
    Ok(())
}
