//! `bootmesh config import-ltsp`: an LTSP site's ISC `dhcpd.conf` and `lts.conf` turned into a
//! fleet configuration. Every statement and variable is either expressed in the result or
//! reported with its line and the reason; nothing is dropped without a word.
//!
//! What changes on purpose (and is reported as such): nodes chain into bootmesh's iPXE and
//! boot script rather than LTSP's bootloader, so `filename` and `next-server` are not carried
//! over unless asked; and LTSP's NBD root becomes bootmesh's RAM root unless lts.conf says
//! `LTSP_NBD_TO_RAM=false`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use boot_services::ltsp::dhcpd_conf as dhcpd;
use boot_services::ltsp::lts_conf as lts;
use dhcpd::Statement;

use crate::config::{FleetConfig, parse_mac};
use crate::plan::{SETTINGS_PER_LIST_MAX, is_valid_setting_line, is_valid_unit_name};

/// Why the files could not be converted at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file is not well-formed.
    #[error(transparent)]
    Syntax(#[from] boot_services::ltsp::ParseError),
    /// The result did not pass the checks `config apply` runs (a converter bug, or values that
    /// only conflict once together, such as overlapping ranges).
    #[error("the converted configuration is not valid: {0}")]
    Invalid(#[from] crate::config::ConfigError),
}

/// How a source line fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Not expressed in the result.
    NotConverted,
    /// Expressed, but behaves differently under bootmesh.
    Changed,
    /// Kept as an lts.conf variable that bootmesh carries but does not act on.
    Kept,
    /// Converted as written, but unsafe as written.
    Warning,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::NotConverted => "not converted",
            Outcome::Changed => "changed",
            Outcome::Kept => "kept",
            Outcome::Warning => "warning",
        }
    }
}

/// One reported line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `dhcpd.conf` or `lts.conf`.
    pub file: &'static str,
    /// 1-based line; 0 for the file as a whole.
    pub line: usize,
    /// How it fared.
    pub outcome: Outcome,
    /// The statement as written.
    pub statement: String,
    /// Why, and what to do about it.
    pub reason: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{}:{}: {}: `{}`: {}",
            self.file,
            self.line,
            self.outcome.label(),
            self.statement,
            self.reason
        )
    }
}

/// Choices the operator makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// The group `[default]` becomes, and every unknown node's group.
    pub group: String,
    /// Serve dhcpd.conf's `filename`s (and honour `next-server`) instead of bootmesh's iPXE.
    pub keep_boot_files: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            group: "ltsp".to_owned(),
            keep_boot_files: false,
        }
    }
}

/// The result: the fleet configuration's text, and what it could not express.
#[derive(Debug, Clone)]
pub struct Import {
    /// fleet.toml, checked as `config apply` checks it.
    pub fleet_toml: String,
    /// Reported lines, in file and line order.
    pub findings: Vec<Finding>,
    /// What was converted, for the summary.
    pub counts: Counts,
}

/// What the result holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `[[dhcp.subnet]]` entries.
    pub subnets: usize,
    /// `[[dhcp.host]]` entries.
    pub hosts: usize,
    /// `[[group]]` entries.
    pub groups: usize,
}

impl Import {
    /// One line for the end of the report.
    pub fn summary(&self) -> String {
        let count = |outcome| {
            self.findings
                .iter()
                .filter(|finding| finding.outcome == outcome)
                .count()
        };
        format!(
            "converted {} subnet(s), {} host(s), {} group(s); {} line(s) not converted, {} changed, \
             {} kept as lts.conf variables, {} warning(s)",
            self.counts.subnets,
            self.counts.hosts,
            self.counts.groups,
            count(Outcome::NotConverted),
            count(Outcome::Changed),
            count(Outcome::Kept),
            count(Outcome::Warning),
        )
    }
}

/// Converts `dhcpd_conf` and `lts_conf` (either may be empty).
pub fn import_ltsp(
    dhcpd_conf: &str,
    lts_conf: &str,
    options: &ImportOptions,
) -> Result<Import, ImportError> {
    let parsed = dhcpd::parse(dhcpd_conf)?;
    let sections = lts::parse(lts_conf)?;
    let mut importer = Importer {
        options: options.clone(),
        ..Importer::default()
    };
    for line in parsed.unclosed {
        importer.report(
            "dhcpd.conf",
            line,
            Outcome::Changed,
            dhcpd_conf
                .lines()
                .nth(line - 1)
                .unwrap_or_default()
                .trim()
                .to_owned(),
            "this block is never closed (dhcpd would refuse the file); it is read as if closed \
             at the end of the file",
        );
    }
    importer.statements(&parsed.statements, &Scope::default(), Place::Global);
    importer.lts_sections(&sections);
    let fleet_toml = importer.render();
    FleetConfig::parse(&fleet_toml, Path::new("converted fleet.toml"))?;
    let mut findings = importer.findings;
    findings.sort_by(|left, right| (left.file, left.line).cmp(&(right.file, right.line)));
    Ok(Import {
        fleet_toml,
        findings,
        counts: Counts {
            subnets: importer.subnets.len(),
            hosts: importer.hosts.len(),
            groups: importer.groups.len(),
        },
    })
}

