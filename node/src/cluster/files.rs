//! A server's cluster files, in `<state_dir>/cluster/`: who it is (`identity.toml`), the cluster
//! CA (`ca.crt`, `ca.key`), its own certificate and key (`server.crt`, `server.key`), and its
//! Raft store (`raft.redb`). Keys are written 0600 and every file is written whole (temporary
//! file, fsync, rename), so a crash never leaves half an identity.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::ClusterError;
use super::pki::{ClusterCa, ServerIdentity, ServerKey};

/// `identity.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRecord {
    /// This server's id in the cluster.
    pub server_id: u64,
    /// The cluster's name (in its CA and Raft config).
    pub cluster_name: String,
    /// Where this server's cluster endpoint listens and where the others reach it: an IP
    /// literal and a UDP port, never a wildcard.
    pub address: SocketAddr,
    /// This server's rack.
    pub rack: String,
    /// Whether this server founds the cluster (`cluster init`): it initializes Raft with
    /// itself as the only voter on its first start.
    pub bootstrap: bool,
}

/// What a server loads to take part in the cluster.
#[derive(Debug)]
pub struct LoadedCluster {
    /// `identity.toml`.
    pub record: IdentityRecord,
    /// The cluster CA (with its key: every server can admit a joiner).
    pub ca: ClusterCa,
    /// This server's certificate and key.
    pub identity: ServerIdentity,
}

/// The cluster directory of one server.
#[derive(Debug, Clone)]
pub struct ClusterFiles {
    directory: PathBuf,
}

const IDENTITY: &str = "identity.toml";
const CA_CERTIFICATE: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVER_CERTIFICATE: &str = "server.crt";
const SERVER_KEY: &str = "server.key";

impl ClusterFiles {
    /// The cluster directory under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            directory: state_dir.join("cluster"),
        }
    }

    /// Whether this server has an identity.
    pub fn exists(&self) -> bool {
        self.directory.join(IDENTITY).exists()
    }

    /// The cluster directory.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The Raft store.
    pub fn raft_store(&self) -> PathBuf {
        self.directory.join("raft.redb")
    }

    /// Writes a new identity; refuses to overwrite one (a server joins once).
    pub fn write_new(
        &self,
        record: &IdentityRecord,
        ca: &ClusterCa,
        key: &ServerKey,
        certificate: &CertificateDer<'_>,
    ) -> Result<(), ClusterError> {
        if self.exists() {
            return Err(ClusterError::Invalid(format!(
                "{} already holds a cluster identity",
                self.directory.display()
            )));
        }
        if record.address.ip().is_unspecified() {
            return Err(ClusterError::Invalid(
                "the cluster address must be this server's own IP, not a wildcard".into(),
            ));
        }
        std::fs::create_dir_all(&self.directory).map_err(self.io("create"))?;
        let identity = toml::to_string(record)
            .map_err(|error| ClusterError::Invalid(format!("identity: {error}")))?;
        self.write(CA_CERTIFICATE, ca.cert_pem().as_bytes(), 0o644)?;
        self.write(CA_KEY, ca.key_pem().as_bytes(), 0o600)?;
        self.write(SERVER_KEY, key.to_pem().as_bytes(), 0o600)?;
        self.write(
            SERVER_CERTIFICATE,
            pem_certificate(certificate).as_bytes(),
            0o644,
        )?;
        // The Raft store exists from now on: a later start that finds it missing knows the
        // server lost its log and vote, instead of starting empty.
        consensus::store::create_file(&self.raft_store())?;
        // Last: its presence says the rest is complete.
        self.write(IDENTITY, identity.as_bytes(), 0o644)
    }

    /// Loads the identity, CA and certificate.
    pub fn load(&self) -> Result<LoadedCluster, ClusterError> {
        let read = |name: &str| -> Result<String, ClusterError> {
            std::fs::read_to_string(self.directory.join(name)).map_err(|source| ClusterError::Io {
                what: format!("read {}", self.directory.join(name).display()),
                source,
            })
        };
        let record: IdentityRecord = toml::from_str(&read(IDENTITY)?)
            .map_err(|error| ClusterError::Invalid(format!("{IDENTITY}: {error}")))?;
        let ca = ClusterCa::from_pem(&read(CA_CERTIFICATE)?, &read(CA_KEY)?)?;
        let key = ServerKey::from_pem(&read(SERVER_KEY)?)?;
        let certificate = parse_pem_certificate(&read(SERVER_CERTIFICATE)?)?;
        let identity = ServerIdentity::new(certificate, key, ca.cert_der())?;
        if identity.server_id != record.server_id {
            return Err(ClusterError::Invalid(format!(
                "server.crt is for server {}, identity.toml says {}",
                identity.server_id, record.server_id
            )));
        }
        Ok(LoadedCluster {
            record,
            ca,
            identity,
        })
    }

    fn io(&self, what: &str) -> impl FnOnce(std::io::Error) -> ClusterError {
        let what = format!("{what} {}", self.directory.display());
        move |source| ClusterError::Io { what, source }
    }

    fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), ClusterError> {
        let path = self.directory.join(name);
        let temporary = self.directory.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&temporary)?;
            file.write_all(contents)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(&self.directory)?.sync_all()
        };
        write().map_err(|source| ClusterError::Io {
            what: format!("write {}", path.display()),
            source,
        })
    }
}

/// PEM text of a DER certificate.
pub fn pem_certificate(certificate: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", certificate.to_vec()))
}

/// The DER certificate in PEM text.
pub fn parse_pem_certificate(text: &str) -> Result<CertificateDer<'static>, ClusterError> {
    CertificateDer::from_pem_slice(text.as_bytes())
        .map_err(|error| ClusterError::Invalid(format!("certificate PEM: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_garbage_is_refused() {
        let der: Vec<u8> = (0..100u8).collect();
        let pem = pem_certificate(&CertificateDer::from(der.clone()));
        assert_eq!(
            parse_pem_certificate(&pem).map(|der| der.to_vec()).ok(),
            Some(der)
        );
        assert!(
            parse_pem_certificate("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----")
                .is_err()
        );
    }
}
