use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime};

use dhcproto::v4::{
    Architecture, DhcpOption, Flags, Message, MessageType, OptionCode,
    relay::{RelayAgentInformation, RelayInfo},
};
use dhcproto::{Decodable, Encodable};

use super::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn subnet(network: [u8; 4], first: [u8; 4], last: [u8; 4]) -> SubnetConfig {
    SubnetConfig {
        network: Ipv4Network {
            address: network.into(),
            prefix_length: 24,
        },
        ranges: vec![AddressRange {
            first: first.into(),
            last: last.into(),
        }],
        routers: vec![Ipv4Addr::from([network[0], network[1], network[2], 254])],
        dns_servers: vec![SERVER],
        domain_name: Some("rack1.example".into()),
        lease_time: Duration::from_secs(3600),
        next_server: None,
    }
}

fn config() -> DhcpConfig {
    DhcpConfig {
        subnets: vec![
            subnet([10, 0, 0, 0], [10, 0, 0, 100], [10, 0, 0, 109]),
            subnet([10, 1, 0, 0], [10, 1, 0, 100], [10, 1, 0, 199]),
        ],
        hosts: vec![HostConfig {
            hardware_address: [0x52, 0x54, 0, 0, 0, 0x99],
            address: Some(Ipv4Addr::new(10, 0, 0, 50)),
            hostname: Some("worker-1".into()),
        }],
        boot: BootConfig {
            http_port: 8080,
            ..BootConfig::default()
        },
        ..DhcpConfig::default()
    }
}

fn mac(last: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, last]
}

fn request_message(message_type: MessageType, hardware: [u8; 6], xid: u32) -> Message {
    let mut message = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &hardware,
    );
    message
        .opts_mut()
        .insert(DhcpOption::MessageType(message_type));
    message
}

struct Harness {
    server: DhcpServer,
    now: SystemTime,
}

impl Harness {
    fn new(config: DhcpConfig) -> Self {
        Self {
            server: DhcpServer::new(config).unwrap(),
            now: now(),
        }
    }

    fn send_on(
        &mut self,
        message: &Message,
        local_port: u16,
        source: SocketAddrV4,
    ) -> Result<(), DhcpDrop> {
        let bytes = message.to_vec().unwrap();
        self.server.handle_datagram(
            self.now,
            Datagram {
                bytes: &bytes,
                source,
                local_address: SERVER,
                local_port,
                interface_index: 7,
            },
        )
    }

    fn send(&mut self, message: &Message) -> Result<(), DhcpDrop> {
        self.send_on(
            message,
            SERVER_PORT,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT),
        )
    }

    /// Commits every proposal, as the journal would.
    fn commit_all(&mut self) -> Vec<LeaseChange> {
        let mut changes = Vec::new();
        while let Some(proposal) = self.server.poll_lease_proposal() {
            self.server.handle_lease_committed(self.now, proposal.id);
            changes.push(proposal.change);
        }
        changes
    }

    fn replies(&mut self) -> Vec<(Message, Transmit)> {
        std::iter::from_fn(|| self.server.poll_transmit())
            .map(|transmit| (Message::from_bytes(&transmit.bytes).unwrap(), transmit))
            .collect()
    }

    fn one_reply(&mut self) -> (Message, Transmit) {
        let mut replies = self.replies();
        assert_eq!(replies.len(), 1, "expected exactly one reply");
        replies.remove(0)
    }

    /// DISCOVER, OFFER, REQUEST, commit, ACK; returns the ACK.
    fn lease(&mut self, discover: Message) -> Message {
        self.send(&discover).unwrap();
        let (offer, _) = self.one_reply();
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        let request = selecting(&discover, offer.yiaddr(), SERVER);
        self.send(&request).unwrap();
        assert!(
            self.replies().is_empty(),
            "no ACK may leave before the commit"
        );
        assert_eq!(self.commit_all().len(), 1);
        let (ack, _) = self.one_reply();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), offer.yiaddr());
        ack
    }
}

/// The REQUEST of a client SELECTING `server`'s offer of `address`, made from its DISCOVER.
fn selecting(discover: &Message, address: Ipv4Addr, server: Ipv4Addr) -> Message {
    let mut request = discover.clone();
    let options = request.opts_mut();
    options.insert(DhcpOption::MessageType(MessageType::Request));
    options.insert(DhcpOption::RequestedIpAddress(address));
    options.insert(DhcpOption::ServerIdentifier(server));
    request
}

fn option(message: &Message, code: OptionCode) -> Option<&DhcpOption> {
    message.opts().get(code)
}

fn boot_file(message: &Message) -> Option<String> {
    match option(message, OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(bytes)) => Some(String::from_utf8(bytes.clone()).unwrap()),
        _ => None,
    }
}

