//! The image swarm's QUIC side (DESIGN 5.3): every boot server and every agent can serve the
//! chunks it holds to others and fetch the ones it lacks from several peers at once, driven by
//! `transfer::swarm`'s sans-IO fetch scheduler and upload gate.
//!
//! On the wire (ALPN `bootmesh-chunks/1`), one connection is one peering about one image:
//! - the dialer opens the first bidirectional stream, the control stream, and sends `Hello`
//!   (manifest hash, chunk count) and `Have` (its bitfield); the other side answers the same
//!   way, or closes the connection with [`CLOSE_UNKNOWN_IMAGE`]. After that both sides send
//!   `HaveChunk` on it whenever they gain a chunk;
//! - either side asks for a chunk on a new bidirectional stream of its own: `Request` out,
//!   and back `Data`, `Busy` (ask again later, or ask these others) or `NotHere`. Giving up
//!   on a request (endgame, timeout) drops its stream, which QUIC turns into a stop the
//!   uploader sees at once.
//!
//! A connection whose control stream opens with `Announce` instead is a tracker session
//! (servers only): each announce is answered with the member's neighbours ([`tracker`]).
//!
//! Nothing a peer sends is trusted: frames are bounded before anything is allocated, chunks
//! are verified against the manifest before they are stored or served on, and a peer that
//! sends a wrong chunk is banned for the rest of the fetch and logged.

pub mod fetch;
pub mod member;
pub mod peering;
pub mod shelf;
pub mod store_offer;
pub mod tls;
pub mod tracker;
pub mod uploader;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use fetch::{FetchReport, SourceReport, SwarmFetchConfig};
pub use peering::{SharedImage, SwarmNode, SwarmStats};
pub use shelf::{AssembledShelf, ChunkShelf, StoreShelf};
pub use store_offer::offer_store_images;
pub use tracker::{AnnounceOptions, FirmwarePeerSource, TrackerService};
pub use uploader::Uploader;

/// The chunk exchange's ALPN protocol.
pub const ALPN_CHUNKS: &[u8] = b"bootmesh-chunks/1";

/// Peerings a member serves at once (accepted connections); more are refused, and their
/// nodes fetch from other peers.
pub const PEERINGS_MAX: usize = 4096;

/// Application close codes.
pub const CLOSE_DONE: u32 = 0;
/// The peer asked about an image this node does not offer.
pub const CLOSE_UNKNOWN_IMAGE: u32 = 1;
/// The peer broke the protocol (a bad frame, a wrong first message).
pub const CLOSE_PROTOCOL: u32 = 2;
/// The peer sent a chunk whose hash was wrong and is banned.
pub const CLOSE_BANNED: u32 = 3;
/// This member serves as many peers as it may (or, as a tracker, tracks as many as it may).
pub const CLOSE_BUSY: u32 = 4;
/// The peer announced itself to a member that runs no tracker.
pub const CLOSE_NO_TRACKER: u32 = 5;

/// Why the swarm could not do something.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// TLS set-up.
    #[error("swarm TLS: {0}")]
    Tls(String),
    /// The endpoint could not be bound.
    #[error("bind the chunk endpoint on udp {address}: {source}")]
    Bind {
        /// Where.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A connection failed or a peer broke the protocol.
    #[error("peer {peer}: {reason}")]
    Peer {
        /// Which peer.
        peer: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The image cannot be numbered for the swarm.
    #[error(transparent)]
    Image(#[from] transfer::swarm::TooManyChunks),
    /// The fetch cannot go on: no peer left that holds what is missing.
    #[error(
        "image {manifest}: {missing} of {total} chunks still missing and no peer left to ask ({detail})"
    )]
    Stalled {
        /// The image.
        manifest: transfer::ContentHash,
        /// Chunks not held.
        missing: u32,
        /// Chunks in the image.
        total: u32,
        /// The last thing that went wrong.
        detail: String,
    },
    /// Storing or reading a chunk failed.
    #[error("chunk shelf: {0}")]
    Shelf(String),
    /// No tracker answered.
    #[error("no tracker answered")]
    NoTracker,
}

/// The socket buffers asked for on an endpoint that carries chunks. A fetcher that receives
/// at line rate shares its CPU with verifying and storing what arrived; with the kernel's
/// default receive buffer (208 KiB, under a millisecond at a few hundred MiB/s) any pause of
/// its receiving thread drops datagrams, and QUIC reads each drop as congestion and halves
/// its window. Measured on loopback with a 264 MiB image: 93 to 783 drops per fetch at the
/// default, none at 4 MiB, and the fetch 15-25 % faster.
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A UDP socket bound to `address` for a chunk endpoint, with [`SOCKET_BUFFER_BYTES`] of
/// receive and send buffer: forced past `net.core.rmem_max`/`wmem_max` where the process
/// may (`CAP_NET_ADMIN`, as boot servers and agents run), otherwise as much as those allow.
pub fn chunk_socket(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(address)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER_BYTES).is_err() {
        sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER_BYTES)?;
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER_BYTES).is_err() {
        sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER_BYTES)?;
    }
    // The kernel reports twice what it grants (its bookkeeping overhead included).
    let granted = sockopt::socket_recv_buffer_size(&socket)? / 2;
    if granted < SOCKET_BUFFER_BYTES {
        tracing::info!(
            %address,
            granted_bytes = granted,
            wanted_bytes = SOCKET_BUFFER_BYTES,
            "chunk endpoint: a smaller receive buffer than wanted (raise net.core.rmem_max); \
             a busy fetcher may drop datagrams"
        );
    }
    Ok(socket)
}

/// Transport settings for chunk connections: windows large enough that one stream can carry
/// a whole chunk without waiting for window updates, keep-alives so a quiet peering stays
/// open, and an idle timeout that notices a dead peer well before a boot gives up.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(timeout) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        transport.max_idle_timeout(Some(timeout));
    }
    transport.stream_receive_window(quinn::VarInt::from_u32(4 * 1024 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    transport.send_window(32 * 1024 * 1024);
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Arc::new(transport)
}
