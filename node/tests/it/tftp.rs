//! TFTP against real clients: tftp-hpa, atftp and curl download byte-identical files with the
//! classic 512-byte blocks and with negotiated `blksize`, `tsize` and `windowsize`; a 100 MiB
//! file crosses the 16-bit block-number rollover; paths that leave the root are refused and
//! missing files are reported, with nothing written by the client.

use std::path::PathBuf;
use std::time::Duration;

use crate::lab::{self, Lab, ServerAndClient};

/// Files served in every test: an empty one (a single empty DATA block), one that ends exactly
/// on a block boundary for both 512 and 1468 (the transfer ends with an empty block), one just
/// short of a block, and a kernel-sized one in a subdirectory.
const FILES: &[(&str, usize)] = &[
    ("empty", 0),
    ("short.bin", 511),
    // 187904 = 512 * 367 = 1468 * 128.
    ("exact-blocks.bin", 187_904),
    ("boot/x86_64/vmlinuz", 3 * 1024 * 1024 + 123),
];

const CLIENT_LIMIT: Duration = Duration::from_secs(30);

struct TftpLab {
    lab: Lab,
    pair: ServerAndClient,
    /// (name, content) of every file under the root.
    files: Vec<(String, Vec<u8>)>,
}

impl TftpLab {
    /// A server namespace serving [`FILES`] plus `extra_files` over TFTP, and a client
    /// namespace.
    fn start(extra_files: &[(&str, usize)]) -> Self {
        let mut lab = Lab::new();
        let pair = lab.server_and_client("tf", "10.78.0");
        let root = lab.path("tftp");
        let mut files = Vec::new();
        for (index, (name, length_bytes)) in FILES.iter().chain(extra_files).enumerate() {
            let content = lab::deterministic_bytes(0x7f7f_0000 + index as u64, *length_bytes);
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("create root");
            std::fs::write(&path, &content).expect("write test file");
            files.push(((*name).to_owned(), content));
        }
        std::fs::create_dir_all(lab.path("state")).expect("state dir");
        let config = format!(
            "state_dir = \"{state}\"\n\
             [tftp]\n\
             listen = \"{address}:69\"\n\
             root = \"{root}\"\n\
             [http]\n\
             listen = \"{address}:8080\"\n\
             root = \"{root}\"\n",
            state = lab.path("state").display(),
            address = pair.server_address,
            root = root.display(),
        );
        lab.serve("server", &pair.server, &config);
        Self { lab, pair, files }
    }

    fn host(&self) -> &str {
        &self.pair.server_address
    }

    /// A fresh path in the lab directory for a client to write to.
    fn local(&self, label: &str, name: &str) -> PathBuf {
        self.lab
            .path(&format!("{label}-{}", name.replace('/', "_")))
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.lab.run(&self.pair.client, CLIENT_LIMIT, program, args)
    }
}

/// The size of a file a client may have created; 0 if it did not.
fn written_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

fn path_argument(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

#[test]
fn tftp_hpa_downloads_byte_identical_files() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("tftp");
    let tftp = TftpLab::start(&[]);
    for (name, content) in &tftp.files {
        let local = tftp.local("tftp-hpa", name);
        let local_argument = path_argument(&local);
        // tftp-hpa sends no options: 512-byte blocks, RFC 1350 only.
        let output = tftp.run(
            "tftp",
            &[
                tftp.host(),
                "-m",
                "binary",
                "-c",
                "get",
                name,
                &local_argument,
            ],
        );
        assert!(
            output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
            "tftp-hpa get {name}: {}",
            lab::describe(&output)
        );
        lab::assert_file_bytes(&local, content);
    }
    // /metrics counts each transfer and its bytes once the server has seen the last ACK.
    let address = format!("{}:8080", tftp.host());
    let total_bytes: usize = tftp.files.iter().map(|(_, content)| content.len()).sum();
    let metrics = || lab::scrape_metrics(&tftp.lab, &tftp.pair.client, &address);
    let settled = lab::wait_for(Duration::from_secs(10), || {
        lab::metric_value(&metrics(), "bootmesh_tftp_transfers_active") == Some(0)
    });
    let scraped = metrics();
    assert!(settled.is_some(), "{scraped}");
    let value = |series| lab::metric_value(&scraped, series);
    assert_eq!(
        value("bootmesh_tftp_transfers_started_total"),
        Some(tftp.files.len() as u64)
    );
    assert_eq!(value("bootmesh_tftp_transfers_failed_total"), Some(0));
    assert_eq!(
        value("bootmesh_tftp_bytes_sent_total"),
        Some(total_bytes as u64)
    );
}