#[test]
fn four_way_exchange_acks_only_after_commit() {
    let mut harness = Harness::new(config());
    let ack = harness.lease(request_message(MessageType::Discover, mac(1), 1));
    assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
    assert_eq!(
        option(&ack, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask([255, 255, 255, 0].into()))
    );
    assert_eq!(
        option(&ack, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        option(&ack, OptionCode::Renewal),
        Some(&DhcpOption::Renewal(1800))
    );
    assert_eq!(
        option(&ack, OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(3150))
    );
    assert_eq!(
        option(&ack, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        option(&ack, OptionCode::Router),
        Some(&DhcpOption::Router(vec![[10, 0, 0, 254].into()]))
    );
    assert_eq!(
        option(&ack, OptionCode::DomainName),
        Some(&DhcpOption::DomainName("rack1.example".into()))
    );
    assert_eq!(boot_file(&ack), None, "a plain client gets no boot file");
    assert_eq!(harness.server.lease_table().binding_count(), 1);
}

#[test]
fn commit_failure_sends_nothing() {
    let mut harness = Harness::new(config());
    let discover = request_message(MessageType::Discover, mac(1), 1);
    harness.send(&discover).unwrap();
    let (offer, _) = harness.one_reply();
    let mut request = discover.clone();
    request
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    request
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    harness.send(&request).unwrap();
    let proposal = harness.server.poll_lease_proposal().unwrap();
    harness.server.handle_lease_commit_failed(proposal.id);
    assert!(harness.replies().is_empty());
    assert_eq!(harness.server.lease_table().binding_count(), 0);
}

#[test]
fn distinct_clients_get_distinct_addresses_and_returning_client_keeps_its_own() {
    let mut harness = Harness::new(config());
    let first = harness
        .lease(request_message(MessageType::Discover, mac(1), 1))
        .yiaddr();
    let second = harness
        .lease(request_message(MessageType::Discover, mac(2), 2))
        .yiaddr();
    assert_ne!(first, second);
    // Release, let a lot of time pass, come back: same address.
    let mut release = request_message(MessageType::Release, mac(1), 3);
    release.set_ciaddr(first);
    harness.send(&release).unwrap();
    assert_eq!(harness.commit_all().len(), 1);
    harness.now += Duration::from_secs(86_400);
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(1), 4))
            .yiaddr(),
        first
    );
}

#[test]
fn static_host_gets_fixed_address_and_hostname() {
    let mut harness = Harness::new(config());
    let ack = harness.lease(request_message(MessageType::Discover, mac(0x99), 1));
    assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 0, 0, 50));
    assert_eq!(
        option(&ack, OptionCode::Hostname),
        Some(&DhcpOption::Hostname("worker-1".into()))
    );
    // Nobody else ever gets the fixed address, even asking for it.
    let mut discover = request_message(MessageType::Discover, mac(3), 2);
    discover
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress([10, 0, 0, 50].into()));
    harness.send(&discover).unwrap();
    assert_ne!(harness.one_reply().0.yiaddr(), Ipv4Addr::new(10, 0, 0, 50));
}

fn pxe_discover(architecture: u16, vendor_class: &[u8]) -> Message {
    let mut discover = request_message(MessageType::Discover, mac(5), 9);
    discover
        .opts_mut()
        .insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
            architecture,
        )));
    discover
        .opts_mut()
        .insert(DhcpOption::ClassIdentifier(vendor_class.to_vec()));
    discover
        .opts_mut()
        .insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    discover
}

fn check_boot_file(discover: Message, expected_file: &str, expected_vendor_class: Option<&[u8]>) {
    let mut harness = Harness::new(config());
    harness.send(&discover).unwrap();
    let (offer, _) = harness.one_reply();
    assert_eq!(boot_file(&offer).as_deref(), Some(expected_file));
    assert_eq!(
        offer
            .fname_str()
            .map(|name| name.unwrap().trim_end_matches('\0').to_owned())
            .as_deref(),
        Some(expected_file)
    );
    assert_eq!(offer.siaddr(), SERVER);
    let vendor_class = match option(&offer, OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(class)) => Some(class.as_slice()),
        _ => None,
    };
    assert_eq!(vendor_class, expected_vendor_class);
}

#[test]
fn boot_file_follows_client_architecture() {
    check_boot_file(
        pxe_discover(0, b"PXEClient:Arch:00000:UNDI:002001"),
        "undionly.kpxe",
        None,
    );
    check_boot_file(
        pxe_discover(7, b"PXEClient:Arch:00007:UNDI:003016"),
        "ipxe.efi",
        None,
    );
    check_boot_file(
        pxe_discover(9, b"PXEClient:Arch:00009:UNDI:003016"),
        "ipxe.efi",
        None,
    );
    check_boot_file(
        pxe_discover(11, b"PXEClient:Arch:00011:UNDI:003016"),
        "ipxe-arm64.efi",
        None,
    );
    check_boot_file(
        pxe_discover(16, b"HTTPClient:Arch:00016:UNDI:003001"),
        "http://10.0.0.1:8080/ipxe.efi",
        Some(b"HTTPClient"),
    );
}

