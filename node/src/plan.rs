//! What a booting node learns from a server once its agent runs: the node plan (hostname, root
//! mode, and the lts.conf-style settings of its group and host), and the secrets it may receive
//! once per boot. The server renders it (`http_service`), the agent applies it (`agent`).
//!
//! The wire form is JSON: small, fetched once per boot, and readable with `curl` at 3 a.m.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// How the agent obtains the root image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootMode {
    /// Every chunk fetched and verified into RAM, then loop-mounted: the node no longer needs
    /// any server for its root once booted.
    #[default]
    Ram,
    /// The kernel's NBD client reads the root from a server's NBD export on demand.
    Nbd,
    /// The agent serves the root to its own kernel (NBD over a socket pair) from memory,
    /// fetching each chunk a read needs from the swarm first and the rest in the background,
    /// until it holds the whole image as `ram` does; the node boots before the fetch ends, and
    /// a dead peer costs only a re-request (ADR 0015).
    Lazy,
}

impl RootMode {
    /// The name used in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RootMode::Ram => "ram",
            RootMode::Nbd => "nbd",
            RootMode::Lazy => "lazy",
        }
    }
}

/// The node plan: `GET /nodes/<mac>/plan` on any server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePlan {
    /// The node's hostname, if its host entry names one.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The node's group.
    #[serde(default)]
    pub group: Option<String>,
    /// How the root image is obtained.
    #[serde(default)]
    pub root_mode: RootMode,
    /// TCP port of the servers' NBD service (for `RootMode::Nbd`).
    #[serde(default)]
    pub nbd_port: Option<u16>,
    /// Shell commands run in the new root before its init starts (lts.conf `PREINIT_*`).
    #[serde(default)]
    pub preinit: Vec<String>,
    /// Lines appended to the new root's `/etc/fstab` (lts.conf `FSTAB_*`).
    #[serde(default)]
    pub fstab: Vec<String>,
    /// Shell commands run at boot by the `bootmesh-rcfile.service` unit (lts.conf `RCFILE_*`).
    #[serde(default)]
    pub rcfile: Vec<String>,
    /// Units that stay enabled although diskless nodes mask them by default
    /// (lts.conf `KEEP_SYSTEM_SERVICES`).
    #[serde(default)]
    pub keep_system_services: Vec<String>,
    /// Other lts.conf variables (`SERVER`, `LDM_*`, ...) that bootmesh does not act on, kept
    /// for the image's own scripts: the agent writes them, with the settings above, to the new
    /// root's `/etc/lts.conf`. Left out of the plan when empty, as most fleets have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lts_conf: BTreeMap<String, String>,
    /// Once booted, serve the image's kernel and initrd to booting nodes over HTTP on
    /// [`PEER_FIRMWARE_PORT`] (the group's `firmware_from_peers`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub firmware_from_peers: bool,
}

/// The port on which a booted node of a group with `firmware_from_peers` serves its image's
/// kernel and initrd (`GET /images/<manifest>/kernel`, the servers' paths).
pub const PEER_FIRMWARE_PORT: u16 = 8079;

/// Units masked on diskless nodes unless `keep_system_services` names them: each either needs
/// a local disk, or fights the overlay root, or wastes a boot storm's bandwidth.
pub const MASKED_BY_DEFAULT: &[&str] = &[
    // Package and index refreshes: every node of a fleet would download the same data at once,
    // into RAM, to lose it at the next boot.
    "apt-daily.service",
    "apt-daily.timer",
    "apt-daily-upgrade.service",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    // Disk maintenance on a root that has no disk.
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-remount-fs.service",
    // Swap on a diskless node would be swap in RAM.
    "swap.target",
    // The agent has already configured the NIC; a second DHCP client would fight it.
    "networking.service",
    "ifup@.service",
];

/// A secret value: never printed, never logged (`Debug` and `Display` show a placeholder).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for writing it where it belongs (a 0600 file on the node).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<redacted>")
    }
}

