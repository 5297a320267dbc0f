//! HTTP boot against curl: whole files byte-identical, Range requests (206 with exactly the
//! requested bytes), and paths that leave the root (`..`, encoded `..`, symlinks) refused
//! without ever sending the file behind them.

use std::process::Output;
use std::time::Duration;

use crate::lab::{self, Lab, ServerAndClient};

const PORT: u16 = 8080;
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

/// Files under the root: an empty one, an iPXE script, a binary and a kernel-sized image.
const FILES: &[(&str, usize)] = &[
    ("empty", 0),
    ("boot.ipxe", 300),
    ("ipxe.efi", 1024 * 1024 + 7),
    ("boot/x86_64/vmlinuz", 9 * 1024 * 1024 + 5),
];

struct HttpLab {
    lab: Lab,
    pair: ServerAndClient,
    files: Vec<(String, Vec<u8>)>,
}

impl HttpLab {
    fn start() -> Self {
        let mut lab = Lab::new();
        let pair = lab.server_and_client("ht", "10.79.0");
        let root = lab.path("http");
        let mut files = Vec::new();
        for (index, (name, length_bytes)) in FILES.iter().enumerate() {
            let content = lab::deterministic_bytes(0x4779_0000 + index as u64, *length_bytes);
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("create root");
            std::fs::write(&path, &content).expect("write test file");
            files.push(((*name).to_owned(), content));
        }
        std::fs::create_dir_all(lab.path("state")).expect("state dir");
        let config = format!(
            "state_dir = \"{state}\"\n\
             [http]\n\
             listen = \"{address}:{PORT}\"\n\
             root = \"{root}\"\n",
            state = lab.path("state").display(),
            address = pair.server_address,
            root = root.display(),
        );
        lab.serve("server", &pair.server, &config);
        Self { lab, pair, files }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{PORT}/{path}", self.pair.server_address)
    }

    fn content(&self, name: &str) -> &[u8] {
        self.files
            .iter()
            .find(|(file_name, _)| file_name == name)
            .map(|(_, content)| content.as_slice())
            .expect("known file")
    }

    /// Runs curl with `args`, writing the body to a fresh file; returns the output (stdout is
    /// the status code), the body and the response headers.
    fn curl(&self, label: &str, args: &[&str]) -> (Output, Vec<u8>, String) {
        let body = self.lab.path(&format!("{label}.body"));
        let headers = self.lab.path(&format!("{label}.headers"));
        let body_argument = body.to_string_lossy().into_owned();
        let headers_argument = headers.to_string_lossy().into_owned();
        let mut all_args = vec![
            "--silent",
            "--show-error",
            "--write-out",
            "%{http_code}",
            "--output",
            &body_argument,
            "--dump-header",
            &headers_argument,
        ];
        all_args.extend(args);
        let output = self
            .lab
            .run(&self.pair.client, CLIENT_LIMIT, "curl", &all_args);
        assert!(
            output.status.success(),
            "curl {args:?}: {}",
            lab::describe(&output)
        );
        let body_bytes = std::fs::read(&body).unwrap_or_default();
        let header_text = std::fs::read_to_string(&headers).unwrap_or_default();
        (output, body_bytes, header_text)
    }
}

fn status(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn curl_downloads_byte_identical_files() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("curl");
    let http = HttpLab::start();
    for (name, content) in &http.files {
        let label = format!("full-{}", name.replace('/', "_"));
        let (output, body, headers) = http.curl(&label, &[&http.url(name)]);
        assert_eq!(status(&output), "200", "GET {name}: {headers}");
        lab::assert_same_bytes(name, &body, content);
        assert!(
            headers
                .to_ascii_lowercase()
                .contains(&format!("content-length: {}\r\n", content.len())),
            "GET {name} has no exact content-length: {headers}"
        );
    }
}