#[test]
fn ipxe_gets_its_script_never_ipxe_again() {
    let mut by_user_class = pxe_discover(0, b"PXEClient:Arch:00000:UNDI:002001");
    by_user_class
        .opts_mut()
        .insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    check_boot_file(
        by_user_class,
        "http://10.0.0.1:8080/boot/52-54-00-00-00-05.ipxe",
        None,
    );
    let mut by_encapsulated = pxe_discover(7, b"PXEClient:Arch:00007:UNDI:003016");
    by_encapsulated
        .opts_mut()
        .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
            OptionCode::Unknown(175),
            vec![19, 1, 1],
        )));
    check_boot_file(
        by_encapsulated,
        "http://10.0.0.1:8080/boot/52-54-00-00-00-05.ipxe",
        None,
    );
}

#[test]
fn uuid_is_echoed_to_pxe_clients() {
    let mut harness = Harness::new(config());
    harness.send(&pxe_discover(0, b"PXEClient")).unwrap();
    let (offer, _) = harness.one_reply();
    assert_eq!(
        option(&offer, OptionCode::ClientMachineIdentifier),
        Some(&DhcpOption::ClientMachineIdentifier(vec![0; 17]))
    );
}

#[test]
fn relayed_discover_uses_giaddr_subnet_and_goes_back_to_the_relay_with_option_82() {
    let mut harness = Harness::new(config());
    let mut discover = request_message(MessageType::Discover, mac(6), 11);
    discover.set_giaddr(RELAY);
    discover.set_hops(1);
    let mut information = RelayAgentInformation::default();
    information.insert(RelayInfo::AgentCircuitId(b"rack2-port7".to_vec()));
    discover
        .opts_mut()
        .insert(DhcpOption::RelayAgentInformation(information.clone()));
    harness
        .send_on(
            &discover,
            SERVER_PORT,
            SocketAddrV4::new(RELAY, SERVER_PORT),
        )
        .unwrap();
    let (offer, transmit) = harness.one_reply();
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 1, 0, 100));
    assert_eq!(offer.giaddr(), RELAY);
    assert_eq!(
        transmit.destination,
        Destination::Relay(SocketAddrV4::new(RELAY, SERVER_PORT))
    );
    assert_eq!(
        option(&offer, OptionCode::RelayAgentInformation),
        Some(&DhcpOption::RelayAgentInformation(information))
    );
}

#[test]
fn reply_destinations_follow_rfc_2131() {
    let mut harness = Harness::new(config());
    harness
        .send(&request_message(MessageType::Discover, mac(1), 1))
        .unwrap();
    let (offer, transmit) = harness.one_reply();
    assert_eq!(
        transmit.destination,
        Destination::Hardware {
            address: offer.yiaddr(),
            hardware_address: mac(1),
            port: CLIENT_PORT
        }
    );
    let mut broadcast = request_message(MessageType::Discover, mac(2), 2);
    broadcast.set_flags(Flags::default().set_broadcast());
    harness.send(&broadcast).unwrap();
    assert_eq!(
        harness.one_reply().1.destination,
        Destination::Broadcast { port: CLIENT_PORT }
    );
}

#[test]
fn request_for_another_server_drops_our_offer() {
    let mut harness = Harness::new(config());
    let discover = request_message(MessageType::Discover, mac(1), 1);
    harness.send(&discover).unwrap();
    let (offer, _) = harness.one_reply();
    let request = selecting(&discover, offer.yiaddr(), [10, 0, 0, 2].into());
    assert_eq!(
        harness.send(&request),
        Err(DhcpDrop::OtherServerChosen([10, 0, 0, 2].into()))
    );
    assert!(harness.replies().is_empty());
    assert_eq!(harness.server.lease_table().reservation_count(), 0);
}

#[test]
fn request_for_a_foreign_or_taken_address_is_naked() {
    let mut harness = Harness::new(config());
    let taken = harness
        .lease(request_message(MessageType::Discover, mac(1), 1))
        .yiaddr();
    for wanted in [
        Ipv4Addr::new(192, 168, 1, 10),
        taken,
        Ipv4Addr::new(10, 0, 0, 200),
    ] {
        let mut init_reboot = request_message(MessageType::Request, mac(2), 2);
        init_reboot
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(wanted));
        harness.send(&init_reboot).unwrap();
        let (nak, transmit) = harness.one_reply();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak), "{wanted}");
        assert_eq!(
            transmit.destination,
            Destination::Broadcast { port: CLIENT_PORT }
        );
    }
}

#[test]
fn renewal_is_unicast_and_extends_the_lease() {
    let mut harness = Harness::new(config());
    let address = harness
        .lease(request_message(MessageType::Discover, mac(1), 1))
        .yiaddr();
    harness.now += Duration::from_secs(1800);
    let mut renew = request_message(MessageType::Request, mac(1), 2);
    renew.set_ciaddr(address);
    harness.send(&renew).unwrap();
    let changes = harness.commit_all();
    let expected_expiry = super::unix_secs(harness.now) + 3600;
    assert!(
        matches!(&changes[..], [LeaseChange::Bind { expires_at_unix_secs, .. }] if *expires_at_unix_secs == expected_expiry)
    );
    let (ack, transmit) = harness.one_reply();
    assert_eq!(ack.yiaddr(), address);
    assert_eq!(
        transmit.destination,
        Destination::Unicast(SocketAddrV4::new(address, CLIENT_PORT))
    );
}