/// `GET /nodes/<mac>/secrets?token=<t>`: the node's secrets, once per boot token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSecrets {
    /// Secret values by name; the agent writes each to `/run/bootmesh/secrets/<name>` (0600).
    pub secrets: BTreeMap<String, Secret>,
}

/// Whether `name` may be a secret's file name: no path separators, no hidden or dot files.
pub fn is_valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "-_.".contains(character))
}

/// Entries per list (`preinit`, `fstab`, `rcfile`, `keep_system_services`) once a host's are
/// appended to its group's: lts.conf numbers them with two digits (`PREINIT_01` to
/// `PREINIT_99`), and LTSP runs them in the order of their names, so a hundredth would sort
/// before the tenth.
pub const SETTINGS_PER_LIST_MAX: usize = 99;

/// Whether `line` may be a `preinit`, `fstab` or `rcfile` entry: one line, no NUL, no control
/// characters but tab (lts.conf and fstab are line-based, and a NUL ends a C string early).
pub fn is_valid_setting_line(line: &str) -> bool {
    !line
        .chars()
        .any(|character| character.is_control() && character != '\t')
}

/// Whether `name` may be an `lts_conf` variable's name: a shell variable name (LTSP turns
/// lts.conf into assignments), and none of the keys bootmesh writes from the settings itself.
pub fn is_valid_lts_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let starts_well = bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_');
    starts_well
        && name.len() <= 64
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        && !is_lts_setting_key(name)
}

/// Whether lts.conf `key` is one bootmesh writes from a plan's own fields.
pub fn is_lts_setting_key(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    ["PREINIT_", "FSTAB_", "RCFILE_"]
        .iter()
        .any(|prefix| upper.starts_with(prefix))
        || matches!(upper.as_str(), "HOSTNAME" | "KEEP_SYSTEM_SERVICES" | "LIKE")
}

/// Whether `name` may be a `keep_system_services` entry: a unit name, which lts.conf's
/// `KEEP_SYSTEM_SERVICES` separates from the next by a space.
pub fn is_valid_unit_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|character| character.is_control() || character.is_whitespace())
}

/// What one node gets: its plan, and its secrets (handed out only against a boot token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeEntry {
    /// `GET /nodes/<mac>/plan`.
    pub plan: NodePlan,
    /// `GET /nodes/<mac>/secrets`.
    pub secrets: NodeSecrets,
}

/// The plans and secrets of every node a server knows: one entry per configured host, and the
/// default group's entry for every other MAC. Built once from the configuration
/// (`ServerConfig::node_plans`), which has already refused values these cannot carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePlans {
    default: NodeEntry,
    hosts: BTreeMap<[u8; 6], NodeEntry>,
}

impl NodePlans {
    /// `default` for MACs not in `hosts`.
    pub fn new(default: NodeEntry, hosts: BTreeMap<[u8; 6], NodeEntry>) -> Self {
        Self { default, hosts }
    }

    /// The entry of `mac`: its host's, else the default.
    pub fn entry(&self, mac: &[u8; 6]) -> &NodeEntry {
        self.hosts.get(mac).unwrap_or(&self.default)
    }

    /// The plan of `mac`.
    pub fn plan(&self, mac: &[u8; 6]) -> &NodePlan {
        &self.entry(mac).plan
    }

    /// The secrets of `mac`.
    pub fn secrets(&self, mac: &[u8; 6]) -> &NodeSecrets {
        &self.entry(mac).secrets
    }

