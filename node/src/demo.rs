//! `bootmesh demo`: two QEMU VMs PXE-boot from a bootmesh server in a throwaway
//! network-namespace lab, one with BIOS firmware and its root image in RAM, one with UEFI and
//! its root over NBD, both through the bootmesh initramfs and dm-verity, into an image built
//! here from Debian packages (the kernel and busybox). The agent's steps scroll by live; a
//! summary ends it. Everything it creates is removed at the end; downloads are kept in a cache.

#![allow(clippy::print_stdout)] // The demo talks to a person on the terminal.
#![allow(clippy::disallowed_methods)] // It times real steps on the real clock; no core runs here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use node::vmlab::{self, Accelerator, BootLab, Firmware, VmSpec};

/// Where downloaded packages stay between runs.
const CACHE_DIRECTORY: &str = "/var/cache/bootmesh-demo";
/// How long both VMs may take to reach their marker.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

const DEMO_INIT: &str = r#"#!/bin/sh
echo "BOOTMESH-MARKER host=$(hostname) root=$(grep -o '"root_mode": "[a-z]*"' /run/bootmesh/boot.json | cut -d '"' -f 4) address=$(ip -4 -o addr show | grep -v ' lo ' | head -n 1 | tr -s ' ' | cut -d ' ' -f 4) preinit=$(cat /etc/demo-preinit 2>/dev/null)" > /dev/kmsg
sleep 2
poweroff -f
"#;

struct DemoVm {
    spec: VmSpec,
    mode: &'static str,
}

fn step(number: usize, title: &str) -> Instant {
    print!("[{number}/6] {title:<58}");
    let _ = std::io::stdout().flush();
    Instant::now()
}

fn done(started: Instant, detail: &str) {
    println!("ok  {:>6.1}s  {detail}", started.elapsed().as_secs_f64());
}

/// Says what is missing (root, programs, firmware, the static agent) and how to get it.
fn check_requirements() -> anyhow::Result<PathBuf> {
    // The effective user id is the second field of /proc/self/status's Uid line.
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|id| id == "0"))
        })
        .unwrap_or(false);
    let missing = vmlab::missing_requirements();
    let agent = vmlab::find_agent();
    if is_root && missing.is_empty() && agent.is_some() {
        return agent.context("agent");
    }
    println!("bootmesh demo cannot run here yet:");
    if !is_root {
        println!("  - it needs root (network namespaces, taps, a DHCP server inside the lab)");
    }
    if !missing.is_empty() {
        let mut packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
        packages.sort_unstable();
        packages.dedup();
        for (what, package) in &missing {
            println!("  - {what} is missing (Debian package {package})");
        }
        println!(
            "    install: apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        );
    }
    if agent.is_none() {
        println!(
            "  - the agent must be a static binary; run the demo from the static build:\n    \
             cargo run --release --target x86_64-unknown-linux-gnu --config .cargo/static.toml -p node -- demo"
        );
    }
    bail!("requirements missing")
}

