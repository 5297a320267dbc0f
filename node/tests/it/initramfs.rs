//! Initramfs archives as cpio(1) reads them: GNU cpio lists and unpacks what `CpioWriter`
//! wrote, with the modes, device numbers, links and bytes it was given.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;

use node::initramfs::CpioWriter;

use crate::lab;

#[test]
fn gnu_cpio_unpacks_what_the_writer_wrote() {
    if !lab::enabled() {
        return;
    }
    lab::require_program("cpio");
    let module = lab::deterministic_bytes(0x6b6f, 300_001);
    let mut writer = CpioWriter::new(Vec::new());
    writer
        .character_device("dev/console", 0o600, 5, 1)
        .expect("console");
    writer.file("init", 0o755, b"#!/bin/sh\n").expect("init");
    writer
        .file(
            "lib/modules/6.1.0-1-amd64/kernel/drivers/block/nbd.ko",
            0o644,
            &module,
        )
        .expect("module");
    writer.symlink("sbin/init", "../init").expect("symlink");
    writer.directory("proc", 0o555).expect("proc");
    let archive = writer.finish().expect("finish");

    let directory = tempfile::tempdir().expect("tempdir");
    std::fs::write(directory.path().join("initrd.cpio"), &archive).expect("write archive");
    let unpack = directory.path().join("root");
    std::fs::create_dir(&unpack).expect("root");
    let output = Command::new("sh")
        .arg("-c")
        .arg("cpio -idm --quiet --no-absolute-filenames < ../initrd.cpio")
        .current_dir(&unpack)
        .output()
        .expect("run cpio");
    assert!(output.status.success(), "cpio: {}", lab::describe(&output));

    let console = std::fs::symlink_metadata(unpack.join("dev/console")).expect("console");
    assert!(console.file_type().is_char_device());
    assert_eq!(console.rdev(), libc::makedev(5, 1));
    assert_eq!(console.permissions().mode() & 0o7777, 0o600);
    let init = std::fs::metadata(unpack.join("init")).expect("init");
    assert_eq!(init.permissions().mode() & 0o7777, 0o755);
    lab::assert_file_bytes(
        &unpack.join("lib/modules/6.1.0-1-amd64/kernel/drivers/block/nbd.ko"),
        &module,
    );
    assert_eq!(
        std::fs::read_link(unpack.join("sbin/init")).expect("link"),
        std::path::Path::new("../init")
    );
    let proc_directory = std::fs::metadata(unpack.join("proc")).expect("proc");
    assert!(proc_directory.is_dir());
    assert_eq!(proc_directory.permissions().mode() & 0o7777, 0o555);
    assert_eq!(init.uid(), 0);
}