/// Parameters a dhcpd scope passes to the scopes inside it.
#[derive(Debug, Clone, Default)]
struct Scope {
    routers: Option<Vec<Ipv4Addr>>,
    dns_servers: Option<Vec<Ipv4Addr>>,
    domain_name: Option<String>,
    lease_secs: Option<u64>,
    max_lease_secs: Option<(u64, usize)>,
    next_server: Option<Ipv4Addr>,
    use_host_decl_names: bool,
    /// Names declared for option 93 (`option arch code 93 = unsigned integer 16;`).
    architecture_options: BTreeSet<String>,
}

/// Where a statement stands, for what it may mean there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Global,
    SharedNetwork,
    Subnet(usize),
    Pool(usize),
    Group,
}

#[derive(Debug, Clone)]
struct Subnet {
    line: usize,
    cidr: String,
    ranges: Vec<String>,
    routers: Vec<Ipv4Addr>,
    dns_servers: Vec<Ipv4Addr>,
    domain_name: Option<String>,
    lease_secs: Option<u64>,
    next_server: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default)]
struct Host {
    /// Where it came from (`dhcpd.conf:12`, `lts.conf:4`).
    origin: String,
    mac: Option<[u8; 6]>,
    address: Option<Ipv4Addr>,
    hostname: Option<String>,
    group: Option<String>,
    settings: Settings,
}

/// What lts.conf says for a node or group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Settings {
    root_mode: Option<&'static str>,
    preinit: Vec<String>,
    fstab: Vec<String>,
    rcfile: Vec<String>,
    keep_system_services: Vec<String>,
    lts_conf: BTreeMap<String, String>,
}

impl Settings {
    fn lists(&self) -> [&Vec<String>; 4] {
        [
            &self.preinit,
            &self.fstab,
            &self.rcfile,
            &self.keep_system_services,
        ]
    }

    /// What a host of a group with `self` adds to reach `node`, if adding is enough (every
    /// list of the group is the start of the node's, and no variable is dropped).
    fn addition_to_reach(&self, node: &Settings) -> Option<Settings> {
        let mut addition = Settings {
            root_mode: (node.root_mode != self.root_mode)
                .then_some(node.root_mode.unwrap_or("ram")),
            ..Settings::default()
        };
        let targets = [
            &mut addition.preinit,
            &mut addition.fstab,
            &mut addition.rcfile,
            &mut addition.keep_system_services,
        ];
        for ((group_list, node_list), target) in
            self.lists().into_iter().zip(node.lists()).zip(targets)
        {
            let rest = node_list.strip_prefix(group_list.as_slice())?;
            target.extend(rest.iter().cloned());
        }
        for (name, value) in &node.lts_conf {
            if self.lts_conf.get(name) != Some(value) {
                addition.lts_conf.insert(name.clone(), value.clone());
            }
        }
        if self
            .lts_conf
            .keys()
            .any(|name| !node.lts_conf.contains_key(name))
        {
            return None;
        }
        Some(addition)
    }
}

#[derive(Debug, Clone)]
struct Group {
    name: String,
    origin: String,
    settings: Settings,
}

#[derive(Debug, Default)]
struct Importer {
    options: ImportOptions,
    subnets: Vec<Subnet>,
    hosts: Vec<Host>,
    groups: Vec<Group>,
    default_group: Option<String>,
    /// `[dhcp.boot]` files, when `keep_boot_files`: (bios, uefi x64, uefi arm64).
    boot_files: [Option<(String, usize)>; 3],
    findings: Vec<Finding>,
}

/// The boot-file slots, as `[dhcp.boot]` names them.
const BOOT_FILE_KEYS: [&str; 3] = ["bios_file", "uefi_x64_file", "uefi_arm64_file"];

fn ip_list(statement: &Statement, from: usize) -> Result<Vec<Ipv4Addr>, String> {
    let mut addresses = Vec::new();
    for token in statement.words.iter().skip(from) {
        if token.text == "," {
            continue;
        }
        addresses.push(token.text.parse::<Ipv4Addr>().map_err(|_| {
            format!(
                "{:?} is a name, not an address: bootmesh needs addresses here (resolve it and \
                 write the address)",
                token.text
            )
        })?);
    }
    Ok(addresses)
}

fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0).then_some(prefix as u8)
}

/// The option-93 client architecture in `text` (`00:07`, `7`, `0x07`).
fn architecture_code(text: &str) -> Option<u16> {
    if text.contains(':') {
        let mut value: u16 = 0;
        for part in text.split(':') {
            value = value.checked_mul(256)? + u16::from(u8::from_str_radix(part, 16).ok()?);
        }
        return Some(value);
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return u16::from_str_radix(hex, 16).ok();
    }
    text.parse().ok()
}

