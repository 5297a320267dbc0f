//! The `lazy` root (DESIGN 2.3, ADR 0015): the agent serves the root image to its own kernel
//! as an NBD export over a socket pair, from memory, and fetches from the swarm each chunk a
//! read needs before the rest. The fetch goes on in the background until the whole image is
//! in memory, as `ram` would hold it; the node boots as soon as its first reads are answered.
//! Every peer is a path to every chunk, so a dead peer costs a re-request, not the root.
//!
//! The server is a child forked before `switch_root` and never PID 1: the image's init must
//! be able to stop and restart anything it started, and this process is in the I/O path of
//! the root it runs from. Because of that it pins itself as a storage daemon does: memory
//! locked, `PR_SET_IO_FLUSHER` (its own allocations do not recurse into I/O on its device),
//! out of the OOM killer's reach, and `@` as the first character of its command line, which
//! systemd's final kill spares (the root-storage-daemon convention). The image must fit the
//! RAM budget, or the agent refuses the mode ([`ram_budget_refusal`]).

#![allow(unsafe_code)] // fork(2), mlockall(2), prctl(2): the process-level pins above.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use boot_services::nbd::{NbdConfig, NbdConnection};
use boot_services::source::{BlockSource, ReadAt, SourceError};
use transfer::Manifest;

use super::devices::BlockDevice;
use super::nbd;
use crate::swarm::{AnnounceOptions, AssembledShelf, SharedImage, SwarmFetchConfig, SwarmNode};

/// Percent of the memory available at boot that the whole image may take (the rest is for the
/// system, its tmpfs overlay and the agent).
pub const RAM_SHARE_PERCENT: u64 = 50;
/// How long one block read waits for its chunks before the kernel gets an I/O error. The
/// fetch re-requests from other peers long before; this bounds a swarm with no peer at all.
const READ_WAIT_LIMIT: Duration = Duration::from_secs(600);
/// Pause before a stalled background fetch starts over (peers come back, trackers change).
const FETCH_RETRY_PAUSE: Duration = Duration::from_secs(2);
/// `prctl` option (Linux 5.6, `include/uapi/linux/prctl.h`); the libc crate does not name it.
const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// The one export the server offers.
const EXPORT_NAME: &str = "root";
/// Bytes read from the kernel's socket at a time.
const RECEIVE_BUFFER_BYTES: usize = 256 * 1024;

/// Why the lazy root could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The handshake with our own server, or the kernel's NBD connect, failed.
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
}

/// The bytes `lazy` keeps in memory for `manifest`: every part, kernel and initrd too (a
/// booted node serves whole images to others).
pub fn image_bytes(manifest: &Manifest) -> u64 {
    transfer::PartName::ALL
        .iter()
        .filter_map(|name| manifest.part(*name))
        .map(|part| part.size_bytes)
        .sum()
}

/// Why `lazy` cannot hold an image of `image_bytes` in memory, if it cannot: it must fit
/// [`RAM_SHARE_PERCENT`] of `MemAvailable` in `meminfo` (the text of `/proc/meminfo`).
pub fn ram_budget_refusal(image_bytes: u64, meminfo: &str) -> Option<String> {
    let Some(available_kib) = meminfo.lines().find_map(|line| {
        line.strip_prefix("MemAvailable:")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    }) else {
        return Some("no MemAvailable in /proc/meminfo".into());
    };
    let budget = available_kib.saturating_mul(1024) / 100 * RAM_SHARE_PERCENT;
    (image_bytes > budget).then(|| {
        format!(
            "the image takes {} MiB, more than {RAM_SHARE_PERCENT} % of the {} MiB available",
            image_bytes >> 20,
            (available_kib >> 10)
        )
    })
}

/// Where the root part's bytes lie in the image's chunk numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootLayout {
    /// Per root chunk in order: its first byte in the root and its swarm index.
    starts: Vec<(u64, u32)>,
    size_bytes: u64,
}