#[test]
fn atftp_downloads_with_blksize_tsize_and_windowsize() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("atftp");
    let tftp = TftpLab::start(&[]);
    for (blksize, windowsize) in [(512, None), (1468, None), (1468, Some(16))] {
        for (name, content) in &tftp.files {
            let label = format!("atftp-{blksize}-{}", windowsize.unwrap_or(1));
            let local = tftp.local(&label, name);
            let local_argument = path_argument(&local);
            let blksize_option = format!("blksize {blksize}");
            let mut args = vec![
                "--trace",
                "--option",
                &blksize_option,
                "--option",
                "tsize 0",
            ];
            let windowsize_option = windowsize.map(|blocks| format!("windowsize {blocks}"));
            if let Some(option) = &windowsize_option {
                args.extend(["--option", option]);
            }
            args.extend(["-g", "-r", name, "-l", &local_argument, tftp.host()]);
            let output = tftp.run("atftp", &args);
            assert!(
                output.status.success(),
                "atftp {args:?}: {}",
                lab::describe(&output)
            );
            lab::assert_file_bytes(&local, content);

            // The trace shows the server's OACK: every option granted, tsize with the size.
            let trace = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            let option_ack = trace
                .lines()
                .find(|line| line.contains("received OACK"))
                .unwrap_or_else(|| panic!("no OACK for {args:?}:\n{trace}"));
            assert!(
                option_ack.contains(&format!("blksize: {blksize}"))
                    && option_ack.contains(&format!("tsize: {}", content.len())),
                "OACK lacks blksize or tsize: {option_ack}"
            );
            if let Some(blocks) = windowsize {
                assert!(
                    option_ack.contains(&format!("windowsize: {blocks}")),
                    "OACK lacks windowsize: {option_ack}"
                );
                // One ACK per window, not per block: far fewer ACKs than blocks.
                let block_count = content.len() / blksize + 1;
                let ack_count = trace
                    .lines()
                    .filter(|line| line.contains("sent ACK"))
                    .count();
                if block_count >= 1000 {
                    assert!(
                        ack_count * 4 < block_count,
                        "{ack_count} ACKs for {block_count} blocks with windowsize {blocks}"
                    );
                }
            }
        }
    }
}

#[test]
fn curl_downloads_with_blksize_and_tsize() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("curl");
    let tftp = TftpLab::start(&[]);
    for blksize in ["512", "1468"] {
        for (name, content) in &tftp.files {
            if content.is_empty() {
                // curl refuses an OACK whose tsize is 0 (lib/tftp.c: "invalid tsize"), which is
                // what this server, tftp-hpa's and dnsmasq's send for an empty file.
                continue;
            }
            let local = tftp.local(&format!("curl-{blksize}"), name);
            let local_argument = path_argument(&local);
            let url = format!("tftp://{}/{name}", tftp.host());
            // curl asks for tsize on its own and, when it differs from 512, blksize.
            let output = tftp.run(
                "curl",
                &[
                    "--silent",
                    "--show-error",
                    "--tftp-blksize",
                    blksize,
                    &url,
                    "--output",
                    &local_argument,
                ],
            );
            assert!(
                output.status.success(),
                "curl {url} blksize {blksize}: {}",
                lab::describe(&output)
            );
            lab::assert_file_bytes(&local, content);
        }
    }
}

#[test]
fn a_100_mib_file_crosses_the_block_number_rollover() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("tftp");
    // 100 MiB in 512-byte blocks is 204801 blocks: the 16-bit block number wraps three times.
    let tftp = TftpLab::start(&[("rollover.img", 100 * 1024 * 1024)]);
    let (name, content) = tftp
        .files
        .iter()
        .find(|(name, _)| name == "rollover.img")
        .expect("rollover file");
    let local = tftp.local("rollover", name);
    let local_argument = path_argument(&local);
    let output = tftp.lab.run(
        &tftp.pair.client,
        Duration::from_secs(60),
        "tftp",
        &[
            tftp.host(),
            "-m",
            "binary",
            "-c",
            "get",
            name,
            &local_argument,
        ],
    );
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "tftp-hpa get {name}: {}",
        lab::describe(&output)
    );
    lab::assert_file_bytes(&local, content);
    let log = tftp.lab.log("server");
    assert!(
        log.contains(&format!("Completed {{ bytes: {} }}", content.len())),
        "the server did not log the completed transfer:\n{log}"
    );
}

/// How the server must answer a refused or missing path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Error 1.
    NotFound,
    /// Error 2.
    AccessViolation,
}

impl Refusal {
    /// tftp-hpa's message for the error (it exits 0 anyway).
    fn tftp_hpa_message(self) -> &'static str {
        match self {
            Self::NotFound => "Error code 1: file not found",
            Self::AccessViolation => "Error code 2: access violation",
        }
    }

    /// atftp's message for the error.
    fn atftp_message(self) -> &'static str {
        match self {
            Self::NotFound => "error received from server <file not found>",
            Self::AccessViolation => "error received from server <access violation>",
        }
    }

    /// curl's exit code: CURLE_TFTP_NOTFOUND or CURLE_TFTP_PERM.
    fn curl_exit_code(self) -> i32 {
        match self {
            Self::NotFound => 68,
            Self::AccessViolation => 69,
        }
    }
}

