#![expect(clippy::panic, reason = "tests name what they did not find")]

use super::*;
use crate::config::{FleetConfig, ServerConfig};

const SEED_DHCPD: &str = include_str!("../../../examples/ltsp/dhcpd.conf");
const SEED_LTS: &str = include_str!("../../../examples/ltsp/lts.conf");

fn fleet(import: &Import) -> FleetConfig {
    FleetConfig::parse(&import.fleet_toml, Path::new("fleet.toml")).unwrap()
}

fn finding<'a>(import: &'a Import, file: &str, line: usize) -> &'a Finding {
    import
        .findings
        .iter()
        .find(|finding| finding.file == file && finding.line == line)
        .unwrap_or_else(|| panic!("no finding for {file}:{line} in {:#?}", import.findings))
}

/// The example files of the LTSP-for-Kubernetes write-up convert whole: every line is in the
/// result or in the report.
#[test]
fn the_seed_files_convert() {
    let import = import_ltsp(SEED_DHCPD, SEED_LTS, &ImportOptions::default()).unwrap();
    let fleet = fleet(&import);
    let dhcp = fleet.dhcp.as_ref().unwrap();
    assert_eq!(dhcp.subnets.len(), 1);
    let subnet = &dhcp.subnets[0];
    assert_eq!(subnet.cidr, "10.9.0.0/16");
    assert_eq!(subnet.ranges, vec!["10.9.200.0-10.9.250.254".to_owned()]);
    assert_eq!(subnet.routers, vec![Ipv4Addr::new(10, 9, 0, 1)]);
    assert_eq!(subnet.dns_servers, vec![Ipv4Addr::new(10, 9, 0, 1)]);
    assert_eq!(subnet.domain_name.as_deref(), Some("example.org"));
    assert_eq!(subnet.lease_secs, u64::from(u32::MAX), "-1 is infinite");
    assert_eq!(subnet.next_server, None);
    assert_eq!(
        fleet.boot.as_ref().unwrap().default_group.as_deref(),
        Some("ltsp")
    );
    let group = &fleet.groups[0];
    assert_eq!(group.name, "ltsp");
    assert_eq!(group.keep_system_services.len(), 9);
    assert_eq!(group.keep_system_services[0], "ssh");
    assert_eq!(group.preinit.len(), 3);
    assert!(group.preinit[0].starts_with("ln -sf /usr/share/zoneinfo/Europe/Prague"));
    assert!(group.preinit[2].contains("ExecStart=/usr/bin/dockerd -H fd://"));
    assert_eq!(group.fstab.len(), 3);
    assert_eq!(group.rcfile.len(), 7);
    assert!(group.rcfile[1].contains("echo 'ssh-rsa AAAA"));
    assert!(group.rcfile[6].starts_with("kubeadm join --token 2a4576.504356e45fa3d365"));
    assert!(group.lts_conf.is_empty());

    // The shared-network's `}` is missing in the write-up's file.
    assert_eq!(finding(&import, "dhcpd.conf", 1).outcome, Outcome::Changed);
    assert!(
        finding(&import, "dhcpd.conf", 9)
            .reason
            .contains("serves the boot files")
    );
    for line in [11, 13] {
        let reported = finding(&import, "dhcpd.conf", line);
        assert_eq!(reported.outcome, Outcome::Changed);
        assert!(
            reported
                .statement
                .starts_with("filename \"/ltsp/amd64/grub/")
        );
    }
    assert!(
        finding(&import, "dhcpd.conf", 13)
            .reason
            .contains("dhcp.boot.bios_file")
    );
    assert!(
        finding(&import, "dhcpd.conf", 11)
            .reason
            .contains("dhcp.boot.uefi_x64_file")
    );
    assert!(finding(&import, "lts.conf", 0).reason.contains("NBD"));
    let join = finding(&import, "lts.conf", 16);
    assert_eq!(
        join.outcome,
        Outcome::Warning,
        "the kubeadm token is in clear"
    );
    assert!(join.reason.contains("secrets"));
    assert_eq!(import.findings.len(), 6, "{:#?}", import.findings);
    assert!(
        import
            .fleet_toml
            .contains("# dhcpd.conf:11: changed: `filename")
    );
    assert_eq!(
        import.summary(),
        "converted 1 subnet(s), 0 host(s), 1 group(s); 0 line(s) not converted, 5 changed, 0 \
         kept as lts.conf variables, 1 warning(s)"
    );
}

