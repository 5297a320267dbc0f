//! Boot servers form a Raft cluster over QUIC with mutual TLS: separate `bootmesh serve`
//! processes, each in its own network namespace on one bridge, data directories on disk.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable, Encodable};

use crate::lab::{self, Lab, run_checked, wait_for};

const PORT: u16 = 7100;

struct ClusterLab {
    lab: Lab,
    namespaces: Vec<String>,
    interfaces: Vec<String>,
    /// Each server's interface on the cluster network.
    cluster_interfaces: Vec<String>,
    /// The namespace of the relay agent and its DHCP clients.
    client_namespace: String,
    /// Extra configuration for every server (a `[dhcp]` section).
    extra_config: String,
    /// Servers that get this instead of `extra_config`.
    extra_config_of: BTreeMap<usize, String>,
    /// Lines of every server's `[cluster]` section.
    cluster_settings: String,
    /// Servers whose clock is off, by how much (faketime's offset form).
    clock_offsets: BTreeMap<usize, String>,
}

/// The relay agent's address: DHCP clients behind it are on 10.71.0.0/16.
const GIADDR: Ipv4Addr = Ipv4Addr::new(10, 71, 0, 1);

impl ClusterLab {
    /// `servers` namespaces `s1..`, addresses 10.70.0.<i>/24 on one bridge, and a relay
    /// namespace at 10.70.0.200 holding the relay address 10.71.0.1 (every server routes
    /// 10.71.0.0/16 to it).
    fn new(servers: usize) -> Self {
        let mut lab = Lab::new();
        let switch = lab.namespace("sw");
        run_checked(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run_checked("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        // The servers' cluster traffic has a network of its own, so a test can cut a server
        // off from the others while its DHCP clients still reach it.
        run_checked(
            "ip",
            &["-n", &switch, "link", "add", "br1", "type", "bridge"],
        );
        run_checked("ip", &["-n", &switch, "link", "set", "br1", "up"]);
        let mut namespaces = Vec::new();
        let mut cluster_interfaces = Vec::new();
        let mut interfaces = Vec::new();
        for index in 1..=servers {
            let namespace = lab.namespace(&format!("s{index}"));
            let (inside, outside) = lab.veth(&format!("c{index}"), &namespace, &switch);
            lab.add_address(&namespace, &inside, &format!("10.70.0.{index}/24"));
            run_checked(
                "ip",
                &["-n", &switch, "link", "set", &outside, "master", "br0"],
            );
            lab.add_route(&namespace, "10.71.0.0/16", "10.70.0.200");
            let (cluster_inside, cluster_outside) =
                lab.veth(&format!("k{index}"), &namespace, &switch);
            lab.add_address(&namespace, &cluster_inside, &format!("10.80.0.{index}/24"));
            run_checked(
                "ip",
                &[
                    "-n",
                    &switch,
                    "link",
                    "set",
                    &cluster_outside,
                    "master",
                    "br1",
                ],
            );
            namespaces.push(namespace);
            interfaces.push(inside);
            cluster_interfaces.push(cluster_inside);
        }
        let client_namespace = lab.namespace("cl");
        let (inside, outside) = lab.veth("cr", &client_namespace, &switch);
        lab.add_address(&client_namespace, &inside, "10.70.0.200/24");
        lab.add_address(&client_namespace, "lo", "10.71.0.1/32");
        run_checked(
            "ip",
            &["-n", &switch, "link", "set", &outside, "master", "br0"],
        );
        Self {
            lab,
            namespaces,
            interfaces,
            cluster_interfaces,
            client_namespace,
            extra_config: String::new(),
            extra_config_of: BTreeMap::new(),
            cluster_settings: String::new(),
            clock_offsets: BTreeMap::new(),
        }
    }

    /// Lines for every server's `[cluster]` section.
    fn with_cluster_settings(mut self, settings: &str) -> Self {
        self.cluster_settings = settings.to_owned();
        self
    }

    /// Server `index` runs with its clock `offset` off (libfaketime's form: `+8s`, `-8s`).
    fn with_clock_offset(mut self, index: usize, offset: &str) -> Self {
        assert!(
            libfaketime().is_some(),
            "libfaketime is not installed; .ci/run installs it (package faketime)"
        );
        self.clock_offsets.insert(index, offset.to_owned());
        self
    }

    /// Every server also serves DHCP on its interface, for relayed clients on 10.71.0.0/16.
    fn with_dhcp(mut self, lease_secs: u64) -> Self {
        self.extra_config = format!(
            "[dhcp]\ninterfaces = [\"INTERFACE\"]\n\n[[dhcp.subnet]]\ncidr = \"10.71.0.0/16\"\nranges = [\"10.71.1.0-10.71.40.255\"]\nrouters = [\"10.71.0.1\"]\nlease_secs = {lease_secs}\n"
        );
        self
    }

    fn state_dir(&self, index: usize) -> PathBuf {
        self.lab.path(&format!("state{index}"))
    }

    /// Server `index`'s cluster address.
    fn address(index: usize) -> String {
        format!("10.80.0.{index}:{PORT}")
    }

    /// Cuts server `index` off from the other servers (its DHCP side stays up), or heals it.
    fn set_cluster_link(&self, index: usize, up: bool) {
        run_checked(
            "ip",
            &[
                "-n",
                &self.namespaces[index - 1],
                "link",
                "set",
                &self.cluster_interfaces[index - 1],
                if up { "up" } else { "down" },
            ],
        );
    }

    /// Runs `bootmesh <args> --state-dir <state of server index>` in server `index`'s
    /// namespace; returns (success, stdout, stderr).
    fn bootmesh(&self, index: usize, args: &[&str]) -> (bool, String, String) {
        self.bootmesh_as(index, &self.state_dir(index), args)
    }

    fn bootmesh_as(
        &self,
        index: usize,
        state_dir: &std::path::Path,
        args: &[&str],
    ) -> (bool, String, String) {
        let state_dir = state_dir.to_string_lossy().into_owned();
        let mut arguments: Vec<&str> = args.to_vec();
        arguments.extend(["--state-dir", state_dir.as_str()]);
        let output = self.lab.run(
            &self.namespaces[index - 1],
            Duration::from_secs(60),
            env!("CARGO_BIN_EXE_bootmesh"),
            &arguments,
        );
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn serve(&mut self, index: usize) {
        let config = format!(
            "state_dir = \"{}\"\n\n[cluster]\n{}\n\n{}",
            self.state_dir(index).display(),
            self.cluster_settings,
            self.extra_config_of
                .get(&index)
                .unwrap_or(&self.extra_config)
                .replace("INTERFACE", &self.interfaces[index - 1])
        );
        let namespace = self.namespaces[index - 1].clone();
        // libfaketime preloaded by `env`, not the `faketime` wrapper: the wrapper makes a named
        // semaphore per pid and leaves it behind when its server is killed with SIGKILL, and a
        // later server given the same pid then fails to start ("sem_open: File exists").
        let preload: Vec<String> = match self.clock_offsets.get(&index) {
            Some(offset) => vec![
                "env".to_owned(),
                format!("LD_PRELOAD={}", libfaketime().unwrap_or_default()),
                format!("FAKETIME={offset}"),
            ],
            None => Vec::new(),
        };
        let wrapper: Vec<&str> = preload.iter().map(String::as_str).collect();
        self.lab
            .serve_wrapped(&format!("s{index}"), &namespace, &config, &wrapper);
    }

    fn token(&self, asked: usize, ttl_secs: u64) -> String {
        let ttl = ttl_secs.to_string();
        let (ok, stdout, stderr) =
            self.bootmesh(asked, &["token", "create", "--ttl-secs", ttl.as_str()]);
        assert!(ok, "token create: {stderr}");
        stdout.trim().to_owned()
    }

    fn join(&self, index: usize, token: &str, via: usize) -> (bool, String, String) {
        let server = Self::address(via);
        let address = Self::address(index);
        self.bootmesh(
            index,
            &[
                "cluster",
                "join",
                "--token",
                token,
                "--server",
                server.as_str(),
                "--address",
                address.as_str(),
                "--rack",
                &format!("rack{}", index % 2),
            ],
        )
    }

    /// Server `index`'s view of the cluster, when it answers.
    fn status(&self, index: usize) -> Option<serde_json::Value> {
        let (ok, stdout, _) = self.bootmesh(index, &["cluster", "status", "--json"]);
        if !ok {
            return None;
        }
        serde_json::from_str(&stdout).ok()
    }

    fn log(&self, index: usize) -> String {
        self.lab.log(&format!("s{index}"))
    }

    fn logs(&self) -> String {
        (1..=self.namespaces.len())
            .map(|index| format!("--- s{index}\n{}", self.log(index)))
            .collect()
    }
}

/// Where libfaketime is (Debian puts it under the architecture's library directory).
fn libfaketime() -> Option<String> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
        .chain(std::iter::once(PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )))
        .find(|path| path.is_file())
        .map(|path| path.display().to_string())
}

fn voters(status: &serde_json::Value) -> usize {
    status["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|member| member["voter"] == serde_json::Value::Bool(true))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn three_servers_join_by_token_elect_and_a_new_leader_takes_over_after_kill_9() {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(3);
    let founder = ClusterLab::address(1);
    let init_report = found(&mut cluster);
    assert!(init_report.contains("CA fingerprint"), "{init_report}");

    for index in [2, 3] {
        let token = cluster.token(1, 600);
        assert!(token.starts_with("bmjoin1."), "{token}");
        let (ok, stdout, stderr) = cluster.join(index, &token, 1);
        assert!(ok, "join s{index}: {stderr}\n{}", cluster.logs());
        assert!(stdout.contains(&format!("as member {index}")), "{stdout}");
        // The token is single-use.
        let (ok, _, stderr) = cluster.bootmesh_as(
            index,
            &cluster.lab.path(&format!("again{index}")),
            &[
                "cluster",
                "join",
                "--token",
                &token,
                "--server",
                founder.as_str(),
                "--address",
                "10.80.0.99:7100",
            ],
        );
        assert!(
            !ok && stderr.contains("already used"),
            "reused token: {stderr}"
        );
        cluster.serve(index);
    }
    let formed = Instant::now();
    wait_for(Duration::from_secs(90), || {
        cluster.status(1).is_some_and(|status| voters(&status) == 3)
    })
    .unwrap_or_else(|| panic!("three voters never formed:\n{}", cluster.logs()));
    eprintln!(
        "three voters {:.1} s after the last join",
        formed.elapsed().as_secs_f64()
    );
    let status = cluster.status(3).expect("s3 answers");
    assert_eq!(status["leader"], serde_json::json!(1), "{status}");
    let (ok, table, _) = cluster.bootmesh(2, &["cluster", "members"]);
    assert!(
        ok && table.contains("leader") && table.contains("rack0"),
        "{table}"
    );

    // An expired token is refused.
    let short = cluster.token(1, 1);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, _, stderr) = cluster.bootmesh_as(
        3,
        &cluster.lab.path("expired"),
        &[
            "cluster",
            "join",
            "--token",
            &short,
            "--server",
            founder.as_str(),
            "--address",
            "10.80.0.98:7100",
        ],
    );
    assert!(!ok && stderr.contains("expired"), "expired token: {stderr}");

    // A peer with a certificate of another CA is refused and logged.
    let stranger = cluster.lab.path("stranger");
    let (ok, _, stderr) = cluster.bootmesh_as(
        2,
        &stranger,
        &["cluster", "init", "--address", "10.80.0.2:7199"],
    );
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = cluster.bootmesh_as(
        2,
        &stranger,
        &["cluster", "status", "--server", founder.as_str()],
    );
    assert!(!ok, "a stranger got an answer: {stderr}");
    wait_for(Duration::from_secs(10), || {
        cluster.log(1).contains("cluster handshake failed")
    })
    .unwrap_or_else(|| panic!("the refusal was not logged:\n{}", cluster.log(1)));

    // kill -9 of the leader: another server leads, and takes requests.
    cluster.lab.signal("s1", libc::SIGKILL);
    let killed = Instant::now();
    let new_leader = wait_for(Duration::from_secs(60), || {
        cluster.status(2).is_some_and(|status| {
            status["leader"]
                .as_u64()
                .is_some_and(|leader| leader == 2 || leader == 3)
        })
    });
    let took = killed.elapsed();
    assert!(
        new_leader.is_some(),
        "no new leader within 60 s:\n{}",
        cluster.logs()
    );
    eprintln!(
        "new leader {:.1} s after kill -9 of the leader",
        took.as_secs_f64()
    );
    let token = cluster.token(3, 60);
    assert!(token.starts_with("bmjoin1."), "{token}");

    // The dead server is removed; the two left are the voters.
    let (ok, stdout, stderr) = cluster.bootmesh(2, &["cluster", "remove", "1"]);
    assert!(
        ok && stdout.contains("member 1 removed"),
        "{stdout}{stderr}"
    );
    wait_for(Duration::from_secs(20), || {
        cluster.status(3).is_some_and(|status| {
            voters(&status) == 2
                && status["members"]
                    .as_array()
                    .is_some_and(|members| members.iter().all(|member| member["server_id"] != 1))
        })
    })
    .unwrap_or_else(|| panic!("member 1 still listed:\n{}", cluster.logs()));
}

/// Founds the cluster on s1 and starts it; returns `cluster init`'s report once s1 leads.
fn found(cluster: &mut ClusterLab) -> String {
    let founder = ClusterLab::address(1);
    let (ok, stdout, stderr) = cluster.bootmesh(
        1,
        &[
            "cluster",
            "init",
            "--address",
            founder.as_str(),
            "--rack",
            "rack1",
        ],
    );
    assert!(ok, "cluster init: {stderr}");
    cluster.serve(1);
    wait_for(Duration::from_secs(30), || {
        cluster
            .status(1)
            .is_some_and(|status| status["leader"] == serde_json::json!(1))
    })
    .unwrap_or_else(|| panic!("the founder never led:\n{}", cluster.logs()));
    stdout
}

/// Founds the cluster on s1 and joins the others; returns once all are voters.
fn form(cluster: &mut ClusterLab, count: usize) {
    found(cluster);
    for index in 2..=count {
        let token = cluster.token(1, 600);
        let (ok, _, stderr) = cluster.join(index, &token, 1);
        assert!(ok, "join s{index}: {stderr}\n{}", cluster.logs());
        cluster.serve(index);
    }
    wait_for(Duration::from_secs(90), || {
        cluster
            .status(1)
            .is_some_and(|status| voters(&status) == count)
    })
    .unwrap_or_else(|| panic!("{count} voters never formed:\n{}", cluster.logs()));
}

/// A relay agent with every server as a helper address, and the clients behind it: each
/// message goes to all servers, as a relay forwards a broadcast.
struct RelayFarm {
    socket: UdpSocket,
    servers: Vec<Ipv4Addr>,
    /// How long one send waits for its answer.
    window: Duration,
    /// The relay's address on its clients' subnet.
    giaddr: Ipv4Addr,
}

/// What the clients saw.
#[derive(Debug, Default)]
struct FarmLog {
    /// Client index -> (address, server) of its last ACK.
    acked: BTreeMap<u32, (Ipv4Addr, Ipv4Addr)>,
    /// Every (address, client) ever ACKed.
    every_ack: Vec<(Ipv4Addr, u32)>,
    /// Exchanges that got no ACK after all retries.
    unanswered: usize,
}

fn client_mac(index: u32) -> [u8; 6] {
    [
        0x02,
        0x71,
        0,
        (index >> 16) as u8,
        (index >> 8) as u8,
        index as u8,
    ]
}

impl RelayFarm {
    fn bind(servers: usize) -> Self {
        Self::bind_to(
            &(1..=servers).collect::<Vec<_>>(),
            Duration::from_millis(700),
        )
    }

