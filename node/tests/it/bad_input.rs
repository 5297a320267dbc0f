//! Bad input on every port of one server: truncated, oversized and garbage datagrams for DHCP
//! and TFTP, broken handshakes and requests for NBD and HTTP, and clients that vanish in the
//! middle of a transfer. Afterwards, in the same run, real clients are still served
//! byte-identically, the process is alive, and its log names the refusals and drops.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::lab::{self, Lab, ServerAndClient};
use crate::nbd::{
    CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, COMMAND_READ, COMMAND_WRITE, NBD_PORT,
    OPTION_GO, OPTION_MAGIC, RawNbdClient,
};

const HTTP_PORT: u16 = 8080;
const IMAGE_BYTES: usize = 48 * 1024 * 1024;
const BOOT_FILE_BYTES: usize = 1024 * 1024 + 3;
const CLIENT_LIMIT: Duration = Duration::from_secs(30);
/// How long a probe waits for an answer it expects.
const REPLY_WAIT: Duration = Duration::from_secs(5);

struct BadInputLab {
    lab: Lab,
    pair: ServerAndClient,
    image: Vec<u8>,
    boot_file: Vec<u8>,
}

impl BadInputLab {
    /// One server with DHCP, TFTP, HTTP and NBD sharing one root: `images/root.img` (also the
    /// NBD export `root`) and `boot/ipxe.efi`.
    fn start() -> Self {
        let mut lab = Lab::new();
        let pair = lab.server_and_client("bi", "10.81.0");
        let root = lab.path("root");
        std::fs::create_dir_all(root.join("images")).expect("images dir");
        std::fs::create_dir_all(root.join("boot")).expect("boot dir");
        std::fs::create_dir_all(lab.path("state")).expect("state dir");
        let image = lab::deterministic_bytes(0xbad0_0001, IMAGE_BYTES);
        let boot_file = lab::deterministic_bytes(0xbad0_0002, BOOT_FILE_BYTES);
        std::fs::write(root.join("images/root.img"), &image).expect("write image");
        std::fs::write(root.join("boot/ipxe.efi"), &boot_file).expect("write boot file");
        std::fs::write(lab.path("secret.bin"), b"never served").expect("write secret");
        // Short TFTP timers, so abandoned sessions end (and are logged) within a second or two.
        let config = format!(
            "state_dir = \"{state}\"\n\
             [dhcp]\n\
             interfaces = [\"{interface}\"]\n\
             [[dhcp.subnet]]\n\
             cidr = \"10.81.0.0/24\"\n\
             ranges = [\"10.81.0.100-10.81.0.150\"]\n\
             [tftp]\n\
             listen = \"{address}:69\"\n\
             root = \"{root}\"\n\
             timeout_ms = 300\n\
             retries_max = 2\n\
             [http]\n\
             listen = \"{address}:{HTTP_PORT}\"\n\
             root = \"{root}\"\n\
             [nbd]\n\
             listen = \"{address}:{NBD_PORT}\"\n\
             [[nbd.export]]\n\
             name = \"root\"\n\
             path = \"{image}\"\n",
            state = lab.path("state").display(),
            interface = pair.server_interface,
            address = pair.server_address,
            root = root.display(),
            image = root.join("images/root.img").display(),
        );
        lab.serve("server", &pair.server, &config);
        Self {
            lab,
            pair,
            image,
            boot_file,
        }
    }

    fn address(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.pair.server_address)
            .parse()
            .expect("address")
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.lab.run(&self.pair.client, CLIENT_LIMIT, program, args)
    }

    /// The server process is still running; the panic message carries its log.
    fn assert_alive(&mut self, after: &str) {
        assert!(
            self.lab.is_running("server"),
            "the server died after {after}:\n{}",
            self.lab.log("server")
        );
    }

    fn wait_for_log(&self, fragments: &[&str]) {
        lab::wait_for(Duration::from_secs(20), || {
            self.lab
                .log("server")
                .lines()
                .any(|line| fragments.iter().all(|fragment| line.contains(fragment)))
        })
        .unwrap_or_else(|| {
            panic!(
                "no log line with all of {fragments:?}:\n{}",
                self.lab.log("server")
            )
        });
    }
}

