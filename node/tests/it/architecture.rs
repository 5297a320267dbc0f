//! Architecture invariants, checked on the real dependency graph.

use std::process::Command;

/// Crates that would let a protocol core do I/O or depend on a runtime.
const FORBIDDEN_IN_CORES: &[&str] = &["tokio", "mio", "socket2", "async-std", "smol", "nix"];

fn normal_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn boot_services_has_no_runtime_or_socket_dependency() {
    let dependencies = normal_dependencies("boot-services");
    assert!(
        dependencies.iter().any(|name| name == "dhcproto"),
        "cargo tree output looks wrong: {dependencies:?}"
    );
    for forbidden in FORBIDDEN_IN_CORES {
        assert!(
            !dependencies.iter().any(|name| name == forbidden),
            "boot-services depends on {forbidden}: {dependencies:?}"
        );
    }
}
