//! VM boot benchmark: QEMU VMs PXE-boot the same busybox image through the same bootmesh
//! initramfs and agent, once from `bootmesh serve` (DHCP, TFTP, HTTP, NBD) and once from a
//! baseline of well-known servers (dnsmasq for DHCP and TFTP, `python3 -m http.server` for
//! HTTP, `nbd-server` for NBD), each stack in its own throwaway vmlab namespace. For every VM it
//! measures its first DHCPDISCOVER (tcpdump on the lab bridge) to its marker line, and QEMU start
//! to the marker; one VM alone and four at once, root over NBD and in RAM, `BENCH_RUNS` times
//! (default 3), and prints medians as a Markdown table.
//!
//! Run as root, with the static agent:
//! `BOOTMESH_AGENT=target/x86_64-unknown-linux-gnu/release/bootmesh cargo run --release -p node --example vm_boot_bench`.
//! `BOOTMESH_BIN` names the server binary (default `target/release/bootmesh`). No traffic leaves
//! the lab namespaces.

#![allow(clippy::print_stdout)] // The report is Markdown on stdout for a person.
#![allow(clippy::disallowed_methods)] // A benchmark driver: it times real VMs on the real clock.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use node::vmlab::{self, BootLab, Firmware, VmSpec};

/// How long a batch of VMs may take from QEMU start to every marker (software emulation, four
/// VMs on two cores).
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// How often the consoles are read for the marker: the marker time's granularity.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Guest RAM.
const MEMORY_MIB: u32 = 512;
/// The bootmesh lab's subnet byte (10.83.0.0/24) and the baseline's (10.84.0.0/24).
const BOOTMESH_SUBNET: u8 = 83;
const BASELINE_SUBNET: u8 = 84;
/// The VM counts measured.
const VM_COUNTS: [usize; 2] = [1, 4];
/// The root modes measured.
const MODES: [&str; 2] = ["nbd", "ram"];

/// The image's init: the marker with the root mode the agent used, then power off.
const MARKER_INIT: &str = r#"#!/bin/sh
echo "BOOTMESH-MARKER host=$(hostname) root=$(grep -o '"root_mode": "[a-z]*"' /run/bootmesh/boot.json | tr -d '" ')" > /dev/kmsg
poweroff -f
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    Bootmesh,
    Baseline,
}

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::Bootmesh => "bootmesh",
            Stack::Baseline => "baseline (dnsmasq + http.server + nbd-server)",
        }
    }
}

/// One VM's boot.
#[derive(Debug)]
struct BootTiming {
    discover_to_marker_secs: f64,
    qemu_to_marker_secs: f64,
    agent_peak_rss_kib: Option<u64>,
}

/// Every VM boot of one (stack, mode, VM count) cell, over all runs.
#[derive(Debug)]
struct Cell {
    stack: Stack,
    mode: &'static str,
    vm_count: usize,
    boots: Vec<BootTiming>,
}

fn main() -> anyhow::Result<()> {
    let runs: usize = match std::env::var("BENCH_RUNS") {
        Ok(text) => text.parse().context("BENCH_RUNS is not a count")?,
        Err(_) => 3,
    };
    if runs == 0 {
        bail!("BENCH_RUNS must be at least 1");
    }
    let missing = vmlab::missing_requirements();
    if !missing.is_empty() {
        bail!("missing: {missing:?}");
    }
    for program in ["tcpdump", "nbd-server", "python3", "curl"] {
        Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .ok()
            .filter(std::process::ExitStatus::success)
            .with_context(|| format!("{program} is not installed"))?;
    }
    let agent = vmlab::find_agent().context("no static agent: set BOOTMESH_AGENT")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace directory")?
        .to_path_buf();
    let binary = std::env::var_os("BOOTMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target/release/bootmesh"));
    if !binary.is_file() {
        bail!(
            "{} is missing: cargo build --release -p node first",
            binary.display()
        );
    }
    let cache = std::env::var_os("BOOTMESH_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/bootmesh-test-cache"));
    std::fs::create_dir_all(&cache).context("cache directory")?;
    let work = tempfile::Builder::new()
        .prefix("bmvb-")
        .tempdir()
        .context("work directory")?;
    eprintln!(
        "vm_boot_bench: {runs} run(s), accelerator {}, work directory {}",
        vmlab::Accelerator::detect().as_str(),
        work.path().display()
    );
    let result = run_benchmark(runs, &agent, &binary, &cache, work.path());
    if result.is_err() {
        let kept = work.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    result
}

