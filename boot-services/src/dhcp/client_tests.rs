use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::dhcp::{
    AddressRange, CLIENT_PORT, Datagram, DhcpConfig, DhcpServer, HostConfig, Ipv4Network,
    SERVER_PORT, SubnetConfig,
};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x42];

#[expect(
    clippy::disallowed_methods,
    reason = "an Instant can only be made from the clock; the client never reads it"
)]
fn virtual_start() -> Instant {
    Instant::now()
}

fn server_config(lease_secs: u64) -> DhcpConfig {
    DhcpConfig {
        subnets: vec![SubnetConfig {
            network: Ipv4Network {
                address: Ipv4Addr::new(10, 0, 0, 0),
                prefix_length: 24,
            },
            ranges: vec![AddressRange {
                first: Ipv4Addr::new(10, 0, 0, 100),
                last: Ipv4Addr::new(10, 0, 0, 109),
            }],
            routers: vec![Ipv4Addr::new(10, 0, 0, 254)],
            dns_servers: vec![SERVER],
            domain_name: None,
            lease_time: Duration::from_secs(lease_secs),
            next_server: None,
        }],
        hosts: vec![HostConfig {
            hardware_address: [0x52, 0x54, 0, 0, 0, 0x99],
            address: Some(Ipv4Addr::new(10, 0, 0, 50)),
            hostname: Some("worker-1".into()),
        }],
        ..DhcpConfig::default()
    }
}

/// A client and the real server core, joined in memory; the server's commits happen at once.
struct Pair {
    client: DhcpClient,
    server: DhcpServer,
    start: Instant,
    now: Instant,
    /// Drop every client packet while set (a dead server).
    server_down: bool,
}

impl Pair {
    fn new(mac: [u8; 6], lease_secs: u64) -> Self {
        let start = virtual_start();
        Self {
            client: DhcpClient::new(DhcpClientConfig::new(mac), start, 0x1234_5678),
            server: DhcpServer::new(server_config(lease_secs)).expect("server config"),
            start,
            now: start,
            server_down: false,
        }
    }

    fn wall(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + (self.now - self.start)
    }

    /// Runs timers and packets until nothing is left to do before `until`; returns what the
    /// client reported.
    fn run_until(&mut self, until: Instant) -> Vec<ClientEvent> {
        let mut events = Vec::new();
        for _ in 0..10_000 {
            let mut progressed = false;
            while let Some(transmit) = self.client.poll_transmit() {
                progressed = true;
                if self.server_down {
                    continue;
                }
                let source = match (transmit.destination, self.client.lease()) {
                    (ClientDestination::Unicast(_), Some(lease)) => {
                        SocketAddrV4::new(lease.address, CLIENT_PORT)
                    }
                    _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT),
                };
                let wall = self.wall();
                let _ = self.server.handle_datagram(
                    wall,
                    Datagram {
                        bytes: &transmit.bytes,
                        source,
                        local_address: SERVER,
                        local_port: SERVER_PORT,
                        interface_index: 1,
                    },
                );
                while let Some(proposal) = self.server.poll_lease_proposal() {
                    self.server.handle_lease_committed(wall, proposal.id);
                }
                while let Some(reply) = self.server.poll_transmit() {
                    events.push(self.client.handle_datagram(self.now, &reply.bytes));
                }
            }
            if progressed {
                continue;
            }
            match self.client.poll_timeout() {
                Some(deadline) if deadline <= until => {
                    self.now = self.now.max(deadline);
                    self.client.handle_timeout(self.now);
                }
                _ => break,
            }
        }
        self.now = self.now.max(until);
        events
    }
}

#[test]
fn a_client_gets_a_lease_with_its_network_settings() {
    let mut pair = Pair::new(MAC, 3600);
    let events = pair.run_until(pair.start + Duration::from_secs(1));
    let address = Ipv4Addr::new(10, 0, 0, 100);
    assert_eq!(
        events,
        [ClientEvent::Offered(address), ClientEvent::Bound(address)]
    );
    let lease = pair.client.lease().expect("bound");
    assert_eq!(lease.address, address);
    assert_eq!(lease.prefix_length, 24);
    assert_eq!(lease.routers, [Ipv4Addr::new(10, 0, 0, 254)]);
    assert_eq!(lease.dns_servers, [SERVER]);
    assert_eq!(lease.server_identifier, SERVER);
    assert_eq!(lease.lease_time, Duration::from_secs(3600));
    // Bound: quiet until T1.
    assert_eq!(
        pair.client.poll_timeout(),
        Some(pair.start + Duration::from_secs(1800))
    );
}

