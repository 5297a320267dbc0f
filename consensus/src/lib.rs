//! Replicated boot-server state (leases, config, image catalog, membership) on Raft.
//!
//! Not built yet: the single-server lease journal in `node` stands in for it, behind the same
//! commit contract (a lease is ACKed only after its command is durable).