impl RootLayout {
    /// The layout of `manifest`'s root in `image`'s numbering.
    pub fn new(manifest: &Manifest, image: &transfer::swarm::SwarmImage) -> Option<Self> {
        let mut starts = Vec::with_capacity(manifest.root.part.chunks.len());
        let mut offset = 0u64;
        for chunk in &manifest.root.part.chunks {
            starts.push((offset, image.index_of(&chunk.hash)?));
            offset += u64::from(chunk.length_bytes);
        }
        Some(Self {
            starts,
            size_bytes: offset,
        })
    }

    /// The root's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The swarm indices of the chunks holding bytes `offset..offset + length` (clipped to
    /// the root), in order, without repeats.
    pub fn chunks_for(&self, offset: u64, length: u64) -> Vec<u32> {
        let end = offset.saturating_add(length).min(self.size_bytes);
        if offset >= end {
            return Vec::new();
        }
        // The last chunk starting at or before `offset`.
        let first = self
            .starts
            .partition_point(|(start, _)| *start <= offset)
            .saturating_sub(1);
        let mut indices: Vec<u32> = self.starts[first..]
            .iter()
            .take_while(|(start, _)| *start < end)
            .map(|(_, index)| *index)
            .collect();
        indices.sort_unstable();
        indices.dedup();
        indices
    }
}

/// The root as the NBD connection reads it: bytes from the memory the fetch fills, once the
/// chunks under them are held (stored and verified).
#[derive(Debug, Clone)]
struct LazyRoot {
    image: Arc<SharedImage>,
    memory: Arc<File>,
    layout: Arc<RootLayout>,
}

impl ReadAt for LazyRoot {
    fn size_bytes(&self) -> u64 {
        self.layout.size_bytes()
    }

    fn read_at(&self, offset: u64, buffer: &mut [u8]) -> Result<usize, SourceError> {
        let length = (buffer.len() as u64).min(self.layout.size_bytes().saturating_sub(offset));
        let indices = self.layout.chunks_for(offset, length);
        if !self.image.wait_held(&indices, READ_WAIT_LIMIT) {
            tracing::error!(
                offset,
                length,
                "lazy root: no peer delivered the chunks of a read in time"
            );
            return Err(SourceError::Io("chunks not delivered in time".into()));
        }
        let wanted = usize::try_from(length).unwrap_or(buffer.len());
        let mut filled = 0;
        while filled < wanted {
            match self
                .memory
                .read_at(&mut buffer[filled..wanted], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(SourceError::Io(error.to_string())),
            }
        }
        Ok(filled)
    }
}

/// One export, the root.
struct LazySource(LazyRoot);

impl BlockSource for LazySource {
    type Export = LazyRoot;

    fn export_names(&self) -> Vec<String> {
        vec![EXPORT_NAME.into()]
    }

    fn open_export(&self, name: &str) -> Result<LazyRoot, SourceError> {
        if name == EXPORT_NAME {
            Ok(self.0.clone())
        } else {
            Err(SourceError::NotFound)
        }
    }
}

/// What the lazy root's server is to fetch and serve.
#[derive(Debug, Clone, Copy)]
pub struct LazyBoot<'a> {
    /// The image's manifest.
    pub manifest: &'a Manifest,
    /// Its hash (`bootmesh.image=`).
    pub image_hash: transfer::ContentHash,
    /// The swarm's trackers (`bootmesh.trackers=`).
    pub trackers: &'a [SocketAddr],
    /// The node's swarm endpoint.
    pub address: SocketAddr,
    /// Mixes the fetch's rarest-first order with other nodes'.
    pub tie_break: u64,
    /// Serve the kernel and initrd to booting peers once whole (`firmware_from_peers`).
    pub serve_firmware: bool,
}

/// The lazy root's server and the device attached to it, as PID 1 holds them until it hands
/// the machine to the image's init (`exec`, so this is never dropped then). Dropped in a boot
/// round that failed before that, it disconnects the device and stops the server: the server
/// holds the image in locked memory, and the next round starts without it.
#[derive(Debug)]
pub struct LazyAttachment {
    /// The device the root is read from.
    pub device: BlockDevice,
    _server: ServerProcess,
}

