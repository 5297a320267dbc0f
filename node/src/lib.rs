//! The `bootmesh` binary's library: configuration loading, the tokio drivers that run the
//! sans-IO cores of `boot-services` on real sockets, the wiring between them, and the CLI.
//!
//! This is the only crate that touches sockets, files, the environment, signals and the clock.
//! The wiring (`dhcp_service`, `tftp_service`, ...) is generic over the seams in [`seams`] and
//! [`journal`], so the simulator in `sim` runs it unchanged with simulated ones.

pub mod agent;
pub mod boots;
pub mod cluster;
pub mod cluster_cli;
pub mod config;
pub mod daemon;
pub mod dhcp_service;
pub mod files;
pub mod http_service;
pub mod image;
pub mod image_source;
pub mod initramfs;
pub mod initramfs_builder;
pub mod journal;
pub mod ltsp_import;
pub mod metrics;
pub mod modules;
pub mod nbd_service;
pub mod net;
pub mod nodes_cli;
pub mod plan;
pub mod racks;
pub mod seams;
pub mod status_cli;
pub mod swarm;
pub mod tftp_service;
pub use boot_services::timeline;
pub mod vmlab;