#[test]
fn declined_address_is_quarantined() {
    let mut harness = Harness::new(config());
    let address = harness
        .lease(request_message(MessageType::Discover, mac(1), 1))
        .yiaddr();
    let mut decline = request_message(MessageType::Decline, mac(1), 2);
    decline
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(address));
    decline
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(SERVER));
    harness.send(&decline).unwrap();
    assert!(matches!(
        &harness.commit_all()[..],
        [LeaseChange::Decline { .. }]
    ));
    assert!(harness.replies().is_empty());
    assert_ne!(
        harness
            .lease(request_message(MessageType::Discover, mac(1), 3))
            .yiaddr(),
        address
    );
    assert_ne!(
        harness
            .lease(request_message(MessageType::Discover, mac(2), 4))
            .yiaddr(),
        address
    );
}

#[test]
fn exhausted_pool_reuses_the_longest_expired_lease() {
    let mut harness = Harness::new(config());
    let mut addresses = Vec::new();
    for index in 0..10 {
        addresses.push(
            harness
                .lease(request_message(
                    MessageType::Discover,
                    mac(index),
                    u32::from(index),
                ))
                .yiaddr(),
        );
        harness.now += Duration::from_secs(10);
    }
    assert_eq!(
        harness.send(&request_message(MessageType::Discover, mac(20), 20)),
        Err(DhcpDrop::PoolExhausted([10, 0, 0, 0].into()))
    );
    harness.now += Duration::from_secs(3600 - 95);
    // Only the first lease (granted 100 s before the last) has expired.
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(20), 21))
            .yiaddr(),
        addresses[0]
    );
}

#[test]
fn discover_flood_is_bounded_and_known_clients_are_still_served() {
    let mut config = config();
    config.offers_max = 4;
    config.subnets[1].ranges = vec![AddressRange {
        first: [10, 1, 0, 1].into(),
        last: [10, 1, 0, 250].into(),
    }];
    let mut harness = Harness::new(config);
    let known = harness
        .lease(request_message(MessageType::Discover, mac(1), 1))
        .yiaddr();
    for index in 0..200u32 {
        let hardware = [
            0x02,
            0,
            0,
            (index >> 16) as u8,
            (index >> 8) as u8,
            index as u8,
        ];
        let _ = harness.send(&request_message(MessageType::Discover, hardware, index));
        assert!(harness.server.lease_table().reservation_count() <= 4);
    }
    harness.replies();
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(1), 9))
            .yiaddr(),
        known
    );
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(0x99), 10))
            .yiaddr(),
        Ipv4Addr::new(10, 0, 0, 50)
    );
}

#[test]
fn proxy_mode_answers_pxe_clients_without_an_address() {
    let mut config = config();
    config.mode = DhcpMode::Proxy;
    let mut harness = Harness::new(config);
    assert_eq!(
        harness.send(&request_message(MessageType::Discover, mac(1), 1)),
        Err(DhcpDrop::ProxyIgnored)
    );
    harness
        .send(&pxe_discover(0, b"PXEClient:Arch:00000:UNDI:002001"))
        .unwrap();
    let (offer, transmit) = harness.one_reply();
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(boot_file(&offer).as_deref(), Some("undionly.kpxe"));
    assert_eq!(
        option(&offer, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert!(option(&offer, OptionCode::AddressLeaseTime).is_none());
    assert_eq!(
        transmit.destination,
        Destination::Broadcast { port: CLIENT_PORT }
    );
    // Boot server discovery on 4011 is answered by unicast to the asker.
    let mut request = pxe_discover(0, b"PXEClient:Arch:00000:UNDI:002001");
    request
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Request));
    let client = SocketAddrV4::new([10, 0, 0, 77].into(), CLIENT_PORT);
    harness.send_on(&request, PXE_PORT, client).unwrap();
    let (ack, transmit) = harness.one_reply();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(transmit.destination, Destination::Unicast(client));
    assert!(
        harness.server.poll_lease_proposal().is_none(),
        "proxy mode never leases"
    );
}

#[test]
fn restart_restores_committed_leases() {
    let mut harness = Harness::new(config());
    harness.lease(request_message(MessageType::Discover, mac(1), 1));
    let changes = {
        let mut harness2 = Harness::new(config());
        harness2.lease(request_message(MessageType::Discover, mac(1), 1));
        let address = harness2
            .server
            .lease_table()
            .address_of(&ClientId([&[1u8][..], &mac(1)].concat()));
        assert!(address.is_some());
        harness2.server.lease_table().snapshot()
    };
    let mut restarted = Harness::new(config());
    for change in &changes {
        let mut encoded = Vec::new();
        change.encode(&mut encoded);
        restarted
            .server
            .restore(&LeaseChange::decode(&encoded).unwrap());
    }
    // Another client does not get the restored address; the owner does.
    let other = restarted
        .lease(request_message(MessageType::Discover, mac(2), 2))
        .yiaddr();
    assert_ne!(other, changes[0].address());
    assert_eq!(
        restarted
            .lease(request_message(MessageType::Discover, mac(1), 3))
            .yiaddr(),
        changes[0].address()
    );
}

