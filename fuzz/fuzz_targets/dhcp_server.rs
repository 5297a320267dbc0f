//! Arbitrary datagrams into a DHCP server with two subnets, a static host and proxy ports:
//! nothing may panic, and every reply the server sends must decode again.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime};

use boot_services::dhcp::{
    AddressRange, Datagram, DhcpConfig, DhcpServer, HostConfig, Ipv4Network, SubnetConfig,
};
use dhcproto::Decodable;
use libfuzzer_sys::fuzz_target;

fn server() -> DhcpServer {
    let subnet = |third: u8| SubnetConfig {
        network: Ipv4Network { address: Ipv4Addr::new(10, 0, third, 0), prefix_length: 24 },
        ranges: vec![AddressRange {
            first: Ipv4Addr::new(10, 0, third, 10),
            last: Ipv4Addr::new(10, 0, third, 20),
        }],
        routers: vec![Ipv4Addr::new(10, 0, third, 1)],
        dns_servers: vec![],
        domain_name: Some("fuzz".into()),
        lease_time: Duration::from_secs(60),
        next_server: None,
    };
    let config = DhcpConfig {
        subnets: vec![subnet(0), subnet(1)],
        hosts: vec![HostConfig {
            hardware_address: [0x52, 0x54, 0, 0, 0, 1],
            address: Some(Ipv4Addr::new(10, 0, 0, 5)),
            hostname: Some("host".into()),
        }],
        offers_max: 8,
        pending_commits_max: 8,
        ..DhcpConfig::default()
    };
    DhcpServer::new(config).expect("valid fuzz config")
}

fuzz_target!(|data: &[u8]| {
    let mut server = server();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // The first byte picks the port and whether to commit; the rest are datagrams split on a
    // marker, so one input can drive a whole exchange.
    let Some((&control, rest)) = data.split_first() else { return };
    for (index, datagram) in rest.split(|byte| *byte == 0xA5).enumerate() {
        let local_port = if control & 1 == 0 { 67 } else { 4011 };
        let _ = server.handle_datagram(
            now + Duration::from_secs(index as u64 * u64::from(control >> 4)),
            Datagram {
                bytes: datagram,
                source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                local_address: Ipv4Addr::new(10, 0, 0, 1),
                local_port,
                interface_index: 1,
            },
        );
        while let Some(proposal) = server.poll_lease_proposal() {
            if control & 2 == 0 {
                server.handle_lease_committed(now, proposal.id);
            } else {
                server.handle_lease_commit_failed(proposal.id);
            }
        }
        while let Some(transmit) = server.poll_transmit() {
            dhcproto::v4::Message::from_bytes(&transmit.bytes).expect("our replies decode");
        }
    }
});
