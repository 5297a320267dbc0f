//! The server's configuration file: typed serde structs, unknown keys refused, every value
//! checked before anything starts. Errors name the line (syntax, types, unknown keys) or the key
//! path (values that parse but make no sense together).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use boot_services::dhcp::{
    AddressRange, BootConfig, DhcpConfig, DhcpMode, HostConfig, Ipv4Network, SubnetConfig,
};
use serde::Deserialize;

use crate::plan::{
    NodeEntry, NodePlan, NodePlans, NodeSecrets, RootMode, SETTINGS_PER_LIST_MAX, Secret,
    is_valid_lts_variable_name, is_valid_secret_name, is_valid_setting_line, is_valid_unit_name,
};

/// `[boot] token_ttl_secs` when not set: long enough for a slow firmware, kernel and initramfs
/// to reach the agent's secrets fetch, short enough that a token read off a console log or a
/// packet capture is soon worthless.
pub const BOOT_TOKEN_TTL_SECS_DEFAULT: u64 = 300;
/// The largest `[boot] token_ttl_secs`: a token is a bearer credential on the kernel command
/// line, so it must not outlive a boot by much.
pub const BOOT_TOKEN_TTL_SECS_MAX: u64 = 3600;
/// Entries in `[boot] servers`: with the address the node reached first, `bootmesh.servers=`
/// names at most 16, which is what the agent reads (each costs up to 48 bytes of a kernel
/// command line that is 2048 bytes on x86).
pub const BOOT_SERVERS_MAX: usize = 15;
/// Bytes of one secret's value: secrets are served whole from memory.
pub const SECRET_VALUE_BYTES_MAX: usize = 64 * 1024;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type, an unknown key: the message names line and column.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with the line and a caret.
        message: String,
    },
    /// A value that parses but is wrong.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `dhcp.subnet[0].ranges[1]`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where durable state (the lease journal) lives.
    pub state_dir: PathBuf,
    /// DHCP service; absent = not served.
    pub dhcp: Option<DhcpSection>,
    /// TFTP service; absent = not served.
    pub tftp: Option<TftpSection>,
    /// HTTP boot service; absent = not served.
    pub http: Option<HttpSection>,
    /// NBD service; absent = not served.
    pub nbd: Option<NbdSection>,
    /// What iPXE boots (served as `/boot/<mac>.ipxe` by the HTTP service).
    pub boot: Option<BootPlanSection>,
    /// Groups of nodes: each boots the image promoted to it (`bootmesh image promote`).
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSection>,
    /// The image store (`<state_dir>/images`).
    #[serde(default)]
    pub images: ImagesSection,
    /// Present: this server is a cluster member, with the identity `bootmesh cluster init` or
    /// `cluster join` wrote in `<state_dir>/cluster`.
    pub cluster: Option<ClusterSection>,
    /// Present: this server serves its images' chunks to the swarm (booting and booted nodes,
    /// other servers) over QUIC.
    pub swarm: Option<SwarmSection>,
}

/// `[cluster]`. Everything about the member itself is in its identity; this section says the
/// server takes part, and how much Raft log it keeps.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Log entries between two snapshots of the cluster state. A snapshot lets the log be
    /// compacted; a server that was down longer than the kept log catches up from it.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Log entries kept behind the last snapshot, so a follower that is only a little behind
    /// catches up from the log instead of a whole snapshot.
    #[serde(default = "default_log_kept_after_snapshot")]
    pub log_kept_after_snapshot: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            snapshot_every: default_snapshot_every(),
            log_kept_after_snapshot: default_log_kept_after_snapshot(),
        }
    }
}

fn default_snapshot_every() -> u64 {
    5000
}

fn default_log_kept_after_snapshot() -> u64 {
    1000
}

/// `[swarm]`: serving image chunks to peers over QUIC (ALPN `bootmesh-chunks/1`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SwarmSection {
    /// A UDP address for a chunk endpoint of its own. Without it, a cluster member serves
    /// chunks on its cluster endpoint (told apart by ALPN); a server outside a cluster must
    /// name one.
    pub listen: Option<SocketAddr>,
    /// The most this server uploads to peers, in MiB/s, so that seeding never starves its
    /// other work; absent, the network decides.
    pub upload_mib_per_second: Option<u64>,
    /// The swarm endpoints of every server that tracks images (this one included), the same
    /// list on every server: each image's tracker is the first of them by rendezvous hash,
    /// and each server announces the images it offers there. Booting nodes get the list as
    /// `bootmesh.trackers=` and fetch `ram` roots from the swarm. Absent: this server tracks
    /// its own images alone and names itself as their seed (booting nodes get `listen`; a
    /// cluster member that has no `listen` must list the servers here for that).
    #[serde(default)]
    pub trackers: Vec<SocketAddr>,
}

/// `[images]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImagesSection {
    /// Bytes of verified chunks kept in memory, in MiB. Chunks read from disk are hashed
    /// before they are served, so serving images larger than this costs a re-read and a
    /// re-hash of what was evicted (BENCHMARKS.md: 0.85 of nbdkit with a 256 MiB cache and a
    /// 259 MiB image); size it to the images served at once.
    #[serde(default = "default_chunk_cache_mib")]
    pub chunk_cache_mib: u64,
}

impl Default for ImagesSection {
    fn default() -> Self {
        Self {
            chunk_cache_mib: default_chunk_cache_mib(),
        }
    }
}

fn default_chunk_cache_mib() -> u64 {
    1024
}

/// `[boot]`: what nodes boot. A node boots its group's promoted image when there is one;
/// otherwise the static `kernel`/`initrd` here.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootPlanSection {
    /// Kernel path under the HTTP root (for nodes whose group has no image).
    pub kernel: Option<String>,
    /// Initrd path under the HTTP root.
    pub initrd: Option<String>,
    /// Kernel command line for the static kernel.
    #[serde(default)]
    pub cmdline: String,
    /// The group of hosts that name none.
    pub default_group: Option<String>,
    /// HTTP addresses (`ip:port`) of the other boot servers, given to agents on the kernel
    /// command line as fallbacks after the server that served the boot script.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Seconds a boot token (`bootmesh.token=`) stays redeemable for the node's secrets. The
    /// agent fetches secrets last, after a `ram` node has loaded its whole root image, so this
    /// must cover that load.
    #[serde(default = "default_token_ttl_secs")]
    pub token_ttl_secs: u64,
}