#[test]
fn garbage_is_dropped_with_a_reason() {
    let mut harness = Harness::new(config());
    for bytes in [&b""[..], &[1u8; 10][..], &[0xffu8; 600][..]] {
        let result = harness.server.handle_datagram(
            harness.now,
            Datagram {
                bytes,
                source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                local_address: SERVER,
                local_port: 67,
                interface_index: 1,
            },
        );
        assert!(
            matches!(
                result,
                Err(DhcpDrop::Malformed(_) | DhcpDrop::NotForServer(_))
            ),
            "{result:?}"
        );
    }
}

#[test]
fn hardware_address_length_over_chaddr_is_dropped_not_a_panic() {
    let mut harness = Harness::new(config());
    let mut bytes = request_message(MessageType::Discover, mac(1), 7)
        .to_vec()
        .unwrap();
    // hlen is byte 2 of the BOOTP header.
    for hlen in [17u8, 255] {
        bytes[2] = hlen;
        let result = harness.server.handle_datagram(
            harness.now,
            Datagram {
                bytes: &bytes,
                source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                local_address: SERVER,
                local_port: 67,
                interface_index: 1,
            },
        );
        assert!(matches!(result, Err(DhcpDrop::Malformed(_))), "{result:?}");
    }
}

#[test]
fn records_round_trip_and_bad_records_are_refused() {
    let changes = [
        LeaseChange::Bind {
            client: ClientId(vec![1, 2, 3]),
            hardware_address: mac(1).to_vec(),
            address: [10, 0, 0, 5].into(),
            expires_at_unix_secs: 42,
            hostname: Some("n1".into()),
        },
        LeaseChange::Bind {
            client: ClientId(vec![1]),
            hardware_address: vec![],
            address: [10, 0, 0, 6].into(),
            expires_at_unix_secs: 0,
            hostname: None,
        },
        LeaseChange::Release {
            client: ClientId(vec![9]),
            address: [10, 0, 0, 5].into(),
            at_unix_secs: 7,
        },
        LeaseChange::Decline {
            address: [10, 0, 0, 5].into(),
            until_unix_secs: 99,
        },
    ];
    for change in changes {
        let mut encoded = Vec::new();
        change.encode(&mut encoded);
        assert_eq!(LeaseChange::decode(&encoded), Ok(change));
        assert_eq!(
            LeaseChange::decode(&encoded[..encoded.len() - 1]),
            Err(RecordDecodeError::Truncated)
        );
        encoded.push(0);
        assert_eq!(
            LeaseChange::decode(&encoded),
            Err(RecordDecodeError::TrailingBytes(1))
        );
    }
    assert_eq!(
        LeaseChange::decode(&[9]),
        Err(RecordDecodeError::UnknownTag(9))
    );
}

#[test]
fn bad_configs_are_refused() {
    let mut config = config();
    config.subnets[0].ranges[0].last = [10, 0, 1, 5].into();
    assert!(matches!(
        DhcpServer::new(config),
        Err(DhcpConfigError::RangeOutsideSubnet { .. })
    ));
    let mut config = super::tests::config();
    config.hosts.push(config.hosts[0].clone());
    assert!(matches!(
        DhcpServer::new(config),
        Err(DhcpConfigError::DuplicateHost(_))
    ));
}

#[test]
fn lapsed_and_evicted_offers_return_to_the_pool() {
    let mut config = config();
    config.offers_max = 4;
    let mut harness = Harness::new(config);
    // Ten offers to ten clients: the pool of ten is reserved, the first six evicted on the way.
    for index in 0..10 {
        harness
            .send(&request_message(
                MessageType::Discover,
                mac(index),
                u32::from(index),
            ))
            .unwrap();
    }
    harness.replies();
    assert_eq!(harness.server.lease_table().reservation_count(), 4);
    // A newcomer gets an address an evicted offer gave back.
    harness.lease(request_message(MessageType::Discover, mac(50), 50));
    // Once every offer has lapsed, the whole rest of the pool is usable again.
    harness.now += Duration::from_secs(31);
    for index in 60..69 {
        harness.lease(request_message(
            MessageType::Discover,
            mac(index),
            u32::from(index),
        ));
    }
    assert_eq!(harness.server.lease_table().binding_count(), 10);
    assert_eq!(
        harness.send(&request_message(MessageType::Discover, mac(99), 99)),
        Err(DhcpDrop::PoolExhausted([10, 0, 0, 0].into()))
    );
}

#[test]
fn quarantine_ends_and_the_address_comes_back() {
    let mut config = config();
    config.decline_quarantine = Duration::from_secs(60);
    let mut harness = Harness::new(config);
    let mut addresses = Vec::new();
    for index in 0..10 {
        addresses.push(
            harness
                .lease(request_message(
                    MessageType::Discover,
                    mac(index),
                    u32::from(index),
                ))
                .yiaddr(),
        );
    }
    let mut decline = request_message(MessageType::Decline, mac(3), 77);
    decline
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(addresses[3]));
    harness.send(&decline).unwrap();
    harness.commit_all();
    assert!(
        harness
            .send(&request_message(MessageType::Discover, mac(40), 40))
            .is_err()
    );
    harness.now += Duration::from_secs(61);
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(40), 41))
            .yiaddr(),
        addresses[3]
    );
}

