//! The seed's workflow for real: a Dockerfile built by buildah (no Docker engine, no registry:
//! the base is a busybox rootfs this test makes), pushed as a `docker save` archive and as an
//! OCI archive, each imported by `bootmesh image import`, from a file and from stdin.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::lab;

fn run(program: &str, args: &[&str], directory: &Path) -> Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(directory)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        lab::describe(&output)
    );
    output
}

/// buildah's global options that keep its storage in the test's `directory`, not in
/// /var/lib/containers.
fn buildah_storage(directory: &Path) -> Vec<String> {
    let path = |name: &str| directory.join(name).to_str().expect("utf-8").to_owned();
    vec![
        "--root".to_owned(),
        path("storage"),
        "--runroot".to_owned(),
        path("run"),
        "--storage-driver".to_owned(),
        "vfs".to_owned(),
    ]
}

/// A busybox rootfs with the shared libraries busybox needs (ldd tells which), as a tar.
fn busybox_rootfs_tar(directory: &Path) -> std::path::PathBuf {
    let rootfs = directory.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("bin");
    std::fs::create_dir_all(rootfs.join("tmp")).expect("tmp");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "mkdir", "echo", "rm", "ln", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("applet");
    }
    let ldd = run("ldd", &["/bin/busybox"], directory);
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let library = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(Path::new);
        if let Some(library) = library {
            let target = rootfs.join(library.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(target.parent().expect("parent")).expect("library dir");
            std::fs::copy(library, &target).expect("copy library");
        }
    }
    let tar = directory.join("rootfs.tar");
    run(
        "tar",
        &["-C", "rootfs", "-cf", "rootfs.tar", "."],
        directory,
    );
    tar
}