/// The `[dhcp.boot]` slot for an option-93 architecture (RFC 4578 and IANA's registry).
fn boot_file_slot(architecture: Option<u16>) -> Option<usize> {
    match architecture {
        None | Some(0) => Some(0),
        Some(7 | 9 | 0x10) => Some(1),
        Some(0x0b | 0x13) => Some(2),
        Some(_) => None,
    }
}

fn lease_secs(text: &str) -> Option<u64> {
    let value: i64 = text.parse().ok()?;
    // -1 (and anything beyond 32 bits) is dhcpd's infinite lease, 0xffffffff on the wire.
    if value < 0 || value >= i64::from(u32::MAX) {
        return Some(u64::from(u32::MAX));
    }
    (value > 0).then_some(value as u64)
}

impl Importer {
    fn report(
        &mut self,
        file: &'static str,
        line: usize,
        outcome: Outcome,
        statement: String,
        reason: impl Into<String>,
    ) {
        self.findings.push(Finding {
            file,
            line,
            outcome,
            statement,
            reason: reason.into(),
        });
    }

    fn not_converted(&mut self, statement: &Statement, reason: impl Into<String>) {
        self.report(
            "dhcpd.conf",
            statement.line,
            Outcome::NotConverted,
            statement.display(),
            reason,
        );
    }

    fn statements(&mut self, statements: &[Statement], scope: &Scope, place: Place) {
        // Parameters apply to the whole scope wherever they stand in it, as in dhcpd.
        let mut scope = scope.clone();
        for statement in statements {
            if statement.block.is_none() {
                self.parameter(&mut scope, statement, place);
            }
        }
        if let Place::Subnet(index) = place {
            self.fill_subnet(index, &scope);
        }
        let mut index = 0;
        while let Some(statement) = statements.get(index) {
            index += 1;
            let Some(block) = &statement.block else {
                continue;
            };
            match (statement.word(0), place) {
                ("shared-network", Place::Global) => {
                    self.statements(block, &scope, Place::SharedNetwork);
                }
                ("subnet", Place::Global | Place::SharedNetwork | Place::Group) => {
                    self.subnet(statement, block, &scope);
                }
                ("group", _) => self.statements(block, &scope, Place::Group),
                ("pool", Place::Subnet(subnet)) => {
                    self.statements(block, &scope, Place::Pool(subnet));
                }
                ("pool", Place::SharedNetwork) => self.not_converted(
                    statement,
                    "a pool directly in a shared-network: move it into its subnet",
                ),
                (
                    "host",
                    Place::Global | Place::SharedNetwork | Place::Subnet(_) | Place::Group,
                ) => {
                    self.host(statement, block, &scope);
                }
                ("if", _) => {
                    let mut chain = vec![statement];
                    while let Some(next) = statements.get(index) {
                        if matches!(next.word(0), "elsif" | "else") && next.block.is_some() {
                            chain.push(next);
                            index += 1;
                        } else {
                            break;
                        }
                    }
                    self.conditional(&chain, &scope);
                }
                ("elsif" | "else", _) => {
                    self.not_converted(statement, "an else without its if");
                }
                ("failover", _) => self.not_converted(
                    statement,
                    "DHCP failover is replaced by the bootmesh cluster: every server answers, and \
                     leases are replicated through Raft",
                ),
                ("class" | "subclass", _) => self.not_converted(
                    statement,
                    "client classes are not converted: bootmesh tells clients apart by MAC \
                     ([[dhcp.host]]) and by client architecture (the [dhcp.boot] files)",
                ),
                ("key" | "zone", _) => {
                    self.not_converted(statement, "bootmesh does no dynamic DNS updates")
                }
                ("on", _) => self.not_converted(
                    statement,
                    "event hooks (on commit/release/expiry) are not converted",
                ),
                _ => self.not_converted(statement, "not understood here; not converted"),
            }
        }
    }