fn run_benchmark(
    runs: usize,
    agent: &Path,
    binary: &Path,
    cache: &Path,
    work: &Path,
) -> anyhow::Result<()> {
    // The image, imported once: both stacks serve these very bytes.
    let kernel = vmlab::prepare_kernel(cache)?;
    let tree = work.join("tree");
    vmlab::busybox_image_tree(cache, &kernel, &tree, MARKER_INIT)?;
    let state = work.join("state");
    let state_text = state.display().to_string();
    vmlab::run_bootmesh(
        binary,
        &[
            "image",
            "--state-dir",
            &state_text,
            "import",
            "bench:v1",
            "--from",
            &tree.display().to_string(),
            "--agent",
            &agent.display().to_string(),
            "--cmdline",
            "console=ttyS0 panic=-1",
        ],
    )?;
    for group in MODES {
        vmlab::run_bootmesh(
            binary,
            &[
                "image",
                "--state-dir",
                &state_text,
                "promote",
                "--group",
                group,
                "bench:v1",
            ],
        )?;
    }
    let shown = vmlab::run_bootmesh(
        binary,
        &["image", "--state-dir", &state_text, "show", "bench:v1"],
    )?;
    let hash = shown
        .lines()
        .find_map(|line| line.strip_prefix("hash").map(|hash| hash.trim().to_owned()))
        .context("image hash in `image show`")?;
    eprintln!("image bench:v1 = {hash}");

    let mut bootmesh_lab = start_bootmesh_lab(binary, &state, work)?;
    let bootmesh_script = show_bootmesh_script(&bootmesh_lab)?;
    let (mut baseline_lab, _nbd_server) = start_baseline_lab(binary, &state, &hash, work)?;

    let mut cells: Vec<Cell> = Vec::new();
    for mode in MODES {
        for vm_count in VM_COUNTS {
            for stack in [Stack::Bootmesh, Stack::Baseline] {
                cells.push(Cell {
                    stack,
                    mode,
                    vm_count,
                    boots: Vec::new(),
                });
            }
        }
    }
    for run in 1..=runs {
        for cell in &mut cells {
            let lab = match cell.stack {
                Stack::Bootmesh => &mut bootmesh_lab,
                Stack::Baseline => &mut baseline_lab,
            };
            let label = format!(
                "r{run}-{}-{}x{}",
                match cell.stack {
                    Stack::Bootmesh => "bm",
                    Stack::Baseline => "base",
                },
                cell.mode,
                cell.vm_count
            );
            let macs: Vec<[u8; 6]> = (0..cell.vm_count)
                .map(|index| vm_mac(lab, cell.mode, index))
                .collect();
            let started = Instant::now();
            let boots = boot_batch(lab, &label, &macs, cell.mode)?;
            eprintln!(
                "{label}: {} in {:.0} s",
                boots
                    .iter()
                    .map(|boot| format!(
                        "{:.1}/{:.1}",
                        boot.discover_to_marker_secs, boot.qemu_to_marker_secs
                    ))
                    .collect::<Vec<_>>()
                    .join(" "),
                started.elapsed().as_secs_f64()
            );
            cell.boots.extend(boots);
        }
    }
    print_report(runs, &cells, &bootmesh_script);
    Ok(())
}

/// `52:54:00:<subnet>:<mode>:<n>`: one MAC per (lab, mode, VM slot), reused across runs.
fn vm_mac(lab: &BootLab, mode: &str, index: usize) -> [u8; 6] {
    let mode_byte = if mode == "nbd" { 1 } else { 2 };
    let slot = u8::try_from(index + 1).unwrap_or(u8::MAX);
    [
        0x52,
        0x54,
        0,
        lab.server_address.octets()[1],
        mode_byte,
        slot,
    ]
}

/// The fixed address both stacks give a MAC: four VMs asking at once from dnsmasq's dynamic
/// range are offered the same address and iPXE retries its NAKed request until it gives up.
fn vm_address(mac: &[u8; 6]) -> String {
    format!(
        "10.{}.0.{}",
        mac[3],
        10 * u32::from(mac[4]) + 10 + u32::from(mac[5])
    )
}