    /// A relay whose helper addresses are only `servers`, waiting `window` per send.
    fn bind_to(servers: &[usize], window: Duration) -> Self {
        Self::bind_relay(GIADDR, servers, window)
    }

    /// A relay at `giaddr` (its clients' subnet) with the helper addresses `servers`.
    fn bind_relay(giaddr: Ipv4Addr, servers: &[usize], window: Duration) -> Self {
        let socket = UdpSocket::bind(SocketAddr::from((giaddr, 67))).expect("bind the relay");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self {
            socket,
            servers: servers
                .iter()
                .map(|index| Ipv4Addr::new(10, 70, 0, *index as u8))
                .collect(),
            window,
            giaddr,
        }
    }

    fn message(&self, message_type: MessageType, client: u32, xid: u32) -> Message {
        let mut message = Message::default();
        message
            .set_xid(xid)
            .set_chaddr(&client_mac(client))
            .set_giaddr(self.giaddr)
            .set_hops(1);
        message
            .opts_mut()
            .insert(DhcpOption::MessageType(message_type));
        message
    }

    /// Sends `request` to every helper and returns the first reply for its xid of a kind in
    /// `kinds`, with the server that sent it (its option 54).
    fn exchange(&self, request: &Message, kinds: &[MessageType]) -> Option<(Message, Ipv4Addr)> {
        let bytes = request.to_vec().expect("encode");
        let mut buffer = [0u8; 1500];
        for _ in 0..4 {
            for server in &self.servers {
                let _ = self.socket.send_to(&bytes, (*server, 67));
            }
            let deadline = Instant::now() + self.window;
            while Instant::now() < deadline {
                let Ok((length, _)) = self.socket.recv_from(&mut buffer) else {
                    continue;
                };
                let Ok(reply) = Message::from_bytes(&buffer[..length]) else {
                    continue;
                };
                let kind = reply.opts().msg_type();
                if reply.xid() == request.xid() && kind.is_some_and(|kind| kinds.contains(&kind)) {
                    let server = match reply.opts().get(dhcproto::v4::OptionCode::ServerIdentifier)
                    {
                        Some(DhcpOption::ServerIdentifier(server)) => *server,
                        _ => Ipv4Addr::UNSPECIFIED,
                    };
                    return Some((reply, server));
                }
            }
        }
        None
    }

    /// DISCOVER, the first OFFER, REQUEST naming its server; the ACK and who sent it.
    fn lease_ack(&self, client: u32, xid: u32) -> Option<(Message, Ipv4Addr)> {
        let (offer, server) = self.exchange(
            &self.message(MessageType::Discover, client, xid),
            &[MessageType::Offer],
        )?;
        let mut request = self.message(MessageType::Request, client, xid);
        request
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        request
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(server));
        let (ack, acked_by) = self.exchange(&request, &[MessageType::Ack, MessageType::Nak])?;
        (ack.opts().msg_type() == Some(MessageType::Ack)).then_some((ack, acked_by))
    }