/// `[[group]]`: nodes that boot the same image with the same settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// The group's name (what `image promote --group` names).
    pub name: String,
    /// Appended to the image's default command line.
    #[serde(default)]
    pub cmdline: String,
    /// How the group's nodes obtain their root image: `ram` (default) or `nbd`.
    #[serde(default)]
    pub root_mode: RootMode,
    /// Shell commands run in the new root before its init (lts.conf `PREINIT_*`).
    #[serde(default)]
    pub preinit: Vec<String>,
    /// Lines appended to the new root's `/etc/fstab` (lts.conf `FSTAB_*`).
    #[serde(default)]
    pub fstab: Vec<String>,
    /// Shell commands run at boot by the agent's rcfile unit (lts.conf `RCFILE_*`).
    #[serde(default)]
    pub rcfile: Vec<String>,
    /// Units left enabled although diskless nodes mask them by default
    /// (lts.conf `KEEP_SYSTEM_SERVICES`).
    #[serde(default)]
    pub keep_system_services: Vec<String>,
    /// Other lts.conf variables, kept for the image's own scripts: written to each node's
    /// `/etc/lts.conf` and to the lts.conf served over TFTP. bootmesh does not act on them.
    #[serde(default)]
    pub lts_conf: BTreeMap<String, String>,
    /// Secrets by name, handed to each node of the group once per boot token.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    /// Booted nodes of the group serve its kernel and initrd over HTTP (port
    /// [`crate::plan::PEER_FIRMWARE_PORT`]), and boot scripts name up to two of them in the
    /// booting node's rack before this server. Off by default: firmware checks nothing it
    /// fetches, so any booted node could then boot others into a kernel of its choosing
    /// (docs/threat-model.md, ADR 0016).
    #[serde(default)]
    pub firmware_from_peers: bool,
}

/// `[dhcp]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DhcpSection {
    /// Interfaces to answer on. DHCP is never served on an interface not listed here.
    pub interfaces: Vec<String>,
    /// `authoritative` (default) or `proxy`.
    #[serde(default)]
    pub mode: DhcpModeSetting,
    /// Server port; 67 unless testing.
    #[serde(default = "default_dhcp_port")]
    pub port: u16,
    /// Seconds an offered address stays reserved.
    #[serde(default = "default_offer_hold_secs")]
    pub offer_hold_secs: u64,
    /// Bound on outstanding offers.
    #[serde(default = "default_offers_max")]
    pub offers_max: usize,
    /// Bound on received datagrams waiting for the DHCP core; more are dropped.
    #[serde(default = "default_receive_queue_max")]
    pub receive_queue_max: usize,
    /// Seconds a declined address is kept out of use.
    #[serde(default = "default_decline_quarantine_secs")]
    pub decline_quarantine_secs: u64,
    /// Boot files per client type.
    #[serde(default)]
    pub boot: BootSection,
    /// Subnets.
    #[serde(default, rename = "subnet")]
    pub subnets: Vec<SubnetSection>,
    /// Known hosts.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostSection>,
}

/// `authoritative` or `proxy`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DhcpModeSetting {
    /// Hands out addresses.
    #[default]
    Authoritative,
    /// proxyDHCP: boot information only.
    Proxy,
}

/// `[dhcp.boot]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// iPXE for BIOS PXE ROMs (TFTP path).
    #[serde(default = "default_bios_file")]
    pub bios_file: String,
    /// iPXE for x86-64 UEFI (TFTP path, and HTTP path for UEFI HTTP boot).
    #[serde(default = "default_uefi_x64_file")]
    pub uefi_x64_file: String,
    /// iPXE for ARM64 UEFI.
    #[serde(default = "default_uefi_arm64_file")]
    pub uefi_arm64_file: String,
    /// The HTTP port named in boot URLs; defaults to the `[http]` listen port, else 80.
    pub http_port: Option<u16>,
}

impl Default for BootSection {
    fn default() -> Self {
        Self {
            bios_file: default_bios_file(),
            uefi_x64_file: default_uefi_x64_file(),
            uefi_arm64_file: default_uefi_arm64_file(),
            http_port: None,
        }
    }
}

/// `[[dhcp.subnet]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubnetSection {
    /// `10.0.0.0/24`.
    pub cidr: String,
    /// `["10.0.0.100-10.0.0.200"]`.
    #[serde(default)]
    pub ranges: Vec<String>,
    /// Option 3.
    #[serde(default)]
    pub routers: Vec<Ipv4Addr>,
    /// Option 6.
    #[serde(default)]
    pub dns_servers: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 51.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// Where boot files come from, if not this server.
    pub next_server: Option<Ipv4Addr>,
    /// The rack whose nodes this subnet holds (a rack behind a DHCP relay has a subnet of its
    /// own): the image tracker places a node by its address and prefers its rack's peers.
    pub rack: Option<String>,
}

/// `[[dhcp.host]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// `52:54:00:12:34:56`.
    pub mac: String,
    /// Fixed address.
    pub address: Option<Ipv4Addr>,
    /// Option 12.
    pub hostname: Option<String>,
    /// The host's group (else `[boot] default_group`).
    pub group: Option<String>,
    /// Overrides the group's `root_mode`.
    pub root_mode: Option<RootMode>,
    /// Appended to the group's `preinit`.
    #[serde(default)]
    pub preinit: Vec<String>,
    /// Appended to the group's `fstab`.
    #[serde(default)]
    pub fstab: Vec<String>,
    /// Appended to the group's `rcfile`.
    #[serde(default)]
    pub rcfile: Vec<String>,
    /// Appended to the group's `keep_system_services`.
    #[serde(default)]
    pub keep_system_services: Vec<String>,
    /// lts.conf variables; a name the group also has takes this value.
    #[serde(default)]
    pub lts_conf: BTreeMap<String, String>,
    /// Secrets by name; a name the group also has takes this value.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
}

/// `[tftp]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TftpSection {
    /// Listening address, e.g. `0.0.0.0:69`.
    pub listen: SocketAddr,
    /// Directory served.
    pub root: PathBuf,
    /// Largest blksize granted (RFC 2348; at most 65464).
    #[serde(default = "default_blksize_max")]
    pub blksize_max: u16,
    /// Largest windowsize granted (RFC 7440).
    #[serde(default = "default_windowsize_max")]
    pub windowsize_max: u16,
    /// Retransmission timeout when the client asks for none, in milliseconds.
    #[serde(default = "default_tftp_timeout_ms")]
    pub timeout_ms: u64,
    /// Retransmissions before a session is abandoned.
    #[serde(default = "default_tftp_retries_max")]
    pub retries_max: u32,
    /// Bound on concurrent sessions.
    #[serde(default = "default_tftp_sessions_max")]
    pub sessions_max: usize,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Listening address, e.g. `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Directory served under `/`.
    pub root: PathBuf,
    /// Bound on concurrent connections.
    #[serde(default = "default_http_connections_max")]
    pub connections_max: usize,
}

/// `[nbd]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NbdSection {
    /// Listening address, e.g. `0.0.0.0:10809`.
    pub listen: SocketAddr,
    /// Bound on concurrent connections.
    #[serde(default = "default_nbd_connections_max")]
    pub connections_max: usize,
    /// Exports.
    #[serde(default, rename = "export")]
    pub exports: Vec<NbdExportSection>,
}