fn colon_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn copy_ipxe(files: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(files)?;
    for name in ["undionly.kpxe", "ipxe.efi", "snponly.efi"] {
        std::fs::copy(Path::new("/usr/lib/ipxe").join(name), files.join(name))
            .with_context(|| format!("copy {name}"))?;
    }
    Ok(())
}

fn start_bootmesh_lab(binary: &Path, state: &Path, work: &Path) -> anyhow::Result<BootLab> {
    let mut lab = BootLab::new("bmvb-bm", BOOTMESH_SUBNET, work.join("bootmesh-lab"))?;
    let files = work.join("bootmesh-files");
    copy_ipxe(&files)?;
    let subnet = BOOTMESH_SUBNET;
    let mut hosts = String::new();
    for mode in MODES {
        for index in 0..VM_COUNTS[1] {
            let mac = vm_mac(&lab, mode, index);
            hosts.push_str(&format!(
                "[[dhcp.host]]\nmac = \"{}\"\naddress = \"{}\"\ngroup = \"{mode}\"\n",
                colon_mac(&mac),
                vm_address(&mac)
            ));
        }
    }
    let config = format!(
        r#"state_dir = "{state}"
[dhcp]
interfaces = ["{bridge}"]
[[dhcp.subnet]]
cidr = "10.{subnet}.0.0/24"
ranges = ["10.{subnet}.0.100-10.{subnet}.0.199"]
routers = ["10.{subnet}.0.1"]
lease_secs = 600
{hosts}
[tftp]
listen = "0.0.0.0:69"
root = "{files}"
[http]
listen = "0.0.0.0:8080"
root = "{files}"
[nbd]
listen = "0.0.0.0:10809"
[boot]
default_group = "ram"
[[group]]
name = "ram"
root_mode = "ram"
[[group]]
name = "nbd"
root_mode = "nbd"
"#,
        state = state.display(),
        bridge = lab.bridge,
        files = files.display(),
    );
    lab.serve("server", binary, &config)?;
    Ok(lab)
}