#[test]
fn new_clients_get_addresses_only_from_the_servers_blocks_and_bound_ones_keep_theirs() {
    let mut harness = Harness::new(config());
    // Client 1 is bound to .100 before this server holds any block (another server gave it).
    let first = harness.lease(request_message(MessageType::Discover, mac(1), 1));
    assert_eq!(first.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
    harness.server.set_allocatable(
        harness.now,
        Some(vec![AddressRange {
            first: Ipv4Addr::new(10, 0, 0, 104),
            last: Ipv4Addr::new(10, 0, 0, 105),
        }]),
    );
    // A new client asking for an address outside the blocks gets one inside them.
    let mut discover = request_message(MessageType::Discover, mac(2), 2);
    discover
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 101)));
    assert_eq!(
        harness.lease(discover).yiaddr(),
        Ipv4Addr::new(10, 0, 0, 104)
    );
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(3), 3))
            .yiaddr(),
        Ipv4Addr::new(10, 0, 0, 105)
    );
    // The blocks are used up: no offer yet for a fourth client (its DISCOVER waits for the
    // next block), while the bound one keeps its own.
    let fourth = request_message(MessageType::Discover, mac(4), 4);
    assert_eq!(
        harness.send(&fourth),
        Err(DhcpDrop::AwaitingAddresses(Ipv4Addr::new(10, 0, 0, 0)))
    );
    assert!(harness.replies().is_empty());
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(1), 5))
            .yiaddr(),
        Ipv4Addr::new(10, 0, 0, 100)
    );
    // The next block arrives a moment later: the waiting DISCOVER is offered from it, with
    // no retransmission.
    harness.now += Duration::from_millis(300);
    harness.server.set_allocatable(
        harness.now,
        Some(vec![
            AddressRange {
                first: Ipv4Addr::new(10, 0, 0, 104),
                last: Ipv4Addr::new(10, 0, 0, 105),
            },
            AddressRange {
                first: Ipv4Addr::new(10, 0, 0, 106),
                last: Ipv4Addr::new(10, 0, 0, 107),
            },
        ]),
    );
    let (offer, _) = harness.one_reply();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.xid(), fourth.xid());
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 0, 0, 106));
    assert_eq!(harness.server.awaiting_addresses_count(), 0);
}

#[test]
fn address_demand_counts_offers_pending_commits_and_waiting_discovers_per_subnet() {
    let mut harness = Harness::new(config());
    harness.server.set_allocatable(
        harness.now,
        Some(vec![AddressRange {
            first: Ipv4Addr::new(10, 0, 0, 104),
            last: Ipv4Addr::new(10, 0, 0, 106),
        }]),
    );
    assert_eq!(harness.server.addresses_in_demand(harness.now), vec![0, 0]);
    // An offer reserves .104.
    let first = request_message(MessageType::Discover, mac(1), 1);
    harness.send(&first).unwrap();
    let (offer, _) = harness.one_reply();
    assert_eq!(harness.server.addresses_in_demand(harness.now), vec![1, 0]);
    // Its REQUEST waits for the commit: still one address, not two.
    harness
        .send(&selecting(&first, offer.yiaddr(), SERVER))
        .unwrap();
    assert_eq!(harness.server.addresses_in_demand(harness.now), vec![1, 0]);
    // A second offer, and a new client of the second subnet (through a relay) waiting for a
    // block there.
    harness
        .send(&request_message(MessageType::Discover, mac(2), 2))
        .unwrap();
    harness.replies();
    let mut relayed = request_message(MessageType::Discover, mac(3), 3);
    relayed.set_giaddr(Ipv4Addr::new(10, 1, 0, 1));
    assert_eq!(
        harness.send(&relayed),
        Err(DhcpDrop::AwaitingAddresses(Ipv4Addr::new(10, 1, 0, 0)))
    );
    assert_eq!(harness.server.addresses_in_demand(harness.now), vec![2, 1]);
    // Committed, the first address is bound and out of the demand; the waiting DISCOVER's
    // deadline passes and it leaves the demand too.
    assert_eq!(harness.commit_all().len(), 1);
    harness.replies();
    assert_eq!(harness.server.addresses_in_demand(harness.now), vec![1, 1]);
    harness.now += ADDRESS_WAIT_MAX;
    assert_eq!(harness.server.addresses_in_demand(harness.now), vec![1, 0]);
}