#[test]
fn every_port_survives_bad_input_and_keeps_serving() {
    if !lab::enabled() {
        return;
    }
    for program in ["tftp", "curl", "nbdcopy", "busybox"] {
        lab::require_program(program);
    }
    let mut bad = BadInputLab::start();

    send_bad_dhcp(&bad);
    bad.assert_alive("DHCP garbage");
    send_bad_tftp(&bad);
    abandon_tftp_transfers(&bad);
    bad.assert_alive("TFTP garbage and abandoned transfers");
    send_bad_nbd(&bad);
    abandon_nbd_read(&bad);
    bad.assert_alive("NBD garbage and an abandoned read");
    send_bad_http(&bad);
    kill_http_download(&mut bad);
    bad.assert_alive("HTTP garbage and a killed download");

    good_clients_are_served(&bad);
    bad.assert_alive("the good clients");

    let log = bad.lab.log("server");
    for expected in [
        "tftp request refused",
        "nbd connection ended",
        "protocol error: client sent unknown handshake flags",
        "protocol error: option has bad magic",
        "protocol error: request has bad magic",
        "protocol error: write payload of",
        "protocol error: client sent more than",
        "http path refused: outside the served root",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
    for forbidden in ["panicked", "ERROR"] {
        assert!(!log.contains(forbidden), "log has {forbidden:?}:\n{log}");
    }
}

/// A BOOTP request header (236 bytes) for `hardware_address`, without the magic cookie.
fn bootp_header(operation: u8, hardware_address: [u8; 6]) -> Vec<u8> {
    let mut header = vec![0u8; 236];
    header[0] = operation;
    header[1] = 1; // Ethernet
    header[2] = 6;
    header[4..8].copy_from_slice(&0x0bad_cafe_u32.to_be_bytes());
    header[28..34].copy_from_slice(&hardware_address);
    header
}

/// A DHCP message: header, magic cookie, then `options` as given (END not added).
fn dhcp_message(operation: u8, hardware_address: [u8; 6], options: &[u8]) -> Vec<u8> {
    let mut message = bootp_header(operation, hardware_address);
    message.extend_from_slice(&[99, 130, 83, 99]);
    message.extend_from_slice(options);
    message
}

/// Option 53 of a DHCP message, found by walking the options after the magic cookie.
fn dhcp_message_type(message: &[u8]) -> Option<u8> {
    let mut options = message.get(240..)?;
    loop {
        match *options {
            [255, ..] | [] => return None,
            [0, ref rest @ ..] => options = rest,
            [53, 1, message_type, ..] => return Some(message_type),
            [_, length, ref rest @ ..] => options = rest.get(usize::from(length)..)?,
            [_] => return None,
        }
    }
}

fn send_bad_dhcp(bad: &BadInputLab) {
    let target = bad.address(67);
    let mac = [0x02, 0xba, 0xd0, 0, 0, 1];
    let mut datagrams: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![1],
        bootp_header(1, mac)[..235].to_vec(),
        // No magic cookie.
        bootp_header(1, mac),
        // Wrong magic cookie.
        [bootp_header(1, mac), vec![1, 2, 3, 4, 53, 1, 1, 255]].concat(),
        // Message type option whose length runs past the end.
        dhcp_message(1, mac, &[53, 200, 1]),
        // DISCOVER without END.
        dhcp_message(1, mac, &[53, 1, 1]),
        // Unknown message type.
        dhcp_message(1, mac, &[53, 1, 0xee, 255]),
        // Message type of length zero.
        dhcp_message(1, mac, &[53, 0, 255]),
        // Option overload (52) pointing into garbage sname and file fields.
        dhcp_message(1, mac, &[53, 1, 1, 52, 1, 3, 255]),
        // A BOOTREPLY sent to the server.
        dhcp_message(2, mac, &[53, 1, 2, 255]),
        // Hardware address length over 16.
        {
            let mut message = dhcp_message(1, mac, &[53, 1, 1, 255]);
            message[2] = 255;
            message
        },
        // A REQUEST for an address outside every subnet, from a client with no lease.
        dhcp_message(1, mac, &[53, 1, 3, 50, 4, 192, 0, 2, 1, 255]),
        // Noise, and more than the server's 1500-byte buffer (it arrives truncated).
        lab::deterministic_bytes(0xd4c9_0001, 1400),
        lab::deterministic_bytes(0xd4c9_0002, 8000),
    ];
    // Many pad options, then a type: long but legal.
    datagrams.push(dhcp_message(
        1,
        mac,
        &[vec![0u8; 1000], vec![53, 1, 1, 255]].concat(),
    ));
    // Then a good DISCOVER asking for a broadcast reply: its OFFER shows that the server got
    // through everything before it.
    let mut discover = dhcp_message(1, mac, &[53, 1, 1, 255]);
    discover[4..8].copy_from_slice(&0x600d_0001_u32.to_be_bytes());
    discover[10] = 0x80;
    let offer_type = bad.lab.inside(&bad.pair.client, || {
        let socket = UdpSocket::bind("0.0.0.0:68").expect("bind the DHCP client port");
        socket.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        for datagram in &datagrams {
            socket.send_to(datagram, target).expect("send dhcp garbage");
        }
        socket.send_to(&discover, target).expect("send discover");
        let mut buffer = [0u8; 1500];
        // Replies to the garbage that did make sense (a NAK, an OFFER for its xid) are
        // skipped; the reply to the good DISCOVER ends the wait.
        while let Ok((length, _)) = socket.recv_from(&mut buffer) {
            let reply = &buffer[..length];
            if length > 240 && reply[0] == 2 && reply[4..8] == 0x600d_0001_u32.to_be_bytes() {
                return dhcp_message_type(reply);
            }
        }
        None
    });
    assert_eq!(
        offer_type,
        Some(2),
        "no OFFER after the DHCP garbage; server log:\n{}",
        bad.lab.log("server")
    );
}