impl Drop for LazyAttachment {
    fn drop(&mut self) {
        // Before the server goes, so that the kernel fails the device's requests at once
        // instead of waiting on a socket nobody answers.
        if let Err(error) = nbd::disconnect(&self.device) {
            tracing::warn!(%error, device = %self.device.path.display(), "lazy root: disconnect after a failed round");
        }
    }
}

/// A child process that is killed and reaped when this is dropped.
#[derive(Debug)]
struct ServerProcess {
    pid: libc::pid_t,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) and waitpid(2) on our own child, which nothing else reaps.
        let reaped = unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0)
        };
        if reaped == self.pid {
            tracing::info!(
                server_pid = self.pid,
                "lazy root: server of a failed round stopped"
            );
        } else {
            tracing::warn!(server_pid = self.pid, error = %std::io::Error::last_os_error(), "lazy root: server of a failed round not reaped");
        }
    }
}

/// Forks the lazy root's server and attaches the kernel's NBD client to it. The child fetches
/// and serves until the machine stops; this process (PID 1) goes on with the returned device.
///
/// PID 1 must be single-threaded here (the fetch runtime dropped), as for the companion.
pub fn attach(boot: &LazyBoot<'_>) -> Result<LazyAttachment, LazyError> {
    let (ours, theirs) = UnixStream::pair().map_err(|source| LazyError::Io {
        what: "socket pair for the lazy root",
        source,
    })?;
    // SAFETY: PID 1 is single-threaded here (see above), so the child inherits no lock held
    // by another thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(LazyError::Io {
            what: "fork the lazy root's server",
            source: std::io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        drop(ours);
        run_server(theirs, boot);
        std::process::exit(0);
    }
    drop(theirs);
    // From here an early return stops the server: nothing else would.
    let server = ServerProcess { pid };
    tracing::info!(server_pid = pid, "lazy root: server started");
    let export = nbd::negotiate_on(ours, EXPORT_NAME, "the lazy root's server")?;
    // No kernel timeout: a read waits for its chunks as long as the server says (it answers
    // an error after READ_WAIT_LIMIT); the kernel's timeout would cut the only connection.
    let device = nbd::attach(&export, None)?;
    Ok(LazyAttachment {
        device,
        _server: server,
    })
}

/// The child: pins itself, starts the fetch on a thread and serves NBD on this one until the
/// kernel disconnects.
fn run_server(socket: UnixStream, boot: &LazyBoot<'_>) {
    let LazyBoot {
        manifest,
        image_hash,
        trackers,
        address,
        tie_break,
        serve_firmware,
    } = *boot;
    let _span = tracing::info_span!("lazy_root", pid = std::process::id()).entered();
    pin_process();
    let prepared = (|| -> Result<(Arc<SharedImage>, File, RootLayout), String> {
        let (shelf, root) =
            AssembledShelf::in_memory(manifest).map_err(|error| error.to_string())?;
        let root = root.ok_or("the manifest has no root part")?;
        // Every page of the root now, so that no write into it allocates later (the
        // allocation could wait on reclaim, which could wait on this device).
        rustix::fs::fallocate(
            &root,
            rustix::fs::FallocateFlags::empty(),
            0,
            manifest.root.part.size_bytes,
        )
        .map_err(|error| format!("preallocate the root's memory: {error}"))?;
        let image = transfer::swarm::SwarmImage::new(image_hash, manifest, &[])
            .map_err(|error| error.to_string())?;
        let layout = RootLayout::new(manifest, &image).ok_or("a root chunk is not in the image")?;
        Ok((SharedImage::new(image, Arc::new(shelf)), root, layout))
    })();
    let (image, memory, layout) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            // The parent's handshake fails on the closed socket and boots another way.
            tracing::error!(%error, "lazy root: cannot serve");
            return;
        }
    };
    let memory = Arc::new(memory);
    let firmware = serve_firmware.then(|| {
        super::peer_firmware::PeerFirmware::new(image_hash, manifest, Arc::clone(image.shelf()))
    });
    {
        let image = Arc::clone(&image);
        let trackers = trackers.to_vec();
        let memory = Arc::clone(&memory);
        let spawned = std::thread::Builder::new()
            .name("lazy-fetch".into())
            .spawn(move || fetch_forever(image, &memory, trackers, address, tie_break, firmware));
        if let Err(error) = spawned {
            tracing::error!(%error, "lazy root: no fetch thread");
            return;
        }
    }
    let source = LazySource(LazyRoot {
        image,
        memory,
        layout: Arc::new(layout),
    });
    match serve(socket, source) {
        Ok(()) => tracing::info!("lazy root: the kernel disconnected"),
        Err(error) => tracing::error!(%error, "lazy root: serving stopped"),
    }
}