    /// REBINDING; the ACK.
    fn rebind_ack(&self, client: u32, xid: u32, address: Ipv4Addr) -> Option<Message> {
        let mut request = self.message(MessageType::Request, client, xid);
        request.set_ciaddr(address);
        let (ack, _) = self.exchange(&request, &[MessageType::Ack, MessageType::Nak])?;
        (ack.opts().msg_type() == Some(MessageType::Ack)).then_some(ack)
    }

    /// DISCOVER, the first OFFER, REQUEST naming its server; the ACKed address and server.
    fn lease(&self, client: u32, xid: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
        self.lease_ack(client, xid)
            .map(|(ack, acked_by)| (ack.yiaddr(), acked_by))
    }

    /// REBINDING: a REQUEST from the address it holds, to any server.
    fn rebind(&self, client: u32, xid: u32, address: Ipv4Addr) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let mut request = self.message(MessageType::Request, client, xid);
        request.set_ciaddr(address);
        let (ack, acked_by) = self.exchange(&request, &[MessageType::Ack, MessageType::Nak])?;
        (ack.opts().msg_type() == Some(MessageType::Ack)).then_some((ack.yiaddr(), acked_by))
    }

    /// Leases for `clients`, counting progress in `done`.
    fn storm(
        &self,
        clients: std::ops::Range<u32>,
        xid_base: u32,
        done: &AtomicUsize,
        log: &mut FarmLog,
    ) {
        for client in clients {
            let mut acked = None;
            for attempt in 0..3 {
                acked = self.lease(client, xid_base + client * 4 + attempt);
                if acked.is_some() {
                    break;
                }
            }
            match acked {
                Some((address, server)) => {
                    log.acked.insert(client, (address, server));
                    log.every_ack.push((address, client));
                }
                None => log.unanswered += 1,
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs `work` on a thread inside `namespace` while the caller goes on.
fn in_namespace<T: Send + 'static>(
    namespace: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = PathBuf::from("/var/run/netns").join(namespace);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        #[allow(unsafe_code)]
        let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(result, 0, "setns: {}", std::io::Error::last_os_error());
        work()
    })
}

/// Every client's last ACKed address, checked against one server's lease table.
fn check_lease_table(
    cluster: &ClusterLab,
    server: usize,
    acked: &BTreeMap<u32, (Ipv4Addr, Ipv4Addr)>,
) {
    let (ok, stdout, stderr) = cluster.bootmesh(server, &["lease", "list", "--json"]);
    assert!(ok, "lease list on s{server}: {stderr}");
    let leases: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("lease json");
    // A client may hold an earlier address too until it expires (an exchange it gave up on
    // may commit later); the one it was ACKed last must be among its leases.
    let mut table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for lease in &leases {
        table
            .entry(lease["hardware_address"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push(lease["address"].as_str().unwrap_or("").to_owned());
    }
    for (client, (address, _)) in acked {
        let mac = client_mac(*client)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert!(
            table
                .get(&mac)
                .is_some_and(|addresses| addresses.contains(&address.to_string())),
            "s{server} holds client {client}'s ACKed lease {address}: {:?}",
            table.get(&mac)
        );
    }
}

/// No address was ACKed to two clients, ever.
fn check_unique(log: &FarmLog) {
    let mut holder: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for (address, client) in &log.every_ack {
        if let Some(other) = holder.insert(*address, *client) {
            assert_eq!(
                other, *client,
                "{address} ACKed to clients {other} and {client}"
            );
        }
    }
}

#[test]
fn dhcp_through_three_servers_loses_no_acked_lease_when_the_granting_server_or_the_leader_is_killed()
 {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(3).with_dhcp(600);
    form(&mut cluster, 3);

    // A first storm with every server up.
    // Three storms of 700 clients: 2100 clients in all, as a relay farm.
    const PHASE: u32 = 700;
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let farm_done = Arc::clone(&done);
    let first = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind(3);
        let mut log = FarmLog::default();
        farm.storm(0..PHASE, 0x1000_0000, &farm_done, &mut log);
        (farm, log)
    })
    .join()
    .expect("farm");
    let (farm, mut log) = first;
    eprintln!(
        "{} leases through 3 servers in {:.1} s ({} unanswered)",
        log.acked.len(),
        started.elapsed().as_secs_f64(),
        log.unanswered
    );
    assert_eq!(log.unanswered, 0, "{}", cluster.logs());
    check_unique(&log);
    for server in 1..=3 {
        check_lease_table(&cluster, server, &log.acked);
    }

    // kill -9 of the server that granted client 0's lease, during a second storm (triggered by
    // the storm's progress, not a timer).
    let (_, granting) = log.acked[&0];
    let granting_index = usize::from(granting.octets()[3]);
    let done = Arc::new(AtomicUsize::new(0));
    let farm_done = Arc::clone(&done);
    let storm = in_namespace(&cluster.client_namespace, move || {
        farm.storm(PHASE..2 * PHASE, 0x2000_0000, &farm_done, &mut log);
        (farm, log)
    });
    wait_for(Duration::from_secs(120), || {
        done.load(Ordering::Relaxed) >= (PHASE / 3) as usize
    })
    .expect("the second storm progresses");
    cluster
        .lab
        .signal(&format!("s{granting_index}"), libc::SIGKILL);
    let killed = Instant::now();
    let (farm, log) = storm.join().expect("farm");
    let survivors: Vec<usize> = (1..=3).filter(|index| *index != granting_index).collect();
    eprintln!(
        "granting server s{granting_index} killed; storm ended {:.1} s later, {} unanswered",
        killed.elapsed().as_secs_f64(),
        log.unanswered
    );
    check_unique(&log);
    // Every client of the first storm rebinds through the survivors and keeps its address.
    let rebind_started = Instant::now();
    let (farm, log, rebound) = in_namespace(&cluster.client_namespace, move || {
        let mut rebound = BTreeMap::new();
        for (client, (address, _)) in log.acked.clone() {
            if client >= PHASE {
                continue;
            }
            if let Some(acked) = farm.rebind(client, 0x3000_0000 + client, address) {
                rebound.insert(client, acked);
            }
        }
        (farm, log, rebound)
    })
    .join()
    .expect("rebind");
    eprintln!(
        "{} of {PHASE} clients rebound through the survivors in {:.1} s",
        rebound.len(),
        rebind_started.elapsed().as_secs_f64()
    );
    for (client, (address, server)) in &rebound {
        assert_eq!(
            *address, log.acked[client].0,
            "client {client} kept its address"
        );
        assert_ne!(usize::from(server.octets()[3]), granting_index);
    }
    assert_eq!(rebound.len(), PHASE as usize, "every client rebound");
    for server in &survivors {
        check_lease_table(&cluster, *server, &log.acked);
    }

    // kill -9 of the leader during a third storm, on the two that are left... which would
    // leave no majority: restart the killed server first.
    cluster.serve(granting_index);
    wait_for(Duration::from_secs(60), || {
        cluster.status(granting_index).is_some_and(|status| {
            status["leader"].as_u64().is_some()
                && status["last_applied"]
                    == cluster
                        .status(survivors[0])
                        .map(|other| other["last_applied"].clone())
                        .unwrap_or_default()
        })
    })
    .unwrap_or_else(|| panic!("the restarted server did not catch up:\n{}", cluster.logs()));
    let leader = cluster
        .status(survivors[0])
        .and_then(|status| status["leader"].as_u64())
        .expect("a leader") as usize;
    let done = Arc::new(AtomicUsize::new(0));
    let farm_done = Arc::clone(&done);
    let mut log = log;
    let storm = in_namespace(&cluster.client_namespace, move || {
        farm.storm(2 * PHASE..3 * PHASE, 0x4000_0000, &farm_done, &mut log);
        log
    });
    wait_for(Duration::from_secs(120), || {
        done.load(Ordering::Relaxed) >= (PHASE / 3) as usize
    })
    .expect("the third storm progresses");
    cluster.lab.signal(&format!("s{leader}"), libc::SIGKILL);
    let killed = Instant::now();
    let others: Vec<usize> = (1..=3).filter(|index| *index != leader).collect();
    let elected = wait_for(Duration::from_secs(60), || {
        cluster.status(others[0]).is_some_and(|status| {
            status["leader"]
                .as_u64()
                .is_some_and(|new| new as usize != leader)
        })
    });
    let election = killed.elapsed();
    assert!(
        elected.is_some(),
        "no new leader within 60 s:\n{}",
        cluster.logs()
    );
    let log = storm.join().expect("farm");
    eprintln!(
        "leader s{leader} killed: new leader after {:.1} s; storm ended {:.1} s after the kill, {} unanswered in all",
        election.as_secs_f64(),
        killed.elapsed().as_secs_f64(),
        log.unanswered
    );
    check_unique(&log);
    for server in &others {
        check_lease_table(&cluster, *server, &log.acked);
    }
}

