//! NBD against real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and against a small raw
//! client written here: exports are listed with their sizes and descriptions, copied
//! byte-identically, and never written: real clients refuse on their own side, and a write
//! that reaches the server anyway gets EPERM while the connection keeps serving reads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::lab::{self, Lab, ServerAndClient};

pub(crate) const NBD_PORT: u16 = 10809;
const ROOT_BYTES: usize = 64 * 1024 * 1024;
const SMALL_BYTES: usize = 1024 * 1024;
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

struct NbdLab {
    lab: Lab,
    pair: ServerAndClient,
    root: Vec<u8>,
    small: Vec<u8>,
}

impl NbdLab {
    /// A server exporting `root` (64 MiB) and `small` (1 MiB) on the default port.
    fn start() -> Self {
        let mut lab = Lab::new();
        let pair = lab.server_and_client("nb", "10.80.0");
        let root = lab::deterministic_bytes(0x4e42_0001, ROOT_BYTES);
        let small = lab::deterministic_bytes(0x4e42_0002, SMALL_BYTES);
        std::fs::write(lab.path("root.img"), &root).expect("write root image");
        std::fs::write(lab.path("small.img"), &small).expect("write small image");
        std::fs::create_dir_all(lab.path("state")).expect("state dir");
        let config = format!(
            "state_dir = \"{state}\"\n\
             [http]\n\
             listen = \"{address}:8080\"\n\
             root = \"{state}\"\n\
             [nbd]\n\
             listen = \"{address}:{NBD_PORT}\"\n\
             [[nbd.export]]\n\
             name = \"root\"\n\
             path = \"{root}\"\n\
             description = \"root file system of the test fleet\"\n\
             [[nbd.export]]\n\
             name = \"small\"\n\
             path = \"{small}\"\n\
             description = \"a small scratch image\"\n",
            state = lab.path("state").display(),
            address = pair.server_address,
            root = lab.path("root.img").display(),
            small = lab.path("small.img").display(),
        );
        lab.serve("server", &pair.server, &config);
        Self {
            lab,
            pair,
            root,
            small,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.pair.server_address)
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.lab.run(&self.pair.client, CLIENT_LIMIT, program, args)
    }

    /// Both image files still hold exactly what the test wrote.
    fn assert_exports_unchanged(&self) {
        lab::assert_file_bytes(&self.lab.path("root.img"), &self.root);
        lab::assert_file_bytes(&self.lab.path("small.img"), &self.small);
    }
}

/// The `key: value` lines nbdinfo prints for `export`, from `nbdinfo --list` text output.
fn listed_export(listing: &str, export: &str) -> Vec<(String, String)> {
    let header = format!("export=\"{export}\":");
    let Some(start) = listing.find(&header) else {
        return Vec::new();
    };
    listing[start + header.len()..]
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with('\t'))
        .filter_map(|line| line.trim().split_once(": "))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

#[test]
fn nbdinfo_lists_both_exports_with_sizes_and_descriptions() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("nbdinfo");
    let nbd = NbdLab::start();
    let output = nbd.run(
        "nbdinfo",
        &["--list", &format!("nbd://{}", nbd.pair.server_address)],
    );
    assert!(
        output.status.success(),
        "nbdinfo --list: {}",
        lab::describe(&output)
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    for (export, size, description) in [
        ("root", ROOT_BYTES, "root file system of the test fleet"),
        ("small", SMALL_BYTES, "a small scratch image"),
    ] {
        let fields = listed_export(&listing, export);
        let field = |key: &str| {
            fields
                .iter()
                .find(|(field_key, _)| field_key == key)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(field("description"), Some(description), "{listing}");
        let size_text = field("export-size").unwrap_or_default();
        assert!(
            size_text.starts_with(&format!("{size} ")),
            "{export} size {size_text:?}, expected {size}:\n{listing}"
        );
        assert_eq!(field("is_read_only"), Some("true"), "{listing}");
    }

    // The JSON listing names both, and --size reports each size alone.
    let output = nbd.run(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd://{}", nbd.pair.server_address),
        ],
    );
    assert!(
        output.status.success(),
        "nbdinfo --json: {}",
        lab::describe(&output)
    );
    let json = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "\"export-name\": \"root\"",
        "\"export-name\": \"small\"",
        &format!("\"export-size\": {ROOT_BYTES}"),
        &format!("\"export-size\": {SMALL_BYTES}"),
    ] {
        assert!(json.contains(expected), "{expected} missing:\n{json}");
    }
    for (export, size) in [("root", ROOT_BYTES), ("small", SMALL_BYTES)] {
        let output = nbd.run("nbdinfo", &["--size", &nbd.uri(export)]);
        assert!(
            output.status.success(),
            "nbdinfo --size: {}",
            lab::describe(&output)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            size.to_string()
        );
    }
    // An export that does not exist is refused.
    let output = nbd.run("nbdinfo", &["--size", &nbd.uri("missing")]);
    assert!(
        !output.status.success(),
        "nbdinfo of a missing export succeeded"
    );
}

