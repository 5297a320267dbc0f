//! One QUIC endpoint per server (quinn), mutual TLS under the cluster CA, protocols told apart
//! by ALPN: `bootmesh-raft/1` (Raft messages, `consensus::rpc` frames on bidirectional
//! streams), `bootmesh-admin/1` (the CLI's requests) and `bootmesh-join/1` (a new server's one
//! request, the only one allowed without a certificate) and `bootmesh-chunks/1` (image chunks
//! for the swarm: no certificate asked, chunks are trusted by hash).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use consensus::rpc::Dialer;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;

use super::ClusterError;
use super::pki::{self, CaFingerprint, PinnedCa, SERVER_NAME, ServerIdentity};

/// Raft between members.
pub const ALPN_RAFT: &[u8] = b"bootmesh-raft/1";
/// The CLI's requests to a member.
pub const ALPN_ADMIN: &[u8] = b"bootmesh-admin/1";
/// A new server's join request.
pub const ALPN_JOIN: &[u8] = b"bootmesh-join/1";
/// Image chunks between swarm members (no certificate asked: chunks are trusted by hash).
pub const ALPN_CHUNKS: &[u8] = crate::swarm::ALPN_CHUNKS;

/// A QUIC bidirectional stream as one byte stream.
pub type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// Keep-alives hold idle Raft connections open through NAT-less but stateful firewalls, and a
/// dead peer is noticed within the idle timeout.
fn transport_config() -> Result<Arc<quinn::TransportConfig>, ClusterError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30))
            .map_err(|error| ClusterError::Transport(error.to_string()))?,
    ));
    Ok(Arc::new(transport))
}

/// Binds the server's endpoint at `address`: it accepts all three protocols and dials peers.
pub fn bind_server(
    address: SocketAddr,
    identity: &ServerIdentity,
) -> Result<Endpoint, ClusterError> {
    let tls = identity.server_config(&[ALPN_RAFT, ALPN_ADMIN, ALPN_JOIN, ALPN_CHUNKS])?;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|error| ClusterError::Transport(format!("server TLS for QUIC: {error}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config()?);
    let bind_error = |source| ClusterError::Io {
        what: format!("bind the cluster endpoint on udp {address}"),
        source,
    };
    // Chunks share this endpoint (ALPN), so it gets the swarm's socket buffers.
    let socket = crate::swarm::chunk_socket(address).map_err(bind_error)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        ClusterError::Transport("no async runtime for the cluster endpoint".into())
    })?;
    let reset_key = identity.stateless_reset_key();
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(StatelessResetKey(reset_key)));
    // Connection ids carry a check keyed the same way: a restarted server must recognise the
    // ids of its previous life as its own, or it drops their packets instead of resetting.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&blake3::keyed_hash(&reset_key, b"connection ids").as_bytes()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Endpoint::new(endpoint_config, Some(config), socket, runtime).map_err(bind_error)
}

/// Signs QUIC stateless reset tokens with a key that survives restarts. With quinn's default
/// (a random key per process), a server killed and restarted cannot reset the connections
/// its peers still hold to its previous life, and the leader keeps sending Raft traffic into
/// them until the idle timeout; with a stable key the first packet that arrives gets a reset
/// the peer recognises, and the next dial makes a fresh connection.
struct StatelessResetKey([u8; 32]);

