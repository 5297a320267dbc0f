//! HTTP boot against curl: whole files byte-identical, Range requests (206 with exactly the
//! requested bytes), and paths that leave the root (`..`, encoded `..`, symlinks) refused
//! without ever sending the file behind them. Node plans and secrets: a plan per MAC, secrets
//! once per boot token (never after, never with a wrong or expired token, never in the log),
//! and the generated lts.conf over TFTP (tftp-hpa).

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

/// A host with settings of its own (upper-case hex in lts.conf: `52:54:00:79:AB:02`).
const WORKER_MAC: &str = "52:54:00:79:ab:02";
/// A MAC no host entry names: it gets the default group's plan.
const UNKNOWN_MAC: &str = "52:54:00:79:00:99";
const GROUP_SECRET: &str = "group-join-9f2c41d7e0b3";
const HOST_SECRET: &str = "host-join-3b8e5a60c1f4";
const REGISTRY_SECRET: &str = "group-registry-77d1aa0e";

/// A server with groups, a host, secrets and a group image, and a client namespace.
struct NodeLab {
    lab: Lab,
    pair: ServerAndClient,
}

impl NodeLab {
    /// Serves with `[boot] token_ttl_secs = token_ttl_secs`; imports and promotes an image for
    /// group "workers" when `with_image`, so that boot scripts carry boot tokens.
    fn start(prefix: &str, subnet: &str, token_ttl_secs: u64, with_image: bool) -> Self {
        let mut lab = Lab::new();
        let pair = lab.server_and_client(prefix, subnet);
        let state = lab.path("state");
        std::fs::create_dir_all(&state).expect("state dir");
        std::fs::create_dir_all(lab.path("www")).expect("www dir");
        if with_image {
            import_and_promote(&lab, "workers");
        }
        let config = format!(
            "state_dir = \"{state}\"\n\
             [tftp]\nlisten = \"{address}:69\"\nroot = \"{www}\"\n\
             [http]\nlisten = \"{address}:{PORT}\"\nroot = \"{www}\"\n\
             [nbd]\nlisten = \"{address}:10809\"\n\
             [boot]\ndefault_group = \"workers\"\n\
             servers = [\"{address}:{PORT}\", \"{subnet}.9:{PORT}\"]\n\
             token_ttl_secs = {token_ttl_secs}\n\
             [[group]]\nname = \"workers\"\n\
             preinit = [\"echo workers > /etc/motd\"]\n\
             keep_system_services = [\"ssh\"]\n\
             secrets = {{ kubeadm-join = \"{GROUP_SECRET}\", registry = \"{REGISTRY_SECRET}\" }}\n\
             [dhcp]\ninterfaces = [\"{interface}\"]\n\
             [[dhcp.subnet]]\ncidr = \"{subnet}.0/24\"\nranges = [\"{subnet}.100-{subnet}.199\"]\n\
             [[dhcp.host]]\nmac = \"{WORKER_MAC}\"\nhostname = \"worker-2\"\n\
             root_mode = \"nbd\"\n\
             preinit = [\"sysctl -w vm.swappiness=0\"]\n\
             fstab = [\"server:/home /home nfs defaults 0 0\"]\n\
             secrets = {{ kubeadm-join = \"{HOST_SECRET}\" }}\n",
            state = state.display(),
            www = lab.path("www").display(),
            address = pair.server_address,
            interface = pair.server_interface,
        );
        // Debug logging, so that the secrecy checks below read every line the server can write.
        lab.serve_with_environment("server", &pair.server, &config, &["BOOTMESH_LOG=debug"]);
        Self { lab, pair }
    }

    /// GETs `path`; returns the status and the body.
    fn get(&self, path: &str) -> (String, String) {
        self.curl(path, &[])
    }

    /// `curl` on `path` with `options` before the URL; returns the status and the body.
    fn curl(&self, path: &str, options: &[&str]) -> (String, String) {
        let body_path = self.lab.path("body");
        let _ = std::fs::remove_file(&body_path);
        let url = format!("http://{}:{PORT}/{path}", self.pair.server_address);
        let body_text = body_path.to_string_lossy();
        let mut args = vec!["--silent", "--show-error", "--output", body_text.as_ref()];
        args.extend_from_slice(&["--write-out", "%{http_code}"]);
        args.extend_from_slice(options);
        args.push(&url);
        let output = self.lab.run(&self.pair.client, CLIENT_LIMIT, "curl", &args);
        assert!(
            output.status.success(),
            "curl {options:?} {path}: {}",
            lab::describe(&output)
        );
        (
            status(&output),
            std::fs::read_to_string(&body_path).unwrap_or_default(),
        )
    }