#[test]
fn five_servers_form_and_serve_dhcp_with_one_lease_table() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("chromium");
    let mut cluster = ClusterLab::new(5).with_dhcp(600);
    let www = cluster.lab.path("www");
    std::fs::create_dir_all(&www).expect("www");
    cluster.extra_config += &format!(
        "\n[http]\nlisten = \"0.0.0.0:8080\"\nroot = \"{}\"\n",
        www.display()
    );
    form(&mut cluster, 5);
    let done = Arc::new(AtomicUsize::new(0));
    let log = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind(5);
        let mut log = FarmLog::default();
        farm.storm(0..60, 0x5000_0000, &done, &mut log);
        log
    })
    .join()
    .expect("farm");
    assert_eq!(log.unanswered, 0, "{}", cluster.logs());
    check_unique(&log);
    let granting: std::collections::BTreeSet<Ipv4Addr> =
        log.acked.values().map(|(_, server)| *server).collect();
    eprintln!(
        "60 leases through 5 servers, ACKed by {} of them",
        granting.len()
    );
    for server in 1..=5 {
        wait_for(Duration::from_secs(10), || {
            cluster.status(server).is_some_and(|status| {
                status["last_applied"]
                    == cluster
                        .status(1)
                        .map(|one| one["last_applied"].clone())
                        .unwrap_or_default()
            })
        });
        check_lease_table(&cluster, server, &log.acked);
    }
    nodes_and_dashboard_show_every_servers_part(&cluster, &log);
    // A lease released on one server has ended on another.
    let address = log.acked[&0].0.to_string();
    let (ok, stdout, stderr) = cluster.bootmesh(2, &["lease", "release", address.as_str()]);
    assert!(ok && stdout.contains("released"), "{stdout}{stderr}");
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    wait_for(Duration::from_secs(10), || {
        let (_, stdout, _) = cluster.bootmesh(4, &["lease", "list", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
            .unwrap_or_default()
            .iter()
            .any(|lease| {
                lease["address"] == serde_json::json!(address)
                    && lease["expires_at_unix_secs"]
                        .as_u64()
                        .is_some_and(|expiry| expiry <= now + 1)
            })
    })
    .unwrap_or_else(|| panic!("the release did not reach s4:\n{}", cluster.logs()));
}

/// Any server's `/api/v1/nodes` holds every client's boot, whichever server ACKed it (each
/// asks the other members), and its dashboard, in headless Chromium, shows the cluster's five
/// members in their racks and the booting nodes.
fn nodes_and_dashboard_show_every_servers_part(cluster: &ClusterLab, log: &FarmLog) {
    let bootmesh_nodes = cluster.lab.run(
        &cluster.client_namespace,
        Duration::from_secs(30),
        env!("CARGO_BIN_EXE_bootmesh"),
        &["nodes", "--server", "10.70.0.3:8080", "--json"],
    );
    assert!(
        bootmesh_nodes.status.success(),
        "bootmesh nodes: {}",
        lab::describe(&bootmesh_nodes)
    );
    let view: serde_json::Value =
        serde_json::from_slice(&bootmesh_nodes.stdout).expect("nodes --json");
    let servers = view["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 5, "{view:#}");
    assert!(
        servers.iter().all(|server| server["error"].is_null()),
        "every member answered: {servers:#?}"
    );
    let nodes = view["nodes"].as_array().expect("nodes");
    for (client, (address, _)) in &log.acked {
        let mac = client_mac(*client)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let node = nodes
            .iter()
            .find(|node| node["mac"] == serde_json::json!(mac))
            .unwrap_or_else(|| panic!("client {client} ({mac}) in {view:#}"));
        assert_eq!(lab::timeline_stages(node), ["dhcp"], "{node:#}");
        assert_eq!(node["address"], serde_json::json!(address.to_string()));
    }

    let dom = dashboard_dom(
        cluster,
        &cluster.client_namespace,
        "http://10.70.0.3:8080/dashboard",
    );
    let acked = log.acked.len();
    for shown in [
        r#"<span id="health" class="badge ok">ready</span>"#.to_owned(),
        "5 members".to_owned(),
        "<h3>rack rack0</h3>".to_owned(),
        "<h3>rack rack1</h3>".to_owned(),
        r#"<div class="member leader">server "#.to_owned(),
        format!(r#"<div class="stage" data-stage="dhcp"><b>{acked}</b>dhcp</div>"#),
    ] {
        assert!(dom.contains(&shown), "{shown} in\n{dom}");
    }
}

/// The dashboard at `url` as headless Chromium has it after its first polls, from `namespace`.
fn dashboard_dom(cluster: &ClusterLab, namespace: &str, url: &str) -> String {
    let profile = format!("--user-data-dir={}", cluster.lab.path("chromium").display());
    let chromium = cluster.lab.run(
        namespace,
        Duration::from_secs(180),
        "chromium",
        &[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &profile,
            // Virtual time lets the page's script and its first polls finish before the dump.
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
    );
    assert!(
        chromium.status.success(),
        "chromium: {}",
        lab::describe(&chromium)
    );
    String::from_utf8_lossy(&chromium.stdout).into_owned()
}

/// The lease time an ACK gives, seconds.
fn lease_secs(ack: &Message) -> u32 {
    match ack.opts().get(dhcproto::v4::OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => *secs,
        _ => 0,
    }
}

#[test]
fn a_server_cut_off_with_its_clock_ahead_renews_and_grants_short_leases_and_reconciles_on_heal() {
    if !lab::enabled() {
        return;
    }
    cut_off_server_scenario("+8s");
}

#[test]
fn a_server_cut_off_with_its_clock_behind_renews_and_grants_short_leases_and_reconciles_on_heal() {
    if !lab::enabled() {
        return;
    }
    cut_off_server_scenario("-8s");
}

/// s3, whose clock is `clock_offset` off the others' (within the 10 s drift bound), is cut off
/// from the cluster network while its DHCP side stays up: it renews and grants alone, the
/// majority serves others, no address is ACKed twice, and on the heal every server holds every
/// lease.
fn cut_off_server_scenario(clock_offset: &str) {
    let mut cluster = ClusterLab::new(3)
        .with_dhcp(600)
        .with_clock_offset(3, clock_offset);
    form(&mut cluster, 3);
    // Every server holds a block before the cut (taken within a second of starting).
    std::thread::sleep(Duration::from_secs(2));
    let done = Arc::new(AtomicUsize::new(0));
    let mut log = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind(3);
        let mut log = FarmLog::default();
        farm.storm(0..30, 0x6000_0000, &done, &mut log);
        log
    })
    .join()
    .expect("farm");
    assert_eq!(log.unanswered, 0, "{}", cluster.logs());
    // Every lease above was ACKed after this instant, so it ends (in true time) 600 s after
    // it at the latest.
    let acked_by = Instant::now();

    cluster.set_cluster_link(3, false);
    let cut = Instant::now();
    // Through s3 alone: renewals up to the committed expiry less the drift bound, and new
    // clients with short leases from s3's own blocks.
    let acked = log.acked.clone();
    let (renewed, granted) = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind_to(&[3], Duration::from_secs(8));
        let renewed: Vec<(u32, Ipv4Addr, u32, Instant)> = (0..10u32)
            .filter_map(|client| {
                let (address, _) = acked[&client];
                farm.rebind_ack(client, 0x6100_0000 + client, address)
                    .map(|ack| (client, ack.yiaddr(), lease_secs(&ack), Instant::now()))
            })
            .collect();
        let granted: Vec<(u32, Ipv4Addr, u32)> = (100..108u32)
            .filter_map(|client| {
                farm.lease_ack(client, 0x6200_0000 + client)
                    .map(|(ack, _)| (client, ack.yiaddr(), lease_secs(&ack)))
            })
            .collect();
        (renewed, granted)
    })
    .join()
    .expect("minority farm");
    eprintln!(
        "clock {clock_offset}: cut off for {:.1} s: {} renewals and {} new leases from s3 alone",
        cut.elapsed().as_secs_f64(),
        renewed.len(),
        granted.len()
    );
    assert_eq!(
        renewed.len(),
        10,
        "renewals through s3 alone:\n{}",
        cluster.log(3)
    );
    for (client, address, secs, at) in &renewed {
        assert_eq!(
            *address, log.acked[client].0,
            "client {client} kept its address"
        );
        // The committed lease ends at most 600 s after `acked_by`; s3 must not promise past
        // it, whichever way its clock is off.
        let committed_left = 600.0 - at.duration_since(acked_by).as_secs_f64();
        assert!(
            *secs > 0 && f64::from(*secs) < committed_left,
            "renewal lease {secs} s ends before the committed expiry ({committed_left:.1} s left)"
        );
    }
    assert_eq!(
        granted.len(),
        8,
        "new leases through s3 alone:\n{}",
        cluster.log(3)
    );
    for (client, address, secs) in &granted {
        assert!(*secs > 0 && *secs <= 300, "new lease of {secs} s is short");
        log.acked
            .insert(*client, (*address, Ipv4Addr::new(10, 70, 0, 3)));
        log.every_ack.push((*address, *client));
    }
    // The majority goes on serving new clients meanwhile.
    let done = Arc::new(AtomicUsize::new(0));
    let majority = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind_to(&[1, 2], Duration::from_millis(700));
        let mut log = FarmLog::default();
        farm.storm(200..220, 0x6300_0000, &done, &mut log);
        log
    })
    .join()
    .expect("majority farm");
    assert_eq!(majority.unanswered, 0, "{}", cluster.logs());
    log.acked.extend(majority.acked);
    log.every_ack.extend(majority.every_ack);
    check_unique(&log);

    // Heal: s3's grants reach the cluster state on every server.
    cluster.set_cluster_link(3, true);
    let healed = Instant::now();
    let minority_clients: BTreeMap<u32, (Ipv4Addr, Ipv4Addr)> = granted
        .iter()
        .map(|(client, address, _)| (*client, (*address, Ipv4Addr::UNSPECIFIED)))
        .collect();
    wait_for(Duration::from_secs(60), || {
        (1..=3).all(|server| {
            let (ok, stdout, _) = cluster.bootmesh(server, &["lease", "list", "--json"]);
            ok && minority_clients
                .values()
                .all(|(address, _)| stdout.contains(&format!("\"{address}\"")))
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "the grants made while cut off never reached the cluster:\n{}",
            cluster.logs()
        )
    });
    eprintln!(
        "grants reconciled {:.1} s after the heal",
        healed.elapsed().as_secs_f64()
    );
    for server in 1..=3 {
        check_lease_table(&cluster, server, &log.acked);
    }
}

