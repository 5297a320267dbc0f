//! The server's configuration file: typed serde structs, unknown keys refused, every value
//! checked before anything starts. Errors name the line (syntax, types, unknown keys) or the key
//! path (values that parse but make no sense together).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use boot_services::dhcp::{
    AddressRange, BootConfig, DhcpConfig, DhcpMode, HostConfig, Ipv4Network, SubnetConfig,
};
use serde::Deserialize;

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
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
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
    }
}
