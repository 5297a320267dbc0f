//! The configuration files of an LTSP site, read for `bootmesh config import-ltsp`: ISC
//! dhcpd's `dhcpd.conf` and LTSP's `lts.conf`. Only their syntax lives here (they are decoders
//! of files an operator hands us, fuzzed like the wire decoders); what they mean for a fleet is
//! the importer's business.

pub mod dhcpd_conf;
pub mod lts_conf;

/// A file that is not well-formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct ParseError {
    /// `dhcpd.conf` or `lts.conf`.
    pub file: &'static str,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}
