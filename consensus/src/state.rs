//! `MeshState`, the replicated state machine, and the commands that change it.
//!
//! `apply` is pure and deterministic: the same commands with the same proposal times give the
//! same state and responses on every server, in the simulator and in production. Time comes
//! only from the proposal (the proposer's clock when it proposed), never from the applying
//! server's clock, so replicas that apply an entry at different moments still agree.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use boot_services::dhcp::LeaseChange;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// A server's id in the cluster (its Raft node id).
pub type ServerId = u64;

/// Longest lease a server cut off from the majority may grant from its blocks (DESIGN 4.3),
/// milliseconds. A block whose lease ended is reassigned only after this much more time, plus
/// [`DRIFT_BOUND_MS`], so no lease granted from it on a minority side can still run.
pub const MINORITY_LEASE_MAX_MS: u64 = 5 * 60 * 1000;

/// The largest clock difference between servers the uniqueness argument allows for (ADR 0007),
/// milliseconds.
pub const DRIFT_BOUND_MS: u64 = 10 * 1000;

/// What a log entry carries: a command and when its proposer made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The proposer's clock when it proposed; the `now` of `apply`.
    pub at: UnixMillis,
    /// What to change.
    pub command: MeshCommand,
}

/// A change to the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshCommand {
    /// DHCP lease changes, batched; each is the DHCP core's journal record
    /// ([`LeaseChange::encode`]), applied in order, each accepted or refused on its own.
    Leases(Vec<Vec<u8>>),
    /// `server` holds address block `block` until `until` (grant or renewal).
    LeaseBlock {
        /// The block.
        block: BlockId,
        /// Its holder.
        server: ServerId,
        /// End of the block lease.
        until: UnixMillis,
    },
    /// Replaces the fleet configuration document if its version is still `expected_version`.
    SetConfig {
        /// The version the proposer based its change on (compare-and-set).
        expected_version: u64,
        /// The validated document (TOML).
        document: String,
    },
    /// Records that `reference` (`name:tag`) is the image with manifest `manifest`.
    TagImage {
        /// `name:tag`.
        reference: String,
        /// The manifest's hash, hex.
        manifest: String,
        /// The image's size in bytes.
        size_bytes: u64,
    },
    /// Makes `group` boot `reference`.
    Promote {
        /// The group.
        group: String,
        /// A tagged image.
        reference: String,
    },
    /// Records a one-time join token by the hash of its secret (never the secret).
    CreateJoinToken {
        /// SHA-256 of the token's secret, hex.
        secret_hash: String,
        /// The token is refused from then on.
        expires_at: UnixMillis,
    },
    /// Uses up a join token and admits `member` under the next free server id (the `id` it
    /// carries is ignored); answered with [`MeshResponse::Joined`].
    RedeemJoinToken {
        /// SHA-256 of the presented secret, hex.
        secret_hash: String,
        /// The joining server's addresses and rack.
        member: Member,
    },
    /// Adds or updates a member's addresses and rack.
    UpsertMember(Member),
    /// Removes a member.
    RemoveMember(ServerId),
}

/// An address block: a fixed-size run of a subnet's dynamic range, named by its first address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub Ipv4Addr);

/// A server of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its Raft node id.
    pub id: ServerId,
    /// Its cluster endpoint (`address:port`).
    pub address: String,
    /// Its rack.
    pub rack: String,
}

/// A DHCP lease as the cluster holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The client id (option 61, or hardware type + chaddr).
    pub client: Vec<u8>,
    /// The client's chaddr.
    pub hardware_address: Vec<u8>,
    /// End of the lease, Unix seconds; a released lease ends when released.
    pub expires_at_unix_secs: u64,
    /// Hostname given.
    pub hostname: Option<String>,
}

/// Who holds a block, until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLease {
    /// Holder.
    pub server: ServerId,
    /// End of the block lease.
    pub until: UnixMillis,
}

/// A tagged image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Manifest hash, hex.
    pub manifest: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// The fleet configuration document and its version (bumped by every change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDocument {
    /// Number of changes so far.
    pub version: u64,
    /// The document (TOML).
    pub document: String,
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshResponse {
    /// Done.
    Applied,
    /// Per lease change of a [`MeshCommand::Leases`] batch, in order.
    Leases(Vec<LeaseOutcome>),
    /// Refused, with the reason; the state is unchanged.
    Refused(String),
    /// A join token was redeemed: the new server's id.
    Joined {
        /// Its server id.
        server_id: ServerId,
    },
    /// Membership change entries and blanks carry no command.
    Nothing,
}