impl quinn::crypto::HmacKey for StatelessResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let length = signature_out.len().min(blake3::OUT_LEN);
        signature_out[..length].copy_from_slice(&mac.as_bytes()[..length]);
    }

    fn signature_len(&self) -> usize {
        blake3::OUT_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let expected = blake3::keyed_hash(&self.0, data);
        // blake3::Hash compares in constant time.
        match <[u8; blake3::OUT_LEN]>::try_from(signature) {
            Ok(bytes) if blake3::Hash::from(bytes) == expected => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

/// A client-only endpoint for the CLI, on the address family of `peer`.
pub fn client_endpoint(peer: SocketAddr) -> Result<Endpoint, ClusterError> {
    let local = match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    Endpoint::client(local).map_err(|source| ClusterError::Io {
        what: "bind a QUIC client endpoint".into(),
        source,
    })
}

/// Client config between members (and for the CLI, which uses its server's identity).
pub fn member_client_config(
    identity: &ServerIdentity,
    protocol: &[u8],
) -> Result<quinn::ClientConfig, ClusterError> {
    quic_client(identity.client_config(&[protocol])?)
}

/// Client config for a joining server, which trusts only the CA pinned in its token.
pub fn joiner_client_config(
    pinned: CaFingerprint,
) -> Result<(quinn::ClientConfig, PinnedCa), ClusterError> {
    let (tls, matched) = pki::joiner_client_config(pinned, &[ALPN_JOIN])?;
    Ok((quic_client(tls)?, matched))
}

fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, ClusterError> {
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|error| ClusterError::Transport(format!("client TLS for QUIC: {error}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config()?);
    Ok(config)
}

/// Connects to `address` with `config`.
pub async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    address: SocketAddr,
) -> Result<Connection, ClusterError> {
    let connecting = endpoint
        .connect_with(config, address, SERVER_NAME)
        .map_err(|error| ClusterError::Transport(format!("connect to {address}: {error}")))?;
    connecting
        .await
        .map_err(|error| ClusterError::Transport(format!("connect to {address}: {error}")))
}

/// Opens a bidirectional stream on `connection`.
pub async fn open_stream(connection: &Connection) -> Result<QuicStream, ClusterError> {
    let (send, receive) = connection
        .open_bi()
        .await
        .map_err(|error| ClusterError::Transport(format!("open a stream: {error}")))?;
    Ok(tokio::io::join(receive, send))
}

/// The ALPN protocol a connection negotiated.
pub fn protocol(connection: &Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

/// The server id in the certificate the peer presented (rustls has verified its chain to the
/// CA); `None` when it presented none.
pub fn peer_server_id(connection: &Connection) -> Option<u64> {
    let certificates = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    pki::server_id_of(certificates.first()?)
}

/// Raft streams over QUIC: one connection per peer, a stream per openraft client.
#[derive(Debug, Clone)]
pub struct QuicDialer {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    connections: Arc<Mutex<BTreeMap<SocketAddr, Connection>>>,
}

impl QuicDialer {
    /// Dials from `endpoint` as `identity`.
    pub fn new(endpoint: Endpoint, identity: &ServerIdentity) -> Result<Self, ClusterError> {
        Ok(Self {
            endpoint,
            config: member_client_config(identity, ALPN_RAFT)?,
            connections: Arc::default(),
        })
    }

    fn cached(&self, address: SocketAddr) -> Option<Connection> {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections
            .get(&address)
            .filter(|connection| connection.close_reason().is_none())
            .cloned()
    }
}

impl Dialer for QuicDialer {
    type Stream = QuicStream;

    async fn dial(&self, address: &str) -> std::io::Result<Self::Stream> {
        let address: SocketAddr = address.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("member address {address:?} is not ip:port"),
            )
        })?;
        let connection = match self.cached(address) {
            Some(connection) => connection,
            None => {
                let connection = connect(&self.endpoint, self.config.clone(), address)
                    .await
                    .map_err(std::io::Error::other)?;
                self.connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(address, connection.clone());
                connection
            }
        };
        open_stream(&connection)
            .await
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use quinn::crypto::HmacKey;

    use super::StatelessResetKey;

    #[test]
    fn reset_tokens_are_stable_per_key_and_differ_between_keys() {
        let key = StatelessResetKey([7; 32]);
        let again = StatelessResetKey([7; 32]);
        let other = StatelessResetKey([8; 32]);
        let mut first = [0u8; 32];
        let mut second = [0u8; 32];
        let mut third = [0u8; 32];
        key.sign(b"connection id", &mut first);
        again.sign(b"connection id", &mut second);
        other.sign(b"connection id", &mut third);
        assert_eq!(first, second, "a restarted server signs as before");
        assert_ne!(first, third);
        assert!(key.verify(b"connection id", &first).is_ok());
        assert!(key.verify(b"connection id", &third).is_err());
        assert!(key.verify(b"connection id", &first[..16]).is_err());
    }
}
