//! `bootmesh image ...`: the command-line face of [`node::image`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use node::image::squashfs::SquashfsLayout;
use node::image::{self, ExportPart, ImportOptions, ImportProgress, ImportSource};
use transfer::{ChunkingParameters, ImageReference};

/// Default server state directory (the image store is its `images/`).
pub(crate) const STATE_DIR_DEFAULT: &str = "/var/lib/bootmesh";

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Import an image from a docker save archive, an OCI layout or archive, a rootfs
    /// directory or tarball, or a squashfs.
    Import {
        /// `name:tag` to create (or move).
        reference: String,
        /// The source; `-` reads a docker save archive (or tarball, or squashfs) from stdin.
        #[arg(long)]
        from: String,
        /// Kernel to use instead of the newest `/boot/vmlinuz-*` in the tree.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd to use instead of the tree's matching `/boot/initrd.img-*`.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Default kernel command line for nodes booting the image.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Creation time (seconds since the epoch) instead of the source's own.
        #[arg(long)]
        created: Option<u64>,
        /// Pack file tails into squashfs fragments (smaller, but versions share fewer chunks).
        #[arg(long)]
        fragments: bool,
        /// zstd level of the squashfs, 1-22 (higher: smaller and much slower to build).
        #[arg(long, default_value_t = node::image::squashfs::COMPRESSION_LEVEL_DEFAULT,
              value_parser = clap::value_parser!(u8).range(1..=22))]
        compression_level: u8,
        /// The static bootmesh agent: the image's initrd becomes the bootmesh initramfs (this
        /// agent as /init plus the image's own modules for NIC, NBD, loop, squashfs, overlay,
        /// dm-verity). Default: `bootmesh-agent` beside this binary, if there is one. `--initrd`
        /// wins over it.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// A kernel module to add to the bootmesh initramfs (a NIC driver, say); repeatable.
        #[arg(long = "module")]
        modules: Vec<String>,
    },
    /// List tagged images.
    List {
        /// JSON for scripts (the full manifest hash).
        #[arg(long)]
        json: bool,
    },
    /// Show an image's manifest (by `name:tag` or hash).
    Show {
        /// `name:tag` or manifest hash.
        image: String,
    },
    /// Remove a tag; `image gc` frees its chunks.
    Rm {
        /// `name:tag`.
        reference: String,
    },
    /// Write an image part back out, byte for byte.
    Export {
        /// `name:tag` or manifest hash.
        image: String,
        /// Which part.
        #[arg(long, value_enum, default_value_t = ExportPartArg::Squashfs)]
        part: ExportPartArg,
        /// Output file; `-` for stdout.
        #[arg(long, short)]
        output: String,
    },
    /// Re-read and re-hash an image's chunks (or, without an image, every chunk: a scrub).
    Verify {
        /// `name:tag` or manifest hash; all when omitted.
        image: Option<String>,
    },
    /// Remove manifests no tag names and chunks no manifest names.
    Gc,
    /// Make a group of nodes boot an image. On a server in a cluster, every server follows:
    /// the promotion is committed to the cluster, and a server whose store lacks the image
    /// fetches it from the others before it boots the group from it.
    Promote {
        /// `name:tag`.
        reference: String,
        /// The group.
        #[arg(long)]
        group: String,
    },
    /// Return a group to the image it booted before the last promote (in a cluster: on every
    /// server, as with promote).
    Rollback {
        /// The group.
        #[arg(long)]
        group: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ExportPartArg {
    /// The squashfs exactly as imported.
    Squashfs,
    /// Squashfs + verity tree, as nodes mount it.
    Root,
    /// The kernel.
    Kernel,
    /// The initrd.
    Initrd,
}

/// indicatif bars on stderr (hidden when stderr is not a terminal).
struct Bars {
    bar: std::cell::RefCell<Option<ProgressBar>>,
}

impl ImportProgress for Bars {
    fn phase(&self, name: &str, total_bytes: Option<u64>) {
        let bar = match total_bytes {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(
                    ProgressStyle::with_template(
                        "{msg:28} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{msg:28} {spinner} {bytes} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_message(name.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        *self.bar.borrow_mut() = Some(bar);
    }
    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.bar.borrow().as_ref() {
            bar.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print(text: &str) -> anyhow::Result<()> {
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

#[allow(clippy::disallowed_methods)] // The CLI edge: elapsed time for the summary.
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// In a cluster, a promotion (or a rollback) is the cluster's: the tag and the group's image
/// are committed through Raft, and every server follows them, fetching the image from the
/// others if its own store lacks it (ADR 0014). Outside a cluster, nothing to do.
fn promote_in_cluster(
    state_dir: &std::path::Path,
    store: &transfer::ChunkStore,
    reference: &str,
    group: &str,
) -> anyhow::Result<()> {
    use node::cluster::admin::{AdminReply, AdminRequest, admin_call};
    if !node::cluster::files::ClusterFiles::new(state_dir).exists() {
        return Ok(());
    }
    let (hash, manifest) = image::resolve(store, reference)?;
    let commands = [
        consensus::MeshCommand::TagImage {
            reference: reference.to_owned(),
            manifest: hash.to_hex(),
            size_bytes: manifest.root.part.size_bytes,
        },
        consensus::MeshCommand::Promote {
            group: group.to_owned(),
            reference: reference.to_owned(),
        },
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for command in commands {
        let reply = runtime
            .block_on(admin_call(state_dir, None, &AdminRequest::Propose(command)))
            .context("committing the promotion to the cluster (it holds here only, for now)")?;
        match reply {
            AdminReply::Proposed(consensus::MeshResponse::Applied) => {}
            AdminReply::Proposed(consensus::MeshResponse::Refused(reason))
            | AdminReply::Failed(reason) => {
                anyhow::bail!("the cluster refused the promotion: {reason}")
            }
            other => anyhow::bail!("the cluster answered the promotion with {other:?}"),
        }
    }
    print(&format!(
        "the cluster: every server boots group {group} from {reference} once its own store \
         holds the image (a server without it fetches it from the others)\n"
    ))
}

pub(crate) fn run(state_dir: &std::path::Path, command: ImageCommand) -> anyhow::Result<()> {
    let store = Arc::new(image::open_store(state_dir)?);
    match command {
        ImageCommand::Import {
            reference,
            from,
            kernel,
            initrd,
            cmdline,
            created,
            fragments,
            compression_level,
            agent,
            modules,
        } => {
            let agent = agent.or_else(|| {
                let beside = std::env::current_exe()
                    .ok()?
                    .with_file_name("bootmesh-agent");
                beside.is_file().then_some(beside)
            });
            let options = ImportOptions {
                reference: ImageReference::parse(&reference)?,
                source: if from == "-" {
                    ImportSource::Stdin
                } else {
                    ImportSource::Path(PathBuf::from(from))
                },
                kernel,
                initrd,
                cmdline,
                created_unix_secs: created,
                layout: SquashfsLayout {
                    fragments,
                    compression_level,
                },
                chunking: ChunkingParameters::DEFAULT,
                agent,
                extra_modules: modules,
            };
            let started = now();
            let bars = Bars {
                bar: std::cell::RefCell::new(None),
            };
            let summary = image::import(&store, &options, &bars)
                .with_context(|| format!("importing {reference}"))?;
            let elapsed_secs = started.elapsed().as_secs_f64().max(1e-3);
            let optional = |bytes: Option<u64>| bytes.map_or_else(|| "none".to_owned(), mib);
            print(&format!(
                "imported {} from a {}\n  image      {}\n  squashfs   {}\n  root       {} (with dm-verity tree, root hash {})\n  kernel     {}\n  initrd     {}\n  chunks     {} ({} already in the store, {} written)\n  time       {:.1} s ({:.1} MiB/s of squashfs)\n{}",
                summary.reference,
                summary.source_kind,
                summary.manifest_hash,
                mib(summary.squashfs_bytes),
                mib(summary.root_bytes),
                summary.verity_root_hash,
                optional(summary.kernel_bytes),
                optional(summary.initrd_bytes),
                summary.chunks,
                summary.chunks_reused,
                mib(summary.bytes_written),
                elapsed_secs,
                summary.squashfs_bytes as f64 / (1024.0 * 1024.0) / elapsed_secs,
                summary
                    .replaced
                    .map(|previous| format!("  replaced   {previous} (the tag's previous image)\n"))
                    .unwrap_or_default(),
            ))
        }
        ImageCommand::List { json: true } => {
            let listings: Vec<serde_json::Value> = image::list(&store)?
                .into_iter()
                .map(|listing| {
                    serde_json::json!({
                        "image": listing.reference,
                        "hash": listing.manifest_hash.to_hex(),
                        "root_bytes": listing.root_bytes,
                        "created_unix_secs": listing.created_unix_secs,
                        "groups": listing.groups,
                    })
                })
                .collect();
            print(&format!("{}\n", serde_json::to_string_pretty(&listings)?))
        }
        ImageCommand::List { json: false } => {
            let mut text = format!(
                "{:<40} {:<16} {:>12} {:>20}  GROUPS\n",
                "IMAGE", "HASH", "ROOT", "CREATED"
            );
            for listing in image::list(&store)? {
                text.push_str(&format!(
                    "{:<40} {:<16} {:>12} {:>20}  {}\n",
                    listing.reference,
                    &listing.manifest_hash.to_hex()[..16],
                    mib(listing.root_bytes),
                    boot_services::timeline::utc_timestamp(listing.created_unix_secs),
                    if listing.groups.is_empty() {
                        "-".to_owned()
                    } else {
                        listing.groups.join(",")
                    }
                ));
            }
            print(&text)
        }
        ImageCommand::Show { image: name } => {
            let (hash, manifest) = image::resolve(&store, &name)?;
            let part = |label: &str, part: Option<&transfer::Part>| match part {
                Some(part) => format!(
                    "  {label:<9}{} in {} chunks\n",
                    mib(part.size_bytes),
                    part.chunks.len()
                ),
                None => format!("  {label:<9}none\n"),
            };
            let verity = &manifest.root.verity;
            print(&format!(
                "image    {}\nhash     {hash}\ncreated  {}\ncmdline  {}\nparts\n{}{}{}  squashfs {} bytes\nverity   sha256, {} data blocks, hash offset {}, salt {}\n         root hash {}\n",
                manifest.reference(),
                manifest.created_unix_secs,
                manifest.cmdline,
                part("kernel", manifest.kernel.as_ref()),
                part("initrd", manifest.initrd.as_ref()),
                part("root", Some(&manifest.root.part)),
                manifest.root.squashfs_bytes,
                verity.data_blocks,
                verity.hash_offset_bytes,
                verity.salt_hex(),
                verity.root_hash_hex(),
            ))
        }
        ImageCommand::Rm { reference } => {
            let hash = image::remove(&store, &reference)?;
            print(&format!(
                "removed {reference} ({hash}); run `bootmesh image gc` to free its chunks\n"
            ))
        }
        ImageCommand::Export {
            image: name,
            part,
            output,
        } => {
            let part = match part {
                ExportPartArg::Squashfs => ExportPart::Squashfs,
                ExportPartArg::Root => ExportPart::Root,
                ExportPartArg::Kernel => ExportPart::Kernel,
                ExportPartArg::Initrd => ExportPart::Initrd,
            };
            if output == "-" {
                let stdout = std::io::stdout();
                let mut writer = std::io::BufWriter::new(stdout.lock());
                image::export(Arc::clone(&store), &name, part, &mut writer)?;
            } else {
                // Written beside the target and renamed, so a failed export leaves no partial file.
                let target = PathBuf::from(&output);
                let directory = target
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                let mut temporary = tempfile::NamedTempFile::new_in(directory)
                    .with_context(|| format!("create a file in {}", directory.display()))?;
                let bytes = {
                    let mut writer = std::io::BufWriter::new(temporary.as_file_mut());
                    image::export(Arc::clone(&store), &name, part, &mut writer)?
                };
                temporary.as_file().sync_all()?;
                // Temporary files are created 0600; an exported image is an ordinary file.
                use std::os::unix::fs::PermissionsExt;
                temporary
                    .as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o644))?;
                temporary
                    .persist(&target)
                    .with_context(|| format!("write {output}"))?;
                eprintln!("wrote {bytes} bytes to {output}");
            }
            Ok(())
        }
        ImageCommand::Verify { image: name } => {
            let report = image::verify(&store, name.as_deref())?;
            let mut text = format!(
                "checked {} chunks ({})\n",
                report.chunks_checked,
                mib(report.bytes_checked)
            );
            for bad in &report.bad_chunks {
                text.push_str(&format!(
                    "BAD chunk {}: {} (needed by {})\n",
                    bad.hash,
                    bad.problem,
                    if bad.images.is_empty() {
                        "no image".to_owned()
                    } else {
                        bad.images.join(", ")
                    }
                ));
            }
            for bad in &report.bad_manifests {
                text.push_str(&format!("BAD manifest {bad}\n"));
            }
            print(&text)?;
            if report.bad_chunks.is_empty() && report.bad_manifests.is_empty() {
                Ok(())
            } else {
                anyhow::bail!(
                    "{} bad chunks, {} bad manifests: re-import the images named above to repair them",
                    report.bad_chunks.len(),
                    report.bad_manifests.len()
                )
            }
        }
        ImageCommand::Gc => {
            let report = image::gc(&store)?;
            print(&format!(
                "removed {} manifests and {} chunks ({}); kept {} chunks\n",
                report.manifests_removed,
                report.chunks_removed,
                mib(report.bytes_freed),
                report.chunks_kept
            ))
        }
        ImageCommand::Promote { reference, group } => {
            let hash = image::promote(&store, &reference, &group)?;
            print(&format!("group {group} now boots {reference} ({hash})\n"))?;
            promote_in_cluster(state_dir, &store, &reference, &group)
        }
        ImageCommand::Rollback { group } => {
            let reference = image::rollback(&store, &group)?;
            print(&format!("group {group} now boots {reference} again\n"))?;
            promote_in_cluster(state_dir, &store, &reference, &group)
        }
    }
}
