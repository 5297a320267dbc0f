//! `bootmesh config import-ltsp` as an operator runs it: the report on standard error names
//! each line it did not carry over, the result passes `check-config` once merged into a
//! server's file, and `--strict` writes nothing when a line is not converted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/ltsp")
        .join(name)
}

fn bootmesh(arguments: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .args(arguments)
        .output()
        .expect("run bootmesh")
}

#[test]
fn import_ltsp_converts_the_example_site_and_reports_line_by_line() {
    let scratch = tempfile::tempdir().expect("scratch");
    let fleet = scratch.path().join("fleet.toml");
    let dhcpd = example("dhcpd.conf");
    let lts = example("lts.conf");
    let output = bootmesh(&[
        "config".as_ref(),
        "import-ltsp".as_ref(),
        "--dhcpd-conf".as_ref(),
        dhcpd.as_os_str(),
        "--lts-conf".as_ref(),
        lts.as_os_str(),
        "--output".as_ref(),
        fleet.as_os_str(),
    ]);
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert!(output.stdout.is_empty(), "the result went to --output");
    let dhcpd_name = dhcpd.display().to_string();
    let lts_name = lts.display().to_string();
    for expected in [
        format!("{dhcpd_name}:1: changed: `shared-network ltsp-network {{`"),
        format!("{dhcpd_name}:9: changed: `next-server ltsp-1;`"),
        format!("{lts_name}:16: warning: `RCFILE_07_JOIN_K8S=kubeadm join"),
        "0 line(s) not converted, 5 changed".to_owned(),
    ] {
        assert!(report.contains(&expected), "{expected:?} in\n{report}");
    }

    // Merged into a server's own file (interfaces, listeners), it is a valid configuration.
    let server = scratch.path().join("server.toml");
    let fleet_text = std::fs::read_to_string(&fleet).expect("fleet.toml");
    std::fs::write(
        &server,
        format!(
            "state_dir = \"{}\"\n[dhcp]\ninterfaces = [\"eth0\"]\n[http]\nlisten = \
             \"0.0.0.0:8080\"\nroot = \"/srv\"\n{fleet_text}",
            scratch.path().display()
        ),
    )
    .expect("server.toml");
    let checked = bootmesh(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        server.as_os_str(),
    ]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // A site with a line bootmesh cannot express: --strict refuses and writes nothing.
    let site = scratch.path().join("site-dhcpd.conf");
    std::fs::write(
        &site,
        "subnet 10.9.0.0 netmask 255.255.0.0 {\n  range 10.9.1.0 10.9.1.255;\n  option ntp-servers 10.9.0.1;\n}\n",
    )
    .expect("site");
    let strict_output = scratch.path().join("strict.toml");
    let strict = bootmesh(&[
        "config".as_ref(),
        "import-ltsp".as_ref(),
        "--dhcpd-conf".as_ref(),
        site.as_os_str(),
        "--strict".as_ref(),
        "-o".as_ref(),
        strict_output.as_os_str(),
    ]);
    let strict_report = String::from_utf8_lossy(&strict.stderr);
    assert_eq!(strict.status.code(), Some(3), "{strict_report}");
    assert!(strict_report.contains(":3: not converted: `option ntp-servers 10.9.0.1;`"));
    assert!(!strict_output.exists());

    let neither = bootmesh(&["config".as_ref(), "import-ltsp".as_ref()]);
    assert!(!neither.status.success());
    assert!(String::from_utf8_lossy(&neither.stderr).contains("--dhcpd-conf"));
}
