//! `bootmesh cluster ...` and `bootmesh token ...`: found or join a cluster, look at it, remove
//! a member, create join tokens. Requests go over the admin protocol to a member (by default
//! the server whose state directory is given), as that server.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;

use crate::cluster::admin::{
    AdminReply, AdminRequest, ClusterStatus, JoinSpec, LeaseView, admin_call, join,
};
use crate::cluster::files::{ClusterFiles, IdentityRecord};
use crate::cluster::pki::{ClusterCa, ServerKey};

/// `bootmesh cluster`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Founds a cluster: creates its CA and this server's identity (id 1). `bootmesh serve`
    /// with a `[cluster]` section then starts it as the only voter.
    Init {
        /// This server's cluster address: its own IP and a UDP port.
        #[arg(long)]
        address: SocketAddr,
        /// This server's rack.
        #[arg(long, default_value = "default")]
        rack: String,
        /// The cluster's name.
        #[arg(long, default_value = "bootmesh")]
        name: String,
    },
    /// Joins a cluster with a token from `bootmesh token create`: the server at `--server` is
    /// trusted only if it shows the CA pinned in the token.
    Join {
        /// The token.
        #[arg(long)]
        token: String,
        /// Any member's cluster address: `IP:PORT`, or `NAME:PORT` (resolved once, here; a
        /// StatefulSet's first pod, say).
        #[arg(long, value_parser = resolve_address)]
        server: SocketAddr,
        /// This server's cluster address: its own IP and a UDP port.
        #[arg(long)]
        address: SocketAddr,
        /// This server's rack.
        #[arg(long, default_value = "default")]
        rack: String,
    },
    /// Shows a member's view: role, term, leader, log position, members.
    Status {
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Lists the members.
    Members {
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Removes a member (its certificate stops being accepted).
    Remove {
        /// The member's id.
        server_id: u64,
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
    },
}

/// `bootmesh lease`.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Lists the leases the cluster holds.
    List {
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Ends a lease now (the address can go to another client once nobody holds it).
    Release {
        /// The leased address.
        address: std::net::Ipv4Addr,
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
    },
}

/// `bootmesh config`: the fleet configuration the cluster holds (`[[dhcp.subnet]]`,
/// `[[dhcp.host]]`, `[dhcp.boot]`, `[boot]`, `[[group]]`).
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Checks `file` and makes it the fleet configuration of every server.
    Apply {
        /// The fleet configuration (TOML).
        file: std::path::PathBuf,
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
    },
    /// Prints the fleet configuration (its version on standard error).
    Show {
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
    },
    /// Converts an LTSP site's ISC dhcpd.conf and lts.conf into a fleet configuration.
    ///
    /// Subnets, ranges, routers, DNS servers, domain name, lease time and host blocks
    /// (hardware ethernet, fixed-address, host-name) come from dhcpd.conf; lts.conf's
    /// [default] becomes a group, MAC sections become hosts (or groups of their own when they
    /// switch some of [default]'s entries off), PREINIT_*, FSTAB_*, RCFILE_* and
    /// KEEP_SYSTEM_SERVICES become the group's lists, LTSP_NBD_TO_RAM its root mode, and every
    /// other variable is kept for the node's /etc/lts.conf. Each line that is not converted or
    /// that behaves differently is printed on standard error with its line number and the
    /// reason, and listed at the end of the result. Read those before `config apply`.
    ImportLtsp {
        /// The ISC DHCP server's configuration.
        #[arg(long, value_name = "FILE")]
        dhcpd_conf: Option<std::path::PathBuf>,
        /// LTSP's lts.conf.
        #[arg(long, value_name = "FILE")]
        lts_conf: Option<std::path::PathBuf>,
        /// Where to write the fleet configuration (standard output if not given).
        #[arg(long, short, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// The group lts.conf's [default] becomes (the group of nodes no host entry names).
        #[arg(long, default_value = "ltsp")]
        group: String,
        /// Serve dhcpd.conf's `filename`s and honour its `next-server`, instead of chaining
        /// nodes into bootmesh's iPXE and boot script.
        #[arg(long)]
        keep_boot_files: bool,
        /// Fail (exit status 3, nothing written) when any line is not converted.
        #[arg(long)]
        strict: bool,
    },
    /// Shows what applying `file` would change, as a unified diff.
    Diff {
        /// The fleet configuration (TOML).
        file: std::path::PathBuf,
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
    },
}

/// `bootmesh token`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a one-time join token.
    Create {
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// Ask this member instead of the local server.
        #[arg(long)]
        server: Option<SocketAddr>,
    },
}