    /// The boot script of `mac` and the boot token on its command line.
    fn boot_script(&self, mac: &str) -> (String, String) {
        let (code, script) = self.get(&format!("boot/{}.ipxe", mac.replace(':', "-")));
        assert_eq!(code, "200", "boot script: {script}");
        let token = script
            .split_whitespace()
            .find_map(|word| word.strip_prefix("bootmesh.token="))
            .unwrap_or_else(|| panic!("no bootmesh.token in {script}"))
            .to_owned();
        assert_eq!(token.len(), 32, "128 bits in hex: {token}");
        assert!(
            token.bytes().all(|byte| byte.is_ascii_hexdigit()),
            "{token}"
        );
        (script, token)
    }

    fn secrets(&self, mac: &str, token: &str) -> (String, String) {
        self.get(&format!("nodes/{mac}/secrets?token={token}"))
    }

    /// POSTs `json` to `path`, as the agent reports its stages; returns the status and body.
    fn post(&self, path: &str, json: &str) -> (String, String) {
        self.curl(
            path,
            &[
                "--header",
                "content-type: application/json",
                "--data-binary",
                json,
            ],
        )
    }

    /// `bootmesh nodes` run from the client's namespace against this server.
    fn bootmesh_nodes(&self, json: bool) -> String {
        self.bootmesh_nodes_filtered(json, &[])
    }