#[test]
fn a_discover_waits_for_a_block_only_so_long_and_one_per_client() {
    let mut harness = Harness::new(config());
    harness
        .server
        .set_allocatable(harness.now, Some(Vec::new()));
    let first = request_message(MessageType::Discover, mac(1), 1);
    assert_eq!(
        harness.send(&first),
        Err(DhcpDrop::AwaitingAddresses(Ipv4Addr::new(10, 0, 0, 0)))
    );
    // Its retransmission replaces it; another client's DISCOVER waits beside it.
    harness.now += Duration::from_millis(100);
    let retransmitted = request_message(MessageType::Discover, mac(1), 11);
    assert!(harness.send(&retransmitted).is_err());
    assert!(
        harness
            .send(&request_message(MessageType::Discover, mac(2), 2))
            .is_err()
    );
    assert_eq!(harness.server.awaiting_addresses_count(), 2);
    // A REQUEST for another server's offer: that client no longer waits for ours.
    let chose_other = selecting(
        &first,
        Ipv4Addr::new(10, 0, 0, 150),
        Ipv4Addr::new(10, 0, 0, 2),
    );
    assert_eq!(
        harness.send(&chose_other),
        Err(DhcpDrop::OtherServerChosen(Ipv4Addr::new(10, 0, 0, 2)))
    );
    assert_eq!(harness.server.awaiting_addresses_count(), 1);
    // Past the wait, a block answers nobody: the client has retransmitted or gone elsewhere.
    harness.now += ADDRESS_WAIT_MAX;
    harness.server.set_allocatable(
        harness.now,
        Some(vec![AddressRange {
            first: Ipv4Addr::new(10, 0, 0, 104),
            last: Ipv4Addr::new(10, 0, 0, 105),
        }]),
    );
    assert!(harness.replies().is_empty());
    assert_eq!(harness.server.awaiting_addresses_count(), 0);
    // A single server (no blocks) has nothing to wait for: an empty pool is a drop.
    let mut single = Harness::new(DhcpConfig {
        subnets: vec![subnet([10, 0, 0, 0], [10, 0, 0, 100], [10, 0, 0, 100])],
        ..config()
    });
    single.lease(request_message(MessageType::Discover, mac(1), 1));
    assert_eq!(
        single.send(&request_message(MessageType::Discover, mac(2), 2)),
        Err(DhcpDrop::PoolExhausted(Ipv4Addr::new(10, 0, 0, 0)))
    );
}

#[test]
fn rendezvous_ranks_are_a_permutation_and_spread_the_first_rank() {
    let servers = vec![1, 2, 3];
    let mut first_rank = BTreeMap::new();
    for client in 0..300u32 {
        let client = ClientId(client.to_be_bytes().to_vec());
        let mut ranks: Vec<usize> = servers
            .iter()
            .map(|own| {
                Rendezvous {
                    own: *own,
                    servers: servers.clone(),
                    stagger: Duration::from_millis(300),
                    exhausted: BTreeMap::new(),
                }
                .rank(&client, None)
            })
            .collect();
        let leader = servers[ranks.iter().position(|rank| *rank == 0).unwrap()];
        *first_rank.entry(leader).or_insert(0) += 1;
        ranks.sort_unstable();
        assert_eq!(ranks, vec![0, 1, 2]);
    }
    assert!(
        first_rank.values().all(|count| *count > 60),
        "first ranks spread over the servers: {first_rank:?}"
    );
}

/// The rank server 2 of the servers [1, 2] gives the Ethernet client `hardware`.
fn rank_on_second_of_two(
    hardware: &[u8; 6],
    stagger: Duration,
    new_in_subnet: Option<usize>,
) -> usize {
    let mut client = vec![1];
    client.extend_from_slice(hardware);
    Rendezvous {
        own: 2,
        servers: vec![1, 2],
        stagger,
        exhausted: BTreeMap::new(),
    }
    .rank(&ClientId(client), new_in_subnet)
}

#[test]
fn a_later_ranked_server_offers_after_its_stagger_and_not_at_all_once_the_client_chose() {
    let stagger = Duration::from_millis(300);
    let client_of_rank = |rank: usize| {
        (0u8..=255)
            .map(mac)
            .find(|hardware| rank_on_second_of_two(hardware, stagger, Some(0)) == rank)
            .unwrap()
    };
    let mut harness = Harness::new(config());
    harness.server.set_rendezvous(Some(Rendezvous {
        own: 2,
        servers: vec![1, 2],
        stagger,
        exhausted: BTreeMap::new(),
    }));
    // Rank 0: at once.
    harness
        .send(&request_message(
            MessageType::Discover,
            client_of_rank(0),
            1,
        ))
        .unwrap();
    assert_eq!(harness.replies().len(), 1);
    assert_eq!(harness.server.poll_timeout(), None);
    // Rank 1: after the stagger.
    let late = client_of_rank(1);
    harness
        .send(&request_message(MessageType::Discover, late, 2))
        .unwrap();
    assert!(harness.replies().is_empty());
    assert_eq!(harness.server.poll_timeout(), Some(harness.now + stagger));
    harness
        .server
        .handle_timeout(harness.now + stagger - Duration::from_millis(1));
    assert!(harness.replies().is_empty());
    harness.server.handle_timeout(harness.now + stagger);
    let (offer, _) = harness.one_reply();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    // Rank 1 again, but the client takes server 1's offer before the stagger ends.
    let discover = request_message(MessageType::Discover, late, 3);
    harness.send(&discover).unwrap();
    let request = selecting(&discover, [10, 0, 0, 107].into(), [10, 0, 0, 2].into());
    assert!(harness.send(&request).is_err());
    assert_eq!(harness.server.poll_timeout(), None);
    harness.server.handle_timeout(harness.now + stagger * 2);
    assert!(harness.replies().is_empty());
}