/// What became of one lease change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseOutcome {
    /// Committed: the proposer may ACK.
    Committed,
    /// Refused: another client holds the address (or it is quarantined) until then; the
    /// proposer must not ACK.
    AddressHeld {
        /// Unix seconds.
        until_unix_secs: u64,
    },
    /// The same client already holds the address for longer (a late commit of an older
    /// exchange, or a grant made while cut off and reconciled after a renewal elsewhere): the
    /// longer binding stays. The proposer may ACK its shorter lease; nothing changed.
    Superseded {
        /// When the binding that stays ends, Unix seconds.
        until_unix_secs: u64,
    },
    /// The record could not be decoded.
    Malformed(String),
}

/// A key of the state, for writing back only what a command changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateKey {
    /// A lease, by address.
    Lease(Ipv4Addr),
    /// A quarantined address.
    Quarantine(Ipv4Addr),
    /// A block.
    Block(BlockId),
    /// The config document.
    Config,
    /// A catalog entry.
    Image(String),
    /// A group's promotion.
    Promotion(String),
    /// A member.
    Member(ServerId),
    /// A join token.
    JoinToken(String),
    /// The next server id.
    NextServerId,
}

/// A join token as the cluster keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Refused from then on.
    pub expires_at: UnixMillis,
    /// Redeemed by this server, once.
    pub used_by: Option<ServerId>,
}

/// Deliberate bugs in the state machine, for showing that the simulator's checkers catch
/// them. Only the simulator sets them (feature `sabotage`); nothing else can.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSabotage {
    /// Reassign a block as soon as its lease ran out, without waiting out the longest lease
    /// its cut-off holder may have granted from it and the drift bound.
    pub early_block_reassignment: bool,
    /// Bind an address to a client while another client's lease of it is still running.
    pub unexpired_address_reuse: bool,
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    /// Leases by address. Expired ones stay until the address is needed, so a returning client
    /// gets its old address.
    pub leases: BTreeMap<Ipv4Addr, LeaseRecord>,
    /// Declined addresses, quarantined until then (Unix seconds).
    pub quarantine: BTreeMap<Ipv4Addr, u64>,
    /// Address blocks and their holders.
    pub blocks: BTreeMap<BlockId, BlockLease>,
    /// The fleet configuration.
    pub config: ConfigDocument,
    /// `name:tag` -> image.
    pub catalog: BTreeMap<String, CatalogEntry>,
    /// Group -> the `name:tag` it boots.
    pub promotions: BTreeMap<String, String>,
    /// Members by id.
    pub members: BTreeMap<ServerId, Member>,
    /// Join tokens by secret hash.
    pub join_tokens: BTreeMap<String, JoinTokenRecord>,
    /// The id the next joining server gets (ids are never reused).
    pub next_server_id: ServerId,
    /// Client id -> its leased address; derived from `leases` (see [`MeshState::reindex`]).
    #[serde(skip)]
    lease_by_client: BTreeMap<Vec<u8>, Ipv4Addr>,
    /// Not replicated: the server's own (simulated) bugs.
    #[serde(skip)]
    pub(crate) sabotage: StateSabotage,
}

impl MeshState {
    /// Rebuilds the derived indexes after the leases were loaded or replaced.
    pub fn reindex(&mut self) {
        // A client with several bindings is known by the one that lasts longest.
        let mut by_client: BTreeMap<Vec<u8>, (u64, Ipv4Addr)> = BTreeMap::new();
        for (address, lease) in &self.leases {
            let entry = by_client
                .entry(lease.client.clone())
                .or_insert((lease.expires_at_unix_secs, *address));
            if lease.expires_at_unix_secs > entry.0 {
                *entry = (lease.expires_at_unix_secs, *address);
            }
        }
        self.lease_by_client = by_client
            .into_iter()
            .map(|(client, (_, address))| (client, address))
            .collect();
    }