#[test]
fn the_fleet_configuration_applied_on_one_server_reaches_every_servers_dhcp_while_serving() {
    if !lab::enabled() {
        return;
    }
    // The servers' own files name their interfaces only: subnets and hosts come from the
    // cluster's fleet configuration.
    let mut cluster = ClusterLab::new(3);
    lab::require_program("tftp");
    let tftp_root = cluster.lab.path("tftp");
    std::fs::create_dir_all(&tftp_root).unwrap();
    cluster.extra_config = format!(
        "[dhcp]\ninterfaces = [\"INTERFACE\"]\n\n[tftp]\nlisten = \"0.0.0.0:69\"\nroot = \"{}\"\n",
        tftp_root.display()
    );
    form(&mut cluster, 3);
    // LTSP clients read lts.conf over TFTP; it follows the fleet configuration while serving.
    let lts_conf_of = |cluster: &ClusterLab, server: usize| {
        let local = cluster.lab.path(&format!("lts-{server}.conf"));
        let _ = std::fs::remove_file(&local);
        let local_argument = local.to_string_lossy().into_owned();
        let address = format!("10.70.0.{server}");
        let output = cluster.lab.run(
            &cluster.client_namespace,
            Duration::from_secs(30),
            "tftp",
            &[
                address.as_str(),
                "-m",
                "binary",
                "-c",
                "get",
                "ltsp/amd64/lts.conf",
                local_argument.as_str(),
            ],
        );
        assert!(output.status.success(), "{}", lab::describe(&output));
        std::fs::read_to_string(&local).unwrap_or_default()
    };
    let before = lts_conf_of(&cluster, 2);
    assert!(before.contains("[default]"), "{before}");
    assert!(!before.contains("known-node"), "{before}");
    let fleet = cluster.lab.path("fleet.toml");
    let known = client_mac(7)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    std::fs::write(
        &fleet,
        format!(
            "[[dhcp.subnet]]\ncidr = \"10.71.0.0/16\"\nranges = [\"10.71.1.0-10.71.9.255\"]\nrouters = [\"10.71.0.1\"]\nlease_secs = 600\n\n[[dhcp.host]]\nmac = \"{known}\"\naddress = \"10.71.0.77\"\nhostname = \"known-node\"\n"
        ),
    )
    .unwrap();
    let fleet_path = fleet.to_string_lossy().into_owned();
    // A broken file is refused with the key and the reason, and changes nothing.
    let broken = cluster.lab.path("broken.toml");
    std::fs::write(&broken, "[[dhcp.subnet]]\ncidr = \"10.71.0.0/33\"\n").unwrap();
    let (ok, _, stderr) =
        cluster.bootmesh(2, &["config", "apply", broken.to_string_lossy().as_ref()]);
    assert!(!ok && stderr.contains("dhcp.subnet[0].cidr"), "{stderr}");
    let (ok, diff, stderr) = cluster.bootmesh(2, &["config", "diff", fleet_path.as_str()]);
    assert!(
        ok && diff.contains("+cidr = \"10.71.0.0/16\""),
        "{diff}{stderr}"
    );
    // Applied through a follower: it goes to the leader.
    let (ok, stdout, stderr) = cluster.bootmesh(3, &["config", "apply", fleet_path.as_str()]);
    assert!(
        ok && stdout.contains("version 1 applied"),
        "{stdout}{stderr}"
    );
    let (ok, shown, _) = cluster.bootmesh(1, &["config", "show"]);
    assert!(
        ok && shown == std::fs::read_to_string(&fleet).unwrap(),
        "{shown}"
    );
    let (ok, diff, _) = cluster.bootmesh(1, &["config", "diff", fleet_path.as_str()]);
    assert!(ok && diff.contains("no changes"), "{diff}");
    wait_for(Duration::from_secs(20), || {
        (1..=3).all(|server| cluster.log(server).contains("dhcp reconfigured"))
    })
    .unwrap_or_else(|| {
        panic!(
            "not every server took the configuration:\n{}",
            cluster.logs()
        )
    });

    let done = Arc::new(AtomicUsize::new(0));
    let log = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind(3);
        let mut log = FarmLog::default();
        farm.storm(0..20, 0x7000_0000, &done, &mut log);
        log
    })
    .join()
    .expect("farm");
    assert_eq!(log.unanswered, 0, "{}", cluster.logs());
    assert_eq!(
        log.acked[&7].0,
        Ipv4Addr::new(10, 71, 0, 77),
        "the fleet's host entry"
    );
    check_unique(&log);
    for server in 1..=3 {
        let after = lts_conf_of(&cluster, server);
        assert!(
            after.contains("[02:71:00:00:00:07]") && after.contains("HOSTNAME=\"known-node\""),
            "s{server}'s lts.conf has the fleet's host:\n{after}"
        );
    }
}

/// Waits until server `index` has applied as far as server `reference`.
fn wait_caught_up(cluster: &ClusterLab, index: usize, reference: usize) -> Option<()> {
    wait_for(Duration::from_secs(60), || {
        let Some(target) = cluster
            .status(reference)
            .and_then(|status| status["last_applied"].as_u64())
        else {
            return false;
        };
        cluster.status(index).is_some_and(|status| {
            status["last_applied"]
                .as_u64()
                .is_some_and(|applied| applied >= target)
        })
    })
}

/// Leases for `clients` through the servers `via`, each client's exchange on its own.
fn leases_through(
    cluster: &ClusterLab,
    via: &[usize],
    clients: std::ops::Range<u32>,
    xid_base: u32,
) -> FarmLog {
    let via = via.to_vec();
    let log = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind_to(&via, Duration::from_millis(700));
        let mut log = FarmLog::default();
        farm.storm(clients, xid_base, &AtomicUsize::new(0), &mut log);
        log
    })
    .join()
    .expect("farm");
    assert_eq!(log.unanswered, 0, "{}", cluster.logs());
    log
}

const SNAPSHOT_INSTALLED: &str = "state replaced by a snapshot from the leader";

#[test]
fn a_restarted_server_catches_up_from_the_log_and_after_compaction_from_a_snapshot() {
    if !lab::enabled() {
        return;
    }
    // A snapshot every 20 entries with 10 kept behind it: a server that misses a handful of
    // entries finds them in the others' logs; one that misses 80 does not.
    let mut cluster = ClusterLab::new(3)
        .with_dhcp(600)
        .with_cluster_settings("snapshot_every = 20\nlog_kept_after_snapshot = 10");
    form(&mut cluster, 3);

    cluster.lab.signal("s3", libc::SIGKILL);
    let mut log = leases_through(&cluster, &[1, 2], 0..5, 0x7000_0000);
    cluster.serve(3);
    wait_caught_up(&cluster, 3, 1)
        .unwrap_or_else(|| panic!("s3 never caught up:\n{}", cluster.logs()));
    assert!(
        !cluster.log(3).contains(SNAPSHOT_INSTALLED),
        "five entries behind, s3 catches up from the log:\n{}",
        cluster.log(3)
    );
    check_lease_table(&cluster, 3, &log.acked);

    cluster.lab.signal("s3", libc::SIGKILL);
    let later = leases_through(&cluster, &[1, 2], 5..85, 0x7100_0000);
    log.acked.extend(later.acked);
    log.every_ack.extend(later.every_ack);
    let restarted = Instant::now();
    cluster.serve(3);
    wait_caught_up(&cluster, 3, 1)
        .unwrap_or_else(|| panic!("s3 never caught up:\n{}", cluster.logs()));
    eprintln!(
        "s3 caught up {:.1} s after its restart, 80 leases behind",
        restarted.elapsed().as_secs_f64()
    );
    assert!(
        cluster.log(3).contains(SNAPSHOT_INSTALLED),
        "80 leases behind a compacted log, s3 catches up from a snapshot:\n{}",
        cluster.log(3)
    );
    check_lease_table(&cluster, 3, &log.acked);
    check_unique(&log);

    // s3's DHCP service reloaded the leases the snapshot brought: clients granted while it was
    // down keep their addresses when they rebind through s3 alone.
    let acked = log.acked.clone();
    let rebound = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind_to(&[3], Duration::from_secs(2));
        [10u32, 40, 84]
            .into_iter()
            .map(|client| {
                let (address, _) = acked[&client];
                (
                    client,
                    address,
                    farm.rebind(client, 0x7200_0000 + client, address),
                )
            })
            .collect::<Vec<_>>()
    })
    .join()
    .expect("rebind farm");
    for (client, address, answer) in rebound {
        assert_eq!(
            answer.map(|(acked, _)| acked),
            Some(address),
            "client {client} rebinds through s3 with its address:\n{}",
            cluster.log(3)
        );
    }
}

