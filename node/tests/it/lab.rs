//! A throwaway network lab for tests against real clients: network namespaces joined by veth
//! pairs, processes started inside them, and everything removed again when the lab drops
//! (also when the test panics). Traffic never leaves the namespaces the lab created.
#![allow(unsafe_code)] // setns(2) for threads that act inside a namespace.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether the environment can run network-namespace tests. CI sets BOOTMESH_NETNS_TESTS=1,
/// which turns "cannot" into a failure instead of a skip.
pub fn enabled() -> bool {
    let required = std::env::var_os("BOOTMESH_NETNS_TESTS").is_some();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            !required,
            "BOOTMESH_NETNS_TESTS is set but the tests are not running as root"
        );
        eprintln!("skipping: network namespace tests need root (CI sets BOOTMESH_NETNS_TESTS=1)");
    }
    root
}

/// Fails the test unless `program` is installed (CI installs every one of them).
pub fn require_program(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed; .ci/run installs it (see its package list)"
    );
}

/// The lab. Namespace and interface names carry the process id and a counter, so labs of
/// tests running in parallel never collide.
pub struct Lab {
    pub tag: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    pub directory: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Self {
        let counter = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, counter);
        Self {
            tag,
            namespaces: Vec::new(),
            children: Vec::new(),
            directory: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    /// Creates namespace `bm-<tag>-<role>` with loopback up; returns its name.
    pub fn namespace(&mut self, role: &str) -> String {
        let name = format!("bm-{}-{role}", self.tag);
        run_checked("ip", &["netns", "add", &name]);
        self.namespaces.push(name.clone());
        run_checked("ip", &["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A veth pair between two namespaces; returns the two interface names
    /// (`<prefix>a<tag>` in `first`, `<prefix>b<tag>` in `second`), both up.
    pub fn veth(&mut self, prefix: &str, first: &str, second: &str) -> (String, String) {
        let first_interface = format!("{prefix}a{}", self.tag);
        let second_interface = format!("{prefix}b{}", self.tag);
        assert!(
            first_interface.len() < 16,
            "interface name too long: {first_interface}"
        );
        run_checked(
            "ip",
            &[
                "link",
                "add",
                &first_interface,
                "netns",
                first,
                "type",
                "veth",
                "peer",
                "name",
                &second_interface,
                "netns",
                second,
            ],
        );
        run_checked("ip", &["-n", first, "link", "set", &first_interface, "up"]);
        run_checked(
            "ip",
            &["-n", second, "link", "set", &second_interface, "up"],
        );
        (first_interface, second_interface)
    }

    pub fn add_address(&self, namespace: &str, interface: &str, cidr: &str) {
        run_checked(
            "ip",
            &["-n", namespace, "addr", "add", cidr, "dev", interface],
        );
    }

    pub fn add_route(&self, namespace: &str, destination: &str, via: &str) {
        run_checked(
            "ip",
            &["-n", namespace, "route", "add", destination, "via", via],
        );
    }

    /// Runs `program` inside `namespace` and waits, at most `limit`.
    pub fn run(&self, namespace: &str, limit: Duration, program: &str, args: &[&str]) -> Output {
        let mut command = Command::new("timeout");
        command
            .arg("--signal=KILL")
            .arg(format!("{}", limit.as_secs().max(1)));
        command
            .args(["ip", "netns", "exec", namespace, program])
            .args(args);
        command.stdin(Stdio::null());
        command
            .output()
            .unwrap_or_else(|error| panic!("run {program}: {error}"))
    }

    /// Starts `program` inside `namespace`; it is killed when the lab drops. Output goes to
    /// `<name>.log` in the lab directory.
    pub fn spawn(&mut self, name: &str, namespace: &str, program: &str, args: &[&str]) -> u32 {
        let log = File::create(self.path(&format!("{name}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", namespace, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {program}: {error}"));
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        pid
    }

    /// Kills a spawned process with `signal` and waits for it.
    pub fn signal(&mut self, name: &str, signal: i32) {
        if let Some(position) = self
            .children
            .iter()
            .position(|(child_name, _)| child_name == name)
        {
            let (_, mut child) = self.children.remove(position);
            // SAFETY: kill(2) on a pid we spawned and have not yet reaped.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM to a spawned process and waits up to `limit` for it to exit.
    pub fn terminate_and_wait(
        &mut self,
        name: &str,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let position = self
            .children
            .iter()
            .position(|(child_name, _)| child_name == name)?;
        let (_, mut child) = self.children.remove(position);
        // SAFETY: kill(2) on a pid we spawned and have not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts `bootmesh serve` in `namespace` with `config` and waits until it serves.
    pub fn serve(&mut self, name: &str, namespace: &str, config: &str) {
        self.serve_with_environment(name, namespace, config, &[]);
    }

    /// [`serve`](Self::serve) with extra environment variables (`NAME=value`), e.g.
    /// `BOOTMESH_LOG=debug` for a test that reads every log line.
    pub fn serve_with_environment(
        &mut self,
        name: &str,
        namespace: &str,
        config: &str,
        environment: &[&str],
    ) {
        if environment.is_empty() {
            self.serve_wrapped(name, namespace, config, &[]);
        } else {
            // env(1) sets the variables and then becomes the server (same pid).
            let mut wrapper = vec!["env"];
            wrapper.extend(environment);
            self.serve_wrapped(name, namespace, config, &wrapper);
        }
    }

    /// [`serve`](Self::serve) through `wrapper`, a program that execs the command line it is
    /// given (so the pid stays the server's): `env NAME=value`, `env LD_PRELOAD=... FAKETIME=+8s`.
    pub fn serve_wrapped(&mut self, name: &str, namespace: &str, config: &str, wrapper: &[&str]) {
        let config_path = self.path(&format!("{name}.toml"));
        std::fs::write(&config_path, config).expect("write config");
        let binary = env!("CARGO_BIN_EXE_bootmesh");
        let config_argument = config_path.to_string_lossy().into_owned();
        let serve_arguments = ["serve", "--config", config_argument.as_str()];
        match wrapper.split_first() {
            None => {
                self.spawn(name, namespace, binary, &serve_arguments);
            }
            Some((program, arguments)) => {
                let mut arguments = arguments.to_vec();
                arguments.push(binary);
                arguments.extend(serve_arguments);
                self.spawn(name, namespace, program, &arguments);
            }
        }
        let log_path = self.path(&format!("{name}.log"));
        wait_for(Duration::from_secs(20), || {
            std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("bootmesh serving"))
        })
        .unwrap_or_else(|| panic!("server {name} did not start:\n{}", self.log(name)));
    }

    /// Runs `body` on a thread that has entered `namespace`, so sockets it opens live there.
    pub fn inside<T: Send>(&self, namespace: &str, body: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/var/run/netns").join(namespace);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).expect("open netns");
                    // SAFETY: setns on a valid namespace fd affects only this thread.
                    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(result, 0, "setns: {}", std::io::Error::last_os_error());
                    body()
                })
                .join()
                .expect("namespace thread panicked")
        })
    }

    /// Resident set size of a spawned process, in KiB (of the process `ip netns exec` became).
    pub fn rss_kib(&self, name: &str) -> Option<u64> {
        let (_, child) = self
            .children
            .iter()
            .find(|(child_name, _)| child_name == name)?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for namespace in &self.namespaces {
            // Processes that daemonised inside (dhclient) die with a kill of all pids in it.
            if let Ok(output) = Command::new("ip")
                .args(["netns", "pids", namespace])
                .output()
            {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on pids that live in our own namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .status();
        }
    }
}

pub fn run_checked(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `condition` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> Option<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition().then_some(())
}

/// Reads the lines of a file that exist so far.
pub fn lines(path: &Path) -> Vec<String> {
    File::open(path)
        .map(|file| BufReader::new(file).lines().map_while(Result::ok).collect())
        .unwrap_or_default()
}

/// A server namespace and a client namespace joined by one veth pair, with the server at
/// `<subnet>.1/24` and the client at `<subnet>.2/24`.
#[derive(Debug, Clone)]
pub struct ServerAndClient {
    pub server: String,
    pub client: String,
    pub server_interface: String,
    pub client_interface: String,
    pub server_address: String,
    pub client_address: String,
}

impl Lab {
    /// Builds a [`ServerAndClient`]; `subnet` is the first three octets, e.g. `"10.78.0"`, and
    /// `prefix` starts the interface names (one or two letters).
    pub fn server_and_client(&mut self, prefix: &str, subnet: &str) -> ServerAndClient {
        let server = self.namespace("srv");
        let client = self.namespace("cli");
        let (server_interface, client_interface) = self.veth(prefix, &server, &client);
        let server_address = format!("{subnet}.1");
        let client_address = format!("{subnet}.2");
        self.add_address(&server, &server_interface, &format!("{server_address}/24"));
        self.add_address(&client, &client_interface, &format!("{client_address}/24"));
        ServerAndClient {
            server,
            client,
            server_interface,
            client_interface,
            server_address,
            client_address,
        }
    }

    /// Whether the process spawned as `name` is still running (not exited, not reaped).
    pub fn is_running(&mut self, name: &str) -> bool {
        self.children
            .iter_mut()
            .find(|(child_name, _)| child_name == name)
            .is_some_and(|(_, child)| matches!(child.try_wait(), Ok(None)))
    }
}

/// `length_bytes` of reproducible noise from `seed` (xorshift64*): test files that no
/// compression, sparse-file or zero-page shortcut can fake, identical on every run.
pub fn deterministic_bytes(seed: u64, length_bytes: usize) -> Vec<u8> {
    // A zero state would stay zero forever.
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(length_bytes + 8);
    while bytes.len() < length_bytes {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    bytes.truncate(length_bytes);
    bytes
}

/// Asserts that `actual` is exactly `expected`, naming the first differing offset instead of
/// printing megabytes.
pub fn assert_same_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    let first_difference = actual
        .iter()
        .zip(expected)
        .position(|(left, right)| left != right)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: {} bytes, expected {} bytes; first difference at offset {first_difference}",
        actual.len(),
        expected.len()
    );
}

/// Asserts that the file at `path` holds exactly `expected`.
pub fn assert_file_bytes(path: &Path, expected: &[u8]) {
    let actual =
        std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    assert_same_bytes(&path.display().to_string(), &actual, expected);
}

/// Output of a finished client, for assertion messages.
/// The server's `/metrics` at `address` (`ip:port`), fetched with curl from `namespace`.
pub fn scrape_metrics(lab: &Lab, namespace: &str, address: &str) -> String {
    let output = lab.run(
        namespace,
        Duration::from_secs(10),
        "curl",
        &["-s", &format!("http://{address}/metrics")],
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The stage names of a node's timeline in `bootmesh nodes --json`, in order.
pub fn timeline_stages(node: &serde_json::Value) -> Vec<&str> {
    node["stages"]
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .filter_map(|seen| seen["stage"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `series` (name and labels, as the exposition writes them) in `metrics`.
pub fn metric_value(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

pub fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