/// `[[nbd.export]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NbdExportSection {
    /// Export name clients ask for.
    pub name: String,
    /// Image file served read-only.
    pub path: PathBuf,
    /// Shown by `nbdinfo --list`.
    pub description: Option<String>,
}

fn default_token_ttl_secs() -> u64 {
    BOOT_TOKEN_TTL_SECS_DEFAULT
}
fn default_dhcp_port() -> u16 {
    67
}
fn default_offer_hold_secs() -> u64 {
    30
}
fn default_offers_max() -> usize {
    8192
}
fn default_receive_queue_max() -> usize {
    4096
}
fn default_decline_quarantine_secs() -> u64 {
    3600
}
fn default_bios_file() -> String {
    "undionly.kpxe".into()
}
fn default_uefi_x64_file() -> String {
    "ipxe.efi".into()
}
fn default_uefi_arm64_file() -> String {
    "ipxe-arm64.efi".into()
}
fn default_lease_secs() -> u64 {
    3600
}
fn default_blksize_max() -> u16 {
    65464
}
fn default_windowsize_max() -> u16 {
    64
}
fn default_tftp_timeout_ms() -> u64 {
    1000
}
fn default_tftp_retries_max() -> u32 {
    5
}
fn default_tftp_sessions_max() -> usize {
    1024
}
fn default_http_connections_max() -> usize {
    1024
}
fn default_nbd_connections_max() -> usize {
    256
}

/// The fleet-wide part of the configuration, which a cluster holds and `bootmesh config apply`
/// changes: what nodes get. The same sections, in the same form, as in a server's file:
/// `[[dhcp.subnet]]`, `[[dhcp.host]]`, `[dhcp.boot]`, `[boot]` and `[[group]]`. What is about
/// one server (its state directory, interfaces, ports, bounds) stays in its own file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Subnets, hosts and boot files.
    pub dhcp: Option<FleetDhcpSection>,
    /// What iPXE boots.
    pub boot: Option<BootPlanSection>,
    /// Groups of nodes.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSection>,
}

/// `[dhcp]` of a fleet configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetDhcpSection {
    /// Boot files per client type.
    #[serde(default)]
    pub boot: BootSection,
    /// Subnets.
    #[serde(default, rename = "subnet")]
    pub subnets: Vec<SubnetSection>,
    /// Known hosts.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostSection>,
}

impl FleetConfig {
    /// Parses and validates a fleet configuration (`path` only names it in errors): the same
    /// checks as a server's file, so what `config apply` accepts every server can serve.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let fleet: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_error_message(text, &error),
        })?;
        // A server that serves DHCP, HTTP and NBD, to run the same checks as on a file: which
        // services a server runs is its own file's business, not the fleet's, so a fleet
        // with `[boot]` or an `nbd` group is not refused for lack of them here.
        let probe_dhcp = toml::from_str::<DhcpSection>("interfaces = [\"probe\"]")
            .map_err(|error| invalid("dhcp", format!("default section: {error}")))?;
        let probe_http = toml::from_str::<HttpSection>("listen = \"127.0.0.1:80\"\nroot = \"/\"")
            .map_err(|error| invalid("http", format!("default section: {error}")))?;
        let probe_nbd = toml::from_str::<NbdSection>("listen = \"127.0.0.1:10809\"")
            .map_err(|error| invalid("nbd", format!("default section: {error}")))?;
        let probe = ServerConfig {
            state_dir: PathBuf::from("/"),
            dhcp: Some(probe_dhcp),
            tftp: None,
            http: Some(probe_http),
            nbd: Some(probe_nbd),
            boot: None,
            groups: Vec::new(),
            images: ImagesSection::default(),
            cluster: None,
            swarm: None,
        }
        .with_fleet(&fleet)?;
        probe.validate()?;
        probe.dhcp_config()?;
        probe.node_plans()?;
        Ok(fleet)
    }
}