    /// An LTSP 5 `lts.conf` for clients that read one over TFTP: a `[default]` section with
    /// the default group's settings and a `[<MAC>]` section per host. Secrets never go in: the
    /// file is readable by anyone who can send a TFTP request.
    ///
    /// LTSP applies `[default]` first and the MAC's section over it, so a host section also
    /// empties every numbered key the default sets and the host does not: a host of another
    /// group must not run the default group's commands.
    pub fn lts_conf(&self) -> String {
        let mut text = String::from(
            "# Generated by bootmesh from its configuration ([[group]] and [[dhcp.host]]);\n\
             # edits here are lost. Secrets are never written here.\n",
        );
        let default_settings = lts_settings(&self.default.plan);
        write_lts_section(&mut text, "default", &self.default.plan, &default_settings);
        for (mac, entry) in &self.hosts {
            let settings = lts_settings(&entry.plan);
            let header = mac
                .iter()
                .map(|byte| format!("{byte:02X}"))
                .collect::<Vec<_>>()
                .join(":");
            write_lts_section(&mut text, &header, &entry.plan, &settings);
            let emptied: Vec<&String> = default_settings
                .iter()
                .map(|(key, _)| key)
                .filter(|key| !settings.iter().any(|(own_key, _)| own_key == *key))
                .collect();
            if !emptied.is_empty() {
                text.push_str("# set in [default] only, so emptied for this host:\n");
                for key in emptied {
                    let _ = writeln!(text, "{key}=\"\"");
                }
            }
        }
        text
    }
}

/// The lts.conf keys and values of `plan`, in file order.
fn lts_settings(plan: &NodePlan) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    if let Some(hostname) = &plan.hostname {
        settings.push(("HOSTNAME".to_owned(), hostname.clone()));
    }
    for (prefix, lines) in [
        ("PREINIT", &plan.preinit),
        ("FSTAB", &plan.fstab),
        ("RCFILE", &plan.rcfile),
    ] {
        for (index, line) in lines.iter().enumerate() {
            settings.push((format!("{prefix}_{:02}", index + 1), line.clone()));
        }
    }
    if !plan.keep_system_services.is_empty() {
        settings.push((
            "KEEP_SYSTEM_SERVICES".to_owned(),
            plan.keep_system_services.join(" "),
        ));
    }
    for (name, value) in &plan.lts_conf {
        settings.push((name.clone(), value.clone()));
    }
    settings
}

/// The lts.conf a booted node finds at `/etc/lts.conf`: its own settings, as one `[default]`
/// section, for the image's scripts that read it the way LTSP's did.
pub fn node_lts_conf(plan: &NodePlan) -> String {
    let mut text = String::from("# Written by bootmesh at boot from this node's plan.\n");
    write_lts_section(&mut text, "default", plan, &lts_settings(plan));
    text
}

fn write_lts_section(
    text: &mut String,
    header: &str,
    plan: &NodePlan,
    settings: &[(String, String)],
) {
    // Writing to a String cannot fail.
    let _ = write!(text, "\n[{header}]\n");
    if let Some(group) = &plan.group {
        let _ = writeln!(text, "# group {group}");
    }
    for (key, value) in settings {
        let _ = writeln!(text, "{key}={}", lts_quoted(value));
    }
}