    /// The address `client` holds (possibly expired), if any.
    pub fn lease_of(&self, client: &[u8]) -> Option<Ipv4Addr> {
        self.lease_by_client.get(client).copied()
    }

    /// Applies `proposal`; returns the response and the keys it changed.
    pub fn apply(&mut self, proposal: &Proposal) -> (MeshResponse, Vec<StateKey>) {
        let now = proposal.at;
        let mut changed = Vec::new();
        let response = match &proposal.command {
            MeshCommand::Leases(records) => MeshResponse::Leases(
                records
                    .iter()
                    .map(|record| match LeaseChange::decode(record) {
                        Ok(change) => self.apply_lease(&change, now, &mut changed),
                        Err(error) => LeaseOutcome::Malformed(error.to_string()),
                    })
                    .collect(),
            ),
            MeshCommand::LeaseBlock {
                block,
                server,
                until,
            } => match self.blocks.get(block) {
                // The majority reassigns a block only after its lease, the longest lease a
                // cut-off holder may have granted from it, and the drift bound (ADR 0007).
                Some(held)
                    if held.server != *server
                        && held.until.saturating_add(
                            if self.sabotage.early_block_reassignment {
                                0
                            } else {
                                MINORITY_LEASE_MAX_MS + DRIFT_BOUND_MS
                            },
                        ) > now =>
                {
                    MeshResponse::Refused(format!(
                        "block {} is held by server {} until {} (reassignable {} ms later)",
                        block.0,
                        held.server,
                        held.until,
                        MINORITY_LEASE_MAX_MS + DRIFT_BOUND_MS
                    ))
                }
                _ => {
                    self.blocks.insert(
                        *block,
                        BlockLease {
                            server: *server,
                            until: *until,
                        },
                    );
                    changed.push(StateKey::Block(*block));
                    MeshResponse::Applied
                }
            },
            MeshCommand::SetConfig {
                expected_version,
                document,
            } => {
                if *expected_version == self.config.version {
                    self.config = ConfigDocument {
                        version: self.config.version + 1,
                        document: document.clone(),
                    };
                    changed.push(StateKey::Config);
                    MeshResponse::Applied
                } else {
                    MeshResponse::Refused(format!(
                        "config changed meanwhile: version {} expected, {} now",
                        expected_version, self.config.version
                    ))
                }
            }
            MeshCommand::TagImage {
                reference,
                manifest,
                size_bytes,
            } => {
                self.catalog.insert(
                    reference.clone(),
                    CatalogEntry {
                        manifest: manifest.clone(),
                        size_bytes: *size_bytes,
                    },
                );
                changed.push(StateKey::Image(reference.clone()));
                MeshResponse::Applied
            }
            MeshCommand::Promote { group, reference } => {
                if self.catalog.contains_key(reference) {
                    self.promotions.insert(group.clone(), reference.clone());
                    changed.push(StateKey::Promotion(group.clone()));
                    MeshResponse::Applied
                } else {
                    MeshResponse::Refused(format!("no image tagged {reference}"))
                }
            }
            MeshCommand::CreateJoinToken {
                secret_hash,
                expires_at,
            } => {
                if self.join_tokens.contains_key(secret_hash) {
                    MeshResponse::Refused("a token with this secret exists".into())
                } else {
                    // Spent and expired tokens are forgotten a day after expiry, so the table
                    // stays bounded by the tokens of the last day.
                    let forget_before = now.saturating_sub(86_400_000);
                    let stale: Vec<String> = self
                        .join_tokens
                        .iter()
                        .filter(|(_, token)| token.expires_at < forget_before)
                        .map(|(hash, _)| hash.clone())
                        .collect();
                    for hash in stale {
                        self.join_tokens.remove(&hash);
                        changed.push(StateKey::JoinToken(hash));
                    }
                    self.join_tokens.insert(
                        secret_hash.clone(),
                        JoinTokenRecord {
                            expires_at: *expires_at,
                            used_by: None,
                        },
                    );
                    changed.push(StateKey::JoinToken(secret_hash.clone()));
                    MeshResponse::Applied
                }
            }
            MeshCommand::RedeemJoinToken {
                secret_hash,
                member,
            } => match self.join_tokens.get_mut(secret_hash) {
                None => MeshResponse::Refused("unknown join token".into()),
                Some(token) if token.used_by.is_some() => {
                    MeshResponse::Refused("join token already used".into())
                }
                Some(token) if token.expires_at <= now => {
                    MeshResponse::Refused("join token expired".into())
                }
                Some(token) => {
                    let first_free = self.members.keys().next_back().map_or(1, |last| last + 1);
                    let server_id = self.next_server_id.max(first_free);
                    token.used_by = Some(server_id);
                    self.next_server_id = server_id + 1;
                    self.members.insert(
                        server_id,
                        Member {
                            id: server_id,
                            ..member.clone()
                        },
                    );
                    changed.push(StateKey::JoinToken(secret_hash.clone()));
                    changed.push(StateKey::NextServerId);
                    changed.push(StateKey::Member(server_id));
                    MeshResponse::Joined { server_id }
                }
            },
            MeshCommand::UpsertMember(member) => {
                self.members.insert(member.id, member.clone());
                changed.push(StateKey::Member(member.id));
                MeshResponse::Applied
            }
            MeshCommand::RemoveMember(id) => {
                self.members.remove(id);
                changed.push(StateKey::Member(*id));
                MeshResponse::Applied
            }
        };
        (response, changed)
    }