#[test]
fn nbdcopy_and_qemu_img_copy_exports_byte_identically() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("nbdcopy");
    lab::require_program("qemu-img");
    let nbd = NbdLab::start();
    for (export, content) in [("root", &nbd.root), ("small", &nbd.small)] {
        let local = nbd.lab.path(&format!("nbdcopy-{export}.img"));
        let local_argument = local.to_string_lossy().into_owned();
        let output = nbd.run("nbdcopy", &[&nbd.uri(export), &local_argument]);
        assert!(
            output.status.success(),
            "nbdcopy {export}: {}",
            lab::describe(&output)
        );
        lab::assert_file_bytes(&local, content);
        std::fs::remove_file(&local).expect("remove copy");
    }
    let local = nbd.lab.path("qemu-img-root.img");
    let local_argument = local.to_string_lossy().into_owned();
    let uri = format!("nbd://{}:{NBD_PORT}/root", nbd.pair.server_address);
    let output = nbd.run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &local_argument],
    );
    assert!(
        output.status.success(),
        "qemu-img convert: {}",
        lab::describe(&output)
    );
    lab::assert_file_bytes(&local, &nbd.root);
    // /metrics: three connections, and at least every byte the clients copied.
    let address = format!("{}:8080", nbd.pair.server_address);
    let metrics = || lab::scrape_metrics(&nbd.lab, &nbd.pair.client, &address);
    let settled = lab::wait_for(Duration::from_secs(10), || {
        lab::metric_value(&metrics(), "bootmesh_nbd_connections_active") == Some(0)
    });
    let scraped = metrics();
    assert!(settled.is_some(), "{scraped}");
    assert!(lab::metric_value(&scraped, "bootmesh_nbd_connections_started_total") >= Some(3));
    let copied = (2 * nbd.root.len() + nbd.small.len()) as u64;
    let sent = lab::metric_value(&scraped, "bootmesh_nbd_bytes_sent_total").unwrap_or(0);
    assert!(sent >= copied, "{sent} bytes sent for {copied} copied");
}

#[test]
fn real_clients_cannot_write_to_an_export() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("qemu-io");
    lab::require_program("nbdcopy");
    let nbd = NbdLab::start();
    let uri = format!("nbd://{}:{NBD_PORT}/root", nbd.pair.server_address);
    // qemu-io sees the read-only flag and refuses to open the export for writing.
    let output = nbd.run("qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 512", &uri]);
    assert!(
        !output.status.success(),
        "qemu-io wrote: {}",
        lab::describe(&output)
    );
    // nbdcopy refuses a read-only destination.
    let source = nbd.lab.path("overwrite.img");
    std::fs::write(&source, lab::deterministic_bytes(0x0bad, SMALL_BYTES)).expect("write");
    let source_argument = source.to_string_lossy().into_owned();
    for export in ["root", "small"] {
        let output = nbd.run("nbdcopy", &[&source_argument, &nbd.uri(export)]);
        assert!(
            !output.status.success(),
            "nbdcopy wrote to {export}: {}",
            lab::describe(&output)
        );
    }
    nbd.assert_exports_unchanged();
    // Reading back through the server shows the same bytes.
    let local = nbd.lab.path("after.img");
    let local_argument = local.to_string_lossy().into_owned();
    let output = nbd.run("nbdcopy", &[&nbd.uri("small"), &local_argument]);
    assert!(
        output.status.success(),
        "nbdcopy: {}",
        lab::describe(&output)
    );
    lab::assert_file_bytes(&local, &nbd.small);
}