    /// A statement without a block.
    fn parameter(&mut self, scope: &mut Scope, statement: &Statement, place: Place) {
        let words: Vec<&str> = statement
            .words
            .iter()
            .map(|token| token.text.as_str())
            .collect();
        match words.as_slice() {
            ["option", "routers", ..] => match ip_list(statement, 2) {
                Ok(routers) => scope.routers = Some(routers),
                Err(reason) => self.not_converted(statement, reason),
            },
            ["option", "domain-name-servers", ..] => match ip_list(statement, 2) {
                Ok(servers) => scope.dns_servers = Some(servers),
                Err(reason) => self.not_converted(statement, reason),
            },
            ["option", "domain-name", name] => scope.domain_name = Some((*name).to_owned()),
            ["default-lease-time", value] => match lease_secs(value) {
                Some(secs) => scope.lease_secs = Some(secs),
                None => self.not_converted(statement, "not a lease time in seconds"),
            },
            ["max-lease-time", value] => match lease_secs(value) {
                Some(secs) => scope.max_lease_secs = Some((secs, statement.line)),
                None => self.not_converted(statement, "not a lease time in seconds"),
            },
            ["min-lease-time", _] => self.not_converted(
                statement,
                "bootmesh grants every client its subnet's lease_secs; there is no minimum to \
                 raise a client's request to",
            ),
            ["authoritative"] => {}
            ["not", "authoritative"] => self.not_converted(
                statement,
                "bootmesh answers for the subnets it is given; to only add boot information \
                 beside another DHCP server, set `mode = \"proxy\"` in each server's [dhcp]",
            ),
            ["ddns-update-style", "none"] | ["ddns-updates", "off"] => {}
            [
                "ddns-update-style" | "ddns-updates" | "ddns-domainname" | "ddns-hostname",
                ..,
            ] => {
                self.not_converted(statement, "bootmesh does no dynamic DNS updates");
            }
            ["use-host-decl-names", "on" | "true"] => scope.use_host_decl_names = true,
            ["use-host-decl-names", "off" | "false"] => scope.use_host_decl_names = false,
            ["option", name, "code", "93", "=", ..] => {
                scope.architecture_options.insert((*name).to_owned());
            }
            ["option", "subnet-mask", _] | ["option", "broadcast-address", _]
                if matches!(place, Place::Subnet(_)) =>
            {
                // Both follow from the subnet's netmask, which bootmesh sends.
            }
            ["allow" | "deny" | "ignore", "booting"] if words[0] == "allow" => {}
            ["allow" | "deny" | "ignore", "unknown-clients"] if words[0] != "allow" => self
                .not_converted(
                    statement,
                    "bootmesh serves nodes it does not know (they boot the default group): list \
                     only known subnets, or give unknown nodes a group that does nothing",
                ),
            ["next-server", server] => {
                if !self.options.keep_boot_files {
                    self.report(
                        "dhcpd.conf",
                        statement.line,
                        Outcome::Changed,
                        statement.display(),
                        "not carried over: every bootmesh server serves the boot files itself \
                         (iPXE, then its boot script); --keep-boot-files keeps LTSP's",
                    );
                } else {
                    match server.parse::<Ipv4Addr>() {
                        Ok(address) => scope.next_server = Some(address),
                        Err(_) => self.not_converted(
                            statement,
                            "a name, not an address: write the boot server's address",
                        ),
                    }
                }
            }
            ["filename", file] => self.boot_file(statement, None, file),
            ["range", ..] => self.range(statement, place),
            ["include", _] => self.not_converted(
                statement,
                "included files are not followed: convert that file too and merge the results",
            ),
            _ => self.not_converted(statement, "bootmesh has no equivalent; not converted"),
        }
    }

    fn boot_file(&mut self, statement: &Statement, architecture: Option<u16>, file: &str) {
        let Some(slot) = boot_file_slot(architecture) else {
            self.not_converted(
                statement,
                "bootmesh serves BIOS, x86-64 UEFI and ARM64 UEFI clients; not this architecture",
            );
            return;
        };
        if !self.options.keep_boot_files {
            self.report(
                "dhcpd.conf",
                statement.line,
                Outcome::Changed,
                statement.display(),
                format!(
                    "not carried over: these clients get bootmesh's iPXE (dhcp.boot.{}), which \
                     loads bootmesh's boot script; --keep-boot-files serves this file instead",
                    BOOT_FILE_KEYS[slot]
                ),
            );
            return;
        }
        match &self.boot_files[slot] {
            Some((kept, line)) if kept != file => {
                let reason = format!(
                    "bootmesh has one {} for the fleet; line {line}'s {kept:?} is kept",
                    BOOT_FILE_KEYS[slot]
                );
                self.not_converted(statement, reason);
            }
            _ => self.boot_files[slot] = Some((file.to_owned(), statement.line)),
        }
    }

    fn conditional(&mut self, chain: &[&Statement], scope: &Scope) {
        let mut branches = Vec::new();
        for statement in chain {
            let condition: Vec<&str> = statement
                .words
                .iter()
                .skip(1)
                .map(|token| token.text.as_str())
                .collect();
            let architecture = match (statement.word(0), condition.as_slice()) {
                ("else", []) => None,
                (_, ["option", name, "=", value])
                    if scope.architecture_options.contains(*name)
                        || matches!(
                            *name,
                            "architecture"
                                | "arch"
                                | "pxe-system-type"
                                | "architecture-type"
                                | "client-architecture"
                        ) =>
                {
                    match architecture_code(value) {
                        Some(code) => Some(code),
                        None => {
                            self.not_converted(statement, "not an architecture number");
                            return;
                        }
                    }
                }
                _ => {
                    let reason = if statement.display().contains("iPXE") {
                        "iPXE detection is built in: bootmesh answers iPXE with its boot script \
                         and everything else with iPXE"
                    } else {
                        "only conditions on the client architecture (option 93) are converted"
                    };
                    for statement in chain {
                        self.not_converted(statement, reason);
                    }
                    return;
                }
            };
            branches.push((statement, architecture));
        }
        for (statement, architecture) in branches {
            for inner in statement.block.iter().flatten() {
                match (inner.word(0), inner.words.len(), &inner.block) {
                    ("filename", 2, None) => self.boot_file(inner, architecture, inner.word(1)),
                    _ => self.not_converted(
                        inner,
                        "inside an architecture condition only `filename` is converted",
                    ),
                }
            }
        }
    }