/// A TFTP request: opcode, filename, mode, then option name/value pairs.
fn tftp_request(opcode: u16, filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = opcode.to_be_bytes().to_vec();
    for field in [filename, mode]
        .into_iter()
        .chain(options.iter().flat_map(|(name, value)| [*name, *value]))
    {
        packet.extend_from_slice(field.as_bytes());
        packet.push(0);
    }
    packet
}

/// Receives one TFTP ERROR packet and returns its code.
fn receive_error_code(socket: &UdpSocket) -> Option<u16> {
    let mut buffer = [0u8; 1024];
    let (length, _) = socket.recv_from(&mut buffer).ok()?;
    let packet = &buffer[..length];
    (length >= 4 && packet[..2] == 5u16.to_be_bytes())
        .then(|| u16::from_be_bytes([packet[2], packet[3]]))
}

fn send_bad_tftp(bad: &BadInputLab) {
    let target = bad.address(69);
    let many_options: Vec<(String, String)> = (0..200)
        .map(|index| (format!("x{index}"), "1".to_owned()))
        .collect();
    let many_option_refs: Vec<(&str, &str)> = many_options
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    // Ignored without an answer: not a request, or not decodable.
    let ignored: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        vec![0, 1],
        b"\x00\x01boot/ipxe.efi".to_vec(),
        b"\x00\x01boot/ipxe.efi\x00octet".to_vec(),
        tftp_request(1, "boot/ipxe.efi", "octet", &many_option_refs),
        tftp_request(1, &"a".repeat(2000), "octet", &[]),
        // DATA, ACK, ERROR and OACK have no place on the listening port.
        b"\x00\x03\x00\x01data".to_vec(),
        b"\x00\x04\x00\x01".to_vec(),
        b"\x00\x05\x00\x00oops\x00".to_vec(),
        b"\x00\x06blksize\x001468\x00".to_vec(),
        b"\xff\xff".to_vec(),
        lab::deterministic_bytes(0x7f7f_0001, 1400),
        lab::deterministic_bytes(0x7f7f_0002, 65_000),
    ];
    // Answered with an ERROR packet of the given code.
    let refused: Vec<(Vec<u8>, u16)> = vec![
        (tftp_request(2, "boot/ipxe.efi", "octet", &[]), 2),
        (tftp_request(1, "boot/ipxe.efi", "mail", &[]), 4),
        (tftp_request(1, "boot/ipxe.efi", "bogus", &[]), 4),
        (tftp_request(1, "../secret.bin", "octet", &[]), 2),
        (tftp_request(1, "missing", "octet", &[]), 1),
    ];
    bad.lab.inside(&bad.pair.client, || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        for datagram in &ignored {
            socket.send_to(datagram, target).expect("send tftp garbage");
        }
        for (datagram, code) in &refused {
            socket.send_to(datagram, target).expect("send tftp request");
            assert_eq!(
                receive_error_code(&socket),
                Some(*code),
                "reply to {:?}",
                String::from_utf8_lossy(datagram)
            );
        }
        // Option values nobody can accept are ignored, not fatal: the file is served in
        // 512-byte blocks. This client then never answers, like the ones below.
        let request = tftp_request(
            1,
            "boot/ipxe.efi",
            "octet",
            &[
                ("blksize", "99999999999999999999999"),
                ("windowsize", "-1"),
                ("tsize", "abc"),
                ("timeout", "0"),
            ],
        );
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        socket.send_to(&request, target).expect("send");
        let mut buffer = [0u8; 2048];
        let (length, _) = socket.recv_from(&mut buffer).expect("first block");
        assert_eq!(&buffer[..4], b"\x00\x03\x00\x01", "not DATA 1");
        assert_eq!(length, 4 + 512);
    });
}

