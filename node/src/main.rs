//! The `bootmesh` command line.

mod demo;
mod image_cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use node::config::ServerConfig;

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
        #[arg(long, global = true, default_value = image_cli::STATE_DIR_DEFAULT)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: image_cli::ImageCommand,
    },
    /// List the leases recorded in a server's state directory.
    Leases {
        /// The server's `state_dir`.
        #[arg(long)]
        state_dir: PathBuf,
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

fn main() -> anyhow::Result<()> {
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
        Command::Leases { state_dir } => print_leases(&state_dir),
        Command::Image { state_dir, command } => image_cli::run(&state_dir, command),
        Command::Demo => demo::run_demo(),
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
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn print_leases(state_dir: &std::path::Path) -> anyhow::Result<()> {
    use boot_services::dhcp::{DhcpConfig, DhcpServer};
    let mut server = DhcpServer::new(DhcpConfig::default()).context("empty lease table")?;
    for change in node::journal::read_journal(state_dir)? {
        server.restore(&change);
    }
    let mut output = String::from("ADDRESS          HARDWARE           EXPIRES(UNIX)  HOSTNAME\n");
    for (address, binding) in server.lease_table().bindings() {
        let hardware = binding
            .hardware_address
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        output.push_str(&format!(
            "{:<16} {:<18} {:<14} {}\n",
            address.to_string(),
            hardware,
            binding.expires_at_unix_secs,
            binding.hostname.as_deref().unwrap_or("-")
        ));
    }
    use std::io::Write;
    std::io::stdout().write_all(output.as_bytes())?;
    Ok(())
}