/// `IP:PORT` as it is, or the first address `NAME:PORT` resolves to.
fn resolve_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|error| format!("{text}: {error}"))?
        .next()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A member's view of the cluster (the local server's unless `server` is given).
fn status(state_dir: &Path, server: Option<SocketAddr>) -> anyhow::Result<ClusterStatus> {
    match runtime()?.block_on(admin_call(state_dir, server, &AdminRequest::Status))? {
        AdminReply::Status(status) => Ok(status),
        AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

/// The table `cluster members` prints.
pub fn members_table(status: &ClusterStatus) -> String {
    let mut table = String::from("ID    ROLE     ADDRESS                 RACK        MATCHED\n");
    for member in &status.members {
        let role = if status.leader == Some(member.server_id) {
            "leader"
        } else if member.voter {
            "voter"
        } else {
            "learner"
        };
        table.push_str(&format!(
            "{:<5} {:<8} {:<23} {:<11} {}\n",
            member.server_id,
            role,
            member.address,
            member.rack.as_deref().unwrap_or("-"),
            member
                .matched
                .map_or_else(|| "-".to_owned(), |index| index.to_string())
        ));
    }
    table
}

/// Runs a `cluster` command for the server whose state is in `state_dir`.
pub fn run_cluster(state_dir: &Path, command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Init {
            address,
            rack,
            name,
        } => {
            let ca = ClusterCa::generate(&name)?;
            let key = ServerKey::generate()?;
            let certificate = ca.issue_server_certificate(1, &key.subject_public_key_info_der())?;
            let record = IdentityRecord {
                server_id: 1,
                cluster_name: name.clone(),
                address,
                rack,
                bootstrap: true,
            };
            ClusterFiles::new(state_dir).write_new(&record, &ca, &key, &certificate)?;
            print(&format!(
                "cluster {name} founded: this server is member 1 at {address}\nCA fingerprint {}\nstart it with `bootmesh serve` and a [cluster] section, then `bootmesh token create`\n",
                ca.fingerprint().to_hex()
            ))
        }
        ClusterCommand::Join {
            token,
            server,
            address,
            rack,
        } => {
            let record = runtime()?.block_on(join(
                state_dir,
                &JoinSpec {
                    token,
                    server,
                    address,
                    rack,
                },
            ))?;
            print(&format!(
                "joined cluster {} as member {} at {}; start it with `bootmesh serve`\n",
                record.cluster_name, record.server_id, record.address
            ))
        }
        ClusterCommand::Status { server, json } => {
            let status = status(state_dir, server)?;
            if json {
                return print(&format!("{}\n", serde_json::to_string_pretty(&status)?));
            }
            let clock = status
                .clock_offset_to_leader_ms
                .map(|offset| {
                    let bound = consensus::state::DRIFT_BOUND_MS;
                    format!(
                        "clock   the leader's is {:+.3} s from this member's{}\n",
                        offset as f64 / 1000.0,
                        if offset.unsigned_abs() > bound {
                            format!(
                                " (BEYOND the {} s drift bound: fix the time service)",
                                bound / 1000
                            )
                        } else {
                            String::new()
                        }
                    )
                })
                .unwrap_or_default();
            let mut text = format!(
                "cluster {}\nmember  {} ({})\nterm    {}\nleader  {}\nlog     last {} applied {}\n{clock}\n",
                status.cluster_name,
                status.server_id,
                status.role,
                status.term,
                status
                    .leader
                    .map_or_else(|| "none".to_owned(), |leader| leader.to_string()),
                status
                    .last_log_index
                    .map_or_else(|| "-".to_owned(), |index| index.to_string()),
                status
                    .last_applied
                    .map_or_else(|| "-".to_owned(), |index| index.to_string()),
            );
            text.push_str(&members_table(&status));
            print(&text)
        }
        ClusterCommand::Members { server, json } => {
            let status = status(state_dir, server)?;
            if json {
                return print(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&status.members)?
                ));
            }
            print(&members_table(&status))
        }
        ClusterCommand::Remove { server_id, server } => {
            match runtime()?.block_on(admin_call(
                state_dir,
                server,
                &AdminRequest::RemoveMember { server_id },
            ))? {
                AdminReply::Removed { server_id } => {
                    print(&format!("member {server_id} removed\n"))
                }
                AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
    }
}

/// Runs a `token` command.
pub fn run_token(state_dir: &Path, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { ttl_secs, server } => {
            let reply = runtime()?
                .block_on(admin_call(
                    state_dir,
                    server,
                    &AdminRequest::CreateToken { ttl_secs },
                ))
                .context("create a join token")?;
            match reply {
                AdminReply::Token { token, .. } => print(&format!("{token}\n")),
                AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
    }
}

fn leases(state_dir: &Path, server: Option<SocketAddr>) -> anyhow::Result<Vec<LeaseView>> {
    match runtime()?.block_on(admin_call(state_dir, server, &AdminRequest::Leases))? {
        AdminReply::Leases(leases) => Ok(leases),
        AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

fn hex_bytes(text: &str) -> anyhow::Result<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|index| {
            text.get(index..index + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .context("client id is not hex")
        })
        .collect()
}

/// The time left on a lease is shown against this machine's clock.
pub fn unix_now_secs() -> u64 {
    use crate::seams::Clock as _;
    crate::seams::SystemClock
        .wall_now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// How long until `end`, as an operator reads it: `59m12s`, `3h05m`, `2d04h`; `ended` once
/// past (a released or expired lease stays listed until its address is given again).
fn time_left(end_unix_secs: u64, now_unix_secs: u64) -> String {
    let Some(left) = end_unix_secs
        .checked_sub(now_unix_secs)
        .filter(|left| *left > 0)
    else {
        return "ended".into();
    };
    match left {
        0..3_600 => format!("{}m{:02}s", left / 60, left % 60),
        3_600..86_400 => format!("{}h{:02}m", left / 3_600, left / 60 % 60),
        _ => format!("{}d{:02}h", left / 86_400, left / 3_600 % 24),
    }
}

/// The table `bootmesh lease list` and `bootmesh leases` print: each lease with its end in
/// UTC and the time it has left.
pub fn render_lease_table(leases: &[LeaseView], now_unix_secs: u64) -> String {
    let mut table = format!(
        "{:<16} {:<18} {:<21} {:<8} HOSTNAME\n",
        "ADDRESS", "HARDWARE", "EXPIRES (UTC)", "LEFT"
    );
    for lease in leases {
        table.push_str(&format!(
            "{:<16} {:<18} {:<21} {:<8} {}\n",
            lease.address.to_string(),
            lease.hardware_address,
            crate::timeline::utc_timestamp(lease.expires_at_unix_secs),
            time_left(lease.expires_at_unix_secs, now_unix_secs),
            lease.hostname.as_deref().unwrap_or("-")
        ));
    }
    table
}

/// Runs a `lease` command.
pub fn run_lease(state_dir: &Path, command: LeaseCommand) -> anyhow::Result<()> {
    match command {
        LeaseCommand::List { server, json } => {
            let leases = leases(state_dir, server)?;
            if json {
                return print(&format!("{}\n", serde_json::to_string_pretty(&leases)?));
            }
            print(&render_lease_table(&leases, unix_now_secs()))
        }
        LeaseCommand::Release { address, server } => {
            let lease = leases(state_dir, server)?
                .into_iter()
                .find(|lease| lease.address == address)
                .with_context(|| format!("no lease for {address}"))?;
            #[allow(clippy::disallowed_methods)] // The CLI stamps the release with its clock.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|since| since.as_secs())
                .unwrap_or(0);
            let mut record = Vec::new();
            boot_services::dhcp::LeaseChange::Release {
                client: boot_services::dhcp::ClientId(hex_bytes(&lease.client)?),
                address,
                at_unix_secs: now,
            }
            .encode(&mut record);
            let command = consensus::MeshCommand::Leases(vec![record]);
            match runtime()?.block_on(admin_call(
                state_dir,
                server,
                &AdminRequest::Propose(command),
            ))? {
                AdminReply::Proposed(_) => print(&format!("lease of {address} released\n")),
                AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
    }
}

fn current_config(state_dir: &Path, server: Option<SocketAddr>) -> anyhow::Result<(u64, String)> {
    match runtime()?.block_on(admin_call(state_dir, server, &AdminRequest::ConfigShow))? {
        AdminReply::Config { version, document } => Ok((version, document)),
        AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

/// `config import-ltsp`: converts, reports on standard error, writes the result.
fn import_ltsp(
    dhcpd_conf: Option<&Path>,
    lts_conf: Option<&Path>,
    output: Option<&Path>,
    options: &crate::ltsp_import::ImportOptions,
    strict: bool,
) -> anyhow::Result<()> {
    if dhcpd_conf.is_none() && lts_conf.is_none() {
        anyhow::bail!("give --dhcpd-conf FILE, --lts-conf FILE, or both");
    }
    let read = |path: Option<&Path>| -> anyhow::Result<String> {
        path.map_or(Ok(String::new()), |path| {
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
        })
    };
    let import = crate::ltsp_import::import_ltsp(&read(dhcpd_conf)?, &read(lts_conf)?, options)?;
    let name = |file: &str| {
        let path = if file == "dhcpd.conf" {
            dhcpd_conf
        } else {
            lts_conf
        };
        path.map_or(file.to_owned(), |path| path.display().to_string())
    };
    for finding in &import.findings {
        eprintln!(
            "{}:{}: {}",
            name(finding.file),
            finding.line,
            finding
                .to_string()
                .split_once(": ")
                .map_or("", |(_, rest)| rest)
        );
    }
    eprintln!("{}", import.summary());
    let not_converted = import
        .findings
        .iter()
        .filter(|finding| finding.outcome == crate::ltsp_import::Outcome::NotConverted)
        .count();
    if strict && not_converted > 0 {
        eprintln!("--strict: {not_converted} line(s) not converted; nothing written");
        std::process::exit(3);
    }
    match output {
        Some(path) => std::fs::write(path, &import.fleet_toml)
            .with_context(|| format!("write {}", path.display())),
        None => print(&import.fleet_toml),
    }
}

/// Runs a `config` command.
pub fn run_config(state_dir: &Path, command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::ImportLtsp {
            dhcpd_conf,
            lts_conf,
            output,
            group,
            keep_boot_files,
            strict,
        } => import_ltsp(
            dhcpd_conf.as_deref(),
            lts_conf.as_deref(),
            output.as_deref(),
            &crate::ltsp_import::ImportOptions {
                group,
                keep_boot_files,
            },
            strict,
        ),
        ConfigCommand::Apply { file, server } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            crate::config::FleetConfig::parse(&document, &file)?;
            let (version, current) = current_config(state_dir, server)?;
            if current == document {
                return print(&format!(
                    "unchanged: the cluster already has this configuration (version {version})\n"
                ));
            }
            let request = AdminRequest::ConfigApply {
                expected_version: version,
                document,
            };
            match runtime()?.block_on(admin_call(state_dir, server, &request))? {
                AdminReply::Config { version, .. } => {
                    print(&format!("fleet configuration version {version} applied\n"))
                }
                AdminReply::Failed(reason) => anyhow::bail!("{reason}"),
                other => anyhow::bail!("unexpected answer: {other:?}"),
            }
        }
        ConfigCommand::Show { server } => {
            let (version, document) = current_config(state_dir, server)?;
            eprintln!("# fleet configuration version {version}");
            print(&document)
        }
        ConfigCommand::Diff { file, server } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            crate::config::FleetConfig::parse(&document, &file)?;
            let (version, current) = current_config(state_dir, server)?;
            let diff = similar::TextDiff::from_lines(&current, &document);
            let text = diff
                .unified_diff()
                .header(
                    &format!("cluster (version {version})"),
                    &file.display().to_string(),
                )
                .to_string();
            if text.is_empty() {
                return print("no changes\n");
            }
            print(&text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_table_shows_each_end_in_utc_and_the_time_left() {
        let now = 1_796_186_000; // 2026-12-02T04:33:20Z
        let lease =
            |address: [u8; 4], expires_at_unix_secs: u64, hostname: Option<&str>| LeaseView {
                address: address.into(),
                hardware_address: "52:54:00:00:02:01".into(),
                client: "0152540000020a".into(),
                expires_at_unix_secs,
                hostname: hostname.map(str::to_owned),
            };
        let table = render_lease_table(
            &[
                lease([10, 98, 2, 100], now + 3_552, Some("worker-1")),
                lease([10, 98, 2, 101], now + 2 * 86_400 + 4 * 3_600, None),
                lease([10, 98, 2, 102], now + 5 * 3_600 + 7 * 60, None),
                lease([10, 98, 2, 103], now - 1, None),
            ],
            now,
        );
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "ADDRESS", "HARDWARE", "EXPIRES", "(UTC)", "LEFT", "HOSTNAME"
            ]
        );
        assert_eq!(
            rows[1],
            [
                "10.98.2.100",
                "52:54:00:00:02:01",
                "2026-12-02T05:32:32Z",
                "59m12s",
                "worker-1"
            ]
        );
        assert_eq!(rows[2][3], "2d04h");
        assert_eq!(rows[3][3], "5h07m");
        assert_eq!(rows[4][3..], ["ended", "-"]);
    }
}
