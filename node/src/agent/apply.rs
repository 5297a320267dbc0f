//! Applies the node plan to the assembled root (the overlay's upper layer takes every write):
//! hostname, fstab lines, the RCFILE unit, masked services, secrets, and a record of the boot
//! for the booted system.

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

use crate::plan::{MASKED_BY_DEFAULT, NodePlan, NodeSecrets, is_valid_secret_name, node_lts_conf};

/// Why the plan could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ApplyError {
    what: String,
    source: std::io::Error,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApplyError {
    let what = what.into();
    move |source| ApplyError { what, source }
}

/// The unit that runs the RCFILE commands once the system is up.
pub const RCFILE_UNIT: &str = "bootmesh-rcfile.service";
/// The script it runs.
pub const RCFILE_SCRIPT: &str = "/etc/bootmesh/rcfile.sh";
/// Where secrets land in the booted system (a tmpfs: they never touch a disk).
pub const SECRETS_DIR: &str = "/run/bootmesh/secrets";

fn write_file(root: &Path, path: &str, contents: &str, mode: u32) -> Result<(), ApplyError> {
    let full = root.join(path.trim_start_matches('/'));
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
    }
    // A symlink left in the image must not redirect our write elsewhere.
    let _ = std::fs::remove_file(&full);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&full)
        .map_err(io(format!("create {path}")))?;
    file.write_all(contents.as_bytes())
        .map_err(io(format!("write {path}")))?;
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {path}")))
}

/// The units to mask: the defaults minus what the plan keeps.
pub fn units_to_mask(plan: &NodePlan) -> Vec<&'static str> {
    MASKED_BY_DEFAULT
        .iter()
        .copied()
        .filter(|unit| {
            !plan
                .keep_system_services
                .iter()
                .any(|kept| kept == unit || kept.trim_end_matches(".service") == *unit)
        })
        .collect()
}

/// The unit that tells the agent's companion the system is up: once multi-user.target is
/// reached (after the RCFILE unit, which the target orders before itself), it leaves a marker
/// in `/run/bootmesh`, and the companion reports the boot complete.
pub const BOOTED_UNIT: &str = "bootmesh-booted.service";

fn booted_unit() -> String {
    format!(
        "[Unit]\n\
         Description=bootmesh: tell the boot servers this node has booted\n\
         After=multi-user.target\n\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/bin/sh -c ': > {}/{}'\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        super::system::AGENT_RUN_DIR,
        super::report::BOOTED_MARKER,
    )
}

/// Writes `unit` into the root's /etc/systemd/system and makes multi-user.target want it.
fn enable_unit(root: &Path, unit: &str, contents: &str) -> Result<(), ApplyError> {
    write_file(
        root,
        &format!("/etc/systemd/system/{unit}"),
        contents,
        0o644,
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).map_err(io("mkdir multi-user.target.wants"))?;
    let link = wants.join(unit);
    let _ = std::fs::remove_file(&link);
    symlink(format!("/etc/systemd/system/{unit}"), &link).map_err(io(format!("enable {unit}")))
}