    fn range(&mut self, statement: &Statement, place: Place) {
        let (Place::Subnet(subnet) | Place::Pool(subnet)) = place else {
            self.not_converted(statement, "a range outside a subnet");
            return;
        };
        let words: Vec<&str> = statement
            .words
            .iter()
            .skip(1)
            .map(|token| token.text.as_str())
            .filter(|word| *word != "dynamic-bootp")
            .collect();
        let parsed: Vec<Option<Ipv4Addr>> = words.iter().map(|word| word.parse().ok()).collect();
        let range = match parsed.as_slice() {
            [Some(first)] => format!("{first}-{first}"),
            [Some(first), Some(last)] => format!("{first}-{last}"),
            _ => {
                self.not_converted(statement, "not `range FIRST [LAST];`");
                return;
            }
        };
        if let Some(target) = self.subnets.get_mut(subnet) {
            target.ranges.push(range);
        }
    }

    fn subnet(&mut self, statement: &Statement, block: &[Statement], scope: &Scope) {
        let network = statement.word(1).parse::<Ipv4Addr>();
        let mask = statement.word(3).parse::<Ipv4Addr>();
        let (Ok(network), "netmask", Ok(mask), 4) =
            (network, statement.word(2), mask, statement.words.len())
        else {
            self.not_converted(statement, "not `subnet ADDRESS netmask MASK { ... }`");
            return;
        };
        let Some(prefix) = netmask_prefix(mask) else {
            self.not_converted(statement, "the netmask is not contiguous");
            return;
        };
        self.subnets.push(Subnet {
            line: statement.line,
            cidr: format!("{network}/{prefix}"),
            ranges: Vec::new(),
            routers: Vec::new(),
            dns_servers: Vec::new(),
            domain_name: None,
            lease_secs: None,
            next_server: None,
        });
        let index = self.subnets.len() - 1;
        self.statements(block, scope, Place::Subnet(index));
    }

    fn fill_subnet(&mut self, index: usize, scope: &Scope) {
        let Some(subnet) = self.subnets.get_mut(index) else {
            return;
        };
        subnet.routers = scope.routers.clone().unwrap_or_default();
        subnet.dns_servers = scope.dns_servers.clone().unwrap_or_default();
        subnet.domain_name = scope.domain_name.clone();
        subnet.lease_secs = scope.lease_secs;
        subnet.next_server = scope.next_server;
        if let Some((max, line)) = scope.max_lease_secs
            && Some(max) != scope.lease_secs
        {
            let statement = format!("max-lease-time (for subnet {})", subnet.cidr);
            self.report(
                "dhcpd.conf",
                line,
                Outcome::NotConverted,
                statement,
                "bootmesh grants every client the subnet's lease_secs whatever it asks for, so \
                 there is no maximum to convert",
            );
        }
    }

    fn host(&mut self, statement: &Statement, block: &[Statement], scope: &Scope) {
        let name = statement.word(1).to_owned();
        let index = self.hosts.len();
        self.hosts.push(Host {
            origin: format!("dhcpd.conf:{}", statement.line),
            hostname: scope.use_host_decl_names.then(|| name.clone()),
            ..Host::default()
        });
        for inner in block {
            let words: Vec<&str> = inner
                .words
                .iter()
                .map(|token| token.text.as_str())
                .collect();
            match (words.as_slice(), &inner.block) {
                (["hardware", "ethernet", mac], None) => match parse_mac(mac) {
                    Ok(mac) => self.hosts[index].mac = Some(mac),
                    Err(reason) => self.not_converted(inner, reason),
                },
                (["fixed-address", ..], None) => match ip_list(inner, 1).as_deref() {
                    Ok([address]) => self.hosts[index].address = Some(*address),
                    Ok([address, ..]) => {
                        self.hosts[index].address = Some(*address);
                        self.not_converted(
                            inner,
                            format!("a host has one fixed address in bootmesh; {address} is kept"),
                        );
                    }
                    Ok([]) => self.not_converted(inner, "no address"),
                    Err(reason) => self.not_converted(inner, reason),
                },
                (["option", "host-name", hostname], None) => {
                    self.hosts[index].hostname = Some((*hostname).to_owned());
                }
                (_, None) => self.not_converted(
                    inner,
                    "bootmesh gives a host its address and hostname only; other options come \
                     from its subnet",
                ),
                (_, Some(_)) => self.not_converted(inner, "blocks inside a host are not converted"),
            }
        }
        if self.hosts[index].mac.is_none() {
            self.hosts.remove(index);
            self.not_converted(
                statement,
                "bootmesh knows hosts by MAC address and this host has no `hardware ethernet`",
            );
        }
    }

    // ---- lts.conf ----

