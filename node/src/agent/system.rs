//! The agent as PID 1 of the initramfs: the early mounts, kernel modules, the overlay root, and
//! the hand-over to the image's init (`switch_root` done by hand: `pivot_root` cannot leave the
//! initramfs).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, mount, mount_move};

/// Why a system step failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// A mount failed.
    #[error("mount {what} on {target}: {source}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: String,
        /// The cause.
        source: rustix::io::Errno,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A kernel module would not load.
    #[error("module {path}: {source}")]
    Module {
        /// The module file.
        path: String,
        /// The cause.
        source: rustix::io::Errno,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SystemError {
    let what = what.into();
    move |source| SystemError::Io { what, source }
}

fn mount_error(what: &str, target: &Path) -> impl FnOnce(rustix::io::Errno) -> SystemError {
    let what = what.to_owned();
    let target = target.display().to_string();
    move |source| SystemError::Mount {
        what,
        target,
        source,
    }
}

/// Mounts `fstype` from `source` on `target` (made if missing).
pub fn mount_filesystem(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> Result<(), SystemError> {
    std::fs::create_dir_all(target).map_err(io(format!("mkdir {}", target.display())))?;
    let data = data
        .map(|text| {
            CString::new(text)
                .map_err(|_| io("mount data")(std::io::Error::other("NUL in mount options")))
        })
        .transpose()?;
    mount(source, target, fstype, flags, data.as_deref())
        .map_err(mount_error(&format!("{fstype} {source}"), target))
}

/// The kernel's virtual filesystems and a tmpfs `/run`, sized so that a root image in RAM
/// cannot take all memory by accident.
pub fn early_mounts() -> Result<(), SystemError> {
    let quiet = MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NODEV;
    mount_filesystem("proc", Path::new("/proc"), "proc", quiet, None)?;
    mount_filesystem("sysfs", Path::new("/sys"), "sysfs", quiet, None)?;
    mount_filesystem(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MountFlags::NOSUID,
        Some("mode=0755"),
    )?;
    mount_filesystem(
        "tmpfs",
        Path::new("/run"),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some("mode=0755,size=25%"),
    )?;
    Ok(())
}

/// Where the initramfs builder lists the modules to load, in order, one path per line
/// (relative to `/lib/modules/<version>`).
pub const MODULE_LIST_PATH: &str = "/etc/bootmesh/modules";

/// Loads the listed modules in order. A module that is already loaded, or built in, counts as
/// loaded; one that fails is reported and the rest still load (a NIC driver for hardware this
/// node lacks must not stop the boot).
pub fn load_modules() -> Result<usize, SystemError> {
    let list = match std::fs::read_to_string(MODULE_LIST_PATH) {
        Ok(list) => list,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(io(MODULE_LIST_PATH)(error)),
    };
    let release = rustix::system::uname();
    let release = release.release().to_string_lossy().into_owned();
    let base = PathBuf::from("/lib/modules").join(&release);
    let mut loaded = 0;
    for line in list.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let path = base.join(line);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(module = %path.display(), %error, "module missing");
                continue;
            }
        };
        match rustix::system::finit_module(file.as_fd(), c"", 0) {
            Ok(()) => loaded += 1,
            Err(rustix::io::Errno::EXIST) => {}
            Err(source) => {
                tracing::warn!(module = %path.display(), error = %source, "module did not load");
            }
        }
    }
    Ok(loaded)
}

/// Where the agent keeps its mounts; `/run` moves into the new root, so they stay visible there.
pub const AGENT_RUN_DIR: &str = "/run/bootmesh";
/// The new root, assembled before the switch.
pub const NEW_ROOT: &str = "/newroot";

/// Mounts the verified squashfs read-only and a tmpfs overlay over it on `/newroot`.
pub fn assemble_root(verified_device: &Path, overlay_size: &str) -> Result<(), SystemError> {
    let lower = Path::new(AGENT_RUN_DIR).join("lower");
    let overlay = Path::new(AGENT_RUN_DIR).join("overlay");
    mount_filesystem(
        &verified_device.display().to_string(),
        &lower,
        "squashfs",
        MountFlags::RDONLY,
        None,
    )?;
    mount_filesystem(
        "tmpfs",
        &overlay,
        "tmpfs",
        MountFlags::empty(),
        Some(&format!("mode=0755,size={overlay_size}")),
    )?;
    let upper = overlay.join("upper");
    let work = overlay.join("work");
    std::fs::create_dir_all(&upper).map_err(io("mkdir overlay upper"))?;
    std::fs::create_dir_all(&work).map_err(io("mkdir overlay work"))?;
    mount_filesystem(
        "overlay",
        Path::new(NEW_ROOT),
        "overlay",
        MountFlags::empty(),
        Some(&format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        )),
    )?;
    show_image_at_rofs(&lower);
    Ok(())
}

