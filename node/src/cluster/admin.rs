//! The admin and join protocols: one request frame and one reply frame per QUIC stream
//! (`consensus::rpc` framing), and the CLI's side of them.
//!
//! Requests that change the cluster go to the leader; a member that is not the leader answers
//! `NotLeader` with the leader's address, and the CLI asks there (a few hops at most).

use std::net::SocketAddr;
use std::path::Path;

use consensus::rpc::{read_frame, write_frame};
use serde::{Deserialize, Serialize};

use super::ClusterError;
use super::files::{ClusterFiles, IdentityRecord, pem_certificate};
use super::pki::{ClusterCa, JoinToken, ServerKey};
use super::transport::{
    ALPN_ADMIN, QuicStream, client_endpoint, connect, joiner_client_config, member_client_config,
    open_stream,
};

/// Most leader redirects a CLI request follows.
const REDIRECTS_MAX: usize = 3;

/// A request from the CLI. Its `Debug` (what the member logs) leaves out the fleet document:
/// it may hold secrets.
#[derive(Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// This member's view of the cluster.
    Status,
    /// A one-time join token valid for `ttl_secs`.
    CreateToken {
        /// Lifetime.
        ttl_secs: u64,
    },
    /// Removes a member from the cluster.
    RemoveMember {
        /// Its id.
        server_id: u64,
    },
    /// Commits a command (members forward their DHCP lease batches to the leader this way);
    /// the leader stamps it with its clock.
    Propose(consensus::MeshCommand),
    /// The leases in the cluster state.
    Leases,
    /// The fleet configuration and its version.
    ConfigShow,
    /// Replaces the fleet configuration, if it is still at `expected_version`.
    ConfigApply {
        /// The version the change was made against (0: none yet).
        expected_version: u64,
        /// The new fleet configuration (TOML).
        document: String,
    },
    /// The answering member's clock (members measure their offset to the leader with it).
    Time,
    /// The boots the answering member took part in, as it saw them (not merged).
    BootTimelines,
    /// An image manifest from the answering member's store, by its hash (hex): how a server
    /// that follows the cluster's catalog gets the manifest of an image imported elsewhere.
    Manifest {
        /// The manifest's hash, hex.
        hash: String,
    },
}

impl std::fmt::Debug for AdminRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminRequest::Status => formatter.write_str("Status"),
            AdminRequest::CreateToken { ttl_secs } => formatter
                .debug_struct("CreateToken")
                .field("ttl_secs", ttl_secs)
                .finish(),
            AdminRequest::RemoveMember { server_id } => formatter
                .debug_struct("RemoveMember")
                .field("server_id", server_id)
                .finish(),
            AdminRequest::Propose(command) => {
                formatter.debug_tuple("Propose").field(command).finish()
            }
            AdminRequest::Leases => formatter.write_str("Leases"),
            AdminRequest::ConfigShow => formatter.write_str("ConfigShow"),
            AdminRequest::ConfigApply {
                expected_version,
                document,
            } => formatter
                .debug_struct("ConfigApply")
                .field("expected_version", expected_version)
                .field("document_bytes", &document.len())
                .finish_non_exhaustive(),
            AdminRequest::Time => formatter.write_str("Time"),
            AdminRequest::BootTimelines => formatter.write_str("BootTimelines"),
            AdminRequest::Manifest { hash } => formatter
                .debug_struct("Manifest")
                .field("hash", hash)
                .finish(),
        }
    }
}

/// A lease as `lease list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseView {
    /// The address.
    pub address: std::net::Ipv4Addr,
    /// The holder's hardware address, `aa:bb:..`.
    pub hardware_address: String,
    /// The holder's client id, hex.
    pub client: String,
    /// End of the lease, Unix seconds.
    pub expires_at_unix_secs: u64,
    /// Hostname given.
    pub hostname: Option<String>,
}

