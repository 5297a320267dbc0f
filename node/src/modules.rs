//! Kernel modules for the initramfs: which files to take from an image's
//! `/lib/modules/<version>/` so that the agent can load what it needs (NIC, NBD, squashfs,
//! overlay, dm-verity), dependencies first, and which it can skip because they are built in.
//!
//! Reads `modules.dep` (`kernel/a.ko.xz: kernel/b.ko.xz kernel/c.ko.xz`, each line listing a
//! module's full dependency closure as depmod computed it) and `modules.builtin`.

use std::collections::{BTreeMap, BTreeSet};

/// A module name, the way the kernel compares them: `-` and `_` are the same.
fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/drivers/block/nbd.ko.xz`.
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(canonical_name(stem))
}

/// Why a set of modules cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// Neither a loadable module nor built in.
    #[error("kernel module {0} is neither in modules.dep nor built in")]
    Unknown(String),
    /// A line of modules.dep that is not `path: deps`.
    #[error("modules.dep line {line}: {text:?} is not `module: dependencies`")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// modules.dep and modules.builtin of one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleIndex {
    /// Module name -> (its path, the paths it depends on, as depmod listed them).
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Parses the two files' contents.
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<Self, ModuleError> {
        let mut modules = BTreeMap::new();
        for (index, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let malformed = || ModuleError::Malformed {
                line: index + 1,
                text: line.chars().take(200).collect(),
            };
            let (path, dependencies) = line.split_once(':').ok_or_else(malformed)?;
            let name = module_name(path.trim()).ok_or_else(malformed)?;
            let dependencies = dependencies
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>();
            modules.insert(name, (path.trim().to_owned(), dependencies));
        }
        let builtin = modules_builtin
            .lines()
            .filter_map(|line| module_name(line.trim()))
            .collect();
        Ok(Self { modules, builtin })
    }

    /// True if the kernel has `name` built in.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical_name(name))
    }

    /// The module files to load for `wanted`, each after the ones it needs, each once. Built-in
    /// modules need no file and are left out.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>, ModuleError> {
        let mut order: Vec<String> = Vec::new();
        let mut placed: BTreeSet<String> = BTreeSet::new();
        for name in wanted {
            let name = canonical_name(name);
            if self.builtin.contains(&name) {
                continue;
            }
            let (path, dependencies) = self
                .modules
                .get(&name)
                .ok_or_else(|| ModuleError::Unknown(name.clone()))?;
            // depmod lists the whole closure, the most dependent first: load it in reverse.
            for dependency in dependencies.iter().rev().chain(std::iter::once(path)) {
                if placed.insert(dependency.clone()) {
                    order.push(dependency.clone());
                }
            }
        }
        Ok(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/block/nbd.ko.xz:
kernel/fs/overlayfs/overlay.ko.xz:
kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/lib/reed_solomon/reed_solomon.ko.xz
kernel/drivers/md/dm-bufio.ko.xz:
kernel/lib/reed_solomon/reed_solomon.ko.xz:
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
";
    const BUILTIN: &str = "kernel/fs/squashfs/squashfs.ko\nkernel/drivers/md/dm-mod.ko\n";

    #[test]
    fn dependencies_load_first_once_and_builtins_are_skipped() -> Result<(), ModuleError> {
        let index = ModuleIndex::parse(DEP, BUILTIN)?;
        let order = index.load_order(&[
            "virtio_net",
            "nbd",
            "squashfs",
            "dm-verity",
            "dm_mod",
            "overlay",
        ])?;
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
                "kernel/drivers/block/nbd.ko.xz",
                "kernel/lib/reed_solomon/reed_solomon.ko.xz",
                "kernel/drivers/md/dm-bufio.ko.xz",
                "kernel/drivers/md/dm-verity.ko.xz",
                "kernel/fs/overlayfs/overlay.ko.xz",
            ]
        );
        assert!(index.is_builtin("squashfs"));
        assert_eq!(
            index.load_order(&["e1000e"]),
            Err(ModuleError::Unknown("e1000e".into()))
        );
        assert!(matches!(
            ModuleIndex::parse("no colon here", ""),
            Err(ModuleError::Malformed { line: 1, .. })
        ));
        assert_eq!(
            module_name("kernel/a/dm-verity.ko.zst").as_deref(),
            Some("dm_verity")
        );
        assert_eq!(module_name("kernel/a/readme.txt"), None);
        Ok(())
    }
}