#[test]
fn a_write_on_the_wire_gets_eperm_and_the_connection_keeps_serving() {
    if !lab::enabled() {
        return;
    }
    let nbd = NbdLab::start();
    let address: SocketAddr = format!("{}:{NBD_PORT}", nbd.pair.server_address)
        .parse()
        .expect("address");
    nbd.lab.inside(&nbd.pair.client, || {
        let mut client = RawNbdClient::connect(address);
        client.send_client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        let export = client.option_go("root").expect("NBD_OPT_GO root");
        assert_eq!(export.size_bytes, ROOT_BYTES as u64);
        assert_ne!(
            export.transmission_flags & TRANSMISSION_FLAG_READ_ONLY,
            0,
            "root is not advertised read-only"
        );

        let payload = lab::deterministic_bytes(0x0bad_0001, 4096);
        client.send_request(COMMAND_WRITE, 0, 1, 8192, 4096);
        client.send_bytes(&payload);
        assert_eq!(client.read_simple_reply(), (ERROR_PERMISSION, 1), "write");
        // With FUA, and the other writing commands, the answer is the same.
        client.send_request(COMMAND_WRITE, COMMAND_FLAG_FUA, 2, 0, 512);
        client.send_bytes(&payload[..512]);
        assert_eq!(
            client.read_simple_reply(),
            (ERROR_PERMISSION, 2),
            "FUA write"
        );
        client.send_request(COMMAND_TRIM, 0, 3, 0, 65536);
        assert_eq!(client.read_simple_reply(), (ERROR_PERMISSION, 3), "trim");
        client.send_request(COMMAND_WRITE_ZEROES, 0, 4, 0, 65536);
        assert_eq!(
            client.read_simple_reply(),
            (ERROR_PERMISSION, 4),
            "write zeroes"
        );

        // The same connection still reads, and reads the original bytes where the write was.
        client.send_request(COMMAND_READ, 0, 5, 4096, 16384);
        assert_eq!(client.read_simple_reply(), (0, 5), "read");
        let data = client.read_bytes(16384);
        lab::assert_same_bytes("read after refused write", &data, &nbd.root[4096..20480]);
        let tail_offset = ROOT_BYTES - 1000;
        client.send_request(COMMAND_READ, 0, 6, tail_offset as u64, 1000);
        assert_eq!(client.read_simple_reply(), (0, 6), "read at the end");
        let data = client.read_bytes(1000);
        lab::assert_same_bytes("read at the end", &data, &nbd.root[tail_offset..]);
        client.send_request(COMMAND_DISCONNECT, 0, 7, 0, 0);
        assert!(
            client.is_closed_by_server(),
            "server kept the connection open"
        );
    });
    nbd.assert_exports_unchanged();
}

pub(crate) const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1;
pub(crate) const CLIENT_FLAG_NO_ZEROES: u32 = 2;
const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const OPTION_GO: u32 = 7;
const REPLY_ACK: u32 = 1;
const REPLY_INFO: u32 = 3;
const REPLY_ERROR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const TRANSMISSION_FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const COMMAND_READ: u16 = 0;
pub(crate) const COMMAND_WRITE: u16 = 1;
pub(crate) const COMMAND_DISCONNECT: u16 = 2;
const COMMAND_TRIM: u16 = 4;
const COMMAND_WRITE_ZEROES: u16 = 6;
const COMMAND_FLAG_FUA: u16 = 1;
const ERROR_PERMISSION: u32 = 1;

/// What `NBD_OPT_GO` reported about the chosen export.
#[derive(Debug)]
pub(crate) struct ExportInfo {
    pub(crate) size_bytes: u64,
    pub(crate) transmission_flags: u16,
}

