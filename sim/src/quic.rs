//! quinn inside turmoil: a UDP socket and a runtime for quinn's `Endpoint` on turmoil's
//! simulated network and clock, so that the project's real QUIC code (the cluster transport,
//! the swarm's peerings) can run in a simulation.
//!
//! Time: quinn asks its runtime for the time and for timers; here both are tokio's, which
//! turmoil drives, so a handshake, a loss-recovery timer or an idle timeout happens at the same
//! virtual instant in every run of a seed. quinn's receive-work limiter also reads the time
//! through the runtime, so it never yields on wall-clock grounds.
//!
//! What is not deterministic yet (ADR 0012): the bytes of TLS handshakes (rustls's randoms,
//! and ring's key shares, draw from the operating system), connection ids (quinn-proto's
//! generators and a client's first destination id use the thread RNG, not the endpoint's
//! seed) and the stateless-reset key. Sizes and timing do not depend on them, but a stray
//! Initial that a server no longer holds a connection for can be answered or not depending
//! on them, so the quinn profile does not replay exactly. The endpoint's seeded RNG
//! ([`endpoint_config`]) covers packet-number skips, path challenges and grease.
#![allow(
    clippy::disallowed_methods,
    reason = "this is quinn's runtime seam in the simulation: it spawns on the host's runtime and reads tokio's clock, which turmoil drives"
)]

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};
use tokio::sync::mpsc;

/// Datagrams waiting for quinn to read them; more are dropped, as a full socket buffer drops
/// them.
const RECEIVE_QUEUE: usize = 4096;
/// The largest datagram read (turmoil carries whole datagrams of any size).
const DATAGRAM_BYTES_MAX: usize = 65_535;

/// A turmoil UDP socket as quinn's socket. A task of the host reads the socket into a queue
/// that quinn polls (turmoil's socket offers only `async` reads, quinn wants to poll).
pub struct TurmoilUdpSocket {
    socket: Arc<turmoil::net::UdpSocket>,
    local: SocketAddr,
    received: Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
}

impl fmt::Debug for TurmoilUdpSocket {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TurmoilUdpSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TurmoilUdpSocket {
    /// Binds `address` on the current turmoil host, and starts the host's reader task (it
    /// ends with the host, or at the first datagram after the socket is dropped).
    pub async fn bind(address: SocketAddr) -> io::Result<Arc<Self>> {
        let socket = Arc::new(turmoil::net::UdpSocket::bind(address).await?);
        let local = socket.local_addr()?;
        let (sender, received) = mpsc::channel(RECEIVE_QUEUE);
        let reader = Arc::clone(&socket);
        tokio::spawn(async move {
            let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
            while let Ok((length, from)) = reader.recv_from(&mut buffer).await {
                let datagram = buffer.get(..length).unwrap_or_default().to_vec();
                match sender.try_send((datagram, from)) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        Ok(Arc::new(Self {
            socket,
            local,
            received: Mutex::new(received),
        }))
    }
}

/// turmoil's sockets have no back pressure: always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for TurmoilUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // One datagram per transmit (`max_transmit_segments` is 1): no segmentation offload.
        self.socket
            .try_send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buffer), Some(slot)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        let mut received = self.received.lock().unwrap_or_else(PoisonError::into_inner);
        match received.poll_recv(cx) {
            Poll::Ready(Some((datagram, from))) => {
                // A datagram longer than quinn's buffer is cut, as a real socket cuts it.
                let length = datagram.len().min(buffer.len());
                buffer[..length].copy_from_slice(&datagram[..length]);
                *slot = RecvMeta {
                    addr: from,
                    len: length,
                    stride: length,
                    ecn: None,
                    dst_ip: Some(self.local.ip()),
                };
                Poll::Ready(Ok(1))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the simulated socket's reader stopped (its host crashed)",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        // turmoil delivers datagrams whole: path MTU discovery may probe.
        false
    }
}

/// quinn's runtime on the simulation: tokio's clock (turmoil's virtual time), timers and
/// tasks of the current host.
#[derive(Debug, Default, Clone, Copy)]
pub struct TurmoilRuntime;

impl Runtime for TurmoilRuntime {
    fn new_timer(&self, at: std::time::Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(at)))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, _: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a simulation has no operating-system sockets: bind a TurmoilUdpSocket",
        ))
    }

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// An endpoint configuration whose RNG (packet-number skips, path challenges, grease) follows
/// `seed`; connection ids and the reset key do not (see the module's comment).
pub fn endpoint_config(seed: u64) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    let mut bytes = [0u8; 32];
    for (index, chunk) in bytes.chunks_mut(8).enumerate() {
        let word = seed
            .wrapping_add(index as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    config.rng_seed(Some(bytes));
    config
}

/// A quinn endpoint on the current turmoil host at `address`, accepting with `server` if
/// given.
pub async fn endpoint(
    address: SocketAddr,
    server: Option<quinn::ServerConfig>,
    seed: u64,
) -> io::Result<quinn::Endpoint> {
    let socket = TurmoilUdpSocket::bind(address).await?;
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(seed),
        server,
        socket,
        Arc::new(TurmoilRuntime),
    )
}

/// A swarm member's chunks in memory, as a booting node holds them: a shelf that never blocks,
/// so a simulation calls it inline (`ChunkShelf::blocks`).
#[derive(Debug, Default)]
pub struct MemoryShelf {
    chunks: Mutex<std::collections::BTreeMap<transfer::ContentHash, Arc<[u8]>>>,
}

impl MemoryShelf {
    fn chunks(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<transfer::ContentHash, Arc<[u8]>>>
    {
        self.chunks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl node::swarm::ChunkShelf for MemoryShelf {
    fn read(
        &self,
        chunk: &transfer::ChunkRef,
    ) -> Result<Option<Arc<[u8]>>, node::swarm::SwarmError> {
        Ok(self.chunks().get(&chunk.hash).cloned())
    }

    fn store(
        &self,
        chunk: &transfer::ChunkRef,
        bytes: &[u8],
    ) -> Result<(), node::swarm::SwarmError> {
        self.chunks().insert(chunk.hash, Arc::from(bytes));
        Ok(())
    }

    fn holds(&self, chunk: &transfer::ChunkRef) -> bool {
        self.chunks().contains_key(&chunk.hash)
    }

    fn sync(&self) -> Result<(), node::swarm::SwarmError> {
        Ok(())
    }

    fn blocks(&self) -> bool {
        false
    }
}
