//! The documentation's commands run as they are written: every block of `docs/*.md` fenced as
//! ```` ```sh tested ```` is run, the blocks of one page in order in one shell (`bash -e`, so
//! the first command that fails fails the test), in a scratch directory, with the `bootmesh`
//! under test first on PATH and `BOOTMESH_STATE_DIR` pointing into the scratch directory. A page
//! may need inputs an operator would have (an image archive); they are made here before its
//! blocks run, and the page says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lab;

fn docs_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// The `sh tested` blocks of a Markdown page, in order.
fn tested_blocks(page: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match current.as_mut() {
            None if line.trim_end() == "```sh tested" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed ```sh tested block");
    blocks
}

/// A root tarball such as `docker build` + export would give: a kernel and an initrd in
/// `/boot`, and a version file that differs between versions.
fn write_root_tarball(scratch: &Path, version: &str) {
    let root = scratch.join(format!("root-{version}"));
    std::fs::create_dir_all(root.join("boot")).expect("boot");
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    std::fs::write(
        root.join("boot/vmlinuz-6.1.0-1-amd64"),
        format!("kernel of {version}\n").repeat(4096),
    )
    .expect("kernel");
    std::fs::write(
        root.join("boot/initrd.img-6.1.0-1-amd64"),
        format!("initrd of {version}\n").repeat(4096),
    )
    .expect("initrd");
    std::fs::write(root.join("etc/node-version"), format!("{version}\n")).expect("version");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(scratch.join(format!("node-{version}.tar")))
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success(), "tar of {version}");
}

/// Where a page that adds addresses and runs servers runs.
#[derive(Clone, Copy)]
enum PageNetwork {
    /// In a network namespace made for it.
    OwnNamespace,
    /// In the namespaces its blocks make (a page that shows a network of several machines),
    /// named here so that they are removed afterwards with whatever the page left running,
    /// and beforehand if an interrupted run left them behind.
    NamespacesItMakes(&'static [&'static str]),
}

/// The pages that need the network lab (`BOOTMESH_NETNS_TESTS=1`).
const PAGES_IN_THE_LAB: &[(&str, PageNetwork)] = &[
    ("first-cluster.md", PageNetwork::OwnNamespace),
    (
        "adding-a-rack.md",
        PageNetwork::NamespacesItMakes(&["bm-server", "bm-r2-router", "bm-r2-node"]),
    ),
];

/// Kills what is left running in `namespace`, then removes it.
fn remove_namespace(namespace: &str) {
    if let Ok(output) = Command::new("ip")
        .args(["netns", "pids", namespace])
        .output()
    {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", namespace])
        .stderr(std::process::Stdio::null())
        .status();
}

/// What a page needs before its blocks run.
fn prepare(page_name: &str, scratch: &Path) {
    // Pages quote the checkout's examples by their path in it.
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
        scratch.join("examples"),
    )
    .expect("examples in the scratch directory");
    if page_name == "adding-a-rack.md" {
        for program in ["dhcrelay", "udhcpc", "curl"] {
            lab::require_program(program);
        }
    }
    if page_name == "image-rollout.md" {
        lab::require_program("mksquashfs");
        write_root_tarball(scratch, "v1");
        write_root_tarball(scratch, "v2");
    }
    if page_name == "first-cluster.md" {
        lab::require_program("mksquashfs");
        write_root_tarball(scratch, "v1");
    }
}

#[test]
fn every_tested_block_of_the_docs_runs_as_written() {
    let binary = Path::new(env!("CARGO_BIN_EXE_bootmesh"));
    let binaries = binary.parent().expect("the binary's directory");
    let path = format!(
        "{}:{}",
        binaries.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut pages_run = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(docs_directory())
        .expect("docs/")
        .map(|entry| entry.expect("a docs entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "md"))
        .collect();
    entries.sort();
    for page_path in entries {
        let page = std::fs::read_to_string(&page_path).expect("a page");
        let blocks = tested_blocks(&page);
        if blocks.is_empty() {
            continue;
        }
        let page_name = page_path
            .file_name()
            .and_then(|name| name.to_str())
            .expect("a page name")
            .to_owned();
        // Pages that set up addresses and run servers run in network namespaces, removed
        // afterwards with whatever they left running.
        let network = PAGES_IN_THE_LAB
            .iter()
            .find(|(name, _)| *name == page_name)
            .map(|(_, network)| *network);
        if network.is_some() && !lab::enabled() {
            continue;
        }
        let namespaces: Vec<String> = match network {
            None => Vec::new(),
            Some(PageNetwork::OwnNamespace) => vec![format!("bmdocs{}", std::process::id())],
            Some(PageNetwork::NamespacesItMakes(names)) => {
                names.iter().map(|name| (*name).to_owned()).collect()
            }
        };
        for namespace in &namespaces {
            remove_namespace(namespace);
        }
        let scratch = tempfile::tempdir().expect("scratch");
        prepare(&page_name, scratch.path());
        let script = blocks.join("");
        let mut command = Command::new("timeout");
        command.args(["--signal=KILL", "300"]);
        if let Some(PageNetwork::OwnNamespace) = network {
            lab::run_checked("ip", &["netns", "add", &namespaces[0]]);
            command.args(["ip", "netns", "exec", &namespaces[0]]);
        }
        // Output goes to files, not pipes: a server that a failing page left running in the
        // background would hold a pipe open, and waiting for its end would wait for ever.
        let stdout_path = scratch.path().join("page.stdout");
        let stderr_path = scratch.path().join("page.stderr");
        let status = command
            .args(["bash", "-euo", "pipefail", "-c"])
            .arg(&script)
            .current_dir(scratch.path())
            .env("PATH", &path)
            .env("BOOTMESH_STATE_DIR", scratch.path().join("state"))
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .status()
            .expect("bash");
        for namespace in &namespaces {
            remove_namespace(namespace);
        }
        let output = std::process::Output {
            status,
            stdout: std::fs::read(&stdout_path).unwrap_or_default(),
            stderr: std::fs::read(&stderr_path).unwrap_or_default(),
        };
        assert!(
            output.status.success(),
            "docs/{page_name}: its commands failed\n{script}\n{}",
            lab::describe(&output)
        );
        eprintln!(
            "docs/{page_name}: {} tested blocks ran\n{}",
            blocks.len(),
            String::from_utf8_lossy(&output.stdout)
        );
        pages_run.push(page_name);
    }
    // The pages whose commands are known to be runnable here; a page that loses its tested
    // blocks by an editing slip fails here instead of passing silently.
    let mut expected = vec![
        "install.md",
        "failure-drills.md",
        "image-rollout.md",
        "migrating-from-ltsp.md",
    ];
    if lab::enabled() {
        expected.extend(PAGES_IN_THE_LAB.iter().map(|(name, _)| *name));
    }
    for expected in expected {
        assert!(
            pages_run.iter().any(|page| page == expected),
            "docs/{expected} has no tested blocks (ran: {pages_run:?})"
        );
    }
}

#[test]
fn tested_blocks_are_found_in_order_and_untested_ones_left_alone() {
    let page =
        "text\n```sh\nnot run\n```\n```sh tested\none\ntwo\n```\nmore\n```sh tested\nthree\n```\n";
    assert_eq!(tested_blocks(page), ["one\ntwo\n", "three\n"]);
}