#[test]
fn paths_outside_the_root_are_refused_and_missing_files_not_found() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("tftp");
    lab::require_program("atftp");
    lab::require_program("curl");
    let tftp = TftpLab::start(&[]);
    // A file beside the root that must never be served, reachable by `..` and by symlinks.
    let secret = lab::deterministic_bytes(0x5ec2e7, 4096);
    let secret_path = tftp.lab.path("secret.bin");
    std::fs::write(&secret_path, &secret).expect("write secret");
    let root = tftp.lab.path("tftp");
    std::os::unix::fs::symlink(&secret_path, root.join("escape-absolute")).expect("symlink");
    std::os::unix::fs::symlink("../secret.bin", root.join("escape-relative")).expect("symlink");
    std::os::unix::fs::symlink("../../secret.bin", root.join("boot/escape-nested"))
        .expect("symlink");
    // A symlink that stays inside the root is served: the refusals below are about escaping.
    std::os::unix::fs::symlink("boot/x86_64/vmlinuz", root.join("inside")).expect("symlink");

    let absolute_secret = secret_path.to_string_lossy().into_owned();
    let cases: Vec<(&str, Refusal)> = vec![
        ("../secret.bin", Refusal::AccessViolation),
        ("boot/../../secret.bin", Refusal::AccessViolation),
        ("..\\secret.bin", Refusal::AccessViolation),
        ("escape-absolute", Refusal::AccessViolation),
        ("escape-relative", Refusal::AccessViolation),
        ("boot/escape-nested", Refusal::AccessViolation),
        // An absolute path is taken relative to the root (PXE clients send `/pxelinux.0`), so
        // the secret's absolute path names a file that does not exist under the root.
        (&absolute_secret, Refusal::NotFound),
        ("/etc/passwd", Refusal::NotFound),
        ("missing.bin", Refusal::NotFound),
        ("boot/missing/vmlinuz", Refusal::NotFound),
        // A directory is not a file.
        ("boot", Refusal::NotFound),
    ];
    for (index, (path, refusal)) in cases.iter().enumerate() {
        let local = tftp.local(&format!("refused-{index}"), "tftp-hpa");
        let local_argument = path_argument(&local);
        let output = tftp.run(
            "tftp",
            &[
                tftp.host(),
                "-m",
                "binary",
                "-c",
                "get",
                path,
                &local_argument,
            ],
        );
        let printed = lab::describe(&output);
        assert!(
            printed.contains(refusal.tftp_hpa_message()),
            "tftp-hpa get {path:?}: expected {refusal:?}: {printed}"
        );
        // tftp-hpa creates the local file before asking; it must stay empty.
        assert_eq!(written_bytes(&local), 0, "tftp-hpa wrote data for {path:?}");

        let local = tftp.local(&format!("refused-{index}"), "atftp");
        let local_argument = path_argument(&local);
        let output = tftp.run(
            "atftp",
            &[
                "--option",
                "blksize 1468",
                "--option",
                "tsize 0",
                "-g",
                "-r",
                path,
                "-l",
                &local_argument,
                tftp.host(),
            ],
        );
        let printed = lab::describe(&output);
        assert!(
            !output.status.success() && printed.contains(refusal.atftp_message()),
            "atftp get {path:?}: expected {refusal:?}: {printed}"
        );
        assert_eq!(written_bytes(&local), 0, "atftp wrote data for {path:?}");

        let local = tftp.local(&format!("refused-{index}"), "curl");
        let local_argument = path_argument(&local);
        // curl removes `..` from URLs unless told not to; backslashes it sends as they are.
        let url = format!("tftp://{}/{path}", tftp.host());
        let output = tftp.run(
            "curl",
            &[
                "--silent",
                "--path-as-is",
                "--tftp-blksize",
                "1468",
                &url,
                "--output",
                &local_argument,
            ],
        );
        assert_eq!(
            output.status.code(),
            Some(refusal.curl_exit_code()),
            "curl {url}: expected {refusal:?}: {}",
            lab::describe(&output)
        );
        assert!(!local.exists(), "curl wrote a file for {path:?}");
    }

    // The control: the inside symlink is served.
    let local = tftp.local("inside", "curl");
    let local_argument = path_argument(&local);
    let url = format!("tftp://{}/inside", tftp.host());
    let output = tftp.run(
        "curl",
        &["--silent", "--show-error", &url, "-o", &local_argument],
    );
    assert!(
        output.status.success(),
        "curl {url}: {}",
        lab::describe(&output)
    );
    let (_, kernel) = tftp
        .files
        .iter()
        .find(|(name, _)| name == "boot/x86_64/vmlinuz")
        .expect("kernel");
    lab::assert_file_bytes(&local, kernel);

    let log = tftp.lab.log("server");
    let refusal_line = format!("tftp request refused peer={}:", tftp.pair.client_address);
    assert!(
        log.contains(&refusal_line),
        "the server did not log the refusals:\n{log}"
    );
}
