//! The boot servers' cluster (DESIGN section 4): a server's identity and certificates
//! ([`pki`], [`files`]), the QUIC endpoint whose protocols are told apart by ALPN
//! ([`transport`]), the admin and join protocols ([`admin`]), and the running Raft member
//! ([`member`]), and DHCP leases committed through it ([`leases`]).

pub mod admin;
pub mod catalog;
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
    /// The Raft store is missing or damaged: this server may have lost what it acknowledged.
    #[error(
        "{error}. This server must not take part again with less than it acknowledged (a vote, log entries): on another server run `bootmesh cluster remove {server_id}`, move {} aside, and join again with a new token (`bootmesh token create`, then `bootmesh cluster join`)",
        directory.display()
    )]
    StoreLost {
        /// What is wrong with the store (part of this message, so not a separate cause).
        error: consensus::store::StoreError,
        /// This server's id.
        server_id: u64,
        /// The cluster directory to move aside.
        directory: std::path::PathBuf,
    },
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