/// The script bootmesh hands a node (for a MAC no VM uses), token redacted: the baseline's
/// boot.ipxe copies its structure.
fn show_bootmesh_script(lab: &BootLab) -> anyhow::Result<String> {
    let url = format!(
        "http://{}:8080/boot/52-54-00-{:02x}-09-09.ipxe",
        lab.server_address,
        lab.server_address.octets()[1]
    );
    let output = Command::new("ip")
        .args(["netns", "exec", &lab.namespace, "curl", "-sSf", &url])
        .stdin(Stdio::null())
        .output()
        .context("curl the bootmesh boot script")?;
    if !output.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let script = String::from_utf8_lossy(&output.stdout);
    let redacted: Vec<String> = script
        .lines()
        .map(|line| {
            line.split(' ')
                .map(|word| {
                    if word.starts_with("bootmesh.token=") {
                        "bootmesh.token=<redacted>"
                    } else {
                        word
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    Ok(redacted.join("\n"))
}

/// Kills a daemonised `nbd-server` by the pid it wrote, when dropped.
#[derive(Debug)]
struct NbdServer {
    pid_path: PathBuf,
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_path) {
            let pid = pid.trim();
            if !pid.is_empty() && pid.chars().all(|character| character.is_ascii_digit()) {
                // Its per-client children outlive it otherwise (the VMs never disconnect).
                let _ = Command::new("pkill")
                    .args(["-TERM", "-P", pid])
                    .stderr(Stdio::null())
                    .status();
                let _ = Command::new("kill")
                    .args(["-TERM", pid])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn start_baseline_lab(
    binary: &Path,
    state: &Path,
    hash: &str,
    work: &Path,
) -> anyhow::Result<(BootLab, NbdServer)> {
    let state_text = state.display().to_string();
    let files = work.join("baseline-files");
    copy_ipxe(&files)?;
    for (part, name) in [("kernel", "kernel"), ("initrd", "initrd.img")] {
        vmlab::run_bootmesh(
            binary,
            &[
                "image",
                "--state-dir",
                &state_text,
                "export",
                "bench:v1",
                "--part",
                part,
                "--output",
                &files.join(name).display().to_string(),
            ],
        )?;
    }
    let root = work.join("baseline-root.img");
    vmlab::run_bootmesh(
        binary,
        &[
            "image",
            "--state-dir",
            &state_text,
            "export",
            "bench:v1",
            "--part",
            "root",
            "--output",
            &root.display().to_string(),
        ],
    )?;
    std::fs::create_dir_all(files.join("manifests"))?;
    for entry in std::fs::read_dir(state.join("images/manifests")).context("manifests")? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, files.join("manifests").join(name))?;
        }
    }
    if !files.join("manifests").join(hash).is_file() {
        bail!("the store keeps no manifests/{hash}");
    }
    std::fs::create_dir_all(files.join("chunks"))?;
    let mut chunk_count = 0usize;
    for fan_out in std::fs::read_dir(state.join("images/chunks")).context("chunks")? {
        for chunk in std::fs::read_dir(fan_out?.path())? {
            let path = chunk?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, files.join("chunks").join(name))?;
                chunk_count += 1;
            }
        }
    }
    eprintln!("baseline: {chunk_count} chunk files copied");

    let mut lab = BootLab::new("bmvb-base", BASELINE_SUBNET, work.join("baseline-lab"))?;
    let server = lab.server_address;
    let mut host_options = Vec::new();
    for mode in MODES {
        for index in 0..VM_COUNTS[1] {
            let mac = vm_mac(&lab, mode, index);
            host_options.push(format!(
                "--dhcp-host={},{}",
                colon_mac(&mac),
                vm_address(&mac)
            ));
            let directory = files.join("nodes").join(colon_mac(&mac).replace(':', "-"));
            std::fs::create_dir_all(&directory)?;
            std::fs::write(
                directory.join("plan"),
                format!("{{\"root_mode\":\"{mode}\",\"nbd_port\":10809}}\n"),
            )?;
        }
    }
    // bootmesh's script, without the per-node token and with iPXE's own MAC for bootmesh.mac.
    let script = format!(
        "#!ipxe\n\
         echo bootmesh: booting ${{net0/mac}}\n\
         kernel --name kernel http://{server}:8080/kernel || goto failed\n\
         initrd --name initrd.img http://{server}:8080/initrd.img || goto failed\n\
         imgargs kernel initrd=initrd.img console=ttyS0 panic=-1 bootmesh.image={hash} bootmesh.servers={server}:8080 bootmesh.mac=${{net0/mac}}\n\
         boot || goto failed\n\
         :failed\n\
         echo bootmesh: boot failed; retrying with a fresh DHCP round in 5 s\n\
         sleep 5\n\
         dhcp\n\
         chain ${{filename}} || goto failed\n"
    );
    std::fs::write(files.join("boot.ipxe"), script)?;

    let subnet = BASELINE_SUBNET;
    let lab_directory = lab.directory.clone();
    // As root: the files are in a root-only temporary directory.
    let mut dnsmasq_args: Vec<String> = host_options;
    dnsmasq_args.extend(
        [
            "--no-daemon",
            "--conf-file=/dev/null",
            "--user=root",
            "--log-facility=-",
            "--port=0",
            "--bind-interfaces",
            &format!("--interface={}", lab.bridge),
            &format!("--dhcp-range=10.{subnet}.0.100,10.{subnet}.0.199,255.255.255.0,10m"),
            &format!(
                "--dhcp-leasefile={}",
                lab_directory.join("dnsmasq.leases").display()
            ),
            &format!("--pid-file={}", lab_directory.join("dnsmasq.pid").display()),
            "--no-ping",
            "--enable-tftp",
            &format!("--tftp-root={}", files.display()),
            "--dhcp-match=set:ipxe,175",
            "--dhcp-boot=tag:!ipxe,undionly.kpxe",
            &format!("--dhcp-boot=tag:ipxe,http://{server}:8080/boot.ipxe"),
        ]
        .map(str::to_owned),
    );
    let dnsmasq_args: Vec<&str> = dnsmasq_args.iter().map(String::as_str).collect();
    lab.spawn("dnsmasq", "dnsmasq", &dnsmasq_args, &[])?;
    lab.spawn(
        "http",
        "python3",
        &[
            "-m",
            "http.server",
            "8080",
            "--bind",
            &server.to_string(),
            "--directory",
            &files.display().to_string(),
        ],
        &[],
    )?;
    // nbd-server -d serves one client at a time and exits after it, so it runs as a daemon
    // (forking per client) and is stopped by the pid it writes.
    let config_path = lab_directory.join("nbd-server.conf");
    std::fs::write(
        &config_path,
        format!(
            "[generic]\nallowlist = true\n[{hash}]\nexportname = {}\nreadonly = true\n",
            root.display()
        ),
    )?;
    let nbd_server = NbdServer {
        pid_path: lab_directory.join("nbd-server.pid"),
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &lab.namespace, "nbd-server", "-C"])
        .arg(&config_path)
        .arg("-p")
        .arg(&nbd_server.pid_path)
        .stdin(Stdio::null())
        .status()
        .context("start nbd-server")?;
    if !status.success() {
        bail!("nbd-server did not start: {status}");
    }
    // Ready when the boot script comes back over HTTP and nbd-server has written its pid.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fetched = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.namespace,
                "curl",
                "-sSf",
                "-o",
                "/dev/null",
            ])
            .arg(format!("http://{server}:8080/boot.ipxe"))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        let dnsmasq_ready = lab.log("dnsmasq").contains("DHCP, IP range");
        if fetched && dnsmasq_ready && nbd_server.pid_path.is_file() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "baseline servers did not start:\ndnsmasq: {}\nhttp: {}",
                lab.log("dnsmasq"),
                lab.log("http")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((lab, nbd_server))
}