#[test]
fn a_server_joins_and_another_is_removed_while_dhcp_is_served() {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(4).with_dhcp(600);
    form(&mut cluster, 3);
    // The storm goes on until the membership changes are done (at most 5000 clients), so
    // they happen while it is served however fast the servers are.
    const CLIENTS_MAX: u32 = 5000;
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let farm = {
        let done = Arc::clone(&done);
        let stop = Arc::clone(&stop);
        in_namespace(&cluster.client_namespace, move || {
            let farm = RelayFarm::bind(4);
            let mut log = FarmLog::default();
            let mut next = 0;
            while !stop.load(Ordering::Relaxed) && next < CLIENTS_MAX {
                farm.storm(next..next + 10, 0x7300_0000, &done, &mut log);
                next += 10;
            }
            log
        })
    };

    wait_for(Duration::from_secs(120), || {
        done.load(Ordering::Relaxed) >= 60
    })
    .unwrap_or_else(|| panic!("the storm stalled:\n{}", cluster.logs()));
    let token = cluster.token(2, 600);
    let (ok, _, stderr) = cluster.join(4, &token, 2);
    assert!(ok, "join s4 while serving: {stderr}\n{}", cluster.logs());
    cluster.serve(4);
    wait_for(Duration::from_secs(60), || {
        cluster.status(1).is_some_and(|status| voters(&status) == 4)
    })
    .unwrap_or_else(|| panic!("s4 never became a voter:\n{}", cluster.logs()));
    let joined_at = done.load(Ordering::Relaxed);

    wait_for(Duration::from_secs(120), || {
        done.load(Ordering::Relaxed) >= joined_at + 60
    })
    .unwrap_or_else(|| panic!("the storm stalled:\n{}", cluster.logs()));
    // A follower leaves: removed from the membership first, then stopped, as an operator
    // takes a server out of service.
    let leader = cluster
        .status(1)
        .and_then(|status| status["leader"].as_u64())
        .expect("a leader");
    let leaving = if leader == 2 { 3 } else { 2 };
    let leaving_id = leaving.to_string();
    let (ok, stdout, stderr) = cluster.bootmesh(1, &["cluster", "remove", leaving_id.as_str()]);
    assert!(
        ok && stdout.contains(&format!("member {leaving} removed")),
        "{stdout}{stderr}"
    );
    let removed_at = done.load(Ordering::Relaxed);
    cluster
        .lab
        .terminate_and_wait(&format!("s{leaving}"), Duration::from_secs(20));
    wait_for(Duration::from_secs(120), || {
        done.load(Ordering::Relaxed) >= removed_at + 60
    })
    .unwrap_or_else(|| panic!("the storm stalled:\n{}", cluster.logs()));
    stop.store(true, Ordering::Relaxed);

    let log = farm.join().expect("farm");
    assert!(
        log.acked.len() + log.unanswered < CLIENTS_MAX as usize,
        "the storm outlasted both changes"
    );
    eprintln!(
        "{} clients: s4 a voter after {joined_at}, s{leaving} removed after {removed_at}; {} unanswered",
        log.acked.len() + log.unanswered,
        log.unanswered
    );
    assert_eq!(log.unanswered, 0, "{}", cluster.logs());
    check_unique(&log);
    let staying: Vec<usize> = (1..=4).filter(|index| *index != leaving).collect();
    for server in &staying {
        wait_caught_up(&cluster, *server, 1)
            .unwrap_or_else(|| panic!("s{server} never caught up:\n{}", cluster.logs()));
        check_lease_table(&cluster, *server, &log.acked);
    }
    let status = cluster.status(4).expect("s4 answers");
    assert_eq!(voters(&status), 3, "{status}");
    assert!(
        status["members"].as_array().is_some_and(|members| members
            .iter()
            .all(|member| member["server_id"] != serde_json::json!(leaving))),
        "{status}"
    );
    // New clients are served by the servers that stayed, including the one that joined.
    let later = leases_through(
        &cluster,
        &staying,
        CLIENTS_MAX..CLIENTS_MAX + 20,
        0x7400_0000,
    );
    let servers_seen: std::collections::BTreeSet<Ipv4Addr> =
        later.acked.values().map(|(_, server)| *server).collect();
    eprintln!("after the changes, 20 new leases ACKed by {servers_seen:?}");
}

#[test]
fn a_server_whose_raft_store_is_damaged_or_missing_refuses_to_start_and_says_what_to_do() {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(1);
    found(&mut cluster);
    let stopped = cluster
        .lab
        .terminate_and_wait("s1", Duration::from_secs(20))
        .expect("s1 stops");
    assert!(stopped.success(), "{}", cluster.log(1));
    let store = cluster.state_dir(1).join("cluster").join("raft.redb");
    let config = cluster.lab.path("s1.toml").to_string_lossy().into_owned();
    let start = |cluster: &ClusterLab| {
        let output = cluster.lab.run(
            &cluster.namespaces[0],
            Duration::from_secs(60),
            env!("CARGO_BIN_EXE_bootmesh"),
            &["serve", "--config", config.as_str()],
        );
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };

    let size = std::fs::metadata(&store).expect("the store exists").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .and_then(|file| file.set_len(size / 2))
        .expect("truncate the store");
    for attempt in ["first", "second"] {
        let (ok, output) = start(&cluster);
        eprintln!("{attempt} start on a truncated store: {output}");
        assert!(!ok, "a truncated store must not start: {output}");
        assert!(
            output.contains("raft.redb is damaged") && output.contains("cluster remove 1"),
            "{attempt} start names the damage and what to do: {output}"
        );
    }

    std::fs::remove_file(&store).expect("remove the store");
    std::fs::remove_file(
        cluster
            .state_dir(1)
            .join("cluster")
            .join("raft.redb.damaged"),
    )
    .expect("remove the marker");
    let (ok, output) = start(&cluster);
    eprintln!("start without a store: {output}");
    assert!(!ok, "a server without its store must not start: {output}");
    assert!(
        output.contains("raft.redb is missing") && output.contains("cluster remove 1"),
        "{output}"
    );
    assert!(!store.exists(), "no empty store was created in its place");
}

#[test]
fn a_cluster_serving_two_subnets_keeps_free_addresses_in_each() {
    if !lab::enabled() {
        return;
    }
    // Two relayed subnets: a server holds blocks in each, so clients of the second get
    // addresses as readily as those of the first.
    let mut cluster = ClusterLab::new(3);
    let second_relay = Ipv4Addr::new(10, 72, 0, 1);
    cluster
        .lab
        .add_address(&cluster.client_namespace, "lo", "10.72.0.1/32");
    for namespace in cluster.namespaces.clone() {
        cluster
            .lab
            .add_route(&namespace, "10.72.0.0/16", "10.70.0.200");
    }
    cluster.extra_config = "[dhcp]\ninterfaces = [\"INTERFACE\"]\n\n\
        [[dhcp.subnet]]\ncidr = \"10.71.0.0/16\"\nranges = [\"10.71.1.0-10.71.9.255\"]\nlease_secs = 600\n\n\
        [[dhcp.subnet]]\ncidr = \"10.72.0.0/16\"\nranges = [\"10.72.1.0-10.72.9.255\"]\nlease_secs = 600\n"
        .into();
    form(&mut cluster, 3);
    let logs: Vec<FarmLog> = [GIADDR, second_relay]
        .into_iter()
        .enumerate()
        .map(|(relay, giaddr)| {
            let first_client = 1000 * relay as u32;
            in_namespace(&cluster.client_namespace, move || {
                let farm = RelayFarm::bind_relay(giaddr, &[1, 2, 3], Duration::from_millis(700));
                let mut log = FarmLog::default();
                farm.storm(
                    first_client..first_client + 100,
                    0x7500_0000 + first_client,
                    &AtomicUsize::new(0),
                    &mut log,
                );
                log
            })
            .join()
            .expect("farm")
        })
        .collect();
    for (relay, log) in logs.iter().enumerate() {
        let subnet = 71 + relay as u8;
        assert_eq!(
            log.unanswered,
            0,
            "subnet 10.{subnet}.0.0/16:\n{}",
            cluster.logs()
        );
        assert!(
            log.acked
                .values()
                .all(|(address, _)| address.octets()[..2] == [10, subnet]),
            "every client of 10.{subnet}.0.0/16 got an address there: {:?}",
            log.acked
        );
        check_unique(log);
    }
}

