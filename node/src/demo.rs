//! `bootmesh demo`: a boot server and a node in a throwaway network-namespace lab, driven by
//! real clients through the boot path (DHCP, iPXE script, TFTP, HTTP, NBD), then a `kill -9` of
//! the server and a restart that keeps the node's lease. Everything it creates is removed at the
//! end. The VM boot comes with the image milestone; this shows every service a VM will use.

#![allow(clippy::print_stdout)] // The demo talks to a person on the terminal.
#![allow(clippy::disallowed_methods)] // It times real steps on the real clock; no core runs here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const SERVER_NAMESPACE: &str = "bootmesh-demo-server";
const NODE_NAMESPACE: &str = "bootmesh-demo-node";
const SERVER_INTERFACE: &str = "bmdemo-srv";
const NODE_INTERFACE: &str = "bmdemo-node";
const SERVER_ADDRESS: &str = "10.99.0.1";
const NODE_MAC: &str = "52:54:00:de:00:01";

/// Removes the lab on every exit path.
struct LabGuard {
    server: Option<Child>,
    directory: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        for namespace in [NODE_NAMESPACE, SERVER_NAMESPACE] {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths).any(|directory| directory.join(program).is_file())
        })
        .unwrap_or(false)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn in_node(program: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut full = vec!["netns", "exec", NODE_NAMESPACE, "timeout", "60", program];
    full.extend_from_slice(args);
    run("ip", &full)
}

fn step(number: usize, title: &str) -> Instant {
    print!("[{number}/6] {title:<52}");
    let _ = std::io::stdout().flush();
    Instant::now()
}

fn done(started: Instant, detail: &str) {
    println!("ok  {:>6.2}s  {detail}", started.elapsed().as_secs_f64());
}