/// Boots one VM per MAC at once and times each; waits for them to power off.
fn boot_batch(
    lab: &mut BootLab,
    label: &str,
    macs: &[[u8; 6]],
    mode: &str,
) -> anyhow::Result<Vec<BootTiming>> {
    let capture = format!("tcpdump-{label}");
    lab.spawn(
        &capture,
        "tcpdump",
        &[
            "-i",
            &lab.bridge.clone(),
            "-n",
            "-tt",
            "-l",
            "-e",
            "udp port 67",
        ],
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.log(&capture).contains("listening on") {
        if Instant::now() >= deadline {
            bail!("tcpdump did not start: {}", lab.log(&capture));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let mut vms = Vec::new();
    for (index, mac) in macs.iter().enumerate() {
        vms.push(lab.start_vm(&VmSpec {
            name: format!("{label}-vm{index}"),
            mac: *mac,
            firmware: Firmware::Bios,
            memory_mib: MEMORY_MIB,
        })?);
    }
    // Every console is read each round, so one VM's marker is not timed late while another is
    // awaited; a zero limit makes wait_for_line a single look.
    let mut markers: Vec<Option<(SystemTime, Duration, String)>> = vec![None; vms.len()];
    let deadline = Instant::now() + BOOT_LIMIT;
    while markers.iter().any(Option::is_none) {
        for (vm, marker) in vms.iter_mut().zip(markers.iter_mut()) {
            if marker.is_none()
                && let Ok((elapsed, line)) = vm.wait_for_line("BOOTMESH-MARKER", Duration::ZERO)
            {
                *marker = Some((SystemTime::now(), elapsed, line));
            }
        }
        if markers.iter().any(Option::is_none) && Instant::now() >= deadline {
            let late: Vec<String> = vms
                .iter()
                .zip(&markers)
                .filter(|(_, marker)| marker.is_none())
                .map(|(vm, _)| format!("{} ({})", vm.name, vm.serial_path.display()))
                .collect();
            bail!(
                "{label}: no marker within {BOOT_LIMIT:?} from {}",
                late.join(", ")
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    for vm in &mut vms {
        vm.wait_exit(Duration::from_secs(30));
    }
    let packets = lab.log(&capture);
    lab.kill(&capture);
    let mut timings = Vec::new();
    for ((vm, mac), marker) in vms.iter().zip(macs).zip(markers) {
        let Some((marker_wall, qemu_to_marker, line)) = marker else {
            bail!("{}: no marker", vm.name);
        };
        if !line.contains(&format!("root=root_mode:{mode}")) {
            bail!(
                "{}: booted with another root mode than {mode}: {line}",
                vm.name
            );
        }
        let mac_text = colon_mac(mac);
        // The VM's first packet to port 67 is its first DHCPDISCOVER (iPXE starts in INIT).
        let discover_secs = packets
            .lines()
            .find_map(|packet| {
                let mut words = packet.split_whitespace();
                let stamp = words.next()?;
                (words.next()? == mac_text).then(|| stamp.parse::<f64>().ok())?
            })
            .with_context(|| format!("{}: no DHCP packet from {mac_text} captured", vm.name))?;
        let marker_secs = marker_wall
            .duration_since(UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs_f64();
        let agent_peak_rss_kib = vm
            .serial()
            .lines()
            .find(|line| line.contains("switching to the image"))
            .and_then(|line| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix("peak_rss_kib="))
                    .and_then(|value| value.parse().ok())
            });
        timings.push(BootTiming {
            discover_to_marker_secs: marker_secs - discover_secs,
            qemu_to_marker_secs: qemu_to_marker.as_secs_f64(),
            agent_peak_rss_kib,
        });
    }
    Ok(timings)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        length if length % 2 == 1 => values[length / 2],
        length => (values[length / 2 - 1] + values[length / 2]) / 2.0,
    }
}

fn print_report(runs: usize, cells: &[Cell], bootmesh_script: &str) {
    println!("## VM boot: bootmesh against dnsmasq + python3 http.server + nbd-server\n");
    println!(
        "BIOS, {MEMORY_MIB} MiB, QEMU {}; the same busybox image and bootmesh initramfs; {runs} run(s); \
         medians over every VM of every run; marker times polled every {} ms.\n",
        vmlab::Accelerator::detect().as_str(),
        POLL_INTERVAL.as_millis()
    );
    println!(
        "| stack | mode | VMs | median DISCOVER->marker s | median QEMU->marker s | ratio bootmesh/baseline (DISCOVER->marker, QEMU->marker) |"
    );
    println!("|---|---|---|---|---|---|");
    let medians = |cell: &Cell| {
        let mut discover: Vec<f64> = cell
            .boots
            .iter()
            .map(|boot| boot.discover_to_marker_secs)
            .collect();
        let mut qemu: Vec<f64> = cell
            .boots
            .iter()
            .map(|boot| boot.qemu_to_marker_secs)
            .collect();
        (median(&mut discover), median(&mut qemu))
    };
    for cell in cells {
        let (discover, qemu) = medians(cell);
        let ratio = match cell.stack {
            Stack::Baseline => "-".to_owned(),
            Stack::Bootmesh => cells
                .iter()
                .find(|other| {
                    other.stack == Stack::Baseline
                        && other.mode == cell.mode
                        && other.vm_count == cell.vm_count
                })
                .map(|baseline| {
                    let (base_discover, base_qemu) = medians(baseline);
                    format!("{:.2}, {:.2}", discover / base_discover, qemu / base_qemu)
                })
                .unwrap_or_else(|| "-".to_owned()),
        };
        println!(
            "| {} | {} | {} | {discover:.1} | {qemu:.1} | {ratio} |",
            cell.stack.name(),
            cell.mode,
            cell.vm_count
        );
    }
    println!("\nRatios below 1 mean bootmesh is faster.\n");
    println!(
        "Agent peak RSS (VmHWM in the `switching to the image` line), median over its boots:\n"
    );
    println!("| stack | mode | agent peak RSS KiB |");
    println!("|---|---|---|");
    for stack in [Stack::Bootmesh, Stack::Baseline] {
        for mode in MODES {
            let mut values: Vec<f64> = cells
                .iter()
                .filter(|cell| cell.stack == stack && cell.mode == mode)
                .flat_map(|cell| &cell.boots)
                .filter_map(|boot| boot.agent_peak_rss_kib)
                .map(|kib| kib as f64)
                .collect();
            let shown = if values.is_empty() {
                "n/a".to_owned()
            } else {
                format!("{:.0}", median(&mut values))
            };
            println!("| {} | {mode} | {shown} |", stack.name());
        }
    }
    println!(
        "\nThe boot script bootmesh served (the baseline's boot.ipxe copies its structure):\n"
    );
    println!("```\n{bootmesh_script}\n```");
}