#[test]
fn a_cluster_member_serves_image_chunks_on_its_cluster_endpoint() {
    if !lab::enabled() {
        return;
    }
    // One member with `[swarm]` and no address of its own: chunk connections share the
    // cluster endpoint (ALPN bootmesh-chunks/1) with Raft and admin.
    let mut cluster = ClusterLab::new(1);
    cluster.extra_config = "[swarm]\n".into();
    let tree = cluster.lab.path("rootfs");
    std::fs::create_dir_all(tree.join("boot")).expect("boot dir");
    std::fs::write(
        tree.join("boot/vmlinuz-6.1.0-1-amd64"),
        lab::deterministic_bytes(11, 1 << 20),
    )
    .expect("kernel");
    std::fs::write(
        tree.join("boot/initrd.img-6.1.0-1-amd64"),
        lab::deterministic_bytes(12, 1 << 20),
    )
    .expect("initrd");
    std::fs::write(tree.join("data"), lab::deterministic_bytes(13, 8 << 20)).expect("data");
    let state = cluster.state_dir(1);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .args(["image", "--state-dir"])
        .arg(&state)
        .args(["import", "node:v1", "--from"])
        .arg(&tree)
        .args(["--created", "1"])
        .output()
        .expect("run bootmesh image import");
    assert!(
        output.status.success(),
        "import: {}",
        lab::describe(&output)
    );
    let manifest_hash: transfer::ContentHash = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("image")
                .map(|rest| rest.trim().to_owned())
        })
        .expect("the import names the image")
        .parse()
        .expect("a hash");
    found(&mut cluster);
    wait_for(Duration::from_secs(20), || {
        cluster.log(1).contains("offering an image to the swarm")
    })
    .unwrap_or_else(|| panic!("no image offered:\n{}", cluster.logs()));

    // The fetcher's store starts with the manifest alone (a booting node gets it from a
    // server over HTTP; this lab serves no HTTP).
    let server_store =
        transfer::ChunkStore::open(&state.join("images"), 1 << 20).expect("server store");
    let manifest = server_store.manifest(&manifest_hash).expect("manifest");
    let agent_store = cluster.lab.path("agent-store");
    transfer::ChunkStore::open(&agent_store, 1 << 20)
        .expect("agent store")
        .put_manifest(&manifest)
        .expect("put manifest");
    let manifest_text = manifest_hash.to_string();
    let agent_store_text = agent_store.to_string_lossy().into_owned();
    let server = ClusterLab::address(1);
    let fetch = cluster.lab.run(
        &cluster.namespaces[0],
        Duration::from_secs(120),
        env!("CARGO_BIN_EXE_bootmesh"),
        &[
            "agent",
            "swarm",
            "--manifest",
            &manifest_text,
            "--store",
            &agent_store_text,
            "--listen",
            "10.80.0.1:0",
            // No peer: the member finds the server through the image's tracker, which is
            // the server itself, answering on its cluster endpoint too; the server
            // announced its image there as a seed.
            "--tracker",
            &server,
            "--exit-when-complete",
        ],
    );
    assert!(
        fetch.status.success(),
        "agent swarm: {}",
        lab::describe(&fetch)
    );
    let stdout = String::from_utf8_lossy(&fetch.stdout);
    let complete = stdout
        .lines()
        .find(|line| line.starts_with("complete "))
        .unwrap_or_else(|| panic!("no complete line: {stdout}"));
    assert!(
        complete.contains(&format!("sources={server}=")),
        "{complete}"
    );
    assert!(
        stdout
            .lines()
            .any(|line| line == format!("tracker {server}")),
        "{stdout}"
    );
    let fetched = transfer::ChunkStore::open(&agent_store, 1 << 20).expect("agent store");
    for chunk in manifest.all_chunks() {
        fetched
            .read_chunk(&chunk.hash)
            .unwrap_or_else(|error| panic!("chunk {}: {error}", chunk.hash));
    }
    // Raft carried on beside it.
    let status = cluster.status(1).expect("s1 answers");
    assert_eq!(status["leader"], serde_json::json!(1), "{status}");
}

/// A root tree with a kernel, an initrd and `data_bytes` of data, all drawn from `seed`.
fn write_image_tree(cluster: &ClusterLab, name: &str, seed: u64, data_bytes: usize) -> String {
    let tree = cluster.lab.path(name);
    std::fs::create_dir_all(tree.join("boot")).expect("boot dir");
    std::fs::write(
        tree.join("boot/vmlinuz-6.1.0-1-amd64"),
        lab::deterministic_bytes(seed, 1 << 20),
    )
    .expect("kernel");
    std::fs::write(
        tree.join("boot/initrd.img-6.1.0-1-amd64"),
        lab::deterministic_bytes(seed + 1, 1 << 20),
    )
    .expect("initrd");
    std::fs::write(
        tree.join("data"),
        lab::deterministic_bytes(seed + 2, data_bytes),
    )
    .expect("data");
    tree.to_string_lossy().into_owned()
}

/// What server `index`'s own catalog says group `group` boots: (tag, manifest hash).
fn local_group_image(cluster: &ClusterLab, index: usize, group: &str) -> Option<(String, String)> {
    let (ok, stdout, _) = cluster.bootmesh(index, &["image", "list", "--json"]);
    if !ok {
        return None;
    }
    let listings: serde_json::Value = serde_json::from_str(&stdout).ok()?;
    listings.as_array()?.iter().find_map(|listing| {
        let groups = listing["groups"].as_array()?;
        groups.iter().any(|name| name == group).then(|| {
            (
                listing["image"].as_str().unwrap_or_default().to_owned(),
                listing["hash"].as_str().unwrap_or_default().to_owned(),
            )
        })
    })
}

/// The cluster's catalog is every server's: an image imported on one server and promoted
/// there is fetched by the others from it (manifest over the admin channel, chunks over the
/// swarm on the cluster endpoint) and booted by the group everywhere; a promotion from another
/// server and a rollback from a third travel the same way.
#[test]
fn a_promotion_on_one_server_is_followed_by_every_server_which_fetches_the_image() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("mksquashfs");
    lab::require_program("chromium");
    let mut cluster = ClusterLab::new(3);
    let www = cluster.lab.path("www");
    std::fs::create_dir_all(&www).expect("www");
    cluster.extra_config = format!(
        "[swarm]\n\n[http]\nlisten = \"0.0.0.0:8080\"\nroot = \"{}\"\n",
        www.display()
    );
    // s3 has no [swarm]: it serves no chunks, but follows the catalog all the same, fetching
    // from the others over the cluster endpoint.
    cluster.extra_config_of.insert(
        3,
        format!(
            "[http]\nlisten = \"0.0.0.0:8080\"\nroot = \"{}\"\n",
            www.display()
        ),
    );
    let started = std::time::Instant::now();
    form(&mut cluster, 3);
    eprintln!(
        "3 servers formed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let promote_and_wait = |promoter: usize, tag: &str, expected: &str| {
        let started = std::time::Instant::now();
        let (ok, stdout, stderr) = cluster.bootmesh(
            promoter,
            &if tag == "rollback" {
                vec!["image", "rollback", "--group", "workers"]
            } else {
                vec!["image", "promote", tag, "--group", "workers"]
            },
        );
        assert!(ok, "{tag} on s{promoter}: {stderr}");
        assert!(
            stdout.contains("the cluster: every server boots group workers"),
            "{stdout}"
        );
        let wanted = local_group_image(&cluster, promoter, "workers").expect("the promoter's");
        assert_eq!(wanted.0, expected);
        for index in 1..=3 {
            wait_for(Duration::from_secs(120), || {
                local_group_image(&cluster, index, "workers").as_ref() == Some(&wanted)
            })
            .unwrap_or_else(|| {
                panic!(
                    "s{index} does not boot {expected} after {tag}:\n{}",
                    cluster.logs()
                )
            });
            // Every chunk is in the follower's store, and re-hashes to its name.
            eprintln!(
                "{tag} on s{promoter}: s{index} boots {expected} after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            let (ok, stdout, stderr) = cluster.bootmesh(index, &["image", "verify", expected]);
            assert!(ok, "verify {expected} on s{index}: {stdout}{stderr}");
            // The fetch's pin (which kept gc off the image until it was tagged) is gone.
            let pins = cluster.state_dir(index).join("images").join("pins");
            wait_for(Duration::from_secs(10), || {
                std::fs::read_dir(&pins).map_or(0, Iterator::count) == 0
            })
            .unwrap_or_else(|| panic!("s{index} left pins in {}", pins.display()));
        }
    };

    // Imports a tree drawn from `seed` as `tag` into server `index`'s store.
    let import = |index: usize, tag: &str, seed: u64| {
        let tree = write_image_tree(&cluster, &format!("root-{seed}"), seed, 6 << 20);
        let created = seed.to_string();
        let (ok, _, stderr) = cluster.bootmesh(
            index,
            &[
                "image",
                "import",
                tag,
                "--from",
                &tree,
                "--created",
                &created,
            ],
        );
        assert!(ok, "import {tag} on s{index}: {stderr}");
    };
    import(1, "node:v1", 21);
    promote_and_wait(1, "node:v1", "node:v1");
    for index in [2, 3] {
        assert!(
            cluster
                .log(index)
                .contains("fetching the image from the other servers"),
            "s{index} fetched node:v1:\n{}",
            cluster.log(index)
        );
    }

    // A newer image imported on another server, promoted there.
    import(2, "node:v2", 31);
    promote_and_wait(2, "node:v2", "node:v2");

    // Rolled back from a third server, whose history came from following.
    promote_and_wait(3, "rollback", "node:v1");
    // Any server's /api/v1/cluster (what the dashboard draws) shows the cluster's promotion.
    let output = cluster.lab.run(
        &cluster.namespaces[1],
        Duration::from_secs(10),
        "curl",
        &["-sf", "http://10.80.0.2:8080/api/v1/cluster"],
    );
    let view: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("/api/v1/cluster answers JSON");
    assert_eq!(
        view["catalog"]["promotions"][0]["group"], "workers",
        "{view:#}"
    );
    assert_eq!(view["catalog"]["promotions"][0]["image"], "node:v1");
    let (ok, status, stderr) = {
        let output = cluster.lab.run(
            &cluster.namespaces[1],
            Duration::from_secs(30),
            env!("CARGO_BIN_EXE_bootmesh"),
            &["status", "--server", "10.80.0.2:8080"],
        );
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert!(ok, "status: {stderr}");
    for line in [
        "catalog: workers -> node:v1; this server boots them all",
        "  rack rack1: 1 10.80.0.1:7100 (leader)",
    ] {
        assert!(status.contains(line), "{line:?} in\n{status}");
    }
    assert!(status.contains(": 3 members, term "), "{status}");
    let dom = dashboard_dom(
        &cluster,
        &cluster.namespaces[1],
        "http://10.80.0.2:8080/dashboard",
    );
    let shown = "the cluster promoted: workers \u{2192} node:v1; this server boots them all";
    assert!(dom.contains(shown), "{shown} in\n{dom}");
    // No server is left behind the cluster's catalog, by its own /metrics.
    for index in 1..=3 {
        let address = ClusterLab::address(index);
        let ip = address.split(':').next().expect("an address");
        let url = format!("http://{ip}:8080/metrics");
        wait_for(Duration::from_secs(10), || {
            let output = cluster.lab.run(
                &cluster.namespaces[index - 1],
                Duration::from_secs(10),
                "curl",
                &["-sf", &url],
            );
            lab::metric_value(
                &String::from_utf8_lossy(&output.stdout),
                "bootmesh_catalog_groups_behind",
            ) == Some(0)
        })
        .unwrap_or_else(|| panic!("s{index} reports groups behind:\n{}", cluster.logs()));
    }
}

/// A server whose clock is a minute off the leader's (the drift bound is 10 s) notices at its
/// next clock check, says so, and goes quiet on DHCP: no OFFER that nobody could ACK, no grant
/// or renewal with a wrong end. The other servers serve every client; through the skewed
/// server alone nothing is answered.
#[test]
fn a_server_whose_clock_is_beyond_the_drift_bound_answers_no_dhcp_and_the_others_serve() {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(3)
        .with_dhcp(600)
        .with_clock_offset(3, "+60s");
    form(&mut cluster, 3);
    let leader = cluster.status(1).expect("s1 answers")["leader"].clone();
    assert_eq!(leader, serde_json::json!(1), "the founder leads");
    wait_for(Duration::from_secs(60), || {
        cluster
            .log(3)
            .contains("further apart than the drift bound")
    })
    .unwrap_or_else(|| panic!("s3 never noticed its clock:\n{}", cluster.log(3)));
    let status = cluster.status(3).expect("s3 answers");
    let offset = status["clock_offset_to_leader_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no clock offset in {status}"));
    assert!(
        (-70_000..=-50_000).contains(&offset),
        "the leader's clock is a minute behind s3's: {offset} ms"
    );

    let done = Arc::new(AtomicUsize::new(0));
    let log = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind(3);
        let mut log = FarmLog::default();
        farm.storm(0..30, 0x7000_0000, &done, &mut log);
        log
    })
    .join()
    .expect("farm");
    assert_eq!(
        log.unanswered,
        0,
        "every client served:\n{}",
        cluster.logs()
    );
    check_unique(&log);
    let skewed = Ipv4Addr::new(10, 70, 0, 3);
    assert!(
        log.acked.values().all(|(_, server)| *server != skewed),
        "s3 ACKed a client: {:?}",
        log.acked
    );
    // Through s3 alone: neither a new client nor a renewal gets an answer.
    let some_client = log.acked[&0].0;
    let (new_client, renewal) = in_namespace(&cluster.client_namespace, move || {
        let farm = RelayFarm::bind_to(&[3], Duration::from_millis(700));
        (
            farm.lease_ack(100, 0x7100_0000).is_some(),
            farm.rebind_ack(0, 0x7200_0000, some_client).is_some(),
        )
    })
    .join()
    .expect("s3 alone");
    assert!(!new_client, "s3 alone leased to a new client");
    assert!(!renewal, "s3 alone renewed a lease");
    assert!(
        cluster
            .log(3)
            .contains("answering no DHCP: other servers answer"),
        "{}",
        cluster.log(3)
    );
}