fn import(state: &Path, reference: &str, from: &str, stdin: Option<&Path>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bootmesh"));
    command
        .arg("image")
        .arg("--state-dir")
        .arg(state)
        .args(["import", reference, "--from", from]);
    match stdin {
        Some(path) => command.stdin(std::fs::File::open(path).expect("open archive")),
        None => command.stdin(Stdio::null()),
    };
    let output = command.output().expect("run bootmesh image import");
    assert!(
        output.status.success(),
        "import {reference}: {}",
        lab::describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn export_part(state: &Path, reference: &str, part: &str, output: &Path) {
    let output_argument = output.to_string_lossy().into_owned();
    let result = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .arg("image")
        .arg("--state-dir")
        .arg(state)
        .args(["export", reference, "--part", part, "-o", &output_argument])
        .output()
        .expect("run bootmesh image export");
    assert!(
        result.status.success(),
        "export {reference}: {}",
        lab::describe(&result)
    );
}

fn export_squashfs(state: &Path, reference: &str, output: &Path) -> Vec<u8> {
    export_part(state, reference, "squashfs", output);
    std::fs::read(output).expect("exported squashfs")
}

#[test]
fn a_dockerfile_built_by_buildah_imports_from_docker_and_oci_archives() {
    if !lab::enabled() {
        return;
    }
    for program in ["buildah", "mksquashfs", "unsquashfs", "ldd", "tar"] {
        lab::require_program(program);
    }
    let work = tempfile::tempdir().expect("work dir");
    let directory = work.path();
    busybox_rootfs_tar(directory);
    std::fs::write(
        directory.join("Dockerfile"),
        "FROM scratch\n\
         ADD rootfs.tar /\n\
         RUN mkdir -p /etc/bootmesh && echo 'built by buildah' > /etc/bootmesh/motd\n\
         RUN rm /bin/cat && ln -s busybox /bin/true\n",
    )
    .expect("Dockerfile");
    let storage = buildah_storage(directory);
    let with_storage = |args: &[&str]| -> Vec<String> {
        storage
            .iter()
            .cloned()
            .chain(args.iter().map(|arg| (*arg).to_owned()))
            .collect()
    };
    let call = |args: Vec<String>| {
        let borrowed: Vec<&str> = args.iter().map(String::as_str).collect();
        run("buildah", &borrowed, directory)
    };
    call(with_storage(&[
        "bud",
        "--isolation",
        "chroot",
        "--layers",
        "-t",
        "node-test",
        ".",
    ]));
    call(with_storage(&[
        "push",
        "node-test",
        "docker-archive:image-docker.tar",
    ]));
    call(with_storage(&[
        "push",
        "node-test",
        "oci-archive:image-oci.tar",
    ]));

    let state = directory.join("state");
    import(
        &state,
        "node:docker",
        &directory.join("image-docker.tar").to_string_lossy(),
        None,
    );
    import(
        &state,
        "node:oci",
        &directory.join("image-oci.tar").to_string_lossy(),
        None,
    );
    import(
        &state,
        "node:stdin",
        "-",
        Some(&directory.join("image-docker.tar")),
    );

    // Three ways in, one tree: the squashfs bytes are identical.
    let from_docker = export_squashfs(&state, "node:docker", &directory.join("docker.sqfs"));
    let from_oci = export_squashfs(&state, "node:oci", &directory.join("oci.sqfs"));
    let from_stdin = export_squashfs(&state, "node:stdin", &directory.join("stdin.sqfs"));
    assert!(
        from_docker == from_oci,
        "docker and OCI archives gave different trees"
    );
    assert!(
        from_docker == from_stdin,
        "stdin and file gave different trees"
    );

    // The RUN steps happened: a new file, a removed one, a new symlink.
    let listing = run("unsquashfs", &["-lls", "docker.sqfs"], directory);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("squashfs-root/etc/bootmesh/motd"),
        "{listing}"
    );
    assert!(!listing.contains("squashfs-root/bin/cat"), "{listing}");
    assert!(
        listing.contains("squashfs-root/bin/true -> busybox"),
        "{listing}"
    );
    let motd = run(
        "unsquashfs",
        &["-cat", "docker.sqfs", "etc/bootmesh/motd"],
        directory,
    );
    assert_eq!(String::from_utf8_lossy(&motd.stdout), "built by buildah\n");
}

/// The example node image (`examples/node-image/Dockerfile.debian`, the variant without the
/// Kubernetes packages that CI cannot download) built for real: a Debian base made by
/// mmdebstrap from the Debian mirror, buildah running the Dockerfile's apt-get steps, and
/// `image import` finding the Debian kernel and initrd in the image's /boot.
#[test]
fn the_example_node_image_builds_and_imports_with_its_kernel_and_initrd() {
    if !lab::enabled() {
        return;
    }
    for program in ["buildah", "mmdebstrap", "mksquashfs", "unsquashfs"] {
        lab::require_program(program);
    }
    let work = tempfile::tempdir().expect("work dir");
    let context = work.path().join("context");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node-image");
    run(
        "cp",
        &["-r", &example.to_string_lossy(), &context.to_string_lossy()],
        work.path(),
    );
    run(
        "mmdebstrap",
        &[
            "--quiet",
            "--variant=minbase",
            "--include=ca-certificates",
            "bookworm",
            "base.tar",
        ],
        &context,
    );
    let storage_root = work.path().join("storage");
    let run_root = work.path().join("run");
    let storage = format!(
        "--root={} --runroot={} --storage-driver=vfs",
        storage_root.display(),
        run_root.display()
    );
    let buildah = |arguments: &str| {
        let all: Vec<String> = storage
            .split(' ')
            .chain(arguments.split(' '))
            .map(str::to_owned)
            .collect();
        let borrowed: Vec<&str> = all.iter().map(String::as_str).collect();
        run("buildah", &borrowed, &context)
    };
    buildah("bud --isolation chroot -f Dockerfile.debian -t node-debian .");
    buildah("push node-debian docker-archive:node.tar");

    let state = work.path().join("state");
    let summary = import(
        &state,
        "node:debian",
        &context.join("node.tar").to_string_lossy(),
        None,
    );
    let size_mib = |label: &str| -> f64 {
        summary
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("no {label} in the summary:\n{summary}"))
    };
    assert!(
        size_mib("kernel") > 4.0,
        "the Debian kernel was not found:\n{summary}"
    );
    assert!(
        size_mib("initrd") > 4.0,
        "the Debian initrd was not found:\n{summary}"
    );

    // The kernel part is the image's own /boot/vmlinuz-*, byte for byte.
    export_part(
        &state,
        "node:debian",
        "squashfs",
        &work.path().join("root.sqfs"),
    );
    let listing = run("unsquashfs", &["-l", "root.sqfs"], work.path());
    let listing = String::from_utf8_lossy(&listing.stdout);
    let kernel_path = listing
        .lines()
        .find_map(|line| line.strip_prefix("squashfs-root/boot/vmlinuz-"))
        .map(|version| format!("boot/vmlinuz-{version}"))
        .expect("a kernel in /boot");
    let inside = run(
        "unsquashfs",
        &["-cat", "root.sqfs", &kernel_path],
        work.path(),
    );
    let kernel_export = work.path().join("kernel");
    let exported = Command::new(env!("CARGO_BIN_EXE_bootmesh"))
        .arg("image")
        .arg("--state-dir")
        .arg(&state)
        .args(["export", "node:debian", "--part", "kernel", "-o"])
        .arg(&kernel_export)
        .output()
        .expect("export kernel");
    assert!(
        exported.status.success(),
        "export kernel: {}",
        lab::describe(&exported)
    );
    lab::assert_file_bytes(&kernel_export, &inside.stdout);
    // systemd and containerd made it in; the agent unit from rootfs/ too.
    for path in [
        "squashfs-root/usr/lib/systemd/systemd",
        "squashfs-root/usr/bin/containerd",
        "squashfs-root/etc/systemd/system/bootmesh-agent.service",
    ] {
        assert!(
            listing.lines().any(|line| line == path),
            "{path} missing from the image"
        );
    }
}