/// Drives one NBD connection over `socket` with blocking reads and writes: the reads block
/// only this thread, while the fetch fills memory on its own.
fn serve(mut socket: UnixStream, source: LazySource) -> Result<(), String> {
    let mut connection = NbdConnection::new(source, NbdConfig::default());
    let mut buffer = vec![0u8; RECEIVE_BUFFER_BYTES];
    loop {
        while !connection.pending_output().is_empty() {
            let written = socket
                .write(connection.pending_output())
                .map_err(|error| format!("send: {error}"))?;
            if written == 0 {
                return Err("the kernel's socket closed".into());
            }
            connection.consume_output(written);
        }
        if connection.is_closed() {
            return match connection.error() {
                Some(error) => Err(error.to_string()),
                None => Ok(()),
            };
        }
        if connection.wants_input() {
            let received = match socket.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(received) => received,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(format!("receive: {error}")),
            };
            connection
                .handle_input(&buffer[..received])
                .map_err(|error| error.to_string())?;
        }
    }
}

/// Fetches the image until it is whole (starting over after a stall), then seals the root's
/// memory and keeps serving the image to the swarm and announcing it, as a booted `ram` node
/// does (and its kernel and initrd over HTTP, given `firmware`), until the machine stops.
fn fetch_forever(
    image: Arc<SharedImage>,
    memory: &File,
    trackers: Vec<SocketAddr>,
    address: SocketAddr,
    tie_break: u64,
    firmware: Option<super::peer_firmware::PeerFirmware>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "lazy root: no fetch runtime; reads will fail");
            return;
        }
    };
    runtime.block_on(async move {
        let node = loop {
            match SwarmNode::bind(address, transfer::swarm::UploadConfig::default()) {
                Ok(node) => break node,
                Err(error) => {
                    tracing::warn!(%error, "lazy root: no swarm endpoint yet");
                    tokio::time::sleep(FETCH_RETRY_PAUSE).await;
                }
            }
        };
        node.offer(Arc::clone(&image));
        let announcer = tokio::spawn(Arc::clone(&node).announce(
            Arc::clone(&image),
            AnnounceOptions {
                trackers,
                ..AnnounceOptions::default()
            },
            |tracker| tracing::info!(%tracker, "lazy root: announced to the image's tracker"),
        ));
        let started = std::time::Instant::now();
        let mut sources: std::collections::BTreeMap<std::net::IpAddr, u64> =
            std::collections::BTreeMap::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match node
                .fetch(
                    Arc::clone(&image),
                    &[],
                    SwarmFetchConfig {
                        tie_break,
                        ..SwarmFetchConfig::default()
                    },
                )
                .await
            {
                Ok(report) => {
                    for (source, taken) in &report.sources {
                        *sources.entry(source.ip()).or_default() += taken.bytes;
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "lazy root: the fetch stalled; starting over");
                    tokio::time::sleep(FETCH_RETRY_PAUSE).await;
                }
            }
        }
        let bytes: u64 = sources.values().sum();
        let listed: Vec<String> = sources
            .iter()
            .map(|(source, bytes)| format!("{source}={bytes}"))
            .collect();
        tracing::info!(
            bytes,
            sources = listed.join(","),
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            attempts = attempt,
            "lazy root: the whole image is in memory, every chunk verified"
        );
        // Nothing writes the root any more; sealed, not even this process could.
        if let Err(error) = super::seal_root(memory) {
            tracing::warn!(%error, "lazy root: could not seal the root's memory");
        }
        // Whole now: the kernel and initrd can go to booting peers too.
        if let Some(firmware) = firmware {
            tokio::spawn(super::peer_firmware::serve(
                firmware,
                crate::plan::PEER_FIRMWARE_PORT,
            ));
        }
        let _forever = announcer.await;
    });
}