/// The converted fleet merges into a server's file, and its nodes get the seed's settings in
/// lts.conf order.
#[test]
fn the_seed_nodes_get_their_settings() {
    let import = import_ltsp(SEED_DHCPD, SEED_LTS, &ImportOptions::default()).unwrap();
    let server = ServerConfig::parse(
        "state_dir = \"/var/lib/bootmesh\"\n[dhcp]\ninterfaces = [\"eth0\"]\n[http]\nlisten = \
         \"0.0.0.0:80\"\nroot = \"/srv\"\n",
        Path::new("server.toml"),
    )
    .unwrap()
    .with_fleet(&fleet(&import))
    .unwrap();
    let plans = server.node_plans().unwrap();
    let plan = plans.plan(&[0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(plan.group.as_deref(), Some("ltsp"));
    assert_eq!(plan.rcfile.len(), 7);
    assert!(plan.rcfile[4].starts_with("echo 1 > /proc/sys/net/ipv4/ip_forward"));
    assert!(server.dhcp_config().unwrap().is_some());
}

const SITE_DHCPD: &str = r#"
# A site with two segments, known hosts, a pool and things bootmesh has no use for.
ddns-update-style none;
log-facility local7;
option arch code 93 = unsigned integer 16;
option domain-name "lab.example";
default-lease-time 3600;
max-lease-time 7200;
use-host-decl-names on;

subnet 10.9.0.0 netmask 255.255.255.0 {
  option routers 10.9.0.1;
  option domain-name-servers 10.9.0.2, 10.9.0.3;
  option ntp-servers 10.9.0.4;
  pool {
    range 10.9.0.100 10.9.0.150;
    deny unknown-clients;
  }
  range dynamic-bootp 10.9.0.200;
  if option arch = 00:0b {
    filename "arm/grubaa64.efi";
  } elsif option arch = 7 {
    filename "x64/core.efi";
    option vendor-class-identifier "x";
  } else {
    filename "pxelinux.0";
  }
}

group {
  default-lease-time 600;
  subnet 10.10.0.0 netmask 255.255.0.0 {
    option routers 10.10.0.1;
    range 10.10.1.0 10.10.1.255;
  }
  host node1 {
    hardware ethernet 52:54:00:00:00:01;
    fixed-address 10.9.0.11;
    option routers 10.9.0.254;
  }
}
host node2 { hardware ethernet 52:54:00:00:00:02; fixed-address 10.9.0.12; option host-name "second"; }
host no-mac { fixed-address 10.9.0.13; }
failover peer "dhcp-failover" { primary; }
if exists user-class and option user-class = "iPXE" { filename "boot.ipxe"; }
"#;

const SITE_LTS: &str = r#"
[default]
SERVER = 10.9.0.1
LTSP_NBD_TO_RAM = true
PREINIT_01_A = "echo a"
RCFILE_01_JOIN = "echo join"
KEEP_SYSTEM_SERVICES = ssh

[gpu]
RCFILE_02_GPU = "nvidia-smi -pm 1"
SCREEN_07 = ldm

# Adds to the default: a host entry with the addition.
[52:54:00:00:00:01]
LIKE = gpu
HOSTNAME = gpu-one

# Switches a default entry off: a group of its own.
[second]
RCFILE_01_JOIN = ""
LTSP_NBD_TO_RAM = false

# A MAC dhcpd.conf does not know: a new host.
[52:54:00:00:00:09]
FSTAB_01_DATA = "/dev/sdb1 /data ext4 nofail 0 0"

[10.9.0.99]
PREINIT_02_X = "true"

[unused]
PREINIT_05 = "echo unused"
"#;

#[test]
fn a_site_with_hosts_groups_and_sections_converts_and_reports_the_rest() {
    let import = import_ltsp(SITE_DHCPD, SITE_LTS, &ImportOptions::default()).unwrap();
    let fleet = fleet(&import);
    let dhcp = fleet.dhcp.as_ref().unwrap();
    assert_eq!(dhcp.subnets.len(), 2);
    let first = &dhcp.subnets[0];
    assert_eq!(
        first.ranges,
        vec![
            "10.9.0.200-10.9.0.200".to_owned(),
            "10.9.0.100-10.9.0.150".to_owned()
        ]
    );
    assert_eq!(first.dns_servers.len(), 2);
    assert_eq!(first.lease_secs, 3600);
    assert_eq!(first.domain_name.as_deref(), Some("lab.example"));
    let second = &dhcp.subnets[1];
    assert_eq!(second.cidr, "10.10.0.0/16");
    assert_eq!(second.lease_secs, 600, "the group's lease time");

    let host = |mac: [u8; 6]| {
        dhcp.hosts
            .iter()
            .find(|host| parse_mac(&host.mac).unwrap() == mac)
            .unwrap_or_else(|| panic!("host {mac:?} in {}", import.fleet_toml))
    };
    let node1 = host([0x52, 0x54, 0, 0, 0, 1]);
    assert_eq!(node1.address, Some(Ipv4Addr::new(10, 9, 0, 11)));
    assert_eq!(
        node1.hostname.as_deref(),
        Some("gpu-one"),
        "lts.conf HOSTNAME wins"
    );
    assert_eq!(node1.group, None);
    assert_eq!(node1.rcfile, vec!["nvidia-smi -pm 1".to_owned()]);
    assert_eq!(
        node1.lts_conf.get("SCREEN_07").map(String::as_str),
        Some("ldm")
    );
    let node2 = host([0x52, 0x54, 0, 0, 0, 2]);
    assert_eq!(node2.hostname.as_deref(), Some("second"));
    assert_eq!(node2.group.as_deref(), Some("ltsp-second"));
    let own_group = fleet
        .groups
        .iter()
        .find(|group| group.name == "ltsp-second")
        .unwrap();
    assert!(own_group.rcfile.is_empty(), "the emptied entry is off");
    assert_eq!(own_group.preinit, vec!["echo a".to_owned()]);
    assert_eq!(own_group.root_mode, crate::plan::RootMode::Nbd);
    let new_host = host([0x52, 0x54, 0, 0, 0, 9]);
    assert_eq!(new_host.fstab.len(), 1);
    let default_group = fleet
        .groups
        .iter()
        .find(|group| group.name == "ltsp")
        .unwrap();
    assert_eq!(default_group.root_mode, crate::plan::RootMode::Ram);
    assert_eq!(
        default_group.lts_conf.get("SERVER").map(String::as_str),
        Some("10.9.0.1")
    );
    assert!(fleet.groups.iter().any(|group| group.name == "ltsp-unused"));
    assert!(
        !fleet.groups.iter().any(|group| group.name == "ltsp-gpu"),
        "only pulled in by LIKE"
    );

    let reported = |line: usize| finding(&import, "dhcpd.conf", line).clone();
    assert_eq!(reported(4).outcome, Outcome::NotConverted, "log-facility");
    assert!(reported(8).reason.contains("maximum"), "max-lease-time");
    assert!(reported(14).statement.starts_with("option ntp-servers"));
    assert!(
        reported(17).reason.contains("does not know"),
        "deny unknown-clients"
    );
    assert!(reported(21).reason.contains("uefi_arm64_file"));
    assert!(reported(23).reason.contains("uefi_x64_file"));
    assert!(reported(24).reason.contains("only `filename`"));
    assert!(reported(26).reason.contains("bios_file"));
    assert!(
        reported(39).reason.contains("from its subnet"),
        "host option routers"
    );
    assert!(reported(43).reason.contains("hardware ethernet"));
    assert!(reported(44).reason.contains("Raft"));
    assert!(reported(45).reason.contains("iPXE"));
    let lts_reported = |line: usize| finding(&import, "lts.conf", line).clone();
    assert_eq!(lts_reported(3).outcome, Outcome::Kept, "SERVER");
    assert!(lts_reported(19).reason.contains("group of its own"));
    assert!(lts_reported(27).reason.contains("fixed address"));
    assert!(lts_reported(30).reason.contains("no host names yet"));
    assert!(
        !import
            .findings
            .iter()
            .any(|finding| finding.file == "lts.conf" && finding.line == 0),
        "LTSP_NBD_TO_RAM is set"
    );
}

#[test]
fn boot_files_can_be_kept() {
    let options = ImportOptions {
        keep_boot_files: true,
        ..ImportOptions::default()
    };
    let import = import_ltsp(SITE_DHCPD, "", &options).unwrap();
    let fleet = fleet(&import);
    let boot = &fleet.dhcp.as_ref().unwrap().boot;
    assert_eq!(boot.uefi_arm64_file, "arm/grubaa64.efi");
    assert_eq!(boot.uefi_x64_file, "x64/core.efi");
    assert_eq!(boot.bios_file, "pxelinux.0");
    assert!(fleet.groups.is_empty() && fleet.boot.is_none());
    let seed = import_ltsp(SEED_DHCPD, "", &options).unwrap();
    assert!(
        finding(&seed, "dhcpd.conf", 9)
            .reason
            .contains("a name, not an address")
    );
}

#[test]
fn broken_files_are_refused_with_their_line() {
    let error = import_ltsp(
        "subnet 10.0.0.0 netmask 255.0.0.0 {\n range 10.0.0.1\n}",
        "",
        &ImportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.starts_with("dhcpd.conf:2:"), "{error}");
    let error = import_ltsp(
        "",
        "[default]\nPREINIT_01 = \"x\n",
        &ImportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.starts_with("lts.conf:2:"), "{error}");
    let overlapping = "subnet 10.0.0.0 netmask 255.255.255.0 { range 10.0.0.5 10.0.1.9; }";
    let error = import_ltsp(overlapping, "", &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("not inside"), "{error}");
}

#[test]
fn like_loops_and_missing_sections_are_reported() {
    let lts = "[default]\nLIKE = a\n[a]\nLIKE = b\nX = 1\n[b]\nLIKE = a\n[c]\nLIKE = nowhere\n";
    let import = import_ltsp("", lts, &ImportOptions::default()).unwrap();
    assert!(
        import
            .findings
            .iter()
            .any(|finding| finding.reason.contains("comes back to itself")),
        "{:#?}",
        import.findings
    );
    assert!(
        import
            .findings
            .iter()
            .any(|finding| finding.reason == "names no section")
    );
}