/// LTSP showed the read-only image at `/rofs`, and sites' commands rely on it (the LTSP
/// write-up mounts a disk over `/etc/ssh`, then copies the image's `/rofs/etc/ssh/*_config`
/// into it). The same squashfs, bound there: read-only, as its superblock is. A node boots
/// without it, so a failure is only reported.
fn show_image_at_rofs(lower: &Path) {
    let rofs = Path::new(NEW_ROOT).join("rofs");
    let bound = std::fs::create_dir_all(&rofs)
        .map_err(|error| error.to_string())
        .and_then(|()| rustix::mount::mount_bind(lower, &rofs).map_err(|error| error.to_string()));
    if let Err(error) = bound {
        tracing::warn!(%error, "the image is not shown at /rofs");
    }
}

/// Removes the initramfs's files (they are RAM the booted node would never get back), without
/// crossing into any mount.
fn remove_initramfs_contents(root_device: u64) {
    fn remove_under(directory: &Path, root_device: u64) {
        let Ok(entries) = std::fs::read_dir(directory) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if metadata.is_dir() {
                if std::os::unix::fs::MetadataExt::dev(&metadata) != root_device {
                    continue;
                }
                remove_under(&path, root_device);
                let _ = std::fs::remove_dir(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    remove_under(Path::new("/"), root_device);
}

/// Moves the kernel filesystems into the new root, frees the initramfs, makes the new root `/`
/// and execs `init` there; `companion` runs in a forked child that already sees the new root
/// (the agent's watcher). Returns only on failure.
pub fn switch_root(init: &str, companion: impl FnOnce()) -> SystemError {
    let new_root = Path::new(NEW_ROOT);
    for name in ["dev", "proc", "sys", "run"] {
        let source = Path::new("/").join(name);
        let target = new_root.join(name);
        if let Err(error) = std::fs::create_dir_all(&target) {
            return io(format!("mkdir {}", target.display()))(error);
        }
        if let Err(error) = mount_move(&source, &target) {
            return mount_error(&format!("move {}", source.display()), &target)(error);
        }
    }
    let root_device = match std::fs::metadata("/") {
        Ok(metadata) => std::os::unix::fs::MetadataExt::dev(&metadata),
        Err(error) => return io("stat /")(error),
    };
    remove_initramfs_contents(root_device);
    if let Err(error) = std::env::set_current_dir(new_root) {
        return io("chdir /newroot")(error);
    }
    if let Err(error) = mount_move(".", "/") {
        return mount_error("move /newroot", Path::new("/"))(error);
    }
    if let Err(error) = rustix::process::chroot(".") {
        return io("chroot")(error.into());
    }
    if let Err(error) = std::env::set_current_dir("/") {
        return io("chdir /")(error);
    }
    fork_companion(companion);
    let error = exec_init(init);
    io(format!("exec {init}"))(error)
}

/// Runs `companion` in a child process that outlives the exec of the image's init.
#[allow(unsafe_code)]
fn fork_companion(companion: impl FnOnce()) {
    // SAFETY: PID 1 is single-threaded here (the fetch runtime was dropped and joined its
    // threads), so the child inherits no lock held by another thread.
    let pid = unsafe { libc::fork() };
    match pid {
        0 => {
            companion();
            std::process::exit(0);
        }
        pid if pid < 0 => {
            tracing::warn!(error = %std::io::Error::last_os_error(), "no watcher: fork failed");
        }
        _ => {}
    }
}

fn exec_init(init: &str) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    // PID 1's environment is the kernel's; the image's init gets a clean, conventional one.
    std::process::Command::new(init)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("TERM", "linux")
        .exec()
}

/// Runs `command` with the image's `/bin/sh -c` chrooted into the new root, as lts.conf's
/// PREINIT commands run: before the image's init, with nothing of the image running yet.
pub fn run_in_new_root(command: &str) -> Result<std::process::ExitStatus, SystemError> {
    let mut child = std::process::Command::new("/bin/sh");
    child
        .arg("-c")
        .arg(command)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    chroot_before_exec(&mut child, Path::new(NEW_ROOT))
        .map_err(io(format!("PREINIT {command:?}")))?;
    child.status().map_err(io(format!("PREINIT {command:?}")))
}

#[allow(unsafe_code)]
fn chroot_before_exec(command: &mut std::process::Command, root: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    // Made before the fork: the child must not allocate (another thread may hold the
    // allocator's lock at fork time).
    let root = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("NUL in the root path"))?;
    // SAFETY: between fork and exec the closure makes only chroot(2) and chdir(2) calls, which
    // are async-signal-safe, on strings made before the fork.
    unsafe {
        command.pre_exec(move || {
            rustix::process::chroot(root.as_c_str())?;
            rustix::process::chdir(c"/")?;
            Ok(())
        });
    }
    Ok(())
}

/// Restarts the machine (through the firmware, so it PXE-boots again). PID 1 must never exit:
/// that panics the kernel.
pub fn reboot() -> ! {
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
