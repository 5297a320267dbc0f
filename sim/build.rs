//! Records the commit the simulator is built from, so a soak log line says which code survived
//! its seeds. Outside a git checkout (a source tarball) the commit is "unknown".

use std::process::Command;

fn main() {
    // Rebuild when HEAD moves: a checkout of another branch, or a commit on this one.
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    println!("cargo:rerun-if-changed=../.git/packed-refs");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BOOTMESH_SIM_COMMIT={commit}");
}
