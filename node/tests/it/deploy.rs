//! What an operator deploys: the Kubernetes manifests pass the Kubernetes schemas and carry a
//! server configuration `check-config` accepts; the probes they name answer; the systemd unit
//! passes `systemd-analyze verify`; the shell completions parse.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::lab::{self, Lab};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn python_module_installed(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn the_kubernetes_manifests_pass_the_schemas_and_carry_a_valid_server_configuration() {
    if !lab::enabled() {
        return;
    }
    assert!(
        python_module_installed("kubernetes_validate"),
        "the PyPI package kubernetes-validate is not installed; .ci/run installs it"
    );
    let manifest = deploy("kubernetes/bootmesh.yaml");
    let validated = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&manifest)
        .output()
        .expect("kubernetes-validate");
    let report = lab::describe(&validated);
    assert!(validated.status.success(), "{report}");
    for kind in ["namespace", "configmap", "statefulset", "service"] {
        assert!(
            report.contains(&format!("passed for resource {kind}/")),
            "{report}"
        );
    }

    // The ConfigMap's server.toml is a configuration bootmesh accepts, and its bootstrap
    // script is valid shell.
    let scratch = tempfile::tempdir().expect("scratch");
    let server = scratch.path().join("server.toml");
    let bootstrap = scratch.path().join("bootstrap.sh");
    let extracted = Command::new("python3")
        .args([
            "-c",
            "import sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             data = [d for d in docs if d['kind'] == 'ConfigMap'][0]['data']\n\
             open(sys.argv[2], 'w').write(data['server.toml'])\n\
             open(sys.argv[3], 'w').write(data['bootstrap.sh'])\n",
        ])
        .arg(&manifest)
        .arg(&server)
        .arg(&bootstrap)
        .output()
        .expect("python3");
    assert!(extracted.status.success(), "{}", lab::describe(&extracted));
    let checked = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .args(["check-config", "--config"])
        .arg(&server)
        .output()
        .expect("check-config");
    assert!(checked.status.success(), "{}", lab::describe(&checked));
    let syntax = Command::new("sh")
        .arg("-n")
        .arg(&bootstrap)
        .output()
        .expect("sh -n");
    assert!(syntax.status.success(), "{}", lab::describe(&syntax));
    // The commands the script runs exist with the flags it passes.
    for (command, flags) in [
        ("init", &["--state-dir", "--address", "--rack"][..]),
        (
            "join",
            &["--state-dir", "--address", "--rack", "--token", "--server"][..],
        ),
    ] {
        let help = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
            .args(["cluster", command, "--help"])
            .output()
            .expect("help");
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in flags {
            assert!(
                help.contains(flag),
                "cluster {command} has no {flag}:\n{help}"
            );
        }
    }
}

/// The probes the manifest names: `/healthz` answers while the process runs, `/readyz` once
/// the server serves.
#[test]
fn the_liveness_and_readiness_probes_answer() {
    if !lab::enabled() {
        return;
    }
    let mut lab = Lab::new();
    let namespace = lab.namespace("probe");
    let config = format!(
        "state_dir = \"{state}\"\n[http]\nlisten = \"127.0.0.1:8080\"\nroot = \"{root}\"\n",
        state = lab.path("state").display(),
        root = lab.directory.path().display(),
    );
    lab.serve("server", &namespace, &config);
    let get = |path: &str| {
        let output = lab.run(
            &namespace,
            Duration::from_secs(10),
            "curl",
            &[
                "-s",
                "-w",
                " %{http_code}",
                &format!("http://127.0.0.1:8080{path}"),
            ],
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert_eq!(get("/healthz"), "ok\n 200");
    let ready = lab::wait_for(Duration::from_secs(10), || get("/readyz") == "ready\n 200");
    assert!(ready.is_some(), "{}", get("/readyz"));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("systemd-analyze");
    let unit = std::fs::read_to_string(deploy("systemd/bootmesh.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/bootmesh serve --config /etc/bootmesh/server.toml"));
    // verify checks that the commands exist: point them at the binary under test.
    let scratch = tempfile::tempdir().expect("scratch");
    let path = scratch.path().join("bootmesh.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/bootmesh", env!("CARGO_BIN_EXE_bootmesh")),
    )
    .expect("unit copy");
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    assert!(
        verified.status.success() && verified.stderr.is_empty(),
        "{}",
        lab::describe(&verified)
    );
}

#[test]
fn shell_completions_are_generated_and_parse() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let output = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
            .args(["completions", shell])
            .output()
            .expect("completions");
        assert!(
            output.status.success(),
            "{shell}: {}",
            lab::describe(&output)
        );
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains("import-ltsp"),
            "{shell} completes subcommands"
        );
    }
    let bash = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .args(["completions", "bash"])
        .output()
        .expect("completions");
    let scratch = tempfile::tempdir().expect("scratch");
    let script = scratch.path().join("bootmesh.bash");
    std::fs::write(&script, &bash.stdout).expect("script");
    let parsed = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash -n");
    assert!(parsed.status.success(), "{}", lab::describe(&parsed));
}