/// Runs the demo.
pub(crate) fn run_demo() -> anyhow::Result<()> {
    let agent = check_requirements()?;
    let binary = std::env::current_exe().context("own executable")?;
    let cache = PathBuf::from(CACHE_DIRECTORY);
    std::fs::create_dir_all(&cache).context("cache directory")?;
    let work = tempfile::tempdir().context("work directory")?;
    let accelerator = Accelerator::detect();
    println!(
        "bootmesh demo: a boot server and two VMs in a throwaway lab (QEMU {}; {})",
        accelerator.as_str(),
        if accelerator == Accelerator::Tcg {
            "software emulation, so allow a minute"
        } else {
            "hardware virtualisation"
        }
    );

    let started = step(1, "Debian kernel (apt-get download, cached)");
    let kernel = vmlab::prepare_kernel(&cache)?;
    done(started, &format!("linux {}", kernel.version));

    let started = step(2, "image: busybox + kernel, imported with the agent");
    let tree = work.path().join("tree");
    vmlab::busybox_image_tree(&cache, &kernel, &tree, DEMO_INIT)?;
    let state = work.path().join("state");
    let state_text = state.display().to_string();
    vmlab::run_bootmesh(
        &binary,
        &[
            "image",
            "--state-dir",
            &state_text,
            "import",
            "demo:v1",
            "--from",
            &tree.display().to_string(),
            "--agent",
            &agent.display().to_string(),
            "--cmdline",
            "console=ttyS0 panic=-1",
        ],
    )?;
    for group in ["in-ram", "over-nbd"] {
        vmlab::run_bootmesh(
            &binary,
            &[
                "image",
                "--state-dir",
                &state_text,
                "promote",
                "--group",
                group,
                "demo:v1",
            ],
        )?;
    }
    let shown = vmlab::run_bootmesh(
        &binary,
        &["image", "--state-dir", &state_text, "show", "demo:v1"],
    )?;
    let hash = shown
        .lines()
        .find_map(|line| line.strip_prefix("hash"))
        .map(|hash| hash.trim().chars().take(16).collect::<String>())
        .unwrap_or_default();
    done(started, &format!("demo:v1 = {hash}..."));

    let started = step(3, "lab: namespace, bridge, router advertisements");
    let mut lab = BootLab::new("bmdemo", 77, work.path().join("lab"))?;
    done(started, &format!("server at {}", lab.server_address));

    let started = step(4, "boot server: DHCP, TFTP, HTTP, NBD");
    let files = work.path().join("files");
    std::fs::create_dir_all(&files)?;
    for name in ["undionly.kpxe", "ipxe.efi", "snponly.efi"] {
        std::fs::copy(Path::new("/usr/lib/ipxe").join(name), files.join(name))
            .with_context(|| format!("copy {name}"))?;
    }
    let config = format!(
        r#"state_dir = "{state_text}"
[dhcp]
interfaces = ["{bridge}"]
[[dhcp.subnet]]
cidr = "10.77.0.0/24"
ranges = ["10.77.0.100-10.77.0.199"]
routers = ["10.77.0.1"]
lease_secs = 600
[[dhcp.host]]
mac = "52:54:00:77:00:01"
address = "10.77.0.11"
hostname = "demo-bios-ram"
group = "in-ram"
[[dhcp.host]]
mac = "52:54:00:77:00:02"
address = "10.77.0.12"
hostname = "demo-uefi-nbd"
group = "over-nbd"
[tftp]
listen = "0.0.0.0:69"
root = "{files}"
[http]
listen = "0.0.0.0:8080"
root = "{files}"
[nbd]
listen = "0.0.0.0:10809"
[boot]
default_group = "in-ram"
[[group]]
name = "in-ram"
root_mode = "ram"
preinit = ["echo 'set before init by PREINIT' > /etc/demo-preinit"]
[[group]]
name = "over-nbd"
root_mode = "nbd"
preinit = ["echo 'set before init by PREINIT' > /etc/demo-preinit"]
"#,
        bridge = lab.bridge,
        files = files.display(),
    );
    lab.serve("server", &binary, &config)?;
    done(started, "serving on the lab bridge only");

    let started = step(5, "two VMs PXE-boot at once");
    println!();
    let demo_vms = [
        DemoVm {
            spec: VmSpec {
                name: "bios-ram".into(),
                mac: [0x52, 0x54, 0, 0x77, 0, 1],
                firmware: Firmware::Bios,
                memory_mib: 512,
            },
            mode: "BIOS, root in RAM",
        },
        DemoVm {
            spec: VmSpec {
                name: "uefi-nbd".into(),
                mac: [0x52, 0x54, 0, 0x77, 0, 2],
                firmware: Firmware::Uefi,
                memory_mib: 512,
            },
            mode: "UEFI, root over NBD",
        },
    ];
    let mut vms = Vec::new();
    for demo_vm in &demo_vms {
        vms.push(lab.start_vm(&demo_vm.spec)?);
    }
    let mut shown_lines = vec![0usize; vms.len()];
    let mut markers: Vec<Option<(Duration, String)>> = vec![None; vms.len()];
    let deadline = Instant::now() + BOOT_LIMIT;
    while markers.iter().any(Option::is_none) && Instant::now() < deadline {
        for (index, vm) in vms.iter().enumerate() {
            let serial = vm.serial();
            let lines: Vec<&str> = serial
                .lines()
                .filter(|line| line.contains("bootmesh:") || line.contains("BOOTMESH-MARKER"))
                .collect();
            for line in lines.iter().skip(shown_lines[index]) {
                let text = line.split_once("] ").map_or(*line, |(_, text)| text);
                println!(
                    "      {:>5.1}s {:<9} {}",
                    vm.started.elapsed().as_secs_f64(),
                    vm.name,
                    text.trim_start_matches("bootmesh:").trim()
                );
                if line.contains("BOOTMESH-MARKER") && markers[index].is_none() {
                    markers[index] = Some((vm.started.elapsed(), text.to_owned()));
                }
            }
            shown_lines[index] = lines.len();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print!("[5/6] {:<58}", "two VMs PXE-boot at once");
    done(started, "");

    let started = step(6, "summary");
    println!();
    let mut failed = false;
    for ((demo_vm, vm), marker) in demo_vms.iter().zip(&vms).zip(&markers) {
        match marker {
            Some((elapsed, text)) => println!(
                "      {:<9} {:<20} booted in {:>5.1} s   {}",
                vm.name,
                demo_vm.mode,
                elapsed.as_secs_f64(),
                text.trim_start_matches("BOOTMESH-MARKER").trim()
            ),
            None => {
                failed = true;
                println!(
                    "      {:<9} {:<20} did not boot within {} s; its console: {}",
                    vm.name,
                    demo_vm.mode,
                    BOOT_LIMIT.as_secs(),
                    vm.serial_path.display()
                );
            }
        }
    }
    done(started, "lab removed");
    if failed {
        // Keep the evidence for the person watching.
        let kept = work.keep();
        bail!("a VM did not boot; logs kept in {}", kept.display());
    }
    Ok(())
}