    fn lts_sections(&mut self, sections: &[lts::Section]) {
        if sections.is_empty() {
            return;
        }
        let mut by_name: BTreeMap<String, &lts::Section> = BTreeMap::new();
        for section in sections {
            if by_name
                .insert(section.name.to_ascii_lowercase(), section)
                .is_some()
            {
                self.report(
                    "lts.conf",
                    section.line,
                    Outcome::Changed,
                    format!("[{}]", section.name),
                    "a second section of this name replaces the first, as in LTSP",
                );
            }
        }
        let referenced: BTreeSet<String> = sections
            .iter()
            .filter_map(|section| section.get("LIKE"))
            .map(|like| like.value.to_ascii_lowercase())
            .collect();
        let default = self.effective("default", &by_name);
        let group_name = self.options.group.clone();
        if !default.contains_key("LTSP_NBD_TO_RAM") && !default.contains_key("NBD_TO_RAM") {
            self.report(
                "lts.conf",
                0,
                Outcome::Changed,
                "(no LTSP_NBD_TO_RAM)".to_owned(),
                "LTSP mounts the root over NBD unless LTSP_NBD_TO_RAM=true; bootmesh loads it \
                 into RAM (verified, no server needed once booted). Set root_mode = \"nbd\" in \
                 the group to keep NBD",
            );
        }
        let settings = self.settings_from(&default);
        self.groups.push(Group {
            name: group_name.clone(),
            origin: by_name
                .get("default")
                .map_or("lts.conf".to_owned(), |section| {
                    format!("lts.conf:{}", section.line)
                }),
            settings: settings.clone(),
        });
        self.default_group = Some(group_name.clone());
        for section in sections {
            let lower = section.name.to_ascii_lowercase();
            if lower == "default" || !std::ptr::eq(by_name[&lower], section) {
                continue;
            }
            let node = self.effective(&lower, &by_name);
            let mut overlaid = default.clone();
            overlaid.extend(node);
            let node_settings = self.settings_from(&overlaid);
            let hostname = overlaid.get("HOSTNAME").map(|(value, _)| value.clone());
            let target = self.host_for_section(section);
            match target {
                Some(host_index) => {
                    if hostname.is_some() {
                        self.hosts[host_index].hostname = hostname;
                    }
                    match settings.addition_to_reach(&node_settings) {
                        Some(addition) => self.hosts[host_index].settings = addition,
                        None => {
                            let name = self.section_group(section, node_settings, |_| {
                                "replaces or removes some of [default]'s numbered entries, so \
                                 this node gets a group of its own with its whole settings"
                                    .to_owned()
                            });
                            self.hosts[host_index].group = Some(name);
                        }
                    }
                }
                // Pulled in by LIKE only, or an address section already reported.
                None if referenced.contains(&lower) || section.name.parse::<Ipv4Addr>().is_ok() => {
                }
                None => {
                    self.section_group(section, node_settings, |name| {
                        format!(
                            "matches no host of dhcpd.conf (by MAC, fixed address or name): \
                             kept as group {name:?}, which no host names yet"
                        )
                    });
                }
            }
        }
    }

    /// A group of its own for lts.conf `section`, holding `settings`, reported as a change
    /// with `reason(name)`; returns the group's name.
    fn section_group(
        &mut self,
        section: &lts::Section,
        settings: Settings,
        reason: impl FnOnce(&str) -> String,
    ) -> String {
        let name = group_name_for(&section.name);
        self.groups.push(Group {
            name: name.clone(),
            origin: format!("lts.conf:{}", section.line),
            settings,
        });
        let reason = reason(&name);
        self.report(
            "lts.conf",
            section.line,
            Outcome::Changed,
            format!("[{}]", section.name),
            reason,
        );
        name
    }

    /// The host a section applies to: by MAC (a new host when dhcpd.conf has none), by fixed
    /// address, or by hostname.
    fn host_for_section(&mut self, section: &lts::Section) -> Option<usize> {
        if let Ok(mac) = parse_mac(&section.name) {
            if let Some(index) = self.hosts.iter().position(|host| host.mac == Some(mac)) {
                return Some(index);
            }
            self.hosts.push(Host {
                origin: format!("lts.conf:{}", section.line),
                mac: Some(mac),
                ..Host::default()
            });
            return Some(self.hosts.len() - 1);
        }
        if let Ok(address) = section.name.parse::<Ipv4Addr>() {
            let found = self
                .hosts
                .iter()
                .position(|host| host.address == Some(address));
            if found.is_none() {
                self.report(
                    "lts.conf",
                    section.line,
                    Outcome::NotConverted,
                    format!("[{}]", section.name),
                    "no host in dhcpd.conf has this fixed address, and bootmesh applies settings \
                     by MAC: give the node a [[dhcp.host]] entry",
                );
            }
            return found;
        }
        self.hosts.iter().position(|host| {
            host.hostname
                .as_deref()
                .is_some_and(|name| name.eq_ignore_ascii_case(&section.name))
        })
    }