#[test]
fn a_known_host_gets_its_fixed_address_and_hostname() {
    let mut pair = Pair::new([0x52, 0x54, 0, 0, 0, 0x99], 3600);
    pair.run_until(pair.start + Duration::from_secs(1));
    let lease = pair.client.lease().expect("bound");
    assert_eq!(lease.address, Ipv4Addr::new(10, 0, 0, 50));
    assert_eq!(lease.hostname.as_deref(), Some("worker-1"));
}

#[test]
fn the_lease_is_renewed_at_t1_with_a_unicast_request_and_kept() {
    let mut pair = Pair::new(MAC, 100);
    pair.run_until(pair.start + Duration::from_secs(1));
    let first = pair.client.lease().expect("bound").clone();
    let events = pair.run_until(pair.start + Duration::from_secs(60));
    assert_eq!(events, [ClientEvent::Bound(first.address)]);
    let renewed = pair.client.lease().expect("still bound");
    assert_eq!(renewed.address, first.address);
    assert!(renewed.acquired_at >= first.acquired_at + Duration::from_secs(50));
}

#[test]
fn without_a_server_it_retries_with_backoff_and_drops_the_lease_at_expiry() {
    let mut pair = Pair::new(MAC, 100);
    pair.run_until(pair.start + Duration::from_secs(1));
    pair.server_down = true;
    pair.run_until(pair.start + Duration::from_secs(99));
    assert!(
        pair.client.lease().is_some(),
        "a lease is kept until it expires"
    );
    pair.run_until(pair.start + Duration::from_secs(101));
    assert!(
        pair.client.lease().is_none(),
        "an expired lease must be dropped"
    );
    // Back to DISCOVER, retransmitted no faster than the backoff allows.
    let mut sent = Vec::new();
    let mut now = pair.start + Duration::from_secs(101);
    for _ in 0..10 {
        let Some(deadline) = pair.client.poll_timeout() else {
            break;
        };
        now = now.max(deadline);
        pair.client.handle_timeout(now);
        if pair.client.poll_transmit().is_some() {
            sent.push(now);
        }
    }
    let gaps: Vec<u64> = sent
        .windows(2)
        .map(|pair| (pair[1] - pair[0]).as_secs())
        .collect();
    assert!(
        gaps.iter().all(|gap| (1..=8).contains(gap)),
        "gaps {gaps:?}"
    );
    assert!(
        gaps.windows(2)
            .all(|pair| pair[1] >= pair[0] || pair[1] == 1),
        "gaps {gaps:?}"
    );
}

#[test]
fn replies_for_other_transactions_or_clients_and_garbage_are_ignored() {
    let start = virtual_start();
    let mut client = DhcpClient::new(DhcpClientConfig::new(MAC), start, 7);
    client.handle_timeout(start);
    let discover = client.poll_transmit().expect("DISCOVER");
    let request = Message::from_bytes(&discover.bytes).expect("decodes");
    let mut offer = Message::new_with_id(
        request.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::new(10, 0, 0, 100),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &MAC,
    );
    offer.set_opcode(Opcode::BootReply);
    offer
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Offer));
    offer
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(SERVER));
    let mut other_xid = offer.clone();
    other_xid.set_xid(request.xid().wrapping_add(1));
    let mut other_client = offer.clone();
    other_client.set_chaddr(&[0x52, 0x54, 0, 0, 0, 0x43]);
    let mut no_server = offer.clone();
    no_server.opts_mut().remove(OptionCode::ServerIdentifier);
    for (message, why) in [
        (other_xid, "another transaction"),
        (other_client, "another client"),
        (no_server, "no server identifier"),
    ] {
        let bytes = message.to_vec().expect("encodes");
        assert_eq!(
            client.handle_datagram(start, &bytes),
            ClientEvent::Ignored(why)
        );
    }
    assert!(matches!(
        client.handle_datagram(start, b"\x02\x01garbage"),
        ClientEvent::Malformed(_)
    ));
    // A hardware length beyond the 16-byte chaddr field (found by the fuzzer: dhcproto's
    // accessor panics on it).
    let mut long_hlen = offer.to_vec().expect("encodes");
    long_hlen[2] = 200;
    assert_eq!(
        client.handle_datagram(start, &long_hlen),
        ClientEvent::Ignored("another client")
    );
    let bytes = offer.to_vec().expect("encodes");
    assert_eq!(
        client.handle_datagram(start, &bytes),
        ClientEvent::Offered(Ipv4Addr::new(10, 0, 0, 100))
    );
    let follow_up = client.poll_transmit().expect("REQUEST follows the offer");
    let follow_up = Message::from_bytes(&follow_up.bytes).expect("decodes");
    assert_eq!(
        follow_up.opts().get(OptionCode::MessageType),
        Some(&DhcpOption::MessageType(MessageType::Request))
    );
    assert_eq!(
        follow_up.opts().get(OptionCode::RequestedIpAddress),
        Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            10, 0, 0, 100
        )))
    );
}
