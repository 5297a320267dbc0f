//! Typed configuration of the DHCP server core. `node` loads it from TOML; this crate only
//! receives the finished structs.

use std::net::Ipv4Addr;
use std::time::Duration;

/// Whether this server hands out addresses or only boot information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DhcpMode {
    /// A full DHCP server: addresses, options and boot files.
    #[default]
    Authoritative,
    /// proxyDHCP (PXE spec 2.1): the site's own DHCP server hands out addresses; we answer PXE
    /// clients only, with boot information and no address, on ports 67 and 4011.
    Proxy,
}

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Network {
    /// The network address.
    pub address: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix_length: u8,
}

impl Ipv4Network {
    /// The network mask.
    pub fn mask(&self) -> Ipv4Addr {
        let prefix = u32::from(self.prefix_length.min(32));
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ipv4Addr::from(mask)
    }
    /// Whether `address` is inside the network.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let mask = u32::from(self.mask());
        u32::from(address) & mask == u32::from(self.address) & mask
    }
    /// The directed broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !u32::from(self.mask()))
    }
}

/// An inclusive range of dynamically assignable addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    /// First address handed out.
    pub first: Ipv4Addr,
    /// Last address handed out.
    pub last: Ipv4Addr,
}

/// One subnet served, reached directly on an interface or through relays whose giaddr lies in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetConfig {
    /// The subnet.
    pub network: Ipv4Network,
    /// Dynamic ranges; may be empty for a subnet of static hosts only.
    pub ranges: Vec<AddressRange>,
    /// Option 3.
    pub routers: Vec<Ipv4Addr>,
    /// Option 6.
    pub dns_servers: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 51 for dynamic leases; T1 (58) and T2 (59) are 1/2 and 7/8 of it.
    pub lease_time: Duration,
    /// The address boot clients fetch files from (siaddr, option 66, URLs). Defaults to the
    /// address the request arrived on.
    pub next_server: Option<Ipv4Addr>,
}

/// A host known by its hardware address: the `lts.conf` `[MAC]` section's DHCP side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Ethernet address.
    pub hardware_address: [u8; 6],
    /// Fixed address; when absent the host takes a dynamic lease.
    pub address: Option<Ipv4Addr>,
    /// Option 12.
    pub hostname: Option<String>,
}

/// What each kind of boot client is handed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// TFTP path of the iPXE build for legacy BIOS PXE ROMs (client architecture 0).
    pub bios_file: String,
    /// TFTP path of iPXE for x86-64 UEFI PXE (architectures 7 and 9).
    pub uefi_x64_file: String,
    /// TFTP path of iPXE for ARM64 UEFI PXE (architecture 11).
    pub uefi_arm64_file: String,
    /// HTTP path (under the HTTP port) of iPXE for UEFI HTTP boot (architectures 16 and 19
    /// take the x86-64 and ARM64 files respectively).
    pub http_port: u16,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            bios_file: "undionly.kpxe".into(),
            uefi_x64_file: "ipxe.efi".into(),
            uefi_arm64_file: "ipxe-arm64.efi".into(),
            http_port: 80,
        }
    }
}

/// Everything the DHCP core needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// Authoritative server or proxyDHCP.
    pub mode: DhcpMode,
    /// Subnets served.
    pub subnets: Vec<SubnetConfig>,
    /// Hosts known by MAC.
    pub hosts: Vec<HostConfig>,
    /// Boot files and URLs.
    pub boot: BootConfig,
    /// How long an offered address stays reserved for the client it was offered to.
    pub offer_hold: Duration,
    /// Bound on outstanding offers; a flood of new clients evicts the oldest offers, never a
    /// lease.
    pub offers_max: usize,
    /// Bound on lease changes waiting for their commit.
    pub pending_commits_max: usize,
    /// How long a declined address stays out of use.
    pub decline_quarantine: Duration,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        Self {
            mode: DhcpMode::Authoritative,
            subnets: Vec::new(),
            hosts: Vec::new(),
            boot: BootConfig::default(),
            offer_hold: Duration::from_secs(30),
            offers_max: 8192,
            pending_commits_max: 8192,
            decline_quarantine: Duration::from_secs(3600),
        }
    }
}