    /// A section's variables with its `LIKE` chain beneath them: name -> (value, line).
    fn effective(
        &mut self,
        name: &str,
        by_name: &BTreeMap<String, &lts::Section>,
    ) -> BTreeMap<String, (String, usize)> {
        let mut chain = Vec::new();
        let mut next = Some(name.to_ascii_lowercase());
        while let Some(current) = next.take() {
            let Some(section) = by_name.get(&current) else {
                if current != "default" {
                    let line = chain.last().map_or(0, |section: &&lts::Section| {
                        section.get("LIKE").map_or(section.line, |like| like.line)
                    });
                    self.report(
                        "lts.conf",
                        line,
                        Outcome::NotConverted,
                        format!("LIKE = {current}"),
                        "names no section",
                    );
                }
                break;
            };
            if chain
                .iter()
                .any(|seen: &&lts::Section| std::ptr::eq(*seen, *section))
            {
                self.report(
                    "lts.conf",
                    section.line,
                    Outcome::NotConverted,
                    format!("[{}]", section.name),
                    "its LIKE chain comes back to itself; the loop is cut here",
                );
                break;
            }
            chain.push(section);
            next = section
                .get("LIKE")
                .map(|like| like.value.to_ascii_lowercase());
        }
        let mut variables = BTreeMap::new();
        for section in chain.iter().rev() {
            for assignment in &section.assignments {
                if assignment.key.eq_ignore_ascii_case("LIKE") {
                    continue;
                }
                variables.insert(
                    assignment.key.to_ascii_uppercase(),
                    (assignment.value.clone(), assignment.line),
                );
            }
        }
        variables
    }

    /// Classifies variables into settings, reporting each line that is kept or not converted
    /// (once per line, however many nodes share it).
    fn settings_from(&mut self, variables: &BTreeMap<String, (String, usize)>) -> Settings {
        let mut settings = Settings::default();
        // BTreeMap order is LTSP's order: it runs PREINIT_*, RCFILE_* by sorted name.
        for (key, (value, line)) in variables {
            let line = *line;
            let report_once = |importer: &mut Self, outcome, reason: &str| {
                let already = importer
                    .findings
                    .iter()
                    .any(|finding| finding.file == "lts.conf" && finding.line == line);
                if !already {
                    importer.report("lts.conf", line, outcome, format!("{key}={value}"), reason);
                }
            };
            if !is_valid_setting_line(value) {
                report_once(self, Outcome::NotConverted, "holds a control character");
                continue;
            }
            let list = if key.starts_with("PREINIT_") {
                Some(&mut settings.preinit)
            } else if key.starts_with("FSTAB_") {
                Some(&mut settings.fstab)
            } else if key.starts_with("RCFILE_") {
                Some(&mut settings.rcfile)
            } else {
                None
            };
            if looks_like_a_credential(value) {
                report_once(
                    self,
                    Outcome::Warning,
                    "converted as written, but it carries a join token in clear, and lts.conf is \
                     served over TFTP to anyone who asks: put the token in the group's `secrets` \
                     and read it from /run/bootmesh/secrets/NAME in the command",
                );
            }
            if let Some(list) = list {
                // An empty value switches an entry of [default] off for this node.
                if !value.trim().is_empty() {
                    if list.len() >= SETTINGS_PER_LIST_MAX {
                        report_once(
                            self,
                            Outcome::NotConverted,
                            "bootmesh keeps at most 99 entries of a kind",
                        );
                    } else {
                        list.push(value.clone());
                    }
                }
                continue;
            }
            match key.as_str() {
                "HOSTNAME" => {}
                "KEEP_SYSTEM_SERVICES" => {
                    for unit in value.split_whitespace() {
                        if is_valid_unit_name(unit) {
                            settings.keep_system_services.push(unit.to_owned());
                        }
                    }
                }
                "LTSP_NBD_TO_RAM" | "NBD_TO_RAM" => match value.to_ascii_lowercase().as_str() {
                    "true" | "y" | "yes" | "1" => settings.root_mode = Some("ram"),
                    "false" | "n" | "no" | "0" => settings.root_mode = Some("nbd"),
                    _ => report_once(self, Outcome::NotConverted, "not true or false"),
                },
                _ => {
                    if crate::plan::is_valid_lts_variable_name(key) {
                        settings.lts_conf.insert(key.clone(), value.clone());
                        report_once(
                            self,
                            Outcome::Kept,
                            "bootmesh does not act on it; written to the node's /etc/lts.conf \
                             for the image's own scripts",
                        );
                    } else {
                        report_once(
                            self,
                            Outcome::NotConverted,
                            "not a variable name bootmesh can keep",
                        );
                    }
                }
            }
        }
        settings
    }

    // ---- fleet.toml ----