fn abandon_tftp_transfers(bad: &BadInputLab) {
    let target = bad.address(69);
    let request = tftp_request(1, "images/root.img", "octet", &[]);
    let (silent_port, aborting_port) = bad.lab.inside(&bad.pair.client, || {
        let mut buffer = [0u8; 2048];
        // Asks, gets DATA 1, never acknowledges: the server resends, then gives up.
        let silent = UdpSocket::bind("0.0.0.0:0").expect("bind");
        silent.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        silent.send_to(&request, target).expect("send");
        let (_, session) = silent.recv_from(&mut buffer).expect("DATA 1");
        assert_eq!(&buffer[..4], b"\x00\x03\x00\x01", "not DATA 1");
        assert_ne!(
            session.port(),
            69,
            "DATA must come from the session's own port"
        );
        let (_, resent_from) = silent.recv_from(&mut buffer).expect("resent DATA 1");
        assert_eq!(resent_from, session);
        assert_eq!(&buffer[..4], b"\x00\x03\x00\x01", "not a resent DATA 1");

        // A stranger writing to that session's port is not heard: the session socket is
        // connected to its client, so the kernel turns the stranger away (ICMP port
        // unreachable) and the session goes on resending DATA 1 to its own client only.
        let stranger = UdpSocket::bind("0.0.0.0:0").expect("bind");
        stranger
            .set_read_timeout(Some(REPLY_WAIT))
            .expect("timeout");
        stranger
            .send_to(b"\x00\x04\x00\x01", session)
            .expect("send");
        assert!(
            stranger.recv_from(&mut buffer).is_err(),
            "a stranger must get nothing from a session"
        );
        let (_, resent_from) = silent.recv_from(&mut buffer).expect("DATA 1 resent again");
        assert_eq!(resent_from, session);
        assert_eq!(
            &buffer[..4],
            b"\x00\x03\x00\x01",
            "the stray ACK moved the session"
        );

        // Asks, gets DATA 1, acknowledges a block never sent, then aborts with an ERROR.
        let aborting = UdpSocket::bind("0.0.0.0:0").expect("bind");
        aborting
            .set_read_timeout(Some(REPLY_WAIT))
            .expect("timeout");
        aborting.send_to(&request, target).expect("send");
        let (_, session) = aborting.recv_from(&mut buffer).expect("DATA 1");
        aborting
            .send_to(b"\x00\x04\x77\x77", session)
            .expect("send");
        aborting
            .send_to(b"\x00\x05\x00\x00going away\x00", session)
            .expect("send");
        let port = |socket: &UdpSocket| socket.local_addr().expect("local address").port();
        (port(&silent), port(&aborting))
    });
    let client = &bad.pair.client_address;
    bad.wait_for_log(&[
        &format!("peer={client}:{silent_port} "),
        "tftp transfer ended early",
        "TimedOut",
    ]);
    bad.wait_for_log(&[
        &format!("peer={client}:{aborting_port} "),
        "tftp transfer ended early",
        "ClientError",
        "going away",
    ]);
}

/// A fresh NBD connection that has sent good client flags.
fn nbd_after_flags(address: SocketAddr) -> RawNbdClient {
    let mut client = RawNbdClient::connect(address);
    client.send_client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    client
}

