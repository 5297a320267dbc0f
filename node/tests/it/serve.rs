//! The `bootmesh` command itself: configuration errors and a clean stop on SIGTERM.

use std::process::Command;
use std::time::Duration;

use crate::lab::{self, Lab};

#[test]
fn check_config_names_the_line_and_the_reason() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("bad.toml");
    std::fs::write(&path, "state_dir = \"/tmp/x\"\n\n[tftp]\nlisten = \"0.0.0.0:69\"\nroot = \"/srv\"\nblocksize = 1468\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("line 6") && message.contains("unknown field `blocksize`"),
        "{message}"
    );

    std::fs::write(&path, "state_dir = \"/tmp/x\"\n[dhcp]\ninterfaces = [\"eth9\"]\n[[dhcp.subnet]]\ncidr = \"10.0.0.0/24\"\nranges = [\"10.0.1.1-10.0.1.9\"]\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("dhcp.subnet[0].ranges[0]") && message.contains("not inside"),
        "{message}"
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    if !lab::enabled() {
        return;
    }
    let mut lab = Lab::new();
    let server_namespace = lab.namespace("srv");
    let client_namespace = lab.namespace("cli");
    let (server_interface, _) = lab.veth("t", &server_namespace, &client_namespace);
    lab.add_address(&server_namespace, &server_interface, "10.76.0.1/24");
    std::fs::write(lab.path("image"), vec![7u8; 4096]).unwrap();
    let config = format!(
        "state_dir = \"{state}\"\n[dhcp]\ninterfaces = [\"{server_interface}\"]\n[[dhcp.subnet]]\ncidr = \"10.76.0.0/24\"\nranges = [\"10.76.0.10-10.76.0.20\"]\n\
         [tftp]\nlisten = \"0.0.0.0:69\"\nroot = \"{root}\"\n[http]\nlisten = \"0.0.0.0:8080\"\nroot = \"{root}\"\n\
         [nbd]\nlisten = \"0.0.0.0:10809\"\n[[nbd.export]]\nname = \"root\"\npath = \"{image}\"\n",
        state = lab.path("state").display(),
        root = lab.directory.path().display(),
        image = lab.path("image").display(),
    );
    lab.serve("server", &server_namespace, &config);
    let status = lab
        .terminate_and_wait("server", Duration::from_secs(15))
        .expect("server exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        lab.log("server")
    );
    assert!(
        lab.log("server").contains("stopping services"),
        "{}",
        lab.log("server")
    );
}