    /// `bootmesh nodes` with `filters` (`--stage booted`, ...).
    fn bootmesh_nodes_filtered(&self, json: bool, filters: &[&str]) -> String {
        let server = format!("{}:{PORT}", self.pair.server_address);
        let mut args = vec!["nodes", "--server", server.as_str()];
        if json {
            args.push("--json");
        }
        args.extend_from_slice(filters);
        let output = self.lab.run(
            &self.pair.client,
            CLIENT_LIMIT,
            env!("CARGO_BIN_EXE_bootmesh"),
            &args,
        );
        assert!(
            output.status.success(),
            "bootmesh nodes: {}",
            lab::describe(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// Imports a small rootfs with a kernel and an initrd as `node:v1` and promotes it to `group`.
fn import_and_promote(lab: &Lab, group: &str) {
    let tree = lab.path("rootfs");
    std::fs::create_dir_all(tree.join("boot")).expect("boot dir");
    std::fs::write(
        tree.join("boot/vmlinuz-6.1.0-1-amd64"),
        lab::deterministic_bytes(0x6b65, 64 << 10),
    )
    .expect("kernel");
    std::fs::write(
        tree.join("boot/initrd.img-6.1.0-1-amd64"),
        lab::deterministic_bytes(0x696e, 32 << 10),
    )
    .expect("initrd");
    let state = lab.path("state").to_string_lossy().into_owned();
    let from = tree.to_string_lossy().into_owned();
    for arguments in [
        vec!["import", "node:v1", "--from", &from, "--created", "1"],
        vec!["promote", "node:v1", "--group", group],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_bootmesh"))
            .args(["image", "--state-dir", &state])
            .args(&arguments)
            .output()
            .expect("run bootmesh image");
        assert!(
            output.status.success(),
            "bootmesh image {arguments:?}: {}",
            lab::describe(&output)
        );
    }
}

fn plan(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|error| panic!("plan {body:?}: {error}"))
}

#[test]
fn plans_follow_the_mac_and_secrets_are_served_once_per_token_and_never_logged() {
    if !lab::enabled() {
        return;
    }
    for program in ["curl", "mksquashfs"] {
        lab::require_program(program);
    }
    let nodes = NodeLab::start("hn", "10.79.1", 300, true);

    // Plans: the host's (any MAC spelling), and the default group's for an unknown MAC.
    for spelling in [
        WORKER_MAC.to_owned(),
        WORKER_MAC.replace(':', "-").to_uppercase(),
    ] {
        let (code, body) = nodes.get(&format!("nodes/{spelling}/plan"));
        assert_eq!(code, "200", "{body}");
        assert_eq!(
            plan(&body),
            serde_json::json!({
                "hostname": "worker-2",
                "group": "workers",
                "root_mode": "nbd",
                "nbd_port": 10809,
                "preinit": ["echo workers > /etc/motd", "sysctl -w vm.swappiness=0"],
                "fstab": ["server:/home /home nfs defaults 0 0"],
                "rcfile": [],
                "keep_system_services": ["ssh"],
            })
        );
    }
    let (code, body) = nodes.get(&format!("nodes/{UNKNOWN_MAC}/plan"));
    assert_eq!(code, "200", "{body}");
    let unknown = plan(&body);
    assert_eq!(unknown["hostname"], serde_json::Value::Null);
    assert_eq!(unknown["group"], "workers");
    assert_eq!(unknown["root_mode"], "ram");
    assert_eq!(
        unknown["preinit"],
        serde_json::json!(["echo workers > /etc/motd"])
    );
    let (code, _) = nodes.get("nodes/not-a-mac/plan");
    assert_eq!(code, "404");

    // The boot script names the node, the servers (the one asked first, each once) and a
    // fresh token.
    let (script, first_token) = nodes.boot_script(WORKER_MAC);
    assert!(
        script.contains(&format!("bootmesh.mac={WORKER_MAC}")),
        "{script}"
    );
    assert!(
        script.contains("bootmesh.servers=10.79.1.1:8080,10.79.1.9:8080 "),
        "{script}"
    );
    // A newer boot script replaces the token: only the newest is good.
    let (_, token) = nodes.boot_script(WORKER_MAC);
    assert_ne!(token, first_token);
    let (code, body) = nodes.secrets(WORKER_MAC, &first_token);
    assert_eq!(code, "403", "a replaced token: {body}");

    let wrong = "0123456789abcdef0123456789abcdef";
    let (code, body) = nodes.secrets(WORKER_MAC, wrong);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "boot token does not match\n")
    );
    let (code, body) = nodes.secrets(UNKNOWN_MAC, &token);
    assert_eq!(code, "403", "a token is good for its own MAC only: {body}");

    let (code, body) = nodes.secrets(WORKER_MAC, &token);
    assert_eq!(code, "200", "{body}");
    let secrets: serde_json::Value = serde_json::from_str(&body).expect("secrets json");
    assert_eq!(
        secrets,
        serde_json::json!({"secrets": {"kubeadm-join": HOST_SECRET, "registry": REGISTRY_SECRET}}),
        "the host's value wins over the group's"
    );
    let (code, body) = nodes.secrets(WORKER_MAC, &token);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "no current boot token for this node\n"),
        "a token is good once"
    );

    // An unknown MAC boots the default group's image and gets the group's secrets.
    let (_, unknown_token) = nodes.boot_script(UNKNOWN_MAC);
    let (code, body) = nodes.secrets(UNKNOWN_MAC, &unknown_token);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains(GROUP_SECRET), "{body}");

    // A file request logs its path at debug level: proof that the server logged everything.
    std::fs::write(nodes.lab.path("www/boot.txt"), "file").expect("file");
    assert_eq!(nodes.get("boot.txt?token=x").0, "200");
    let log = nodes.lab.log("server");
    assert!(log.contains("DEBUG"), "debug logging is off:\n{log}");
    assert!(log.contains("secrets served"), "{log}");
    assert!(log.contains("secrets refused"), "{log}");
    for (what, value) in [
        ("a secret", GROUP_SECRET),
        ("a secret", HOST_SECRET),
        ("a secret", REGISTRY_SECRET),
        ("a token", first_token.as_str()),
        ("a token", token.as_str()),
        ("a token", unknown_token.as_str()),
        ("a token", wrong),
    ] {
        assert!(!log.contains(value), "the server logged {what}:\n{log}");
    }
}