impl ServerConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_error_message(text, &error),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// This server's configuration with the fleet sections replaced by `fleet`'s. The DHCP
    /// parts apply to a server whose file has a `[dhcp]` section (its interfaces); one without
    /// takes `[boot]` and `[[group]]` only.
    pub fn with_fleet(&self, fleet: &FleetConfig) -> Result<Self, ConfigError> {
        let mut merged = self.clone();
        if let (Some(dhcp), Some(fleet_dhcp)) = (&mut merged.dhcp, &fleet.dhcp) {
            dhcp.boot = fleet_dhcp.boot.clone();
            dhcp.subnets = fleet_dhcp.subnets.clone();
            dhcp.hosts = fleet_dhcp.hosts.clone();
        }
        merged.boot = fleet.boot.clone();
        merged.groups = fleet.groups.clone();
        Ok(merged)
    }

    /// The racks the DHCP subnets name, for the image tracker: a node is in the rack of the
    /// most specific subnet that holds its address.
    pub fn rack_map(&self) -> Vec<(Ipv4Network, String)> {
        self.dhcp
            .iter()
            .flat_map(|dhcp| &dhcp.subnets)
            .filter_map(|subnet| {
                let rack = subnet.rack.clone()?;
                parse_cidr(&subnet.cidr).ok().map(|network| (network, rack))
            })
            .collect()
    }

    /// A root mode is served by this server's sections: `nbd` by `[nbd]`, `lazy` by `[swarm]`
    /// (the node fetches its chunks there).
    fn check_root_mode(&self, key: &str, root_mode: RootMode) -> Result<(), ConfigError> {
        match root_mode {
            RootMode::Nbd if self.nbd.is_none() => Err(invalid(
                key,
                "\"nbd\" needs an [nbd] section to serve the root image",
            )),
            RootMode::Lazy if self.swarm.is_none() => Err(invalid(
                key,
                "\"lazy\" needs a [swarm] section: the node fetches its root's chunks from the swarm",
            )),
            _ => Ok(()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(swarm) = &self.swarm {
            if swarm.listen.is_none() && self.cluster.is_none() {
                return Err(invalid(
                    "swarm.listen",
                    "a server outside a cluster needs an address for its chunk endpoint",
                ));
            }
            if swarm.upload_mib_per_second == Some(0) {
                return Err(invalid(
                    "swarm.upload_mib_per_second",
                    "0 would upload nothing; leave it out for no limit",
                ));
            }
        }
        let mut group_names = std::collections::BTreeSet::new();
        for (index, group) in self.groups.iter().enumerate() {
            let valid = !group.name.is_empty()
                && group.name.len() <= 64
                && group
                    .name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
            if !valid {
                return Err(invalid(
                    format!("group[{index}].name"),
                    "must be 1-64 of a-z A-Z 0-9 . _ -",
                ));
            }
            if !group_names.insert(group.name.as_str()) {
                return Err(invalid(
                    format!("group[{index}].name"),
                    "names a group twice",
                ));
            }
        }
        for (index, group) in self.groups.iter().enumerate() {
            let key = format!("group[{index}]");
            check_node_settings(&key, &group.settings())?;
            self.check_root_mode(&format!("{key}.root_mode"), group.root_mode)?;
            if group.firmware_from_peers && self.swarm.is_none() {
                return Err(invalid(
                    format!("{key}.firmware_from_peers"),
                    "needs a [swarm] section: booted peers are found through the image's tracker",
                ));
            }
        }
        self.check_boot_section()?;
        let known_group = |name: &str| group_names.contains(name);
        if let Some(default_group) = self
            .boot
            .as_ref()
            .and_then(|boot| boot.default_group.as_deref())
            && !known_group(default_group)
        {
            return Err(invalid("boot.default_group", "names no [[group]]"));
        }
        if let Some(dhcp) = &self.dhcp {
            for (index, host) in dhcp.hosts.iter().enumerate() {
                if let Some(group) = host.group.as_deref()
                    && !known_group(group)
                {
                    return Err(invalid(
                        format!("dhcp.host[{index}].group"),
                        "names no [[group]]",
                    ));
                }
                self.check_host_settings(index, host)?;
            }
        }
        if let Some(dhcp) = &self.dhcp {
            if dhcp.interfaces.is_empty() {
                return Err(invalid(
                    "dhcp.interfaces",
                    "name at least one interface to serve DHCP on",
                ));
            }
            self.dhcp_config()?;
        }
        if let Some(tftp) = &self.tftp {
            if !(8..=65464).contains(&tftp.blksize_max) {
                return Err(invalid("tftp.blksize_max", "must be 8 to 65464 (RFC 2348)"));
            }
            if tftp.windowsize_max == 0 {
                return Err(invalid("tftp.windowsize_max", "must be at least 1"));
            }
            if tftp.sessions_max == 0 {
                return Err(invalid("tftp.sessions_max", "must be at least 1"));
            }
            if tftp.timeout_ms == 0 {
                return Err(invalid("tftp.timeout_ms", "must be at least 1"));
            }
        }
        if self.boot.is_some() && self.http.is_none() {
            return Err(invalid(
                "boot",
                "boot scripts are served over HTTP: add an [http] section",
            ));
        }
        if let Some(nbd) = &self.nbd {
            let mut names = std::collections::BTreeSet::new();
            for (index, export) in nbd.exports.iter().enumerate() {
                if export.name.is_empty() || export.name.len() > 4096 {
                    return Err(invalid(
                        format!("nbd.export[{index}].name"),
                        "must be 1 to 4096 bytes",
                    ));
                }
                if !names.insert(&export.name) {
                    return Err(invalid(
                        format!("nbd.export[{index}].name"),
                        "duplicate export name",
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_boot_section(&self) -> Result<(), ConfigError> {
        let Some(boot) = &self.boot else {
            return Ok(());
        };
        if !(1..=BOOT_TOKEN_TTL_SECS_MAX).contains(&boot.token_ttl_secs) {
            return Err(invalid(
                "boot.token_ttl_secs",
                format!("must be 1 to {BOOT_TOKEN_TTL_SECS_MAX}"),
            ));
        }
        if boot.servers.len() > BOOT_SERVERS_MAX {
            return Err(invalid(
                "boot.servers",
                format!("at most {BOOT_SERVERS_MAX} servers (they share the kernel command line)"),
            ));
        }
        for (index, server) in boot.servers.iter().enumerate() {
            if server.ip().is_unspecified() || server.port() == 0 {
                return Err(invalid(
                    format!("boot.servers[{index}]"),
                    "must be an address and port nodes can reach (not 0.0.0.0, not ::, not port 0)",
                ));
            }
        }
        Ok(())
    }

    fn check_host_settings(&self, index: usize, host: &HostSection) -> Result<(), ConfigError> {
        let key = format!("dhcp.host[{index}]");
        if let Some(hostname) = &host.hostname {
            let valid = !hostname.is_empty()
                && hostname.len() <= 253
                && hostname
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
            if !valid {
                return Err(invalid(
                    format!("{key}.hostname"),
                    "must be 1-253 of a-z A-Z 0-9 . _ -",
                ));
            }
        }
        let settings = host.settings();
        check_node_settings(&key, &settings)?;
        if let Some(root_mode) = host.root_mode {
            self.check_root_mode(&format!("{key}.root_mode"), root_mode)?;
        }
        let group_name = host.group.as_deref().or(self
            .boot
            .as_ref()
            .and_then(|boot| boot.default_group.as_deref()));
        let Some(group) = group_name.and_then(|name| self.group(name)) else {
            return Ok(());
        };
        for ((list_name, host_lines), (_, group_lines)) in
            settings.lists().into_iter().zip(group.settings().lists())
        {
            if host_lines.len() + group_lines.len() > SETTINGS_PER_LIST_MAX {
                return Err(invalid(
                    format!("{key}.{list_name}"),
                    format!(
                        "with the {} entries of group {:?}, over {SETTINGS_PER_LIST_MAX} \
                         (lts.conf numbers them with two digits)",
                        group_lines.len(),
                        group.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn group(&self, name: &str) -> Option<&GroupSection> {
        self.groups.iter().find(|group| group.name == name)
    }

    /// How long a boot token stays redeemable.
    pub fn boot_token_ttl(&self) -> Duration {
        Duration::from_secs(
            self.boot
                .as_ref()
                .map_or(BOOT_TOKEN_TTL_SECS_DEFAULT, |boot| boot.token_ttl_secs),
        )
    }

    /// The other boot servers' HTTP addresses (`[boot] servers`).
    pub fn boot_servers(&self) -> Vec<SocketAddr> {
        self.boot
            .as_ref()
            .map(|boot| boot.servers.clone())
            .unwrap_or_default()
    }

    /// What every node gets (`/nodes/<mac>/plan`, `/nodes/<mac>/secrets`, lts.conf): each
    /// host its group's settings followed by its own, every other MAC the default group's.
    pub fn node_plans(&self) -> Result<NodePlans, ConfigError> {
        let default_group = self
            .boot
            .as_ref()
            .and_then(|boot| boot.default_group.as_deref());
        let default = self.node_entry(default_group, None);
        let mut hosts = BTreeMap::new();
        for (index, host) in self
            .dhcp
            .iter()
            .flat_map(|dhcp| dhcp.hosts.iter())
            .enumerate()
        {
            let mac = parse_mac(&host.mac)
                .map_err(|reason| invalid(format!("dhcp.host[{index}].mac"), reason))?;
            let group = host.group.as_deref().or(default_group);
            hosts.insert(mac, self.node_entry(group, Some(host)));
        }
        Ok(NodePlans::new(default, hosts))
    }

    fn node_entry(&self, group_name: Option<&str>, host: Option<&HostSection>) -> NodeEntry {
        let group = group_name.and_then(|name| self.group(name));
        let group_settings = group.map(GroupSection::settings);
        let host_settings = host.map(HostSection::settings);
        let joined = |pick: for<'a> fn(&NodeSettings<'a>) -> &'a [String]| -> Vec<String> {
            let group_lines = group_settings.as_ref().map(pick).unwrap_or_default();
            let host_lines = host_settings.as_ref().map(pick).unwrap_or_default();
            group_lines.iter().chain(host_lines).cloned().collect()
        };
        let plan = NodePlan {
            hostname: host.and_then(|host| host.hostname.clone()),
            group: group.map(|group| group.name.clone()),
            root_mode: host
                .and_then(|host| host.root_mode)
                .or(group.map(|group| group.root_mode))
                .unwrap_or_default(),
            nbd_port: self.nbd.as_ref().map(|nbd| nbd.listen.port()),
            preinit: joined(|settings| settings.preinit),
            fstab: joined(|settings| settings.fstab),
            rcfile: joined(|settings| settings.rcfile),
            keep_system_services: joined(|settings| settings.keep_system_services),
            lts_conf: group_settings
                .iter()
                .chain(&host_settings)
                .flat_map(|settings| settings.lts_conf.iter())
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            firmware_from_peers: group.is_some_and(|group| group.firmware_from_peers),
        };
        let mut secrets = BTreeMap::new();
        for settings in group_settings.iter().chain(&host_settings) {
            secrets.extend(
                settings
                    .secrets
                    .iter()
                    .map(|(name, value)| (name.clone(), value.clone())),
            );
        }
        NodeEntry {
            plan,
            secrets: NodeSecrets { secrets },
        }
    }

    /// The DHCP core's configuration, if DHCP is served.
    pub fn dhcp_config(&self) -> Result<Option<DhcpConfig>, ConfigError> {
        let Some(dhcp) = &self.dhcp else {
            return Ok(None);
        };
        let mut subnets = Vec::new();
        for (index, subnet) in dhcp.subnets.iter().enumerate() {
            let key = format!("dhcp.subnet[{index}]");
            let network = parse_cidr(&subnet.cidr)
                .map_err(|reason| invalid(format!("{key}.cidr"), reason))?;
            let mut ranges = Vec::new();
            for (range_index, range) in subnet.ranges.iter().enumerate() {
                let parsed = parse_range(range)
                    .map_err(|reason| invalid(format!("{key}.ranges[{range_index}]"), reason))?;
                if !network.contains(parsed.first) || !network.contains(parsed.last) {
                    return Err(invalid(
                        format!("{key}.ranges[{range_index}]"),
                        format!("range {range} is not inside {}", subnet.cidr),
                    ));
                }
                ranges.push(parsed);
            }
            if let Some(rack) = &subnet.rack
                && !is_rack_name(rack)
            {
                return Err(invalid(
                    format!("{key}.rack"),
                    "must be 1-64 of a-z A-Z 0-9 . _ -",
                ));
            }
            if subnet.lease_secs == 0 || subnet.lease_secs > u64::from(u32::MAX) {
                return Err(invalid(
                    format!("{key}.lease_secs"),
                    "must be 1 to 4294967295",
                ));
            }
            subnets.push(SubnetConfig {
                network,
                ranges,
                routers: subnet.routers.clone(),
                dns_servers: subnet.dns_servers.clone(),
                domain_name: subnet.domain_name.clone(),
                lease_time: Duration::from_secs(subnet.lease_secs),
                next_server: subnet.next_server,
            });
        }
        let mut hosts = Vec::new();
        for (index, host) in dhcp.hosts.iter().enumerate() {
            let hardware_address = parse_mac(&host.mac)
                .map_err(|reason| invalid(format!("dhcp.host[{index}].mac"), reason))?;
            hosts.push(HostConfig {
                hardware_address,
                address: host.address,
                hostname: host.hostname.clone(),
            });
        }
        let http_port = dhcp
            .boot
            .http_port
            .or_else(|| self.http.as_ref().map(|http| http.listen.port()))
            .unwrap_or(80);
        let config = DhcpConfig {
            mode: match dhcp.mode {
                DhcpModeSetting::Authoritative => DhcpMode::Authoritative,
                DhcpModeSetting::Proxy => DhcpMode::Proxy,
            },
            subnets,
            hosts,
            boot: BootConfig {
                bios_file: dhcp.boot.bios_file.clone(),
                uefi_x64_file: dhcp.boot.uefi_x64_file.clone(),
                uefi_arm64_file: dhcp.boot.uefi_arm64_file.clone(),
                http_port,
            },
            offer_hold: Duration::from_secs(dhcp.offer_hold_secs),
            offers_max: dhcp.offers_max.max(1),
            pending_commits_max: dhcp.receive_queue_max.max(1),
            decline_quarantine: Duration::from_secs(dhcp.decline_quarantine_secs),
        };
        boot_services::dhcp::DhcpServer::new(config.clone())
            .map_err(|error| invalid("dhcp", error.to_string()))?;
        Ok(Some(config))
    }
}

/// toml's message for `error`, which quotes the offending line, unless that line may hold a
/// secret value: then only its number, the column and the reason (errors reach the log).
fn parse_error_message(text: &str, error: &toml::de::Error) -> String {
    let Some(start) = error.span().map(|span| span.start) else {
        return error.to_string();
    };
    let before = text.get(..start).unwrap_or(text);
    let line_index = before.matches('\n').count();
    if !may_hold_secret(text, line_index) {
        return error.to_string();
    }
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, line_start)| line_start)
        .chars()
        .count()
        + 1;
    format!(
        "TOML parse error at line {}, column {column}: {} (the line is not shown: it may hold \
         a secret)",
        line_index + 1,
        error.message()
    )
}

/// Whether line `line_index` of a TOML text may carry a secret value: it names `secrets`, or
/// it lies in a table whose header does (`[group.secrets]`).
fn may_hold_secret(text: &str, line_index: usize) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    let Some(line) = lines.get(line_index) else {
        return false;
    };
    line.contains("secrets")
        || lines
            .get(..line_index)
            .unwrap_or_default()
            .iter()
            .rev()
            .map(|line| line.trim_start())
            .find(|line| line.starts_with('['))
            .is_some_and(|header| header.contains("secrets"))
}

/// The per-node settings a group and a host both carry, for the checks they share.
struct NodeSettings<'a> {
    preinit: &'a [String],
    fstab: &'a [String],
    rcfile: &'a [String],
    keep_system_services: &'a [String],
    lts_conf: &'a BTreeMap<String, String>,
    secrets: &'a BTreeMap<String, Secret>,
}

impl NodeSettings<'_> {
    /// The lists by their key names.
    fn lists(&self) -> [(&'static str, &[String]); 4] {
        [
            ("preinit", self.preinit),
            ("fstab", self.fstab),
            ("rcfile", self.rcfile),
            ("keep_system_services", self.keep_system_services),
        ]
    }
}

impl GroupSection {
    fn settings(&self) -> NodeSettings<'_> {
        NodeSettings {
            preinit: &self.preinit,
            fstab: &self.fstab,
            rcfile: &self.rcfile,
            keep_system_services: &self.keep_system_services,
            lts_conf: &self.lts_conf,
            secrets: &self.secrets,
        }
    }
}

impl HostSection {
    fn settings(&self) -> NodeSettings<'_> {
        NodeSettings {
            preinit: &self.preinit,
            fstab: &self.fstab,
            rcfile: &self.rcfile,
            keep_system_services: &self.keep_system_services,
            lts_conf: &self.lts_conf,
            secrets: &self.secrets,
        }
    }
}

/// Checks the lists and secrets of the group or host at `key`. Messages name keys, never
/// secret values.
fn check_node_settings(key: &str, settings: &NodeSettings<'_>) -> Result<(), ConfigError> {
    for (list_name, lines) in settings.lists() {
        if lines.len() > SETTINGS_PER_LIST_MAX {
            return Err(invalid(
                format!("{key}.{list_name}"),
                format!(
                    "at most {SETTINGS_PER_LIST_MAX} entries (lts.conf numbers them with two digits)"
                ),
            ));
        }
        for (index, line) in lines.iter().enumerate() {
            let (valid, reason) = if list_name == "keep_system_services" {
                (
                    is_valid_unit_name(line),
                    "must be a unit name: not empty, no spaces or control characters",
                )
            } else {
                (
                    is_valid_setting_line(line),
                    "must be one line: no newline, NUL or other control character",
                )
            };
            if !valid {
                return Err(invalid(format!("{key}.{list_name}[{index}]"), reason));
            }
        }
    }
    for (name, value) in settings.lts_conf {
        if !is_valid_lts_variable_name(name) {
            return Err(invalid(
                format!("{key}.lts_conf.{name:?}"),
                "must be a shell variable name (A-Z a-z 0-9 _, not starting with a digit), and \
                 not HOSTNAME, KEEP_SYSTEM_SERVICES, LIKE or PREINIT_/FSTAB_/RCFILE_*, which \
                 have keys of their own",
            ));
        }
        if !is_valid_setting_line(value) {
            return Err(invalid(
                format!("{key}.lts_conf.{name}"),
                "must be one line: no newline, NUL or other control character",
            ));
        }
    }
    for (name, value) in settings.secrets {
        if !is_valid_secret_name(name) {
            return Err(invalid(
                format!("{key}.secrets.{name:?}"),
                "secret names must be 1-64 of a-z A-Z 0-9 . _ - and not start with .",
            ));
        }
        if value.expose().len() > SECRET_VALUE_BYTES_MAX {
            return Err(invalid(
                format!("{key}.secrets.{name}"),
                format!("the value is over {SECRET_VALUE_BYTES_MAX} bytes"),
            ));
        }
    }
    Ok(())
}

/// A rack name: what a tracker compares, so kept to a label's characters.
pub fn is_rack_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= transfer::swarm::tracker::RACK_NAME_MAX
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

/// Parses `10.0.0.0/24`.
pub fn parse_cidr(text: &str) -> Result<Ipv4Network, String> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not address/prefix"))?;
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
    let prefix_length: u8 = prefix
        .parse()
        .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
    if prefix_length > 32 {
        return Err(format!("prefix length {prefix_length} is over 32"));
    }
    Ok(Ipv4Network {
        address,
        prefix_length,
    })
}

/// Parses `10.0.0.100-10.0.0.200`.
pub fn parse_range(text: &str) -> Result<AddressRange, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not first-last"))?;
    let first: Ipv4Addr = first
        .trim()
        .parse()
        .map_err(|_| format!("{first:?} is not an IPv4 address"))?;
    let last: Ipv4Addr = last
        .trim()
        .parse()
        .map_err(|_| format!("{last:?} is not an IPv4 address"))?;
    if first > last {
        return Err(format!("{first} comes after {last}"));
    }
    Ok(AddressRange { first, last })
}

/// Parses `52:54:00:12:34:56` (or with `-`).
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!(
            "{text:?} is not a MAC address like 52:54:00:12:34:56"
        ));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte =
            u8::from_str_radix(part, 16).map_err(|_| format!("{text:?} is not a MAC address"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state_dir = "/var/lib/bootmesh"

[dhcp]
interfaces = ["bm0"]

[[dhcp.subnet]]
cidr = "10.0.0.0/24"
ranges = ["10.0.0.100-10.0.0.200"]
routers = ["10.0.0.1"]

[[dhcp.host]]
mac = "52:54:00:00:00:01"
address = "10.0.0.10"
hostname = "worker-1"

[tftp]
listen = "0.0.0.0:69"
root = "/srv/tftp"

[http]
listen = "0.0.0.0:8080"
root = "/srv/http"

[nbd]
listen = "0.0.0.0:10809"
[[nbd.export]]
name = "root"
path = "/srv/root.squashfs"
"#;

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::parse(text, Path::new("fleet.toml"))
    }

    #[test]
    fn good_config_parses_and_converts() {
        let config = parse(GOOD).unwrap();
        let dhcp = config.dhcp_config().unwrap().unwrap();
        assert_eq!(
            dhcp.subnets[0].ranges[0].first,
            Ipv4Addr::new(10, 0, 0, 100)
        );
        assert_eq!(
            dhcp.boot.http_port, 8080,
            "boot URLs follow the HTTP listener"
        );
        assert_eq!(dhcp.hosts[0].hardware_address, [0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(config.tftp.unwrap().blksize_max, 65464);
    }

    fn check_error(text: &str, expected_fragments: &[&str]) {
        let message = parse(text).unwrap_err().to_string();
        for fragment in expected_fragments {
            assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn errors_name_the_line_or_key_and_the_reason() {
        check_error(
            &GOOD.replace("root = \"/srv/tftp\"", "root = \"/srv/tftp\"\nblksize = 9"),
            &["line 20", "unknown field `blksize`"],
        );
        check_error(
            &GOOD.replace("\"10.0.0.1\"]", "\"10.0.0.300\"]"),
            &["line 10", "invalid IPv4 address"],
        );
        check_error(
            &GOOD.replace("10.0.0.100-10.0.0.200", "10.0.1.100-10.0.1.200"),
            &["dhcp.subnet[0].ranges[0]", "not inside"],
        );
        check_error(
            &GOOD.replace("52:54:00:00:00:01", "52:54:00:00:01"),
            &["dhcp.host[0].mac"],
        );
        check_error(
            &GOOD.replace("interfaces = [\"bm0\"]", "interfaces = []"),
            &["dhcp.interfaces"],
        );
        check_error(
            &GOOD.replace("0.0.0.0:69", "0.0.0.0"),
            &["line 18", "invalid socket address"],
        );
        check_error(
            &GOOD.replace(
                "cidr = \"10.0.0.0/24\"",
                "cidr = \"10.0.0.0/24\"\nrack = \"rack 1\"",
            ),
            &["dhcp.subnet[0].rack", "a-z A-Z 0-9"],
        );
    }

    #[test]
    fn racks_come_from_the_subnets_that_name_one() {
        let config = parse(&GOOD.replace(
            "cidr = \"10.0.0.0/24\"",
            "cidr = \"10.0.0.0/24\"\nrack = \"r1\"",
        ))
        .unwrap();
        let racks = config.rack_map();
        assert_eq!(racks.len(), 1);
        assert_eq!(racks[0].1, "r1");
        assert!(racks[0].0.contains(Ipv4Addr::new(10, 0, 0, 77)));
        assert!(parse(GOOD).unwrap().rack_map().is_empty());
    }

    /// GOOD plus groups, a host with its own settings, secrets and `[boot]`.
    fn with_node_settings() -> String {
        GOOD.replace(
            "hostname = \"worker-1\"\n",
            "hostname = \"worker-1\"\n\
             group = \"gpus\"\n\
             root_mode = \"ram\"\n\
             preinit = [\"echo host\"]\n\
             keep_system_services = [\"nvidia-persistenced\"]\n\
             lts_conf = { SCREEN_07 = \"host\" }\n\
             secrets = { kubeadm-join = \"host-value\", ca = \"host-ca\" }\n",
        ) + "\n\
             [boot]\n\
             default_group = \"workers\"\n\
             servers = [\"10.0.0.2:8080\", \"10.0.0.3:8080\"]\n\
             token_ttl_secs = 60\n\
             [[group]]\n\
             name = \"workers\"\n\
             preinit = [\"echo workers\"]\n\
             secrets = { kubeadm-join = \"workers-value\" }\n\
             [[group]]\n\
             name = \"gpus\"\n\
             root_mode = \"nbd\"\n\
             preinit = [\"echo gpus 1\", \"echo gpus 2\"]\n\
             fstab = [\"server:/home /home nfs defaults 0 0\"]\n\
             rcfile = [\"modprobe nvidia\"]\n\
             keep_system_services = [\"ssh\"]\n\
             lts_conf = { SCREEN_07 = \"group\", SERVER = \"10.0.0.2\" }\n\
             secrets = { kubeadm-join = \"gpus-value\", registry = \"gpus-registry\" }\n"
    }

    #[test]
    fn node_plans_join_group_then_host_and_host_secrets_win() {
        let config = parse(&with_node_settings()).unwrap();
        assert_eq!(config.boot_token_ttl(), Duration::from_secs(60));
        assert_eq!(config.boot_servers().len(), 2);
        let plans = config.node_plans().unwrap();
        let host = plans.entry(&[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(
            host.plan,
            NodePlan {
                hostname: Some("worker-1".into()),
                group: Some("gpus".into()),
                root_mode: RootMode::Ram,
                nbd_port: Some(10809),
                preinit: vec![
                    "echo gpus 1".into(),
                    "echo gpus 2".into(),
                    "echo host".into()
                ],
                fstab: vec!["server:/home /home nfs defaults 0 0".into()],
                rcfile: vec!["modprobe nvidia".into()],
                keep_system_services: vec!["ssh".into(), "nvidia-persistenced".into()],
                lts_conf: BTreeMap::from([
                    ("SCREEN_07".into(), "host".into()),
                    ("SERVER".into(), "10.0.0.2".into()),
                ]),
                firmware_from_peers: false,
            }
        );
        let secret_values: Vec<(&str, &str)> = host
            .secrets
            .secrets
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        assert_eq!(
            secret_values,
            [
                ("ca", "host-ca"),
                ("kubeadm-join", "host-value"),
                ("registry", "gpus-registry")
            ]
        );
        let unknown = plans.entry(&[2, 0, 0, 0, 0, 9]);
        assert_eq!(unknown.plan.group.as_deref(), Some("workers"));
        assert_eq!(unknown.plan.hostname, None);
        assert_eq!(unknown.plan.preinit, ["echo workers"]);
        assert_eq!(
            unknown.secrets.secrets["kubeadm-join"].expose(),
            "workers-value"
        );
        // Without [boot], the defaults.
        let plain = parse(GOOD).unwrap();
        assert_eq!(
            plain.boot_token_ttl(),
            Duration::from_secs(BOOT_TOKEN_TTL_SECS_DEFAULT)
        );
        assert_eq!(
            plain.node_plans().unwrap().plan(&[2, 0, 0, 0, 0, 9]).group,
            None
        );
    }

    #[test]
    fn node_settings_are_checked_with_their_key_paths() {
        let good = with_node_settings();
        check_error(
            &good.replace("\"echo gpus 2\"", "\"echo gpus\\nreboot\""),
            &["group[1].preinit[1]", "one line"],
        );
        check_error(
            &good.replace("\"echo host\"", "\"echo \\u0000\""),
            &["dhcp.host[0].preinit[0]", "NUL"],
        );
        check_error(
            &good.replace("[\"nvidia-persistenced\"]", "[\"nvidia persistenced\"]"),
            &["dhcp.host[0].keep_system_services[0]", "unit name"],
        );
        check_error(
            &good.replace("ca = \"host-ca\"", "\"../ca\" = \"host-ca\""),
            &["dhcp.host[0].secrets.\"../ca\"", "secret names"],
        );
        check_error(
            &good.replace("root_mode = \"ram\"", "root_mode = \"disk\""),
            &["unknown variant `disk`", "ram", "nbd", "lazy"],
        );
        // A lazy root's chunks come from the swarm, which this config does not serve.
        check_error(
            &good.replace("root_mode = \"ram\"", "root_mode = \"lazy\""),
            &["dhcp.host[0].root_mode", "[swarm]"],
        );
        // Booted peers are found through the tracker, which needs the swarm.
        check_error(
            &good.replace(
                "name = \"workers\"\n",
                "name = \"workers\"\nfirmware_from_peers = true\n",
            ),
            &["group[0].firmware_from_peers", "[swarm]"],
        );
        check_error(
            &good.replace("token_ttl_secs = 60", "token_ttl_secs = 0"),
            &["boot.token_ttl_secs", "1 to 3600"],
        );
        check_error(
            &good.replace("token_ttl_secs = 60", "token_ttl_secs = 3601"),
            &["boot.token_ttl_secs"],
        );
        check_error(
            &good.replace("\"10.0.0.3:8080\"", "\"0.0.0.0:8080\""),
            &["boot.servers[1]", "reach"],
        );
        check_error(
            &good.replace("\"10.0.0.3:8080\"", "\"10.0.0.3\""),
            &["invalid socket address"],
        );
        check_error(
            &good.replace("hostname = \"worker-1\"", "hostname = \"worker 1\""),
            &["dhcp.host[0].hostname"],
        );
        // GOOD ends with [nbd]; the node settings follow it from [boot] on.
        let without_nbd =
            good[..good.find("[nbd]").unwrap()].to_owned() + &good[good.find("[boot]").unwrap()..];
        check_error(&without_nbd, &["group[1].root_mode", "[nbd]"]);
        let many: Vec<String> = (0..60).map(|index| format!("\"echo {index}\"")).collect();
        let crowded = good
            .replace("\"echo gpus 1\", \"echo gpus 2\"", &many.join(", "))
            .replace("\"echo host\"", &many.join(", "));
        check_error(
            &crowded,
            &["dhcp.host[0].preinit", "group \"gpus\"", "over 99"],
        );
        let too_many: Vec<String> = (0..100).map(|index| format!("\"echo {index}\"")).collect();
        check_error(
            &good.replace("\"echo workers\"", &too_many.join(", ")),
            &["group[0].preinit", "at most 99"],
        );
    }

    #[test]
    fn syntax_errors_do_not_quote_lines_that_may_hold_secrets() {
        let inline = with_node_settings().replace("\"host-ca\"", "\"host-ca");
        check_error(&inline, &["line 21", "not shown"]);
        assert!(!parse(&inline).unwrap_err().to_string().contains("host-ca"));
        let table = format!(
            "{}\n[group.secrets]\nregistry = \"in-a-table\" junk\n",
            with_node_settings().replace(
                "secrets = { kubeadm-join = \"gpus-value\", registry = \"gpus-registry\" }\n",
                ""
            )
        );
        let message = parse(&table).unwrap_err().to_string();
        assert!(message.contains("not shown"), "{message}");
        assert!(!message.contains("in-a-table"), "{message}");
        // Other lines are still quoted, caret and all.
        check_error(
            &GOOD.replace("\"10.0.0.1\"]", "\"10.0.0.300\"]"),
            &["line 10", "10.0.0.300", "^"],
        );
    }

    #[test]
    fn errors_never_carry_secret_values() {
        let oversized = "s".repeat(SECRET_VALUE_BYTES_MAX + 1);
        let text = with_node_settings().replace("gpus-registry", &oversized);
        let message = parse(&text).unwrap_err().to_string();
        assert!(message.contains("group[1].secrets.registry"), "{message}");
        assert!(!message.contains("sss"), "{message}");
        let config = parse(&with_node_settings()).unwrap();
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("gpus-value") && !debug.contains("host-ca"),
            "{debug}"
        );
    }

    #[test]
    fn a_fleet_configuration_is_checked_like_a_file_and_replaces_the_fleet_sections() {
        let fleet_text = "[[dhcp.subnet]]\ncidr = \"10.5.0.0/24\"\nranges = [\"10.5.0.10-10.5.0.20\"]\n\n[[group]]\nname = \"workers\"\n";
        let fleet = FleetConfig::parse(fleet_text, Path::new("fleet.toml")).unwrap();
        let local = ServerConfig::parse(GOOD, Path::new("server.toml")).unwrap();
        let merged = local.with_fleet(&fleet).unwrap();
        let dhcp = merged.dhcp.as_ref().unwrap();
        assert_eq!(
            dhcp.interfaces,
            vec!["bm0".to_owned()],
            "interfaces stay the server's"
        );
        assert_eq!(dhcp.subnets.len(), 1);
        assert_eq!(dhcp.subnets[0].cidr, "10.5.0.0/24");
        assert_eq!(merged.groups.len(), 1);
        assert_eq!(merged.state_dir, local.state_dir);

        let unknown = FleetConfig::parse("state_dir = \"/x\"\n", Path::new("fleet.toml"))
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("line 1"), "{unknown}");
        let overlapping = FleetConfig::parse(
            "[[dhcp.subnet]]\ncidr = \"10.5.0.0/24\"\nranges = [\"10.6.0.1-10.6.0.2\"]\n",
            Path::new("fleet.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(overlapping.contains("dhcp.subnet[0]"), "{overlapping}");
    }
}