/// The answer to an [`AdminRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminReply {
    /// To `Status`.
    Status(ClusterStatus),
    /// To `CreateToken`.
    Token {
        /// The token to hand to `cluster join`.
        token: String,
        /// When it stops working, Unix milliseconds.
        expires_at: u64,
    },
    /// To `RemoveMember`.
    Removed {
        /// The removed member.
        server_id: u64,
    },
    /// To `Propose`: the command's response.
    Proposed(consensus::MeshResponse),
    /// To `Leases`.
    Leases(Vec<LeaseView>),
    /// To `ConfigShow`, and to `ConfigApply` once applied.
    Config {
        /// Number of changes so far (0: none yet).
        version: u64,
        /// The document.
        document: String,
    },
    /// Ask the leader (its cluster address, when known).
    NotLeader {
        /// The leader's address.
        leader: Option<SocketAddr>,
    },
    /// The member's clock when it answered, Unix milliseconds.
    Time {
        /// The clock.
        unix_ms: u64,
    },
    /// To `BootTimelines`.
    BootTimelines(Vec<crate::timeline::NodeTimeline>),
    /// To `Manifest`: the manifest's bytes as stored (the asker checks them against the hash).
    Manifest(Vec<u8>),
    /// The request failed.
    Failed(String),
}

/// A member's view of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The answering member.
    pub server_id: u64,
    /// The cluster's name.
    pub cluster_name: String,
    /// Leader, Follower, Candidate or Learner.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Last log index it holds.
    pub last_log_index: Option<u64>,
    /// Last index it applied.
    pub last_applied: Option<u64>,
    /// Every member, voters and learners.
    pub members: Vec<MemberStatus>,
    /// How far the leader's clock was from this member's at the last check, in milliseconds
    /// (positive: the leader's is ahead); none on the leader or before the first check.
    #[serde(default)]
    pub clock_offset_to_leader_ms: Option<i64>,
}

/// One member in a [`ClusterStatus`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its id.
    pub server_id: u64,
    /// Its cluster address.
    pub address: String,
    /// Its rack, when the cluster state records it.
    pub rack: Option<String>,
    /// Voter (else learner).
    pub voter: bool,
    /// The last log index the leader knows it holds (only the leader knows).
    pub matched: Option<u64>,
}

/// A new server's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token as `token create` printed it.
    pub token: String,
    /// The public key the certificate is for (the private key stays on the joiner).
    pub subject_public_key_info: Vec<u8>,
    /// Where the joiner's cluster endpoint will listen.
    pub address: SocketAddr,
    /// Its rack.
    pub rack: String,
}

/// The answer to a [`JoinRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JoinReply {
    /// Admitted as a learner; promoted to voter once it has caught up.
    Admitted {
        /// Its id.
        server_id: u64,
        /// The cluster's name.
        cluster_name: String,
        /// Its certificate, DER.
        certificate: Vec<u8>,
        /// The CA key: every member can admit later joiners.
        ca_key_pem: String,
    },
    /// Ask the leader.
    NotLeader {
        /// The leader's address.
        leader: Option<SocketAddr>,
    },
    /// Refused (used, expired or unknown token, another cluster's token).
    Refused(String),
}

async fn exchange<Request: Serialize, Reply: serde::de::DeserializeOwned>(
    mut stream: QuicStream,
    request: &Request,
) -> Result<Reply, ClusterError> {
    write_frame(&mut stream, request)
        .await
        .map_err(|error| ClusterError::Transport(format!("send: {error}")))?;
    match read_frame(&mut stream).await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(ClusterError::Transport(
            "the server closed the stream without answering".into(),
        )),
        Err(error) => Err(ClusterError::Transport(format!("receive: {error}"))),
    }
}