/// Deterministic bytes standing in for a kernel, an initrd and a root image.
fn payload(size_bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..size_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn same_file(left: &Path, right: &Path) -> anyhow::Result<bool> {
    Ok(std::fs::read(left)? == std::fs::read(right)?)
}

fn start_server(binary: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::File::create(log)?;
    let child = Command::new("ip")
        .args(["netns", "exec", SERVER_NAMESPACE])
        .arg(binary)
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains("bootmesh serving")) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "server did not start; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

fn obtain_lease(script: &Path) -> anyhow::Result<String> {
    let script = script.to_string_lossy();
    let output = in_node(
        "busybox",
        &[
            "udhcpc",
            "-i",
            NODE_INTERFACE,
            "-n",
            "-q",
            "-f",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            &script,
        ],
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("bound "))
        .map(str::to_owned)
        .context("udhcpc reported no lease")
}

/// Runs the demo. Needs root (network namespaces) and the clients it names.
pub(crate) fn run_demo() -> anyhow::Result<()> {
    // SAFETY-free check: /proc/self/status holds the effective uid in its Uid line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    if effective_uid != Some("0") {
        bail!("the demo builds a network-namespace lab and needs root: run `sudo bootmesh demo`");
    }
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("busybox", "busybox"),
        ("curl", "curl"),
        ("nbdcopy", "libnbd-bin"),
    ]
    .into_iter()
    .filter(|(program, _)| !have(program))
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() {
        bail!(
            "the demo drives real clients; install them first: apt-get install {}",
            missing.join(" ")
        );
    }
    let binary = std::env::current_exe()?;
    let directory = std::env::temp_dir().join(format!("bootmesh-demo-{}", std::process::id()));
    std::fs::create_dir_all(directory.join("files/boot"))?;
    let mut guard = LabGuard {
        server: None,
        directory: directory.clone(),
    };
    let total = Instant::now();

    println!(
        "bootmesh demo: one boot server and one node in network namespaces {SERVER_NAMESPACE} / {NODE_NAMESPACE}\n"
    );
    let started = step(1, "lab: namespaces, veth pair, embedded boot files");
    for namespace in [SERVER_NAMESPACE, NODE_NAMESPACE] {
        let _ = Command::new("ip")
            .args(["netns", "del", namespace])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", namespace])?;
        run("ip", &["-n", namespace, "link", "set", "lo", "up"])?;
    }
    run(
        "ip",
        &[
            "link",
            "add",
            SERVER_INTERFACE,
            "netns",
            SERVER_NAMESPACE,
            "type",
            "veth",
            "peer",
            "name",
            NODE_INTERFACE,
            "netns",
            NODE_NAMESPACE,
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            NODE_NAMESPACE,
            "link",
            "set",
            NODE_INTERFACE,
            "address",
            NODE_MAC,
        ],
    )?;
    for (namespace, interface) in [
        (SERVER_NAMESPACE, SERVER_INTERFACE),
        (NODE_NAMESPACE, NODE_INTERFACE),
    ] {
        run("ip", &["-n", namespace, "link", "set", interface, "up"])?;
    }
    run(
        "ip",
        &[
            "-n",
            SERVER_NAMESPACE,
            "addr",
            "add",
            &format!("{SERVER_ADDRESS}/24"),
            "dev",
            SERVER_INTERFACE,
        ],
    )?;
    let kernel = directory.join("files/boot/vmlinuz");
    let initrd = directory.join("files/boot/initrd.img");
    let root = directory.join("root.squashfs");
    std::fs::write(&kernel, payload(8 << 20, 1))?;
    std::fs::write(&initrd, payload(16 << 20, 2))?;
    std::fs::write(&root, payload(64 << 20, 3))?;
    let config = directory.join("server.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{state}"

[dhcp]
interfaces = ["{SERVER_INTERFACE}"]

[[dhcp.subnet]]
cidr = "10.99.0.0/24"
ranges = ["10.99.0.100-10.99.0.199"]
routers = ["{SERVER_ADDRESS}"]
lease_secs = 600

[[dhcp.host]]
mac = "{NODE_MAC}"
hostname = "demo-node-1"

[tftp]
listen = "0.0.0.0:69"
root = "{files}"

[http]
listen = "0.0.0.0:8080"
root = "{files}"

[nbd]
listen = "0.0.0.0:10809"
[[nbd.export]]
name = "root"
path = "{root}"
description = "demo root image"

[boot]
kernel = "boot/vmlinuz"
initrd = "boot/initrd.img"
cmdline = "console=ttyS0 root=/dev/nbd0"
"#,
            state = directory.join("state").display(),
            files = directory.join("files").display(),
            root = root.display(),
        ),
    )?;
    let script = directory.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew) ip addr replace \"$ip/24\" dev \"$interface\"; echo \"bound $ip\";; esac\nexit 0\n",
    )?;
    run("chmod", &["+x", &script.to_string_lossy()])?;
    let log = directory.join("server.log");
    guard.server = Some(start_server(&binary, &config, &log)?);
    done(started, &format!("server log: {}", log.display()));

    let started = step(2, "DHCP: busybox udhcpc asks for a lease");
    let address = obtain_lease(&script)?;
    done(started, &format!("node {NODE_MAC} bound {address}"));

    let started = step(3, "iPXE: the node's boot script over HTTP");
    let mac_path = NODE_MAC.replace(':', "-");
    let script_text = in_node(
        "curl",
        &[
            "-fsS",
            &format!("http://{SERVER_ADDRESS}:8080/boot/{mac_path}.ipxe"),
        ],
    )?;
    let script_text = String::from_utf8_lossy(&script_text.stdout).into_owned();
    done(started, "");
    for line in script_text.lines().take(5) {
        println!("        | {line}");
    }

    let started = step(4, "TFTP + HTTP: kernel (8 MiB) and initrd (16 MiB)");
    let fetched_kernel = directory.join("fetched-kernel");
    let fetched_initrd = directory.join("fetched-initrd");
    in_node(
        "curl",
        &[
            "-fsS",
            "--tftp-blksize",
            "1468",
            "-o",
            &fetched_kernel.to_string_lossy(),
            &format!("tftp://{SERVER_ADDRESS}/boot/vmlinuz"),
        ],
    )?;
    in_node(
        "curl",
        &[
            "-fsS",
            "-o",
            &fetched_initrd.to_string_lossy(),
            &format!("http://{SERVER_ADDRESS}:8080/boot/initrd.img"),
        ],
    )?;
    if !same_file(&kernel, &fetched_kernel)? || !same_file(&initrd, &fetched_initrd)? {
        bail!("downloaded files differ from the served ones");
    }
    done(started, "byte-identical");

    let started = step(5, "NBD: nbdcopy of the 64 MiB root image");
    let fetched_root = directory.join("fetched-root");
    in_node(
        "nbdcopy",
        &[
            &format!("nbd://{SERVER_ADDRESS}/root"),
            &fetched_root.to_string_lossy(),
        ],
    )?;
    if !same_file(&root, &fetched_root)? {
        bail!("the root image read over NBD differs");
    }
    let seconds = started.elapsed().as_secs_f64();
    done(
        started,
        &format!("byte-identical, {:.0} MiB/s", 64.0 / seconds.max(0.001)),
    );

    let started = step(6, "failure: kill -9 the server, restart, lease kept");
    if let Some(mut server) = guard.server.take() {
        server.kill()?;
        server.wait()?;
    }
    guard.server = Some(start_server(&binary, &config, &log)?);
    let again = obtain_lease(&script)?;
    if again != address {
        bail!("after the restart the node got {again}, not its lease {address}");
    }
    done(started, &format!("node kept {again}"));

    println!(
        "\nsummary: DHCP, iPXE script, TFTP, HTTP and NBD served the node; a SIGKILLed server came back"
    );
    println!(
        "with every acknowledged lease. Total {:.1}s. The lab is removed now.",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}
