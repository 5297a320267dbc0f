//! What the server told the agent through the kernel command line (the iPXE script writes it):
//! which image to boot, which servers to ask, and the node's identity for this boot.

use std::net::SocketAddr;

use transfer::ContentHash;

use crate::plan::RootMode;

/// Why the command line cannot boot this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// `bootmesh.image=` is missing: the node was not booted by a bootmesh server.
    #[error("no bootmesh.image= on the kernel command line")]
    NoImage,
    /// A value does not parse.
    #[error("bootmesh.{key}={value:?}: {reason}")]
    Invalid {
        /// The key after `bootmesh.`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Servers named on the command line are bounded: a command line is 2 KiB at most anyway, and
/// the agent tries each in turn.
pub const SERVERS_MAX: usize = 16;

/// The `bootmesh.*` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCmdline {
    /// `bootmesh.image=<manifest hash>`: the image this kernel belongs to.
    pub image: ContentHash,
    /// `bootmesh.servers=<ip:port>,...`: HTTP addresses of boot servers, in preference order.
    pub servers: Vec<SocketAddr>,
    /// `bootmesh.mac=<mac>`: the NIC that booted (else the first NIC with a carrier).
    pub mac: Option<[u8; 6]>,
    /// `bootmesh.group=<name>`.
    pub group: Option<String>,
    /// `bootmesh.token=<hex>`: the single-use token for this boot's secrets.
    pub token: Option<String>,
    /// `bootmesh.root=ram|nbd`: overrides the plan's root mode.
    pub root_mode: Option<RootMode>,
    /// `bootmesh.init=<path>`: what to exec in the new root (default `/sbin/init`).
    pub init: String,
    /// `bootmesh.trackers=<ip:port>,...`: the servers' swarm endpoints. Present, a `ram` root
    /// is fetched from the swarm (the image's tracker names peers, booting nodes share with
    /// each other), with the servers' HTTP as the fallback.
    pub trackers: Vec<SocketAddr>,
}

fn invalid(key: &'static str, value: &str, reason: &'static str) -> CmdlineError {
    CmdlineError::Invalid {
        key,
        value: value.to_owned(),
        reason,
    }
}

/// A comma-separated list of `ip:port` (IP literals only: the agent has no resolver, by
/// design), each once, at most [`SERVERS_MAX`].
fn parse_addresses(
    key: &'static str,
    value: &str,
    addresses: &mut Vec<SocketAddr>,
) -> Result<(), CmdlineError> {
    for text in value.split(',').filter(|text| !text.is_empty()) {
        let address = text
            .parse::<SocketAddr>()
            .map_err(|_| invalid(key, value, "not a list of ip:port addresses"))?;
        if addresses.len() < SERVERS_MAX && !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    Ok(())
}

impl AgentCmdline {
    /// Parses `/proc/cmdline`. Unknown `bootmesh.*` keys are ignored with the rest, so an
    /// older agent boots with a newer server.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut image = None;
        let mut parsed = AgentCmdline {
            image: ContentHash([0; 32]),
            servers: Vec::new(),
            mac: None,
            group: None,
            token: None,
            root_mode: None,
            init: "/sbin/init".to_owned(),
            trackers: Vec::new(),
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word
                .strip_prefix("bootmesh.")
                .and_then(|rest| rest.split_once('='))
            else {
                continue;
            };
            match key {
                "image" => {
                    image = Some(
                        value
                            .parse::<ContentHash>()
                            .map_err(|_| invalid("image", value, "not a manifest hash"))?,
                    );
                }
                "servers" => parse_addresses("servers", value, &mut parsed.servers)?,
                "trackers" => parse_addresses("trackers", value, &mut parsed.trackers)?,
                "mac" => {
                    parsed.mac = Some(
                        crate::config::parse_mac(value)
                            .map_err(|_| invalid("mac", value, "not a MAC address"))?,
                    );
                }
                "group" => parsed.group = Some(value.to_owned()),
                "token" => {
                    if value.is_empty()
                        || value.len() > 128
                        || !value.chars().all(|character| character.is_ascii_hexdigit())
                    {
                        return Err(invalid("token", value, "not a hex token"));
                    }
                    parsed.token = Some(value.to_owned());
                }
                "root" => {
                    parsed.root_mode = Some(match value {
                        "ram" => RootMode::Ram,
                        "nbd" => RootMode::Nbd,
                        "lazy" => RootMode::Lazy,
                        _ => return Err(invalid("root", value, "not ram, nbd or lazy")),
                    });
                }
                "init" => {
                    if !value.starts_with('/') {
                        return Err(invalid("init", value, "not an absolute path"));
                    }
                    parsed.init = value.to_owned();
                }
                _ => {}
            }
        }
        parsed.image = image.ok_or(CmdlineError::NoImage)?;
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn parses_what_the_boot_script_writes() {
        let cmdline = format!(
            "initrd=initrd.img console=ttyS0 bootmesh.image={HASH} bootmesh.group=workers \
             bootmesh.mac=52:54:00:12:34:56 bootmesh.servers=10.0.0.1:8080,10.0.0.2:8080,10.0.0.1:8080 \
             bootmesh.token=00ff bootmesh.root=nbd bootmesh.future=whatever \
             bootmesh.trackers=10.0.0.1:7800,10.0.0.2:7800"
        );
        let parsed = AgentCmdline::parse(&cmdline).unwrap();
        assert_eq!(parsed.image.to_hex(), HASH);
        assert_eq!(parsed.group.as_deref(), Some("workers"));
        assert_eq!(parsed.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(
            parsed.servers,
            vec![
                "10.0.0.1:8080".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:8080".parse::<SocketAddr>().unwrap()
            ]
        );
        assert_eq!(parsed.token.as_deref(), Some("00ff"));
        assert_eq!(parsed.root_mode, Some(RootMode::Nbd));
        assert_eq!(parsed.init, "/sbin/init");
        assert_eq!(parsed.trackers.len(), 2);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert_eq!(
            AgentCmdline::parse("console=ttyS0"),
            Err(CmdlineError::NoImage)
        );
        for bad in [
            "bootmesh.image=zz".to_owned(),
            format!("bootmesh.image={HASH} bootmesh.servers=bootserver:8080"),
            format!("bootmesh.image={HASH} bootmesh.root=disk"),
            format!("bootmesh.image={HASH} bootmesh.token=not-hex"),
            format!("bootmesh.image={HASH} bootmesh.init=sbin/init"),
            format!("bootmesh.image={HASH} bootmesh.trackers=10.0.0.1"),
        ] {
            assert!(AgentCmdline::parse(&bad).is_err(), "{bad}");
        }
    }
}
