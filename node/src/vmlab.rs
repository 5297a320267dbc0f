//! A throwaway lab in which QEMU virtual machines PXE-boot from bootmesh: a network namespace
//! with a bridge, one tap per VM, router advertisements on the segment (the packaged iPXE waits
//! about 13 s for one otherwise), the boot server and the VMs as child processes, serial
//! consoles in files. Everything is removed when the lab drops, also on a panic. No traffic
//! leaves the namespace.
//!
//! `bootmesh demo` and the VM tests both use it, with images made from Debian packages
//! ([`prepare_kernel`], [`busybox_image_tree`]).

#![allow(clippy::disallowed_methods)] // A lab driver at the edge: it times real VMs on the real clock.

use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the lab could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A program the lab needs is not installed.
    #[error("{program} is not installed (Debian package {package})")]
    Missing {
        /// The program.
        program: &'static str,
        /// Its package.
        package: &'static str,
    },
    /// A command failed.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its complaint.
        detail: String,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A VM did not print what was expected in time.
    #[error("{vm}: no {expected:?} on the serial console within {limit:?}; last lines:\n{tail}")]
    Timeout {
        /// The VM.
        vm: String,
        /// What was awaited.
        expected: String,
        /// The bound.
        limit: Duration,
        /// The end of its console.
        tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// Programs the lab runs, and the Debian packages that have them.
pub const LAB_PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("dnsmasq", "dnsmasq-base"),
    ("apt-get", "apt"),
    ("dpkg", "dpkg"),
    ("mksquashfs", "squashfs-tools"),
];

/// Firmware files the lab boots with, and their packages.
pub const LAB_FILES: &[(&str, &str)] = &[
    ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
    ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
    ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    ("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|directory| directory.join(program).is_file())
    })
}

/// What is missing to run VMs here: `(program or file, package)`.
pub fn missing_requirements() -> Vec<(String, &'static str)> {
    let mut missing: Vec<(String, &'static str)> = LAB_PROGRAMS
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(program, package)| ((*program).to_owned(), *package))
        .collect();
    missing.extend(
        LAB_FILES
            .iter()
            .filter(|(path, _)| !Path::new(path).is_file())
            .map(|(path, package)| ((*path).to_owned(), *package)),
    );
    missing
}

/// How QEMU runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accelerator {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }

    /// KVM when `/dev/kvm` is usable and is not a paravirtual nested KVM (`kvm_pvm`, on which
    /// guests triple-fault); `BOOTMESH_VM_ACCEL=tcg|kvm` overrides.
    pub fn detect() -> Self {
        match std::env::var("BOOTMESH_VM_ACCEL").as_deref() {
            Ok("kvm") => return Accelerator::Kvm,
            Ok("tcg") => return Accelerator::Tcg,
            _ => {}
        }
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if usable && !Path::new("/sys/module/kvm_pvm").exists() {
            Accelerator::Kvm
        } else {
            Accelerator::Tcg
        }
    }
}

/// Firmware a VM boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, PXE through the NIC's iPXE option ROM.
    Bios,
    /// OVMF, UEFI network boot through the NIC's iPXE EFI ROM.
    Uefi,
    /// OVMF with its own network stack (no option ROM on the NIC): UEFI PXE fetches the iPXE
    /// EFI binary that DHCP names over TFTP, as on servers whose NIC firmware has no iPXE.
    UefiNativePxe,
    /// OVMF with its own network stack and PXE switched off: UEFI HTTP boot (DHCP vendor class
    /// HTTPClient) fetches the iPXE EFI binary from the URL the DHCP offer names.
    UefiHttp,
}

/// One VM to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name (logs, tap).
    pub name: String,
    /// NIC address.
    pub mac: [u8; 6],
    /// Firmware.
    pub firmware: Firmware,
    /// Guest RAM.
    pub memory_mib: u32,
}

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    /// Its name.
    pub name: String,
    /// When QEMU started.
    pub started: Instant,
    /// Its serial console.
    pub serial_path: PathBuf,
    /// Its tap on a bridge of the lab.
    pub tap: String,
    /// The namespace its tap is in: the lab's, or a relayed rack's.
    pub namespace: String,
    child: Child,
}

