//! iPXE boot scripts: what iPXE runs once DHCP pointed it at `/boot/<mac>.ipxe`.
//!
//! Every file has a list of URLs tried in order (`kernel A || kernel B`), so a dead server costs
//! one failed fetch, not a failed boot; the last resort is a pause and a fresh DHCP round.

use std::fmt::Write;

/// What one node boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    /// Kernel URLs, tried in order.
    pub kernel_urls: Vec<String>,
    /// Initrd URLs, tried in order.
    pub initrd_urls: Vec<String>,
    /// Kernel command line (without `initrd=`; the script adds it for EFI stub kernels).
    pub cmdline: String,
    /// Hostname, shown on the console while booting.
    pub hostname: Option<String>,
}

/// Why a plan cannot be turned into a script.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ScriptError {
    /// No kernel URL.
    #[error("boot plan has no kernel url")]
    NoKernel,
    /// A value would break out of its iPXE command (newline, or characters iPXE interprets).
    #[error("unsafe character in {field}: {value:?}")]
    UnsafeValue {
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: String,
    },
}

/// The name iPXE gives the initrd image; EFI-stub kernels need `initrd=<name>` on their cmdline.
const INITRD_NAME: &str = "initrd.img";

fn check(field: &'static str, value: &str) -> Result<(), ScriptError> {
    // Newlines end a command; `${` expands settings; `||`/`&&` chain commands.
    let unsafe_value = value.chars().any(|character| character.is_control())
        || value.contains("${")
        || value.contains("||")
        || value.contains("&&");
    if unsafe_value {
        return Err(ScriptError::UnsafeValue {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Renders `plan` as an iPXE script.
pub fn render_script(plan: &BootPlan) -> Result<String, ScriptError> {
    if plan.kernel_urls.is_empty() {
        return Err(ScriptError::NoKernel);
    }
    for url in plan.kernel_urls.iter().chain(&plan.initrd_urls) {
        check("url", url)?;
        if url.contains(char::is_whitespace) {
            return Err(ScriptError::UnsafeValue {
                field: "url",
                value: url.clone(),
            });
        }
    }
    check("cmdline", &plan.cmdline)?;
    if let Some(hostname) = &plan.hostname {
        check("hostname", hostname)?;
    }
    let mut script = String::from("#!ipxe\n");
    let name = plan.hostname.as_deref().unwrap_or("${net0/mac}");
    let _ = writeln!(script, "echo bootmesh: booting {name}");
    let fetch = |command: &str, urls: &[String], suffix: &str| {
        let attempts: Vec<String> = urls
            .iter()
            .map(|url| format!("{command}{suffix} {url}"))
            .collect();
        format!("{} || goto failed\n", attempts.join(" || "))
    };
    script.push_str(&fetch("kernel", &plan.kernel_urls, " --name kernel"));
    let mut cmdline = plan.cmdline.clone();
    if !plan.initrd_urls.is_empty() {
        script.push_str(&fetch(
            "initrd",
            &plan.initrd_urls,
            &format!(" --name {INITRD_NAME}"),
        ));
        cmdline = format!("initrd={INITRD_NAME} {cmdline}");
    }
    let _ = writeln!(script, "imgargs kernel {}", cmdline.trim_end());
    script.push_str("boot || goto failed\n");
    script.push_str(":failed\necho bootmesh: boot failed; retrying with a fresh DHCP round in 5 s\nsleep 5\ndhcp\nchain ${filename} || goto failed\n");
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> BootPlan {
        BootPlan {
            kernel_urls: vec![
                "http://10.0.0.1:8080/boot/vmlinuz".into(),
                "http://10.0.0.2:8080/boot/vmlinuz".into(),
            ],
            initrd_urls: vec!["http://10.0.0.1:8080/boot/initrd.img".into()],
            cmdline: "console=ttyS0 bootmesh.image=abc".into(),
            hostname: Some("worker-1".into()),
        }
    }

    #[test]
    fn script_has_fallbacks_and_names_the_initrd() {
        let script = render_script(&plan()).unwrap();
        assert_eq!(
            script,
            "#!ipxe\n\
             echo bootmesh: booting worker-1\n\
             kernel --name kernel http://10.0.0.1:8080/boot/vmlinuz || kernel --name kernel http://10.0.0.2:8080/boot/vmlinuz || goto failed\n\
             initrd --name initrd.img http://10.0.0.1:8080/boot/initrd.img || goto failed\n\
             imgargs kernel initrd=initrd.img console=ttyS0 bootmesh.image=abc\n\
             boot || goto failed\n\
             :failed\n\
             echo bootmesh: boot failed; retrying with a fresh DHCP round in 5 s\n\
             sleep 5\n\
             dhcp\n\
             chain ${filename} || goto failed\n"
        );
    }

    #[test]
    fn injection_is_refused() {
        let mut bad = plan();
        bad.cmdline = "quiet\nshell".into();
        assert!(matches!(
            render_script(&bad),
            Err(ScriptError::UnsafeValue {
                field: "cmdline",
                ..
            })
        ));
        let mut bad = plan();
        bad.kernel_urls[0] = "http://x/${password}".into();
        assert!(render_script(&bad).is_err());
        let mut bad = plan();
        bad.kernel_urls.clear();
        assert_eq!(render_script(&bad), Err(ScriptError::NoKernel));
    }
}