/// Sends bytes the server may hang up on before it has read them all.
fn send_ignoring_hang_up(client: &mut RawNbdClient, bytes: &[u8]) {
    let _ = client.stream.write_all(bytes);
}

fn send_bad_nbd(bad: &BadInputLab) {
    let address = bad.address(NBD_PORT);
    bad.lab.inside(&bad.pair.client, || {
        // Garbage instead of the client flags: the server hangs up.
        let mut client = RawNbdClient::connect(address);
        send_ignoring_hang_up(&mut client, &lab::deterministic_bytes(0x4e42_bad1, 100));
        assert!(client.is_closed_by_server(), "garbage client flags");

        // Garbage before even reading the greeting, then gone.
        let mut client = RawNbdClient::connect_without_greeting(address);
        send_ignoring_hang_up(
            &mut client,
            &lab::deterministic_bytes(0x4e42_bad2, 64 * 1024),
        );
        drop(client);

        // Connected and gone without a byte.
        drop(RawNbdClient::connect_without_greeting(address));

        // A truncated option header, then the client closes its side.
        let mut client = nbd_after_flags(address);
        client.send_bytes(&OPTION_MAGIC.to_be_bytes()[..8]);
        client.send_bytes(&OPTION_GO.to_be_bytes()[..2]);
        client.stream.shutdown(Shutdown::Write).expect("shutdown");
        assert!(client.is_closed_by_server(), "truncated option header");

        // An option with bad magic.
        let mut client = nbd_after_flags(address);
        send_ignoring_hang_up(&mut client, &lab::deterministic_bytes(0x4e42_bad3, 16));
        assert!(client.is_closed_by_server(), "bad option magic");

        // Option data over the server's bound is skipped and answered with TOO_BIG; the
        // connection then still negotiates an export.
        let mut client = nbd_after_flags(address);
        let oversized = vec![0u8; 64 * 1024 + 1];
        client.send_option(3, oversized.len() as u32, &oversized);
        let (option, reply_type, _) = client.read_option_reply();
        assert_eq!(
            (option, reply_type),
            (3, (1 << 31) | 9),
            "NBD_REP_ERR_TOO_BIG"
        );
        let export = client.option_go("root").expect("GO after a refused option");
        assert_eq!(export.size_bytes, IMAGE_BYTES as u64);
        // A read past the end is refused with EINVAL, and the connection goes on.
        client.send_request(COMMAND_READ, 0, 1, IMAGE_BYTES as u64 - 10, 4096);
        assert_eq!(client.read_simple_reply(), (22, 1), "read past the end");
        client.send_request(COMMAND_READ, 0, 2, u64::MAX - 100, 4096);
        assert_eq!(
            client.read_simple_reply(),
            (22, 2),
            "read at an overflowing offset"
        );
        client.send_request(COMMAND_READ, 0, 3, 0, 64 * 1024 * 1024);
        assert_eq!(client.read_simple_reply(), (22, 3), "read over the maximum");
        client.send_request(COMMAND_READ, 0, 4, 512, 512);
        assert_eq!(
            client.read_simple_reply(),
            (0, 4),
            "read after the refusals"
        );
        assert_eq!(client.read_bytes(512), bad.image[512..1024]);
        // A request with bad magic ends the connection.
        send_ignoring_hang_up(&mut client, &lab::deterministic_bytes(0x4e42_bad4, 28));
        assert!(client.is_closed_by_server(), "bad request magic");

        // An absurd option length: the server skips data for it, until the client leaves.
        let mut client = nbd_after_flags(address);
        client.send_option(
            OPTION_GO,
            u32::MAX,
            &lab::deterministic_bytes(0x4e42_bad5, 1 << 20),
        );
        drop(client);

        // An option flood: unknown options are answered until the bound, then the server
        // hangs up.
        let mut client = nbd_after_flags(address);
        let unknown_option = [
            OPTION_MAGIC.to_be_bytes().as_slice(),
            &0x0badu32.to_be_bytes(),
            &0u32.to_be_bytes(),
        ]
        .concat();
        send_ignoring_hang_up(&mut client, &unknown_option.repeat(100));
        assert!(client.is_closed_by_server(), "option flood");

        // A write announcing a payload over the maximum ends the connection.
        let mut client = nbd_after_flags(address);
        client.option_go("root").expect("GO");
        client.send_request(COMMAND_WRITE, 0, 1, 0, 64 * 1024 * 1024);
        send_ignoring_hang_up(&mut client, &[0u8; 4096]);
        assert!(client.is_closed_by_server(), "oversized write");

        // An unknown export.
        let mut client = nbd_after_flags(address);
        let refused = client
            .option_go("no-such-export")
            .expect_err("GO unknown export");
        assert_eq!(refused, (1 << 31) | 6, "NBD_REP_ERR_UNKNOWN");
    });
}