    /// The uniqueness guard of the whole cluster: whatever servers propose, the log orders it,
    /// and a bind of an address that another client holds unexpired is refused here, on every
    /// server alike.
    fn apply_lease(
        &mut self,
        change: &LeaseChange,
        now: UnixMillis,
        changed: &mut Vec<StateKey>,
    ) -> LeaseOutcome {
        let now_secs = now / 1000;
        match change {
            LeaseChange::Bind {
                client,
                hardware_address,
                address,
                expires_at_unix_secs,
                hostname,
            } => {
                if let Some(until) = self.quarantine.get(address).copied() {
                    if until > now_secs {
                        return LeaseOutcome::AddressHeld {
                            until_unix_secs: until,
                        };
                    }
                    self.quarantine.remove(address);
                    changed.push(StateKey::Quarantine(*address));
                }
                // An expired binding keeps its address for the drift bound more: the holder's
                // lease ran by another server's clock (ADR 0007).
                if let Some(held) = self.leases.get(address)
                    && held.client != client.0
                    && held.expires_at_unix_secs + DRIFT_BOUND_MS / 1000 > now_secs
                    && !self.sabotage.unexpired_address_reuse
                {
                    return LeaseOutcome::AddressHeld {
                        until_unix_secs: held.expires_at_unix_secs,
                    };
                }
                // A bind never shortens the same client's binding of the same address: a
                // grant made while cut off, reconciled after the heal, may be older than the
                // renewals the majority committed meanwhile, and the client holds the longer
                // one. (Found by the chaos engine: the reconciled grant cut a renewed lease
                // short, and the server gave the address to another node.)
                if let Some(held) = self.leases.get(address)
                    && held.client == client.0
                    && held.expires_at_unix_secs > *expires_at_unix_secs
                {
                    return LeaseOutcome::Superseded {
                        until_unix_secs: held.expires_at_unix_secs,
                    };
                }
                // A bind elsewhere does not end the client's earlier binding: commits of one
                // client's exchanges can arrive out of order (an exchange it gave up on, a grant
                // reconciled after a partition), and the client may hold the other address. It
                // stays the client's until it expires; the newest bind is the one a returning
                // client gets back.
                if let Some(replaced) = self.leases.get(address)
                    && self.lease_by_client.get(&replaced.client) == Some(address)
                {
                    self.lease_by_client.remove(&replaced.client);
                }
                self.lease_by_client.insert(client.0.clone(), *address);
                self.leases.insert(
                    *address,
                    LeaseRecord {
                        client: client.0.clone(),
                        hardware_address: hardware_address.clone(),
                        expires_at_unix_secs: *expires_at_unix_secs,
                        hostname: hostname.clone(),
                    },
                );
                changed.push(StateKey::Lease(*address));
                LeaseOutcome::Committed
            }
            LeaseChange::Release {
                client,
                address,
                at_unix_secs,
            } => {
                if let Some(held) = self.leases.get_mut(address)
                    && held.client == client.0
                {
                    held.expires_at_unix_secs = held.expires_at_unix_secs.min(*at_unix_secs);
                    changed.push(StateKey::Lease(*address));
                }
                LeaseOutcome::Committed
            }
            LeaseChange::Decline {
                address,
                until_unix_secs,
            } => {
                self.quarantine.insert(*address, *until_unix_secs);
                changed.push(StateKey::Quarantine(*address));
                LeaseOutcome::Committed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot_services::dhcp::ClientId;

    fn bind(client: u8, address: [u8; 4], expires: u64) -> Vec<u8> {
        let mut record = Vec::new();
        LeaseChange::Bind {
            client: ClientId(vec![1, client]),
            hardware_address: vec![client; 6],
            address: Ipv4Addr::from(address),
            expires_at_unix_secs: expires,
            hostname: None,
        }
        .encode(&mut record);
        record
    }

    fn leases(at_secs: u64, records: Vec<Vec<u8>>) -> Proposal {
        Proposal {
            at: at_secs * 1000,
            command: MeshCommand::Leases(records),
        }
    }

    #[test]
    fn an_older_bind_of_the_same_client_never_shortens_its_binding() {
        let mut state = MeshState::default();
        let address = Ipv4Addr::new(10, 0, 0, 7);
        state.apply(&leases(100, vec![bind(1, [10, 0, 0, 7], 900)]));
        // A grant made while cut off, reconciled late, ends earlier than the renewal.
        let (response, changed) = state.apply(&leases(150, vec![bind(1, [10, 0, 0, 7], 600)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::Superseded {
                until_unix_secs: 900
            }])
        );
        assert!(changed.is_empty());
        assert_eq!(state.leases[&address].expires_at_unix_secs, 900);
        // Another client still waits for the longer binding.
        let (response, _) = state.apply(&leases(700, vec![bind(2, [10, 0, 0, 7], 1000)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::AddressHeld {
                until_unix_secs: 900
            }])
        );
        // A renewal that ends later is committed as before.
        let (response, _) = state.apply(&leases(800, vec![bind(1, [10, 0, 0, 7], 1200)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::Committed])
        );
        assert_eq!(state.leases[&address].expires_at_unix_secs, 1200);
    }

    #[test]
    fn an_address_held_by_another_client_is_refused_until_it_expires_plus_the_drift_bound() {
        let mut state = MeshState::default();
        let (response, changed) = state.apply(&leases(100, vec![bind(1, [10, 0, 0, 5], 200)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::Committed])
        );
        assert_eq!(changed, vec![StateKey::Lease(Ipv4Addr::new(10, 0, 0, 5))]);
        let (response, changed) = state.apply(&leases(150, vec![bind(2, [10, 0, 0, 5], 300)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::AddressHeld {
                until_unix_secs: 200
            }])
        );
        assert!(changed.is_empty());
        // Expired, but within the drift bound of its expiry: still held.
        let (response, _) = state.apply(&leases(205, vec![bind(2, [10, 0, 0, 5], 300)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::AddressHeld {
                until_unix_secs: 200
            }])
        );
        let (response, _) = state.apply(&leases(210, vec![bind(2, [10, 0, 0, 5], 300)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::Committed])
        );
        assert_eq!(state.leases[&Ipv4Addr::new(10, 0, 0, 5)].client, vec![1, 2]);
    }

    #[test]
    fn a_client_that_binds_elsewhere_keeps_its_earlier_address_until_it_expires() {
        let mut state = MeshState::default();
        state.apply(&leases(100, vec![bind(1, [10, 0, 0, 5], 200)]));
        state.apply(&leases(110, vec![bind(1, [10, 0, 0, 6], 200)]));
        assert_eq!(
            state.leases.keys().copied().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]
        );
        assert_eq!(state.lease_of(&[1, 1]), Some(Ipv4Addr::new(10, 0, 0, 6)));
        // The earlier address is not another client's before it expires (plus the drift bound).
        let (response, _) = state.apply(&leases(150, vec![bind(2, [10, 0, 0, 5], 300)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![LeaseOutcome::AddressHeld {
                until_unix_secs: 200
            }])
        );
    }

    #[test]
    fn blocks_config_and_promotions_are_guarded() {
        let mut state = MeshState::default();
        let block = BlockId(Ipv4Addr::new(10, 0, 0, 0));
        let take = |server, at, until| Proposal {
            at,
            command: MeshCommand::LeaseBlock {
                block,
                server,
                until,
            },
        };
        assert_eq!(state.apply(&take(1, 0, 1000)).0, MeshResponse::Applied);
        // The holder renews; another server waits for the expiry plus the longest minority
        // lease plus the drift bound.
        assert_eq!(state.apply(&take(1, 500, 2000)).0, MeshResponse::Applied);
        let reassignable = 2000 + MINORITY_LEASE_MAX_MS + DRIFT_BOUND_MS;
        assert!(matches!(
            state.apply(&take(2, 2001, 9_000_000)).0,
            MeshResponse::Refused(_)
        ));
        assert!(matches!(
            state.apply(&take(2, reassignable - 1, 9_000_000)).0,
            MeshResponse::Refused(_)
        ));
        assert_eq!(
            state.apply(&take(2, reassignable, 9_000_000)).0,
            MeshResponse::Applied
        );
        let set = |expected_version| Proposal {
            at: 0,
            command: MeshCommand::SetConfig {
                expected_version,
                document: format!("# v{expected_version}"),
            },
        };
        assert_eq!(state.apply(&set(0)).0, MeshResponse::Applied);
        assert!(matches!(state.apply(&set(0)).0, MeshResponse::Refused(_)));
        assert_eq!(state.config.version, 1);
        let promote = Proposal {
            at: 0,
            command: MeshCommand::Promote {
                group: "default".into(),
                reference: "k8s:v1".into(),
            },
        };
        assert!(matches!(state.apply(&promote).0, MeshResponse::Refused(_)));
        state.apply(&Proposal {
            at: 0,
            command: MeshCommand::TagImage {
                reference: "k8s:v1".into(),
                manifest: "ab".into(),
                size_bytes: 1,
            },
        });
        assert_eq!(state.apply(&promote).0, MeshResponse::Applied);
    }

    #[test]
    fn a_join_token_admits_one_server_once_before_it_expires() {
        let mut state = MeshState::default();
        state.apply(&Proposal {
            at: 0,
            command: MeshCommand::UpsertMember(Member {
                id: 1,
                address: "10.0.0.1:7000".into(),
                rack: "r1".into(),
            }),
        });
        let create = |hash: &str, expires_at| Proposal {
            at: 1000,
            command: MeshCommand::CreateJoinToken {
                secret_hash: hash.into(),
                expires_at,
            },
        };
        let redeem = |hash: &str, at| Proposal {
            at,
            command: MeshCommand::RedeemJoinToken {
                secret_hash: hash.into(),
                member: Member {
                    id: 0,
                    address: "10.0.0.2:7000".into(),
                    rack: "r2".into(),
                },
            },
        };
        assert_eq!(state.apply(&create("a", 60_000)).0, MeshResponse::Applied);
        assert_eq!(state.apply(&create("b", 2_000)).0, MeshResponse::Applied);
        assert_eq!(
            state.apply(&redeem("a", 5_000)).0,
            MeshResponse::Joined { server_id: 2 }
        );
        assert_eq!(state.members[&2].rack, "r2");
        assert_eq!(
            state.apply(&redeem("a", 6_000)).0,
            MeshResponse::Refused("join token already used".into())
        );
        assert_eq!(
            state.apply(&redeem("b", 2_000)).0,
            MeshResponse::Refused("join token expired".into())
        );
        assert_eq!(
            state.apply(&redeem("c", 2_000)).0,
            MeshResponse::Refused("unknown join token".into())
        );
        // Ids are never reused, even after the member is removed.
        state.apply(&Proposal {
            at: 7_000,
            command: MeshCommand::RemoveMember(2),
        });
        state.apply(&create("d", 60_000));
        assert_eq!(
            state.apply(&redeem("d", 8_000)).0,
            MeshResponse::Joined { server_id: 3 }
        );
    }

    #[test]
    fn a_malformed_record_is_refused_alone() {
        let mut state = MeshState::default();
        let (response, _) = state.apply(&leases(100, vec![vec![99], bind(1, [10, 0, 0, 5], 200)]));
        assert_eq!(
            response,
            MeshResponse::Leases(vec![
                LeaseOutcome::Malformed("unknown record tag 99".into()),
                LeaseOutcome::Committed
            ])
        );
    }
}
