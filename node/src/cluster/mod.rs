//! The boot servers' cluster (DESIGN section 4): a server's identity and certificates
//! ([`pki`], [`files`]), the QUIC endpoint whose protocols are told apart by ALPN
//! ([`transport`]), the admin and join protocols ([`admin`]), and the running Raft member
//! ([`member`]), and DHCP leases committed through it ([`leases`]).

pub mod admin;
pub mod files;
pub mod leases;
pub mod member;
pub mod pki;
pub mod transport;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Bad input or state (an identity that exists, a wildcard address, ...).
    #[error("{0}")]
    Invalid(String),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificates or tokens.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The Raft store.
    #[error(transparent)]
    Store(#[from] consensus::store::StoreError),
    /// QUIC or TLS setup or a connection.
    #[error("{0}")]
    Transport(String),
    /// Raft refused or failed.
    #[error("raft: {0}")]
    Raft(String),
    /// The peer answered with an error.
    #[error("{0}")]
    Refused(String),
}