    fn render(&self) -> String {
        let mut text = String::from(
            "# Converted by `bootmesh config import-ltsp` from an ISC dhcpd.conf and an LTSP\n\
             # lts.conf. Lines it could not express are listed at the end.\n",
        );
        let quoted = |value: &str| toml::Value::String(value.to_owned()).to_string();
        let list = |values: &[String]| {
            let items: Vec<String> = values.iter().map(|value| quoted(value)).collect();
            format!("[{}]", items.join(", "))
        };
        let addresses = |values: &[Ipv4Addr]| {
            let items: Vec<String> = values
                .iter()
                .map(|value| quoted(&value.to_string()))
                .collect();
            format!("[{}]", items.join(", "))
        };
        if let Some(group) = &self.default_group {
            let _ = write!(
                text,
                "\n[boot]\n# lts.conf [default]\ndefault_group = {}\n",
                quoted(group)
            );
        }
        if self.boot_files.iter().any(Option::is_some) {
            text.push_str("\n[dhcp.boot]\n");
            for (slot, file) in self.boot_files.iter().enumerate() {
                if let Some((file, line)) = file {
                    let _ = writeln!(
                        text,
                        "{} = {}  # dhcpd.conf:{line}",
                        BOOT_FILE_KEYS[slot],
                        quoted(file)
                    );
                }
            }
        }
        for subnet in &self.subnets {
            let _ = write!(
                text,
                "\n[[dhcp.subnet]]\n# dhcpd.conf:{}\ncidr = {}\nranges = {}\n",
                subnet.line,
                quoted(&subnet.cidr),
                list(&subnet.ranges)
            );
            if !subnet.routers.is_empty() {
                let _ = writeln!(text, "routers = {}", addresses(&subnet.routers));
            }
            if !subnet.dns_servers.is_empty() {
                let _ = writeln!(text, "dns_servers = {}", addresses(&subnet.dns_servers));
            }
            if let Some(domain) = &subnet.domain_name {
                let _ = writeln!(text, "domain_name = {}", quoted(domain));
            }
            if let Some(secs) = subnet.lease_secs {
                let infinite = if secs == u64::from(u32::MAX) {
                    "  # infinite, as dhcpd's -1"
                } else {
                    ""
                };
                let _ = writeln!(text, "lease_secs = {secs}{infinite}");
            }
            if let Some(server) = subnet.next_server {
                let _ = writeln!(text, "next_server = {}", quoted(&server.to_string()));
            }
        }
        for host in &self.hosts {
            let Some(mac) = host.mac else {
                continue;
            };
            let mac_text = mac
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let _ = write!(
                text,
                "\n[[dhcp.host]]\n# {}\nmac = {}\n",
                host.origin,
                quoted(&mac_text)
            );
            if let Some(address) = host.address {
                let _ = writeln!(text, "address = {}", quoted(&address.to_string()));
            }
            if let Some(hostname) = &host.hostname {
                let _ = writeln!(text, "hostname = {}", quoted(hostname));
            }
            if let Some(group) = &host.group {
                let _ = writeln!(text, "group = {}", quoted(group));
            }
            render_settings(&mut text, &host.settings, "dhcp.host", &quoted);
        }
        for group in &self.groups {
            let _ = write!(
                text,
                "\n[[group]]\n# {}\nname = {}\n",
                group.origin,
                quoted(&group.name)
            );
            render_settings(&mut text, &group.settings, "group", &quoted);
        }
        if !self.findings.is_empty() {
            text.push_str(
                "\n# Not expressed above, or changed (see `bootmesh config import-ltsp --help`):\n",
            );
            let mut findings = self.findings.clone();
            findings.sort_by(|left, right| (left.file, left.line).cmp(&(right.file, right.line)));
            for finding in findings
                .iter()
                .filter(|finding| finding.outcome != Outcome::Kept)
            {
                let one_line: String = finding
                    .to_string()
                    .chars()
                    .map(|character| {
                        if character.is_control() {
                            ' '
                        } else {
                            character
                        }
                    })
                    .collect();
                let _ = writeln!(text, "# {one_line}");
            }
        }
        text
    }
}

fn render_settings(
    text: &mut String,
    settings: &Settings,
    table: &str,
    quoted: &dyn Fn(&str) -> String,
) {
    if let Some(mode) = settings.root_mode {
        let _ = writeln!(text, "root_mode = {}", quoted(mode));
    }
    for (key, values) in [
        ("preinit", &settings.preinit),
        ("fstab", &settings.fstab),
        ("rcfile", &settings.rcfile),
        ("keep_system_services", &settings.keep_system_services),
    ] {
        if values.is_empty() {
            continue;
        }
        let _ = writeln!(text, "{key} = [");
        for value in values {
            let _ = writeln!(text, "  {},", quoted(value));
        }
        let _ = writeln!(text, "]");
    }
    if !settings.lts_conf.is_empty() {
        let _ = writeln!(text, "[{table}.lts_conf]");
        for (name, value) in &settings.lts_conf {
            let _ = writeln!(text, "{name} = {}", quoted(value));
        }
    }
}

/// Whether an lts.conf value carries a credential on a command line (`kubeadm join --token`).
fn looks_like_a_credential(value: &str) -> bool {
    [
        "--token ",
        "--token=",
        "--certificate-key",
        "--discovery-token ",
    ]
    .iter()
    .any(|flag| value.contains(flag))
}

/// A group name for lts.conf section `name` (group names are a-z A-Z 0-9 . _ -).
fn group_name_for(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-') {
                character.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(58)
        .collect();
    format!("ltsp-{cleaned}")
}

#[cfg(test)]
mod tests;