#[test]
fn a_new_client_is_not_kept_waiting_for_a_server_with_no_free_address() {
    let stagger = Duration::from_millis(300);
    // Clients for whom server 1 ranks before server 2 (this one).
    let mut second_ranked = (0u8..=255)
        .map(mac)
        .filter(|hardware| rank_on_second_of_two(hardware, stagger, None) == 1);
    let (known, new) = (second_ranked.next().unwrap(), second_ranked.next().unwrap());
    let mut harness = Harness::new(config());
    let address = harness
        .lease(request_message(MessageType::Discover, known, 1))
        .yiaddr();
    // Server 1 has no free address left in subnet 0, as the cluster state shows.
    harness.server.set_rendezvous(Some(Rendezvous {
        own: 2,
        servers: vec![1, 2],
        stagger,
        exhausted: BTreeMap::from([(0, BTreeSet::from([1]))]),
    }));
    // A new client: server 1 cannot offer, so this one does, at once.
    harness
        .send(&request_message(MessageType::Discover, new, 2))
        .unwrap();
    let (offer, _) = harness.one_reply();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(harness.server.poll_timeout(), None);
    // A client with a binding: server 1 can offer it its address, so this one waits its rank.
    harness
        .send(&request_message(MessageType::Discover, known, 3))
        .unwrap();
    assert!(harness.replies().is_empty());
    assert_eq!(harness.server.poll_timeout(), Some(harness.now + stagger));
    harness.server.handle_timeout(harness.now + stagger);
    let (offer, _) = harness.one_reply();
    assert_eq!(offer.yiaddr(), address);
}

#[test]
fn in_a_cluster_an_expired_address_waits_out_the_drift_bound_before_reuse() {
    let mut config = config();
    config.subnets[0].ranges = vec![AddressRange {
        first: Ipv4Addr::new(10, 0, 0, 100),
        last: Ipv4Addr::new(10, 0, 0, 100),
    }];
    let mut harness = Harness::new(config);
    harness.server.set_reuse_grace(Duration::from_secs(10));
    harness.lease(request_message(MessageType::Discover, mac(1), 1));
    harness.now += Duration::from_secs(3600 + 9);
    assert_eq!(
        harness.send(&request_message(MessageType::Discover, mac(2), 2)),
        Err(DhcpDrop::PoolExhausted(Ipv4Addr::new(10, 0, 0, 0)))
    );
    harness.now += Duration::from_secs(1);
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(2), 3))
            .yiaddr(),
        Ipv4Addr::new(10, 0, 0, 100)
    );
}

#[test]
fn a_commit_with_an_earlier_expiry_acks_the_shorter_lease() {
    let mut harness = Harness::new(config());
    let discover = request_message(MessageType::Discover, mac(1), 1);
    harness.send(&discover).unwrap();
    let (offer, _) = harness.one_reply();
    let request = selecting(&discover, offer.yiaddr(), SERVER);
    harness.send(&request).unwrap();
    let proposal = harness.server.poll_lease_proposal().unwrap();
    let now_secs = unix_secs(harness.now);
    harness
        .server
        .handle_lease_committed_until(harness.now, proposal.id, now_secs + 300);
    let (ack, _) = harness.one_reply();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(
        ack.opts().get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(300))
    );
    assert_eq!(
        ack.opts().get(OptionCode::Renewal),
        Some(&DhcpOption::Renewal(150))
    );
    assert_eq!(
        harness
            .server
            .lease_table()
            .binding(offer.yiaddr())
            .map(|binding| binding.expires_at_unix_secs),
        Some(now_secs + 300)
    );
}

#[test]
fn a_reconfiguration_keeps_the_leases_and_serves_the_new_hosts() {
    let mut harness = Harness::new(config());
    let first = harness.lease(request_message(MessageType::Discover, mac(1), 1));
    let mut changed = config();
    changed.hosts.push(HostConfig {
        hardware_address: mac(2),
        address: Some(Ipv4Addr::new(10, 0, 0, 60)),
        hostname: Some("worker-2".into()),
    });
    harness.server.reconfigure(changed).unwrap();
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(2), 2))
            .yiaddr(),
        Ipv4Addr::new(10, 0, 0, 60)
    );
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(1), 3))
            .yiaddr(),
        first.yiaddr(),
        "the lease survived the reconfiguration"
    );
    let mut broken = config();
    broken.hosts.push(broken.hosts[0].clone());
    assert!(harness.server.reconfigure(broken).is_err());
    assert_eq!(
        harness
            .lease(request_message(MessageType::Discover, mac(2), 4))
            .yiaddr(),
        Ipv4Addr::new(10, 0, 0, 60),
        "a refused configuration changed nothing"
    );
}