/// What the server serves a booting node (its boot script, its plan) and what the node's agent
/// reports (image with its sources, root, booted) make the node's timeline, which
/// `bootmesh nodes` shows as JSON and as a table; a report claiming a stage only a server can
/// see, or that is not a report, is refused and counted, and changes nothing.
#[test]
fn served_files_and_agent_reports_make_the_timeline_bootmesh_nodes_shows() {
    if !lab::enabled() {
        return;
    }
    for program in ["curl", "mksquashfs"] {
        lab::require_program(program);
    }
    let nodes = NodeLab::start("hr", "10.79.4", 300, true);
    let report_path = format!("nodes/{}/report", WORKER_MAC.replace(':', "-"));
    nodes.boot_script(WORKER_MAC);
    assert_eq!(nodes.get(&format!("nodes/{WORKER_MAC}/plan")).0, "200");
    for report in [
        r#"{"stage":"image","sources":{"server_bytes":1048576,"peer_bytes":3145728,"peers":["10.79.4.21:7800","10.79.4.22:7800"]},"uptime_ms":9000}"#,
        r#"{"stage":"root","uptime_ms":9500}"#,
        r#"{"stage":"booted","uptime_ms":31000}"#,
    ] {
        let (code, body) = nodes.post(&report_path, report);
        assert_eq!(code, "204", "{report}: {body}");
    }
    for (refused, reason) in [
        (
            r#"{"stage":"dhcp"}"#,
            "report refused: an agent reports image, root or booted, not dhcp",
        ),
        (r#"{"stage":"booted","extra":1}"#, "report refused: "),
        ("not json", "report refused: "),
    ] {
        let (code, body) = nodes.post(&report_path, refused);
        assert_eq!(code, "400", "{refused}: {body}");
        assert!(body.starts_with(reason), "{refused}: {body}");
    }
    let (code, _) = nodes.post("nodes/not-a-mac/report", r#"{"stage":"root"}"#);
    assert_eq!(code, "404");

    let view: serde_json::Value =
        serde_json::from_str(&nodes.bootmesh_nodes(true)).expect("nodes --json");
    assert_eq!(
        view["servers"][0]["error"],
        serde_json::Value::Null,
        "{view:#}"
    );
    let node = view["nodes"]
        .as_array()
        .and_then(|all| all.iter().find(|node| node["mac"] == WORKER_MAC))
        .unwrap_or_else(|| panic!("{WORKER_MAC} in {view:#}"));
    let stages = lab::timeline_stages(node);
    // No DHCP client ran here: the timeline starts at the boot script.
    assert_eq!(
        stages,
        ["kernel", "plan", "image", "root", "booted"],
        "{node:#}"
    );
    assert_eq!(node["hostname"], "worker-2");
    assert_eq!(node["image"], "node:v1");
    assert_eq!(node["kernel_to_booted_ms"], 31000);
    assert_eq!(
        node["sources"]["peers"],
        serde_json::json!(["10.79.4.21:7800", "10.79.4.22:7800"])
    );
    // A second node that only fetched its plan: the filters tell the two apart on the server.
    assert_eq!(nodes.get(&format!("nodes/{UNKNOWN_MAC}/plan")).0, "200");
    let macs_of = |filters: &[&str]| -> (Vec<String>, u64) {
        let view: serde_json::Value =
            serde_json::from_str(&nodes.bootmesh_nodes_filtered(true, filters)).expect("json");
        let macs = view["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|node| node["mac"].as_str().expect("mac").to_owned())
            .collect();
        (macs, view["nodes_known"].as_u64().expect("nodes_known"))
    };
    assert_eq!(
        macs_of(&["--stage", "booted"]),
        (vec![WORKER_MAC.to_owned()], 2)
    );
    assert_eq!(
        macs_of(&["--stage", "plan"]),
        (vec![UNKNOWN_MAC.to_owned()], 2)
    );
    assert_eq!(
        macs_of(&["--image", "node:v1"]),
        (vec![WORKER_MAC.to_owned()], 2)
    );
    assert_eq!(macs_of(&["--rack", "r1", "--stage", "booted"]), (vec![], 2));
    let filtered = nodes.bootmesh_nodes_filtered(false, &["--stage", "dhcp"]);
    assert!(filtered.contains("0 of 2 nodes;"), "{filtered}");
    // `bootmesh status` sums the same up, with the server's health.
    let server = format!("{}:{PORT}", nodes.pair.server_address);
    let output = nodes.lab.run(
        &nodes.pair.client,
        CLIENT_LIMIT,
        env!("CARGO_BIN_EXE_bootmesh"),
        &["status", "--server", &server],
    );
    assert!(
        output.status.success(),
        "status: {}",
        lab::describe(&output)
    );
    let status = String::from_utf8_lossy(&output.stdout);
    // Outside a cluster a server is named by its host name.
    assert!(
        status
            .lines()
            .any(|line| line.starts_with("server ") && line.ends_with(": ready")),
        "{status}"
    );
    for line in [
        "a single server, not in a cluster",
        "nodes: 2 known; furthest stage: dhcp 0, kernel 0, plan 1, image 0, root 0, booted 1",
        "  image node:v1: 1 nodes, 1 booted, 75 % of its bytes from peers",
    ] {
        assert!(
            status.lines().any(|shown| shown.starts_with(line)),
            "{line:?} in\n{status}"
        );
    }
    let (code, body) = nodes.get("api/v1/nodes?stage=warm");
    assert_eq!(code, "400", "{body}");
    assert!(body.starts_with("unknown stage \"warm\""), "{body}");

    let table = nodes.bootmesh_nodes(false);
    let row = table
        .lines()
        .find(|line| line.starts_with(WORKER_MAC))
        .unwrap_or_else(|| panic!("{WORKER_MAC} in\n{table}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    // No DHCP here: no address, so no rack either; the image is the group's.
    assert_eq!(
        columns[1..6],
        ["worker-2", "-", "-", "node:v1", "booted"],
        "{table}"
    );
    assert!(row.ends_with("server 1.0MiB, peers 3.0MiB (2)"), "{table}");
    assert!(
        table.contains(&format!(
            "{WORKER_MAC} fetched from 10.79.4.21:7800 10.79.4.22:7800"
        )),
        "{table}"
    );

    let (code, metrics) = nodes.get("metrics");
    assert_eq!(code, "200");
    let value = |series: &str| {
        lab::metric_value(&metrics, series).unwrap_or_else(|| panic!("{series} in\n{metrics}"))
    };
    assert_eq!(
        value("bootmesh_node_image_bytes_total{source=\"peer\"}"),
        3 << 20
    );
    assert_eq!(
        value("bootmesh_node_image_bytes_total{source=\"server\"}"),
        1 << 20
    );
    assert_eq!(value("bootmesh_node_reports_refused_total"), 3);
    assert_eq!(value("bootmesh_boot_kernel_to_booted_seconds_count"), 1);
    assert!(value("bootmesh_nodes_seen") >= 1);
}

/// The dashboard, loaded by headless Chromium from the client's namespace, shows the server's
/// health, how far boots have got and a node's timeline, from the same reports `bootmesh nodes`
/// reads. The screenshot is kept as a test artefact (`target/tmp/dashboard/dashboard.png`).
#[test]
fn the_dashboard_shows_health_and_node_timelines_in_headless_chromium() {
    if !lab::enabled() {
        return;
    }
    for program in ["curl", "mksquashfs", "chromium"] {
        lab::require_program(program);
    }
    let nodes = NodeLab::start("hd", "10.79.5", 300, true);
    let report_path = format!("nodes/{}/report", WORKER_MAC.replace(':', "-"));
    nodes.boot_script(WORKER_MAC);
    assert_eq!(nodes.get(&format!("nodes/{WORKER_MAC}/plan")).0, "200");
    for report in [
        r#"{"stage":"image","sources":{"server_bytes":1048576,"peer_bytes":3145728,"peers":["10.79.5.21:7800"]}}"#,
        r#"{"stage":"root"}"#,
        r#"{"stage":"booted","uptime_ms":31000}"#,
    ] {
        assert_eq!(nodes.post(&report_path, report).0, "204", "{report}");
    }
    // A second node whose boot is still going: only its plan was served.
    assert_eq!(nodes.get(&format!("nodes/{UNKNOWN_MAC}/plan")).0, "200");

    let url = format!("http://{}:{PORT}/dashboard", nodes.pair.server_address);
    let profile = nodes.lab.path("chromium-profile");
    let profile_option = format!("--user-data-dir={}", profile.display());
    let chromium = |options: &[&str]| {
        let mut args = vec![
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            profile_option.as_str(),
            // Virtual time runs the page's scripts and its first polls to completion before
            // the DOM is dumped or the screenshot taken.
            "--virtual-time-budget=6000",
        ];
        args.extend_from_slice(options);
        args.push(&url);
        let output = nodes.lab.run(
            &nodes.pair.client,
            Duration::from_secs(180),
            "chromium",
            &args,
        );
        assert!(
            output.status.success(),
            "chromium: {}",
            lab::describe(&output)
        );
        output
    };
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom"]).stdout).into_owned();
    for shown in [
        r#"<span id="health" class="badge ok">ready</span>"#,
        "a single server, not in a cluster",
        &format!(r#"<tr data-mac="{WORKER_MAC}">"#),
        "<td>worker-2</td>",
        r#"<td class="stage">booted</td>"#,
        "servers 1.0 MiB, peers 3.0 MiB (10.79.5.21:7800)",
        &format!(r#"<tr data-mac="{UNKNOWN_MAC}">"#),
        r#"<td class="stage">plan</td>"#,
        r#"<div class="stage" data-stage="booted"><b>1</b>booted</div>"#,
        r#"<div class="stage" data-stage="plan"><b>1</b>plan</div>"#,
        "(75 % from peers)",
        r#"<td class="rack">-</td>"#,
        "nodes by rack: (no rack) 2 (1 booted)",
        r#"<td class="image">node:v1</td>"#,
        concat!(
            r#"<tr data-image="node:v1"><td class="name">node:v1</td><td class="nodes">1</td>"#,
            r#"<td class="booting">0</td><td class="holding">0</td><td class="booted">1</td>"#,
        ),
        r#"<td class="peers">75 %</td>"#,
    ] {
        assert!(dom.contains(shown), "{shown} in\n{dom}");
    }

    let artefacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&artefacts).expect("artefact directory");
    let screenshot = artefacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let screenshot_option = format!("--screenshot={}", screenshot.display());
    chromium(&[
        &screenshot_option,
        "--window-size=1280,900",
        "--hide-scrollbars",
    ]);
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a screenshot of {} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());
}

#[test]
fn an_expired_token_is_refused() {
    if !lab::enabled() {
        return;
    }
    for program in ["curl", "mksquashfs"] {
        lab::require_program(program);
    }
    let nodes = NodeLab::start("he", "10.79.2", 1, true);
    let (_, token) = nodes.boot_script(WORKER_MAC);
    // Well past the 1 s lifetime: this checks expiry, not timing.
    std::thread::sleep(Duration::from_secs(3));
    let (code, body) = nodes.secrets(WORKER_MAC, &token);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("403", "boot token expired\n")
    );
    let log = nodes.lab.log("server");
    assert!(!log.contains(&token), "the server logged the token:\n{log}");
}

#[test]
fn tftp_serves_a_generated_lts_conf_with_each_hosts_section_and_no_secrets() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("tftp");
    let nodes = NodeLab::start("hl", "10.79.3", 300, false);
    for remote in ["ltsp/amd64/lts.conf", "lts.conf"] {
        let local = nodes.lab.path(&remote.replace('/', "_"));
        let local_argument = local.to_string_lossy().into_owned();
        let output = nodes.lab.run(
            &nodes.pair.client,
            CLIENT_LIMIT,
            "tftp",
            &[
                &nodes.pair.server_address,
                "-m",
                "binary",
                "-c",
                "get",
                remote,
                &local_argument,
            ],
        );
        assert!(
            output.status.success(),
            "tftp {remote}: {}",
            lab::describe(&output)
        );
        let text = std::fs::read_to_string(&local).expect("lts.conf");
        let host_section = text
            .split_once("\n[52:54:00:79:AB:02]\n")
            .unwrap_or_else(|| panic!("{remote} has no section for the host:\n{text}"))
            .1;
        for line in [
            "HOSTNAME=\"worker-2\"",
            "PREINIT_01=\"echo workers > /etc/motd\"",
            "PREINIT_02=\"sysctl -w vm.swappiness=0\"",
            "FSTAB_01=\"server:/home /home nfs defaults 0 0\"",
            "KEEP_SYSTEM_SERVICES=\"ssh\"",
        ] {
            assert!(
                host_section.lines().any(|own| own == line),
                "{remote} lacks {line}:\n{text}"
            );
        }
        let default_section = text.split_once("[default]\n").expect("[default]").1;
        assert!(
            default_section
                .starts_with("# group workers\nPREINIT_01=\"echo workers > /etc/motd\"\n"),
            "{text}"
        );
        for secret in [GROUP_SECRET, HOST_SECRET, REGISTRY_SECRET] {
            assert!(!text.contains(secret), "{remote} carries a secret:\n{text}");
        }
    }
}