/// Firmware-stage files from booted peers in a cluster (ADR 0016): only the image's tracker
/// (chosen among the servers by the image) knows which booted nodes hold it, so every server
/// writing a boot script for a `firmware_from_peers` group asks that tracker. A booted member
/// in the booting node's rack is named before the server by all three servers, the two that
/// do not track the image among them; a node of no known rack is named none.
#[test]
fn every_server_of_a_cluster_names_the_booted_peers_its_images_tracker_knows() {
    if !lab::enabled() {
        return;
    }
    let mut cluster = ClusterLab::new(3);
    let www = cluster.lab.path("www");
    std::fs::create_dir_all(&www).expect("www");
    let trackers: Vec<String> = (1..=3)
        .map(|index| format!("\"{}\"", ClusterLab::address(index)))
        .collect();
    cluster.extra_config = format!(
        "[dhcp]\ninterfaces = [\"INTERFACE\"]\n\n[[dhcp.subnet]]\ncidr = \"10.71.0.0/16\"\n\
         ranges = [\"10.71.1.0-10.71.1.255\"]\nrouters = [\"10.71.0.1\"]\nrack = \"r1\"\n\n\
         [swarm]\ntrackers = [{}]\n\n[http]\nlisten = \"0.0.0.0:8080\"\nroot = \"{}\"\n\n\
         [boot]\ndefault_group = \"workers\"\n\n[[group]]\nname = \"workers\"\n\
         firmware_from_peers = true\n",
        trackers.join(", "),
        www.display()
    );
    form(&mut cluster, 3);
    let tree = write_image_tree(&cluster, "root", 41, 2 << 20);
    let (ok, _, stderr) = cluster.bootmesh(
        1,
        &[
            "image",
            "import",
            "node:v1",
            "--from",
            &tree,
            "--created",
            "1",
        ],
    );
    assert!(ok, "import: {stderr}");
    let (ok, _, stderr) =
        cluster.bootmesh(1, &["image", "promote", "node:v1", "--group", "workers"]);
    assert!(ok, "promote: {stderr}");
    let (_, manifest) = local_group_image(&cluster, 1, "workers").expect("s1 boots workers");
    for index in 2..=3 {
        wait_for(Duration::from_secs(120), || {
            local_group_image(&cluster, index, "workers").is_some_and(|(_, hash)| hash == manifest)
        })
        .unwrap_or_else(|| panic!("s{index} never boots node:v1:\n{}", cluster.logs()));
    }

    // The relay namespace stands for rack r1 (10.71.0.0/16): a booted node at 10.71.5.20, a
    // booting one at 10.71.5.10. It reaches each server's cluster address through that
    // server's DHCP-side interface.
    let client = cluster.client_namespace.clone();
    for address in ["10.71.5.10/32", "10.71.5.20/32"] {
        cluster.lab.add_address(&client, "lo", address);
    }
    for index in 1..=3 {
        cluster.lab.add_route(
            &client,
            &format!("10.80.0.{index}/32"),
            &format!("10.70.0.{index}"),
        );
    }
    let store = cluster.lab.path("booted-store");
    let store_text = store.to_string_lossy().into_owned();
    let mut arguments = vec![
        "agent",
        "swarm",
        "--manifest",
        manifest.as_str(),
        "--server",
        "10.70.0.1:8080",
        "--store",
        store_text.as_str(),
        "--listen",
        "10.71.5.20:7800",
    ];
    let tracker_addresses: Vec<String> = (1..=3).map(ClusterLab::address).collect();
    for tracker in &tracker_addresses {
        arguments.extend(["--tracker", tracker.as_str()]);
    }
    cluster.lab.spawn(
        "booted",
        &client,
        env!("CARGO_BIN_EXE_bootmesh"),
        &arguments,
    );
    wait_for(Duration::from_secs(60), || {
        cluster
            .lab
            .log("booted")
            .lines()
            .any(|line| line.starts_with("complete "))
    })
    .unwrap_or_else(|| {
        panic!(
            "the booted member never completed:\n{}\n{}",
            cluster.lab.log("booted"),
            cluster.logs()
        )
    });
    let hash: transfer::ContentHash = manifest.parse().expect("a hash");
    let servers: Vec<SocketAddr> = tracker_addresses
        .iter()
        .map(|address| address.parse().expect("an address"))
        .collect();
    let tracker = transfer::swarm::tracker_order(&hash, &servers)[0];
    let tracker_index = servers
        .iter()
        .position(|server| *server == tracker)
        .expect("a server")
        + 1;
    eprintln!("the image's tracker is s{tracker_index} ({tracker})");

    let script = |index: usize, from: &str| -> String {
        let output = cluster.lab.run(
            &client,
            Duration::from_secs(20),
            "curl",
            &[
                "-sf",
                "--interface",
                from,
                &format!("http://10.70.0.{index}:8080/boot/52-54-00-00-00-01.ipxe"),
            ],
        );
        assert!(
            output.status.success(),
            "boot script from s{index}: {}\n{}",
            lab::describe(&output),
            cluster.logs()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let peer_kernel = format!("http://10.71.5.20:8079/images/{manifest}/kernel");
    // The member announces complete within a re-announce of finishing; every server then
    // names it, the tracker and the two that ask it.
    for index in 1..=3 {
        let mut last = String::new();
        wait_for(Duration::from_secs(40), || {
            last = script(index, "10.71.5.10");
            last.contains(&peer_kernel)
        })
        .unwrap_or_else(|| {
            panic!(
                "s{index} (tracker s{tracker_index}) names no booted peer:\n{last}\n{}",
                cluster.logs()
            )
        });
        let peer_at = last.find(&peer_kernel).expect("the peer's kernel");
        let own_kernel = format!("http://10.70.0.{index}:8080/images/{manifest}/kernel");
        let own_at = last
            .find(&own_kernel)
            .unwrap_or_else(|| panic!("s{index} names itself:\n{last}"));
        assert!(peer_at < own_at, "the peer comes first:\n{last}");
        eprintln!("s{index}: the booted peer named before the server");
    }
    // From an address of no known rack (the relay's own, 10.70.0.200, is in no subnet) the
    // scripts name the servers only.
    for index in 1..=3 {
        let plain = script(index, "10.70.0.200");
        assert!(plain.contains("images/"), "s{index}: {plain}");
        assert!(!plain.contains(":8079/"), "s{index} names a peer:\n{plain}");
    }
}