impl Vm {
    /// The serial console so far.
    pub fn serial(&self) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = File::open(&self.serial_path) {
            let _ = file.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// Waits until a console line contains `needle`; returns the time since QEMU started and
    /// the line. Fails early if QEMU exits.
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        limit: Duration,
    ) -> Result<(Duration, String), LabError> {
        let deadline = Instant::now() + limit;
        loop {
            let serial = self.serial();
            if let Some(line) = serial.lines().find(|line| line.contains(needle)) {
                return Ok((self.started.elapsed(), line.to_owned()));
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= deadline {
                let tail: Vec<&str> = serial.lines().rev().take(25).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(LabError::Timeout {
                    vm: self.name.clone(),
                    expected: needle.to_owned(),
                    limit,
                    tail: tail.join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `limit` for QEMU to exit (the guest powered off); kills it after.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lab: one namespace, one bridge, the server's address on it; optionally racks behind
/// DHCP relays ([`BootLab::add_relayed_rack`]).
#[derive(Debug)]
pub struct BootLab {
    /// The namespace.
    pub namespace: String,
    /// The bridge.
    pub bridge: String,
    /// The boot server's address on the bridge (`/24`).
    pub server_address: Ipv4Addr,
    /// Logs, configs, serial consoles.
    pub directory: PathBuf,
    children: Vec<(String, Child)>,
    taps: usize,
    racks: Vec<RelayedRack>,
    servers: Vec<LabServer>,
}

/// A boot server of a lab with several ([`BootLab::add_server`]): a namespace of its own whose
/// `eth0` is cabled to the lab's bridge, so servers do not share ports or sockets.
#[derive(Debug, Clone)]
pub struct LabServer {
    /// Its namespace.
    pub namespace: String,
    /// Its address on the lab's segment (`/24`).
    pub address: Ipv4Addr,
    /// The lab's end of its cable (in the lab's namespace): its receive counter is what the
    /// server sent.
    pub cable: String,
}

/// A second segment behind a router: the router namespace holds an uplink on the lab's bridge,
/// the rack's bridge (where the rack's VMs' taps go) and `dhcrelay`, which forwards the
/// rack's DHCP to the lab's server; the lab's namespace routes the rack's subnet through it.
#[derive(Debug, Clone)]
pub struct RelayedRack {
    /// The router's namespace (also where the rack's taps and VMs are).
    pub namespace: String,
    /// The rack's bridge in it.
    pub bridge: String,
    /// The router's address on the rack's bridge: the relay agent address (giaddr) and the
    /// rack's default route; the rack's subnet is its `/24`.
    pub router_address: Ipv4Addr,
    /// The router's address on the lab's bridge.
    pub uplink_address: Ipv4Addr,
}

fn run(program: &str, args: &[&str]) -> Result<std::process::Output, LabError> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run {program}")))?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: format!("{program} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// Makes network namespace `name`, first removing one left by a killed run (it is ours by
/// name).
fn fresh_namespace(name: &str) -> Result<(), LabError> {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    run("ip", &["netns", "add", name])?;
    run("ip", &["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// An interface's receive counter, in `namespace`.
fn receive_counter(namespace: &str, interface: &str) -> Result<u64, LabError> {
    let path = format!("/sys/class/net/{interface}/statistics/rx_bytes");
    let output = run("ip", &["netns", "exec", namespace, "cat", &path])?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| LabError::Command {
            command: format!("cat {path}"),
            detail: "not a byte count".into(),
        })
}

/// Runs the `bootmesh` binary at `binary` with `args` (an image command, say) and returns
/// its standard output; a failure carries its standard error.
pub fn run_bootmesh(binary: &Path, args: &[&str]) -> Result<String, LabError> {
    let output = run(&binary.display().to_string(), args)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl BootLab {
    /// Bytes `vm` has sent on its NIC so far (its tap's receive counter on the host side).
    pub fn bytes_sent_by(&self, vm: &Vm) -> Result<u64, LabError> {
        receive_counter(&vm.namespace, &vm.tap)
    }

    /// Bytes `server` has sent on its cable so far.
    pub fn bytes_sent_by_server(&self, server: &LabServer) -> Result<u64, LabError> {
        receive_counter(&self.namespace, &server.cable)
    }

    /// A cable from the lab's bridge (its end `outside`, in the lab's namespace) to interface
    /// `inside` in `namespace`, which gets `address/24`; both ends up.
    fn cable_to_bridge(
        &self,
        outside: &str,
        namespace: &str,
        inside: &str,
        address: Ipv4Addr,
    ) -> Result<(), LabError> {
        let lab = self.namespace.as_str();
        let address = format!("{address}/24");
        let commands: [&[&str]; 5] = [
            &[
                "-n", lab, "link", "add", outside, "type", "veth", "peer", "name", inside, "netns",
                namespace,
            ],
            &["-n", lab, "link", "set", outside, "master", &self.bridge],
            &["-n", lab, "link", "set", outside, "up"],
            &["-n", namespace, "addr", "add", &address, "dev", inside],
            &["-n", namespace, "link", "set", inside, "up"],
        ];
        for command in commands {
            run("ip", command)?;
        }
        Ok(())
    }

    /// Makes server namespace `<prefix>-s<index>` (1-50) with `eth0` at `10.<subnet>.0.<10 +
    /// index>/24` on the lab's bridge. Start a server in it with [`BootLab::serve_in`].
    pub fn add_server(&mut self, index: u8) -> Result<LabServer, LabError> {
        let [_, subnet, _, _] = self.server_address.octets();
        let server = LabServer {
            namespace: format!("{}-s{index}", self.namespace),
            address: Ipv4Addr::new(10, subnet, 0, 10u8.saturating_add(index)),
            cable: format!("{}-c{index}", self.namespace),
        };
        fresh_namespace(&server.namespace)?;
        self.servers.push(server.clone());
        self.cable_to_bridge(&server.cable, &server.namespace, "eth0", server.address)?;
        Ok(server)
    }

    /// Runs `bootmesh` (at `binary`) with `args` in `server`'s namespace; its standard output.
    pub fn bootmesh_in(
        &self,
        server: &LabServer,
        binary: &Path,
        args: &[&str],
    ) -> Result<String, LabError> {
        let mut arguments = vec!["netns", "exec", &server.namespace];
        let binary = binary.display().to_string();
        arguments.push(&binary);
        arguments.extend(args);
        let output = run("ip", &arguments)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts `bootmesh serve` as `name` in `server`'s namespace; waits until it serves.
    pub fn serve_in(
        &mut self,
        server: &LabServer,
        name: &str,
        bootmesh: &Path,
        config: &str,
    ) -> Result<(), LabError> {
        let namespace = server.namespace.clone();
        self.serve_in_namespace(&namespace, name, bootmesh, config)
    }

    /// Makes namespace `<prefix>` with bridge `<prefix>-br` holding `10.<subnet>.0.1/24` and
    /// `fd00:<subnet>::1/64`, and starts router advertisements on it.
    pub fn new(prefix: &str, subnet: u8, directory: PathBuf) -> Result<Self, LabError> {
        Self::with_prefix_length(prefix, subnet, 24, directory)
    }

    /// As `new`, with the bridge's IPv4 network `10.<subnet>.0.1/<prefix_length>`: a lab for
    /// configurations written for a wider network (an LTSP site's `10.9.0.0/16`).
    pub fn with_prefix_length(
        prefix: &str,
        subnet: u8,
        prefix_length: u8,
        directory: PathBuf,
    ) -> Result<Self, LabError> {
        std::fs::create_dir_all(&directory).map_err(io("lab directory"))?;
        let namespace = prefix.to_owned();
        let bridge = format!("{prefix}-br");
        fresh_namespace(&namespace)?;
        let mut lab = BootLab {
            namespace,
            bridge,
            server_address: Ipv4Addr::new(10, subnet, 0, 1),
            directory,
            children: Vec::new(),
            taps: 0,
            racks: Vec::new(),
            servers: Vec::new(),
        };
        let ns = lab.namespace.clone();
        let bridge = lab.bridge.clone();
        run("ip", &["-n", &ns, "link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/{prefix_length}", lab.server_address),
                "dev",
                &bridge,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("fd00:{subnet}::1/64"),
                "dev",
                &bridge,
                "nodad",
            ],
        )?;
        run("ip", &["-n", &ns, "link", "set", &bridge, "up"])?;
        // Router advertisements only: dnsmasq with no DHCPv4 range and no DNS.
        let pid_file = lab.directory.join("ra.pid");
        lab.spawn(
            "router-advertisements",
            "dnsmasq",
            &[
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                &format!("--interface={bridge}"),
                "--bind-interfaces",
                "--enable-ra",
                &format!("--dhcp-range=fd00:{subnet}::,ra-only"),
                &format!("--pid-file={}", pid_file.display()),
            ],
            &[],
        )?;
        Ok(lab)
    }

    /// Starts `program` in the namespace, output to `<name>.log`; killed when the lab drops.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &str,
        args: &[&str],
        environment: &[(&str, &str)],
    ) -> Result<(), LabError> {
        let namespace = self.namespace.clone();
        self.spawn_in(&namespace, name, program, args, environment)
    }

    /// As `spawn`, in `namespace` (one of the lab's).
    fn spawn_in(
        &mut self,
        namespace: &str,
        name: &str,
        program: &str,
        args: &[&str],
        environment: &[(&str, &str)],
    ) -> Result<(), LabError> {
        let log_path = self.directory.join(format!("{name}.log"));
        let log = File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
        let log_copy = log.try_clone().map_err(io("log"))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", namespace, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_copy)
            .stderr(log);
        for (key, value) in environment {
            command.env(key, value);
        }
        let child = command.spawn().map_err(io(format!("start {program}")))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Kills the process started as `name` (SIGKILL) and waits for it.
    pub fn kill(&mut self, name: &str) {
        if let Some(position) = self.children.iter().position(|(child, _)| child == name) {
            let (_, mut child) = self.children.remove(position);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A process's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.directory.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts `bootmesh serve` (the binary at `bootmesh`) with `config`; waits until it serves.
    pub fn serve(&mut self, name: &str, bootmesh: &Path, config: &str) -> Result<(), LabError> {
        let namespace = self.namespace.clone();
        self.serve_in_namespace(&namespace, name, bootmesh, config)
    }

    fn serve_in_namespace(
        &mut self,
        namespace: &str,
        name: &str,
        bootmesh: &Path,
        config: &str,
    ) -> Result<(), LabError> {
        let config_path = self.directory.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).map_err(io("write the server config"))?;
        self.spawn_in(
            namespace,
            name,
            &bootmesh.display().to_string(),
            &["serve", "--config", &config_path.display().to_string()],
            &[],
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let log = self.log(name);
            if log.contains("bootmesh serving") {
                return Ok(());
            }
            if log.contains("Error") || log.contains("ERROR") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LabError::Command {
            command: format!("bootmesh serve ({name})"),
            detail: format!("did not start:\n{}", self.log(name)),
        })
    }

    /// Makes rack `rack` (1-200) behind a relay: namespace `<prefix>-r<rack>` routing between
    /// an uplink on the lab's bridge (`10.<subnet>.0.<200 + rack>`) and the rack's bridge
    /// (`10.<subnet>.<rack>.1/24`), running `dhcrelay` towards the lab's server; the lab's
    /// namespace routes `10.<subnet>.<rack>.0/24` through it. The server needs a DHCP subnet
    /// for it (`routers` = the router's address) to answer the rack's nodes.
    pub fn add_relayed_rack(&mut self, rack: u8) -> Result<RelayedRack, LabError> {
        if !on_path("dhcrelay") {
            return Err(LabError::Missing {
                program: "dhcrelay",
                package: "isc-dhcp-relay",
            });
        }
        let [_, subnet, _, _] = self.server_address.octets();
        let namespace = format!("{}-r{rack}", self.namespace);
        let uplink_outside = format!("{}-u{rack}", self.namespace);
        let rack_state = RelayedRack {
            namespace: namespace.clone(),
            bridge: "rack".into(),
            router_address: Ipv4Addr::new(10, subnet, rack, 1),
            uplink_address: Ipv4Addr::new(10, subnet, 0, 200u8.saturating_add(rack)),
        };
        fresh_namespace(&namespace)?;
        self.racks.push(rack_state.clone());
        self.cable_to_bridge(
            &uplink_outside,
            &namespace,
            "uplink",
            rack_state.uplink_address,
        )?;
        let lab = self.namespace.clone();
        let router = format!("{}/24", rack_state.router_address);
        let route = format!("10.{subnet}.{rack}.0/24");
        let via = rack_state.uplink_address.to_string();
        let commands: [&[&str]; 5] = [
            &["-n", &namespace, "link", "add", "rack", "type", "bridge"],
            &["-n", &namespace, "addr", "add", &router, "dev", "rack"],
            &["-n", &namespace, "link", "set", "rack", "up"],
            &["-n", &lab, "route", "add", &route, "via", &via],
            &[
                "netns",
                "exec",
                &namespace,
                "sysctl",
                "-q",
                "net.ipv4.ip_forward=1",
            ],
        ];
        for command in commands {
            run("ip", command)?;
        }
        // `-d` keeps it in the foreground (a child of the lab); it logs each forwarded packet.
        let server = self.server_address.to_string();
        self.spawn_in(
            &namespace,
            &format!("relay-r{rack}"),
            "dhcrelay",
            &["-4", "-d", "-id", "rack", "-iu", "uplink", &server],
            &[],
        )?;
        Ok(rack_state)
    }

    /// Starts a VM on a new tap on the lab's bridge.
    pub fn start_vm(&mut self, spec: &VmSpec) -> Result<Vm, LabError> {
        let namespace = self.namespace.clone();
        let bridge = self.bridge.clone();
        self.start_vm_on(&namespace, &bridge, spec)
    }

    /// Starts a VM on a new tap on `rack`'s bridge, behind its router and relay.
    pub fn start_vm_in_rack(&mut self, rack: &RelayedRack, spec: &VmSpec) -> Result<Vm, LabError> {
        self.start_vm_on(&rack.namespace, &rack.bridge, spec)
    }

    fn start_vm_on(&mut self, ns: &str, bridge: &str, spec: &VmSpec) -> Result<Vm, LabError> {
        let tap = format!("{}-t{}", self.namespace, self.taps);
        self.taps += 1;
        let ns = ns.to_owned();
        run(
            "ip",
            &["-n", &ns, "tuntap", "add", "dev", &tap, "mode", "tap"],
        )?;
        run("ip", &["-n", &ns, "link", "set", &tap, "master", bridge])?;
        run("ip", &["-n", &ns, "link", "set", &tap, "up"])?;
        let serial_path = self.directory.join(format!("{}.serial.log", spec.name));
        let _ = std::fs::remove_file(&serial_path);
        let mac = spec
            .mac
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            ns.clone(),
            "qemu-system-x86_64".into(),
            "-accel".into(),
            Accelerator::detect().as_str().into(),
            "-m".into(),
            spec.memory_mib.to_string(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", serial_path.display()),
            "-no-reboot".into(),
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=n0,mac={mac},bootindex=1{}",
                // An empty romfile leaves the NIC without its iPXE option ROM.
                if matches!(spec.firmware, Firmware::UefiNativePxe | Firmware::UefiHttp) {
                    ",romfile="
                } else {
                    ""
                }
            ),
        ];
        match spec.firmware {
            Firmware::Bios => args.extend(["-boot".into(), "n".into()]),
            Firmware::Uefi | Firmware::UefiNativePxe | Firmware::UefiHttp => {
                let variables = self.directory.join(format!("{}.OVMF_VARS.fd", spec.name));
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &variables)
                    .map_err(io("copy the UEFI variables"))?;
                args.extend([
                    "-machine".into(),
                    "q35".into(),
                    "-drive".into(),
                    "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                    "-drive".into(),
                    format!("if=pflash,format=raw,file={}", variables.display()),
                    // Skips OVMF's IPv6 boot attempts, which wait for timeouts first.
                    "-fw_cfg".into(),
                    "name=opt/org.tianocore/IPv6Support,string=no".into(),
                ]);
                if spec.firmware == Firmware::UefiHttp {
                    // Without PXE, OVMF's boot manager goes on to its HTTPv4 entry.
                    args.extend([
                        "-fw_cfg".into(),
                        "name=opt/org.tianocore/IPv4PXESupport,string=no".into(),
                    ]);
                }
            }
        }
        let log_path = self.directory.join(format!("{}.qemu.log", spec.name));
        let log = File::create(&log_path).map_err(io("qemu log"))?;
        let log_copy = log.try_clone().map_err(io("qemu log"))?;
        let started = Instant::now();
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log_copy)
            .stderr(log)
            .spawn()
            .map_err(io("start qemu"))?;
        Ok(Vm {
            name: spec.name.clone(),
            started,
            serial_path,
            tap,
            namespace: ns,
            child,
        })
    }
}

impl Drop for BootLab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let others = self.racks.iter().map(|rack| &rack.namespace);
        for namespace in others.chain(self.servers.iter().map(|server| &server.namespace)) {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .stderr(Stdio::null())
            .status();
    }
}

/// A Debian kernel unpacked from its package: its version and the unpacked tree.
#[derive(Debug, Clone)]
pub struct DebianKernel {
    /// `6.1.0-57-amd64`.
    pub version: String,
    /// The unpacked package (`boot/`, `lib/modules/`).
    pub root: PathBuf,
}

fn download_package(cache: &Path, package: &str) -> Result<PathBuf, LabError> {
    let find = |cache: &Path| -> Option<PathBuf> {
        std::fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| {
                        name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
                    })
            })
    };
    if let Some(found) = find(cache) {
        return Ok(found);
    }
    let output = Command::new("apt-get")
        .args(["download", package])
        .current_dir(cache)
        .stdin(Stdio::null())
        .output()
        .map_err(io("run apt-get download"))?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: format!("apt-get download {package}"),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    find(cache).ok_or_else(|| LabError::Command {
        command: format!("apt-get download {package}"),
        detail: "no .deb appeared".into(),
    })
}

/// The kernel that `linux-image-amd64` names, downloaded into `cache` (once) and unpacked.
pub fn prepare_kernel(cache: &Path) -> Result<DebianKernel, LabError> {
    std::fs::create_dir_all(cache).map_err(io("kernel cache"))?;
    let output = run("apt-cache", &["depends", "linux-image-amd64"])?;
    let package = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.trim().strip_prefix("Depends: ").map(str::to_owned))
        .filter(|name| name.starts_with("linux-image-"))
        .ok_or_else(|| LabError::Command {
            command: "apt-cache depends linux-image-amd64".into(),
            detail: "names no kernel package".into(),
        })?;
    let version = package.trim_start_matches("linux-image-").to_owned();
    let root = cache.join(format!("kernel-{version}"));
    if !root
        .join("boot")
        .join(format!("vmlinuz-{version}"))
        .is_file()
    {
        let deb = download_package(cache, &package)?;
        let staging = cache.join(format!("kernel-{version}.partial"));
        let _ = std::fs::remove_dir_all(&staging);
        run(
            "dpkg",
            &[
                "-x",
                &deb.display().to_string(),
                &staging.display().to_string(),
            ],
        )?;
        std::fs::rename(&staging, &root).map_err(io("keep the unpacked kernel"))?;
    }
    Ok(DebianKernel { version, root })
}

/// The module directories an image needs for the bootmesh initramfs (and nothing else: a
/// distribution kernel's full set is 400 MB).
pub const IMAGE_MODULE_DIRECTORIES: &[&str] = &[
    "kernel/drivers/block",
    "kernel/drivers/md",
    "kernel/drivers/virtio",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/ethernet/intel/e1000",
    "kernel/net/core",
    "kernel/fs/squashfs",
    "kernel/fs/overlayfs",
    "kernel/lib/reed_solomon",
];

/// Copies `kernel`'s vmlinuz and the modules the initramfs needs into `tree`.
pub fn add_kernel_to_tree(kernel: &DebianKernel, tree: &Path) -> Result<(), LabError> {
    let boot = tree.join("boot");
    std::fs::create_dir_all(&boot).map_err(io("mkdir boot"))?;
    let vmlinuz = format!("vmlinuz-{}", kernel.version);
    std::fs::copy(kernel.root.join("boot").join(&vmlinuz), boot.join(&vmlinuz))
        .map_err(io("copy the kernel"))?;
    let source = kernel.root.join("lib/modules").join(&kernel.version);
    // Merged /usr: lib is a link to usr/lib in Debian images.
    let target = if tree.join("usr/lib").is_dir() {
        tree.join("usr/lib/modules").join(&kernel.version)
    } else {
        tree.join("lib/modules").join(&kernel.version)
    };
    std::fs::create_dir_all(&target).map_err(io("mkdir modules"))?;
    for name in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let from = source.join(name);
        if from.is_file() {
            std::fs::copy(&from, target.join(name)).map_err(io(format!("copy {name}")))?;
        }
    }
    for relative in IMAGE_MODULE_DIRECTORIES {
        let parent = Path::new(relative).parent().unwrap_or(Path::new(""));
        let destination = target.join(parent);
        std::fs::create_dir_all(&destination).map_err(io("mkdir module directory"))?;
        run(
            "cp",
            &[
                "-a",
                &source.join(relative).display().to_string(),
                &destination.display().to_string(),
            ],
        )?;
    }
    Ok(())
}

/// The static busybox of Debian's `busybox-static` package, downloaded and unpacked into
/// `cache` once.
pub fn static_busybox(cache: &Path) -> Result<PathBuf, LabError> {
    let deb = download_package(cache, "busybox-static")?;
    let unpacked = cache.join("busybox-static");
    if !unpacked.join("bin/busybox").is_file() {
        let _ = std::fs::remove_dir_all(&unpacked);
        run(
            "dpkg",
            &[
                "-x",
                &deb.display().to_string(),
                &unpacked.display().to_string(),
            ],
        )?;
    }
    Ok(unpacked.join("bin/busybox"))
}

/// A busybox image (from the `busybox-static` package) with `kernel` and `init_script` as
/// `/sbin/init`, built at `tree`.
pub fn busybox_image_tree(
    cache: &Path,
    kernel: &DebianKernel,
    tree: &Path,
    init_script: &str,
) -> Result<(), LabError> {
    let busybox = static_busybox(cache)?;
    let _ = std::fs::remove_dir_all(tree);
    for directory in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root",
    ] {
        std::fs::create_dir_all(tree.join(directory)).map_err(io("mkdir image tree"))?;
    }
    std::fs::copy(&busybox, tree.join("bin/busybox")).map_err(io("copy busybox"))?;
    for applet in [
        "sh",
        "mount",
        "echo",
        "cat",
        "hostname",
        "poweroff",
        "sleep",
        "ls",
        "uname",
        "grep",
        "reboot",
        "dd",
        "sha256sum",
        "tr",
        "head",
        "ip",
        "dmesg",
        "wget",
        "cut",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))
            .map_err(io("busybox applet link"))?;
    }
    std::fs::write(tree.join("etc/fstab"), "# busybox image\n").map_err(io("fstab"))?;
    let init = tree.join("sbin/init");
    std::fs::write(&init, init_script).map_err(io("write /sbin/init"))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(io("chmod init"))?;
    add_kernel_to_tree(kernel, tree)
}

/// The static agent to put in the bootmesh initramfs: `BOOTMESH_AGENT`, else this executable
/// when it is static, else `bootmesh-agent` beside it.
pub fn find_agent() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BOOTMESH_AGENT") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let is_static = std::fs::read(&exe)
        .ok()
        .and_then(|bytes| crate::initramfs_builder::is_static_elf(&bytes))
        == Some(true);
    if is_static {
        return Some(exe);
    }
    let beside = exe.with_file_name("bootmesh-agent");
    beside.is_file().then_some(beside)
}