/// Sends `request` as the server whose state is in `state_dir`, to `server` (default: that
/// server itself), following leader redirects.
pub async fn admin_call(
    state_dir: &Path,
    server: Option<SocketAddr>,
    request: &AdminRequest,
) -> Result<AdminReply, ClusterError> {
    let loaded = ClusterFiles::new(state_dir).load()?;
    let config = member_client_config(&loaded.identity, ALPN_ADMIN)?;
    let mut target = server.unwrap_or(loaded.record.address);
    for _ in 0..=REDIRECTS_MAX {
        let endpoint = client_endpoint(target)?;
        let connection = connect(&endpoint, config.clone(), target).await?;
        let reply: AdminReply = exchange(open_stream(&connection).await?, request).await?;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        match reply {
            AdminReply::NotLeader {
                leader: Some(leader),
            } if leader != target => target = leader,
            reply => return Ok(reply),
        }
    }
    Err(ClusterError::Refused(
        "no leader answered after several redirects; is an election going on?".into(),
    ))
}

/// What `cluster join` asks for.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// The token.
    pub token: String,
    /// Any member's cluster address.
    pub server: SocketAddr,
    /// This server's cluster address.
    pub address: SocketAddr,
    /// This server's rack.
    pub rack: String,
}

/// Joins the cluster: checks the server against the CA pinned in the token, sends the token
/// and a fresh public key, and writes the identity it gets into `state_dir`.
pub async fn join(state_dir: &Path, spec: &JoinSpec) -> Result<IdentityRecord, ClusterError> {
    let files = ClusterFiles::new(state_dir);
    if files.exists() {
        return Err(ClusterError::Invalid(format!(
            "{} already holds a cluster identity",
            state_dir.display()
        )));
    }
    let token = JoinToken::parse(&spec.token)?;
    let key = ServerKey::generate()?;
    let request = JoinRequest {
        token: spec.token.clone(),
        subject_public_key_info: key.subject_public_key_info_der(),
        address: spec.address,
        rack: spec.rack.clone(),
    };
    let mut target = spec.server;
    for _ in 0..=REDIRECTS_MAX {
        let (config, pinned) = joiner_client_config(token.ca)?;
        let endpoint = client_endpoint(target)?;
        let connection = connect(&endpoint, config, target).await?;
        let reply: JoinReply = exchange(open_stream(&connection).await?, &request).await?;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        match reply {
            JoinReply::NotLeader {
                leader: Some(leader),
            } if leader != target => target = leader,
            JoinReply::NotLeader { .. } => {
                return Err(ClusterError::Refused(
                    "the cluster has no leader right now; try again".into(),
                ));
            }
            JoinReply::Refused(reason) => return Err(ClusterError::Refused(reason)),
            JoinReply::Admitted {
                server_id,
                cluster_name,
                certificate,
                ca_key_pem,
            } => {
                let ca_certificate = pinned.ca_certificate().ok_or_else(|| {
                    ClusterError::Invalid("the server's CA was not seen in the handshake".into())
                })?;
                let ca = ClusterCa::from_pem(&pem_certificate(&ca_certificate), &ca_key_pem)?;
                if ca.fingerprint() != token.ca {
                    return Err(ClusterError::Invalid(
                        "the CA sent differs from the one pinned in the token".into(),
                    ));
                }
                let record = IdentityRecord {
                    server_id,
                    cluster_name,
                    address: spec.address,
                    rack: spec.rack.clone(),
                    bootstrap: false,
                };
                files.write_new(&record, &ca, &key, &certificate.into())?;
                return Ok(record);
            }
        }
    }
    Err(ClusterError::Refused(
        "no leader answered after several redirects".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The member logs every operator request with `Debug`; a fleet document's secrets must
    /// not ride along (a VM test found them in the server's log).
    #[test]
    fn a_logged_config_apply_carries_no_document() {
        let request = AdminRequest::ConfigApply {
            expected_version: 4,
            document: "[[group]]\nname = \"a\"\nsecrets = { join = \"s3cret\" }\n".into(),
        };
        let logged = format!("{request:?}");
        assert!(!logged.contains("s3cret"), "{logged}");
        assert!(logged.contains("expected_version: 4") && logged.contains("document_bytes: 51"));
    }
}