/// A deliberately small NBD client speaking the fixed newstyle handshake by hand, so tests can
/// send exactly the bytes they mean (including wrong ones). Every read and write is bounded by
/// a socket timeout.
#[derive(Debug)]
pub(crate) struct RawNbdClient {
    pub(crate) stream: TcpStream,
}

impl RawNbdClient {
    /// Connects and reads the server's greeting, checking its magic.
    pub(crate) fn connect(address: SocketAddr) -> Self {
        let mut client = Self::connect_without_greeting(address);
        let greeting = client.read_bytes(18);
        assert_eq!(greeting[..8], NBD_MAGIC.to_be_bytes(), "greeting magic");
        assert_eq!(
            greeting[8..16],
            OPTION_MAGIC.to_be_bytes(),
            "greeting option magic"
        );
        client
    }

    /// Connects without reading anything.
    pub(crate) fn connect_without_greeting(address: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        Self { stream }
    }

    pub(crate) fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub(crate) fn read_bytes(&mut self, length_bytes: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; length_bytes];
        self.stream.read_exact(&mut bytes).expect("receive");
        bytes
    }

    pub(crate) fn send_client_flags(&mut self, flags: u32) {
        self.send_bytes(&flags.to_be_bytes());
    }

    /// Sends an option header announcing `length_bytes` of data, then `data` (which may be
    /// shorter, to test truncation).
    pub(crate) fn send_option(&mut self, option: u32, length_bytes: u32, data: &[u8]) {
        let mut bytes = Vec::with_capacity(16 + data.len());
        bytes.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&length_bytes.to_be_bytes());
        bytes.extend_from_slice(data);
        self.send_bytes(&bytes);
    }

    /// Reads one option reply: (option, reply type, data).
    pub(crate) fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let header = self.read_bytes(20);
        assert_eq!(
            header[..8],
            OPTION_REPLY_MAGIC.to_be_bytes(),
            "option reply magic"
        );
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let reply_type = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let length_bytes = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        assert!(
            length_bytes < 1 << 20,
            "absurd option reply length {length_bytes}"
        );
        let data = self.read_bytes(length_bytes as usize);
        (option, reply_type, data)
    }

    /// `NBD_OPT_GO` for `export` with no information requests; on success the connection is
    /// in transmission. An error reply returns its reply type.
    pub(crate) fn option_go(&mut self, export: &str) -> Result<ExportInfo, u32> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPTION_GO, data.len() as u32, &data);
        let mut info = None;
        loop {
            let (option, reply_type, data) = self.read_option_reply();
            assert_eq!(option, OPTION_GO, "reply to another option");
            match reply_type {
                REPLY_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    info = Some(ExportInfo {
                        size_bytes: u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
                        transmission_flags: u16::from_be_bytes(
                            data[10..12].try_into().expect("2 bytes"),
                        ),
                    });
                }
                REPLY_INFO => {}
                REPLY_ACK => return Ok(info.expect("NBD_INFO_EXPORT before the ACK")),
                error if error & REPLY_ERROR_BIT != 0 => return Err(error),
                other => panic!("unexpected reply type {other:#x} to NBD_OPT_GO"),
            }
        }
    }

    /// Sends a transmission request header (a write's payload follows separately).
    pub(crate) fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        handle: u64,
        offset_bytes: u64,
        length_bytes: u32,
    ) {
        let mut bytes = Vec::with_capacity(28);
        bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&handle.to_be_bytes());
        bytes.extend_from_slice(&offset_bytes.to_be_bytes());
        bytes.extend_from_slice(&length_bytes.to_be_bytes());
        self.send_bytes(&bytes);
    }

    /// Reads a simple reply header: (error, handle).
    pub(crate) fn read_simple_reply(&mut self) -> (u32, u64) {
        let header = self.read_bytes(16);
        assert_eq!(
            header[..4],
            SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "simple reply magic"
        );
        let error = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
        let handle = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        (error, handle)
    }

    /// Whether the server closes the connection (EOF or reset) before the read timeout,
    /// discarding anything it still sends.
    pub(crate) fn is_closed_by_server(&mut self) -> bool {
        let mut buffer = [0u8; 65536];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