#[test]
fn range_requests_return_exactly_the_requested_bytes() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("curl");
    let http = HttpLab::start();
    let name = "boot/x86_64/vmlinuz";
    let content = http.content(name);
    let size = content.len();
    let url = http.url(name);
    // (curl's --range, first byte, end byte exclusive)
    let cases = [
        ("100-199".to_owned(), 100, 200),
        ("1000-".to_owned(), 1000, size),
        ("-500".to_owned(), size - 500, size),
        ("0-0".to_owned(), 0, 1),
        (format!("{}-", size - 1), size - 1, size),
        // A range running past the end is cut at the end.
        (format!("{}-{}", size - 10, size + 1000), size - 10, size),
    ];
    for (index, (range, first, end)) in cases.iter().enumerate() {
        let (output, body, headers) =
            http.curl(&format!("range-{index}"), &["--range", range, &url]);
        assert_eq!(status(&output), "206", "range {range}: {headers}");
        lab::assert_same_bytes(&format!("range {range}"), &body, &content[*first..*end]);
        let expected_content_range = format!("content-range: bytes {first}-{}/{size}", end - 1);
        assert!(
            headers
                .to_ascii_lowercase()
                .contains(&expected_content_range),
            "range {range}: expected {expected_content_range}: {headers}"
        );
    }
    // A range wholly beyond the end is unsatisfiable, and sends no file bytes.
    let (output, body, headers) = http.curl(
        "range-unsatisfiable",
        &["--range", &format!("{}-{}", size + 10, size + 20), &url],
    );
    assert_eq!(status(&output), "416", "unsatisfiable range: {headers}");
    assert!(body.len() < 64, "416 came with {} bytes", body.len());
}

#[test]
fn paths_outside_the_root_are_refused_and_missing_files_not_found() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("curl");
    let http = HttpLab::start();
    // A file beside the root that must never be served, reachable by `..` and by symlinks.
    let secret = lab::deterministic_bytes(0x5ec2e7, 4096);
    let secret_path = http.lab.path("secret.bin");
    std::fs::write(&secret_path, &secret).expect("write secret");
    let root = http.lab.path("http");
    std::os::unix::fs::symlink(&secret_path, root.join("escape-absolute")).expect("symlink");
    std::os::unix::fs::symlink("../secret.bin", root.join("escape-relative")).expect("symlink");
    std::os::unix::fs::symlink(
        "../../../secret.bin",
        root.join("boot/x86_64/escape-nested"),
    )
    .expect("symlink");
    std::os::unix::fs::symlink("/etc", root.join("etc-directory")).expect("symlink");
    // A symlink that stays inside the root is served: the refusals below are about escaping.
    std::os::unix::fs::symlink("boot/x86_64/vmlinuz", root.join("inside")).expect("symlink");
    let passwd = std::fs::read("/etc/passwd").unwrap_or_default();

    let refused = [
        "../../etc/passwd",
        "../secret.bin",
        "boot/../../secret.bin",
        "%2e%2e/secret.bin",
        "%2E%2E%2Fsecret.bin",
        "boot/..%2f..%2fsecret.bin",
        "..%5csecret.bin",
        "escape-absolute",
        "escape-relative",
        "boot/x86_64/escape-nested",
        "etc-directory/passwd",
    ];
    for (index, path) in refused.iter().enumerate() {
        // --path-as-is: curl would otherwise remove the `..` before sending.
        let (output, body, headers) = http.curl(
            &format!("refused-{index}"),
            &["--path-as-is", &http.url(path)],
        );
        let code = status(&output);
        assert!(
            code == "403" || code == "404",
            "GET /{path} got {code}: {headers}"
        );
        // Only the short "forbidden" or "not found" text.
        assert!(
            body.len() < 64,
            "GET /{path} came with a {}-byte body",
            body.len()
        );
        assert!(
            body != secret && (passwd.is_empty() || body != passwd),
            "GET /{path} served the file behind it"
        );
    }

    for (index, path) in ["missing.bin", "boot/missing/vmlinuz", "boot/x86_64/"]
        .iter()
        .enumerate()
    {
        let (output, _, headers) = http.curl(&format!("missing-{index}"), &[&http.url(path)]);
        assert_eq!(status(&output), "404", "GET /{path}: {headers}");
    }

    // The control: the inside symlink is served.
    let (output, body, headers) = http.curl("inside", &[&http.url("inside")]);
    assert_eq!(status(&output), "200", "GET /inside: {headers}");
    lab::assert_same_bytes("inside", &body, http.content("boot/x86_64/vmlinuz"));

    let log = http.lab.log("server");
    assert!(
        log.contains("http path refused: outside the served root"),
        "the server did not log the refusals:\n{log}"
    );
}