/// The RCFILE unit: runs after the system is up, once per boot.
fn rcfile_unit() -> String {
    format!(
        "[Unit]\n\
         Description=bootmesh RCFILE commands of this node's group and host\n\
         After=network-online.target\n\
         Wants=network-online.target\n\n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/bin/sh -e {RCFILE_SCRIPT}\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The RCFILE script, run by `sh -e`: like LTSP's rc.local it stops at the first command that
/// fails, and its exit trap says which one that was, on the console (`/dev/kmsg`, at error
/// level) and in the unit's journal, so a failed `kubeadm join` is seen, not guessed at. The
/// boot goes on either way: the unit is wanted, not required, by multi-user.target.
fn rcfile_script(commands: &[String]) -> String {
    let mut script = String::from(
        "# bootmesh: RCFILE commands of this node's group and host\n\
         bootmesh_rcfile_step=0\n\
         trap 'bootmesh_rcfile_status=$?\n\
         if [ \"$bootmesh_rcfile_status\" -ne 0 ]; then\n\
         \x20 bootmesh_rcfile_report=\"bootmesh: RCFILE_$(printf %02d \"$bootmesh_rcfile_step\") failed \
         with exit status $bootmesh_rcfile_status; the RCFILE commands after it did not run\"\n\
         \x20 echo \"<3>$bootmesh_rcfile_report\" > /dev/kmsg 2>/dev/null || true\n\
         \x20 echo \"$bootmesh_rcfile_report\" >&2\n\
         fi' EXIT\n",
    );
    for (index, command) in commands.iter().enumerate() {
        // Writing to a String cannot fail.
        let _ = writeln!(script, "bootmesh_rcfile_step={}", index + 1);
        script.push_str(command);
        script.push('\n');
    }
    script
}

/// Writes the plan into `root`. `hostname` is the plan's or the DHCP lease's.
pub fn apply_plan(root: &Path, plan: &NodePlan, hostname: Option<&str>) -> Result<(), ApplyError> {
    if let Some(hostname) = hostname {
        write_file(root, "/etc/hostname", &format!("{hostname}\n"), 0o644)?;
        if let Err(error) = rustix::system::sethostname(hostname.as_bytes()) {
            tracing::warn!(%hostname, %error, "sethostname failed; /etc/hostname is written");
        }
    }
    if !plan.fstab.is_empty() {
        let fstab_path = root.join("etc/fstab");
        let mut fstab = std::fs::read_to_string(&fstab_path).unwrap_or_default();
        if !fstab.is_empty() && !fstab.ends_with('\n') {
            fstab.push('\n');
        }
        fstab.push_str("# added by bootmesh (FSTAB of this node's group and host)\n");
        for line in &plan.fstab {
            fstab.push_str(line);
            fstab.push('\n');
        }
        write_file(root, "/etc/fstab", &fstab, 0o644)?;
    }
    let systemd = root.join("etc/systemd/system");
    write_file(root, "/etc/lts.conf", &node_lts_conf(plan), 0o644)?;
    if !plan.rcfile.is_empty() {
        write_file(root, RCFILE_SCRIPT, &rcfile_script(&plan.rcfile), 0o755)?;
        enable_unit(root, RCFILE_UNIT, &rcfile_unit())?;
    }
    enable_unit(root, BOOTED_UNIT, &booted_unit())?;
    std::fs::create_dir_all(&systemd).map_err(io("mkdir /etc/systemd/system"))?;
    for unit in units_to_mask(plan) {
        let link = systemd.join(unit);
        let _ = std::fs::remove_file(&link);
        symlink("/dev/null", &link).map_err(io(format!("mask {unit}")))?;
    }
    Ok(())
}

/// Writes each secret to `SECRETS_DIR/<name>`, readable by root only.
pub fn write_secrets(root: &Path, secrets: &NodeSecrets) -> Result<usize, ApplyError> {
    let directory = root.join(SECRETS_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&directory).map_err(io("mkdir secrets"))?;
    std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod secrets"))?;
    let mut written = 0;
    for (name, value) in &secrets.secrets {
        if !is_valid_secret_name(name) {
            tracing::warn!(%name, "secret with an unusable name skipped");
            continue;
        }
        write_file(
            root,
            &format!("{SECRETS_DIR}/{name}"),
            value.expose(),
            0o600,
        )?;
        written += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Secret;
    use std::collections::BTreeMap;

    #[test]
    fn plan_lands_in_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/fstab"),
            "proc /proc proc defaults 0 0",
        )
        .unwrap();
        let plan = NodePlan {
            fstab: vec!["tmpfs /scratch tmpfs size=1G 0 0".into()],
            rcfile: vec!["echo rc > /run/rc".into()],
            keep_system_services: vec!["fstrim.timer".into()],
            lts_conf: BTreeMap::from([("SERVER".into(), "10.9.0.15".into())]),
            ..NodePlan::default()
        };
        apply_plan(root.path(), &plan, None).unwrap();
        let fstab = std::fs::read_to_string(root.path().join("etc/fstab")).unwrap();
        assert!(fstab.starts_with("proc /proc proc defaults 0 0\n# added by bootmesh"));
        assert!(fstab.ends_with("tmpfs /scratch tmpfs size=1G 0 0\n"));
        let systemd = root.path().join("etc/systemd/system");
        assert_eq!(
            std::fs::read_link(systemd.join("apt-daily.timer")).unwrap(),
            Path::new("/dev/null")
        );
        assert!(
            !systemd.join("fstrim.timer").exists()
                && std::fs::symlink_metadata(systemd.join("fstrim.timer")).is_err()
        );
        assert!(
            std::fs::symlink_metadata(systemd.join("multi-user.target.wants").join(RCFILE_UNIT))
                .is_ok()
        );
        let booted = std::fs::read_to_string(systemd.join(BOOTED_UNIT)).unwrap();
        assert!(booted.contains("After=multi-user.target"), "{booted}");
        assert!(
            booted.contains("ExecStart=/bin/sh -c ': > /run/bootmesh/booted'"),
            "{booted}"
        );
        assert!(
            std::fs::symlink_metadata(systemd.join("multi-user.target.wants").join(BOOTED_UNIT))
                .is_ok()
        );
        let script = std::fs::read_to_string(root.path().join("etc/bootmesh/rcfile.sh")).unwrap();
        assert!(script.contains("echo rc > /run/rc"));
        let lts_conf = std::fs::read_to_string(root.path().join("etc/lts.conf")).unwrap();
        assert!(lts_conf.contains("[default]\nFSTAB_01=\"tmpfs /scratch tmpfs size=1G 0 0\""));
        assert!(lts_conf.contains("SERVER=\"10.9.0.15\""), "{lts_conf}");
    }

    /// The script stops at the first failing command, as `sh -e` does, and names it; the
    /// commands before it ran. Run with the system's `sh`, as the unit runs it.
    #[test]
    fn the_rcfile_script_stops_at_the_first_failure_and_names_it() {
        let directory = tempfile::tempdir().unwrap();
        let proof = directory.path().join("proof");
        let script = rcfile_script(&[
            format!("echo first > {}", proof.display()),
            "cd /; export LTSP_STYLE=yes".into(),
            "[ \"$LTSP_STYLE\" = yes ] && false".into(),
            format!("echo never >> {}", proof.display()),
        ]);
        let output = std::process::Command::new("sh")
            .arg("-e")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("bootmesh: RCFILE_03 failed with exit status 1"),
            "{stderr}"
        );
        assert_eq!(std::fs::read_to_string(&proof).unwrap(), "first\n");
        let fine = rcfile_script(&["true".into()]);
        let output = std::process::Command::new("sh")
            .args(["-e", "-c", &fine])
            .output()
            .unwrap();
        assert!(output.status.success() && output.stderr.is_empty());
    }

    #[test]
    fn secrets_are_private_and_names_cannot_escape() {
        let root = tempfile::tempdir().unwrap();
        let secrets = NodeSecrets {
            secrets: BTreeMap::from([
                ("join".to_owned(), Secret::new("token-value")),
                ("../escape".to_owned(), Secret::new("x")),
            ]),
        };
        assert_eq!(write_secrets(root.path(), &secrets).unwrap(), 1);
        let path = root.path().join("run/bootmesh/secrets/join");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "token-value");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!root.path().join("run/bootmesh/escape").exists());
    }
}
