//! The boot protocols of bootmesh as sans-IO state machines: a DHCPv4 server (with PXE, iPXE,
//! relay and proxyDHCP support), a read-only TFTP server, a read-only NBD server and the iPXE
//! boot scripts that tie them together; and the boot timelines, what the services saw of each
//! node's boot, stage by stage.
//!
//! Every machine here is driven the same way: bytes and the current time go in through
//! `handle_*(now, ...)`, effects come out of `poll_*`. This crate never opens a socket, reads a
//! clock, spawns a task or draws randomness; it depends on no async runtime. Files and block
//! devices are reached only through the [`FileSource`] and [`BlockSource`] traits, which the
//! caller implements (plain files in `node`, a chunk store later, memory in tests).

pub mod dhcp;
pub mod ipxe;
pub mod ltsp;
pub mod nbd;
pub mod source;
pub mod tftp;
pub mod timeline;

pub use source::{BlockSource, FileSource, SourceError};