/// bootmesh's own container image (`deploy/container/Dockerfile`, what the Kubernetes
/// manifests run) built by buildah from the static binary, a static busybox and iPXE; the
/// image runs `bootmesh`, has the shell its bootstrap script needs, and the iPXE files.
#[test]
fn the_bootmesh_container_image_builds_and_runs() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("buildah");
    let Some(agent) = std::env::var_os("BOOTMESH_AGENT").map(std::path::PathBuf::from) else {
        eprintln!("skipping: BOOTMESH_AGENT names no static bootmesh (.ci/run builds one)");
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let directory = work.path();
    let context = directory.join("context");
    std::fs::create_dir_all(context.join("ipxe")).expect("context");
    std::fs::copy(&agent, context.join("bootmesh")).expect("static bootmesh");
    let cache = std::env::var_os("BOOTMESH_TEST_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/tmp/bootmesh-test-cache"));
    std::fs::create_dir_all(&cache).expect("cache");
    let busybox = node::vmlab::static_busybox(&cache).expect("static busybox");
    std::fs::copy(busybox, context.join("busybox")).expect("busybox");
    for name in ["undionly.kpxe", "ipxe.efi", "snponly.efi"] {
        std::fs::copy(
            Path::new("/usr/lib/ipxe").join(name),
            context.join("ipxe").join(name),
        )
        .expect("ipxe");
    }
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/container/Dockerfile");
    let storage = buildah_storage(directory);
    let buildah = |args: &[&str]| -> String {
        let mut all: Vec<&str> = storage.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        String::from_utf8_lossy(&run("buildah", &all, directory).stdout).into_owned()
    };
    buildah(&[
        "bud",
        "--isolation",
        "chroot",
        "-f",
        dockerfile.to_str().expect("utf-8"),
        "-t",
        "bootmesh:test",
        context.to_str().expect("utf-8"),
    ]);
    let entrypoint = buildah(&[
        "inspect",
        "--format",
        "{{.OCIv1.Config.Entrypoint}}",
        "bootmesh:test",
    ]);
    assert_eq!(entrypoint.trim(), "[/usr/bin/bootmesh]");
    let container = buildah(&["from", "bootmesh:test"]);
    let container = container.trim();
    let version = buildah(&[
        "run",
        "--isolation",
        "chroot",
        container,
        "--",
        "/usr/bin/bootmesh",
        "--version",
    ]);
    assert!(version.starts_with("bootmesh "), "{version}");
    let listing = buildah(&[
        "run",
        "--isolation",
        "chroot",
        container,
        "--",
        "/bin/sh",
        "-c",
        "ls /usr/lib/bootmesh/ipxe && test -d /var/lib/bootmesh && echo state-dir",
    ]);
    for expected in ["undionly.kpxe", "ipxe.efi", "snponly.efi", "state-dir"] {
        assert!(listing.contains(expected), "{expected} in {listing}");
    }
}