/// `value` in double quotes, with the characters that are special inside shell double quotes
/// escaped: LTSP turns lts.conf into shell variable assignments.
fn lts_quoted(value: &str) -> String {
    debug_assert!(
        is_valid_setting_line(value),
        "configuration validation refuses control characters"
    );
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for character in value.chars() {
        match character {
            '"' | '\\' | '$' | '`' => {
                quoted.push('\\');
                quoted.push(character);
            }
            // Unreachable after validation; a line break would still end the assignment and
            // start a line of its own, so it never reaches the file.
            character if character.is_control() && character != '\t' => quoted.push(' '),
            character => quoted.push(character),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_or_display() {
        let secrets = NodeSecrets {
            secrets: BTreeMap::from([("kubeadm-join".into(), Secret::new("abcdef.0123456789"))]),
        };
        let debug = format!("{secrets:?}");
        assert!(!debug.contains("abcdef"), "{debug}");
        assert_eq!(Secret::new("x").to_string(), "<redacted>");
        let json = serde_json::to_string(&secrets).unwrap();
        assert!(json.contains("abcdef.0123456789"));
    }

    #[test]
    fn plan_round_trips_and_refuses_unknown_keys() {
        let plan = NodePlan {
            hostname: Some("worker-1".into()),
            root_mode: RootMode::Nbd,
            preinit: vec!["echo hi > /etc/motd".into()],
            ..NodePlan::default()
        };
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<NodePlan>(&json).unwrap(), plan);
        assert!(serde_json::from_str::<NodePlan>(r#"{"surprise": 1}"#).is_err());
    }

    #[test]
    fn secret_names_cannot_escape_their_directory() {
        assert!(is_valid_secret_name("kubeadm-join"));
        for bad in ["", "../x", "a/b", ".hidden", "x\n"] {
            assert!(!is_valid_secret_name(bad), "{bad:?}");
        }
    }

    fn plans() -> NodePlans {
        let default = NodeEntry {
            plan: NodePlan {
                group: Some("workers".into()),
                preinit: vec!["echo default > /etc/motd".into(), "sysctl -p".into()],
                keep_system_services: vec!["ssh".into()],
                ..NodePlan::default()
            },
            secrets: NodeSecrets {
                secrets: BTreeMap::from([("join".into(), Secret::new("never-in-lts-conf"))]),
            },
        };
        let host = NodeEntry {
            plan: NodePlan {
                hostname: Some("gpu-1".into()),
                group: Some("gpus".into()),
                preinit: vec![r#"echo "$HOME" `id` \ done"#.into()],
                fstab: vec!["server:/home /home nfs defaults 0 0".into()],
                rcfile: vec!["modprobe nvidia".into()],
                keep_system_services: vec!["ssh".into(), "nvidia-persistenced".into()],
                ..NodePlan::default()
            },
            secrets: NodeSecrets::default(),
        };
        NodePlans::new(
            default,
            BTreeMap::from([([0x52, 0x54, 0, 0xab, 0xcd, 0xef], host)]),
        )
    }

    #[test]
    fn unknown_macs_get_the_default_entry() {
        let plans = plans();
        assert_eq!(
            plans
                .plan(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef])
                .hostname
                .as_deref(),
            Some("gpu-1")
        );
        assert_eq!(
            plans.plan(&[2, 0, 0, 0, 0, 1]).group.as_deref(),
            Some("workers")
        );
        assert_eq!(plans.secrets(&[2, 0, 0, 0, 0, 1]).secrets.len(), 1);
    }

    #[test]
    fn lts_conf_has_a_default_section_and_one_section_per_host() {
        assert_eq!(
            plans().lts_conf(),
            "# Generated by bootmesh from its configuration ([[group]] and [[dhcp.host]]);\n\
             # edits here are lost. Secrets are never written here.\n\
             \n\
             [default]\n\
             # group workers\n\
             PREINIT_01=\"echo default > /etc/motd\"\n\
             PREINIT_02=\"sysctl -p\"\n\
             KEEP_SYSTEM_SERVICES=\"ssh\"\n\
             \n\
             [52:54:00:AB:CD:EF]\n\
             # group gpus\n\
             HOSTNAME=\"gpu-1\"\n\
             PREINIT_01=\"echo \\\"\\$HOME\\\" \\`id\\` \\\\ done\"\n\
             FSTAB_01=\"server:/home /home nfs defaults 0 0\"\n\
             RCFILE_01=\"modprobe nvidia\"\n\
             KEEP_SYSTEM_SERVICES=\"ssh nvidia-persistenced\"\n\
             # set in [default] only, so emptied for this host:\n\
             PREINIT_02=\"\"\n"
        );
        assert!(!plans().lts_conf().contains("never-in-lts-conf"));
    }

    #[test]
    fn setting_lines_are_single_lines_and_units_have_no_spaces() {
        assert!(is_valid_setting_line("mount -t tmpfs\ttmpfs /mnt"));
        for bad in ["a\nb", "a\rb", "a\0b", "a\u{1b}[0m"] {
            assert!(!is_valid_setting_line(bad), "{bad:?}");
        }
        assert!(is_valid_unit_name("ssh.service"));
        for bad in ["", "a b", "a\tb", "a\nb"] {
            assert!(!is_valid_unit_name(bad), "{bad:?}");
        }
    }
}