fn abandon_nbd_read(bad: &BadInputLab) {
    let address = bad.address(NBD_PORT);
    let local = bad.lab.inside(&bad.pair.client, || {
        // Asks for 32 MiB and hangs up at once, with the reply still to come.
        let mut client = nbd_after_flags(address);
        client.option_go("root").expect("GO");
        client.send_request(COMMAND_READ, 0, 1, 0, 32 * 1024 * 1024);
        client.stream.local_addr().expect("local address")
    });
    // The connection ends on the failed write (or the reset), not with a protocol error.
    bad.wait_for_log(&[
        &format!("peer={local}}}"),
        "nbd connection ended",
        "os error",
    ]);
}

/// Sends `request` on a fresh HTTP connection and returns whatever comes back before the
/// server closes (or the wait runs out). A write error (the server hung up first) is fine.
fn http_exchange(address: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect_timeout(&address, REPLY_WAIT).expect("connect");
    stream.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
    stream.set_write_timeout(Some(REPLY_WAIT)).expect("timeout");
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let mut buffer = [0u8; 8192];
    while let Ok(length) = stream.read(&mut buffer) {
        if length == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..length]);
    }
    response
}

/// The status line of a raw HTTP response.
fn status_line(response: &[u8]) -> String {
    String::from_utf8_lossy(response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn send_bad_http(bad: &BadInputLab) {
    let address = bad.address(HTTP_PORT);
    let oversized_header = [
        b"GET /boot/ipxe.efi HTTP/1.1\r\nHost: x\r\nX-Big: ".as_slice(),
        &vec![b'a'; 1024 * 1024],
        b"\r\n\r\n",
    ]
    .concat();
    let many_headers = [
        b"GET /boot/ipxe.efi HTTP/1.1\r\nHost: x\r\n".to_vec(),
        (0..500)
            .flat_map(|index| format!("X-Header-{index}: {index}\r\n").into_bytes())
            .collect(),
        b"\r\n".to_vec(),
    ]
    .concat();
    bad.lab.inside(&bad.pair.client, || {
        // Garbage gets 400 and a hang-up. Oversized heads get 431, unless the server's hang-up
        // (with our unread bytes still queued) resets the connection before the answer is read.
        for (request, expected_code, may_reset) in [
            (
                b"\x16\x03\x01\x02\x00garbage\r\n\r\n".to_vec(),
                "400",
                false,
            ),
            (lab::deterministic_bytes(0x4854_0001, 4096), "400", false),
            (
                b"GET /boot/ipxe.efi HTTP/9.9\r\n\r\n".to_vec(),
                "400",
                false,
            ),
            (b"GET\r\n\r\n".to_vec(), "400", false),
            (oversized_header.clone(), "431", true),
            (many_headers.clone(), "431", true),
        ] {
            let response = http_exchange(address, &request);
            let status = status_line(&response);
            assert!(
                status.split_whitespace().nth(1) == Some(expected_code)
                    || (may_reset && response.is_empty()),
                "{:?}... got {status:?}, expected {expected_code}",
                String::from_utf8_lossy(&request[..request.len().min(40)])
            );
        }
        // A truncated request, and a connection with nothing on it: both just hang up.
        let mut stream = TcpStream::connect_timeout(&address, REPLY_WAIT).expect("connect");
        stream
            .write_all(b"GET /images/root.img HTT")
            .expect("send truncated request");
        drop(stream);
        drop(TcpStream::connect_timeout(&address, REPLY_WAIT).expect("connect"));
        // A path out of the root.
        let response = http_exchange(
            address,
            b"GET /../secret.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            status_line(&response).starts_with("HTTP/1.1 403"),
            "escape got {:?}",
            status_line(&response)
        );
    });
}

fn kill_http_download(bad: &mut BadInputLab) {
    // A slow download of the big image, killed once it is under way.
    let partial = bad.lab.path("partial.img");
    let partial_argument = partial.to_string_lossy().into_owned();
    let url = format!(
        "http://{}:{HTTP_PORT}/images/root.img",
        bad.pair.server_address
    );
    let client = bad.pair.client.clone();
    bad.lab.spawn(
        "killed-curl",
        &client,
        "curl",
        &[
            "--silent",
            "--limit-rate",
            "4M",
            "--output",
            &partial_argument,
            &url,
        ],
    );
    lab::wait_for(Duration::from_secs(20), || {
        std::fs::metadata(&partial).is_ok_and(|metadata| metadata.len() >= 1024 * 1024)
    })
    .expect("the slow download never got under way");
    bad.lab.signal("killed-curl", libc::SIGKILL);
    let written = std::fs::metadata(&partial).map_or(0, |metadata| metadata.len());
    assert!(
        written < IMAGE_BYTES as u64,
        "the download finished before it was killed"
    );
}

fn good_clients_are_served(bad: &BadInputLab) {
    let host = bad.pair.server_address.as_str();

    let local = bad.lab.path("good-tftp.efi");
    let local_argument = local.to_string_lossy().into_owned();
    let output = bad.run(
        "tftp",
        &[
            host,
            "-m",
            "binary",
            "-c",
            "get",
            "boot/ipxe.efi",
            &local_argument,
        ],
    );
    assert!(
        output.status.success(),
        "tftp-hpa: {}",
        lab::describe(&output)
    );
    lab::assert_file_bytes(&local, &bad.boot_file);

    let local = bad.lab.path("good-nbd.img");
    let local_argument = local.to_string_lossy().into_owned();
    let output = bad.run("nbdcopy", &[&format!("nbd://{host}/root"), &local_argument]);
    assert!(
        output.status.success(),
        "nbdcopy: {}",
        lab::describe(&output)
    );
    lab::assert_file_bytes(&local, &bad.image);
    std::fs::remove_file(&local).expect("remove copy");

    let local = bad.lab.path("good-http.img");
    let local_argument = local.to_string_lossy().into_owned();
    let url = format!("http://{host}:{HTTP_PORT}/images/root.img");
    let output = bad.run(
        "curl",
        &[
            "--silent",
            "--show-error",
            "--fail",
            "--output",
            &local_argument,
            &url,
        ],
    );
    assert!(output.status.success(), "curl: {}", lab::describe(&output));
    lab::assert_file_bytes(&local, &bad.image);
    std::fs::remove_file(&local).expect("remove copy");

    // udhcpc runs the script on each event; it only records what it was given.
    let events = bad.lab.path("udhcpc.events");
    let script = bad.lab.path("udhcpc.script");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 ip=$ip serverid=$serverid\" >> {}\n",
            events.display()
        ),
    )
    .expect("write script");
    let mut permissions = std::fs::metadata(&script).expect("script").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&script, permissions).expect("chmod script");
    let script_argument = script.to_string_lossy().into_owned();
    let output = bad.run(
        "busybox",
        &[
            "udhcpc",
            "-i",
            &bad.pair.client_interface,
            "-n",
            "-q",
            "-f",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            &script_argument,
        ],
    );
    assert!(
        output.status.success(),
        "udhcpc: {}",
        lab::describe(&output)
    );
    let recorded = std::fs::read_to_string(&events).unwrap_or_default();
    let bound = recorded
        .lines()
        .find(|line| line.starts_with("bound "))
        .unwrap_or_else(|| {
            panic!(
                "udhcpc got no lease: {recorded}\n{}",
                lab::describe(&output)
            )
        });
    let address: std::net::Ipv4Addr = bound
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ip="))
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("no address in {bound:?}"));
    let octets = address.octets();
    assert!(
        octets[..3] == [10, 81, 0] && (100..=150).contains(&octets[3]),
        "lease {address} is outside the range"
    );
    assert!(
        bound.contains(&format!("serverid={host}")),
        "lease from another server: {bound}"
    );
}