/// Pins this process as a root storage daemon (see the module text). Each pin that fails is
/// logged; the root is served all the same.
fn pin_process() {
    // On fault: every page this process touches stays in RAM, but a reservation (a buffer's
    // capacity, a thread's stack, an allocator's arena) is not made resident whole. Without
    // it, mlockall populated 400 MB in a 512 MB guest and the OOM killer took this process.
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "lazy root: mlockall failed");
    }
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes integer arguments only.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "lazy root: PR_SET_IO_FLUSHER failed");
    }
    if let Err(error) = std::fs::write("/proc/self/oom_score_adj", "-1000\n") {
        tracing::warn!(%error, "lazy root: cannot leave the OOM killer's reach");
    }
    if let Err(error) = mark_command_line_with_at() {
        tracing::warn!(%error, "lazy root: cannot mark the command line for systemd");
    }
}

/// Puts `@` over the first character of this process's command line (argv\[0\]\[0\]), in place:
/// systemd's shutdown spares processes so marked, which must keep serving the root it unmounts
/// last. The arguments' address comes from `/proc/self/stat` (field 48, `arg_start`).
fn mark_command_line_with_at() -> std::io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("unreadable /proc/self/stat"))?;
    // `after_name` starts at field 3 (state); arg_start is field 48.
    let arg_start: u64 = after_name
        .split_whitespace()
        .nth(48 - 3)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| std::io::Error::other("no arg_start in /proc/self/stat"))?;
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")?;
    memory.write_all_at(b"@", arg_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed round's server must not outlive the round: it holds the image in locked
    /// memory. Dropping its handle kills and reaps it.
    #[test]
    fn a_dropped_server_process_is_killed_and_reaped() {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // The handle reaps it, not `Child`.
        std::mem::forget(child);
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the child runs");
        drop(ServerProcess { pid });
        // SAFETY: as above. Reaped, the pid no longer names a process (not even a zombie).
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    fn layout(lengths: &[(u32, u32)]) -> RootLayout {
        let mut starts = Vec::new();
        let mut offset = 0u64;
        for (length, index) in lengths {
            starts.push((offset, *index));
            offset += u64::from(*length);
        }
        RootLayout {
            starts,
            size_bytes: offset,
        }
    }

    #[test]
    fn a_read_needs_the_chunks_under_its_bytes_and_no_others() {
        // Chunks of 100, 50 and 100 bytes; the third repeats the first's content (index 7).
        let layout = layout(&[(100, 7), (50, 3), (100, 7)]);
        for (offset, length, expected) in [
            (0, 1, vec![7]),
            (99, 2, vec![3, 7]),
            (100, 50, vec![3]),
            (149, 1, vec![3]),
            (150, 100, vec![7]),
            (0, 250, vec![3, 7]),
            // Clipped at the end of the root; a read past it needs nothing.
            (240, 1000, vec![7]),
            (250, 10, vec![]),
            (0, 0, vec![]),
        ] {
            assert_eq!(
                layout.chunks_for(offset, length),
                expected,
                "bytes {offset}+{length}"
            );
        }
    }

    #[test]
    fn the_image_must_fit_half_of_the_available_memory() {
        let image = 40 << 20;
        let meminfo = |available_mib: u64| {
            format!(
                "MemTotal:        1000000 kB\nMemAvailable:   {} kB\n",
                available_mib << 10
            )
        };
        assert_eq!(ram_budget_refusal(image, &meminfo(200)), None);
        let refusal = ram_budget_refusal(image, &meminfo(60)).expect("refused");
        assert!(refusal.contains("50 %"), "{refusal}");
        assert!(ram_budget_refusal(image, "MemTotal: 1 kB\n").is_some());
    }
}
